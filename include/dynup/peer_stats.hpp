// PeerStats: the one mutable cache line per peer that the request path writes, and the
// registry that keeps it per peer id across rebuilds.
#pragma once

#include <dynup/peer_set.hpp>
#include <dynup/version.hpp>

#include <atomic>
#include <cstdint>
#include <functional>
#include <iterator>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

DYNUP_NAMESPACE_BEGIN

/// Mutable per-peer state shared by every picker built for the same peer id, so a peer
/// that stays across an update keeps its counters. One cache line each: request threads
/// updating two peers never write the same line, and everything a pick + report reads
/// for its peer is on this line.
struct alignas(64) PeerStats {
  std::atomic<std::int64_t> in_flight{0};
  std::atomic<double> ewma_ns{-1.0};          ///< peak EWMA latency; < 0 before any sample
  std::atomic<std::int64_t> ewma_stamp_ns{0}; ///< steady-clock time of the last sample
  /// Non-zero while the peer's HealthTracker state holds a failure counter: the word a
  /// successful report reads to know it has nothing to reset. Written by the tracker
  /// (HealthTracker::stats_of hands out the PeerStats embedded in its PeerHealth); stays
  /// 0 in stats that no tracker owns.
  std::atomic<std::uint32_t> health_pending{0};
  /// nginx's passive state that a pick reads (HealthTracker writes it; see
  /// PassiveGate): failures counted, and when the peer was last failed or let through
  /// after fail_timeout (steady-clock nanoseconds).
  std::atomic<std::uint32_t> fails{0};
  std::atomic<std::int64_t> checked_ns{0};
  /// nginx's smooth weighted round robin state (round_robin with "sequence": "nginx"):
  /// current weight, and effective weight (-1 until first used: the configured weight).
  std::atomic<std::int64_t> rr_current{0};
  std::atomic<std::int64_t> rr_effective{-1};
};
static_assert(sizeof(PeerStats) == 64, "PeerStats is one cache line");

/// Per-peer stats keyed by id, owned by one Policy. `attach` is called by the thread
/// that builds pickers (never concurrently with itself); the PeerStats it hands out stay
/// valid while any picker holds them.
class StatsRegistry {
public:
  /// Where the stats of a new id come from (the Upstream hands out the ones inside its
  /// health state, so both share one line); null or returning null: a fresh PeerStats.
  using Provider = std::function<std::shared_ptr<PeerStats>(const Peer&)>;

  /// Sets the provider for ids not seen yet. Before the first attach.
  void set_provider(Provider provider) { provider_ = std::move(provider); }

  /// Stats for each peer of `set`, in set order: existing entries for ids seen before,
  /// new ones for new ids; ids no longer present are forgotten. O(n), allocates.
  std::vector<std::shared_ptr<PeerStats>> attach(const PeerSet& set) {
    ++round_;
    std::vector<std::shared_ptr<PeerStats>> out;
    out.reserve(set.size());
    for (const Peer& p : set) {
      auto it = by_id_.find(p.id);
      if (it == by_id_.end()) {
        std::shared_ptr<PeerStats> made = provider_ ? provider_(p) : nullptr;
        if (!made) made = std::make_shared<PeerStats>();
        it = by_id_.emplace(p.id, Entry{std::move(made), 0}).first;
      }
      it->second.seen = round_;
      out.push_back(it->second.stats);
    }
    if (by_id_.size() != set.size()) {
      for (auto it = by_id_.begin(); it != by_id_.end();)
        it = it->second.seen == round_ ? std::next(it) : by_id_.erase(it);
    }
    return out;
  }
  std::size_t size() const noexcept { return by_id_.size(); }

private:
  // Updated in place: an unchanged peer costs one lookup, no string copy or allocation.
  struct Entry {
    std::shared_ptr<PeerStats> stats;
    std::uint64_t seen;
  };
  std::unordered_map<std::string, Entry> by_id_;
  std::uint64_t round_ = 0;
  Provider provider_;
};

DYNUP_NAMESPACE_END
