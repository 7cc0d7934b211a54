#include <dynup/balance/least_request.hpp>

#include "support/picking.hpp"
#include <doctest/doctest.h>

#include <cstdint>
#include <string>
#include <vector>

namespace {

using dynup::LeastRequestPolicy;
using dynup::Outcome;
using dynup::PickContext;
using dynup::Picker;
using dynup::Selection;
using dynup::Snapshot;

using dynup_test::make;
using dynup_test::numbered_peers;
using dynup_test::select_index;
using dynup_test::snapshot;

void load(const Picker& picker, std::size_t index, int requests) {
  Selection s = select_index(picker, index);
  for (int i = 0; i < requests; ++i) picker.on_start(s);
}

std::vector<int> count_picks(const Picker& picker, int samples) {
  std::vector<int> counts(picker.set()->size());
  for (int k = 0; k < samples; ++k) {
    Selection s = picker.pick(PickContext{});
    REQUIRE(s);
    ++counts[s.index];
  }
  return counts;
}

TEST_CASE("least_request picks the peer with fewer requests in flight") {
  auto policy = make("least_request");
  auto picker = policy->build(snapshot(numbered_peers(2)));
  load(*picker, 0, 3);
  load(*picker, 1, 2);
  auto counts = count_picks(*picker, 200);
  CHECK(counts[1] == 200);

  // Requests to peer 0 end: it becomes the less loaded one.
  Selection s0 = select_index(*picker, 0);
  for (int i = 0; i < 2; ++i) picker->on_finish(s0, Outcome{});
  CHECK(s0.stats->in_flight.load() == 1);
  counts = count_picks(*picker, 200);
  CHECK(counts[0] == 200);
}

TEST_CASE("least_request breaks ties at random") {
  auto policy = make("least_request");
  auto counts = count_picks(*policy->build(snapshot(numbered_peers(2))), 2000);
  CHECK(counts[0] > 800);
  CHECK(counts[1] > 800);
}

TEST_CASE("least_request sends in-flight requests in proportion to weight") {
  auto policy = make("least_request");
  auto picker = policy->build(snapshot(numbered_peers(2, [](std::size_t i) { return i == 0 ? 3 : 1; })));
  // Requests never finish: each pick goes where (in_flight + 1) / weight is lowest, so
  // in-flight counts stay near 3:1.
  std::vector<int> counts(2);
  for (int k = 0; k < 400; ++k) {
    Selection s = picker->pick(PickContext{});
    REQUIRE(s);
    picker->on_start(s);
    ++counts[s.index];
  }
  CHECK(counts[0] >= 296);
  CHECK(counts[0] <= 304);
}

TEST_CASE("least_request compares choice_count random peers, not all of them") {
  // Nine busy peers and an idle one: the idle one wins whenever it is among the draws.
  auto busy_set = snapshot(numbered_peers(10));
  auto run = [&](const nlohmann::json& options) {
    auto policy = make("least_request", options);
    auto picker = policy->build(busy_set);
    for (std::size_t i = 1; i < 10; ++i) load(*picker, i, 5);
    return count_picks(*picker, 20000)[0];
  };
  // Two distinct draws of ten include the idle peer with probability 2/10:
  // 4000 expected, standard deviation 57.
  int two = run(nullptr);
  CHECK(two > 3600);
  CHECK(two < 4400);
  // One draw is plain uniform random: load is ignored (2000 expected, sd 42).
  int one = run(nlohmann::json{{"choice_count", 1}});
  CHECK(one > 1700);
  CHECK(one < 2300);
  // As many draws as peers: every peer is compared.
  CHECK(run(nlohmann::json{{"choice_count", 10}}) == 20000);
  CHECK(run(nlohmann::json{{"choice_count", 16}}) == 20000);
}

TEST_CASE("least_request with choice_count 1 ignores weights") {
  auto policy = make("least_request", nlohmann::json{{"choice_count", 1}});
  auto picker = policy->build(snapshot(numbered_peers(2, [](std::size_t i) { return i == 0 ? 9 : 1; })));
  auto counts = count_picks(*picker, 4000);
  CHECK(counts[1] > 1700);
}

TEST_CASE("least_request weighs load against weight without overflow") {
  auto policy = make("least_request");
  auto picker = policy->build(snapshot(numbered_peers(2, [](std::size_t i) { return i == 0 ? 65535 : 1; })));
  Selection heavy = select_index(*picker, 0);
  heavy.stats->in_flight.store(std::int64_t{1} << 40); // absurd, clamped for comparison
  auto counts = count_picks(*picker, 100);
  CHECK(counts[1] == 100);
  heavy.stats->in_flight.store(60000); // 60001 / 65535 < 1 / 1
  counts = count_picks(*picker, 100);
  CHECK(counts[0] == 100);
  heavy.stats->in_flight.store(0);
}

TEST_CASE("least_request validates choice_count") {
  for (int ok : {1, 2, 16}) {
    auto p = dynup::make_policy("least_request", nlohmann::json{{"choice_count", ok}});
    REQUIRE(p);
    CHECK(dynamic_cast<LeastRequestPolicy&>(*p.value()).choice_count() == static_cast<std::size_t>(ok));
  }
  CHECK(dynamic_cast<LeastRequestPolicy&>(*make("least_request")).choice_count() == 2);
  for (const nlohmann::json& bad :
       {nlohmann::json(0), nlohmann::json(17), nlohmann::json(-1), nlohmann::json("2"), nlohmann::json(2.5)}) {
    CAPTURE(bad.dump());
    auto p = dynup::make_policy("least_request", nlohmann::json{{"choice_count", bad}});
    REQUIRE_FALSE(p);
    CHECK(p.error().message() ==
          "policy least_request: option \"choice_count\" must be an integer 1..16, got " + bad.dump());
  }
  auto unknown = dynup::make_policy("least_request", nlohmann::json{{"choices", 2}});
  REQUIRE_FALSE(unknown);
  CHECK(unknown.error().message() == "policy least_request: unknown option \"choices\" (valid: choice_count)");
}

} // namespace
