// Builders for policy tests: snapshots, health views, and picks aimed at one peer.
#pragma once

#include <dynup/balance/policy.hpp>

#include "support/peers.hpp"
#include <doctest/doctest.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace dynup_test {

/// A published-looking snapshot of validated peers.
inline dynup::Snapshot snapshot(std::vector<dynup::Peer> peers) {
  return std::make_shared<const dynup::PeerSet>(make_set(std::move(peers)));
}

/// Peers 10.0.<i/250>.<i%250+1>:80 for i in [0, n), weight weight_of(i).
template <class WeightOf> std::vector<dynup::Peer> numbered_peers(std::size_t n, WeightOf weight_of) {
  std::vector<dynup::Peer> out;
  for (std::size_t i = 0; i < n; ++i)
    out.push_back(peer("10.0." + std::to_string(i / 250) + "." + std::to_string(i % 250 + 1), 80,
                       static_cast<std::uint32_t>(weight_of(i))));
  return out;
}
inline std::vector<dynup::Peer> numbered_peers(std::size_t n) {
  return numbered_peers(n, [](std::size_t) { return 1; });
}

/// A policy from make_policy; fails the test on error.
inline std::unique_ptr<dynup::Policy> make(const std::string& name, const nlohmann::json& options = nullptr) {
  auto p = dynup::make_policy(name, options);
  if (!p) FAIL("make_policy(" << name << "): " << p.error().message());
  return std::move(p).value();
}

/// Every peer of `set` except the one at `keep`, as already tried.
inline dynup::TriedPeers all_but(const dynup::PeerSet& set, std::size_t keep) {
  dynup::TriedPeers t;
  for (std::size_t i = 0; i < set.size(); ++i)
    if (i != keep) t.add(dynup::peer_id_hash(set[i].id));
  return t;
}

/// The selection of the peer at `index`, obtained by a pick that excludes every other.
inline dynup::Selection select_index(const dynup::Picker& picker, std::size_t index) {
  dynup::TriedPeers tried = all_but(*picker.set(), index);
  dynup::PickContext ctx;
  ctx.tried = &tried;
  dynup::Selection s = picker.pick(ctx);
  REQUIRE(s);
  REQUIRE(s.index == index);
  return s;
}

/// Index of the peer whose id is `id` in `set`.
inline std::size_t index_of(const dynup::PeerSet& set, const std::string& id) {
  for (std::size_t i = 0; i < set.size(); ++i)
    if (set[i].id == id) return i;
  FAIL("no peer " << id);
  return 0;
}

} // namespace dynup_test
