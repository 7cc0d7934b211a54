#include <dynup/balance/maglev.hpp>
#include <dynup/balance/policy.hpp>

#include "support/allocations.hpp"
#include "support/picking.hpp"
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace {

using dynup::HealthView;
using dynup::MaglevPicker;
using dynup::Peer;
using dynup::PickContext;
using dynup::PickError;
using dynup::Selection;
using dynup::Snapshot;
using dynup::TriedPeers;

using dynup_test::make;
using dynup_test::numbered_peers;
using dynup_test::peer;
using dynup_test::snapshot;

const MaglevPicker& as_maglev(const std::shared_ptr<const dynup::Picker>& p) {
  auto m = dynamic_cast<const MaglevPicker*>(p.get());
  REQUIRE(m != nullptr);
  return *m;
}

std::string id_for(const dynup::Picker& picker, const std::string& key, const TriedPeers* tried = nullptr) {
  Selection s = picker.pick(PickContext{key, tried});
  REQUIRE(s);
  return s.peer->id;
}

std::string key_name(int i) { return "key" + std::to_string(i); }

// Share of table slots whose peer id differs between two pickers, split into slots the
// removed peer held and all others.
struct Moved {
  double own = 0, others = 0;
};
Moved moved_slots(const MaglevPicker& before, const MaglevPicker& after, const std::string& removed_id) {
  const auto& a = before.table(0);
  const auto& b = after.table(0);
  REQUIRE(a.size() == b.size());
  std::size_t own = 0, others = 0;
  for (std::size_t s = 0; s < a.size(); ++s) {
    const std::string& x = (*before.set())[a[s]].id;
    if (x == removed_id)
      ++own;
    else if (x != (*after.set())[b[s]].id)
      ++others;
  }
  return {static_cast<double>(own) / a.size(), static_cast<double>(others) / a.size()};
}

} // namespace

TEST_CASE("maglev tells primes from non-primes and finds the next prime") {
  CHECK_FALSE(dynup::detail::is_prime(0));
  CHECK_FALSE(dynup::detail::is_prime(1));
  CHECK(dynup::detail::is_prime(2));
  CHECK(dynup::detail::is_prime(65537));
  CHECK_FALSE(dynup::detail::is_prime(65536));
  CHECK_FALSE(dynup::detail::is_prime(65535));
  CHECK(dynup::detail::is_prime(5000011));
  CHECK_FALSE(dynup::detail::is_prime(4294967297ull)); // 641 × 6700417
  CHECK(dynup::detail::next_prime(65536) == 65537);
  CHECK(dynup::detail::next_prime(100) == 101);
}

TEST_CASE("maglev walk offsets lie in [0, M) and skips in [1, M-1], so a walk visits every slot") {
  for (std::uint64_t m : {2ull, 3ull, 7ull, 65537ull}) {
    for (int i = 0; i < 200; ++i) {
      auto w = dynup::detail::MaglevWalk::of("peer-" + std::to_string(i), m);
      CHECK(w.offset < m);
      CHECK(w.skip >= 1);
      CHECK(w.skip < std::max<std::uint64_t>(m, 2));
    }
  }
}

TEST_CASE("two maglev builds give the same table and the same peer for every key") {
  auto peers = numbered_peers(40, [](std::size_t i) { return 1 + i % 5; });
  auto a = make("maglev")->build(snapshot(peers));
  std::reverse(peers.begin(), peers.end());
  auto b = make("maglev")->build(snapshot(peers));
  CHECK(as_maglev(a).table(0) == as_maglev(b).table(0));
  std::size_t differ = 0;
  for (int k = 0; k < 20000; ++k)
    if (id_for(*a, key_name(k)) != id_for(*b, key_name(k))) ++differ;
  CHECK(differ == 0);
}

TEST_CASE("maglev key hash and table are pinned across versions and platforms") {
  // A change here remaps keys in every deployment: it must be deliberate.
  CHECK(dynup::detail::maglev_key_hash("user-42") == 0xa66ad8cc9208fb5bULL);
  dynup::MaglevPolicy policy(101);
  auto picker = policy.build(snapshot(numbered_peers(3, [](std::size_t i) { return 1 + i; })));
  const auto& table = as_maglev(picker).table(0);
  const std::vector<std::uint32_t> first16 = {2, 2, 1, 2, 2, 1, 2, 1, 0, 2, 1, 2, 1, 1, 2, 1};
  CHECK(std::vector<std::uint32_t>(table.begin(), table.begin() + 16) == first16);
}

TEST_CASE("maglev gives each peer table slots in proportion to its weight, within one slot") {
  for (std::uint64_t m : {65537ull, 1009ull}) {
    CAPTURE(m);
    auto policy = make("maglev", {{"table_size", m}});
    Snapshot set = snapshot(numbered_peers(12, [](std::size_t i) { return 1 + (i * 7) % 10; }));
    auto picker = policy->build(set);
    const auto& table = as_maglev(picker).table(0);
    REQUIRE(table.size() == m);
    std::vector<double> slots(set->size(), 0);
    for (std::uint32_t i : table) slots.at(i) += 1;
    double total_weight = 0;
    for (const Peer& p : *set) total_weight += p.weight;
    for (std::size_t i = 0; i < set->size(); ++i) {
      CAPTURE(i);
      // Stride scheduling keeps every peer within one turn of weight × elapsed time.
      CHECK(std::fabs(slots[i] - m * (*set)[i].weight / total_weight) <= 1.0);
    }
  }
}

TEST_CASE("maglev keys follow the table shares") {
  Snapshot set = snapshot(numbered_peers(6, [](std::size_t i) { return 1 + i; }));
  auto picker = make("maglev")->build(set);
  const auto& table = as_maglev(picker).table(0);
  std::vector<double> share(set->size(), 0), count(set->size(), 0);
  for (std::uint32_t i : table) share[i] += 1.0 / table.size();
  constexpr int keys = 200000;
  for (int k = 0; k < keys; ++k) count[picker->pick(PickContext{"user-" + std::to_string(k), nullptr}).index] += 1;
  // Chi-square, 5 degrees of freedom: 20.5 is the 0.999 quantile (this fixed key set
  // passes or fails deterministically; a uniform key hash fails 1 set in 1000).
  double chi2 = 0;
  for (std::size_t i = 0; i < share.size(); ++i) chi2 += std::pow(count[i] - keys * share[i], 2) / (keys * share[i]);
  CHECK(chi2 < 20.5);
}

TEST_CASE("removing one of N maglev peers moves its slots and about 1% of the others") {
  for (std::size_t n : {10u, 100u}) {
    CAPTURE(n);
    auto peers = numbered_peers(n);
    auto policy = make("maglev");
    auto before = policy->build(snapshot(peers));
    std::string removed_id = dynup::host_port(peers[n / 3].host, peers[n / 3].port);
    peers.erase(peers.begin() + static_cast<std::ptrdiff_t>(n / 3));
    auto after = policy->build(snapshot(peers));
    Moved m = moved_slots(as_maglev(before), as_maglev(after), removed_id);
    // The removed peer held 1/N of the slots (within one slot); Maglev's other
    // movement, from the remaining peers' turns shifting, is under 1% at M >= 100·N
    // (0.2% and 0.6% here; the paper reports the same order).
    CHECK(m.own == doctest::Approx(1.0 / n).epsilon(0.01));
    CHECK(m.others < 0.01);

    // Keys move the same way: a key moves iff its slot changed peer.
    int key_moved = 0;
    constexpr int keys = 20000;
    for (int k = 0; k < keys; ++k) key_moved += id_for(*before, key_name(k)) != id_for(*after, key_name(k));
    CHECK(static_cast<double>(key_moved) / keys < 1.0 / n + 0.02);
  }
}

TEST_CASE("a maglev retry probes the following slots past tried peers") {
  Snapshot set = snapshot(numbered_peers(7, [](std::size_t i) { return 1 + i % 3; }));
  auto picker = make("maglev")->build(set);
  const auto& table = as_maglev(picker).table(0);
  for (int k = 0; k < 200; ++k) {
    std::string key = key_name(k);
    std::size_t slot = MaglevPicker::slot_of(dynup::detail::maglev_key_hash(key), table.size());
    TriedPeers tried;
    Selection first = picker->pick(PickContext{key, &tried});
    REQUIRE(first);
    CHECK(first.index == table[slot]);
    tried.add(first.id_hash);
    Selection second = picker->pick(PickContext{key, &tried});
    REQUIRE(second);
    CHECK(second.index != first.index);
    std::size_t s = slot;
    while (table[s] == first.index) s = (s + 1) % table.size();
    CHECK(second.index == table[s]);
    // The same retry gives the same answer: deterministic per key.
    CHECK(picker->pick(PickContext{key, &tried}).index == second.index);
    for (std::size_t i = 0; i < set->size(); ++i) tried.add(dynup::peer_id_hash((*set)[i].id));
    CHECK(picker->pick(PickContext{key, &tried}).error == PickError::all_tried);
  }
}

TEST_CASE("maglev never picks an unavailable peer and leaves it out of the table") {
  Snapshot set = snapshot(numbered_peers(5));
  HealthView health = HealthView::from_registry(*set);
  health.peers[1].available = false;
  auto picker = make("maglev")->build(set, health);
  for (std::uint32_t i : as_maglev(picker).table(0)) CHECK(i != 1);
  for (int k = 0; k < 3000; ++k) CHECK(picker->pick(PickContext{key_name(k), nullptr}).index != 1);
  for (auto& c : health.peers) c.available = false;
  auto none = make("maglev")->build(set, health);
  CHECK(none->pick(PickContext{"key", nullptr}).error == PickError::all_unavailable);
  CHECK(none->pick(PickContext{"", nullptr}).error == PickError::all_unavailable);
}

TEST_CASE("maglev backups have their own table, used only when no primary is usable") {
  auto peers = numbered_peers(6);
  peers[4].backup = true;
  peers[5].backup = true;
  Snapshot set = snapshot(peers);
  auto picker = make("maglev")->build(set);
  CHECK(as_maglev(picker).table(1).size() == 65537);
  for (std::uint32_t i : as_maglev(picker).table(0)) CHECK_FALSE((*set)[i].backup);
  for (std::uint32_t i : as_maglev(picker).table(1)) CHECK((*set)[i].backup);
  TriedPeers primaries;
  for (std::size_t i = 0; i < 4; ++i) primaries.add(dynup::peer_id_hash((*set)[i].id));
  int on_first = 0;
  for (int k = 0; k < 2000; ++k) {
    CHECK_FALSE(picker->pick(PickContext{key_name(k), nullptr}).peer->backup);
    Selection s = picker->pick(PickContext{key_name(k), &primaries});
    REQUIRE(s);
    CHECK(s.peer->backup);
    on_first += s.index == 4;
  }
  CHECK(on_first > 800); // two equal backups share the keys (≈1000 each)
  CHECK(on_first < 1200);
}

TEST_CASE("maglev table_size must be a prime in range, and errors say so") {
  auto bad = [](const nlohmann::json& options) {
    auto r = dynup::make_policy("maglev", options);
    REQUIRE_FALSE(r);
    CHECK(r.error().code() == dynup::Errc::invalid_argument);
    return r.error().message();
  };
  std::string not_prime = bad({{"table_size", 65536}});
  CHECK(not_prime.find("prime") != std::string::npos);
  CHECK(not_prime.find("65521") != std::string::npos);
  CHECK(not_prime.find("65537") != std::string::npos);
  CHECK(bad({{"table_size", 1}}).find("table_size") != std::string::npos);
  CHECK(bad({{"table_size", 5000012}}).find("5000011") != std::string::npos);
  CHECK(bad({{"table_size", "big"}}).find("table_size") != std::string::npos);
  CHECK(bad({{"slots", 7}}).find("(valid: table_size)") != std::string::npos);

  auto ok = dynup::make_policy("maglev", {{"table_size", 101}});
  REQUIRE(ok);
  auto picker = ok.value()->build(snapshot(numbered_peers(3)));
  CHECK(as_maglev(picker).table(0).size() == 101);
}

TEST_CASE("maglev reports a table smaller than the peers and builds a larger one") {
  dynup::MaglevPolicy policy(7);
  Snapshot set = snapshot(numbered_peers(12));
  auto fit = policy.check(*set);
  REQUIRE_FALSE(fit);
  CHECK(fit.error().message().find("table_size 7 is smaller than the 12 peers") != std::string::npos);
  CHECK(fit.error().message().find("1201") != std::string::npos); // next prime >= 100 × 12
  CHECK(policy.check(*snapshot(numbered_peers(7))));

  auto picker = policy.build(set);
  const auto& table = as_maglev(picker).table(0);
  CHECK(table.size() == 1201);
  std::vector<int> slots(set->size(), 0);
  for (std::uint32_t i : table) ++slots[i];
  for (int n : slots) CHECK(n >= 100); // every peer has its share
}

TEST_CASE("maglev builds a skewed table quickly and keeps the ratio") {
  // One peer at the maximum weight among 2 000 of weight 1: the turn schedule must not
  // cost weight × peers steps.
  auto peers = numbered_peers(2000);
  peers[0].weight = dynup::max_weight;
  Snapshot set = snapshot(peers);
  auto picker = make("maglev")->build(set);
  const auto& table = as_maglev(picker).table(0);
  std::vector<int> slots(set->size(), 0);
  for (std::uint32_t i : table) ++slots[i];
  std::size_t heavy = dynup_test::index_of(*set, "10.0.0.1:80");
  double expected = 65537.0 * dynup::max_weight / (dynup::max_weight + 1999);
  // Each light peer's quota is 0.97 slot and it gets 1; the heavy peer gives up those
  // 2 000 × 0.03 slots, 0.1% of its share.
  CHECK(std::fabs(slots[heavy] - expected) / expected < 0.002);
  for (std::size_t i = 0; i < slots.size(); ++i)
    if (i != heavy) CHECK(slots[i] == 1);
}

TEST_CASE("maglev picks do not allocate, keyed, keyless and on retries") {
  auto picker = make("maglev")->build(snapshot(numbered_peers(100)));
  TriedPeers tried;
  for (std::size_t i = 0; i < 60; ++i) tried.add(dynup::peer_id_hash((*picker->set())[i].id));
  std::vector<std::string> keys;
  for (int k = 0; k < 1000; ++k) keys.push_back("session-" + std::to_string(k) + "-with-a-longer-tail");
  std::size_t picked = 0;
  dynup_test::AllocationCount count;
  for (const std::string& key : keys) {
    picked += static_cast<bool>(picker->pick(PickContext{key, nullptr}));
    picked += static_cast<bool>(picker->pick(PickContext{key, &tried}));
    picked += static_cast<bool>(picker->pick(PickContext{"", &tried}));
  }
  CHECK(count.value() == 0);
  CHECK(picked == 3 * keys.size());
}
