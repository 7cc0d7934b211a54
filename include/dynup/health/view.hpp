// HealthView: which peers of a set may take traffic now, and at what weight.
#pragma once

#include <dynup/peer_set.hpp>
#include <dynup/version.hpp>

#include <cstdint>
#include <vector>

DYNUP_NAMESPACE_BEGIN

/// One peer's routing state, as policies see it.
struct PeerCondition {
  bool available = true;    ///< false: never picked (critical in the registry, ejected, down)
  std::uint32_t weight = 1; ///< effective weight, 1..peer.weight (slow start lowers it)
};

/// Conditions parallel to a PeerSet's peers (same order, same size). A plain value:
/// built by the health layer, read by Policy::build, never changed afterwards.
struct HealthView {
  std::vector<PeerCondition> peers;

  /// From registry health alone: critical peers unavailable, all others available at
  /// their configured weight. O(n), allocates.
  static HealthView from_registry(const PeerSet& set) {
    HealthView v;
    v.peers.reserve(set.size());
    for (const Peer& p : set) v.peers.push_back({p.health != Health::critical, p.weight});
    return v;
  }
};

DYNUP_NAMESPACE_END
