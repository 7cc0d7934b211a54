#include <dynup/balance/policy.hpp>
#include <dynup/balance/ring_hash.hpp>
#include <dynup/detail/crc32.hpp>

#include "support/allocations.hpp"
#include "support/picking.hpp"
#include <doctest/doctest.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace {

using dynup::HealthView;
using dynup::Peer;
using dynup::PickContext;
using dynup::PickError;
using dynup::RingHashPicker;
using dynup::Selection;
using dynup::Snapshot;
using dynup::TriedPeers;
using dynup::detail::HashRing;
using dynup::detail::RingPoint;

using dynup_test::make;
using dynup_test::numbered_peers;
using dynup_test::peer;
using dynup_test::snapshot;

// The textbook one-bit-at-a-time CRC-32 (reflected 0xEDB88320), independent of the
// table-driven code under test. `state` is the raw register (no final complement).
std::uint32_t bitwise_crc_update(std::uint32_t state, const std::string& bytes) {
  for (unsigned char b : bytes) {
    state ^= b;
    for (int k = 0; k < 8; ++k) state = (state & 1u) ? (state >> 1) ^ 0xEDB88320u : state >> 1;
  }
  return state;
}
std::uint32_t bitwise_crc(const std::string& bytes) { return ~bitwise_crc_update(0xFFFFFFFFu, bytes); }
std::string le32(std::uint32_t v) {
  return std::string{static_cast<char>(v & 0xFF), static_cast<char>((v >> 8) & 0xFF),
                     static_cast<char>((v >> 16) & 0xFF), static_cast<char>(v >> 24)};
}
// nginx's first `count` ketama points of a server given as host and port, from scratch.
std::vector<std::uint32_t> reference_points(const std::string& host, const std::string& port, int count) {
  std::uint32_t base = bitwise_crc_update(0xFFFFFFFFu, host + std::string(1, '\0') + port);
  std::vector<std::uint32_t> out;
  std::uint32_t prev = 0;
  for (int j = 0; j < count; ++j) out.push_back(prev = ~bitwise_crc_update(base, le32(prev)));
  return out;
}

const RingHashPicker& as_ring(const std::shared_ptr<const dynup::Picker>& p) {
  auto r = dynamic_cast<const RingHashPicker*>(p.get());
  REQUIRE(r != nullptr);
  return *r;
}

bool ring_has(const HashRing& ring, std::uint32_t hash, std::uint32_t peer_index) {
  auto it = std::lower_bound(ring.begin(), ring.end(), hash,
                             [](const RingPoint& p, std::uint32_t h) { return p.hash < h; });
  return it != ring.end() && it->hash == hash && it->peer == peer_index;
}

// The ring lookup by definition: first point with hash >= h, else the first point.
std::size_t naive_find(const HashRing& ring, std::uint32_t h) {
  for (std::size_t i = 0; i < ring.size(); ++i)
    if (ring[i].hash >= h) return i;
  return 0;
}

std::string id_for(const dynup::Picker& picker, const std::string& key, const TriedPeers* tried = nullptr) {
  Selection s = picker.pick(PickContext{key, tried});
  REQUIRE(s);
  return s.peer->id;
}

std::string key_name(int i) { return "key" + std::to_string(i); }

} // namespace

TEST_CASE("ring_hash hashes with the IEEE CRC-32 of zlib and nginx") {
  CHECK(dynup::detail::crc32("123456789") == 0xCBF43926u);
  CHECK(dynup::detail::crc32("") == 0u);
  CHECK(bitwise_crc("123456789") == 0xCBF43926u);
  // Every length 0..40 crosses the slicing-by-8 loop and its byte tail differently.
  std::string s;
  for (int n = 0; n <= 40; ++n) {
    CAPTURE(n);
    CHECK(dynup::detail::crc32(s) == bitwise_crc(s));
    s.push_back(static_cast<char>(n * 37 + 11));
  }
  CHECK(dynup::detail::crc32_update_u32(0x12345678u, 0xA1B2C3D4u) == bitwise_crc_update(0x12345678u, le32(0xA1B2C3D4u)));
}

TEST_CASE("the ring holds nginx's ketama points for 127.0.0.1:8080, chained from the first") {
  auto ref = reference_points("127.0.0.1", "8080", 160);
  auto policy = make("ring_hash");
  Snapshot set = snapshot({peer("127.0.0.1", 8080), peer("127.0.0.1", 8081)});
  auto picker = policy->build(set);
  const HashRing& ring = as_ring(picker).ring(0);
  std::uint32_t index = static_cast<std::uint32_t>(dynup_test::index_of(*set, "127.0.0.1:8080"));
  CHECK(ring_has(ring, ref[0], index));
  CHECK(ring_has(ring, ref[1], index));
  CHECK(ring_has(ring, ref[159], index));
  CHECK(ring.size() == 320); // 160 per weight, no collision between these two servers
  CHECK(as_ring(picker).exact());
}

TEST_CASE("ring_hash splits a server into host and port at the last colon followed only by digits") {
  auto base = [](const std::string& host, const std::string& port) {
    return bitwise_crc_update(0xFFFFFFFFu, host + std::string(1, '\0') + port);
  };
  CHECK(dynup::detail::ketama_base("10.0.0.1:80") == base("10.0.0.1", "80"));
  CHECK(dynup::detail::ketama_base("[::1]:8080") == base("[::1]", "8080"));
  CHECK(dynup::detail::ketama_base("backend.example") == base("backend.example", ""));
  CHECK(dynup::detail::ketama_base("host:8x") == base("host:8x", ""));
  CHECK(dynup::detail::ketama_base("unix:/run/app.sock") == base("/run/app.sock", ""));
}

TEST_CASE("ring_hash maps keys to the servers real nginx 1.22.1 chose") {
  // Captured from nginx 1.22.1, `hash $arg_key consistent;` with these server lines,
  // requesting /?key=key0 .. key1999 (server i: 127.0.0.1:(18081+i) weight=(1+i%3)).
  std::vector<Peer> peers;
  for (int i = 0; i < 10; ++i) peers.push_back(peer("127.0.0.1", static_cast<std::uint16_t>(18081 + i), 1 + i % 3));
  auto picker = make("ring_hash")->build(snapshot(peers));
  const char* first[] = {"18083", "18081", "18083", "18083", "18088", "18081", "18090", "18090", "18083", "18082",
                         "18083", "18089", "18083", "18083", "18088", "18083", "18084", "18086", "18089", "18082",
                         "18082", "18082", "18082", "18087", "18086", "18089", "18083", "18089", "18082", "18085",
                         "18085", "18087", "18087", "18083", "18088", "18084", "18089", "18086", "18086", "18084"};
  for (int k = 0; k < 40; ++k) {
    CAPTURE(k);
    CHECK(id_for(*picker, key_name(k)) == std::string("127.0.0.1:") + first[k]);
  }
  std::map<std::string, int> counts;
  for (int k = 0; k < 2000; ++k) ++counts[id_for(*picker, key_name(k))];
  const int nginx_counts[] = {113, 237, 351, 93, 214, 301, 85, 180, 329, 97};
  for (int i = 0; i < 10; ++i) {
    CAPTURE(i);
    CHECK(counts["127.0.0.1:" + std::to_string(18081 + i)] == nginx_counts[i]);
  }

  // Same nginx, servers 0..4 written as [::1]:port.
  for (int i = 0; i < 5; ++i) peers[static_cast<std::size_t>(i)].host = "::1";
  auto v6 = make("ring_hash")->build(snapshot(peers));
  CHECK(id_for(*v6, "key0") == "[::1]:18082");
  CHECK(id_for(*v6, "key2") == "127.0.0.1:18089");
  CHECK(id_for(*v6, "key9") == "[::1]:18083");
  counts.clear();
  for (int k = 0; k < 2000; ++k) ++counts[id_for(*v6, key_name(k))];
  const int nginx_v6_counts[] = {101, 246, 325, 119, 203, 298, 83, 204, 307, 114};
  for (int i = 0; i < 10; ++i) {
    CAPTURE(i);
    std::string id = (i < 5 ? "[::1]:" : "127.0.0.1:") + std::to_string(18081 + i);
    CHECK(counts[id] == nginx_v6_counts[i]);
  }
}

TEST_CASE("ring find returns the first point at or above the hash and wraps past the last") {
  for (std::size_t peers : {1u, 3u, 40u, 700u}) {
    CAPTURE(peers);
    auto picker = make("ring_hash")->build(snapshot(numbered_peers(peers, [](std::size_t i) { return 1 + i % 4; })));
    const HashRing& ring = as_ring(picker).ring(0);
    REQUIRE(ring.size() > 0);
    CHECK(std::is_sorted(ring.begin(), ring.end(), [](const RingPoint& a, const RingPoint& b) { return a.hash < b.hash; }));
    CHECK(std::adjacent_find(ring.begin(), ring.end(), [](const RingPoint& a, const RingPoint& b) {
            return a.hash == b.hash;
          }) == ring.end());
    std::vector<std::uint32_t> probes = {0u, 1u, 0xFFFFFFFFu, ring[0].hash, ring[ring.size() - 1].hash,
                                         ring[ring.size() - 1].hash + 1};
    std::uint64_t state = 12345;
    for (int i = 0; i < 3000; ++i) probes.push_back(static_cast<std::uint32_t>(dynup::detail::splitmix64(state)));
    for (std::size_t i = 0; i < ring.size(); i += 1 + ring.size() / 500) {
      probes.push_back(ring[i].hash);
      probes.push_back(ring[i].hash - 1);
      probes.push_back(ring[i].hash + 1);
    }
    std::size_t mismatches = 0;
    for (std::uint32_t h : probes)
      if (ring.find(h) != naive_find(ring, h)) ++mismatches;
    CHECK(mismatches == 0);
  }
}

TEST_CASE("ring points of equal hash keep the first in input order, which the picker makes id order") {
  std::vector<RingPoint> in = {{700, 4}, {5, 9}, {5, 2}, {90, 1}, {5, 3}, {700, 0}, {1u << 31, 8}};
  dynup::detail::RingScratch scratch;
  HashRing ring(in.data(), in.size(), scratch);
  REQUIRE(ring.size() == 4);
  CHECK(ring[0].hash == 5);
  CHECK(ring[0].peer == 9);
  CHECK(ring[1].hash == 90);
  CHECK(ring[2].hash == 700);
  CHECK(ring[2].peer == 4);
  CHECK(ring[3].hash == 1u << 31);
  CHECK(ring.find(6) == 1);
  CHECK(ring.find((1u << 31) + 1) == 0);
}

TEST_CASE("ring_hash gives two peers with the same host:port text to the first in id order") {
  // Same server text, same points: nginx shares them between its peers of one server
  // line; dynup keeps the first peer's, and the second takes keys only on retries.
  Peer a = peer("10.0.0.1", 80), b = peer("10.0.0.1", 80), c = peer("10.0.0.2", 80);
  a.id = "a";
  b.id = "b";
  auto picker = make("ring_hash")->build(snapshot({b, a, c}));
  int on_b = 0;
  for (int k = 0; k < 2000; ++k) on_b += id_for(*picker, key_name(k)) == "b";
  CHECK(on_b == 0);
  TriedPeers tried;
  tried.add(dynup::peer_id_hash("a"));
  tried.add(dynup::peer_id_hash("10.0.0.2:80"));
  CHECK(id_for(*picker, "key1", &tried) == "b");
}

TEST_CASE("a large ring sorts and indexes exactly like a stable sort") {
  // Enough points for both radix levels; random hashes with forced duplicates.
  std::vector<RingPoint> in;
  std::uint64_t state = 99;
  for (std::uint32_t i = 0; i < 300000; ++i) in.push_back({static_cast<std::uint32_t>(dynup::detail::splitmix64(state)), i % 5000});
  for (std::uint32_t i = 0; i < 1000; ++i) in.push_back({in[i * 7].hash, 4999 - i % 100});
  std::vector<RingPoint> expect = in;
  std::stable_sort(expect.begin(), expect.end(), [](const RingPoint& a, const RingPoint& b) { return a.hash < b.hash; });
  expect.erase(std::unique(expect.begin(), expect.end(), [](const RingPoint& a, const RingPoint& b) { return a.hash == b.hash; }),
               expect.end());
  dynup::detail::RingScratch scratch;
  HashRing ring(in.data(), in.size(), scratch);
  REQUIRE(ring.size() == expect.size());
  std::size_t differ = 0;
  for (std::size_t i = 0; i < expect.size(); ++i)
    if (ring[i].hash != expect[i].hash || ring[i].peer != expect[i].peer) ++differ;
  CHECK(differ == 0);
  std::size_t mismatches = 0;
  for (int i = 0; i < 20000; ++i) {
    auto h = static_cast<std::uint32_t>(dynup::detail::splitmix64(state));
    auto it = std::lower_bound(expect.begin(), expect.end(), h, [](const RingPoint& p, std::uint32_t x) { return p.hash < x; });
    std::size_t want = it == expect.end() ? 0 : static_cast<std::size_t>(it - expect.begin());
    if (ring.find(h) != want) ++mismatches;
  }
  CHECK(mismatches == 0);
}

TEST_CASE("two ring_hash builds map every key to the same peer") {
  auto peers = numbered_peers(50, [](std::size_t i) { return 1 + i % 7; });
  auto a = make("ring_hash")->build(snapshot(peers));
  std::reverse(peers.begin(), peers.end()); // input order must not matter
  auto b = make("ring_hash")->build(snapshot(peers));
  std::size_t differ = 0;
  for (int k = 0; k < 20000; ++k)
    if (id_for(*a, key_name(k)) != id_for(*b, key_name(k))) ++differ;
  CHECK(differ == 0);
}

TEST_CASE("ring_hash spreads keys in proportion to weight and exactly by arc length") {
  // 8 peers, weights 1..4 twice: 1 600 points.
  auto policy = make("ring_hash");
  Snapshot set = snapshot(numbered_peers(8, [](std::size_t i) { return 1 + i % 4; }));
  auto picker = policy->build(set);
  const HashRing& ring = as_ring(picker).ring(0);

  // Each peer's exact share of the hash space: the arcs ending at its points.
  std::vector<double> arc(set->size(), 0.0);
  for (std::size_t i = 0; i < ring.size(); ++i) {
    double from = i == 0 ? static_cast<double>(ring[ring.size() - 1].hash) - 4294967296.0 : ring[i - 1].hash;
    arc[ring[i].peer] += (ring[i].hash - from) / 4294967296.0;
  }
  constexpr int keys = 200000;
  std::vector<double> count(set->size(), 0.0);
  for (int k = 0; k < keys; ++k) count[picker->pick(PickContext{"user-" + std::to_string(k), nullptr}).index] += 1;

  // Keys follow the arcs: chi-square with 7 degrees of freedom; 24.3 is its 0.999
  // quantile, so a correct lookup fails this (fixed, deterministic) input 1 time in 1000.
  double chi2 = 0;
  for (std::size_t i = 0; i < arc.size(); ++i) chi2 += (count[i] - keys * arc[i]) * (count[i] - keys * arc[i]) / (keys * arc[i]);
  CHECK(chi2 < 24.3);

  // Arcs follow weights: with 160·w points a share's relative standard deviation is
  // about 1/sqrt(160·w) ≤ 8%; 30% is almost 4 of them.
  double total_weight = 20;
  for (std::size_t i = 0; i < set->size(); ++i) {
    CAPTURE(i);
    double expected = (*set)[i].weight / total_weight;
    CHECK(count[i] / keys == doctest::Approx(expected).epsilon(0.30));
  }
}

TEST_CASE("ring_hash: removing one of N peers moves only that peer's keys, about 1/N of them") {
  constexpr std::size_t n = 10;
  constexpr int keys = 50000;
  auto peers = numbered_peers(n);
  auto policy = make("ring_hash");
  auto before = policy->build(snapshot(peers));
  Peer removed = peers[3];
  std::string removed_id = dynup::host_port(removed.host, removed.port); // the default id
  peers.erase(peers.begin() + 3);
  auto after = policy->build(snapshot(peers));
  int moved = 0, wrongly_moved = 0;
  for (int k = 0; k < keys; ++k) {
    std::string a = id_for(*before, key_name(k)), b = id_for(*after, key_name(k));
    if (a == b) continue;
    ++moved;
    if (a != removed_id) ++wrongly_moved;
  }
  // The other peers' points are unchanged, so no other key may move; the removed peer
  // held 1/N of the keys up to the ring's ±8% per-peer spread (1.5/N is 6 sigma).
  CHECK(wrongly_moved == 0);
  CHECK(moved > 0);
  CHECK(static_cast<double>(moved) / keys <= 1.5 / n);

  // Adding it back restores every key.
  peers.insert(peers.begin() + 3, removed);
  auto again = policy->build(snapshot(peers));
  int differ = 0;
  for (int k = 0; k < keys; ++k)
    if (id_for(*before, key_name(k)) != id_for(*again, key_name(k))) ++differ;
  CHECK(differ == 0);
}

TEST_CASE("a retry goes to the next distinct peer on the ring, as nginx's next point") {
  auto policy = make("ring_hash");
  Snapshot set = snapshot(numbered_peers(6, [](std::size_t i) { return 1 + i % 3; }));
  auto picker = policy->build(set);
  const HashRing& ring = as_ring(picker).ring(0);
  for (int k = 0; k < 200; ++k) {
    std::string key = key_name(k);
    TriedPeers tried;
    std::size_t at = ring.find(dynup::detail::crc32(key));
    for (std::size_t attempt = 0; attempt < set->size(); ++attempt) {
      Selection s = picker->pick(PickContext{key, &tried});
      REQUIRE(s);
      // Expected: walk the points from the key's point, skipping tried peers.
      while (tried.contains(dynup::peer_id_hash((*set)[ring[at].peer].id))) at = (at + 1) % ring.size();
      CHECK(s.index == ring[at].peer);
      tried.add(s.id_hash);
    }
    Selection none = picker->pick(PickContext{key, &tried});
    CHECK_FALSE(none);
    CHECK(none.error == PickError::all_tried);
  }
}

TEST_CASE("ring_hash never picks an unavailable peer, and its keys go where a retry would") {
  auto policy = make("ring_hash");
  Snapshot set = snapshot(numbered_peers(8));
  auto full = policy->build(set);
  HealthView health = HealthView::from_registry(*set);
  health.peers[5].available = false;
  auto degraded = policy->build(set, health);
  TriedPeers down;
  down.add(dynup::peer_id_hash((*set)[5].id));
  int moved = 0;
  for (int k = 0; k < 5000; ++k) {
    std::string key = key_name(k);
    Selection s = degraded->pick(PickContext{key, nullptr});
    REQUIRE(s);
    CHECK(s.index != 5);
    // nginx walks past a down server's points exactly like past a tried one.
    CHECK(s.peer->id == id_for(*full, key, &down));
    if (s.peer->id != id_for(*full, key)) ++moved;
  }
  CHECK(moved > 0);

  for (auto& c : health.peers) c.available = false;
  auto none = policy->build(set, health);
  CHECK(none->pick(PickContext{"key", nullptr}).error == PickError::all_unavailable);
  CHECK(none->pick(PickContext{"", nullptr}).error == PickError::all_unavailable);
}

TEST_CASE("ring_hash backups have their own ring, used only when no primary is usable") {
  auto peers = numbered_peers(6);
  peers[4].backup = true;
  peers[5].backup = true;
  Snapshot set = snapshot(peers);
  auto picker = make("ring_hash")->build(set);
  CHECK(as_ring(picker).ring(0).size() == 4 * 160);
  CHECK(as_ring(picker).ring(1).size() == 2 * 160);
  TriedPeers primaries;
  for (std::size_t i = 0; i < 4; ++i) primaries.add(dynup::peer_id_hash((*set)[i].id));
  int on_first_backup = 0;
  for (int k = 0; k < 2000; ++k) {
    std::string key = key_name(k);
    CHECK_FALSE(picker->pick(PickContext{key, nullptr}).peer->backup);
    Selection s = picker->pick(PickContext{key, &primaries});
    REQUIRE(s);
    CHECK(s.peer->backup);
    CHECK(s.index == as_ring(picker).ring(1)[as_ring(picker).ring(1).find(dynup::detail::crc32(key))].peer);
    on_first_backup += s.index == 4;
  }
  CHECK(on_first_backup > 600); // both backups share the keys (≈1000 each)
  CHECK(on_first_backup < 1400);
}

TEST_CASE("ring_hash points_per_weight sets the points per unit of weight and is range-checked") {
  auto p = dynup::make_policy("ring_hash", {{"points_per_weight", 40}});
  REQUIRE(p);
  auto picker = p.value()->build(snapshot({peer("10.0.0.1", 80, 2), peer("10.0.0.2", 80, 1)}));
  CHECK(as_ring(picker).ring(0).size() == 120);

  for (const nlohmann::json& bad : {nlohmann::json{{"points_per_weight", 0}}, nlohmann::json{{"points_per_weight", 1001}},
                                    nlohmann::json{{"points_per_weight", "many"}},
                                    nlohmann::json{{"points_per_weight", -5}}}) {
    CAPTURE(bad.dump());
    auto r = dynup::make_policy("ring_hash", bad);
    REQUIRE_FALSE(r);
    CHECK(r.error().code() == dynup::Errc::invalid_argument);
    CHECK(r.error().message().find("points_per_weight") != std::string::npos);
    CHECK(r.error().message().find("1..1000") != std::string::npos);
  }
  auto unknown = dynup::make_policy("ring_hash", {{"replicas", 160}});
  REQUIRE_FALSE(unknown);
  CHECK(unknown.error().message().find("(valid: points_per_weight)") != std::string::npos);
}

TEST_CASE("ring_hash picks with keys and long retry walks do not allocate") {
  auto picker = make("ring_hash")->build(snapshot(numbered_peers(200)));
  TriedPeers tried; // 60 tried peers: walks past many points, still inline storage
  for (std::size_t i = 0; i < 60; ++i) tried.add(dynup::peer_id_hash((*picker->set())[i].id));
  std::vector<std::string> keys;
  for (int k = 0; k < 1000; ++k) keys.push_back("session-" + std::to_string(k) + "-with-a-longer-tail");
  std::size_t picked = 0;
  dynup_test::AllocationCount count;
  for (const std::string& key : keys) {
    picked += static_cast<bool>(picker->pick(PickContext{key, nullptr}));
    picked += static_cast<bool>(picker->pick(PickContext{key, &tried}));
  }
  CHECK(count.value() == 0);
  CHECK(picked == 2 * keys.size());
}
