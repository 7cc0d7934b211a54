// PeerSet: an immutable, validated, sorted set of peers with a content hash.
#pragma once

#include <dynup/detail/hash.hpp>
#include <dynup/detail/utf8.hpp>
#include <dynup/peer.hpp>
#include <dynup/result.hpp>
#include <dynup/version.hpp>

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#ifndef DYNUP_MAX_REPORTED_ERRORS
// A file with 1 000 bad lines should not produce a 1 000-line error message.
#define DYNUP_MAX_REPORTED_ERRORS 10
#endif

// Limits on one set, so a hostile or broken registry cannot make every process that
// decodes its answer allocate without bound. They are generous next to Consul's own
// limits on service metadata (64 pairs, keys of 128 bytes, values of 512 bytes).
#ifndef DYNUP_MAX_PEERS
#define DYNUP_MAX_PEERS (1u << 20) // peers in one set
#endif
#ifndef DYNUP_MAX_PEER_LABELS
#define DYNUP_MAX_PEER_LABELS 256 // tags of one peer, and meta entries of one peer
#endif
#ifndef DYNUP_MAX_LABEL_BYTES
#define DYNUP_MAX_LABEL_BYTES 1024 // one tag, one meta key, the zone
#endif
#ifndef DYNUP_MAX_META_VALUE_BYTES
#define DYNUP_MAX_META_VALUE_BYTES 4096 // one meta value
#endif

DYNUP_NAMESPACE_BEGIN

class Publisher;

namespace detail {
/// Why an id is unacceptable, or nullptr. Control characters would let a registry
/// entry forge log lines. The id leaves dynup as JSON (status, snapshot file, shared
/// region), where bytes that are not UTF-8 become U+FFFD: another id, maybe a duplicate.
inline const char* bad_id(const std::string& id) noexcept {
  if (id.empty()) return "id is empty";
  if (id.size() > 256) return "id is longer than 256 bytes";
  for (unsigned char c : id)
    if (c < 0x20 || c == 0x7f) return "id contains a control character";
  if (!is_utf8(id)) return "id is not UTF-8";
  return nullptr;
}

/// Why a peer's zone, tags or meta exceed the limits above or are not UTF-8 (so would
/// not read back the same from JSON, and a follower would select other peers by tag
/// than its leader), or an empty string.
inline std::string bad_labels(const Peer& p) {
  auto check = [](const std::string& what, const std::string& text, std::size_t max) -> std::string {
    if (text.size() > max)
      return what + " is " + std::to_string(text.size()) + " bytes, longer than " + std::to_string(max);
    if (!is_utf8(text)) return what + " is not UTF-8";
    return {};
  };
  if (auto why = check("zone", p.zone, DYNUP_MAX_LABEL_BYTES); !why.empty()) return why;
  if (p.tags.size() > DYNUP_MAX_PEER_LABELS)
    return std::to_string(p.tags.size()) + " tags, more than " + std::to_string(DYNUP_MAX_PEER_LABELS);
  for (std::size_t i = 0; i < p.tags.size(); ++i)
    if (auto why = check("tags[" + std::to_string(i) + "]", p.tags[i], DYNUP_MAX_LABEL_BYTES); !why.empty())
      return why;
  if (p.meta.size() > DYNUP_MAX_PEER_LABELS)
    return std::to_string(p.meta.size()) + " meta entries, more than " + std::to_string(DYNUP_MAX_PEER_LABELS);
  for (const auto& [k, v] : p.meta) {
    if (auto why = check("a meta key", k, DYNUP_MAX_LABEL_BYTES); !why.empty()) return why;
    if (auto why = check("a meta value", v, DYNUP_MAX_META_VALUE_BYTES); !why.empty())
      return why;
  }
  return {};
}
} // namespace detail

/// Peers added, removed and changed between two sets, each list sorted by id.
struct PeerDiff {
  std::vector<Peer> added;
  std::vector<Peer> removed;
  std::vector<std::pair<Peer, Peer>> changed; ///< (before, after), same id
  bool empty() const noexcept { return added.empty() && removed.empty() && changed.empty(); }
};

/// An immutable set of peers, sorted by id and validated.
///
/// Thread-safety: immutable after construction, so any number of threads may read one
/// concurrently. `version()` is 0 until a Publisher publishes the set, then it is the
/// publisher's monotonic version. `source_index()` is the registry's index (Consul
/// X-Consul-Index, etcd revision, file load count). `content_hash()` covers the peers
/// only, canonicalized, so it does not depend on input order.
class PeerSet {
public:
  /// An empty set (version 0, index 0).
  PeerSet() { hash_ = compute_hash(peers_); }

  /// Validates and canonicalizes `peers`, then sorts them by id. O(n log n).
  /// Each peer: host canonical (IPv4/IPv6/DNS), port 1..65535, weight 1..max_weight,
  /// id defaulting to host:port, no duplicate ids, tags sorted and de-duplicated; at
  /// most DYNUP_MAX_PEERS peers (Errc::too_large), and zone, tags and meta within
  /// DYNUP_MAX_PEER_LABELS, DYNUP_MAX_LABEL_BYTES and DYNUP_MAX_META_VALUE_BYTES.
  /// On failure, the error names each bad peer by position and id (first
  /// DYNUP_MAX_REPORTED_ERRORS of them) and nothing is returned.
  static Result<PeerSet> make(std::vector<Peer> peers, std::uint64_t source_index = 0) {
    if (peers.size() > DYNUP_MAX_PEERS)
      return Error(Errc::too_large, "a set of " + std::to_string(peers.size()) + " peers is more than " +
                                        std::to_string(DYNUP_MAX_PEERS) + " (DYNUP_MAX_PEERS)");
    std::vector<std::string> errors;
    std::size_t error_count = 0;
    auto fail = [&](std::size_t pos, const Peer& p, const std::string& what) {
      if (errors.size() < DYNUP_MAX_REPORTED_ERRORS) {
        std::string name = p.id.empty() ? host_port(p.host, p.port) : p.id;
        // The name goes into logs: no control characters, no unbounded length.
        if (name.size() > 64) name = name.substr(0, 64) + "...";
        for (char& c : name)
          if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) c = '?';
        errors.push_back("peers[" + std::to_string(pos) + "] \"" + name + "\": " + what);
      }
      ++error_count;
    };
    for (std::size_t i = 0; i < peers.size(); ++i) {
      Peer& p = peers[i];
      bool bad = false;
      auto host = canonical_host(p.host);
      if (!host) {
        fail(i, p, host.error().message());
        bad = true;
      } else {
        p.host = std::move(host).value();
      }
      if (p.port == 0) {
        fail(i, p, "port 0 is out of range 1..65535");
        bad = true;
      }
      if (p.weight < 1 || p.weight > max_weight) {
        fail(i, p, "weight " + std::to_string(p.weight) + " is out of range 1.." +
                       std::to_string(max_weight));
        bad = true;
      }
      if (p.id.empty() && !bad) p.id = host_port(p.host, p.port);
      if (auto why = detail::bad_id(p.id); why && !bad) {
        fail(i, p, why);
        bad = true;
      }
      if (std::string why = detail::bad_labels(p); !why.empty()) {
        fail(i, p, why);
        bad = true;
      }
      std::sort(p.tags.begin(), p.tags.end());
      p.tags.erase(std::unique(p.tags.begin(), p.tags.end()), p.tags.end());
    }
    if (error_count == 0) {
      // Sort (first 8 id bytes as a big-endian integer, position) keys: most
      // comparisons end on the integer without touching the scattered id strings.
      struct Key {
        std::uint64_t prefix;
        std::size_t pos;
      };
      std::vector<Key> keys(peers.size());
      for (std::size_t i = 0; i < peers.size(); ++i) {
        std::uint64_t prefix = 0;
        const std::string& id = peers[i].id;
        for (std::size_t b = 0; b < 8; ++b)
          prefix = (prefix << 8) | (b < id.size() ? static_cast<unsigned char>(id[b]) : 0u);
        keys[i] = {prefix, i};
      }
      std::sort(keys.begin(), keys.end(), [&](const Key& a, const Key& b) {
        if (a.prefix != b.prefix) return a.prefix < b.prefix;
        int c = peers[a.pos].id.compare(peers[b.pos].id);
        return c != 0 ? c < 0 : a.pos < b.pos; // equal ids stay in input order for the error

      });
      std::vector<std::size_t> order(peers.size());
      for (std::size_t i = 0; i < order.size(); ++i) order[i] = keys[i].pos;
      for (std::size_t k = 1; k < order.size(); ++k) {
        const Peer& prev = peers[order[k - 1]];
        const Peer& cur = peers[order[k]];
        if (prev.id == cur.id) {
          auto first = std::min(order[k - 1], order[k]);
          auto second = std::max(order[k - 1], order[k]);
          fail(second, cur, "duplicate id (also peers[" + std::to_string(first) + "])");
        }
      }
      if (error_count == 0) {
        std::vector<Peer> sorted;
        sorted.reserve(peers.size());
        for (std::size_t i : order) sorted.push_back(std::move(peers[i]));
        return PeerSet(std::move(sorted), source_index);
      }
    }
    std::string msg = std::to_string(error_count) + (error_count == 1 ? " invalid peer: " : " invalid peers: ");
    for (std::size_t i = 0; i < errors.size(); ++i) msg += (i ? "; " : "") + errors[i];
    if (error_count > errors.size())
      msg += "; and " + std::to_string(error_count - errors.size()) + " more";
    return Error(Errc::invalid_peer, msg);
  }

  const std::vector<Peer>& peers() const noexcept { return peers_; }
  std::size_t size() const noexcept { return peers_.size(); }
  bool empty() const noexcept { return peers_.empty(); }
  auto begin() const noexcept { return peers_.begin(); }
  auto end() const noexcept { return peers_.end(); }
  const Peer& operator[](std::size_t i) const noexcept { return peers_[i]; }

  std::uint64_t version() const noexcept { return version_; }
  std::uint64_t source_index() const noexcept { return source_index_; }
  std::uint64_t content_hash() const noexcept { return hash_; }

  /// The peer with this id, or nullptr. O(log n), no allocation.
  const Peer* find(std::string_view id) const noexcept {
    auto it = std::lower_bound(peers_.begin(), peers_.end(), id,
                               [](const Peer& p, std::string_view k) { return p.id < k; });
    return (it != peers_.end() && it->id == id) ? &*it : nullptr;
  }

  /// Same peers (version and source index are not content).
  bool same_content(const PeerSet& other) const noexcept {
    return hash_ == other.hash_ && peers_ == other.peers_;
  }

  /// The same peers with another source index and version 0; not revalidated.
  PeerSet with_source_index(std::uint64_t index) const& {
    PeerSet copy = *this;
    return std::move(copy).with_source_index(index);
  }
  PeerSet with_source_index(std::uint64_t index) && {
    source_index_ = index;
    version_ = 0;
    return std::move(*this);
  }

private:
  friend class Publisher;

  PeerSet(std::vector<Peer> sorted, std::uint64_t source_index)
      : peers_(std::move(sorted)), source_index_(source_index), hash_(compute_hash(peers_)) {}

  static std::uint64_t compute_hash(const std::vector<Peer>& peers) noexcept {
    detail::ContentHash h;
    h.u64(peers.size());
    for (const Peer& p : peers) {
      h.str(p.id);
      h.str(p.host);
      h.u64(p.port);
      h.u64(p.weight);
      h.u64(p.backup);
      h.str(p.zone);
      h.u64(p.tags.size());
      for (const auto& t : p.tags) h.str(t);
      h.u64(p.meta.size());
      for (const auto& [k, v] : p.meta) {
        h.str(k);
        h.str(v);
      }
      h.u64(static_cast<std::uint64_t>(p.health));
    }
    return h.value();
  }

  std::vector<Peer> peers_;
  std::uint64_t version_ = 0;
  std::uint64_t source_index_ = 0;
  std::uint64_t hash_ = 0;
};


/// What changed from `before` to `after`, matched by id. O(n + m).
inline PeerDiff diff(const PeerSet& before, const PeerSet& after) {
  PeerDiff d;
  auto a = before.begin(), ae = before.end();
  auto b = after.begin(), be = after.end();
  while (a != ae || b != be) {
    if (b == be || (a != ae && a->id < b->id)) {
      d.removed.push_back(*a++);
    } else if (a == ae || b->id < a->id) {
      d.added.push_back(*b++);
    } else {
      if (*a != *b) d.changed.emplace_back(*a, *b);
      ++a;
      ++b;
    }
  }
  return d;
}

DYNUP_NAMESPACE_END
