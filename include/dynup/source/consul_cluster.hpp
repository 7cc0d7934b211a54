// Consul's cluster-wide indexes, for watching many services over a few connections:
// a blocking query on /v1/catalog/services returns when any registration changes, one on
// /v1/health/state/any when any check changes, and one on a KV folder when any key under
// it changes. The answers say which services may have changed; only those are fetched.
// Requests and decoders only, no I/O (DESIGN: a source only decodes).
#pragma once

#include <dynup/result.hpp>
#include <dynup/source/consul.hpp>
#include <dynup/version.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <map>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

DYNUP_NAMESPACE_BEGIN
namespace consul_cluster {

/// Which cluster-wide index a trigger blocks on.
enum class Trigger {
  services, ///< /v1/catalog/services: registrations (instances, addresses, ports, tags, meta)
  checks,   ///< /v1/health/state/any: check status, checks added and removed
  kv,       ///< /v1/kv/<folder>?keys: any key under a folder
};

inline const char* trigger_name(Trigger t) noexcept {
  return t == Trigger::services ? "/v1/catalog/services" : t == Trigger::checks ? "/v1/health/state/any" : "/v1/kv";
}

/// A bexpr filter keeping the checks of `names` and the node checks (ServiceName "", which
/// every service on the node shows): `ServiceName == "" or ServiceName == "api" or …`.
/// Quotes and backslashes in names are escaped. Allocates O(total length).
inline std::string checks_filter(const std::vector<std::string>& names) {
  std::string out = "ServiceName == \"\"";
  for (const auto& n : names) {
    out += " or ServiceName == \"";
    for (char c : n) {
      if (c == '"' || c == '\\') out += '\\';
      out += c;
    }
    out += '"';
  }
  return out;
}

/// The blocking GET for trigger `t` at `index` (0: a plain read), with `source`'s dc,
/// consistency and token. `arg`: the checks filter (checks) or the KV folder (kv);
/// unused for services. `wait` as ConsulSource::request. Allocates; never fails.
inline HttpRequest trigger_request(Trigger t, const ConsulSource& source, const std::string& arg,
                                   std::uint64_t index, std::chrono::milliseconds wait) {
  HttpRequest req;
  std::vector<std::string> params;
  switch (t) {
  case Trigger::services: req.target = "/v1/catalog/services"; break;
  case Trigger::checks:
    req.target = "/v1/health/state/any";
    if (!arg.empty()) params.push_back("filter=" + detail::url_escape(arg));
    break;
  case Trigger::kv:
    req.target = "/v1/kv/" + detail::url_escape(arg, true);
    params.push_back("keys");
    break;
  }
  if (auto scope = source.scope_params(); !scope.empty()) params.push_back(std::move(scope));
  if (index != 0) {
    params.push_back("index=" + std::to_string(index));
    wait = std::min(wait, ConsulSource::max_wait);
    if (wait.count() > 0)
      params.push_back("wait=" + (wait.count() % 1000 == 0 ? std::to_string(wait.count() / 1000) + "s"
                                                          : std::to_string(wait.count()) + "ms"));
  }
  for (std::size_t i = 0; i < params.size(); ++i) req.target += (i ? "&" : "?") + params[i];
  if (!source.token().empty()) req.headers.emplace_back("X-Consul-Token", source.token());
  return req;
}

/// A trigger's answer: its index, and for checks a digest per service name ("" for the
/// node checks) of every check's node, id, status and ModifyIndex.
struct TriggerAnswer {
  std::uint64_t index = 0;
  std::map<std::string, std::uint64_t> digests;
};

/// Decodes a trigger's reply. 200 (and 404 for a KV folder with no keys yet) is an
/// answer; other statuses are errors in the words ConsulSource::decode uses (429 rate
/// limiting, 403 ACL denial, 5xx), quoting the plain-text body without the token.
inline Result<TriggerAnswer> decode_trigger(Trigger t, const HttpResponse& response, const std::string& token) {
  TriggerAnswer a;
  a.index = detail::consul_index(response);
  std::string what = std::string("GET ") + trigger_name(t);
  auto body = [&] { return detail::quote_body(response.body, token); };
  switch (response.status) {
  case 200: break;
  case 404:
    if (t == Trigger::kv) return a;
    return Error(Errc::not_found, what + ": HTTP 404: " + body());
  case 403:
    return Error(Errc::unavailable,
                 what + ": ACL permission denied (HTTP 403); check the token and its policy: " + body());
  case 429: return Error(Errc::unavailable, what + ": rate limited by Consul (HTTP 429): " + body());
  case 400: return Error(Errc::invalid_argument, what + ": Consul rejected the request (HTTP 400): " + body());
  default: return Error(Errc::unavailable, what + ": HTTP " + std::to_string(response.status) + ": " + body());
  }
  if (t != Trigger::checks) return a; // only the index matters
  nlohmann::json doc = nlohmann::json::parse(response.body, nullptr, false);
  if (doc.is_discarded() || !doc.is_array()) return Error(Errc::parse_error, what + ": expected a JSON array of checks");
  using Key = std::tuple<std::string, std::string, std::string, std::uint64_t>; // node, check id, status, modify
  std::map<std::string, std::vector<Key>> by_service;
  for (const auto& c : doc) {
    if (!c.is_object()) continue;
    std::uint64_t modify = 0;
    detail::uint_member(c, "ModifyIndex", modify);
    by_service[detail::string_member(c, "ServiceName")].emplace_back(
        detail::string_member(c, "Node"), detail::string_member(c, "CheckID"), detail::string_member(c, "Status"),
        modify);
  }
  for (auto& [service, keys] : by_service) {
    std::sort(keys.begin(), keys.end());
    std::uint64_t h = 1469598103934665603ull; // FNV-1a
    auto mix = [&h](const std::string& s) {
      for (unsigned char ch : s) h = (h ^ ch) * 1099511628211ull;
      h = (h ^ 0xff) * 1099511628211ull;
    };
    for (const auto& [node, id, status, modify] : keys) {
      mix(node);
      mix(id);
      mix(status);
      mix(std::to_string(modify));
    }
    a.digests.emplace(service, h);
  }
  return a;
}

} // namespace consul_cluster
DYNUP_NAMESPACE_END
