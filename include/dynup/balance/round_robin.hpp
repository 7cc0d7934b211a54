// round_robin: nginx's smooth weighted round robin, as a precomputed schedule.
//
// nginx (ngx_http_upstream_get_peer) adds each peer's weight to its current value, picks
// the largest (the first one on ties) and subtracts the total from it. The sequence is
// periodic with period sum(weight)/gcd, so the whole period is computed once per build
// and a pick reads the next entry: O(1) instead of nginx's O(n). Like nginx's per-worker
// state, the position is per thread: each thread walks the same sequence from its own
// start (random by default, or pinned with the "start" option), and a thread's position
// survives rebuilds.
//
// A schedule cannot follow what nginx does when a try fails: nginx's retry takes its
// turn out of the same weights, and a failure lowers the peer's effective weight. With
// "sequence": "nginx" the picker runs nginx's own algorithm on per-peer state instead:
// the same sequence as nginx with retries and failures, at nginx's O(n) per pick, exact
// when one thread picks (an nginx worker; the nginx module's default).
#pragma once

#include <dynup/balance/options.hpp>
#include <dynup/balance/picker.hpp>
#include <dynup/detail/random.hpp>
#include <dynup/detail/slots.hpp>
#include <dynup/version.hpp>

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <numeric>
#include <queue>
#include <vector>

#ifndef DYNUP_RR_MAX_SCHEDULE
// Longest schedule (entries of 4 bytes) built exactly; longer periods are scaled down.
#define DYNUP_RR_MAX_SCHEDULE (1u << 20)
#endif
#ifndef DYNUP_RR_MAX_BUILD_STEPS
// Exact simulation costs period × distinct weights; above this the stride builder is used.
#define DYNUP_RR_MAX_BUILD_STEPS (1u << 25)
#endif
#ifndef DYNUP_RR_THREAD_SLOTS
// Round-robin policies that keep a per-thread position without allocating; policies
// beyond this share one atomic position per policy instead.
#define DYNUP_RR_THREAD_SLOTS 256
#endif

DYNUP_NAMESPACE_BEGIN
namespace detail {

struct RrPosition {
  std::uint64_t owner = 0;
  std::uint64_t pos[2] = {0, 0};
};

inline RrPosition* rr_positions() noexcept {
  static thread_local RrPosition slots[DYNUP_RR_THREAD_SLOTS];
  return slots;
}

inline SlotNumbers& rr_slots() {
  // Never destroyed: objects in static storage (an embedder's global policy or
  // publisher) may release their number after other statics are gone.
  static SlotNumbers* numbers = new SlotNumbers;
  return *numbers;
}

/// One period of a weighted schedule over members 0..m-1. `exact` tells whether it is
/// nginx's smooth weighted round robin sequence (true unless the period had to be scaled
/// down or the stride builder was used). Empty when all weights are equal: the caller
/// then cycles through members directly.
struct RrSchedule {
  std::vector<std::uint32_t> order;
  bool exact = true;
};

/// Builds the schedule. O(period × distinct weights) for the exact sequence, else
/// O(period × log distinct weights).
inline RrSchedule build_rr_schedule(std::vector<std::uint64_t> w) {
  RrSchedule out;
  if (w.empty()) return out;
  std::uint64_t g = 0;
  for (auto x : w) g = std::gcd(g, x);
  bool equal = true;
  for (auto& x : w) {
    x /= g;
    equal = equal && x == w[0];
  }
  if (equal) return out;
  std::uint64_t total = std::accumulate(w.begin(), w.end(), std::uint64_t{0});
  if (total > DYNUP_RR_MAX_SCHEDULE) {
    // Keep the ratios as well as integers allow; no peer drops to zero.
    out.exact = false;
    for (auto& x : w) x = std::max<std::uint64_t>(1, x * DYNUP_RR_MAX_SCHEDULE / total);
    g = 0;
    for (auto x : w) g = std::gcd(g, x);
    for (auto& x : w) x /= g;
    total = std::accumulate(w.begin(), w.end(), std::uint64_t{0});
  }

  // Peers of equal weight are picked in member order within their group, so the choice
  // each step is among one candidate per distinct weight.
  std::map<std::uint64_t, std::vector<std::uint32_t>> by_weight;
  for (std::uint32_t i = 0; i < w.size(); ++i) by_weight[w[i]].push_back(i);
  struct Group {
    std::uint64_t weight;
    std::vector<std::uint32_t> members;
    std::uint64_t picks = 0;
  };
  std::vector<Group> groups;
  for (auto& [weight, members] : by_weight) groups.push_back({weight, std::move(members), 0});
  out.order.resize(total);

  if (out.exact && total * groups.size() <= DYNUP_RR_MAX_BUILD_STEPS) {
    // Peer i's current value before step k's choice is k*w_i - total*picks_i; nginx
    // picks the largest, the lowest position on ties.
    const auto t = static_cast<std::int64_t>(total);
    for (std::int64_t k = 1; k <= t; ++k) {
      std::size_t best = 0;
      std::int64_t best_v = 0;
      std::uint32_t best_member = 0;
      for (std::size_t gi = 0; gi < groups.size(); ++gi) {
        const Group& gr = groups[gi];
        std::size_t m = gr.members.size();
        std::uint32_t cand = gr.members[gr.picks % m];
        std::int64_t v = k * static_cast<std::int64_t>(gr.weight) - t * static_cast<std::int64_t>(gr.picks / m);
        if (gi == 0 || v > best_v || (v == best_v && cand < best_member)) {
          best = gi;
          best_v = v;
          best_member = cand;
        }
      }
      out.order[static_cast<std::size_t>(k - 1)] = best_member;
      ++groups[best].picks;
    }
    return out;
  }

  // Stride scheduling: each group's j-th pick is due at (j + 1/2) * total / weight; due
  // times are compared exactly by cross-multiplication. Same counts per period, smooth,
  // but not nginx's exact order.
  out.exact = false;
  auto later = [&](std::size_t a, std::size_t b) {
    const Group& x = groups[a];
    const Group& y = groups[b];
    std::uint64_t ja = x.picks / x.members.size(), jb = y.picks / y.members.size();
    detail::uint128 da = static_cast<detail::uint128>(2 * ja + 1) * y.weight;
    detail::uint128 db = static_cast<detail::uint128>(2 * jb + 1) * x.weight;
    if (da != db) return da > db;
    return x.members[x.picks % x.members.size()] > y.members[y.picks % y.members.size()];
  };
  std::priority_queue<std::size_t, std::vector<std::size_t>, decltype(later)> heap(later);
  for (std::size_t gi = 0; gi < groups.size(); ++gi) heap.push(gi);
  for (std::uint64_t k = 0; k < total; ++k) {
    std::size_t gi = heap.top();
    heap.pop();
    Group& gr = groups[gi];
    out.order[k] = gr.members[gr.picks % gr.members.size()];
    ++gr.picks;
    heap.push(gi);
  }
  return out;
}

} // namespace detail

/// Smooth weighted round robin, identical to nginx's sequence for the same weights with
/// peers in id order (when the period fits; see build_rr_schedule). pick: O(1) unless
/// retries meet tried peers; no allocation, no lock. Build: O(n + period × distinct
/// weights), period ≤ DYNUP_RR_MAX_SCHEDULE.
class RoundRobinPolicy final : public Policy {
public:
  /// `start`: -1 for a random start per thread, else every thread's first position.
  /// `nginx`: nginx's own algorithm instead of the schedule (see the top of this file).
  explicit RoundRobinPolicy(std::int64_t start = -1, bool nginx = false)
      : start_(start), nginx_(nginx), generation_(detail::next_generation()), slot_(detail::rr_slots().acquire()) {}
  ~RoundRobinPolicy() override { detail::rr_slots().release(slot_); }

  /// Options: {"start": "random" | integer >= 0, "sequence": "schedule" | "nginx"}.
  static Result<std::unique_ptr<Policy>> create(const nlohmann::json& options) {
    detail::OptionReader r("round_robin", options, {"start", "sequence"});
    bool nginx = false;
    if (const nlohmann::json* v = r.raw("sequence")) {
      if (v->is_string() && (v->get<std::string>() == "nginx" || v->get<std::string>() == "schedule"))
        nginx = v->get<std::string>() == "nginx";
      else
        r.fail("option \"sequence\" must be \"schedule\" or \"nginx\", got " + v->dump());
    }
    std::int64_t start = -1;
    if (const nlohmann::json* v = r.raw("start")) {
      if (v->is_number_integer())
        start = static_cast<std::int64_t>(r.integer("start", 0, 0, std::uint64_t{1} << 62));
      else if (!(v->is_string() && v->get<std::string>() == "random"))
        r.fail("option \"start\" must be \"random\" or an integer >= 0, got " + v->dump());
    }
    if (r.error()) return *r.error();
    return std::unique_ptr<Policy>(new RoundRobinPolicy(start, nginx));
  }

  const char* name() const noexcept override { return "round_robin"; }

  std::shared_ptr<const Picker> build(const Snapshot& set, const HealthView& health) override {
    return std::make_shared<PickerImpl>(set, health, stats_, *this);
  }
  using Policy::build;

private:
  // Positions shared by all threads, used only by the rare policy beyond the
  // thread-local slots; held by pickers too, which may outlive the policy.
  struct SharedPosition {
    std::atomic<std::uint64_t> pos[2] = {{0}, {0}};
  };

  class PickerImpl final : public detail::PickerBase {
  public:
    PickerImpl(const Snapshot& set, const HealthView& health, StatsRegistry& stats, RoundRobinPolicy& policy)
        : PickerBase(set, health, stats), start_(policy.start_), nginx_(policy.nginx_),
          generation_(policy.generation_), slot_(policy.slot_), shared_(policy.shared_) {
      for (int t = 0; t < 2 && !nginx_; ++t) {
        std::vector<std::uint64_t> w;
        for (std::uint32_t i : tiers_[t]) w.push_back(weight_[i]);
        auto s = detail::build_rr_schedule(std::move(w));
        schedule_[t] = std::move(s.order);
        exact_ = exact_ && s.exact;
      }
    }

    Selection pick(const PickContext& ctx) const noexcept override {
      for (int t = 0; t < 2; ++t) {
        if (tiers_[t].empty()) continue;
        Selection s = nginx_ ? nginx_rr(t, ctx) : pick_tier(t, ctx);
        if (s) return s;
      }
      return none(ctx);
    }

    void on_failed(const Selection& s) const noexcept override {
      if (nginx_) nginx_rr_failed(s);
    }

    /// Whether the schedule is nginx's exact sequence (see build_rr_schedule).
    bool exact() const noexcept { return exact_; }

  private:
    // This thread's next position in tier `t`'s sequence of length `len`, in [0, len).
    std::size_t next_position(int t, std::size_t len) const noexcept {
      if (slot_ >= DYNUP_RR_THREAD_SLOTS)
        return static_cast<std::size_t>(shared_->pos[t].fetch_add(1, std::memory_order_relaxed) % len);
      detail::RrPosition& p = detail::rr_positions()[slot_];
      if (p.owner != generation_) {
        p.owner = generation_;
        for (auto& x : p.pos)
          x = start_ >= 0 ? static_cast<std::uint64_t>(start_) : detail::thread_random() >> 1;
      }
      // Kept reduced, so the common pick needs no division; a rebuild to a shorter
      // sequence (or a fresh start) costs one modulo.
      std::uint64_t& pos = p.pos[t];
      if (pos >= len) pos %= len;
      std::size_t at = static_cast<std::size_t>(pos);
      pos = pos + 1 == len ? 0 : pos + 1;
      return at;
    }

    Selection pick_tier(int t, const PickContext& ctx) const noexcept {
      const auto& members = tiers_[t];
      const auto& order = schedule_[t];
      std::size_t len = order.empty() ? members.size() : order.size();
      std::size_t at = next_position(t, len);
      std::uint32_t first = order.empty() ? members[at] : members[order[at]];
      if (!is_tried(first, ctx)) return select(first);
      // A retry walks on along the sequence past tried peers, as nginx skips them; a
      // bounded walk, then a scan, so many tried peers cannot make it O(period).
      std::size_t limit = std::min<std::size_t>(len, 2 * members.size() + 8);
      for (std::size_t k = 1; k < limit; ++k) {
        if (++at == len) at = 0;
        std::uint32_t i = order.empty() ? members[at] : members[order[at]];
        if (!is_tried(i, ctx)) return select(i);
      }
      return scan(t, at % members.size(), ctx);
    }

    std::vector<std::uint32_t> schedule_[2];
    bool exact_ = true;
    std::int64_t start_;
    bool nginx_;
    std::uint64_t generation_;
    std::size_t slot_;
    std::shared_ptr<SharedPosition> shared_;
  };

  std::int64_t start_;
  bool nginx_;
  std::uint64_t generation_;
  std::size_t slot_;
  std::shared_ptr<SharedPosition> shared_ = std::make_shared<SharedPosition>();
};

DYNUP_NAMESPACE_END
