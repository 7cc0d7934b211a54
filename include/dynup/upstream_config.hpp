// UpstreamConfig: one upstream as JSON — its source, policy, guards, watcher tuning,
// snapshot and health. parse_upstream_config reads and checks it; every error names the
// JSON path and what is wrong. docs/UPSTREAM.md documents the schema; an example that
// parses is upstream_config_example below (a unit test parses it).
#pragma once

#include <dynup/balance/policy.hpp>
#include <dynup/health/options.hpp>
#include <dynup/health/options_json.hpp>
#include <dynup/result.hpp>
#include <dynup/shared_snapshot.hpp>
#include <dynup/version.hpp>
#include <dynup/watch/any.hpp>

#include <nlohmann/json.hpp>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

DYNUP_NAMESPACE_BEGIN

/// A complete upstream config, as parse_upstream_config accepts it.
inline constexpr const char* upstream_config_example = R"({
  "name": "api",
  "source": "consul://127.0.0.1:8500/health/api?tag=v2",
  "policy": {"name": "least_request", "options": {"choice_count": 2}},
  "guards": {"min_peers": 2, "max_removed_share": 0.5},
  "snapshot_path": "/var/lib/dynup/api.snap",
  "watch": {"wait_ms": 300000, "strong_dependency": false, "initial": "wait"},
  "health": {"passive": {"max_fails": 3, "fail_timeout_ms": 10000}}
})";

/// One upstream, checked. A plain value.
struct UpstreamConfig {
  std::string name;                      ///< [A-Za-z0-9_.-], 1..64 characters
  std::string source;                    ///< a spec Watcher::start accepts
  std::string policy = "round_robin";    ///< a name make_policy accepts
  nlohmann::json policy_options;         ///< null: the policy's defaults
  AnyWatchOptions watch;                 ///< guards, snapshot_path, timing
  HealthOptions health;
  SharedConfig shared;                   ///< off unless the "shared" section is present
};

namespace detail {

/// Walks one JSON object, checking keys and types; keeps the first error, with its path.
class ConfigReader {
public:
  ConfigReader(const nlohmann::json& obj, std::string path, std::optional<Error>& error,
               std::initializer_list<const char*> known)
      : obj_(obj), path_(std::move(path)), error_(error) {
    if (!obj_.is_object()) {
      fail(path_, "expected an object, got " + describe(obj_));
      return;
    }
    for (auto it = obj_.begin(); it != obj_.end(); ++it) {
      bool ok = false;
      for (const char* k : known) ok = ok || it.key() == k;
      if (ok) continue;
      std::string list;
      for (const char* k : known) list += (list.empty() ? "" : ", ") + std::string(k);
      fail(at(it.key()), "unknown key (valid: " + list + ")");
      return;
    }
  }

  const nlohmann::json* get(const char* key) const {
    if (!obj_.is_object()) return nullptr;
    auto it = obj_.find(key);
    return it == obj_.end() ? nullptr : &*it;
  }
  std::string at(std::string_view key) const { return path_ + "." + std::string(key); }

  void text(const char* key, std::string& out) {
    if (const nlohmann::json* v = get(key)) {
      if (!v->is_string() || v->get_ref<const std::string&>().empty())
        return fail(at(key), "expected a non-empty string, got " + describe(*v));
      out = v->get<std::string>();
    }
  }
  void flag(const char* key, bool& out) {
    if (const nlohmann::json* v = get(key)) {
      if (!v->is_boolean()) return fail(at(key), "expected true or false, got " + describe(*v));
      out = v->get<bool>();
    }
  }
  void integer(const char* key, std::uint64_t lo, std::uint64_t hi, std::uint64_t& out) {
    if (const nlohmann::json* v = get(key)) {
      bool ok = v->is_number_unsigned() || (v->is_number_integer() && v->get<std::int64_t>() >= 0);
      if (!ok || v->get<std::uint64_t>() < lo || v->get<std::uint64_t>() > hi)
        return fail(at(key), "expected an integer " + std::to_string(lo) + ".." + std::to_string(hi) + ", got " +
                                 describe(*v));
      out = v->get<std::uint64_t>();
    }
  }
  void millis(const char* key, std::uint64_t lo, std::uint64_t hi, std::chrono::milliseconds& out) {
    std::uint64_t n = static_cast<std::uint64_t>(out.count());
    integer(key, lo, hi, n);
    out = std::chrono::milliseconds(static_cast<std::int64_t>(n));
  }
  void number(const char* key, double lo, double hi, double& out) {
    if (const nlohmann::json* v = get(key)) {
      if (!v->is_number() || !std::isfinite(v->get<double>()) || v->get<double>() < lo || v->get<double>() > hi)
        return fail(at(key), "expected a number in [" + fmt(lo) + ", " + fmt(hi) + "], got " + describe(*v));
      out = v->get<double>();
    }
  }

  void fail(const std::string& where, const std::string& what) {
    if (!error_) error_ = Error(Errc::invalid_argument, where + ": " + what);
  }

  static std::string describe(const nlohmann::json& v) {
    std::string s = v.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
    return s.size() > 80 ? s.substr(0, 80) + "…" : s;
  }

private:
  static std::string fmt(double v) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%g", v);
    return buf;
  }

  const nlohmann::json& obj_;
  std::string path_;
  std::optional<Error>& error_;
};

inline bool valid_upstream_name(std::string_view s) noexcept {
  if (s.empty() || s.size() > 64) return false;
  for (char c : s)
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '.' ||
          c == '-'))
      return false;
  return true;
}

} // namespace detail

/// Reads one upstream. Checks the source spec against the options (Watcher::validate:
/// no I/O, but token_env is read), the policy and its options (make_policy) and the
/// health section (health_options_from_json). Errors are Errc::invalid_argument naming
/// the path, e.g. `upstream.watch.wait_ms: expected an integer 10..600000, got -1`.
inline Result<UpstreamConfig> parse_upstream_config(const nlohmann::json& doc) {
  std::optional<Error> error;
  UpstreamConfig c;
  detail::ConfigReader top(doc, "upstream", error,
                           {"name", "source", "policy", "guards", "snapshot_path", "watch", "health", "shared"});
  if (error) return *error;
  for (const char* required : {"name", "source"})
    if (!top.get(required)) return Error(Errc::invalid_argument, top.at(required) + ": required");
  top.text("name", c.name);
  if (!error && !detail::valid_upstream_name(c.name))
    top.fail(top.at("name"), "\"" + c.name + "\" must be 1..64 characters of A-Z a-z 0-9 _ . -");
  top.text("source", c.source);
  top.text("snapshot_path", c.watch.snapshot_path);
  if (error) return *error;

  if (const nlohmann::json* p = top.get("policy")) {
    if (p->is_string()) {
      c.policy = p->get<std::string>();
    } else {
      detail::ConfigReader policy(*p, top.at("policy"), error, {"name", "options"});
      if (!policy.get("name")) policy.fail(policy.at("name"), "required");
      policy.text("name", c.policy);
      if (const nlohmann::json* o = policy.get("options")) c.policy_options = *o;
    }
    if (error) return *error;
  }
  if (auto made = make_policy(c.policy, c.policy_options); !made)
    return Error(Errc::invalid_argument, top.at("policy") + ": " + made.error().message());

  if (const nlohmann::json* g = top.get("guards")) {
    detail::ConfigReader guards(*g, top.at("guards"), error, {"allow_empty", "min_peers", "max_peers", "max_removed_share"});
    guards.flag("allow_empty", c.watch.guards.allow_empty);
    std::uint64_t min_peers = c.watch.guards.min_peers;
    guards.integer("min_peers", 0, 1000000, min_peers);
    c.watch.guards.min_peers = static_cast<std::size_t>(min_peers);
    std::uint64_t max_peers = c.watch.guards.max_peers;
    guards.integer("max_peers", 0, DYNUP_MAX_PEERS, max_peers);
    c.watch.guards.max_peers = static_cast<std::size_t>(max_peers);
    guards.number("max_removed_share", 0.0, 1.0, c.watch.guards.max_removed_share);
    if (error) return *error;
    if (c.watch.guards.max_peers > 0 && c.watch.guards.min_peers > c.watch.guards.max_peers)
      return Error(Errc::invalid_argument, top.at("guards") + ": min_peers " + std::to_string(min_peers) +
                                               " is more than max_peers " + std::to_string(max_peers));
  }

  if (const nlohmann::json* w = top.get("watch")) {
    detail::ConfigReader watch(*w, top.at("watch"), error,
                               {"wait_ms", "backoff_base_ms", "backoff_cap_ms", "min_interval_ms", "burst",
                                "strong_dependency", "poll_ms", "initial"});
    // A key written in the file is "set" whatever its value (AnyWatchOptions::explicitly_set).
    static constexpr std::pair<const char*, const char*> named[] = {
        {"wait_ms", "wait"},         {"backoff_base_ms", "backoff_base"}, {"backoff_cap_ms", "backoff_cap"},
        {"min_interval_ms", "min_interval"}, {"burst", "burst"},       {"strong_dependency", "strong_dependency"},
        {"poll_ms", "poll_interval"}};
    for (const auto& [key, member] : named)
      if (watch.get(key)) c.watch.explicitly_set.emplace_back(member);
    watch.millis("wait_ms", 10, 600000, c.watch.wait);
    watch.millis("backoff_base_ms", 1, 3600000, c.watch.backoff_base);
    watch.millis("backoff_cap_ms", 1, 3600000, c.watch.backoff_cap);
    watch.millis("min_interval_ms", 0, 3600000, c.watch.min_interval);
    std::uint64_t burst = c.watch.burst;
    watch.integer("burst", 1, 1000, burst);
    c.watch.burst = static_cast<unsigned>(burst);
    watch.flag("strong_dependency", c.watch.strong_dependency);
    watch.millis("poll_ms", 10, 3600000, c.watch.poll_interval);
    std::string initial = initial_fetch_name(c.watch.initial);
    watch.text("initial", initial);
    if (!error && initial != "wait" && initial != "background")
      watch.fail(watch.at("initial"), "expected \"wait\" or \"background\", got \"" + initial + "\"");
    c.watch.initial = initial == "background" ? InitialFetch::background : InitialFetch::wait;
    if (!error && c.watch.backoff_cap < c.watch.backoff_base)
      watch.fail(watch.at("backoff_cap_ms"), "is below backoff_base_ms");
    if (error) return *error;
  }
  if (auto ok = Watcher::validate(c.source, c.watch); !ok)
    return Error(Errc::invalid_argument, top.at("source") + ": " + ok.error().message());

  if (const nlohmann::json* h = top.get("health")) {
    Result<HealthOptions> health = health_options_from_json(*h, top.at("health"));
    if (!health) return health.error();
    c.health = std::move(health).value();
  }

  if (const nlohmann::json* sh = top.get("shared")) {
    detail::ConfigReader shared(*sh, top.at("shared"), error,
                                {"dir", "name", "capacity_bytes", "retry_ms", "poll_ms", "first_wait_ms"});
    c.shared.enabled = true;
    shared.text("dir", c.shared.dir);
    c.shared.name = c.name;
    shared.text("name", c.shared.name);
    if (!error && !detail::valid_upstream_name(c.shared.name))
      shared.fail(shared.at("name"), "\"" + c.shared.name + "\" must be 1..64 characters of A-Z a-z 0-9 _ . -");
    std::uint64_t capacity = c.shared.capacity;
    shared.integer("capacity_bytes", 1024, std::uint64_t{1} << 30, capacity);
    c.shared.capacity = static_cast<std::size_t>(capacity);
    shared.millis("retry_ms", 10, 60000, c.shared.retry);
    shared.millis("poll_ms", 1, 60000, c.shared.poll);
    shared.millis("first_wait_ms", 0, 600000, c.shared.first_wait);
    if (error) return *error;
    // A push reaches the one process it is sent to; followers would never see it.
    if (c.source == "push://")
      return Error(Errc::invalid_argument, top.at("shared") + ": a push:// source cannot be shared: pushes reach "
                                                              "only the process they are sent to");
  }
  return c;
}

DYNUP_NAMESPACE_END
