// ewma: peak-EWMA power of d choices, as in Finagle's PeakEwma and Linkerd's balancer.
//
// Each peer's cost is its latency EWMA times (in_flight + 1) per unit of weight. The
// EWMA decays with the time between samples (w = exp(-Δt/τ)), so it tracks the recent
// past whatever the request rate, and jumps to any sample above it ("peak"), so a peer
// that slows down sheds load at once and wins it back only gradually.
#pragma once

#include <dynup/balance/options.hpp>
#include <dynup/balance/p2c.hpp>
#include <dynup/balance/picker.hpp>
#include <dynup/version.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <utility>

#include <time.h>

DYNUP_NAMESPACE_BEGIN
namespace detail {

/// CLOCK_MONOTONIC_COARSE in nanoseconds: a few ns to read, a few ms resolution, which
/// is plenty against a decay of seconds. Read once per pick.
inline std::int64_t coarse_now_ns() noexcept {
  timespec ts{};
  ::clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
  return static_cast<std::int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

/// Folds a latency sample taken at `now_ns` into `s`: the first sample or one above the
/// current EWMA replaces it; otherwise ewma = ewma·w + sample·(1 − w), w = exp(−Δt/τ), Δt
/// the time since the previous sample (0 if the clock went backwards). Lock-free (a CAS
/// loop); concurrent samples for one peer are applied in the order they swap the stamp,
/// as if sequential. noexcept, no allocation.
inline void ewma_observe(PeerStats& s, double sample_ns, std::int64_t now_ns, double tau_ns) noexcept {
  if (!(sample_ns >= 0)) sample_ns = 0; // also NaN
  std::int64_t prev = s.ewma_stamp_ns.exchange(now_ns, std::memory_order_relaxed);
  double dt = now_ns > prev ? static_cast<double>(now_ns - prev) : 0.0;
  double w = std::exp(-dt / tau_ns);
  double cur = s.ewma_ns.load(std::memory_order_relaxed);
  double next = 0;
  do {
    next = cur < 0 || sample_ns > cur ? sample_ns : cur * w + sample_ns * (1 - w);
  } while (!s.ewma_ns.compare_exchange_weak(cur, next, std::memory_order_relaxed, std::memory_order_relaxed));
}

} // namespace detail

/// Draws `choice_count` distinct usable peers uniformly at random from the first tier that
/// has one (primaries, then backups) and picks the lowest ewma × (in_flight + 1) / weight
/// (compared by cross-multiplication); ties go to the earlier draw, i.e. at random;
/// choice_count 1 is plain uniform random. A peer without a sample yet is costed at the
/// average EWMA of the set's peers that have one (taken when the picker is built), or at
/// `default_latency_ms` when none has, so new peers are neither flooded nor starved.
/// As in Finagle, a pick sees each EWMA decayed toward zero by the time since its last
/// sample, so a peer whose one slow reply made it unpicked is retried as that ages out
/// instead of being shunned until it happens to get another request.
/// on_finish folds the latency into the peer's EWMA (connect failures carry no latency
/// and are not folded: a peer that fails fast must not look fast; ejecting it is the
/// health layer's job) and decrements in_flight. EWMA and in-flight counts are kept
/// across rebuilds. pick: O(choice_count) unless a retry meets many tried peers (then
/// O(n)); pick and on_finish are noexcept, allocation-free and lock-free. Build: O(n).
class EwmaPolicy final : public Policy {
public:
  /// Nanoseconds on a monotonic clock. Called once per pick and per on_finish; must not
  /// throw.
  using Clock = std::function<std::int64_t()>;

  /// Arguments are clamped to the ranges create() checks. `now_ns` is for tests that need
  /// a deterministic clock; empty means CLOCK_MONOTONIC_COARSE.
  explicit EwmaPolicy(std::size_t choice_count = 2, std::uint64_t decay_ms = 10000, double default_latency_ms = 30,
                      Clock now_ns = detail::coarse_now_ns)
      : choices_(std::clamp<std::size_t>(choice_count, 1, detail::max_choice_count)),
        tau_ns_(static_cast<double>(std::clamp<std::uint64_t>(decay_ms, 1, max_decay_ms)) * 1e6),
        default_ns_(std::clamp(default_latency_ms, min_default_latency_ms, max_default_latency_ms) * 1e6),
        now_ns_(now_ns ? std::move(now_ns) : Clock(detail::coarse_now_ns)) {}

  /// Options: {"choice_count": 1..16, default 2; "decay_ms": τ, 1..3600000, default 10000
  /// (Finagle's and Linkerd's 10 s); "default_latency_ms": cost of peers when none has a
  /// sample, 0.001..60000, default 30 (Linkerd's default RTT estimate)}. Only ratios of
  /// costs matter, so the default shapes the first seconds against peers measured faster
  /// or slower than it.
  static Result<std::unique_ptr<Policy>> create(const nlohmann::json& options) {
    detail::OptionReader r("ewma", options, {"choice_count", "decay_ms", "default_latency_ms"});
    auto choices = r.integer("choice_count", 2, 1, detail::max_choice_count);
    auto decay = r.integer("decay_ms", 10000, 1, max_decay_ms);
    double fallback = r.number("default_latency_ms", 30, min_default_latency_ms, max_default_latency_ms);
    if (r.error()) return *r.error();
    return std::unique_ptr<Policy>(new EwmaPolicy(static_cast<std::size_t>(choices), decay, fallback));
  }

  const char* name() const noexcept override { return "ewma"; }
  bool uses_latency() const noexcept override { return true; }

  std::shared_ptr<const Picker> build(const Snapshot& set, const HealthView& health) override {
    return std::make_shared<PickerImpl>(set, health, stats_, *this);
  }
  using Policy::build;

private:
  static constexpr std::uint64_t max_decay_ms = 3600000;
  static constexpr double min_default_latency_ms = 0.001;
  static constexpr double max_default_latency_ms = 60000;

  class PickerImpl final : public detail::PickerBase {
  public:
    PickerImpl(const Snapshot& set, const HealthView& health, StatsRegistry& stats, const EwmaPolicy& policy)
        : PickerBase(set, health, stats), choices_(policy.choices_), tau_ns_(policy.tau_ns_),
          now_ns_(policy.now_ns_) {
      double sum = 0;
      std::size_t n = 0;
      for (const PeerStats* s : stats_) {
        double e = s->ewma_ns.load(std::memory_order_relaxed);
        if (e >= 0) {
          sum += e;
          ++n;
        }
      }
      initial_ns_ = n > 0 ? sum / static_cast<double>(n) : policy.default_ns_;
    }

    Selection pick(const PickContext& ctx) const noexcept override {
      const std::int64_t now = now_ns_();
      auto cheaper = [&](const detail::TierMember& a, const detail::TierMember& b) noexcept {
        return cost(*a.stats, now) * b.weight < cost(*b.stats, now) * a.weight;
      };
      for (int t = 0; t < 2; ++t) {
        std::uint32_t i = detail::p2c_choose(
            members_[t], choices_, [&](const detail::TierMember& m) noexcept { return is_tried(m.index, ctx); },
            cheaper);
        if (i != detail::no_choice) return select(i);
      }
      return none(ctx);
    }

    void on_finish(const Selection& s, const Outcome& o) const noexcept override {
      Picker::on_finish(s, o);
      if (s.stats == nullptr || o.connect_failure) return;
      detail::ewma_observe(*s.stats, static_cast<double>(o.latency.count()), now_ns_(), tau_ns_);
    }

  private:
    // At least 1 ns, so a peer reporting zero latency still pays for its in-flight load.
    double cost(const PeerStats& s, std::int64_t now) const noexcept {
      double e = s.ewma_ns.load(std::memory_order_relaxed);
      if (e < 0) {
        e = initial_ns_;
      } else {
        // Decay toward zero since the last sample; skipped while that is recent
        // (under τ/16 the factor is above 0.94), which keeps exp() off most picks.
        double age = static_cast<double>(now - s.ewma_stamp_ns.load(std::memory_order_relaxed));
        if (age > tau_ns_ / 16) e *= std::exp(-age / tau_ns_);
      }
      double load = static_cast<double>(std::max<std::int64_t>(s.in_flight.load(std::memory_order_relaxed), 0));
      return std::max(e, 1.0) * (load + 1);
    }

    std::size_t choices_;
    double tau_ns_;
    Clock now_ns_;
    double initial_ns_ = 0;
  };

  std::size_t choices_;
  double tau_ns_;
  double default_ns_;
  Clock now_ns_;
};

DYNUP_NAMESPACE_END
