// Health options: what an upstream's health layer checks, counts and tolerates. Plain
// values; health/tracker.hpp applies them, health/active.hpp runs the probes. The JSON
// form (docs/HEALTH.md) is read by health_options_from_json in health/options_json.hpp.
#pragma once

#include <dynup/version.hpp>

#include <chrono>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

DYNUP_NAMESPACE_BEGIN

/// Active checks: a probe per peer every `interval`, on the process's runtime loop.
struct ActiveCheckOptions {
  enum class Kind : std::uint8_t { none, http, tcp };
  Kind kind = Kind::none;                 ///< none: no active checks
  std::string path = "/";                 ///< http: the request target
  std::string host_header;                ///< http: Host header; empty: the peer's host
  /// http: statuses that count as healthy, as inclusive ranges.
  std::vector<std::pair<int, int>> expected_statuses{{200, 399}};
  std::chrono::milliseconds timeout{1000};  ///< connect + response, per probe
  std::chrono::milliseconds interval{5000}; ///< between the starts of two probes of a peer
  unsigned healthy_threshold = 2;           ///< consecutive successes to become healthy
  unsigned unhealthy_threshold = 3;         ///< consecutive failures to become unhealthy
  unsigned max_concurrent = 8;              ///< probes in flight at once, across peers
};

/// nginx's passive check: `max_fails` failures within `fail_timeout` mark a peer down
/// for `fail_timeout`. A failure is a connect failure, no response (status 0), or a
/// status listed in `fail_statuses` (nginx's proxy_next_upstream http_5xx flags).
struct PassiveOptions {
  unsigned max_fails = 1; ///< 0 disables, as in nginx
  std::chrono::milliseconds fail_timeout{10000};
  std::vector<int> fail_statuses; ///< default none: nginx's "error timeout"
};

/// Envoy-style outlier ejection on consecutive failures.
struct OutlierOptions {
  bool enabled = false;
  unsigned consecutive_5xx = 5;             ///< 0 disables this trigger
  unsigned consecutive_gateway_failure = 5; ///< 502, 503, 504, connect failures; 0 disables
  std::chrono::milliseconds base_ejection_time{30000};
  std::chrono::milliseconds max_ejection_time{300000};
  double max_ejection_percent = 10; ///< of the set's peers, at least one
};

/// Panic: when the healthy share of weight falls below `threshold_percent`.
struct PanicOptions {
  enum class Mode : std::uint8_t { all, fail };
  double threshold_percent = 50; ///< 0 disables
  Mode mode = Mode::all;         ///< all: route to every peer (Envoy); fail: to none
};

/// Slow start: a new or recovered peer's weight ramps up over `window`.
struct SlowStartOptions {
  std::chrono::milliseconds window{0}; ///< 0 disables
  double aggression = 1.0;             ///< > 0; 1 is linear
  double min_weight_percent = 10;      ///< the ramp's floor, (0, 100]
};

/// Everything the health layer of one upstream does.
struct HealthOptions {
  ActiveCheckOptions active;
  PassiveOptions passive;
  OutlierOptions outlier;
  PanicOptions panic;
  SlowStartOptions slow_start;
};

DYNUP_NAMESPACE_END
