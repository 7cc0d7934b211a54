// least_request: power of d choices on in-flight requests per unit of weight (Envoy's
// LEAST_REQUEST, brpc's P2C). Comparing a couple of random peers instead of all of them
// avoids every thread herding onto the one least loaded peer it saw.
#pragma once

#include <dynup/balance/options.hpp>
#include <dynup/balance/p2c.hpp>
#include <dynup/balance/picker.hpp>
#include <dynup/version.hpp>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <memory>

DYNUP_NAMESPACE_BEGIN

/// Draws `choice_count` distinct usable peers uniformly at random from the first tier that
/// has one (primaries, then backups) and picks the one with the smallest
/// (in_flight + 1) / weight; ties go to the earlier draw, i.e. at random. choice_count 1
/// is plain uniform random (weights ignored); a tier no larger than choice_count is
/// compared whole. In-flight counts come from Picker::on_start/on_finish and are kept
/// across rebuilds. pick: O(choice_count) unless a retry meets many tried peers (then
/// O(n)); noexcept, no allocation, no lock. Build: O(n).
class LeastRequestPolicy final : public Policy {
public:
  /// `choice_count` is clamped to 1..detail::max_choice_count (create() rejects others).
  explicit LeastRequestPolicy(std::size_t choice_count = 2)
      : choices_(std::clamp<std::size_t>(choice_count, 1, detail::max_choice_count)) {}

  /// Options: {"choice_count": 1..16, default 2}.
  static Result<std::unique_ptr<Policy>> create(const nlohmann::json& options) {
    detail::OptionReader r("least_request", options, {"choice_count"});
    auto choices = r.integer("choice_count", 2, 1, detail::max_choice_count);
    if (r.error()) return *r.error();
    return std::unique_ptr<Policy>(new LeastRequestPolicy(static_cast<std::size_t>(choices)));
  }

  const char* name() const noexcept override { return "least_request"; }
  /// Peers compared per pick, 1..16.
  std::size_t choice_count() const noexcept { return choices_; }

  std::shared_ptr<const Picker> build(const Snapshot& set, const HealthView& health) override {
    return std::make_shared<PickerImpl>(set, health, stats_, choices_);
  }
  using Policy::build;

private:
  class PickerImpl final : public detail::PickerBase {
  public:
    PickerImpl(const Snapshot& set, const HealthView& health, StatsRegistry& stats, std::size_t choices)
        : PickerBase(set, health, stats), choices_(choices) {}

    Selection pick(const PickContext& ctx) const noexcept override {
      for (int t = 0; t < 2; ++t) {
        std::uint32_t i = detail::p2c_choose(
            members_[t], choices_, [&](const detail::TierMember& m) noexcept { return is_tried(m.index, ctx); },
            less_loaded);
        if (i != detail::no_choice) return select(i);
      }
      return none(ctx);
    }

  private:
    // Clamped so (load + 1) × weight stays below 2^63: compared in integers, no division.
    static std::uint64_t load(const detail::TierMember& m) noexcept {
      std::int64_t v = m.stats->in_flight.load(std::memory_order_relaxed);
      return static_cast<std::uint64_t>(std::clamp<std::int64_t>(v, 0, std::numeric_limits<std::int32_t>::max()));
    }
    static bool less_loaded(const detail::TierMember& a, const detail::TierMember& b) noexcept {
      return (load(a) + 1) * b.weight < (load(b) + 1) * a.weight;
    }

    std::size_t choices_;
  };

  std::size_t choices_;
};

DYNUP_NAMESPACE_END
