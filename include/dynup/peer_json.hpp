// The one JSON format for peers, used by the file source, snapshot files, the push
// API and status output. docs/FORMAT.md documents it.
//
//   {"version": 7, "index": 42, "peers": [
//      {"id": "api-1", "host": "10.0.0.1", "port": 8080, "weight": 5, "backup": false,
//       "zone": "eu-1a", "tags": ["v2"], "meta": {"build": "1.4"}, "health": "passing"},
//      "10.0.0.2:8080"]}
//
// Input may also be a bare array of peers. Only host and port are required; a string
// "host:port" or "[v6]:port" is a peer with every other field at its default. Unknown
// keys are errors, so a misspelt "wieght" cannot silently become weight 1.
#pragma once

#include <dynup/peer.hpp>
#include <dynup/peer_set.hpp>
#include <dynup/result.hpp>
#include <dynup/version.hpp>

#include <nlohmann/json.hpp>

#include <string>
#include <string_view>
#include <vector>

DYNUP_NAMESPACE_BEGIN

/// A peer as a JSON object with every field present. Allocates; never throws on valid peers.
inline nlohmann::ordered_json peer_to_json(const Peer& p) {
  nlohmann::ordered_json meta = nlohmann::ordered_json::object();
  for (const auto& [k, v] : p.meta) meta[k] = v;
  return nlohmann::ordered_json{{"id", p.id},         {"host", p.host},     {"port", p.port},
                        {"weight", p.weight}, {"backup", p.backup}, {"zone", p.zone},
                        {"tags", p.tags},     {"meta", meta},       {"health", to_string(p.health)}};
}

/// {"version":…,"index":…,"peers":[…]} with peers in id order. Keys keep this order.
inline nlohmann::ordered_json peer_set_to_json(const PeerSet& set) {
  nlohmann::ordered_json peers = nlohmann::ordered_json::array();
  for (const Peer& p : set) peers.push_back(peer_to_json(p));
  return nlohmann::ordered_json{{"version", set.version()}, {"index", set.source_index()}, {"peers", peers}};
}

/// The set as one line of JSON (no trailing newline).
/// Bytes that are not UTF-8 (a Peer may hold any bytes) become U+FFFD instead of throwing.
inline std::string to_json(const PeerSet& set) {
  return peer_set_to_json(set).dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::replace);
}

namespace detail {

inline const char* json_type_name(const nlohmann::json& v) { return v.type_name(); }

/// Reads one peer; appends "where: what" messages to `errors` and returns false on failure.
inline bool peer_from_json(const nlohmann::json& v, const std::string& where, Peer& out,
                           std::vector<std::string>& errors) {
  using nlohmann::json;
  if (v.is_string()) {
    auto parsed = parse_host_port(v.get_ref<const std::string&>());
    if (!parsed) {
      errors.push_back(where + ": " + parsed.error().message());
      return false;
    }
    out = std::move(parsed).value();
    return true;
  }
  if (!v.is_object()) {
    errors.push_back(where + ": expected an object or \"host:port\", got " + json_type_name(v));
    return false;
  }
  std::size_t before = errors.size();
  auto bad = [&](const std::string& key, const std::string& what) {
    errors.push_back(where + "." + key + ": " + what);
  };
  auto get_string = [&](const char* key, std::string& dst) {
    auto it = v.find(key);
    if (it == v.end()) return;
    if (!it->is_string()) return bad(key, std::string("expected a string, got ") + json_type_name(*it));
    dst = it->get<std::string>();
  };
  auto get_uint = [&](const char* key, std::uint64_t lo, std::uint64_t hi, std::uint64_t& dst,
                      bool required) {
    auto it = v.find(key);
    if (it == v.end()) {
      if (required) bad(key, "is required");
      return;
    }
    if (!it->is_number_integer() ||
        (it->is_number_integer() && !it->is_number_unsigned() && it->get<std::int64_t>() < 0) ||
        it->get<std::uint64_t>() < lo || it->get<std::uint64_t>() > hi) {
      return bad(key, "expected an integer " + std::to_string(lo) + ".." + std::to_string(hi) +
                          ", got " + it->dump());
    }
    dst = it->get<std::uint64_t>();
  };
  for (auto it = v.begin(); it != v.end(); ++it) {
    static constexpr const char* known[] = {"id",   "host", "port", "weight", "backup",
                                            "zone", "tags", "meta", "health"};
    bool ok = false;
    for (const char* k : known) ok = ok || it.key() == k;
    if (!ok)
      bad(it.key(), "unknown key (expected id, host, port, weight, backup, zone, tags, meta, health)");
  }
  Peer p;
  get_string("id", p.id);
  if (v.find("host") == v.end()) bad("host", "is required");
  get_string("host", p.host);
  std::uint64_t port = 0, weight = 1;
  get_uint("port", 1, 65535, port, true);
  get_uint("weight", 1, max_weight, weight, false);
  p.port = static_cast<std::uint16_t>(port);
  p.weight = static_cast<std::uint32_t>(weight);
  if (auto it = v.find("backup"); it != v.end()) {
    if (it->is_boolean())
      p.backup = it->get<bool>();
    else
      bad("backup", std::string("expected true or false, got ") + it->dump());
  }
  get_string("zone", p.zone);
  if (auto it = v.find("tags"); it != v.end()) {
    if (!it->is_array()) {
      bad("tags", std::string("expected an array of strings, got ") + json_type_name(*it));
    } else {
      for (std::size_t i = 0; i < it->size(); ++i) {
        if (!(*it)[i].is_string())
          bad("tags[" + std::to_string(i) + "]", std::string("expected a string, got ") + json_type_name((*it)[i]));
        else
          p.tags.push_back((*it)[i].get<std::string>());
      }
    }
  }
  if (auto it = v.find("meta"); it != v.end()) {
    if (!it->is_object()) {
      bad("meta", std::string("expected an object of strings, got ") + json_type_name(*it));
    } else {
      for (auto m = it->begin(); m != it->end(); ++m) {
        if (!m->is_string())
          bad("meta." + m.key(), std::string("expected a string, got ") + json_type_name(*m));
        else
          p.meta[m.key()] = m->get<std::string>();
      }
    }
  }
  if (auto it = v.find("health"); it != v.end()) {
    if (!it->is_string()) {
      bad("health", std::string("expected a string, got ") + json_type_name(*it));
    } else if (auto h = parse_health(it->get_ref<const std::string&>()); !h) {
      bad("health", h.error().message());
    } else {
      p.health = h.value();
    }
  }
  if (errors.size() != before) return false;
  out = std::move(p);
  return true;
}

inline Error joined_error(Errc code, const std::vector<std::string>& errors) {
  std::string msg;
  std::size_t shown = std::min<std::size_t>(errors.size(), DYNUP_MAX_REPORTED_ERRORS);
  for (std::size_t i = 0; i < shown; ++i) msg += (i ? "; " : "") + errors[i];
  if (errors.size() > shown) msg += "; and " + std::to_string(errors.size() - shown) + " more";
  return Error(code, msg);
}

} // namespace detail

/// Reads peers from a parsed document: an object with "peers" (and optionally "index",
/// "version") or a bare array. Every error names its JSON path. Allocates.
inline Result<PeerSet> peer_set_from_json(const nlohmann::json& doc) {
  std::vector<std::string> errors;
  const nlohmann::json* list = &doc;
  std::uint64_t index = 0;
  if (doc.is_object()) {
    for (auto it = doc.begin(); it != doc.end(); ++it)
      if (it.key() != "peers" && it.key() != "index" && it.key() != "version")
        errors.push_back(it.key() + ": unknown key (expected peers, index, version)");
    for (const char* key : {"index", "version"}) {
      auto i = doc.find(key);
      if (i == doc.end()) continue;
      if (!i->is_number_unsigned())
        errors.push_back(std::string(key) + ": expected a non-negative integer, got " + i->dump());
      else if (key[0] == 'i')
        index = i->get<std::uint64_t>();
    }
    auto p = doc.find("peers");
    if (p == doc.end()) {
      errors.push_back("peers: is required");
      return detail::joined_error(Errc::parse_error, errors);
    }
    list = &*p;
  }
  if (!list->is_array())
    return Error(Errc::parse_error, std::string(doc.is_object() ? "peers: " : "") +
                                        "expected an array of peers, got " + list->type_name());
  std::vector<Peer> peers(list->size());
  for (std::size_t i = 0; i < list->size(); ++i)
    detail::peer_from_json((*list)[i], "peers[" + std::to_string(i) + "]", peers[i], errors);
  if (!errors.empty()) return detail::joined_error(Errc::parse_error, errors);
  return PeerSet::make(std::move(peers), index);
}

/// Parses JSON text in the peer format. A syntax error reports the byte offset.
inline Result<PeerSet> parse_peer_set(std::string_view text) {
  nlohmann::json doc;
  try {
    doc = nlohmann::json::parse(text.begin(), text.end());
  } catch (const nlohmann::json::exception& e) { // parse_error, or out_of_range for 1e999
    if (text.find_first_not_of(" \t\r\n") == std::string_view::npos)
      return Error(Errc::parse_error, "document is empty");
    std::string what = e.what(); // "[json.exception.parse_error.101] parse error at …"
    auto bracket = what.find("] ");
    return Error(Errc::parse_error,
                 "invalid JSON: " + (bracket == std::string::npos ? what : what.substr(bracket + 2)));
  }
  return peer_set_from_json(doc);
}

DYNUP_NAMESPACE_END
