// Small builders for peers and sets used across unit tests.
#pragma once

#include <dynup/peer_set.hpp>

#include <doctest/doctest.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace dynup_test {

inline dynup::Peer peer(const std::string& host, std::uint16_t port, std::uint32_t weight = 1) {
  dynup::Peer p;
  p.host = host;
  p.port = port;
  p.weight = weight;
  return p;
}

/// A validated set; fails the current test if the peers are invalid.
inline dynup::PeerSet make_set(std::vector<dynup::Peer> peers, std::uint64_t index = 0) {
  auto s = dynup::PeerSet::make(std::move(peers), index);
  REQUIRE(s);
  return std::move(s).value();
}

} // namespace dynup_test
