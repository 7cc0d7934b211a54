#include <dynup/balance/ewma.hpp>

#include "support/picking.hpp"
#include <doctest/doctest.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace {

using dynup::EwmaPolicy;
using dynup::Outcome;
using dynup::PickContext;
using dynup::Picker;
using dynup::Selection;
using dynup::TriedPeers;

using dynup_test::numbered_peers;
using dynup_test::select_index;
using dynup_test::snapshot;

using std::chrono::milliseconds;

constexpr double ms = 1e6; // nanoseconds

// A request to peer `index` that took `latency`.
void report(const Picker& picker, std::size_t index, milliseconds latency, bool connect_failure = false) {
  Selection s = select_index(picker, index);
  picker.on_start(s);
  picker.on_finish(s, Outcome{latency, connect_failure ? 0 : 200, connect_failure});
}

double ewma_of(const Picker& picker, std::size_t index) {
  return select_index(picker, index).stats->ewma_ns.load();
}

void load(const Picker& picker, std::size_t index, int requests) {
  Selection s = select_index(picker, index);
  for (int i = 0; i < requests; ++i) picker.on_start(s);
}

// Which peer a pick chooses when `tried` excludes the others; with choice_count ≥ the
// peers left, every untried peer is compared, so the answer is deterministic.
std::size_t pick_index(const Picker& picker, const TriedPeers* tried = nullptr) {
  Selection s = picker.pick(PickContext{"", tried});
  REQUIRE(s);
  return s.index;
}

struct FakeClock {
  std::int64_t now = 1'000'000'000;
  EwmaPolicy::Clock fn() {
    return [this] { return now; };
  }
  void advance(milliseconds d) { now += std::chrono::nanoseconds(d).count(); }
};

TEST_CASE("ewma prefers the peer that answered faster") {
  FakeClock clock;
  EwmaPolicy policy(2, 10000, 30, clock.fn());
  auto picker = policy.build(snapshot(numbered_peers(2)));
  report(*picker, 0, milliseconds(10));
  report(*picker, 1, milliseconds(100));
  for (int i = 0; i < 100; ++i) CHECK(pick_index(*picker) == 0);

  // Cost is latency × (in_flight + 1): 10 ms × 11 > 100 ms × 1.
  load(*picker, 0, 10);
  for (int i = 0; i < 100; ++i) CHECK(pick_index(*picker) == 1);
}

TEST_CASE("ewma divides the cost by the weight") {
  FakeClock clock;
  EwmaPolicy policy(2, 10000, 30, clock.fn());
  auto picker = policy.build(snapshot(numbered_peers(2, [](std::size_t i) { return i == 0 ? 1 : 4; })));
  report(*picker, 0, milliseconds(10));
  report(*picker, 1, milliseconds(30)); // 30 / 4 < 10 / 1
  for (int i = 0; i < 100; ++i) CHECK(pick_index(*picker) == 1);
}

TEST_CASE("ewma decays toward new samples with the time between them") {
  FakeClock clock;
  EwmaPolicy policy(2, 1000, 30, clock.fn()); // tau = 1 s
  auto picker = policy.build(snapshot(numbered_peers(1)));
  CHECK(ewma_of(*picker, 0) < 0);
  report(*picker, 0, milliseconds(100));
  CHECK(ewma_of(*picker, 0) == 100 * ms);

  clock.advance(milliseconds(1000)); // one tau: the old value keeps weight e^-1
  report(*picker, 0, milliseconds(10));
  double expected = 100 * ms * std::exp(-1.0) + 10 * ms * (1 - std::exp(-1.0));
  CHECK(ewma_of(*picker, 0) == doctest::Approx(expected).epsilon(1e-12));

  report(*picker, 0, milliseconds(1)); // no time passed: the sample has no weight
  CHECK(ewma_of(*picker, 0) == doctest::Approx(expected).epsilon(1e-12));

  clock.advance(milliseconds(500));
  report(*picker, 0, milliseconds(20));
  expected = expected * std::exp(-0.5) + 20 * ms * (1 - std::exp(-0.5));
  CHECK(ewma_of(*picker, 0) == doctest::Approx(expected).epsilon(1e-12));

  clock.advance(milliseconds(100000)); // a hundred taus: only the new sample counts
  report(*picker, 0, milliseconds(10));
  CHECK(ewma_of(*picker, 0) == doctest::Approx(10 * ms).epsilon(1e-9));
}

TEST_CASE("ewma jumps to a sample above it and only decays back down") {
  FakeClock clock;
  EwmaPolicy policy(2, 1000, 30, clock.fn());
  auto picker = policy.build(snapshot(numbered_peers(1)));
  report(*picker, 0, milliseconds(10));
  clock.advance(milliseconds(1));
  report(*picker, 0, milliseconds(50));
  CHECK(ewma_of(*picker, 0) == 50 * ms); // at once, whatever the elapsed time

  clock.advance(milliseconds(1000));
  report(*picker, 0, milliseconds(10));
  double expected = 50 * ms * std::exp(-1.0) + 10 * ms * (1 - std::exp(-1.0));
  CHECK(ewma_of(*picker, 0) == doctest::Approx(expected).epsilon(1e-12));
}

TEST_CASE("ewma starts new peers at the average of the measured ones") {
  FakeClock clock;
  // choice_count 3 compares every peer; a default of 1 s would make a new peer lose
  // every comparison, a start at zero would make it win every one.
  EwmaPolicy policy(3, 10000, 1000, clock.fn());
  auto peers = numbered_peers(3); // a, b, c at indices 0, 1, 2
  auto before = policy.build(snapshot({peers[0], peers[1]}));
  report(*before, 0, milliseconds(10));
  report(*before, 1, milliseconds(40));

  auto picker = policy.build(snapshot(peers)); // c is new: costed at (10 + 40) / 2 = 25 ms
  TriedPeers not_b;
  not_b.add(dynup::peer_id_hash(peers[1].id));
  load(*picker, 0, 1); // a: 10 ms × 2 = 20 < 25
  CHECK(pick_index(*picker, &not_b) == 0);
  load(*picker, 0, 1); // a: 10 ms × 3 = 30 > 25
  CHECK(pick_index(*picker, &not_b) == 2);
  CHECK(ewma_of(*picker, 2) < 0);

  // Its first sample replaces the start value.
  report(*picker, 2, milliseconds(100));
  CHECK(ewma_of(*picker, 2) == 100 * ms);
  CHECK(pick_index(*picker, &not_b) == 0);
}

TEST_CASE("ewma costs peers at default_latency_ms when none has a sample") {
  FakeClock clock;
  for (double fallback : {1.0, 1000.0}) {
    CAPTURE(fallback);
    EwmaPolicy policy(2, 10000, fallback, clock.fn());
    auto picker = policy.build(snapshot(numbered_peers(2)));
    report(*picker, 0, milliseconds(5)); // after the build: b keeps the default cost
    std::size_t expected = fallback < 5 ? 1 : 0;
    for (int i = 0; i < 50; ++i) CHECK(pick_index(*picker) == expected);
  }
}

TEST_CASE("ewma keeps a staying peer's EWMA across rebuilds and forgets a removed one") {
  FakeClock clock;
  EwmaPolicy policy(2, 10000, 30, clock.fn());
  auto peers = numbered_peers(2);
  auto first = policy.build(snapshot(peers));
  report(*first, 0, milliseconds(10));
  report(*first, 1, milliseconds(20));
  auto second = policy.build(snapshot({peers[0]}));
  CHECK(ewma_of(*second, 0) == 10 * ms);
  auto third = policy.build(snapshot(peers));
  CHECK(ewma_of(*third, 0) == 10 * ms);
  CHECK(ewma_of(*third, 1) < 0);
}

TEST_CASE("ewma on_finish ends the request; a connect failure is no latency sample") {
  FakeClock clock;
  EwmaPolicy policy(2, 10000, 30, clock.fn());
  auto picker = policy.build(snapshot(numbered_peers(1)));
  report(*picker, 0, milliseconds(100));
  clock.advance(milliseconds(10000));
  report(*picker, 0, milliseconds(1), true);
  CHECK(ewma_of(*picker, 0) == 100 * ms);
  CHECK(select_index(*picker, 0).stats->in_flight.load() == 0);
}

TEST_CASE("ewma samples are folded by the real clock by default") {
  auto made = dynup::make_policy("ewma", nlohmann::json{{"decay_ms", 1}});
  REQUIRE(made);
  auto picker = made.value()->build(snapshot(numbered_peers(1)));
  report(*picker, 0, milliseconds(50));
  std::int64_t stamp = select_index(*picker, 0).stats->ewma_stamp_ns.load();
  CHECK(stamp > 0);
  report(*picker, 0, milliseconds(10));
  CHECK(select_index(*picker, 0).stats->ewma_stamp_ns.load() >= stamp);
  CHECK(ewma_of(*picker, 0) <= 50 * ms);
  CHECK(ewma_of(*picker, 0) >= 10 * ms);
}

TEST_CASE("ewma validates its options") {
  CHECK(dynup::make_policy("ewma", {{"choice_count", 16}, {"decay_ms", 3600000}, {"default_latency_ms", 0.001}}));
  CHECK(dynup::make_policy("ewma", {{"choice_count", 1}, {"decay_ms", 1}, {"default_latency_ms", 60000}}));
  const nlohmann::json bad[] = {
      {{"choice_count", 0}},   {{"choice_count", 17}},         {{"decay_ms", 0}},
      {{"decay_ms", 3600001}}, {{"decay_ms", 1.5}},            {{"default_latency_ms", 0}},
      {{"default_latency_ms", 60001}}, {{"default_latency_ms", "30"}},
  };
  for (const auto& options : bad) {
    CAPTURE(options.dump());
    auto p = dynup::make_policy("ewma", options);
    REQUIRE_FALSE(p);
    CHECK(p.error().code() == dynup::Errc::invalid_argument);
    CHECK(p.error().message().find(options.begin().key()) != std::string::npos);
  }
  auto unknown = dynup::make_policy("ewma", nlohmann::json{{"tau_ms", 5}});
  REQUIRE_FALSE(unknown);
  CHECK(unknown.error().message() ==
        "policy ewma: unknown option \"tau_ms\" (valid: choice_count, decay_ms, default_latency_ms)");
}

} // namespace

TEST_CASE("an old slow sample ages out at pick time, so the peer is tried again") {
  FakeClock clock;
  EwmaPolicy policy(2, 1000, 30, clock.fn()); // tau = 1 s
  auto picker = policy.build(snapshot(numbered_peers(2)));
  report(*picker, 0, milliseconds(1000)); // one slow reply, then no traffic
  report(*picker, 1, milliseconds(10));
  CHECK(pick_index(*picker) == 1);

  // Five taus later peer 0's 1000 ms has decayed to about 6.7 ms, while peer 1 keeps
  // answering in 10 ms: peer 0 is cheaper again without having had a new request.
  clock.advance(milliseconds(5000));
  report(*picker, 1, milliseconds(10));
  CHECK(ewma_of(*picker, 0) == doctest::Approx(1000 * ms)); // the stored value is untouched
  for (int i = 0; i < 20; ++i) CHECK(pick_index(*picker) == 0);
}
