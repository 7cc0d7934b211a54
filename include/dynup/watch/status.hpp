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
  /// The set served may be older than what the source holds: true until a set from the
  /// source is accepted, after any failure, and while a guard refusal stands. A watcher
  /// that serves nothing is stale too.
  bool stale = true;
  /// A first set was loaded, from the source or from the last-known-good snapshot.
  /// Never false again once true; `stale` says whether it is current.
  bool ready = false;
  std::uint64_t publish_count = 0;
  /// How changes reach the watcher, where that can vary: a file watcher says "inotify",
  /// or "poll" while inotify cannot be used; a Consul watcher "direct" (a blocking query
  /// of its own) or "shared" (the agent's cluster-wide indexes, past the connection
  /// budget); an etcd watcher "shared stream". Empty before the first fetch.
  std::string mode;
  /// Why the watcher is not in its intended mode, with the cause and the consequence
  /// ("inotify_add_watch(/etc/dynup): No space left on device; polling every 1000 ms").
  /// Empty while it is.
  std::string mode_error;

  nlohmann::json to_json() const {
    nlohmann::json j{{"source", source},
                     {"last_index", last_index},
                     {"last_error", last_error},
                     {"consecutive_failures", consecutive_failures},
                     {"backoff_ms", current_backoff.count()},
                     {"stale", stale},
                     {"ready", ready},
                     {"publish_count", publish_count},
                     {"mode", mode},
                     {"mode_error", mode_error}};
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
