// What every registry watcher shares: guarded publication, last-known-good persistence,
// status, callbacks, and an interruptible thread. Sources differ only in their loops.
#pragma once

#include <dynup/publisher.hpp>
#include <dynup/result.hpp>
#include <dynup/snapshot_file.hpp>
#include <dynup/version.hpp>
#include <dynup/watch/backoff.hpp>
#include <dynup/watch/guard.hpp>
#include <dynup/watch/status.hpp>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <string>
#include <thread>

DYNUP_NAMESPACE_BEGIN

/// When a registry watcher's start() returns (WatchOptions::initial).
enum class InitialFetch {
  /// After the first fetch: its set is served (or, when it fails, the last-known-good
  /// snapshot; or start() fails under strong_dependency). The caller's thread waits on
  /// the network, up to the first request's deadline.
  wait,
  /// At once, without touching the network: the last-known-good snapshot is served
  /// (stale) when there is one, else nothing (ready is false); the first fetch runs on
  /// the watcher's thread, and stop() interrupts it. For embedders whose start must not
  /// block (an nginx worker). Incompatible with strong_dependency.
  background,
};

/// Options every watcher takes.
struct WatchOptions {
  /// Longest a blocking query may be held by the server (Consul caps it at 10 minutes);
  /// 0 or less means the 5-minute default.
  std::chrono::milliseconds wait{std::chrono::minutes(5)};
  std::chrono::milliseconds backoff_base{100};
  std::chrono::milliseconds backoff_cap{30000};
  /// Token bucket for requests: at most `burst` back to back, then one per interval, so
  /// an index that changes constantly cannot make the loop spin.
  std::chrono::milliseconds min_interval{50};
  unsigned burst = 2;
  Guards guards;
  /// Last-known-good file: every published set is saved here, and it is loaded (and
  /// marked stale) when the first fetch at start fails. Empty: none.
  std::string snapshot_path;
  /// Fail start() when the first fetch fails, instead of serving the snapshot or waiting.
  bool strong_dependency = false;
  /// Whether start() waits for the first fetch; see InitialFetch.
  InitialFetch initial = InitialFetch::wait;
};

/// "wait" or "background".
inline const char* initial_fetch_name(InitialFetch i) noexcept {
  return i == InitialFetch::background ? "background" : "wait";
}

/// strong_dependency needs a start() that waits for the first fetch.
inline Result<void> check_initial(const WatchOptions& o, const std::string& described) {
  if (o.initial == InitialFetch::background && o.strong_dependency)
    return Error(Errc::invalid_argument, "source \"" + described +
                                             "\": strong_dependency needs initial \"wait\": with \"background\" "
                                             "start() does not wait for the first fetch");
  return {};
}

using PublishCallback = std::function<void(const Snapshot&)>;
using ErrorCallback = std::function<void(const Error&)>;

namespace detail {

/// The shared half of a watcher. Methods other than status() and stop_requested() are
/// called only by the watcher's own thread (or by start() before that thread exists).
class WatcherCore {
public:
  WatcherCore(Publisher& publisher, std::string source, WatchOptions options, PublishCallback on_publish,
              ErrorCallback on_error)
      : publisher_(publisher), options_(std::move(options)), on_publish_(std::move(on_publish)),
        on_error_(std::move(on_error)), backoff_(options_.backoff_base, options_.backoff_cap) {
    status_.source = std::move(source);
  }

  const WatchOptions& options() const noexcept { return options_; }
  Publisher& publisher() noexcept { return publisher_; }

  /// A fetch succeeded: clears the failure state and the backoff. A guard refusal still
  /// stands (the source still holds the refused set), so it stays the error and stale.
  void succeeded(std::uint64_t index) {
    backoff_.reset();
    std::lock_guard<std::mutex> lock(mu_);
    status_.last_index = index;
    status_.last_success = std::chrono::system_clock::now();
    status_.last_error = refusal_;
    status_.stale = !refusal_.empty() || !status_.ready;
    status_.consecutive_failures = 0;
    status_.current_backoff = std::chrono::milliseconds(0);
  }

  /// Publishes `set` unless a guard refuses it; saves it as last-known-good when it is
  /// new. A refusal is reported like an error and leaves the served set in place.
  void offer(PeerSet set) {
    if (auto g = check_guards(options_.guards, *publisher_.snapshot(), set); !g) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        refusal_ = g.error().message();
        status_.last_error = refusal_;
        status_.stale = true;
      }
      report(g.error());
      return;
    }
    auto outcome = publisher_.publish(std::move(set));
    {
      std::lock_guard<std::mutex> lock(mu_);
      refusal_.clear();
      fallback_error_.clear();
      status_.last_error.clear();
      status_.stale = false;
      status_.ready = true;
      if (outcome.published) ++status_.publish_count;
    }
    if (!outcome.published) return;
    const Snapshot& now = publisher_.snapshot();
    if (!options_.snapshot_path.empty()) {
      if (auto saved = save_snapshot(options_.snapshot_path, *now); !saved)
        report(saved.error().with_context("saving the last-known-good snapshot"));
    }
    notify_published();
  }

  /// A fetch failed: records and reports it; returns the backoff to sleep. The set
  /// served, if any, is now stale: what the source holds is unknown. A refused snapshot
  /// stays named in last_error until a set is served.
  std::chrono::milliseconds failed(const Error& e) {
    auto delay = backoff_.next();
    {
      std::lock_guard<std::mutex> lock(mu_);
      status_.last_error = e.message() + (fallback_error_.empty() ? "" : "; " + fallback_error_);
      ++status_.consecutive_failures;
      status_.current_backoff = delay;
      status_.stale = true;
    }
    report(e);
    return delay;
  }

  /// A watcher's first fetch failed (`what`: "first fetch", "first range"). Under
  /// strong_dependency: the error start() returns. Otherwise the failure is recorded
  /// (`back_off`: counted with a backoff, else only reported, for a source that answered
  /// and can be retried at once), the last-known-good snapshot is served if there is one,
  /// and the result is the delay before the watcher's loop tries again.
  Result<std::chrono::milliseconds> first_fetch_failed(const Error& e, const std::string& what, bool back_off) {
    if (options_.strong_dependency) return e.with_context(what + " failed and strong_dependency is set");
    std::chrono::milliseconds delay{0};
    if (back_off)
      delay = failed(e);
    else
      report(e);
    load_fallback();
    return delay;
  }

  /// Loads the last-known-good snapshot into the publisher, marked stale. Returns false
  /// when there is none or it is refused; a refusal is reported and stays in
  /// status().last_error (naming the file and why) until a set is served.
  bool load_fallback() {
    if (options_.snapshot_path.empty()) return false;
    auto loaded = load_snapshot(options_.snapshot_path);
    if (!loaded) {
      Error e = loaded.error().with_context("the last-known-good snapshot is not served");
      {
        std::lock_guard<std::mutex> lock(mu_);
        fallback_error_ = e.message();
        const std::string& before = status_.last_error;
        status_.last_error = before.empty() ? fallback_error_ : before + "; " + fallback_error_;
        status_.stale = true;
      }
      report(e);
      return false;
    }
    std::uint64_t index = loaded->set.source_index();
    auto outcome = publisher_.publish(std::move(loaded->set));
    {
      std::lock_guard<std::mutex> lock(mu_);
      fallback_error_.clear();
      status_.stale = true;
      status_.ready = true;
      status_.last_index = index;
      if (outcome.published) ++status_.publish_count;
    }
    // The embedder builds its tables from this callback: it must hear of this set too.
    if (outcome.published) notify_published();
    return true;
  }

  void notify_published() {
    if (!on_publish_) return;
    try {
      on_publish_(publisher_.snapshot());
    } catch (...) {
      // A throwing callback must not end the watch; the set is published.
    }
  }

  void report(const Error& e) {
    if (!on_error_) return;
    try {
      on_error_(e);
    } catch (...) {
    }
  }

  WatcherStatus status() const {
    std::lock_guard<std::mutex> lock(mu_);
    return status_;
  }

  /// How changes reach this watcher (WatcherStatus::mode), and why not as intended.
  void set_mode(std::string mode, std::string why = {}) {
    std::lock_guard<std::mutex> lock(mu_);
    status_.mode = std::move(mode);
    status_.mode_error = std::move(why);
  }

  /// Sleeps up to `d`; returns false at once when stop was requested.
  bool sleep_for(std::chrono::milliseconds d) {
    std::unique_lock<std::mutex> lock(sleep_mu_);
    return !sleep_cv_.wait_for(lock, d, [&] { return stopping_.load(std::memory_order_acquire); });
  }

  void request_stop() noexcept {
    {
      std::lock_guard<std::mutex> lock(sleep_mu_);
      stopping_.store(true, std::memory_order_release);
    }
    sleep_cv_.notify_all();
  }
  bool stop_requested() const noexcept { return stopping_.load(std::memory_order_acquire); }

private:
  Publisher& publisher_;
  const WatchOptions options_;
  const PublishCallback on_publish_;
  const ErrorCallback on_error_;
  Backoff backoff_;
  mutable std::mutex mu_;
  WatcherStatus status_;
  std::string refusal_; ///< the standing guard refusal, empty when the last offer was accepted
  std::string fallback_error_; ///< why the snapshot was refused, until a set is served
  std::mutex sleep_mu_;
  std::condition_variable sleep_cv_;
  std::atomic<bool> stopping_{false};
};

} // namespace detail
DYNUP_NAMESPACE_END
