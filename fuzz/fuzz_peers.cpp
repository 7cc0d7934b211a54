// The JSON documents a user writes: peer sets (file source, push API), upstream configs
// and health options.
//
// Input: one selector byte, then (by selector % 3)
//   0  a peer-set document for parse_peer_set
//   1  an upstream config for parse_upstream_config (parsed as JSON first, without throwing)
//   2  a health section for health_options_from_json
//
// Properties: nothing throws; a peer set is valid and round-trips through to_json; a
// config that parses has a valid name, a source Watcher::validate accepts, a policy
// make_policy builds, backoff_cap >= backoff_base, and health options that round-trip;
// config and health errors are Errc::invalid_argument; a config error never quotes the
// source's Consul token.
#include "fuzz_common.hpp"

#include <dynup/balance/policy.hpp>
#include <dynup/health/options_json.hpp>
#include <dynup/peer_json.hpp>
#include <dynup/upstream_config.hpp>
#include <dynup/watch/any.hpp>

#include <nlohmann/json.hpp>

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace {

void peer_set(std::string_view text) {
  auto set = dynup::parse_peer_set(text);
  if (!set) {
    auto code = set.error().code();
    DYNUP_FUZZ_CHECK(code == dynup::Errc::parse_error || code == dynup::Errc::invalid_peer, set.error().message());
    return;
  }
  DYNUP_FUZZ_CHECK(set->version() == 0, "a parsed set has a version");
  dynup_fuzz::check_published_set(*set);
}

// Reading the options back from their JSON gives the same options.
void check_health_round_trip(const dynup::HealthOptions& o) {
  auto json = dynup::health_options_to_json(o);
  std::string text = json.dump();
  auto back = dynup::health_options_from_json(nlohmann::json::parse(text));
  DYNUP_FUZZ_CHECK(back, text + "\n" + (back ? std::string() : back.error().message()));
  DYNUP_FUZZ_CHECK(dynup::health_options_to_json(*back).dump() == text, text);
}

void upstream_config(std::string_view text) {
  auto doc = nlohmann::json::parse(text, nullptr, false);
  if (doc.is_discarded()) return;
  auto c = dynup::parse_upstream_config(doc);
  if (!c) {
    DYNUP_FUZZ_CHECK(c.error().code() == dynup::Errc::invalid_argument, c.error().message());
    if (doc.is_object())
      if (auto s = doc.find("source"); s != doc.end() && s->is_string()) {
        nlohmann::json others = doc;
        others.erase("source");
        dynup_fuzz::check_no_token(s->get_ref<const std::string&>(), c.error().message(), others.dump());
      }
    return;
  }
  DYNUP_FUZZ_CHECK(dynup::detail::valid_upstream_name(c->name), c->name);
  auto valid = dynup::Watcher::validate(c->source, c->watch);
  DYNUP_FUZZ_CHECK(valid, c->source + ": " + (valid ? std::string() : valid.error().message()));
  auto policy = dynup::make_policy(c->policy, c->policy_options);
  DYNUP_FUZZ_CHECK(policy, c->policy + ": " + (policy ? std::string() : policy.error().message()));
  DYNUP_FUZZ_CHECK(c->watch.backoff_cap >= c->watch.backoff_base, "backoff_cap below backoff_base");
  if (c->shared.enabled) DYNUP_FUZZ_CHECK(dynup::detail::valid_upstream_name(c->shared.name), c->shared.name);
  check_health_round_trip(c->health);
}

void health_options(std::string_view text) {
  auto doc = nlohmann::json::parse(text, nullptr, false);
  if (doc.is_discarded()) return;
  auto o = dynup::health_options_from_json(doc);
  if (!o) {
    DYNUP_FUZZ_CHECK(o.error().code() == dynup::Errc::invalid_argument, o.error().message());
    return;
  }
  const auto& a = o->active;
  DYNUP_FUZZ_CHECK(a.timeout.count() >= 1 && a.interval.count() >= 1, "active durations");
  DYNUP_FUZZ_CHECK(!a.path.empty() && a.path[0] == '/', a.path);
  DYNUP_FUZZ_CHECK(!a.expected_statuses.empty(), "no expected statuses");
  for (const auto& [lo, hi] : a.expected_statuses) DYNUP_FUZZ_CHECK(100 <= lo && lo <= hi && hi <= 599, "range");
  DYNUP_FUZZ_CHECK(o->outlier.base_ejection_time <= o->outlier.max_ejection_time, "ejection times");
  DYNUP_FUZZ_CHECK(o->slow_start.aggression > 0 && o->slow_start.min_weight_percent > 0, "slow start");
  check_health_round_trip(*o);
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto input = dynup_fuzz::split_selector(data, size);
  if (!input) return 0;
  const unsigned char selector = input->selector;
  std::string_view in = input->rest;
  switch (selector % 3) {
  case 0: peer_set(in); break;
  case 1: upstream_config(in); break;
  default: health_options(in); break;
  }
  return 0;
}
