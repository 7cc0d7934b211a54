// RegistryWatcher: the one watcher skeleton every registry source plugs into. It owns
// start (waiting for the first fetch, or not), the last-known-good fallback, pacing,
// backoff, status and stop; a Driver owns only the protocol: one round at a time (a
// blocking query, a range, a watch stream), all on the process runtime's loop, so a
// watcher costs no thread of its own.
#pragma once

#include <dynup/publisher.hpp>
#include <dynup/result.hpp>
#include <dynup/runtime/http_message.hpp>
#include <dynup/runtime/runtime.hpp>
#include <dynup/version.hpp>
#include <dynup/watch/backoff.hpp>
#include <dynup/watch/core.hpp>
#include <dynup/watch/status.hpp>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>

DYNUP_NAMESPACE_BEGIN
namespace detail {

/// For tests: sees every request a driver sends, on the loop thread, before it goes.
using RequestTap = std::function<void(const HttpRequest&)>;

/// How a driver's round ended.
struct RoundEnd {
  enum class Kind { again, failed };
  Kind kind = Kind::again;
  /// failed: why. The skeleton reports it, marks the set stale and backs off.
  std::optional<Error> error;
  /// failed: count a backoff. false when the registry answered and only its data was bad
  /// (an etcd document that does not parse): the next round may come at once.
  bool back_off = true;
  /// again: the next round waits at least this long (beyond the token bucket).
  std::chrono::milliseconds delay{0};

  static RoundEnd again(std::chrono::milliseconds after = std::chrono::milliseconds(0)) {
    RoundEnd r;
    r.delay = after;
    return r;
  }
  static RoundEnd failed(Error e, bool back_off = true) {
    RoundEnd r;
    r.kind = Kind::failed;
    r.error = std::move(e);
    r.back_off = back_off;
    return r;
  }
};

/// A registry protocol, driven by RegistryWatcher on the runtime's loop thread. Every
/// method runs on that thread.
class Driver {
public:
  using End = std::function<void(RoundEnd)>;
  virtual ~Driver() = default;
  /// The spec, never with secrets.
  virtual std::string describe() const = 0;
  /// What the first round is called in errors: "first fetch", "first range".
  virtual const char* first_round() const { return "first fetch"; }
  /// Starts one round, which publishes through `core` what it learns (core.offer,
  /// core.succeeded) and then calls `end` exactly once, later, never inside begin().
  virtual void begin(WatcherCore& core, End end) = 0;
  /// Aborts the round in flight: `end` is never called for it after this returns.
  virtual void abort() noexcept = 0;
};

} // namespace detail

/// Runs one Driver for as long as it lives: one round after the other, paced by a token
/// bucket (WatchOptions::min_interval, burst), backing off (capped exponential, full
/// jitter) after a failure, keeping the last good set through any fault.
///
/// Threads: rounds, publication and both callbacks run on the process runtime's loop
/// thread (rt::Runtime), which every watcher of the process shares: callbacks must not
/// block. status() is safe from any thread; stop() from any thread, including a
/// callback. Memory: the driver's state; no thread, no descriptor of its own.
class RegistryWatcher {
public:
  /// Starts watching. With InitialFetch::wait (the default) returns after the first
  /// round: when it failed, with `strong_dependency` its error is returned; otherwise
  /// the last-known-good snapshot (if configured and readable) is published, stale, and
  /// the rounds go on with backoff. With InitialFetch::background: publishes the
  /// snapshot (if any, stale) and returns at once; the first round runs on the loop.
  /// Called on the loop's own thread (a hook of another runtime object) it cannot wait
  /// and starts as background, unless strong_dependency is set, which is then
  /// Errc::invalid_argument. Errors: the runtime cannot start (Errc::io_error).
  static Result<std::unique_ptr<RegistryWatcher>> start(std::shared_ptr<rt::Runtime> runtime, Publisher& publisher,
                                                        std::unique_ptr<detail::Driver> driver,
                                                        WatchOptions options, PublishCallback on_publish = {},
                                                        ErrorCallback on_error = {}) {
    const std::string described = driver->describe();
    if (auto ok = check_initial(options, described); !ok) return ok.error();
    if (runtime->loop().in_loop() && options.initial == InitialFetch::wait) {
      if (options.strong_dependency)
        return Error(Errc::invalid_argument, "source \"" + described +
                                                 "\": strong_dependency needs a start that waits, which the "
                                                 "runtime's own thread cannot do");
      options.initial = InitialFetch::background;
    }
    std::unique_ptr<RegistryWatcher> w(new RegistryWatcher(std::move(runtime), publisher, std::move(driver),
                                                           std::move(options), std::move(on_publish),
                                                           std::move(on_error)));
    if (w->core_.options().initial == InitialFetch::background) {
      w->core_.load_fallback();
      w->first_done_ = true;
      w->loop().post([p = w.get(), alive = w->alive_] {
        if (*alive) p->step();
      });
      return w;
    }
    // Wait for the first round's end on this thread; the loop runs it.
    auto first = std::make_shared<FirstRound>();
    w->first_ = first;
    w->loop().post([p = w.get(), alive = w->alive_] {
      if (*alive) p->step();
    });
    std::unique_lock<std::mutex> lock(first->mu);
    first->cv.wait(lock, [&] { return first->end.has_value(); });
    if (first->end->kind == detail::RoundEnd::Kind::failed && w->core_.options().strong_dependency)
      return first->end->error->with_context(std::string(w->driver_->first_round()) +
                                             " failed and strong_dependency is set");
    return w;
  }

  ~RegistryWatcher() { stop(); }
  RegistryWatcher(const RegistryWatcher&) = delete;
  RegistryWatcher& operator=(const RegistryWatcher&) = delete;

  /// Ends the rounds: aborts the request or stream in flight and cancels the timer.
  /// Returns within milliseconds whatever the wait; no callback runs after it returns
  /// (from a callback: none after that callback). Idempotent. The set stays published.
  void stop() noexcept {
    if (stopped_.exchange(true)) return;
    try {
      loop().run_sync([this] {
        *alive_ = false;
        loop().cancel(timer_);
        timer_ = 0;
        driver_->abort();
      });
    } catch (...) {
    }
  }

  WatcherStatus status() const { return core_.status(); }
  const detail::Driver& driver() const noexcept { return *driver_; }

private:
  struct FirstRound {
    std::mutex mu;
    std::condition_variable cv;
    std::optional<detail::RoundEnd> end;
  };

  RegistryWatcher(std::shared_ptr<rt::Runtime> runtime, Publisher& publisher, std::unique_ptr<detail::Driver> driver,
                  WatchOptions options, PublishCallback on_publish, ErrorCallback on_error)
      : runtime_(std::move(runtime)), driver_(std::move(driver)),
        core_(publisher, driver_->describe(), std::move(options), std::move(on_publish), std::move(on_error)),
        bucket_(core_.options().min_interval, core_.options().burst) {}

  rt::Loop& loop() const noexcept { return runtime_->loop(); }

  // The next round, once the token bucket allows it. Loop thread.
  void step() {
    timer_ = 0;
    if (!*alive_) return;
    if (auto pause = bucket_.take(); pause.count() > 0) {
      timer_ = loop().after(pause, [this, alive = alive_] {
        if (*alive) begin_round();
      });
      return;
    }
    begin_round();
  }

  void begin_round() {
    timer_ = 0;
    driver_->begin(core_, [this, alive = alive_](detail::RoundEnd end) {
      if (*alive) ended(std::move(end));
    });
  }

  void schedule(std::chrono::milliseconds delay) {
    auto run = [this, alive = alive_] {
      if (*alive) step();
    };
    if (delay.count() <= 0)
      loop().post(std::move(run));
    else
      timer_ = loop().after(delay, std::move(run));
  }

  void ended(detail::RoundEnd end) {
    using Kind = detail::RoundEnd::Kind;
    if (!first_done_) {
      first_done_ = true;
      std::chrono::milliseconds delay = end.delay;
      bool stop_now = false;
      if (end.kind == Kind::failed) {
        if (core_.options().strong_dependency) {
          stop_now = true; // start() returns the error and destroys this watcher
        } else {
          auto d = core_.first_fetch_failed(*end.error, driver_->first_round(), end.back_off);
          delay = d ? *d : std::chrono::milliseconds(0);
        }
      }
      if (auto first = std::exchange(first_, nullptr)) {
        std::lock_guard<std::mutex> lock(first->mu);
        first->end = std::move(end);
        first->cv.notify_all();
      }
      if (!stop_now) schedule(delay);
      return;
    }
    if (end.kind == Kind::failed) {
      auto delay = end.back_off ? core_.failed(*end.error) : std::chrono::milliseconds(0);
      if (!end.back_off) core_.report(*end.error);
      schedule(delay);
      return;
    }
    schedule(end.delay);
  }

  std::shared_ptr<rt::Runtime> runtime_;
  std::unique_ptr<detail::Driver> driver_;
  detail::WatcherCore core_;
  TokenBucket bucket_;                                          // loop thread
  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);  // loop thread after start
  rt::TimerId timer_ = 0;                                       // loop thread
  bool first_done_ = false;                                     // loop thread after start
  std::shared_ptr<FirstRound> first_;                           // loop thread after start
  std::atomic<bool> stopped_{false};
};

DYNUP_NAMESPACE_END
