// Guards: updates a watcher refuses to publish, so a registry fault cannot empty an upstream.
#pragma once

#include <dynup/peer_set.hpp>
#include <dynup/result.hpp>
#include <dynup/version.hpp>

#include <cstddef>
#include <cstdio>
#include <string>

DYNUP_NAMESPACE_BEGIN

namespace detail {
inline std::string format_share(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}
} // namespace detail

/// Per-upstream limits on what one update may do. Defaults refuse only an empty set.
struct Guards {
  bool allow_empty = false;         ///< publish a set with no peers
  double max_removed_share = 1.0;   ///< refuse an update removing more than this share [0, 1]
  std::size_t min_peers = 0;        ///< refuse a set with fewer peers (0: no minimum)
  std::size_t max_peers = 0;        ///< refuse a set with more peers (0: only DYNUP_MAX_PEERS)
};

/// Checks `next` against the guards, given the set now served (`current`, which is
/// empty before the first publish). Returns Errc::rejected with the reason, or
/// Errc::invalid_argument when the guards themselves are out of range. O(n log m).
inline Result<void> check_guards(const Guards& g, const PeerSet& current, const PeerSet& next) {
  if (!(g.max_removed_share >= 0.0 && g.max_removed_share <= 1.0)) // NaN fails too
    return Error(Errc::invalid_argument, "max_removed_share must be in [0, 1], got " +
                                             detail::format_share(g.max_removed_share));
  if (next.empty() && !g.allow_empty)
    return Error(Errc::rejected, "refusing an empty peer set (allow_empty is off); keeping the " +
                                     std::to_string(current.size()) + " current peers");
  if (g.min_peers > 0 && next.size() < g.min_peers)
    return Error(Errc::rejected, "refusing a set of " + std::to_string(next.size()) +
                                     " peers, fewer than min_peers " + std::to_string(g.min_peers));
  if (g.max_peers > 0 && next.size() > g.max_peers)
    return Error(Errc::rejected, "refusing a set of " + std::to_string(next.size()) +
                                     " peers, more than max_peers " + std::to_string(g.max_peers));
  if (g.max_removed_share < 1.0 && !current.empty()) {
    std::size_t removed = 0;
    for (const Peer& p : current)
      if (!next.find(p.id)) ++removed;
    double share = static_cast<double>(removed) / static_cast<double>(current.size());
    if (share > g.max_removed_share)
      return Error(Errc::rejected, "refusing an update that removes " + std::to_string(removed) + " of " +
                                       std::to_string(current.size()) + " peers (max_removed_share " +
                                       detail::format_share(g.max_removed_share) + ")");
  }
  return {};
}

DYNUP_NAMESPACE_END
