// The Consul source: builds blocking-query requests and decodes Consul's replies into
// peers. No I/O of its own; ConsulDriver (watch/consul_watch.hpp) runs the loop.
//
//   consul://host:port/health/<service>?tag=v2&dc=dc1&passing=0&stale=1&token_env=CONSUL_TOKEN
//   consul://host:port/catalog/<service>
//   consul://host:port/kv/<prefix>                 (nginx-upsync layout)
//
// Spec options (anything else is an error that lists the valid keys):
//   passing=1|0   health: 1 (default; bare "passing" too) asks Consul for instances whose
//                 checks all pass; 0 asks for every instance and marks health from Checks
//   tag=…         health, catalog: repeatable; an instance must carry every tag
//   filter=…      health, catalog: a Consul filter expression
//   near=…        health, catalog: sort by round-trip time from a node ("_agent")
//   zone_meta=…   health, catalog: the meta key whose value becomes Peer::zone ("zone")
//   dc=…          every mode
//   stale=1 | consistent=1   every mode, never both (api-docs/features/consistency.mdx)
//   token=… | token_env=NAME the ACL token, or the environment variable holding it (read
//                 once, by from_spec); sent only as the X-Consul-Token header
//
// How replies become peers:
//   id      "<Node>/<Service ID>": Consul makes a service ID unique per node only, and the
//           same id in health and catalog mode lets a switch keep per-peer state. KV peers
//           keep the default id, "host:port".
//   host    Service.Address, or Node.Address when it is empty (catalog: ServiceAddress,
//           else Address).
//   weight  Weights.Passing, or Weights.Warning for a warning instance; 1 when absent;
//           clamped to max_weight. A weight of 0 is Consul's "send no traffic": the peer is
//           published with Health::critical (so policies skip it) and weight
//           Weights.Passing (1 if that is 0 too).
//   health  health mode, from Checks: any critical check, or a maintenance check
//           (_node_maintenance, _service_maintenance:<id>), makes it critical; otherwise
//           any warning makes it warning; a status Consul does not document makes it
//           unknown. Catalog mode has no checks: Health::unknown, which policies route to
//           like passing, but which says the registry did not vouch for the peer.
//   zone    Service.Meta[zone_meta], else Node.Meta[zone_meta], else empty.
//   tags, meta   Service.Tags and Service.Meta (catalog: ServiceTags, ServiceMeta).
//   KV      one key per peer, <prefix>/<host>:<port>, value JSON (empty, missing or null
//           for defaults): {"weight":1,"max_fails":2,"fail_timeout":10,"down":0,"backup":0}.
//           down → Health::critical, backup → Peer::backup; Peer has no max_fails or
//           fail_timeout, so they are carried as meta["max_fails"], meta["fail_timeout"]
//           (decimal strings, present only when the value sets them).
// An entry that cannot become a valid peer is left out with the reason in
// Decoded::skipped; the rest is published.
#pragma once

#include <dynup/detail/base64.hpp>
#include <dynup/peer.hpp>
#include <dynup/peer_set.hpp>
#include <dynup/result.hpp>
#include <dynup/source/spec.hpp>
#include <dynup/version.hpp>
#include <dynup/runtime/http_message.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#ifndef DYNUP_CONSUL_MAX_ERROR_BODY
// Bytes of a Consul error body quoted in an error message; the rest is cut.
#define DYNUP_CONSUL_MAX_ERROR_BODY 512
#endif

DYNUP_NAMESPACE_BEGIN

/// A decoded reply: the peers it lists and the index it carries (0 when it had none).
struct Decoded {
  PeerSet set;
  std::uint64_t index = 0;
  /// Entries left out with the reason (an invalid KV value, say); the rest is published.
  std::vector<std::string> skipped;
};

namespace detail {

/// Percent-encodes everything but RFC 3986 unreserved characters (and '/' if asked).
inline std::string url_escape(std::string_view s, bool keep_slash = false) {
  return percent_encode(s, [keep_slash](unsigned char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '.' ||
           c == '_' || c == '~' || (keep_slash && c == '/');
  });
}

/// X-Consul-Index as a number: 0 when the header is missing or not a plain uint64.
inline std::uint64_t consul_index(const HttpResponse& r) noexcept {
  const std::string* h = r.header("X-Consul-Index");
  if (h == nullptr) return 0;
  std::string_view v = *h;
  while (!v.empty() && (v.front() == ' ' || v.front() == '\t')) v.remove_prefix(1);
  while (!v.empty() && (v.back() == ' ' || v.back() == '\t')) v.remove_suffix(1);
  std::uint64_t n = 0;
  auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), n);
  if (v.empty() || ec != std::errc() || end != v.data() + v.size()) return 0;
  return n;
}

// Registry input is read tolerantly (DESIGN rule 11): a missing field, a null and a value
// of the wrong type all read as "absent".
inline const nlohmann::json* member(const nlohmann::json& obj, const char* key) {
  if (!obj.is_object()) return nullptr;
  auto it = obj.find(key);
  return it == obj.end() || it->is_null() ? nullptr : &*it;
}
inline std::string string_member(const nlohmann::json& obj, const char* key) {
  const nlohmann::json* v = member(obj, key);
  return v != nullptr && v->is_string() ? v->get<std::string>() : std::string();
}
inline bool uint_member(const nlohmann::json& obj, const char* key, std::uint64_t& out) {
  const nlohmann::json* v = member(obj, key);
  if (v == nullptr || !v->is_number_unsigned()) return false;
  out = v->get<std::uint64_t>();
  return true;
}
inline std::vector<std::string> strings_member(const nlohmann::json& obj, const char* key) {
  std::vector<std::string> out;
  if (const nlohmann::json* v = member(obj, key); v != nullptr && v->is_array())
    for (const auto& s : *v)
      if (s.is_string()) out.push_back(s.get<std::string>());
  return out;
}
inline std::map<std::string, std::string> meta_member(const nlohmann::json& obj, const char* key) {
  std::map<std::string, std::string> out;
  if (const nlohmann::json* v = member(obj, key); v != nullptr && v->is_object())
    for (auto it = v->begin(); it != v->end(); ++it)
      if (it->is_string()) out[it.key()] = it->get<std::string>();
  return out;
}

/// Weights.Passing / Weights.Warning; 1 each when absent (older Consul has no Weights).
struct ConsulWeights {
  std::uint64_t passing = 1;
  std::uint64_t warning = 1;
};
inline ConsulWeights weights_member(const nlohmann::json& obj, const char* key) {
  ConsulWeights w;
  if (const nlohmann::json* v = member(obj, key); v != nullptr) {
    uint_member(*v, "Passing", w.passing);
    uint_member(*v, "Warning", w.warning);
  }
  return w;
}

/// Applies a Consul weight to `p`, 0 meaning "no traffic" (see the header comment).
inline void apply_consul_weight(Peer& p, std::uint64_t weight, std::uint64_t passing) {
  if (weight == 0) {
    p.health = Health::critical;
    weight = passing == 0 ? 1 : passing;
  }
  p.weight = static_cast<std::uint32_t>(std::min<std::uint64_t>(weight, max_weight));
}

/// Health from a health-endpoint Checks array (DESIGN rule 10). Maintenance mode shows as
/// a critical check with a reserved id (api-docs/agent/index.mdx, agent/service.mdx); the
/// id is checked too, so a maintenance check is never taken for anything else.
inline Health consul_checks_health(const nlohmann::json& entry) {
  Health h = Health::passing;
  const nlohmann::json* checks = member(entry, "Checks");
  if (checks == nullptr || !checks->is_array()) return h;
  for (const auto& c : *checks) {
    std::string id = string_member(c, "CheckID");
    std::string status = string_member(c, "Status");
    if (status == "critical" || id == "_node_maintenance" || id.rfind("_service_maintenance:", 0) == 0)
      return Health::critical;
    if (status == "warning")
      h = Health::warning;
    else if (status != "passing" && h == Health::passing)
      h = Health::unknown;
  }
  return h;
}

/// A body quoted in an error message: one line, at most DYNUP_CONSUL_MAX_ERROR_BODY
/// bytes, with `secret` (the token) cut out should a proxy have echoed it.
inline std::string quote_body(std::string_view body, const std::string& secret) {
  auto space = [](char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n'; };
  while (!body.empty() && space(body.front())) body.remove_prefix(1);
  while (!body.empty() && space(body.back())) body.remove_suffix(1);
  if (body.empty()) return "(empty body)";
  // Read a token's length past the limit, so a token the limit would cut is still found.
  std::string s(body.substr(0, DYNUP_CONSUL_MAX_ERROR_BODY + secret.size()));
  if (!secret.empty()) {
    for (auto at = s.find(secret); at != std::string::npos; at = s.find(secret, at)) {
      s.replace(at, secret.size(), "<redacted>");
      at += 10;
    }
  }
  for (char& c : s)
    if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) c = ' ';
  if (s.size() > DYNUP_CONSUL_MAX_ERROR_BODY || body.size() > DYNUP_CONSUL_MAX_ERROR_BODY) {
    std::size_t cut = std::min<std::size_t>(s.size(), DYNUP_CONSUL_MAX_ERROR_BODY);
    while (cut > 0 && (static_cast<unsigned char>(s[cut]) & 0xC0) == 0x80) --cut; // keep UTF-8 whole
    s.resize(cut);
    s += "… (" + std::to_string(body.size()) + " bytes)";
  }
  return "\"" + s + "\"";
}

} // namespace detail

/// A Consul source: a request builder and decoder for health, catalog or KV listings.
///
/// Immutable after from_spec(), so one
/// object may be used from any number of threads. request() and decode() do no I/O;
/// decode() never throws on bad input (garbage is an Errc::parse_error) and is O(n) in
/// the reply plus O(p log p) to sort its p peers. The token appears only in the
/// X-Consul-Token header of request(): never in describe(), a URL or an error message.
class ConsulSource {
public:
  enum class Mode { health, catalog, kv };

  /// Consul holds a blocking query at most this long (api-docs/features/blocking.mdx);
  /// longer waits are cut to it.
  static constexpr std::chrono::milliseconds max_wait{std::chrono::minutes(10)};

  /// Builds a source from a parsed consul:// spec (see the header comment for the keys).
  /// Errors (Errc::invalid_argument) name the spec without its query and never quote the
  /// token; token_env naming an unset or empty variable is an error.
  static Result<ConsulSource> from_spec(const SourceSpec& spec) {
    ConsulSource s;
    s.host_ = spec.host;
    s.port_ = spec.port;
    std::string where = "consul source \"consul://" + host_port(spec.host, spec.port) + spec.path + "\": ";
    auto bad = [&](const std::string& why) { return Error(Errc::invalid_argument, where + why); };
    if (spec.scheme != "consul") return bad("scheme \"" + spec.scheme + "\" is not consul");

    std::string_view path = spec.path;
    while (!path.empty() && path.front() == '/') path.remove_prefix(1);
    auto slash = path.find('/');
    std::string_view mode = path.substr(0, slash);
    std::string_view name = slash == std::string_view::npos ? std::string_view() : path.substr(slash + 1);
    static constexpr const char* usage = "expected /health/<service>, /catalog/<service> or /kv/<prefix>";
    if (mode.empty()) return bad(std::string("no mode: ") + usage);
    if (mode == "health")
      s.mode_ = Mode::health;
    else if (mode == "catalog")
      s.mode_ = Mode::catalog;
    else if (mode == "kv")
      s.mode_ = Mode::kv;
    else
      return bad("unknown mode \"" + std::string(mode) + "\": " + usage);
    if (s.mode_ == Mode::kv) {
      while (!name.empty() && name.front() == '/') name.remove_prefix(1);
      if (name.find_first_not_of('/') == std::string_view::npos)
        return bad("no KV prefix: expected /kv/<prefix>, e.g. /kv/upstreams/api");
    } else {
      if (!name.empty() && name.back() == '/') name.remove_suffix(1);
      if (name.empty()) return bad("no service name: expected /" + std::string(mode) + "/<service>");
      if (name.find('/') != std::string_view::npos)
        return bad("service name \"" + std::string(name) + "\" contains '/'");
    }
    s.name_ = std::string(name);

    std::vector<std::string> valid = {"dc", "stale", "consistent", "token", "token_env"};
    if (s.mode_ != Mode::kv) valid.insert(valid.end(), {"tag", "filter", "near", "zone_meta"});
    if (s.mode_ == Mode::health) valid.insert(valid.begin(), "passing");
    std::set<std::string> seen;
    for (const auto& [k, v] : spec.query) {
      if (std::find(valid.begin(), valid.end(), k) == valid.end()) {
        std::string list;
        for (const auto& key : valid) list += (list.empty() ? "" : ", ") + key;
        return bad("unknown option \"" + k + "\" for " + std::string(mode) + " (valid: " + list + ")");
      }
      if (k != "tag" && !seen.insert(k).second) return bad("option \"" + k + "\" is given twice");
    }
    auto flag = [&](const char* key, bool fallback) -> Result<bool> {
      const std::string* v = spec.value(key);
      if (v == nullptr) return fallback;
      if (v->empty() || *v == "1" || *v == "true") return true; // a bare "?stale" is true, as in Consul
      if (*v == "0" || *v == "false") return false;
      return bad(std::string(key) + "=\"" + *v + "\": expected 1, 0, true or false");
    };
    auto text = [&](const char* key, std::string& dst) -> Result<void> {
      const std::string* v = spec.value(key);
      if (v == nullptr) return {};
      if (v->empty()) return bad(std::string(key) + " is empty");
      dst = *v;
      return {};
    };
    auto passing = flag("passing", true);
    auto stale = flag("stale", false);
    auto consistent = flag("consistent", false);
    for (const auto* r : {&passing, &stale, &consistent})
      if (!*r) return r->error();
    s.passing_only_ = *passing;
    if (*stale && *consistent)
      return bad("stale and consistent exclude each other (api-docs/features/consistency.mdx); choose one");
    s.consistency_ = *stale ? Consistency::stale : *consistent ? Consistency::consistent : Consistency::standard;
    const std::pair<const char*, std::string*> texts[] = {{"dc", &s.dc_},
                                                          {"filter", &s.filter_},
                                                          {"near", &s.near_},
                                                          {"zone_meta", &s.zone_meta_},
                                                          {"token_env", &s.token_env_}};
    for (const auto& [key, dst] : texts)
      if (auto r = text(key, *dst); !r) return r.error();
    for (const auto& tag : spec.values("tag")) {
      if (tag.empty()) return bad("tag is empty");
      s.tags_.push_back(tag);
    }

    const std::string* token = spec.value("token");
    if (token != nullptr && !s.token_env_.empty()) return bad("give token or token_env, not both");
    if (token != nullptr) {
      if (token->empty()) return bad("token is empty");
      s.token_ = *token;
    } else if (!s.token_env_.empty()) {
      const char* env = std::getenv(s.token_env_.c_str());
      if (env == nullptr || *env == '\0')
        return bad("token_env: environment variable " + s.token_env_ + " is not set or empty");
      s.token_ = env;
    }
    for (unsigned char c : s.token_)
      if (c < 0x20 || c == 0x7f) return bad("the token contains a control character");
    return s;
  }

  /// Parses `spec` (parse_source_spec) and builds the source. A parse error quotes the
  /// spec with the token's value replaced by "redacted".
  static Result<ConsulSource> from_spec(std::string_view spec) {
    auto parsed = parse_source_spec(spec);
    if (!parsed) {
      std::string msg = parsed.error().message();
      std::string raw(spec), safe = detail::redact_spec_text(spec);
      for (auto at = msg.find(raw); !raw.empty() && at != std::string::npos; at = msg.find(raw, at + safe.size()))
        msg.replace(at, raw.size(), safe);
      return Error(parsed.error().code(), msg);
    }
    return from_spec(*parsed);
  }

  /// "consul://host:port/<mode>/<name>?<options>" with options in a fixed order and the
  /// token left out (token_env, a variable name, is kept). Allocates.
  std::string describe() const {
    std::string out = "consul://" + host_port(host_, port_) + "/" + mode_name() + "/" +
                      detail::url_escape(name_, mode_ == Mode::kv);
    std::vector<std::string> opts;
    if (mode_ == Mode::health && !passing_only_) opts.push_back("passing=0");
    common_params(opts);
    if (zone_meta_ != "zone") opts.push_back("zone_meta=" + detail::url_escape(zone_meta_));
    if (!token_env_.empty()) opts.push_back("token_env=" + detail::url_escape(token_env_));
    for (std::size_t i = 0; i < opts.size(); ++i) out += (i ? "&" : "?") + opts[i];
    return out;
  }

  /// The GET for `index` (0: a plain read, no index or wait; otherwise index=<index> and
  /// wait=<wait>, capped at max_wait, as "<n>s" or "<n>ms"; no wait when `wait` <= 0, so
  /// Consul's default of 5 minutes applies). Allocates; never fails.
  HttpRequest request(std::uint64_t index, std::chrono::milliseconds wait) const {
    HttpRequest req;
    req.target = endpoint();
    std::vector<std::string> params;
    if (mode_ == Mode::kv) params.push_back("recurse");
    // Bare, never "passing=false": older Consul took the key with any value as true (rule 10).
    if (mode_ == Mode::health && passing_only_) params.push_back("passing");
    common_params(params);
    if (index != 0) {
      params.push_back("index=" + std::to_string(index));
      wait = std::min(wait, max_wait);
      if (wait.count() > 0)
        params.push_back("wait=" + (wait.count() % 1000 == 0 ? std::to_string(wait.count() / 1000) + "s"
                                                            : std::to_string(wait.count()) + "ms"));
    }
    for (std::size_t i = 0; i < params.size(); ++i) req.target += (i ? "&" : "?") + params[i];
    if (!token_.empty()) req.headers.emplace_back("X-Consul-Token", token_);
    return req;
  }

  /// Decodes one reply. The index is X-Consul-Index (0 when missing or unparsable). 200:
  /// the JSON listing; KV 404: an empty set (the prefix has no keys yet, rule 8); other
  /// statuses are errors quoting Consul's plain-text body (rule 13): 403 an ACL denial,
  /// 429 rate limiting, 5xx and the rest Errc::unavailable, 400 Errc::invalid_argument,
  /// 404 Errc::not_found.
  Result<Decoded> decode(const HttpResponse& response) const {
    std::uint64_t index = detail::consul_index(response);
    std::string what = "GET " + endpoint();
    auto body = [&] { return detail::quote_body(response.body, token_); };
    switch (response.status) {
    case 200: break;
    case 404:
      if (mode_ == Mode::kv) {
        Decoded d;
        d.set = PeerSet().with_source_index(index);
        d.index = index;
        return d;
      }
      return Error(Errc::not_found, what + ": HTTP 404 (no such endpoint): " + body());
    case 400: return Error(Errc::invalid_argument, what + ": Consul rejected the request (HTTP 400): " + body());
    case 403:
      return Error(Errc::unavailable,
                   what + ": ACL permission denied (HTTP 403); check the token and its policy: " + body());
    case 429: return Error(Errc::unavailable, what + ": rate limited by Consul (HTTP 429): " + body());
    default:
      return Error(Errc::unavailable, what + ": HTTP " + std::to_string(response.status) + ": " + body());
    }
    nlohmann::json doc;
    try {
      doc = nlohmann::json::parse(response.body);
    } catch (const nlohmann::json::exception& e) {
      std::string w = e.what();
      auto bracket = w.find("] ");
      if (bracket != std::string::npos) w.erase(0, bracket + 2);
      // "; last read: '…'" quotes the body, which may echo the token, in whole or in part.
      if (auto quoted = w.find("; last read: "); quoted != std::string::npos && !token_.empty()) w.resize(quoted);
      return Error(Errc::parse_error, what + ": invalid JSON: " + w);
    }
    if (!doc.is_array())
      return Error(Errc::parse_error, what + ": expected a JSON array of " +
                                          (mode_ == Mode::kv ? "keys" : "service instances") + ", got " +
                                          doc.type_name() +
                                          (doc.is_object() ? " (a map such as /v1/catalog/services returns?)" : ""));
    std::vector<Peer> peers;
    std::vector<std::string> skipped;
    std::set<std::string> ids;
    peers.reserve(doc.size());
    for (std::size_t i = 0; i < doc.size(); ++i) {
      std::string why;
      Peer p;
      bool keep = mode_ == Mode::health ? health_entry(doc[i], p, why)
                  : mode_ == Mode::catalog ? catalog_entry(doc[i], p, why)
                                           : kv_entry(doc[i], p, why);
      if (keep) keep = admit(std::move(p), ids, peers, why);
      if (!keep && !why.empty()) skipped.push_back(std::move(why));
    }
    auto set = PeerSet::make(std::move(peers), index);
    if (!set) return set.error(); // unreachable: every peer was validated on its own
    if (skipped.size() > DYNUP_MAX_REPORTED_ERRORS) {
      std::size_t more = skipped.size() - DYNUP_MAX_REPORTED_ERRORS;
      skipped.resize(DYNUP_MAX_REPORTED_ERRORS);
      skipped.push_back("and " + std::to_string(more) + " more entries skipped");
    }
    Decoded d;
    d.set = std::move(set).value();
    d.index = index;
    d.skipped = std::move(skipped);
    return d;
  }

  Mode mode() const noexcept { return mode_; }
  /// The service name (health, catalog) or the KV prefix as given (kv).
  const std::string& name() const noexcept { return name_; }
  /// kv: the folder listed, "<prefix>/".
  std::string folder() const { return mode_ == Mode::kv ? kv_folder() : std::string(); }
  /// The query parameters every request of this source shares with the cluster-wide
  /// requests of the same agent (dc and consistency), encoded, without '?'.
  std::string scope_params() const {
    std::vector<std::string> params;
    if (!dc_.empty()) params.push_back("dc=" + detail::url_escape(dc_));
    if (consistency_ == Consistency::stale) params.push_back("stale");
    if (consistency_ == Consistency::consistent) params.push_back("consistent");
    std::string out;
    for (const auto& p : params) out += (out.empty() ? "" : "&") + p;
    return out;
  }
  /// The ACL token, for the X-Consul-Token header of requests made for this source and
  /// nothing else: never log or quote it.
  const std::string& token() const noexcept { return token_; }
  /// The agent's address, for the transport.
  const std::string& host() const noexcept { return host_; }
  std::uint16_t port() const noexcept { return port_; }

private:
  enum class Consistency { standard, stale, consistent };

  ConsulSource() = default;

  const char* mode_name() const noexcept {
    return mode_ == Mode::health ? "health" : mode_ == Mode::catalog ? "catalog" : "kv";
  }

  // A KV prefix names a folder: without the '/', "upstreams/api" would also list
  // "upstreams/api2/…" (Consul's recurse matches a string prefix, api-docs/kv.mdx).
  std::string kv_folder() const { return name_.back() == '/' ? name_ : name_ + "/"; }

  std::string endpoint() const {
    if (mode_ == Mode::kv) return "/v1/kv/" + detail::url_escape(kv_folder(), true);
    return std::string(mode_ == Mode::health ? "/v1/health/service/" : "/v1/catalog/service/") +
           detail::url_escape(name_);
  }

  void common_params(std::vector<std::string>& out) const {
    for (const auto& t : tags_) out.push_back("tag=" + detail::url_escape(t));
    if (!dc_.empty()) out.push_back("dc=" + detail::url_escape(dc_));
    if (!filter_.empty()) out.push_back("filter=" + detail::url_escape(filter_));
    if (!near_.empty()) out.push_back("near=" + detail::url_escape(near_));
    if (consistency_ == Consistency::stale) out.push_back("stale");
    if (consistency_ == Consistency::consistent) out.push_back("consistent");
  }

  std::string zone_of(const std::map<std::string, std::string>& service_meta,
                      const std::map<std::string, std::string>& node_meta) const {
    if (auto it = service_meta.find(zone_meta_); it != service_meta.end()) return it->second;
    if (auto it = node_meta.find(zone_meta_); it != node_meta.end()) return it->second;
    return {};
  }

  static std::string instance_id(const std::string& node, const std::string& service_id) {
    if (node.empty() || service_id.empty()) return node + service_id; // empty: host:port
    return node + "/" + service_id;
  }

  // A /v1/health/service entry: {"Node":{…},"Service":{…},"Checks":[…]}.
  bool health_entry(const nlohmann::json& e, Peer& p, std::string& why) const {
    const nlohmann::json* node = detail::member(e, "Node");
    const nlohmann::json* svc = detail::member(e, "Service");
    static const nlohmann::json none = nlohmann::json::object();
    if (node == nullptr) node = &none;
    if (svc == nullptr || !svc->is_object()) {
      why = "entry without a Service object";
      return false;
    }
    p.id = instance_id(detail::string_member(*node, "Node"), detail::string_member(*svc, "ID"));
    p.host = detail::string_member(*svc, "Address");
    if (p.host.empty()) p.host = detail::string_member(*node, "Address");
    std::uint64_t port = 0;
    detail::uint_member(*svc, "Port", port);
    p.port = port > 65535 ? 0 : static_cast<std::uint16_t>(port);
    p.tags = detail::strings_member(*svc, "Tags");
    p.meta = detail::meta_member(*svc, "Meta");
    p.zone = zone_of(p.meta, detail::meta_member(*node, "Meta"));
    p.health = detail::consul_checks_health(e);
    auto w = detail::weights_member(*svc, "Weights");
    detail::apply_consul_weight(p, p.health == Health::warning ? w.warning : w.passing, w.passing);
    return instance_ok(p, port, "Service.Address and Node.Address are empty", "Service.Port", why);
  }

  // A /v1/catalog/service entry: flat, Service fields prefixed with "Service".
  bool catalog_entry(const nlohmann::json& e, Peer& p, std::string& why) const {
    if (!e.is_object()) {
      why = std::string("entry is a JSON ") + e.type_name() + ", not an object";
      return false;
    }
    p.id = instance_id(detail::string_member(e, "Node"), detail::string_member(e, "ServiceID"));
    p.host = detail::string_member(e, "ServiceAddress");
    if (p.host.empty()) p.host = detail::string_member(e, "Address");
    std::uint64_t port = 0;
    detail::uint_member(e, "ServicePort", port);
    p.port = port > 65535 ? 0 : static_cast<std::uint16_t>(port);
    p.tags = detail::strings_member(e, "ServiceTags");
    p.meta = detail::meta_member(e, "ServiceMeta");
    p.zone = zone_of(p.meta, detail::meta_member(e, "NodeMeta"));
    p.health = Health::unknown;
    auto w = detail::weights_member(e, "ServiceWeights");
    detail::apply_consul_weight(p, w.passing, w.passing);
    return instance_ok(p, port, "ServiceAddress and Address are empty", "ServicePort", why);
  }

  static bool instance_ok(const Peer& p, std::uint64_t port, const char* no_host, const char* port_field,
                          std::string& why) {
    std::string name = p.id.empty() ? "peer" : "peer \"" + p.id + "\"";
    if (p.host.empty())
      why = name + ": no address (" + no_host + ")";
    else if (port == 0 || port > 65535)
      why = name + ": " + port_field + " " + std::to_string(port) + " is not 1..65535";
    return why.empty();
  }

  // A /v1/kv/<prefix>?recurse entry in the nginx-upsync layout.
  bool kv_entry(const nlohmann::json& e, Peer& p, std::string& why) const {
    std::string key = detail::string_member(e, "Key");
    std::string folder = kv_folder();
    if (key.empty()) {
      why = "KV entry without a Key";
      return false;
    }
    if (key + "/" == folder) return false; // the prefix key itself
    if (key.compare(0, folder.size(), folder) != 0) {
      why = "key \"" + key + "\" is not under \"" + folder + "\"";
      return false;
    }
    std::string rest = key.substr(folder.size());
    if (rest.empty() || rest.back() == '/') return false; // a "directory"
    auto bad = [&](const std::string& what) {
      why = "key \"" + key + "\": " + what;
      return false;
    };
    if (rest.find('/') != std::string::npos)
      return bad("nested key; expected " + folder + "<host>:<port>");
    auto hp = parse_host_port(rest);
    if (!hp) return bad(hp.error().message());
    p = std::move(hp).value();

    std::string value;
    if (const nlohmann::json* v = detail::member(e, "Value"); v != nullptr) {
      if (!v->is_string()) return bad(std::string("Value is a JSON ") + v->type_name() + ", not base64 text");
      if (!detail::base64_decode(v->get_ref<const std::string&>(), value)) return bad("Value is not valid base64");
    }
    if (value.find_first_not_of(" \t\r\n") == std::string::npos) return true; // defaults
    nlohmann::json doc;
    try {
      doc = nlohmann::json::parse(value);
    } catch (const nlohmann::json::exception&) {
      return bad("value is not JSON (expected {\"weight\":1,\"max_fails\":2,\"fail_timeout\":10,\"down\":0,"
                 "\"backup\":0})");
    }
    if (!doc.is_object()) return bad(std::string("value is a JSON ") + doc.type_name() + ", not an object");
    auto number = [&](const char* k, std::uint64_t lo, std::uint64_t hi, std::uint64_t& dst) {
      auto it = doc.find(k);
      if (it == doc.end()) return true;
      if (!it->is_number_unsigned() || it->get<std::uint64_t>() < lo || it->get<std::uint64_t>() > hi)
        return bad(std::string(k) + " " + it->dump() + " is not an integer " + std::to_string(lo) + ".." +
                   std::to_string(hi));
      dst = it->get<std::uint64_t>();
      return true;
    };
    auto boolean = [&](const char* k, bool& dst) {
      auto it = doc.find(k);
      if (it == doc.end()) return true;
      if (it->is_boolean()) {
        dst = it->get<bool>();
      } else if (it->is_number_unsigned() && it->get<std::uint64_t>() <= 1) {
        dst = it->get<std::uint64_t>() == 1;
      } else {
        return bad(std::string(k) + " " + it->dump() + " is not 0, 1, true or false");
      }
      return true;
    };
    std::uint64_t weight = 1, max_fails = 0, fail_timeout = 0;
    bool down = false;
    if (!number("weight", 1, max_weight, weight) || !number("max_fails", 0, UINT32_MAX, max_fails) ||
        !number("fail_timeout", 0, UINT32_MAX, fail_timeout) || !boolean("down", down) ||
        !boolean("backup", p.backup))
      return false;
    p.weight = static_cast<std::uint32_t>(weight);
    if (down) p.health = Health::critical;
    if (doc.contains("max_fails")) p.meta["max_fails"] = std::to_string(max_fails);
    if (doc.contains("fail_timeout")) p.meta["fail_timeout"] = std::to_string(fail_timeout);
    return true;
  }

  // Validates one peer as PeerSet::make would (canonical host, port, weight, id), so a
  // bad entry costs only itself, and drops a repeated id. Appends it to `out` when good.
  static bool admit(Peer p, std::set<std::string>& ids, std::vector<Peer>& out, std::string& why) {
    std::vector<Peer> single;
    single.push_back(std::move(p));
    auto one = PeerSet::make(std::move(single));
    if (!one) {
      // "1 invalid peer: peers[0] \"id\": why" → "peer \"id\": why"
      why = one.error().message();
      if (auto at = why.find("peers[0] "); at != std::string::npos) why.replace(0, at + 9, "peer ");
      return false;
    }
    const Peer& valid = (*one)[0];
    if (!ids.insert(valid.id).second) {
      why = "peer \"" + valid.id + "\": duplicate id, the first entry is kept";
      return false;
    }
    out.push_back(valid);
    return true;
  }

  Mode mode_ = Mode::health;
  std::string host_;
  std::uint16_t port_ = 0;
  std::string name_; ///< service name, or KV prefix as written
  bool passing_only_ = true;
  std::vector<std::string> tags_;
  std::string dc_, filter_, near_, zone_meta_ = "zone";
  Consistency consistency_ = Consistency::standard;
  std::string token_;     ///< never leaves this object except as the X-Consul-Token header
  std::string token_env_; ///< the variable's name, not a secret
};

DYNUP_NAMESPACE_END
