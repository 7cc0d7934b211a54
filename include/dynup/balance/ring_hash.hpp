// ring_hash: ketama consistent hashing that sends every key to the same peer as nginx's
// `hash $key consistent` (ngx_http_upstream_hash_module, nginx 1.22).
//
// nginx places weight × 160 points per server: base = CRC-32 state after (host, one zero
// byte, port), each point = CRC-32 continued from base over the previous point's four
// bytes (little-endian, 0 for the first), finalized. Points are sorted, equal hashes
// collapse to one, and a key (CRC-32 of its bytes) goes to the first point >= its hash,
// wrapping to the first point. An unusable peer sends the request to the next point.
//
// dynup builds that ring from each peer's `host_port(peer.host, peer.port)` text, so a key
// maps to the same peer as in nginx configured like this:
//
//   upstream backend {
//       hash $request_uri consistent;   # any key; PickContext::key must hold its bytes
//       server 10.0.0.1:8080 weight=2;  # one line per peer: host_port() text, same weight
//       server [2001:db8::1]:8080;      # IPv6 in dynup's canonical (inet_ntop) form
//       server cache.example:8080;      # DNS names lower-case, no trailing dot
//   }
//
// Same peers and weights, any order of server lines, points_per_weight 160, no `backup`
// lines. Checked against nginx 1.22.1 (ring_hash_test.cpp holds its answers for 2 000
// keys). Differences, all outside that mapping:
// - Equal point hashes: nginx keeps an unspecified one (its qsort is unstable); dynup
//   keeps the peer first in id order. Colliding pairs number about points²/2³³: under
//   0.3 below 300 peers of weight 1, about 3 at 1 000, about 300 at 10 000.
// - Unavailable peers (nginx: down, or failed per max_fails) are left out of the ring,
//   which is exactly nginx's walk to the next point when that walk ends within 20
//   steps. nginx then falls back to round robin; dynup, past tried peers, walks up to
//   DYNUP_RING_HASH_MAX_WALK points, then scans the tier.
// - An empty key falls back to nginx's smooth weighted round robin over the tier, as
//   nginx's hash does (PickerBase::nginx_rr).
// - Backups: nginx refuses `backup` with hash; dynup keeps a second ring over backup
//   peers, used only when no primary is usable.
// - Peers sharing one host:port text (or a DNS server line nginx resolves to several
//   addresses) have identical points: dynup gives them all to the first in id order,
//   nginx shares them round-robin.
// - Weights come from the HealthView (slow start lowers them); a lower weight drops the
//   peer's last points only, so only its keys move.
#pragma once

#include <dynup/balance/options.hpp>
#include <dynup/balance/picker.hpp>
#include <dynup/detail/crc32.hpp>
#include <dynup/peer.hpp>
#include <dynup/version.hpp>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#ifndef DYNUP_RING_HASH_MAX_POINTS
// Most points in one ring (8 bytes each). Beyond it, every peer's point count is scaled
// down, keeping ratios; the ring is then no longer nginx's (see RingHashPicker::exact).
#define DYNUP_RING_HASH_MAX_POINTS (1u << 24)
#endif
#ifndef DYNUP_RING_HASH_MAX_WALK
// Points a retry walks past tried peers before scanning the tier instead.
#define DYNUP_RING_HASH_MAX_WALK 64
#endif

DYNUP_NAMESPACE_BEGIN
namespace detail {

/// One point on the ring: its hash and the peer's index in the set.
struct RingPoint {
  std::uint32_t hash;
  std::uint32_t peer;
};

/// The CRC-32 state nginx starts a server's points from: the server text split into
/// host and port at the last ':' followed only by digits ("[::1]:80" → "[::1]", "80";
/// no such ':' → all host, empty port; "unix:" prefix → the path, no port), then the
/// state after host, one zero byte, port. Not finalized.
inline std::uint32_t ketama_base(std::string_view server) noexcept {
  std::string_view host = server, port;
  auto lower = [](char c) { return c >= 'A' && c <= 'Z' ? static_cast<char>(c - 'A' + 'a') : c; };
  if (server.size() >= 5 && lower(server[0]) == 'u' && lower(server[1]) == 'n' && lower(server[2]) == 'i' &&
      lower(server[3]) == 'x' && server[4] == ':') {
    host = server.substr(5);
  } else {
    for (std::size_t j = 0; j < server.size(); ++j) {
      char c = server[server.size() - 1 - j];
      if (c == ':') {
        host = server.substr(0, server.size() - 1 - j);
        port = server.substr(server.size() - j);
        break;
      }
      if (c < '0' || c > '9') break;
    }
  }
  const char zero = 0;
  std::uint32_t state = crc32_update(0xFFFFFFFFu, host.data(), host.size());
  state = crc32_update(state, &zero, 1);
  return crc32_update(state, port.data(), port.size());
}

/// Writes a server's first `count` points (hashes in generation order) to `out`.
inline void ketama_points(std::uint32_t base, std::uint32_t count, std::uint32_t peer, RingPoint* out) noexcept {
  std::uint32_t prev = 0;
  for (std::uint32_t j = 0; j < count; ++j) {
    prev = ~crc32_update_u32(base, prev);
    out[j] = {prev, peer};
  }
}

/// One server's share of a ring build: where its points go and how many.
struct KetamaServer {
  std::uint32_t base;
  std::uint32_t count;
  std::uint32_t peer;
  RingPoint* out;
};

/// ketama_points for many servers, four at a time: each server's chain is serial, so
/// interleaving independent chains keeps the CPU's pipelines full.
inline void ketama_fill(const std::vector<KetamaServer>& servers) noexcept {
  constexpr std::size_t lanes = 4;
  std::size_t k = 0;
  for (; k + lanes <= servers.size(); k += lanes) {
    const KetamaServer* s = &servers[k];
    std::uint32_t common = s[0].count;
    for (std::size_t l = 1; l < lanes; ++l) common = std::min(common, s[l].count);
    std::uint32_t prev[lanes] = {};
    for (std::uint32_t j = 0; j < common; ++j)
      for (std::size_t l = 0; l < lanes; ++l) {
        prev[l] = ~crc32_update_u32(s[l].base, prev[l]);
        s[l].out[j] = {prev[l], s[l].peer};
      }
    for (std::size_t l = 0; l < lanes; ++l)
      for (std::uint32_t j = common; j < s[l].count; ++j) {
        prev[l] = ~crc32_update_u32(s[l].base, prev[l]);
        s[l].out[j] = {prev[l], s[l].peer};
      }
  }
  for (; k < servers.size(); ++k) ketama_points(servers[k].base, servers[k].count, servers[k].peer, servers[k].out);
}

/// Buffers a ring build reuses, kept by the policy so that rebuilding a large ring does
/// not fault in fresh pages every time. Not thread-safe: builds are serialized.
class RingScratch {
public:
  /// Room for n points; contents unspecified.
  RingPoint* points(std::size_t n) { return grow(points_, points_cap_, n); }
  RingPoint* bucket(std::size_t n) { return grow(bucket_, bucket_cap_, n); }

private:
  static RingPoint* grow(std::unique_ptr<RingPoint[]>& p, std::size_t& cap, std::size_t n) {
    if (cap < n) {
      p.reset(new RingPoint[n]); // default-initialized: no zeroing pass
      cap = n;
    }
    return p.get();
  }
  std::unique_ptr<RingPoint[]> points_, bucket_;
  std::size_t points_cap_ = 0, bucket_cap_ = 0;
};

/// Sorted, de-duplicated ring points with a lookup table from a hash's top bits to the
/// first point of that range, so find() reads one table entry and a few points.
/// Immutable after construction; any number of threads may call find().
class HashRing {
public:
  HashRing() = default;

  /// Sorts `in[0..n)` by hash, keeps the first point (in input order) of each run of
  /// equal hashes, and builds the lookup table. A two-level radix sort: a counting
  /// scatter on the top bits into cache-sized buckets, then an LSD radix sort of each
  /// bucket on the remaining bits; stable throughout. O(n) time; allocates 8 bytes per
  /// point plus a table of about n/4 entries.
  HashRing(const RingPoint* in, std::size_t n, RingScratch& scratch) {
    if (n == 0) return;
    unsigned bits = 1; // ceil(log2(n)), at least 1
    while (bits < 31 && (std::size_t{1} << bits) < n) ++bits;
    // Buckets of 1 024-2 048 points (8-16 KB), at most 2 048 of them so the scatter's
    // write streams stay cache- and TLB-friendly; then passes of at most 11 bits.
    unsigned b1 = bits > 11 ? std::min(bits - 11, 11u) : 0u;
    unsigned rest = 32 - b1;
    unsigned passes = (rest + 10) / 11;
    unsigned width = (rest + passes - 1) / passes;
    unsigned lut_bits = 1; // about 4-8 points per lookup bucket
    while (lut_bits < 20 && (std::size_t{1} << (lut_bits + 3)) <= n) ++lut_bits;
    shift_ = 32 - lut_bits;
    std::size_t lut_n = std::size_t{1} << lut_bits;
    lut_.reset(new std::uint32_t[lut_n + 1]);
    points_.reset(new RingPoint[n]);
    RingPoint* out = points_.get();

    std::vector<std::uint32_t> start((std::size_t{1} << b1) + 1, 0);
    if (b1 == 0) {
      std::copy(in, in + n, out);
      start[1] = static_cast<std::uint32_t>(n);
    } else {
      unsigned s1 = 32 - b1;
      for (std::size_t i = 0; i < n; ++i) ++start[(in[i].hash >> s1) + 1];
      for (std::size_t b = 1; b < start.size(); ++b) start[b] += start[b - 1];
      std::vector<std::uint32_t> at(start.begin(), start.end() - 1);
      for (std::size_t i = 0; i < n; ++i) out[at[in[i].hash >> s1]++] = in[i];
    }

    // Buckets go in order and are written back compacted, so the write position never
    // passes the bucket being read (already sorted into scratch by then).
    std::uint32_t mask = (1u << width) - 1;
    std::vector<std::uint32_t> count(std::size_t{passes} << width);
    std::fill(lut_.get(), lut_.get() + lut_n + 1, 0u);
    std::size_t w = 0;
    std::uint32_t last = ~out[0].hash; // differs from the first point's hash
    for (std::size_t b = 0; b + 1 < start.size(); ++b) {
      std::size_t lo = start[b], m = start[b + 1] - lo;
      if (m == 0) continue;
      RingPoint* buf[2] = {scratch.bucket(2 * m), nullptr};
      buf[1] = buf[0] + m;
      std::fill(count.begin(), count.end(), 0u);
      for (std::size_t i = lo; i < lo + m; ++i)
        for (unsigned d = 0; d < passes; ++d) ++count[(d << width) + ((out[i].hash >> (d * width)) & mask)];
      const RingPoint* src = out + lo;
      for (unsigned d = 0; d < passes; ++d) {
        std::uint32_t* c = &count[std::size_t{d} << width];
        std::uint32_t sum = 0;
        for (std::uint32_t k = 0; k <= mask; ++k) {
          std::uint32_t x = c[k];
          c[k] = sum;
          sum += x;
        }
        RingPoint* dst = buf[d & 1];
        for (std::size_t i = 0; i < m; ++i) dst[c[(src[i].hash >> (d * width)) & mask]++] = src[i];
        src = dst;
      }
      for (std::size_t i = 0; i < m; ++i) {
        const RingPoint p = src[i];
        out[w] = p;
        std::uint32_t keep = p.hash != last;
        lut_[p.hash >> shift_] += keep;
        w += keep;
        last = p.hash;
      }
    }
    // Counts per lookup bucket → index of each bucket's first point.
    std::uint32_t sum = 0;
    for (std::size_t b = 0; b <= lut_n; ++b) {
      std::uint32_t c = lut_[b];
      lut_[b] = sum;
      sum += c;
    }
    size_ = w;
  }

  std::size_t size() const noexcept { return size_; }
  bool empty() const noexcept { return size_ == 0; }
  const RingPoint& operator[](std::size_t i) const noexcept { return points_[i]; }
  /// The points, ascending by hash.
  const RingPoint* begin() const noexcept { return points_.get(); }
  const RingPoint* end() const noexcept { return points_.get() + size_; }

  /// Index of the first point with hash >= h, wrapping to 0 past the last. Precondition:
  /// !empty(). O(1) expected (a few points per bucket), O(log n) worst case; noexcept.
  std::size_t find(std::uint32_t h) const noexcept {
    std::size_t b = h >> shift_;
    const RingPoint* lo = points_.get() + lut_[b];
    const RingPoint* hi = points_.get() + lut_[b + 1];
    // Branch-free binary search within the bucket.
    std::size_t len = static_cast<std::size_t>(hi - lo);
    while (len > 1) {
      std::size_t half = len / 2;
      lo += half * static_cast<std::size_t>(lo[half - 1].hash < h); // no branch to mispredict
      len -= half;
    }
    lo += len == 1 && lo->hash < h;
    auto i = static_cast<std::size_t>(lo - points_.get());
    return i == size_ ? 0 : i;
  }

private:
  std::unique_ptr<RingPoint[]> points_;
  std::size_t size_ = 0;
  std::unique_ptr<std::uint32_t[]> lut_; ///< lut_[b]: first point whose hash >> shift_ is >= b
  unsigned shift_ = 31;
};

} // namespace detail

/// The routing table of ring_hash: one ring over available primaries, one over available
/// backups. pick: O(1) expected with a key (CRC-32 of the key, one table read, a few
/// points), O(n) without one (nginx's round robin, as nginx's hash); retries walk at most
/// DYNUP_RING_HASH_MAX_WALK points, then scan the tier. noexcept, no allocation, no
/// lock. Build: O(points) time, 8 bytes per point, points = sum(weight) × points_per_weight.
class RingHashPicker final : public detail::PickerBase {
public:
  /// Builds both rings; `scratch` is reused across builds (see RingScratch).
  RingHashPicker(const Snapshot& set, const HealthView& health, StatsRegistry& stats,
                 std::uint32_t points_per_weight, detail::RingScratch& scratch)
      : PickerBase(set, health, stats) {
    const PeerSet& s = *set_;
    for (int t = 0; t < 2; ++t) {
      const auto& members = tiers_[t];
      if (members.empty()) continue;
      std::vector<std::uint64_t> count(members.size());
      std::uint64_t total = 0;
      for (std::size_t k = 0; k < members.size(); ++k) {
        count[k] = std::uint64_t{weight_[members[k]]} * points_per_weight;
        total += count[k];
      }
      if (total > DYNUP_RING_HASH_MAX_POINTS) {
        exact_ = false;
        std::uint64_t scaled = 0;
        for (auto& c : count) {
          c = std::max<std::uint64_t>(1, c * DYNUP_RING_HASH_MAX_POINTS / total);
          scaled += c;
        }
        total = scaled;
      }
      detail::RingPoint* points = scratch.points(static_cast<std::size_t>(total));
      std::vector<detail::KetamaServer> servers;
      servers.reserve(members.size());
      std::size_t at = 0;
      for (std::size_t k = 0; k < members.size(); ++k) {
        std::uint32_t i = members[k];
        auto n = static_cast<std::uint32_t>(count[k]);
        servers.push_back({detail::ketama_base(host_port(s[i].host, s[i].port)), n, i, points + at});
        at += n;
      }
      detail::ketama_fill(servers);
      ring_[t] = detail::HashRing(points, at, scratch);
    }
  }

  Selection pick(const PickContext& ctx) const noexcept override {
    bool keyed = !ctx.key.empty();
    std::uint32_t h = keyed ? detail::crc32(ctx.key) : 0;
    if (keyed && !ring_[0].empty() && (ctx.tried == nullptr || ctx.tried->empty())) {
      const std::uint32_t i = ring_[0][ring_[0].find(h)].peer; // the common case: a first try
      if (!gated(i, ctx)) return select(i);
    }
    for (int t = 0; t < 2; ++t) {
      if (tiers_[t].empty()) continue;
      // An empty key falls back to round robin, as nginx's hash does.
      Selection s = keyed ? pick_keyed(t, h, ctx) : nginx_rr(t, ctx);
      if (s) return s;
    }
    return none(ctx);
  }

  void on_failed(const Selection& s) const noexcept override { nginx_rr_failed(s); }

  /// The ring of tier 0 (primaries) or 1 (backups), for inspection and tests.
  const detail::HashRing& ring(int tier) const noexcept { return ring_[tier]; }
  /// Whether the rings hold every peer's full weight × points_per_weight points (false
  /// only when DYNUP_RING_HASH_MAX_POINTS forced scaling).
  bool exact() const noexcept { return exact_; }

private:
  Selection pick_keyed(int t, std::uint32_t h, const PickContext& ctx) const noexcept {
    const detail::HashRing& r = ring_[t];
    std::size_t n = r.size();
    std::size_t at = r.find(h);
    std::size_t limit = n < DYNUP_RING_HASH_MAX_WALK ? n : DYNUP_RING_HASH_MAX_WALK;
    for (std::size_t k = 0; k < limit; ++k) {
      std::uint32_t i = r[at].peer;
      if (!is_tried(i, ctx)) return select(i);
      if (++at == n) at = 0;
    }
    return scan(t, h % tiers_[t].size(), ctx);
  }

  detail::HashRing ring_[2];
  bool exact_ = true;
};

/// ketama consistent hashing, nginx `hash $key consistent` compatible (see the top of
/// this file). Options: {"points_per_weight": 1..1000, default 160 as in nginx}.
/// build: O(sum(weight) × points_per_weight); allocates the rings and keeps the largest
/// build's scratch (8 bytes per point) for the next build. Thread-safety: as Policy.
class RingHashPolicy final : public Policy {
public:
  static constexpr std::uint32_t default_points_per_weight = 160;

  explicit RingHashPolicy(std::uint32_t points_per_weight = default_points_per_weight)
      : points_per_weight_(points_per_weight) {}

  static Result<std::unique_ptr<Policy>> create(const nlohmann::json& options) {
    detail::OptionReader r("ring_hash", options, {"points_per_weight"});
    auto ppw = r.integer("points_per_weight", default_points_per_weight, 1, 1000);
    if (r.error()) return *r.error();
    return std::unique_ptr<Policy>(new RingHashPolicy(static_cast<std::uint32_t>(ppw)));
  }

  const char* name() const noexcept override { return "ring_hash"; }

  std::shared_ptr<const Picker> build(const Snapshot& set, const HealthView& health) override {
    return std::make_shared<RingHashPicker>(set, health, stats_, points_per_weight_, scratch_);
  }
  using Policy::build;

  std::uint32_t points_per_weight() const noexcept { return points_per_weight_; }

private:
  std::uint32_t points_per_weight_;
  detail::RingScratch scratch_;
};

DYNUP_NAMESPACE_END
