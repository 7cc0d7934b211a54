// Retry pacing for watchers: capped exponential backoff with full jitter, and a token
// bucket that keeps a loop whose index changes constantly from spinning.
#pragma once

#include <dynup/detail/random.hpp>
#include <dynup/version.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>

DYNUP_NAMESPACE_BEGIN

/// Capped exponential backoff with full jitter (delay uniform in [0, min(cap, base·2^n)]),
/// so many watchers failing together do not retry in step. Not thread-safe.
class Backoff {
public:
  Backoff(std::chrono::milliseconds base, std::chrono::milliseconds cap) : base_(base), cap_(cap) {}

  /// The delay before the next attempt after one more failure.
  std::chrono::milliseconds next() noexcept {
    std::int64_t ceiling = base_.count();
    for (unsigned i = 0; i < failures_ && ceiling < cap_.count(); ++i) ceiling *= 2;
    ceiling = std::min<std::int64_t>(ceiling, cap_.count());
    if (failures_ < 63) ++failures_;
    current_ = std::chrono::milliseconds(
        static_cast<std::int64_t>(detail::thread_random_below(static_cast<std::uint64_t>(ceiling) + 1)));
    return current_;
  }
  /// After a success: the next failure starts from `base` again.
  void reset() noexcept {
    failures_ = 0;
    current_ = std::chrono::milliseconds(0);
  }
  std::chrono::milliseconds current() const noexcept { return current_; }
  unsigned failures() const noexcept { return failures_; }

private:
  std::chrono::milliseconds base_, cap_;
  std::chrono::milliseconds current_{0};
  unsigned failures_ = 0;
};

/// Token bucket: holds up to `burst` tokens and gains one every `interval`; each request
/// takes one, waiting for it when none is left. Not thread-safe.
class TokenBucket {
public:
  using clock = std::chrono::steady_clock;
  TokenBucket(std::chrono::milliseconds interval, unsigned burst, clock::time_point now = clock::now())
      : interval_(std::max<std::int64_t>(interval.count(), 0)), burst_(burst), tokens_(burst), last_(now) {}

  /// Takes a token and returns how long to wait for it (0 when one was there).
  std::chrono::milliseconds take(clock::time_point now = clock::now()) noexcept {
    if (interval_ == 0) return std::chrono::milliseconds(0);
    double gained = std::chrono::duration<double, std::milli>(now - last_).count() / static_cast<double>(interval_);
    last_ = now;
    tokens_ = std::min(static_cast<double>(burst_), tokens_ + gained) - 1;
    if (tokens_ >= 0) return std::chrono::milliseconds(0);
    // A negative balance is a reservation: the caller sleeps until it is paid back.
    return std::chrono::milliseconds(static_cast<std::int64_t>(std::ceil(-tokens_ * static_cast<double>(interval_))));
  }

private:
  std::int64_t interval_; ///< milliseconds
  unsigned burst_;
  double tokens_;
  clock::time_point last_;
};

DYNUP_NAMESPACE_END
