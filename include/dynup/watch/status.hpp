// What a watcher reports about itself; the same fields for every source.
#pragma once

#include <dynup/version.hpp>

#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>

DYNUP_NAMESPACE_BEGIN

/// A watcher's state at one moment. A plain value: watchers hand out copies.
struct WatcherStatus {
  std::string source;        ///< the spec, never with credentials
  std::uint64_t last_index = 0;
  std::optional<std::chrono::system_clock::time_point> last_success;
  std::string last_error;    ///< empty once an attempt succeeds and its set is accepted
  std::uint64_t consecutive_failures = 0;
  std::chrono::milliseconds current_backoff{0};
  bool stale = false;        ///< the set served is older than what the source holds (or unknown)
  std::uint64_t publish_count = 0;

  nlohmann::json to_json() const {
    nlohmann::json j{{"source", source},
                     {"last_index", last_index},
                     {"last_error", last_error},
                     {"consecutive_failures", consecutive_failures},
                     {"current_backoff_ms", current_backoff.count()},
                     {"stale", stale},
                     {"publish_count", publish_count}};
    if (last_success)
      j["last_success_ms"] = std::chrono::duration_cast<std::chrono::milliseconds>(
                                 last_success->time_since_epoch())
                                 .count();
    else
      j["last_success_ms"] = nullptr;
    return j;
  }
};

DYNUP_NAMESPACE_END
