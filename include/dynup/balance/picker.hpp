// The policy contract: a Policy builds an immutable Picker per published version (off
// the request path); Picker::pick is noexcept, allocation-free and lock-free.
#pragma once

#include <dynup/peer_stats.hpp>
#include <dynup/detail/hash.hpp>
#include <dynup/health/view.hpp>
#include <dynup/peer_set.hpp>
#include <dynup/publisher.hpp>
#include <dynup/version.hpp>

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <iterator>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

DYNUP_NAMESPACE_BEGIN

/// Why a pick found no peer.
enum class PickError : std::uint8_t {
  none,            ///< a peer was picked
  no_peers,        ///< the set is empty
  all_unavailable, ///< every peer is down (health, ejection); none was tried
  all_tried,       ///< every available peer was already tried for this request
};

constexpr const char* to_string(PickError e) noexcept {
  switch (e) {
  case PickError::none: return "none";
  case PickError::no_peers: return "no peers";
  case PickError::all_unavailable: return "all peers unavailable";
  case PickError::all_tried: return "all available peers already tried";
  }
  return "unknown";
}

/// The peers already tried for one request (nginx `proxy_next_upstream`), by id hash so
/// it stays meaningful across a version change between tries. Holds 64 peers without
/// allocating; more spill to the heap. Not thread-safe: one per request.
class TriedPeers {
public:
  static constexpr std::size_t inline_capacity = 64;

  void add(std::uint64_t id_hash) {
    if (contains(id_hash)) return;
    if (n_ < inline_capacity)
      inline_[n_] = id_hash;
    else
      overflow_.push_back(id_hash);
    ++n_;
  }
  bool contains(std::uint64_t id_hash) const noexcept {
    std::size_t k = n_ < inline_capacity ? n_ : inline_capacity;
    for (std::size_t i = 0; i < k; ++i)
      if (inline_[i] == id_hash) return true;
    for (std::uint64_t h : overflow_)
      if (h == id_hash) return true;
    return false;
  }
  std::size_t size() const noexcept { return n_; }
  bool empty() const noexcept { return n_ == 0; }
  void clear() noexcept {
    n_ = 0;
    overflow_.clear();
  }

private:
  std::array<std::uint64_t, inline_capacity> inline_{};
  std::size_t n_ = 0;
  std::vector<std::uint64_t> overflow_;
};

/// The stable 64-bit hash of a peer id that TriedPeers and Selection carry.
inline std::uint64_t peer_id_hash(std::string_view id) noexcept {
  detail::ContentHash h;
  h.str(id);
  return h.value();
}

/// What a pick knows about the request.
struct PickContext {
  std::string_view key;               ///< hash key for ring_hash / maglev (empty: none)
  const TriedPeers* tried = nullptr;  ///< peers to skip (a retry)
  /// Pick among peers the passive gate holds out too (the panic fallback when it holds
  /// out every peer; see PassiveGate).
  bool ignore_gate = false;
};

/// A picked peer, or the reason there is none. `peer` and `stats` point into the picker
/// (and its snapshot): valid while the caller holds that picker.
struct Selection {
  const Peer* peer = nullptr;
  PeerStats* stats = nullptr;
  std::uint32_t index = 0;       ///< position in the picker's set (id order)
  std::uint64_t id_hash = 0;     ///< for TriedPeers::add on a retry
  PickError error = PickError::no_peers;
  explicit operator bool() const noexcept { return peer != nullptr; }
};

/// How a request to a picked peer ended.
struct Outcome {
  std::chrono::nanoseconds latency{0};
  int status = 0;               ///< HTTP status, 0 when none was received
  bool connect_failure = false;
  TryVerdict verdict = TryVerdict::by_status; ///< the embedder's own verdict, if any
};

/// An immutable routing table for one peer set and health view. Thread-safe: any number
/// of threads may call pick/on_start/on_finish concurrently.
class Picker {
public:
  virtual ~Picker() = default;

  /// Picks a peer, skipping unavailable and already-tried ones; primaries first, backup
  /// peers only when no primary is usable (nginx `backup`). noexcept, no allocation,
  /// no lock. Complexity is stated by each policy.
  virtual Selection pick(const PickContext& ctx) const noexcept = 0;

  /// A try of `s` failed as passive health counts failures (nginx NGX_PEER_FAILED with
  /// max_fails on). Policies that keep nginx's effective weights override it.
  virtual void on_failed(const Selection& s) const noexcept { (void)s; }

  /// A request to `s` started (counts in-flight requests for least_request and ewma).
  void on_start(const Selection& s) const noexcept {
    if (s.stats) s.stats->in_flight.fetch_add(1, std::memory_order_relaxed);
  }
  /// A request to `s` ended. Policies that learn from latency override this.
  virtual void on_finish(const Selection& s, const Outcome&) const noexcept {
    if (s.stats) s.stats->in_flight.fetch_sub(1, std::memory_order_relaxed);
  }
  /// A request to `s` was never sent (the caller gave up before connecting): undoes
  /// on_start without a latency sample or a health report.
  void on_cancel(const Selection& s) const noexcept {
    if (s.stats) s.stats->in_flight.fetch_sub(1, std::memory_order_relaxed);
  }

  /// The set this picker routes over.
  const Snapshot& set() const noexcept { return set_; }

  /// The shared stats of the peer at `index` in set(), for status pages; null when the
  /// policy keeps none or the index is out of range.
  virtual const PeerStats* stats_at(std::size_t index) const noexcept {
    (void)index;
    return nullptr;
  }

protected:
  explicit Picker(Snapshot set) : set_(std::move(set)) {}
  Snapshot set_;
};

namespace detail {

/// One available peer of a tier, packed for policies that read its load on every pick.
struct TierMember {
  PeerStats* stats;
  std::uint32_t index;  ///< position in the set
  std::uint32_t weight; ///< effective weight
};

/// Shared bookkeeping for the built-in policies: per-peer stats and id hashes, effective
/// weights, and the available peers split into tiers (0: primaries, 1: backups).
class PickerBase : public Picker {
protected:
  PickerBase(Snapshot set, const HealthView& health, StatsRegistry& registry)
      : Picker(std::move(set)), gate_(health.gate) {
    const PeerSet& s = *set_;
    stats_owner_ = registry.attach(s);
    stats_.reserve(s.size());
    id_hash_.reserve(s.size());
    weight_.reserve(s.size());
    for (std::size_t i = 0; i < s.size(); ++i) {
      stats_.push_back(stats_owner_[i].get());
      id_hash_.push_back(peer_id_hash(s[i].id));
      bool ok = i >= health.peers.size() || health.peers[i].available;
      std::uint32_t w = i < health.peers.size() ? health.peers[i].weight : s[i].weight;
      if (w < 1) w = 1;
      weight_.push_back(w);
      if (ok) {
        int t = s[i].backup ? 1 : 0;
        tiers_[t].push_back(static_cast<std::uint32_t>(i));
        members_[t].push_back({stats_[i], static_cast<std::uint32_t>(i), w});
      }
      gated_any_ = gated_any_ || (!ok && gate_.on() && health.peers[i].gated);
    }
    // nginx_rr's loop keeps the peers only the gate holds out (PeerCondition::gated).
    for (std::size_t i = 0; i < s.size() && gated_any_; ++i) {
      const bool in = i >= health.peers.size() || health.peers[i].available || health.peers[i].gated;
      if (in) rr_members_[s[i].backup ? 1 : 0].push_back({stats_[i], static_cast<std::uint32_t>(i), weight_[i]});
    }
  }

public:
  const PeerStats* stats_at(std::size_t index) const noexcept override {
    return index < stats_.size() ? stats_[index] : nullptr;
  }

protected:
  /// Whether a pick must pass over peer `i`: tried by this request, or held out by the
  /// passive gate (nginx's max_fails, decided at pick time). One relaxed load of the
  /// peer's stats line when nothing was tried.
  bool is_tried(std::uint32_t i, const PickContext& ctx) const noexcept {
    return (ctx.tried != nullptr && !ctx.tried->empty() && ctx.tried->contains(id_hash_[i])) || gated(i, ctx);
  }
  /// Whether the passive gate holds peer `i` out now. Reads the clock only for a peer
  /// with max_fails failures counted.
  bool gated(std::uint32_t i, const PickContext& ctx) const noexcept {
    if (!gate_.on() || ctx.ignore_gate) return false;
    const PeerStats& st = *stats_[i];
    if (st.fails.load(std::memory_order_relaxed) < gate_.max_fails) return false;
    return gate_.now_ns() - st.checked_ns.load(std::memory_order_relaxed) < gate_.fail_timeout_ns;
  }

  /// nginx's smooth weighted round robin over the members of `tier` that are not
  /// tried or gated, on the state in each peer's PeerStats (rr_current, rr_effective):
  /// the same sequence as nginx's ngx_http_upstream_get_peer, retries and failures
  /// included, when one thread picks (an nginx worker). O(tier size), no allocation.
  Selection nginx_rr(int tier, const PickContext& ctx) const noexcept {
    std::int64_t total = 0;
    PeerStats* best = nullptr;
    std::uint32_t best_i = 0;
    for (const TierMember& m : gated_any_ ? rr_members_[tier] : members_[tier]) {
      if (is_tried(m.index, ctx)) continue;
      PeerStats& st = *m.stats;
      std::int64_t ew = st.rr_effective.load(std::memory_order_relaxed);
      if (ew < 0 || ew > m.weight) ew = m.weight; // first use, or the weight went down
      const std::int64_t cw = st.rr_current.load(std::memory_order_relaxed) + ew;
      st.rr_current.store(cw, std::memory_order_relaxed);
      total += ew;
      st.rr_effective.store(ew < m.weight ? ew + 1 : ew, std::memory_order_relaxed);
      if (best == nullptr || cw > best->rr_current.load(std::memory_order_relaxed)) {
        best = &st;
        best_i = m.index;
      }
    }
    if (best == nullptr) return {};
    best->rr_current.store(best->rr_current.load(std::memory_order_relaxed) - total, std::memory_order_relaxed);
    return select(best_i);
  }

  /// nginx's answer to a failed try of a peer picked by nginx_rr, when max_fails is
  /// on: its effective weight drops by weight / max_fails, and climbs back by one per
  /// pick it takes part in.
  void nginx_rr_failed(const Selection& s) const noexcept {
    if (!s.stats || gate_.max_fails == 0 || s.index >= weight_.size()) return;
    std::int64_t ew = s.stats->rr_effective.load(std::memory_order_relaxed);
    if (ew < 0) ew = weight_[s.index];
    ew -= weight_[s.index] / gate_.max_fails;
    s.stats->rr_effective.store(ew < 0 ? 0 : ew, std::memory_order_relaxed);
  }

  Selection select(std::uint32_t i) const noexcept {
    Selection s;
    s.peer = &(*set_)[i];
    s.stats = stats_[i];
    s.index = i;
    s.id_hash = id_hash_[i];
    s.error = PickError::none;
    return s;
  }

  /// First untried member of `tier` at or after position `start` (wrapping). O(tier
  /// size); policies call it only when their O(1) path met tried peers.
  Selection scan(int tier, std::size_t start, const PickContext& ctx) const noexcept {
    const auto& members = tiers_[tier];
    std::size_t n = members.size();
    for (std::size_t k = 0; k < n; ++k) {
      std::uint32_t i = members[(start + k) % n];
      if (!is_tried(i, ctx)) return select(i);
    }
    return {};
  }

  /// The reason no peer could be picked: all_unavailable also when the peers not yet
  /// tried are all held out by the passive gate. O(n) only on that failure path.
  Selection none(const PickContext& ctx = {}) const noexcept {
    Selection s;
    if (set_->empty())
      s.error = PickError::no_peers;
    else if (tiers_[0].empty() && tiers_[1].empty())
      s.error = PickError::all_unavailable;
    else
      s.error = gate_held_out(ctx) ? PickError::all_unavailable : PickError::all_tried;
    return s;
  }

  /// Whether some member not tried by this request is held out by the passive gate.
  bool gate_held_out(const PickContext& ctx) const noexcept {
    if (!gate_.on() || ctx.ignore_gate) return false;
    for (int t = 0; t < 2; ++t)
      for (std::uint32_t i : tiers_[t]) {
        const bool tried = ctx.tried != nullptr && ctx.tried->contains(id_hash_[i]);
        if (!tried && gated(i, ctx)) return true;
      }
    return false;
  }

  PassiveGate gate_;
  bool gated_any_ = false;          ///< some peer is out of the tiers only by the gate
  std::vector<TierMember> rr_members_[2]; ///< members_ plus those peers, when gated_any_
  std::vector<std::shared_ptr<PeerStats>> stats_owner_;
  std::vector<PeerStats*> stats_;
  std::vector<std::uint64_t> id_hash_;
  std::vector<std::uint32_t> weight_; ///< effective weight per peer (set order)
  std::vector<std::uint32_t> tiers_[2];
  /// tiers_ again with each member's stats and weight beside its index: load-aware
  /// policies touch one 16-byte entry per candidate instead of three scattered arrays.
  std::vector<TierMember> members_[2];
};

} // namespace detail

/// A balancing policy: one per upstream. `build` runs on the thread that publishes (or
/// applies a health change), never concurrently with itself; the pickers it returns are
/// shared read-only with request threads. Per-peer stats live in the policy, so they
/// survive rebuilds.
class Policy {
public:
  virtual ~Policy() = default;
  /// The policy's name as make_policy accepts it.
  virtual const char* name() const noexcept = 0;
  /// Whether its pickers read Outcome::latency. An embedder that must work to measure a
  /// latency (a variable to read and parse) may skip it when false.
  virtual bool uses_latency() const noexcept { return false; }
  /// Builds the picker for `set` under `health` (peers parallel to the set). Allocates;
  /// cost is stated by each policy.
  virtual std::shared_ptr<const Picker> build(const Snapshot& set, const HealthView& health) = 0;
  /// Same, with registry health only.
  std::shared_ptr<const Picker> build(const Snapshot& set) { return build(set, HealthView::from_registry(*set)); }
  /// Where the stats of new peer ids come from (see StatsRegistry::Provider). Before the
  /// first build.
  void share_stats(StatsRegistry::Provider provider) { stats_.set_provider(std::move(provider)); }

protected:
  StatsRegistry stats_;
};

DYNUP_NAMESPACE_END
