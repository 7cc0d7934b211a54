// random: weighted random choice in O(1) per pick, with Vose's alias method.
//
// The table splits the tier into m buckets of equal probability; bucket k holds member k
// with probability threshold[k] / total and its alias otherwise. Built exactly in integers,
// so the pick distribution is the weights' (up to the generator's quality), not a float
// rounding of them. Equal weights skip the table: a uniform index is the same thing.
#pragma once

#include <dynup/balance/options.hpp>
#include <dynup/balance/picker.hpp>
#include <dynup/detail/random.hpp>
#include <dynup/version.hpp>

#include <cstdint>
#include <memory>
#include <vector>

#ifndef DYNUP_RANDOM_RESAMPLES
// Fresh draws a retry spends on tried peers before scanning the tier.
#define DYNUP_RANDOM_RESAMPLES 4
#endif

DYNUP_NAMESPACE_BEGIN
namespace detail {

/// An alias table over members 0..m-1. Bucket k keeps k when a uniform draw in
/// [0, total) is below `entries[k].threshold`, else yields `entries[k].alias`. Empty when
/// all weights are equal.
struct AliasBuckets {
  struct Entry {
    std::uint64_t threshold = 0;
    std::uint32_t alias = 0;
  };
  std::vector<Entry> entries;
  std::uint64_t total = 0; ///< sum of the weights
};

/// Vose's alias method in exact integer arithmetic: member i's scaled weight w_i·m is
/// compared with the bucket capacity sum(w); every bucket ends up holding exactly
/// sum(w) units. O(m) time and memory; needs sum(w)·m < 2^64 (weights ≤ 2^32, m ≤ 2^31).
inline AliasBuckets build_alias_buckets(const std::vector<std::uint32_t>& w) {
  AliasBuckets t;
  const std::size_t m = w.size();
  if (m == 0) return t;
  bool equal = true;
  for (std::uint32_t x : w) {
    t.total += x;
    equal = equal && x == w[0];
  }
  if (equal) return t;
  std::vector<std::uint64_t> scaled(m);
  std::vector<std::uint32_t> small, large;
  small.reserve(m);
  large.reserve(m);
  for (std::size_t i = 0; i < m; ++i) {
    scaled[i] = std::uint64_t{w[i]} * m;
    (scaled[i] < t.total ? small : large).push_back(static_cast<std::uint32_t>(i));
  }
  t.entries.resize(m);
  while (!small.empty() && !large.empty()) {
    std::uint32_t s = small.back();
    small.pop_back();
    std::uint32_t l = large.back();
    t.entries[s] = {scaled[s], l};
    scaled[l] -= t.total - scaled[s];
    if (scaled[l] < t.total) {
      large.pop_back();
      small.push_back(l);
    }
  }
  // The remaining scaled weights equal the capacity exactly (integer arithmetic keeps
  // sum(remaining) = capacity × count): full buckets.
  for (std::uint32_t i : large) t.entries[i] = {t.total, i};
  for (std::uint32_t i : small) t.entries[i] = {t.total, i};
  return t;
}

/// A picker base that can choose a member of a tier at random by weight: what the random
/// policy does, and what hash policies do for a request without a key.
class WeightedRandomBase : public PickerBase {
protected:
  WeightedRandomBase(const Snapshot& set, const HealthView& health, StatsRegistry& stats)
      : PickerBase(set, health, stats) {
    for (int t = 0; t < 2; ++t) {
      std::vector<std::uint32_t> w;
      w.reserve(tiers_[t].size());
      for (std::uint32_t i : tiers_[t]) w.push_back(weight_[i]);
      table_[t] = build_alias_buckets(w);
    }
  }

  /// A usable member of tier `t` by weight: up to DYNUP_RANDOM_RESAMPLES more draws past
  /// tried peers, then a scan from a random member. Precondition: the tier is not empty.
  Selection pick_random(int t, const PickContext& ctx) const noexcept {
    for (int k = 0; k <= DYNUP_RANDOM_RESAMPLES; ++k) {
      std::uint32_t i = draw(t);
      if (!is_tried(i, ctx)) return select(i);
    }
    return scan(t, static_cast<std::size_t>(thread_random_below(tiers_[t].size())), ctx);
  }

private:
  std::uint32_t draw(int t) const noexcept {
    const auto& members = tiers_[t];
    const auto& table = table_[t];
    auto k = static_cast<std::size_t>(thread_random_below(members.size()));
    if (table.entries.empty()) return members[k];
    const auto& e = table.entries[k];
    return thread_random_below(table.total) < e.threshold ? members[k] : members[e.alias];
  }

  AliasBuckets table_[2];
};

} // namespace detail

/// Weighted random: each pick chooses peer i with probability weight_i / sum(weight)
/// among the usable peers of the first tier that has one (primaries, then backups).
/// Each thread draws from its own generator. pick: O(1) (two random draws) unless a retry
/// meets tried peers: then up to DYNUP_RANDOM_RESAMPLES more draws, and if all of those
/// were tried, an O(n) scan from a random start that ignores weights. noexcept, no
/// allocation, no lock. Build: O(n). No options.
class RandomPolicy final : public Policy {
public:
  /// Options: none (null or {}).
  static Result<std::unique_ptr<Policy>> create(const nlohmann::json& options) {
    detail::OptionReader r("random", options, {});
    if (r.error()) return *r.error();
    return std::unique_ptr<Policy>(new RandomPolicy());
  }

  const char* name() const noexcept override { return "random"; }

  std::shared_ptr<const Picker> build(const Snapshot& set, const HealthView& health) override {
    return std::make_shared<PickerImpl>(set, health, stats_);
  }
  using Policy::build;

private:
  class PickerImpl final : public detail::WeightedRandomBase {
  public:
    PickerImpl(const Snapshot& set, const HealthView& health, StatsRegistry& stats)
        : WeightedRandomBase(set, health, stats) {}

    Selection pick(const PickContext& ctx) const noexcept override {
      for (int t = 0; t < 2; ++t) {
        if (tiers_[t].empty()) continue;
        Selection s = pick_random(t, ctx);
        if (s) return s;
      }
      return none(ctx);
    }
  };
};

DYNUP_NAMESPACE_END
