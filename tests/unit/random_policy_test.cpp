#include <dynup/balance/random.hpp>

#include "support/picking.hpp"
#include <doctest/doctest.h>

#include <cstdint>
#include <string>
#include <vector>

namespace {

using dynup::HealthView;
using dynup::PickContext;
using dynup::Selection;
using dynup::Snapshot;
using dynup::TriedPeers;

using dynup_test::make;
using dynup_test::numbered_peers;
using dynup_test::snapshot;

// Pearson's chi-square statistic of `counts` against probabilities proportional to `w`.
double chi_square(const std::vector<std::uint64_t>& counts, const std::vector<double>& w) {
  double total_w = 0, n = 0;
  for (double x : w) total_w += x;
  for (auto c : counts) n += static_cast<double>(c);
  double chi = 0;
  for (std::size_t i = 0; i < counts.size(); ++i) {
    double expected = n * w[i] / total_w;
    double d = static_cast<double>(counts[i]) - expected;
    chi += d * d / expected;
  }
  return chi;
}

std::vector<std::uint64_t> count_picks(const dynup::Picker& picker, std::size_t samples) {
  std::vector<std::uint64_t> counts(picker.set()->size());
  for (std::size_t k = 0; k < samples; ++k) {
    Selection s = picker.pick(PickContext{});
    REQUIRE(s);
    ++counts[s.index];
  }
  return counts;
}

// Each bucket holds `total` units: threshold for itself, the rest for its alias. Summed
// per member, that must give back weight × m exactly.
void check_alias_table(const std::vector<std::uint32_t>& w) {
  auto t = dynup::detail::build_alias_buckets(w);
  const std::size_t m = w.size();
  REQUIRE(t.entries.size() == m);
  std::uint64_t total = 0;
  for (auto x : w) total += x;
  CHECK(t.total == total);
  std::vector<std::uint64_t> mass(m);
  for (std::size_t k = 0; k < m; ++k) {
    REQUIRE(t.entries[k].threshold <= t.total);
    REQUIRE(t.entries[k].alias < m);
    mass[k] += t.entries[k].threshold;
    mass[t.entries[k].alias] += t.total - t.entries[k].threshold;
  }
  for (std::size_t i = 0; i < m; ++i) {
    CAPTURE(i);
    CHECK(mass[i] == std::uint64_t{w[i]} * m);
  }
}

TEST_CASE("the alias table gives every member exactly its weight's share") {
  check_alias_table({1, 2});
  check_alias_table({1, 2, 3, 4, 10});
  check_alias_table({65535, 1, 1, 1});
  check_alias_table({7, 7, 7, 1});
  std::vector<std::uint32_t> many;
  std::uint64_t state = 42;
  for (int i = 0; i < 1000; ++i)
    many.push_back(static_cast<std::uint32_t>(1 + dynup::detail::splitmix64(state) % 65535));
  check_alias_table(many);
}

TEST_CASE("equal weights build no alias table") {
  CHECK(dynup::detail::build_alias_buckets({5, 5, 5}).entries.empty());
  CHECK(dynup::detail::build_alias_buckets({1}).entries.empty());
  CHECK(dynup::detail::build_alias_buckets({}).entries.empty());
}

// The chi-square test: with k peers the statistic follows a chi-square distribution with
// k - 1 degrees of freedom when picks follow the weights; it exceeds the p = 0.001
// critical value in one run out of a thousand (the generator is seeded per thread, so
// this is the test's false-failure rate). 200 000 picks keep every expected count in the
// thousands, far above the 5 the approximation needs, and make a 1% skew in a peer's
// share show up as a statistic in the hundreds.
TEST_CASE("random picks follow the weights (chi-square, p = 0.001)") {
  const std::vector<double> weights = {1, 2, 3, 4, 10};
  auto policy = make("random");
  Snapshot set = snapshot(numbered_peers(5, [&](std::size_t i) { return weights[i]; }));
  auto counts = count_picks(*policy->build(set), 200000);
  constexpr double critical_df4 = 18.467; // chi-square, 4 degrees of freedom, p = 0.001
  CHECK(chi_square(counts, weights) < critical_df4);
  // The same counts against equal shares fail by far: the statistic can tell.
  CHECK(chi_square(counts, {1, 1, 1, 1, 1}) > 100 * critical_df4);
}

TEST_CASE("random with equal weights picks uniformly (chi-square, p = 0.001)") {
  auto policy = make("random");
  Snapshot set = snapshot(numbered_peers(8));
  auto counts = count_picks(*policy->build(set), 80000);
  constexpr double critical_df7 = 24.322;
  CHECK(chi_square(counts, std::vector<double>(8, 1.0)) < critical_df7);
}

TEST_CASE("random uses the health view's effective weights") {
  auto policy = make("random");
  Snapshot set = snapshot(numbered_peers(2, [](std::size_t) { return 10; }));
  HealthView health = HealthView::from_registry(*set);
  health.peers[0].weight = 1; // e.g. slow start
  health.peers[1].weight = 3;
  auto counts = count_picks(*policy->build(set, health), 100000);
  constexpr double critical_df1 = 10.828;
  CHECK(chi_square(counts, {1, 3}) < critical_df1);
  CHECK(chi_square(counts, {1, 1}) > 100 * critical_df1);
}

TEST_CASE("random finds the only untried peer among many tried") {
  auto policy = make("random");
  Snapshot set = snapshot(numbered_peers(50, [](std::size_t i) { return 1 + i; }));
  auto picker = policy->build(set);
  for (std::size_t keep : {0u, 17u, 49u}) {
    TriedPeers tried = dynup_test::all_but(*set, keep);
    for (int i = 0; i < 100; ++i) {
      Selection s = picker->pick(PickContext{"", &tried});
      REQUIRE(s);
      CHECK(s.index == keep);
    }
  }
}

// Resampling keeps the weights among the untried peers. (After DYNUP_RANDOM_RESAMPLES
// tried draws the scan fallback is unweighted; with the light peer tried that happens in
// about one retry in 8000, below what this test can see.)
TEST_CASE("random retries spread over the untried peers by weight") {
  auto policy = make("random");
  Snapshot set = snapshot(numbered_peers(3, [](std::size_t i) { return 1 + i; })); // 1, 2, 3
  auto picker = policy->build(set);
  TriedPeers tried;
  tried.add(dynup::peer_id_hash((*set)[0].id));
  std::vector<std::uint64_t> counts(2);
  for (int i = 0; i < 60000; ++i) {
    Selection s = picker->pick(PickContext{"", &tried});
    REQUIRE(s);
    REQUIRE(s.index > 0);
    ++counts[s.index - 1];
  }
  CHECK(chi_square(counts, {2, 3}) < 10.828); // 1 degree of freedom, p = 0.001
}

TEST_CASE("random takes no options") {
  CHECK(dynup::make_policy("random"));
  CHECK(dynup::make_policy("random", nlohmann::json::object()));
  auto bad = dynup::make_policy("random", nlohmann::json{{"seed", 1}});
  REQUIRE_FALSE(bad);
  CHECK(bad.error().message() == "policy random: unknown option \"seed\" (valid: none)");
}

} // namespace
