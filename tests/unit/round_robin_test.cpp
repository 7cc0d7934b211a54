#include <dynup/balance/round_robin.hpp>

#include "support/picking.hpp"
#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

namespace {

using dynup::HealthView;
using dynup::Peer;
using dynup::PickContext;
using dynup::PickError;
using dynup::Picker;
using dynup::Selection;
using dynup::Snapshot;
using dynup::TriedPeers;

using dynup_test::make;
using dynup_test::snapshot;

Peer named(const std::string& id, std::uint32_t weight, bool backup = false) {
  Peer p = dynup_test::peer(id + ".test", 80, weight);
  p.id = id;
  p.backup = backup;
  return p;
}

// Peers "a", "b", ... with these weights.
Snapshot lettered(const std::vector<std::uint32_t>& weights) {
  std::vector<Peer> peers;
  for (std::size_t i = 0; i < weights.size(); ++i)
    peers.push_back(named(std::string(1, static_cast<char>('a' + i)), weights[i]));
  return snapshot(std::move(peers));
}

std::unique_ptr<dynup::Policy> pinned(std::int64_t start = 0) { return make("round_robin", {{"start", start}}); }

// The ids of the next `n` picks, concatenated (single-letter ids read as a sequence).
std::string picks(const Picker& p, std::size_t n, const PickContext& ctx = {}) {
  std::string out;
  for (std::size_t k = 0; k < n; ++k) {
    Selection s = p.pick(ctx);
    REQUIRE_MESSAGE(s, "pick " << k << ": " << dynup::to_string(s.error));
    out += s.peer->id;
  }
  return out;
}

std::vector<std::size_t> pick_indices(const Picker& p, std::size_t n) {
  std::vector<std::size_t> out;
  out.reserve(n);
  for (std::size_t k = 0; k < n; ++k) {
    Selection s = p.pick({});
    REQUIRE(s);
    out.push_back(s.index);
  }
  return out;
}

// nginx's ngx_http_upstream_get_peer as written there: every peer's current weight grows
// by its weight, the largest (first on ties) is chosen and loses the total. O(n) a pick.
std::vector<std::size_t> nginx_sequence(const std::vector<std::uint32_t>& w, std::size_t n) {
  std::vector<std::int64_t> current(w.size(), 0);
  std::int64_t total = std::accumulate(w.begin(), w.end(), std::int64_t{0});
  std::vector<std::size_t> out;
  for (std::size_t k = 0; k < n; ++k) {
    std::size_t best = 0;
    for (std::size_t i = 0; i < w.size(); ++i) {
      current[i] += w[i];
      if (current[i] > current[best]) best = i;
    }
    current[best] -= total;
    out.push_back(best);
  }
  return out;
}

// Ids that sort like their position: "p0000", "p0001", ...
std::vector<Peer> numbered(const std::vector<std::uint32_t>& weights) {
  std::vector<Peer> peers;
  for (std::size_t i = 0; i < weights.size(); ++i) {
    std::string n = std::to_string(i);
    Peer p = dynup_test::peer("10." + std::to_string(i / 62500) + "." + std::to_string(i / 250 % 250) + "." +
                                  std::to_string(i % 250 + 1),
                              80, weights[i]);
    p.id = "p" + std::string(5 - n.size(), '0') + n;
    peers.push_back(std::move(p));
  }
  return peers;
}

} // namespace

TEST_CASE("round_robin gives nginx's sequence a a b a c a a for weights {5,1,1}") {
  auto rr = pinned();
  auto p = rr->build(lettered({5, 1, 1}));
  CHECK(picks(*p, 14) == "aabacaaaabacaa");
}

TEST_CASE("round_robin cycles through equal weights in id order, whatever the input order") {
  auto rr = pinned();
  auto p = rr->build(snapshot({named("c", 3), named("a", 3), named("b", 3)}));
  CHECK(picks(*p, 7) == "abcabca");
}

TEST_CASE("round_robin sequence is unchanged when the weights share a divisor") {
  auto a = pinned();
  auto b = pinned();
  CHECK(picks(*a->build(lettered({10, 2, 2})), 28) == picks(*b->build(lettered({5, 1, 1})), 28));
  auto c = pinned();
  auto d = pinned();
  CHECK(picks(*c->build(lettered({6, 4, 2})), 24) == picks(*d->build(lettered({3, 2, 1})), 24));
}

TEST_CASE("round_robin matches a direct simulation of nginx's smooth weighted round robin") {
  std::mt19937 rng(12345);
  for (int round = 0; round < 60; ++round) {
    std::size_t n = 2 + rng() % 40;
    std::vector<std::uint32_t> w(n);
    // Few distinct values in some rounds, so equal-weight groups of several peers occur.
    std::uint32_t spread = round % 3 == 0 ? 3 : 20;
    for (auto& x : w) x = 1 + rng() % spread;
    std::uint64_t sum = std::accumulate(w.begin(), w.end(), std::uint64_t{0});
    CAPTURE(round);
    CAPTURE(n);
    auto rr = pinned();
    auto got = pick_indices(*rr->build(snapshot(numbered(w))), 2 * sum + 3);
    auto want = nginx_sequence(w, 2 * sum + 3);
    auto at = static_cast<std::size_t>(std::mismatch(want.begin(), want.end(), got.begin()).first - want.begin());
    CHECK_MESSAGE(at == want.size(), "first difference at pick " << at);
  }
}

TEST_CASE("round_robin serves each peer exactly its weight in one period") {
  std::vector<std::uint32_t> w{7, 3, 2, 1, 9, 4};
  auto rr = pinned(5); // any start: a period is a period
  auto seq = pick_indices(*rr->build(snapshot(numbered(w))), 26);
  std::vector<std::uint32_t> count(w.size(), 0);
  for (std::size_t i : seq) ++count[i];
  CHECK(count == w);
}

TEST_CASE("round_robin builds 10 000 peers of unequal weight and picks in constant time") {
  std::mt19937 rng(4242);
  std::vector<std::uint32_t> w(10000);
  for (auto& x : w) x = 1 + rng() % 10;
  std::uint64_t sum = std::accumulate(w.begin(), w.end(), std::uint64_t{0});
  Snapshot set = snapshot(numbered(w));
  auto rr = pinned();

  auto t0 = std::chrono::steady_clock::now();
  auto p = rr->build(set);
  auto t1 = std::chrono::steady_clock::now();
  auto seq = pick_indices(*p, static_cast<std::size_t>(sum)); // one period
  auto t2 = std::chrono::steady_clock::now();
  std::uint64_t sink = 0;
  for (std::uint64_t k = 0; k < sum; ++k) sink += p->pick({}).index; // a second period, untested
  auto t3 = std::chrono::steady_clock::now();
  CHECK(sink > 0);
  using ms = std::chrono::duration<double, std::milli>;
  MESSAGE("10 000 peers, period " << sum << ": build " << ms(t1 - t0).count() << " ms, "
                                  << std::chrono::duration<double, std::nano>(t3 - t2).count() / double(sum)
                                  << " ns per pick");

  std::vector<std::uint32_t> count(w.size(), 0);
  for (std::size_t i : seq) ++count[i];
  CHECK(count == w);
  auto head = nginx_sequence(w, 200); // O(n) a pick in the reference: a prefix is enough
  CHECK(std::equal(head.begin(), head.end(), seq.begin()));
}

TEST_CASE("round_robin builds 10 000 peers with weights up to 1 000 (a scaled period) in proportion") {
  std::mt19937 rng(777);
  std::vector<std::uint32_t> w(10000);
  for (auto& x : w) x = 1 + rng() % 1000;
  std::uint64_t sum = std::accumulate(w.begin(), w.end(), std::uint64_t{0});
  Snapshot set = snapshot(numbered(w));
  auto rr = pinned();
  auto t0 = std::chrono::steady_clock::now();
  auto p = rr->build(set);
  auto t1 = std::chrono::steady_clock::now();
  MESSAGE("10 000 peers, sum of weights " << sum << ": build "
                                          << std::chrono::duration<double, std::milli>(t1 - t0).count() << " ms");
  const std::size_t n = 2u << 20;
  std::vector<std::uint32_t> count(w.size(), 0);
  for (std::size_t k = 0; k < n; ++k) ++count[p->pick({}).index];
  double variation = 0; // total variation distance between the pick shares and the weights
  for (std::size_t i = 0; i < w.size(); ++i) variation += std::abs(count[i] / double(n) - w[i] / double(sum));
  CHECK(variation / 2 < 0.01);
}

TEST_CASE("round_robin start \"random\" starts policies and threads at different positions") {
  Snapshot set = snapshot(dynup_test::numbered_peers(1000));
  SUBCASE("policies") {
    std::set<std::size_t> firsts;
    for (int k = 0; k < 32; ++k) {
      auto rr = make("round_robin", {{"start", "random"}});
      firsts.insert(rr->build(set)->pick({}).index);
    }
    // 32 draws from 1 000: about 31.5 distinct; 24 or fewer would take 8 collisions.
    CHECK(firsts.size() >= 24);
  }
  SUBCASE("threads, with the default options") {
    auto rr = make("round_robin");
    auto p = rr->build(set);
    std::vector<std::size_t> firsts(16);
    std::vector<std::thread> threads;
    for (std::size_t t = 0; t < firsts.size(); ++t)
      threads.emplace_back([&, t] { firsts[t] = p->pick({}).index; });
    for (auto& th : threads) th.join();
    CHECK(std::set<std::size_t>(firsts.begin(), firsts.end()).size() >= 10);
  }
}

TEST_CASE("round_robin integer start pins every thread's first position, modulo the period") {
  // {5,1,1}: a a b a c a a; from position 3: a c a a a a b.
  Snapshot set = lettered({5, 1, 1});
  auto rr = pinned(3);
  auto p = rr->build(set);
  CHECK(picks(*p, 7) == "acaaaab");
  std::string other;
  std::thread([&] { other = picks(*p, 7); }).join();
  CHECK(other == "acaaaab");
  auto wrapped = pinned(7 * 1000 + 3);
  CHECK(picks(*wrapped->build(set), 7) == "acaaaab");
}

TEST_CASE("round_robin keeps each thread's position to itself") {
  Snapshot set = lettered({5, 1, 1});
  auto rr = pinned();
  auto p = rr->build(set);
  CHECK(picks(*p, 3) == "aab");

  std::atomic<int> ready{0};
  std::string seen[2];
  std::vector<std::thread> threads;
  for (int t = 0; t < 2; ++t)
    threads.emplace_back([&, t] {
      ready.fetch_add(1);
      while (ready.load() < 2) std::this_thread::yield(); // both pick at the same time
      for (int k = 0; k < 100; ++k) seen[t] += picks(*p, 7);
    });
  for (auto& th : threads) th.join();
  std::string expected;
  for (int k = 0; k < 100; ++k) expected += "aabacaa";
  CHECK(seen[0] == expected);
  CHECK(seen[1] == expected);
  CHECK(picks(*p, 4) == "acaa"); // this thread carries on where it was
}

TEST_CASE("round_robin position survives a rebuild with the same peers") {
  auto rr = pinned();
  auto first = rr->build(lettered({5, 1, 1}));
  CHECK(picks(*first, 3) == "aab");
  auto same_snapshot = rr->build(first->set());
  CHECK(picks(*same_snapshot, 2) == "ac");
  auto equal_set = rr->build(lettered({5, 1, 1})); // a new, equal set: a new version
  CHECK(picks(*equal_set, 4) == "aaaa");
  CHECK(picks(*equal_set, 3) == "bac");
}

TEST_CASE("round_robin retry skips tried peers and reports all_tried when none is left") {
  Snapshot set = lettered({5, 1, 1});
  auto rr = pinned();
  auto p = rr->build(set);
  TriedPeers tried;
  PickContext ctx;
  ctx.tried = &tried;

  tried.add(dynup::peer_id_hash("a"));
  Selection s = p->pick(ctx); // position 0 is "a": walks on to the first untried, "b"
  REQUIRE(s);
  CHECK(s.peer->id == "b");
  CHECK(s.id_hash == dynup::peer_id_hash("b"));

  tried.add(s.id_hash);
  s = p->pick(ctx);
  REQUIRE(s);
  CHECK(s.peer->id == "c");

  tried.add(s.id_hash);
  s = p->pick(ctx);
  CHECK_FALSE(s);
  CHECK(s.peer == nullptr);
  CHECK(s.error == PickError::all_tried);
}

TEST_CASE("round_robin never picks unavailable peers") {
  Snapshot set = lettered({5, 1, 1});
  SUBCASE("down in the health view: the rest keep their own sequence") {
    HealthView h = HealthView::from_registry(*set);
    h.peers[1].available = false; // b
    auto rr = pinned();
    CHECK(picks(*rr->build(set, h), 12) == "aaacaaaaacaa"); // {5,1} over a, c
  }
  SUBCASE("critical in the registry") {
    std::vector<Peer> peers{named("a", 5), named("b", 1), named("c", 1)};
    peers[0].health = dynup::Health::critical;
    auto rr = pinned();
    CHECK(picks(*rr->build(snapshot(peers)), 6) == "bcbcbc");
  }
  SUBCASE("all down") {
    HealthView h = HealthView::from_registry(*set);
    for (auto& c : h.peers) c.available = false;
    auto rr = pinned();
    Selection s = rr->build(set, h)->pick({});
    CHECK_FALSE(s);
    CHECK(s.error == PickError::all_unavailable);
  }
  SUBCASE("empty set") {
    auto rr = pinned();
    Selection s = rr->build(snapshot({}))->pick({});
    CHECK_FALSE(s);
    CHECK(s.error == PickError::no_peers);
  }
}

TEST_CASE("round_robin uses backups only when no primary is usable") {
  Snapshot set = snapshot({named("a", 1), named("b", 2), named("y", 1, true), named("z", 3, true)});
  auto rr = pinned();
  std::string normal = picks(*rr->build(set), 30);
  CHECK(normal.find_first_of("yz") == std::string::npos);

  HealthView h = HealthView::from_registry(*set);
  h.peers[0].available = false;
  h.peers[1].available = false;
  auto rr2 = pinned();
  CHECK(picks(*rr2->build(set, h), 8) == "zyzzzyzz"); // backups in their own {1,3} sequence

  TriedPeers tried;
  tried.add(dynup::peer_id_hash("a"));
  tried.add(dynup::peer_id_hash("b"));
  PickContext ctx;
  ctx.tried = &tried;
  auto rr3 = pinned();
  auto p = rr3->build(set);
  Selection s = p->pick(ctx);
  REQUIRE(s);
  CHECK(s.peer->backup);
  tried.add(dynup::peer_id_hash("y"));
  tried.add(dynup::peer_id_hash("z"));
  CHECK(p->pick(ctx).error == PickError::all_tried);
}

TEST_CASE("round_robin scales a period longer than DYNUP_RR_MAX_SCHEDULE and keeps the proportions") {
  // 40 large co-prime-ish weights and one weight 1: the period is about 2.6 million.
  std::vector<std::uint32_t> w;
  for (std::uint32_t i = 0; i < 40; ++i) w.push_back(65535 - 17 * i);
  w.push_back(1);
  std::uint64_t sum = std::accumulate(w.begin(), w.end(), std::uint64_t{0});
  REQUIRE(sum > DYNUP_RR_MAX_SCHEDULE);

  auto sched = dynup::detail::build_rr_schedule(std::vector<std::uint64_t>(w.begin(), w.end()));
  CHECK_FALSE(sched.exact);
  REQUIRE(!sched.order.empty());
  CHECK(sched.order.size() <= DYNUP_RR_MAX_SCHEDULE);
  std::vector<std::uint64_t> count(w.size(), 0);
  for (auto i : sched.order) ++count[i];
  for (std::size_t i = 0; i < w.size(); ++i) {
    CAPTURE(i);
    CHECK(count[i] >= 1); // no peer drops out
    double want = double(w[i]) / double(sum), got = double(count[i]) / double(sched.order.size());
    CHECK(std::abs(got - want) <= 5e-6);
    if (w[i] > 1000) CHECK(std::abs(got / want - 1) <= 1e-3);
  }

  // The policy routes by that schedule: shares over many picks stay within 0.5 %.
  auto rr = pinned();
  auto p = rr->build(snapshot(numbered(w)));
  std::vector<std::uint64_t> seen(w.size(), 0);
  const std::size_t n = 2 * sched.order.size();
  for (std::size_t k = 0; k < n; ++k) ++seen[p->pick({}).index];
  for (std::size_t i = 0; i + 1 < w.size(); ++i) {
    CAPTURE(i);
    CHECK(std::abs(double(seen[i]) / double(n) / (double(w[i]) / double(sum)) - 1) <= 5e-3);
  }
}

TEST_CASE("round_robin rejects bad options with an error naming the option") {
  struct Bad {
    nlohmann::json options;
    const char* names;
  };
  for (const Bad& b : {Bad{{{"start", -1}}, "\"start\""}, Bad{{{"start", "x"}}, "\"start\""},
                       Bad{{{"start", 1.5}}, "\"start\""}, Bad{{{"strat", 0}}, "\"strat\""},
                       Bad{nlohmann::json::array({1}), "object"}}) {
    CAPTURE(b.options.dump());
    auto r = dynup::make_policy("round_robin", b.options);
    REQUIRE_FALSE(r);
    CHECK(r.error().code() == dynup::Errc::invalid_argument);
    CHECK(r.error().message().find(b.names) != std::string::npos);
    CHECK(r.error().message().find("round_robin") != std::string::npos);
  }
  auto unknown = dynup::make_policy("round_robin", {{"strat", 0}});
  CHECK(unknown.error().message().find("start") != std::string::npos); // lists the valid one

  for (const nlohmann::json& ok : {nlohmann::json(), nlohmann::json::object(), nlohmann::json{{"start", "random"}},
                                   nlohmann::json{{"start", 0}}, nlohmann::json{{"start", 12345}}}) {
    CAPTURE(ok.dump());
    auto r = dynup::make_policy("round_robin", ok);
    REQUIRE_MESSAGE(r, r.error().message());
    CHECK(std::string((*r)->name()) == "round_robin");
  }
}
