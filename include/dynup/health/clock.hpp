// Clock: where the health layer reads the time, so tests can drive it by hand.
#pragma once

#include <dynup/version.hpp>

#include <atomic>
#include <chrono>

DYNUP_NAMESPACE_BEGIN

/// A monotonic time source. Implementations must be safe to call from any thread.
class Clock {
public:
  using time_point = std::chrono::steady_clock::time_point;
  using duration = std::chrono::steady_clock::duration;

  virtual ~Clock() = default;
  /// The current time; never goes backwards for a real clock. noexcept, no allocation.
  virtual time_point now() const noexcept = 0;
};

/// std::chrono::steady_clock.
class SteadyClock final : public Clock {
public:
  time_point now() const noexcept override { return std::chrono::steady_clock::now(); }
};

/// The process-wide SteadyClock. Never destroyed, so objects in static storage may
/// keep using it during exit.
inline const SteadyClock& steady_clock() noexcept {
  static const SteadyClock* clock = new SteadyClock;
  return *clock;
}

/// A clock that moves only when told to: deterministic time for tests. Thread-safe: the
/// time is one atomic, so `advance` on one thread and `now` on others need no lock.
class ManualClock final : public Clock {
public:
  /// Starts at `start` (by default one hour after the steady clock's epoch, so that
  /// subtracting a few seconds from now() stays after the epoch).
  explicit ManualClock(time_point start = time_point(std::chrono::hours(1)))
      : rep_(start.time_since_epoch().count()) {}

  time_point now() const noexcept override { return time_point(duration(rep_.load(std::memory_order_acquire))); }

  /// Moves the time forward (or back, for a negative `d`) by `d`.
  template <class Rep, class Period> void advance(std::chrono::duration<Rep, Period> d) noexcept {
    rep_.fetch_add(std::chrono::duration_cast<duration>(d).count(), std::memory_order_acq_rel);
  }

  /// Sets the time to `t`.
  void set(time_point t) noexcept { rep_.store(t.time_since_epoch().count(), std::memory_order_release); }

private:
  std::atomic<duration::rep> rep_;
};

DYNUP_NAMESPACE_END
