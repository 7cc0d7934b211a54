// The etcd v3 source: request builders and decoders for etcd's JSON gateway (etcd 3.4+,
// POST /v3/kv/range and the streaming POST /v3/watch). No I/O of its own; EtcdDriver
// (watch/etcd_watch.hpp) runs the loop. docs/WATCHERS.md has the operator's view.
//
//   etcd://host:port/upstreams/api/                     layout=keys (the default)
//   etcd://host:port/upstreams/api.json?layout=document
//
// layout=keys: every key under the prefix (the URL path; it must end in '/', so that
//   /upstreams/api/ never picks up /upstreams/api-v2/…) holds one peer in dynup's peer
//   format (docs/FORMAT.md): an object, a JSON string "host:port", or the bare text
//   host:port (what `etcdctl put KEY 10.0.0.1:8080` stores). The peer's id is its "id"
//   field if it has one, else the key's name after the prefix (/upstreams/api/web-1 →
//   "web-1"; name keys "10.0.0.1:8080" to get dynup's usual host:port ids; a name that
//   is not UTF-8 needs an "id"). Key names are unique, so the ids are, and a value edit
//   (new weight, new address) keeps the peer's id and with it its health and balancer
//   state. A key whose value is not a valid peer, or whose explicit id another key
//   already uses, is left out with the reason; the other keys are published.
// layout=document: the path names one key exactly; its value is a whole peer-set
//   document ({"peers":[…]} or a bare array). An invalid document is an error and keeps
//   the last good set; an absent key is an empty set (which the guards refuse by default).
//
// Wire format (api/etcdserverpb/rpc.proto through grpc-gateway): keys and values are
// base64, int64 fields are JSON strings, proto3 defaults are omitted (a PUT event has no
// "type", an empty value has no "value", a compaction notice has no header.revision),
// and the watch answer is a stream of {"result":WatchResponse} objects, one per line,
// ending with {"error":{…}} when the server shuts the stream down.
#pragma once

#include <dynup/detail/base64.hpp>
#include <dynup/detail/json_stream.hpp>
#include <dynup/peer.hpp>
#include <dynup/peer_json.hpp>
#include <dynup/peer_set.hpp>
#include <dynup/result.hpp>
#include <dynup/source/spec.hpp>
#include <dynup/version.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <charconv>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#ifndef DYNUP_ETCD_MAX_MESSAGE_BYTES
// Largest single watch response accepted from the stream; a bigger one (or garbage that
// never closes its brace) breaks the stream, which is then reopened.
#define DYNUP_ETCD_MAX_MESSAGE_BYTES (64u * 1024u * 1024u)
#endif

#ifndef DYNUP_ETCD_MAX_ERROR_BODY
// Bytes of an etcd error body quoted in an error message; the rest is cut.
#define DYNUP_ETCD_MAX_ERROR_BODY 512
#endif

DYNUP_NAMESPACE_BEGIN

/// How peers are laid out under the watched key (see the top of this header).
enum class EtcdLayout { keys, document };

/// A request for the gateway: always POST with a JSON body.
struct EtcdRequest {
  std::string target; ///< "/v3/kv/range" or "/v3/watch"
  std::string body;   ///< JSON
};

/// One key-value pair, decoded from base64.
struct EtcdKv {
  std::string key;
  std::string value;
  std::int64_t mod_revision = 0;
};

/// A range reply: the kvs and the store revision they were read at.
struct EtcdRange {
  std::int64_t revision = 0;
  std::vector<EtcdKv> kvs;
};

struct EtcdEvent {
  enum class Type { put, del };
  Type type = Type::put;
  EtcdKv kv; ///< for a delete: the key and the delete's revision, no value
};

/// One message of a watch stream.
struct EtcdWatchResponse {
  std::int64_t revision = 0; ///< header.revision; 0 when absent
  bool created = false;
  bool canceled = false;
  std::int64_t compact_revision = 0; ///< > 0: the start revision was compacted away
  std::string cancel_reason;
  std::vector<EtcdEvent> events;

  /// A progress notification: every change up to `revision` has been sent.
  bool is_progress() const noexcept {
    return !created && !canceled && compact_revision == 0 && events.empty() && revision > 0;
  }
};

/// The watcher's local copy of the watched keys, as peers. A plain value; the source's
/// load/apply/peers keep it.
struct EtcdState {
  std::int64_t revision = 0;                       ///< every change up to here is applied
  std::map<std::string, std::vector<Peer>> by_key; ///< valid keys only, peers canonical
  std::optional<Error> document_error;             ///< layout=document: why it is invalid
};

/// What a state publishes: the set (source index = state revision) and what was left out.
struct EtcdPeers {
  PeerSet set;
  std::vector<std::string> skipped;
};

namespace detail {

/// The smallest key after every key starting with `prefix` (clientv3.GetPrefixRangeEnd):
/// the prefix with its last byte below 0xff incremented and what follows dropped; "\0"
/// (to the end of the keyspace) when every byte is 0xff.
inline std::string etcd_prefix_end(std::string prefix) {
  while (!prefix.empty()) {
    auto& last = reinterpret_cast<unsigned char&>(prefix.back());
    if (last < 0xff) {
      ++last;
      return prefix;
    }
    prefix.pop_back();
  }
  return std::string(1, '\0');
}

/// An int64 as the gateway writes it (a decimal string), or a JSON integer.
inline bool etcd_int64(const nlohmann::json& v, std::int64_t& out) {
  if (v.is_number_integer()) {
    if (v.is_number_unsigned() && v.get<std::uint64_t>() > static_cast<std::uint64_t>(INT64_MAX)) return false;
    out = v.get<std::int64_t>();
    return true;
  }
  if (!v.is_string()) return false;
  const auto& s = v.get_ref<const std::string&>();
  const char* first = s.data();
  const char* last = s.data() + s.size();
  auto [end, ec] = std::from_chars(first, last, out);
  return ec == std::errc() && end == last && !s.empty();
}

/// A key as it appears in messages: JSON-quoted (control bytes escaped), cut at 200 bytes.
inline std::string quoted_key(std::string_view key) {
  std::string shown(key.substr(0, 200));
  std::string q = nlohmann::json(shown).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  if (key.size() > 200) q += "…";
  return q;
}

/// The message of an etcd error body ({"error":"…","message":"…","code":N}, or plain
/// text), cut to DYNUP_ETCD_MAX_ERROR_BODY bytes.
inline std::string etcd_error_text(std::string_view body) {
  auto doc = nlohmann::json::parse(body.begin(), body.end(), nullptr, false);
  std::string text;
  if (doc.is_object()) {
    const nlohmann::json* e = &doc;
    if (auto it = doc.find("error"); it != doc.end() && it->is_object()) e = &*it; // stream form
    for (const char* key : {"message", "error"})
      if (auto it = e->find(key); it != e->end() && it->is_string()) {
        text = it->get<std::string>();
        break;
      }
    for (const char* key : {"code", "grpc_code"})
      if (auto it = e->find(key); it != e->end() && it->is_number_integer()) {
        text += " (gRPC code " + std::to_string(it->get<std::int64_t>()) + ")";
        break;
      }
  }
  if (text.empty()) text = std::string(body);
  while (!text.empty() && (text.back() == '\n' || text.back() == '\r' || text.back() == ' ')) text.pop_back();
  if (text.size() > DYNUP_ETCD_MAX_ERROR_BODY) text = text.substr(0, DYNUP_ETCD_MAX_ERROR_BODY) + "…";
  return text.empty() ? "(empty body)" : text;
}

inline bool etcd_kv(const nlohmann::json& v, EtcdKv& kv, std::string& why) {
  if (!v.is_object()) return why = "kv is not an object", false;
  auto key = v.find("key");
  if (key == v.end() || !key->is_string() || !base64_decode(key->get_ref<const std::string&>(), kv.key))
    return why = "kv.key is missing or not base64", false;
  if (auto value = v.find("value"); value != v.end()) {
    if (!value->is_string() || !base64_decode(value->get_ref<const std::string&>(), kv.value))
      return why = "kv.value of key " + quoted_key(kv.key) + " is not base64", false;
  }
  if (auto rev = v.find("mod_revision"); rev != v.end() && !etcd_int64(*rev, kv.mod_revision))
    return why = "kv.mod_revision of key " + quoted_key(kv.key) + " is not an int64", false;
  return true;
}

} // namespace detail

/// Decodes one object of a watch stream: {"result":WatchResponse}, a bare WatchResponse,
/// or {"error":…} (the server ended the stream: an Errc::unavailable error). Malformed
/// fields are Errc::parse_error. Never throws (except std::bad_alloc).
inline Result<EtcdWatchResponse> decode_etcd_watch_message(std::string_view text) {
  auto bad = [](const std::string& why) { return Error(Errc::parse_error, "etcd watch message: " + why); };
  auto doc = nlohmann::json::parse(text.begin(), text.end(), nullptr, false);
  if (doc.is_discarded() || !doc.is_object()) return bad("not a JSON object");
  if (doc.contains("error"))
    return Error(Errc::unavailable, "etcd ended the watch stream: " + detail::etcd_error_text(text));
  const nlohmann::json* r = &doc;
  if (auto it = doc.find("result"); it != doc.end()) {
    if (!it->is_object()) return bad("\"result\" is not an object");
    r = &*it;
  }
  EtcdWatchResponse out;
  if (auto h = r->find("header"); h != r->end()) {
    if (!h->is_object()) return bad("header is not an object");
    if (auto rev = h->find("revision"); rev != h->end() && !detail::etcd_int64(*rev, out.revision))
      return bad("header.revision is not an int64");
  }
  for (auto [key, dst] : {std::pair<const char*, bool*>{"created", &out.created}, {"canceled", &out.canceled}}) {
    auto it = r->find(key);
    if (it == r->end()) continue;
    if (!it->is_boolean()) return bad(std::string(key) + " is not a boolean");
    *dst = it->get<bool>();
  }
  if (auto it = r->find("compact_revision"); it != r->end() && !detail::etcd_int64(*it, out.compact_revision))
    return bad("compact_revision is not an int64");
  if (auto it = r->find("cancel_reason"); it != r->end() && it->is_string()) out.cancel_reason = it->get<std::string>();
  if (auto events = r->find("events"); events != r->end()) {
    if (!events->is_array()) return bad("events is not an array");
    for (const auto& e : *events) {
      if (!e.is_object()) return bad("an event is not an object");
      EtcdEvent ev;
      if (auto type = e.find("type"); type != e.end()) {
        if (*type == "PUT" || *type == 0)
          ev.type = EtcdEvent::Type::put;
        else if (*type == "DELETE" || *type == 1)
          ev.type = EtcdEvent::Type::del;
        else
          return bad("unknown event type " + type->dump());
      }
      auto kv = e.find("kv");
      std::string why;
      if (kv == e.end()) return bad("an event has no kv");
      if (!detail::etcd_kv(*kv, ev.kv, why)) return bad(why);
      out.events.push_back(std::move(ev));
    }
  }
  return out;
}

/// A watch stream being read: bytes in, whole responses out, whatever the chunking.
/// After an error it stays failed; open a new stream. Not thread-safe.
class EtcdWatchStream {
public:
  explicit EtcdWatchStream(std::size_t max_message_bytes = DYNUP_ETCD_MAX_MESSAGE_BYTES)
      : splitter_(max_message_bytes) {}

  void feed(std::string_view bytes) { splitter_.feed(bytes); }

  /// The next response, nullopt when more bytes are needed, or the error that broke
  /// the stream (garbage, an oversized message, a malformed field, a server error).
  std::optional<Result<EtcdWatchResponse>> next() {
    if (failed_) return Result<EtcdWatchResponse>(*failed_);
    auto object = splitter_.next();
    if (!object) return std::nullopt;
    if (!*object) {
      failed_ = object->error();
      return Result<EtcdWatchResponse>(*failed_);
    }
    auto decoded = decode_etcd_watch_message(**object);
    if (!decoded) failed_ = decoded.error();
    return decoded;
  }

private:
  detail::JsonObjectSplitter splitter_;
  std::optional<Error> failed_;
};

/// One etcd source: where to connect, what to watch, and how to read it. Immutable;
/// safe to share between threads. Every method allocates; none throws (except
/// std::bad_alloc) or does I/O.
class EtcdSource {
public:
  /// From a parsed spec. Options: layout=keys|document. Errors name the spec and what
  /// is wrong with it.
  static Result<EtcdSource> from_spec(const SourceSpec& spec) {
    std::string text = "etcd://" + host_port(spec.host, spec.port) + spec.path;
    auto bad = [&](const std::string& why) {
      return Error(Errc::invalid_argument, "source \"" + text + "\": " + why);
    };
    if (spec.scheme != "etcd") return bad("not an etcd:// spec");
    EtcdLayout layout = EtcdLayout::keys;
    for (const auto& [k, v] : spec.query) {
      if (k != "layout") return bad("unknown option \"" + k + "\" (etcd takes: layout=keys|document)");
      if (v == "keys")
        layout = EtcdLayout::keys;
      else if (v == "document")
        layout = EtcdLayout::document;
      else
        return bad("layout=\"" + v + "\" is not keys or document");
    }
    auto made = make(spec.host, spec.port, spec.path, layout);
    if (!made) return bad(made.error().message());
    return made;
  }

  /// From spec text, e.g. "etcd://127.0.0.1:2379/upstreams/api/".
  static Result<EtcdSource> from_spec(std::string_view text) {
    auto spec = parse_source_spec(text);
    if (!spec) return spec.error();
    return from_spec(*spec);
  }

  /// From parts. `key` is the prefix (layout=keys: non-empty, ending in '/') or the
  /// document's key (non-empty).
  static Result<EtcdSource> make(std::string host, std::uint16_t port, std::string key, EtcdLayout layout) {
    if (host.empty() || port == 0) return Error(Errc::invalid_argument, "etcd host and port are required");
    if (key.empty()) return Error(Errc::invalid_argument, "the etcd key is empty");
    if (layout == EtcdLayout::keys && key.back() != '/')
      return Error(Errc::invalid_argument,
                   "the prefix " + detail::quoted_key(key) +
                       " does not end in '/' (a prefix without it also matches its longer siblings; "
                       "add the '/', or use layout=document to watch one key)");
    EtcdSource s;
    s.host_ = std::move(host);
    s.port_ = port;
    s.key_ = std::move(key);
    s.layout_ = layout;
    if (layout == EtcdLayout::keys) s.range_end_ = detail::etcd_prefix_end(s.key_);
    return s;
  }

  const std::string& host() const noexcept { return host_; }
  std::uint16_t port() const noexcept { return port_; }
  EtcdLayout layout() const noexcept { return layout_; }
  /// The prefix (layout=keys) or the document's key.
  const std::string& key() const noexcept { return key_; }
  /// The end of the prefix range; empty for layout=document.
  const std::string& range_end() const noexcept { return range_end_; }

  /// The spec, for logs and status (etcd specs carry no secrets).
  std::string describe() const {
    std::string out = "etcd://" + host_port(host_, port_);
    // Printable keys stay readable; what the spec parser would misread is escaped.
    out += detail::percent_encode(key_, [](unsigned char c) { return c > 0x20 && c < 0x7f && c != '%' && c != '?' && c != '#'; });
    if (layout_ == EtcdLayout::document) out += "?layout=document";
    return out;
  }

  /// Reads every watched key at the current revision (linearizable).
  EtcdRequest range_request() const { return {"/v3/kv/range", key_json().dump()}; }

  /// Opens a watch on the watched keys from `start_revision` (the range's revision + 1),
  /// asking for progress notifications so a quiet watch still hears from the server.
  EtcdRequest watch_request(std::int64_t start_revision) const {
    nlohmann::json create = key_json();
    create["start_revision"] = std::to_string(start_revision);
    create["progress_notify"] = true;
    return {"/v3/watch", nlohmann::json{{"create_request", create}}.dump()};
  }

  /// A watch of the keys in [key, range_end) from `start_revision`, with progress
  /// notifications: what one stream shared by many sources of one etcd asks for. An
  /// empty key means the whole keyspace.
  static EtcdRequest watch_range_request(const std::string& key, const std::string& range_end,
                                         std::int64_t start_revision) {
    nlohmann::json create{{"key", detail::base64_encode(key.empty() ? std::string(1, '\0') : key)},
                          {"range_end", detail::base64_encode(key.empty() ? std::string(1, '\0') : range_end)}};
    create["start_revision"] = std::to_string(start_revision);
    create["progress_notify"] = true;
    return {"/v3/watch", nlohmann::json{{"create_request", create}}.dump()};
  }

  /// Decodes a range reply. An HTTP error is Errc::unavailable (unsupported for a 404:
  /// no /v3 gateway there) with etcd's message; a malformed body is Errc::parse_error.
  static Result<EtcdRange> decode_range(int status, std::string_view body) {
    if (status != 200) {
      std::string msg = "etcd answered HTTP " + std::to_string(status) + " to /v3/kv/range: " +
                        detail::etcd_error_text(body);
      if (status == 404)
        return Error(Errc::unsupported, msg + " (is this etcd 3.4 or later with its JSON gateway at /v3/?)");
      return Error(Errc::unavailable, msg);
    }
    auto bad = [](const std::string& why) { return Error(Errc::parse_error, "etcd range reply: " + why); };
    auto doc = nlohmann::json::parse(body.begin(), body.end(), nullptr, false);
    if (doc.is_discarded() || !doc.is_object()) return bad("not a JSON object");
    EtcdRange out;
    auto header = doc.find("header");
    if (header == doc.end() || !header->is_object()) return bad("no header");
    auto rev = header->find("revision");
    if (rev == header->end() || !detail::etcd_int64(*rev, out.revision) || out.revision <= 0)
      return bad("header.revision is missing or not a positive int64");
    if (auto more = doc.find("more"); more != doc.end() && *more == true)
      return bad("\"more\": the reply is truncated");
    if (auto kvs = doc.find("kvs"); kvs != doc.end()) {
      if (!kvs->is_array()) return bad("kvs is not an array");
      out.kvs.reserve(kvs->size());
      for (const auto& v : *kvs) {
        EtcdKv kv;
        std::string why;
        if (!detail::etcd_kv(v, kv, why)) return bad(why);
        out.kvs.push_back(std::move(kv));
      }
    }
    return out;
  }

  /// Replaces `state` with a range's contents. Returns why keys were left out.
  std::vector<std::string> load(EtcdState& state, const EtcdRange& range) const {
    state = EtcdState{};
    state.revision = range.revision;
    std::vector<std::string> skipped;
    for (const EtcdKv& kv : range.kvs) put(state, kv, skipped);
    return skipped;
  }

  /// Applies one watch response to `state`: its events in order (a key outside the
  /// watched range is ignored), or a progress notification's revision. Returns why
  /// keys were left out. A key whose new value is invalid leaves the state, as a fresh
  /// range would leave it out.
  std::vector<std::string> apply(EtcdState& state, const EtcdWatchResponse& response) const {
    std::vector<std::string> skipped;
    for (const EtcdEvent& ev : response.events) {
      if (ev.kv.mod_revision > state.revision) state.revision = ev.kv.mod_revision;
      if (ev.type == EtcdEvent::Type::put) {
        put(state, ev.kv, skipped);
      } else if (watches(ev.kv.key)) {
        state.by_key.erase(ev.kv.key);
        if (layout_ == EtcdLayout::document) state.document_error.reset();
      }
    }
    if (response.is_progress() && response.revision > state.revision) state.revision = response.revision;
    return skipped;
  }

  /// The peer set `state` describes, with source index = its revision. A peer whose
  /// explicit id another key (earlier in key order) already uses is left out, with the
  /// reason. An invalid document (layout=document) is the error.
  Result<EtcdPeers> peers(const EtcdState& state) const {
    if (state.document_error) return *state.document_error;
    EtcdPeers out;
    std::vector<Peer> all;
    std::map<std::string, const std::string*> owner; // id → key
    for (const auto& [key, peers] : state.by_key) {
      for (const Peer& p : peers) {
        auto [it, fresh] = owner.emplace(p.id, &key);
        if (!fresh) {
          out.skipped.push_back("key " + detail::quoted_key(key) + ": id " + detail::quoted_key(p.id) +
                                " is already used by key " + detail::quoted_key(*it->second) + "; left out");
          continue;
        }
        all.push_back(p);
      }
    }
    auto set = PeerSet::make(std::move(all), static_cast<std::uint64_t>(state.revision));
    if (!set) return set.error().with_context(describe());
    out.set = std::move(set).value();
    return out;
  }

  /// One key's value as a peer (layout=keys): its id is the value's "id", else the key
  /// name after the prefix. Errors name the key.
  Result<Peer> peer_of(const std::string& key, std::string_view value) const {
    std::string where = "key " + detail::quoted_key(key);
    auto bad = [&](const std::string& why) { return Error(Errc::invalid_peer, where + ": " + why); };
    std::string_view trimmed = value;
    while (!trimmed.empty() && std::string_view(" \t\r\n").find(trimmed.front()) != std::string_view::npos)
      trimmed.remove_prefix(1);
    while (!trimmed.empty() && std::string_view(" \t\r\n").find(trimmed.back()) != std::string_view::npos)
      trimmed.remove_suffix(1);
    if (trimmed.empty()) return bad("the value is empty (expected a peer: {\"host\":…,\"port\":…} or host:port)");
    Peer p;
    std::vector<std::string> errors;
    // '[' is not JSON here: a peer is an object or a string, and "[::1]:80" is host:port.
    if (trimmed.front() == '{' || trimmed.front() == '"') {
      auto v = nlohmann::json::parse(trimmed.begin(), trimmed.end(), nullptr, false);
      if (v.is_discarded()) return bad("the value is not valid JSON");
      if (!detail::peer_from_json(v, where, p, errors)) return detail::joined_error(Errc::invalid_peer, errors);
    } else {
      auto parsed = parse_host_port(trimmed);
      if (!parsed) return bad(parsed.error().message());
      p = std::move(parsed).value();
    }
    auto host = canonical_host(p.host);
    if (!host) return bad(host.error().message());
    p.host = std::move(host).value();
    if (p.id.empty()) p.id = key.size() > key_.size() ? key.substr(key_.size()) : host_port(p.host, p.port);
    if (const char* why = detail::bad_id(p.id)) return bad(std::string("peer ") + why + " (set \"id\" in the value)");
    std::sort(p.tags.begin(), p.tags.end());
    p.tags.erase(std::unique(p.tags.begin(), p.tags.end()), p.tags.end());
    return p;
  }

  /// Whether `key` is one this source reads (under the prefix, or the document's key).
  bool covers(const std::string& key) const { return watches(key); }

private:
  EtcdSource() = default;

  nlohmann::json key_json() const {
    nlohmann::json j{{"key", detail::base64_encode(key_)}};
    if (layout_ == EtcdLayout::keys) j["range_end"] = detail::base64_encode(range_end_);
    return j;
  }

  bool watches(const std::string& key) const {
    if (layout_ == EtcdLayout::document) return key == key_;
    return key.compare(0, key_.size(), key_) == 0;
  }

  void put(EtcdState& state, const EtcdKv& kv, std::vector<std::string>& skipped) const {
    if (!watches(kv.key)) return;
    if (layout_ == EtcdLayout::document) {
      state.by_key.erase(kv.key);
      state.document_error.reset();
      auto set = parse_peer_set(kv.value);
      if (!set) {
        state.document_error = set.error().with_context(describe() + ": key " + detail::quoted_key(kv.key));
        return;
      }
      state.by_key[kv.key] = set->peers();
      return;
    }
    auto peer = peer_of(kv.key, kv.value);
    if (!peer) {
      state.by_key.erase(kv.key);
      skipped.push_back(peer.error().message() + "; left out");
      return;
    }
    state.by_key[kv.key] = {std::move(peer).value()};
  }

  std::string host_;
  std::uint16_t port_ = 0;
  std::string key_;
  std::string range_end_;
  EtcdLayout layout_ = EtcdLayout::keys;
};

DYNUP_NAMESPACE_END
