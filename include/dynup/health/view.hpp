// HealthView: which peers of a set may take traffic now, and at what weight.
#pragma once

#include <dynup/health/clock.hpp>
#include <dynup/peer_set.hpp>
#include <dynup/version.hpp>

#include <cstdint>
#include <vector>

DYNUP_NAMESPACE_BEGIN

/// Who decides whether a try failed, for passive health (max_fails). An embedder with
/// its own rule (nginx's proxy_next_upstream: a 502 on the last try is not a failure,
/// one that is retried is) says so; otherwise fail_statuses and no reply decide.
enum class TryVerdict : std::uint8_t { by_status, success, failure };

/// One peer's routing state, as policies see it.
struct PeerCondition {
  bool available = true;    ///< false: never picked (critical in the registry, ejected, down)
  std::uint32_t weight = 1; ///< effective weight, 1..peer.weight (slow start lowers it)
  /// Unavailable only because max_fails holds it out (PassiveGate): nginx's round robin
  /// keeps such a peer in its loop and lets the gate pass over it, so that the sequence
  /// does not depend on when a table was rebuilt.
  bool gated = false;
};

/// nginx's max_fails test, made on the request path so that a failure that takes a peer
/// down keeps it out from the next pick on, before any rebuild: a peer whose
/// PeerStats::fails reached `max_fails` is skipped while now - checked_ns <=
/// `fail_timeout`. Off when max_fails is 0, without a clock, in panic, or for a set of
/// one peer (nginx never takes a single server down).
struct PassiveGate {
  std::uint32_t max_fails = 0;
  std::int64_t fail_timeout_ns = 0;
  const Clock* clock = nullptr;

  bool on() const noexcept { return max_fails > 0 && clock != nullptr; }
  std::int64_t now_ns() const noexcept { return clock->now().time_since_epoch().count(); }
};

/// Conditions parallel to a PeerSet's peers (same order, same size). A plain value:
/// built by the health layer, read by Policy::build, never changed afterwards.
struct HealthView {
  std::vector<PeerCondition> peers;
  PassiveGate gate; ///< off unless the health layer that built the view sets it

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
