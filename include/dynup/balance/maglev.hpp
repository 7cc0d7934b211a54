// maglev: Google's Maglev consistent hashing (Eisenbud et al., NSDI 2016), weighted.
//
// The lookup table has a prime number M of slots. Every peer walks its own permutation of
// the slots, offset + k·skip (mod M), with offset and skip from two independent hashes of
// its id, and on each of its turns claims the next slot still free. Turns follow stride
// scheduling: a peer of weight w takes its j-th turn at time (j + 1/2) / w, ties going to
// the peer first in id order, so its share of slots is proportional to its weight (within
// one slot) and equal weights give the paper's plain round of turns. A key hashes to one
// slot: O(1) pick. Removing one of N peers moves its own slots plus a small fraction of
// the others (the paper measures a few percent at M ≈ 100·N).
//
// Everything is deterministic: the table depends only on the peers' ids, weights and
// order in the set (id order), never on std::hash, pointers or platform. Weights are the
// HealthView's effective weights; unavailable peers get no slots.
#pragma once

#include <dynup/balance/options.hpp>
#include <dynup/balance/picker.hpp>
#include <dynup/detail/hash.hpp>
#include <dynup/version.hpp>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <queue>
#include <string>
#include <string_view>
#include <vector>

#ifndef DYNUP_MAGLEV_MAX_TABLE
// Largest accepted table_size (a prime; 4 bytes per slot, 20 MB per table).
#define DYNUP_MAGLEV_MAX_TABLE 5000011u
#endif
#ifndef DYNUP_MAGLEV_MAX_PROBES
// Slots a retry probes past tried peers before scanning the tier instead.
#define DYNUP_MAGLEV_MAX_PROBES 16
#endif

DYNUP_NAMESPACE_BEGIN
namespace detail {

/// Whether n is prime, by trial division: O(√n), under 2 300 divisions for any table size.
inline bool is_prime(std::uint64_t n) noexcept {
  if (n < 2) return false;
  if (n % 2 == 0) return n == 2;
  for (std::uint64_t d = 3; d * d <= n; d += 2)
    if (n % d == 0) return false;
  return true;
}

/// The smallest prime >= n.
inline std::uint64_t next_prime(std::uint64_t n) noexcept {
  while (!is_prime(n)) ++n;
  return n;
}

/// The Maglev key hash: deterministic, 64-bit, the same on every platform.
inline std::uint64_t maglev_key_hash(std::string_view key) noexcept {
  ContentHash h;
  h.bytes(key.data(), key.size());
  return h.value();
}

/// A peer's permutation of an M-slot table: where it starts and how far it steps.
/// Two independent hashes of the id (distinct seeds); skip in [1, M-1] is coprime to the
/// prime M, so the walk visits every slot once.
struct MaglevWalk {
  std::uint64_t offset;
  std::uint64_t skip;

  static MaglevWalk of(std::string_view id, std::uint64_t m) noexcept {
    ContentHash a, b;
    a.u64(0x6f66667365743a31ULL); // arbitrary distinct seeds
    a.str(id);
    b.u64(0x736b69703a6d6167ULL);
    b.str(id);
    std::uint64_t skip = m > 1 ? b.value() % (m - 1) + 1 : 1;
    return {a.value() % m, skip};
  }
};

/// Fills an m-slot table (m prime) from the walks and weights of peers whose set indices
/// are `peers`; each slot holds a set index. O(m log n) for the turns plus the walks'
/// probes (O(m log m) expected); allocates the table and O(n) state.
inline std::vector<std::uint32_t> maglev_table(const std::vector<std::uint32_t>& peers,
                                               const std::vector<MaglevWalk>& walks,
                                               const std::vector<std::uint32_t>& weights, std::uint64_t m) {
  constexpr std::uint32_t empty = ~std::uint32_t{0};
  std::size_t n = peers.size();
  if (n == 0) return {};
  std::vector<std::uint32_t> table(static_cast<std::size_t>(m), empty);
  std::vector<std::uint64_t> next(n);
  for (std::size_t k = 0; k < n; ++k) next[k] = walks[k].offset;
  std::uint64_t filled = 0;
  auto claim = [&](std::size_t k) {
    std::uint64_t c = next[k];
    while (table[static_cast<std::size_t>(c)] != empty) {
      c += walks[k].skip;
      if (c >= m) c -= m;
    }
    table[static_cast<std::size_t>(c)] = peers[k];
    c += walks[k].skip;
    next[k] = c >= m ? c - m : c;
    ++filled;
  };

  bool equal = std::all_of(weights.begin(), weights.end(), [&](std::uint32_t w) { return w == weights[0]; });
  if (equal) {
    while (filled < m)
      for (std::size_t k = 0; k < n && filled < m; ++k) claim(k);
    return table;
  }
  // Stride scheduling: peer k's j-th turn is due at (2j + 1) / (2 w_k), compared exactly
  // by cross-multiplication; (2j + 1) · w stays below 2^24 · 2^32 for any allowed table.
  struct Turn {
    std::uint64_t j;
    std::uint32_t k;
  };
  auto later = [&](const Turn& a, const Turn& b) {
    std::uint64_t ta = (2 * a.j + 1) * weights[b.k];
    std::uint64_t tb = (2 * b.j + 1) * weights[a.k];
    return ta != tb ? ta > tb : a.k > b.k;
  };
  std::vector<Turn> heap_storage;
  heap_storage.reserve(n);
  std::priority_queue<Turn, std::vector<Turn>, decltype(later)> turns(later, std::move(heap_storage));
  for (std::size_t k = 0; k < n; ++k) turns.push({0, static_cast<std::uint32_t>(k)});
  while (filled < m) {
    Turn t = turns.top();
    turns.pop();
    claim(t.k);
    turns.push({t.j + 1, t.k});
  }
  return table;
}

} // namespace detail

/// The routing table of maglev: one table over available primaries, one over available
/// backups. pick: O(1) (hash the key, read one slot), or nginx's O(n) round robin for an
/// empty key, as nginx's hash falls back to; retries probe at most
/// DYNUP_MAGLEV_MAX_PROBES following slots, then scan the tier. noexcept, no allocation,
/// no lock. Build: O(M log n + M log M), 4 bytes per slot per tier.
class MaglevPicker final : public detail::PickerBase {
public:
  /// `table_size` must be prime. A tier with more peers than that gets a larger table
  /// (the smallest prime >= 100 × its peers, at most DYNUP_MAGLEV_MAX_TABLE, or >= its
  /// peers) rather than leaving peers without slots; see MaglevPolicy::check.
  MaglevPicker(const Snapshot& set, const HealthView& health, StatsRegistry& stats, std::uint64_t table_size)
      : PickerBase(set, health, stats) {
    const PeerSet& s = *set_;
    for (int t = 0; t < 2; ++t) {
      const auto& members = tiers_[t];
      if (members.empty()) continue;
      std::uint64_t m = table_size;
      if (members.size() > m) {
        std::uint64_t want = std::min<std::uint64_t>(100 * std::uint64_t{members.size()}, DYNUP_MAGLEV_MAX_TABLE);
        m = detail::next_prime(std::max<std::uint64_t>(want, members.size()));
      }
      std::vector<detail::MaglevWalk> walks;
      std::vector<std::uint32_t> weights;
      walks.reserve(members.size());
      weights.reserve(members.size());
      for (std::uint32_t i : members) {
        walks.push_back(detail::MaglevWalk::of(s[i].id, m));
        weights.push_back(weight_[i]);
      }
      table_[t] = detail::maglev_table(members, walks, weights, m);
    }
  }

  Selection pick(const PickContext& ctx) const noexcept override {
    const bool keyed = !ctx.key.empty();
    const std::uint64_t h = keyed ? detail::maglev_key_hash(ctx.key) : 0;
    for (int t = 0; t < 2; ++t) {
      if (tiers_[t].empty()) continue;
      // An empty key falls back to round robin, as nginx's hash does.
      Selection s = keyed ? pick_tier(t, h, ctx) : nginx_rr(t, ctx);
      if (s) return s;
    }
    return none(ctx);
  }

  void on_failed(const Selection& s) const noexcept override { nginx_rr_failed(s); }

  /// The table of tier 0 (primaries) or 1 (backups): set index per slot; empty when the
  /// tier has no available peer.
  const std::vector<std::uint32_t>& table(int tier) const noexcept { return table_[tier]; }

  /// The slot a key hash lands in, for a table of m slots (Lemire's multiply-shift).
  static std::size_t slot_of(std::uint64_t h, std::size_t m) noexcept {
    __extension__ using wide = unsigned __int128;
    return static_cast<std::size_t>((static_cast<wide>(h) * m) >> 64);
  }

private:
  Selection pick_tier(int t, std::uint64_t h, const PickContext& ctx) const noexcept {
    const auto& table = table_[t];
    std::size_t m = table.size();
    std::size_t slot = slot_of(h, m);
    std::size_t limit = m < DYNUP_MAGLEV_MAX_PROBES ? m : DYNUP_MAGLEV_MAX_PROBES;
    for (std::size_t k = 0; k < limit; ++k) {
      std::uint32_t i = table[slot];
      if (!is_tried(i, ctx)) return select(i);
      if (++slot == m) slot = 0;
    }
    return scan(t, static_cast<std::size_t>(h % tiers_[t].size()), ctx);
  }

  std::vector<std::uint32_t> table_[2];
};

/// Weighted Maglev. Options: {"table_size": a prime, default 65537, at most
/// DYNUP_MAGLEV_MAX_TABLE}; aim for at least 100 × peers for shares within about 1%.
/// build: O(M log M), allocates 4 bytes per slot per tier. Thread-safety: as Policy.
class MaglevPolicy final : public Policy {
public:
  static constexpr std::uint64_t default_table_size = 65537;

  explicit MaglevPolicy(std::uint64_t table_size = default_table_size) : table_size_(table_size) {}

  static Result<std::unique_ptr<Policy>> create(const nlohmann::json& options) {
    detail::OptionReader r("maglev", options, {"table_size"});
    std::uint64_t m = r.integer("table_size", default_table_size, 2, DYNUP_MAGLEV_MAX_TABLE);
    if (!r.error() && !detail::is_prime(m)) {
      std::uint64_t below = m;
      while (below > 2 && !detail::is_prime(below)) --below;
      r.fail("option \"table_size\" must be a prime number, got " + std::to_string(m) + " (nearest primes: " +
             std::to_string(below) + ", " + std::to_string(detail::next_prime(m)) + ")");
    }
    if (r.error()) return *r.error();
    return std::unique_ptr<Policy>(new MaglevPolicy(m));
  }

  const char* name() const noexcept override { return "maglev"; }

  std::shared_ptr<const Picker> build(const Snapshot& set, const HealthView& health) override {
    return std::make_shared<MaglevPicker>(set, health, stats_, table_size_);
  }
  using Policy::build;

  std::uint64_t table_size() const noexcept { return table_size_; }

  /// An error when `set` has more primary (or backup) peers than table_size: build would
  /// then use a larger table than configured. Lets a caller reject such a set up front.
  Result<void> check(const PeerSet& set) const {
    std::size_t tier[2] = {0, 0};
    for (const Peer& p : set) ++tier[p.backup ? 1 : 0];
    std::size_t n = std::max(tier[0], tier[1]);
    if (n <= table_size_) return {};
    return Error(Errc::invalid_argument, "policy maglev: table_size " + std::to_string(table_size_) +
                                             " is smaller than the " + std::to_string(n) +
                                             " peers of one tier; choose a prime >= " +
                                             std::to_string(detail::next_prime(std::min<std::uint64_t>(
                                                 100 * std::uint64_t{n}, DYNUP_MAGLEV_MAX_TABLE))) +
                                             " (about 100 × peers)");
  }

private:
  std::uint64_t table_size_;
};

DYNUP_NAMESPACE_END
