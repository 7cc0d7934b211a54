#include <dynup/balance/picker.hpp>
#include <dynup/health/clock.hpp>
#include <dynup/health/tracker.hpp>

#include "support/allocations.hpp"
#include "support/peers.hpp"
#include <doctest/doctest.h>

#include <chrono>
#include <cstdint>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

using namespace std::chrono_literals;
using dynup::Errc;
using dynup::Health;
using dynup::HealthOptions;
using dynup::HealthReport;
using dynup::HealthTracker;
using dynup::ManualClock;
using dynup::PanicOptions;
using dynup::Peer;
using dynup::PeerHealth;
using dynup::PeerState;
using nlohmann::json;

namespace {

Peer named(const std::string& id, std::uint32_t weight = 1, bool backup = false, Health health = Health::passing) {
  Peer p = dynup_test::peer(id + ".test", 80, weight);
  p.id = id;
  p.backup = backup;
  p.health = health;
  return p;
}

std::vector<Peer> lettered(std::size_t n) {
  std::vector<Peer> peers;
  for (std::size_t i = 0; i < n; ++i) peers.push_back(named(std::string(1, static_cast<char>('a' + i))));
  return peers;
}

// Every mechanism off: each test turns on what it checks.
HealthOptions quiet() {
  HealthOptions o;
  o.passive.max_fails = 0;
  o.panic.threshold_percent = 0;
  return o;
}

HealthOptions passive(unsigned max_fails, std::chrono::milliseconds fail_timeout = 10s) {
  HealthOptions o = quiet();
  o.passive.max_fails = max_fails;
  o.passive.fail_timeout = fail_timeout;
  return o;
}

HealthOptions outlier(unsigned consecutive_5xx = 5, unsigned gateway = 5) {
  HealthOptions o = quiet();
  o.outlier.enabled = true;
  o.outlier.consecutive_5xx = consecutive_5xx;
  o.outlier.consecutive_gateway_failure = gateway;
  return o;
}

HealthOptions slow(std::chrono::milliseconds window, double aggression = 1.0, double min_percent = 10) {
  HealthOptions o = quiet();
  o.slow_start.window = window;
  o.slow_start.aggression = aggression;
  o.slow_start.min_weight_percent = min_percent;
  return o;
}

HealthOptions panic(double threshold, PanicOptions::Mode mode = PanicOptions::Mode::all) {
  HealthOptions o = quiet();
  o.panic.threshold_percent = threshold;
  o.panic.mode = mode;
  return o;
}

// A tracker on a manual clock with the current set and its health states.
struct Harness {
  ManualClock clock;
  HealthTracker tracker;
  dynup::PeerSet set;
  HealthTracker::Peers health;

  Harness(HealthOptions options, std::vector<Peer> peers) : tracker(std::move(options), clock) {
    attach(std::move(peers));
  }

  void attach(std::vector<Peer> peers) {
    set = dynup_test::make_set(std::move(peers));
    health = tracker.attach(set);
  }

  std::size_t index(std::string_view id) const {
    for (std::size_t i = 0; i < set.size(); ++i)
      if (set[i].id == id) return i;
    FAIL("no peer " << id);
    return 0;
  }
  PeerHealth& of(std::string_view id) { return *health[index(id)]; }

  bool status(std::string_view id, int code) { return tracker.report(of(id), code, false); }
  bool refused(std::string_view id) { return tracker.report(of(id), 0, true); }
  bool probe(std::string_view id, bool ok, std::string_view why = {}) { return tracker.report_active(of(id), ok, why); }

  HealthReport view() { return tracker.view(set, health); }
};

const dynup::PeerHealthStatus& line(const HealthReport& r, const Harness& h, std::string_view id) {
  return r.peers[h.index(id)];
}
bool available(const HealthReport& r, const Harness& h, std::string_view id) {
  return r.view.peers[h.index(id)].available;
}
std::uint32_t weight(const HealthReport& r, const Harness& h, std::string_view id) {
  return r.view.peers[h.index(id)].weight;
}

} // namespace

// --- clock -------------------------------------------------------------------------

TEST_CASE("ManualClock moves only when advanced or set; SteadyClock moves forward") {
  ManualClock clock;
  auto t0 = clock.now();
  CHECK(clock.now() == t0);
  clock.advance(1500ms);
  CHECK(clock.now() - t0 == 1500ms);
  clock.set(t0 + 1h);
  CHECK(clock.now() - t0 == 1h);
  const dynup::Clock& real = dynup::steady_clock();
  auto a = real.now();
  CHECK(real.now() >= a);
  CHECK(&dynup::steady_clock() == &real);
}

// --- passive (nginx max_fails / fail_timeout) ---------------------------------------

TEST_CASE("passive: max_fails failures mark a peer down for fail_timeout from the last one") {
  Harness h(passive(3), lettered(2));
  CHECK_FALSE(h.refused("a"));
  h.clock.advance(4s);
  CHECK_FALSE(h.status("a", 0)); // no response
  h.clock.advance(4s);
  CHECK(h.refused("a"));
  auto down_at = h.clock.now();
  auto r = h.view();
  CHECK_FALSE(available(r, h, "a"));
  CHECK(line(r, h, "a").state == PeerState::unhealthy);
  CHECK(line(r, h, "a").reason == "passive: 3 failures (max_fails 3, fail_timeout 10 s); down for 10 s more");
  CHECK(available(r, h, "b"));
  REQUIRE(r.next_change);
  CHECK(*r.next_change == down_at + 10s);
  CHECK(r.view.gate.on());
  CHECK(r.view.gate.max_fails == 3);

  h.clock.advance(9999ms);
  CHECK_FALSE(available(h.view(), h, "a"));
  h.clock.advance(1ms);
  r = h.view();
  CHECK(available(r, h, "a"));
  CHECK(line(r, h, "a").reason ==
        "passive: 3 failures (max_fails 3, fail_timeout 10 s); fail_timeout has passed: the next request tries it");
  CHECK_FALSE(r.next_change);
}

TEST_CASE("passive: one failure with max_fails 1 reports the time left") {
  Harness h(passive(1), lettered(2));
  CHECK(h.status("a", 0));
  h.clock.advance(800ms);
  CHECK(line(h.view(), h, "a").reason == "passive: 1 failure (max_fails 1, fail_timeout 10 s); down for 9.2 s more");
}

TEST_CASE("passive: a success does not clear failures within fail_timeout (nginx), so 1 failure in 3 takes a peer out") {
  Harness h(passive(3), lettered(2));
  auto& st = const_cast<dynup::PeerStats&>(HealthTracker::stats_of(h.of("a")));
  for (int round = 0; round < 2; ++round) {
    h.tracker.on_pick(st);
    CHECK_FALSE(h.status("a", 200));
    h.tracker.on_pick(st);
    CHECK_FALSE(h.status("a", 200));
    h.tracker.on_pick(st);
    CHECK_FALSE(h.refused("a"));
    h.clock.advance(1s);
  }
  CHECK(line(h.view(), h, "a").passive_failures == 2);
  h.tracker.on_pick(st);
  CHECK(h.refused("a"));
  CHECK_FALSE(available(h.view(), h, "a"));
}

TEST_CASE("passive: a success after a pick made fail_timeout after the last failure clears the count") {
  Harness h(passive(3), lettered(2));
  auto& st = const_cast<dynup::PeerStats&>(HealthTracker::stats_of(h.of("a")));
  CHECK_FALSE(h.refused("a"));
  CHECK_FALSE(h.refused("a"));
  h.clock.advance(9s);
  h.tracker.on_pick(st); // within fail_timeout of the last failure: not checked again
  CHECK_FALSE(h.status("a", 200));
  CHECK(line(h.view(), h, "a").passive_failures == 2);
  h.clock.advance(1s);
  h.tracker.on_pick(st); // fail_timeout after it: checked
  CHECK_FALSE(h.status("a", 200));
  auto r = h.view();
  CHECK(line(r, h, "a").passive_failures == 0);
  CHECK(line(r, h, "a").reason == "healthy");
}

TEST_CASE("passive: failures spread over more than fail_timeout still add up without a success in between") {
  Harness h(passive(3), lettered(2));
  CHECK_FALSE(h.refused("a"));
  h.clock.advance(20s);
  CHECK_FALSE(h.refused("a"));
  h.clock.advance(20s);
  CHECK(h.refused("a"));
  CHECK_FALSE(available(h.view(), h, "a"));
}

TEST_CASE("passive: after fail_timeout one request goes through; its failure takes the peer down again, its success brings it back") {
  Harness h(passive(1), lettered(2));
  auto& st = const_cast<dynup::PeerStats&>(HealthTracker::stats_of(h.of("a")));
  CHECK(h.refused("a"));
  h.clock.advance(10s);
  CHECK(available(h.view(), h, "a"));
  h.tracker.on_pick(st);
  CHECK(h.refused("a")); // down again: a routing change
  auto r = h.view();
  CHECK_FALSE(available(r, h, "a"));
  CHECK(line(r, h, "a").reason == "passive: 2 failures (max_fails 1, fail_timeout 10 s); down for 10 s more");
  h.clock.advance(10s);
  h.tracker.on_pick(st);
  CHECK(h.status("a", 200)); // cleared: a routing change
  r = h.view();
  CHECK(available(r, h, "a"));
  CHECK(line(r, h, "a").passive_failures == 0);
}

TEST_CASE("passive: only connect failures, status 0 and fail_statuses are failures") {
  HealthOptions o = passive(1);
  o.passive.fail_statuses = {502, 504};
  Harness h(o, lettered(5));
  CHECK_FALSE(h.status("a", 500));
  CHECK_FALSE(h.status("a", 503));
  CHECK_FALSE(h.status("a", 404));
  CHECK(h.status("b", 502));
  CHECK(h.status("c", 504));
  CHECK(h.status("d", 0));
  CHECK(h.refused("e"));
  auto r = h.view();
  CHECK(available(r, h, "a"));
  for (const char* id : {"b", "c", "d", "e"}) CHECK_FALSE(available(r, h, id));
}

TEST_CASE("passive: max_fails 0 disables the check") {
  Harness h(passive(0), lettered(2));
  for (int i = 0; i < 10; ++i) CHECK_FALSE(h.refused("a"));
  auto r = h.view();
  CHECK(available(r, h, "a"));
  CHECK(line(r, h, "a").reason == "healthy");
  CHECK_FALSE(r.view.gate.on());
}

TEST_CASE("passive: a set of one peer is never taken down, as nginx's single server") {
  Harness h(passive(1), lettered(1));
  CHECK_FALSE(h.refused("a"));
  CHECK_FALSE(h.refused("a"));
  auto r = h.view();
  CHECK(available(r, h, "a"));
  CHECK(line(r, h, "a").passive_failures == 0);
  CHECK_FALSE(r.view.gate.on());
}

TEST_CASE("passive: a failure while down extends the down period; a success does not lift it") {
  Harness h(passive(1), lettered(2));
  CHECK(h.refused("a"));
  h.clock.advance(5s);
  CHECK_FALSE(h.refused("a")); // already down: no routing change
  CHECK_FALSE(h.status("a", 200));
  h.clock.advance(6s);
  auto r = h.view();
  CHECK_FALSE(available(r, h, "a"));
  CHECK(line(r, h, "a").reason == "passive: 2 failures (max_fails 1, fail_timeout 10 s); down for 4 s more");
}

// --- outlier ejection (Envoy) -------------------------------------------------------

TEST_CASE("outlier: consecutive 5xx eject a peer for base_ejection_time") {
  Harness h(outlier(5, 5), lettered(3));
  for (int i = 0; i < 4; ++i) CHECK_FALSE(h.status("a", 500));
  auto r = h.view();
  CHECK(line(r, h, "a").state == PeerState::warning);
  CHECK(line(r, h, "a").consecutive_5xx == 4);
  CHECK(line(r, h, "a").reason == "outlier: 4 consecutive 5xx");
  CHECK(h.status("a", 501)); // a 5xx, not a gateway failure
  auto ejected_at = h.clock.now();
  r = h.view();
  CHECK_FALSE(available(r, h, "a"));
  CHECK(line(r, h, "a").ejected);
  CHECK(line(r, h, "a").times_ejected == 1);
  CHECK(line(r, h, "a").reason == "outlier: ejected for 30 s after 5 consecutive 5xx (ejection 1); 30 s more");
  CHECK(h.tracker.ejected() == 1);
  REQUIRE(r.next_change);
  CHECK(*r.next_change == ejected_at + 30s);

  h.clock.advance(30s);
  r = h.view();
  CHECK(available(r, h, "a"));
  CHECK_FALSE(line(r, h, "a").ejected);
  CHECK(line(r, h, "a").reason == "healthy");
  CHECK(h.tracker.ejected() == 0);
}

TEST_CASE("outlier: consecutive gateway failures eject, counting connect failures and no response") {
  Harness h(outlier(10, 3), lettered(3));
  CHECK_FALSE(h.refused("a"));
  CHECK_FALSE(h.status("a", 0));
  CHECK(h.status("a", 503));
  auto r = h.view();
  CHECK(line(r, h, "a").reason == "outlier: ejected for 30 s after 3 consecutive gateway failures (ejection 1); 30 s more");

  for (int code : {502, 503}) CHECK_FALSE(h.status("b", code));
  CHECK_FALSE(h.status("b", 500)); // a 500 ends the run of gateway failures
  CHECK(line(h.view(), h, "b").consecutive_gateway_failures == 0);
  CHECK(line(h.view(), h, "b").consecutive_5xx == 3);
}

TEST_CASE("outlier: a 5xx run ejects even when gateway failures are interleaved") {
  Harness h(outlier(5, 3), lettered(3));
  for (int code : {502, 502, 500, 502, 502}) h.status("a", code);
  auto r = h.view();
  CHECK_FALSE(available(r, h, "a"));
  CHECK(line(r, h, "a").reason == "outlier: ejected for 30 s after 5 consecutive 5xx (ejection 1); 30 s more");
}

TEST_CASE("outlier: the ejection time grows with times_ejected and stops at max_ejection_time") {
  HealthOptions o = outlier(1, 0);
  o.outlier.base_ejection_time = 10s;
  o.outlier.max_ejection_time = 25s;
  Harness h(o, lettered(3));
  const char* expected[] = {
      "outlier: ejected for 10 s after 1 consecutive 5xx (ejection 1); 10 s more",
      "outlier: ejected for 20 s after 1 consecutive 5xx (ejection 2); 20 s more",
      "outlier: ejected for 25 s after 1 consecutive 5xx (ejection 3); 25 s more",
      "outlier: ejected for 25 s after 1 consecutive 5xx (ejection 4); 25 s more",
  };
  std::chrono::seconds lengths[] = {10s, 20s, 25s, 25s};
  for (int k = 0; k < 4; ++k) {
    CAPTURE(k);
    CHECK(h.status("a", 500));
    auto r = h.view();
    CHECK(line(r, h, "a").reason == expected[k]);
    CHECK(line(r, h, "a").times_ejected == static_cast<unsigned>(k + 1));
    h.clock.advance(lengths[k] - 1ms);
    CHECK_FALSE(available(h.view(), h, "a"));
    h.clock.advance(1ms);
    CHECK(available(h.view(), h, "a"));
  }
}

TEST_CASE("outlier: each base_ejection_time without ejection takes one off the multiplier") {
  HealthOptions o = outlier(1, 0);
  o.outlier.base_ejection_time = 10s;
  o.outlier.max_ejection_time = 100s;
  Harness h(o, lettered(3));
  CHECK(h.status("a", 500));
  h.clock.advance(10s);
  CHECK(h.status("a", 500));
  h.clock.advance(20s); // ejection 2 ends
  h.clock.advance(10s); // one quiet period: multiplier 2 → 1
  CHECK(h.status("a", 500));
  CHECK(line(h.view(), h, "a").reason == "outlier: ejected for 20 s after 1 consecutive 5xx (ejection 2); 20 s more");
  h.clock.advance(20s + 50s); // five quiet periods: back to the start
  CHECK(h.status("a", 500));
  CHECK(line(h.view(), h, "a").times_ejected == 1);
}

TEST_CASE("outlier: max_ejection_percent allows one ejection among 3 peers and says why it refuses") {
  Harness h(outlier(5, 5), lettered(3)); // 10% of 3 rounds down to 0: at least one
  for (int i = 0; i < 5; ++i) h.status("a", 500);
  CHECK(h.tracker.ejected() == 1);
  for (int i = 0; i < 4; ++i) CHECK_FALSE(h.status("b", 500));
  CHECK_FALSE(h.status("b", 500)); // due, refused: no routing change
  auto r = h.view();
  CHECK(available(r, h, "b"));
  CHECK(line(r, h, "b").state == PeerState::warning);
  CHECK(line(r, h, "b").reason ==
        "outlier: 5 consecutive 5xx, not ejected: max_ejection_percent reached (1 of 3 peers ejected)");
  CHECK(h.tracker.ejected() == 1);

  h.clock.advance(30s); // a's ejection ends; b's next 5xx finds room
  CHECK(h.status("b", 500));
  r = h.view();
  CHECK(available(r, h, "a"));
  CHECK_FALSE(available(r, h, "b"));
  CHECK(line(r, h, "b").reason == "outlier: ejected for 30 s after 6 consecutive 5xx (ejection 1); 30 s more");
  CHECK(h.tracker.ejected() == 1);
}

TEST_CASE("outlier: max_ejection_percent 10 allows three ejections among 30 peers") {
  std::vector<Peer> peers;
  for (int i = 0; i < 30; ++i) peers.push_back(named("p" + std::to_string(100 + i)));
  Harness h(outlier(1, 0), std::move(peers));
  CHECK(h.status("p100", 500));
  CHECK(h.status("p101", 500));
  CHECK(h.status("p102", 500));
  CHECK_FALSE(h.status("p103", 500));
  CHECK(h.tracker.ejected() == 3);
  auto r = h.view();
  CHECK_FALSE(available(r, h, "p102"));
  CHECK(available(r, h, "p103"));
  CHECK(line(r, h, "p103").reason ==
        "outlier: 1 consecutive 5xx, not ejected: max_ejection_percent reached (3 of 30 peers ejected)");
}

TEST_CASE("outlier: any success resets the consecutive counters and a refusal") {
  Harness h(outlier(10, 3), lettered(3));
  for (int i = 0; i < 4; ++i) h.status("a", 500);
  for (int i = 0; i < 2; ++i) h.status("a", 502);
  CHECK(line(h.view(), h, "a").reason == "outlier: 6 consecutive 5xx (2 gateway)");
  CHECK_FALSE(h.status("a", 404)); // a 4xx is a success for outlier detection
  auto r = h.view();
  CHECK(line(r, h, "a").consecutive_5xx == 0);
  CHECK(line(r, h, "a").consecutive_gateway_failures == 0);
  CHECK(line(r, h, "a").reason == "healthy");
  for (int i = 0; i < 4; ++i) CHECK_FALSE(h.status("a", 500));
  CHECK(available(h.view(), h, "a"));
}

TEST_CASE("outlier: disabled, nothing is ejected") {
  Harness h(quiet(), lettered(1));
  for (int i = 0; i < 20; ++i) CHECK_FALSE(h.status("a", 503));
  auto r = h.view();
  CHECK(available(r, h, "a"));
  CHECK(line(r, h, "a").consecutive_5xx == 0);
}

// --- active -------------------------------------------------------------------------

TEST_CASE("active: unhealthy after unhealthy_threshold failures, healthy after healthy_threshold successes") {
  Harness h(quiet(), lettered(2)); // thresholds: 3 failures, 2 successes
  auto r = h.view();
  CHECK(available(r, h, "a")); // new peers start healthy
  CHECK_FALSE(h.probe("a", false, "connection refused"));
  CHECK_FALSE(h.probe("a", false, "connection refused"));
  r = h.view();
  CHECK(available(r, h, "a"));
  CHECK(line(r, h, "a").state == PeerState::warning);
  CHECK(line(r, h, "a").reason == "active: 2 consecutive failures (connection refused), unhealthy at 3");
  CHECK(h.probe("a", false, "connection refused"));
  r = h.view();
  CHECK_FALSE(available(r, h, "a"));
  CHECK(line(r, h, "a").reason == "active: 3 consecutive failures (connection refused)");
  CHECK(line(r, h, "a").active_failures == 3);
  CHECK_FALSE(h.probe("a", false, "connection refused")); // already unhealthy

  CHECK_FALSE(h.probe("a", true));
  r = h.view();
  CHECK_FALSE(available(r, h, "a"));
  CHECK(line(r, h, "a").reason == "active: recovering, 1 of 2 consecutive successes (last failure: connection refused)");
  CHECK(h.probe("a", true));
  r = h.view();
  CHECK(available(r, h, "a"));
  CHECK(line(r, h, "a").reason == "healthy");
}

TEST_CASE("active: a success breaks a run of failures, a failure breaks a run of successes") {
  Harness h(quiet(), lettered(1));
  h.probe("a", false, "timeout");
  h.probe("a", false, "timeout");
  CHECK_FALSE(h.probe("a", true));
  CHECK_FALSE(h.probe("a", false, "status 503"));
  CHECK_FALSE(h.probe("a", false, "status 503"));
  CHECK(h.probe("a", false, "status 503"));
  CHECK_FALSE(h.probe("a", true));
  CHECK_FALSE(h.probe("a", false, "timeout"));
  CHECK_FALSE(h.probe("a", true));
  CHECK(h.probe("a", true));
}

// --- registry -----------------------------------------------------------------------

TEST_CASE("registry: critical peers are unavailable, warning ones are routed with a warning") {
  Harness h(quiet(), {named("a", 1, false, Health::critical), named("b", 1, false, Health::warning), named("c")});
  auto r = h.view();
  CHECK_FALSE(available(r, h, "a"));
  CHECK(line(r, h, "a").state == PeerState::unhealthy);
  CHECK(line(r, h, "a").reason == "registry: critical");
  CHECK(line(r, h, "a").effective_weight == 0);
  CHECK(available(r, h, "b"));
  CHECK(line(r, h, "b").state == PeerState::warning);
  CHECK(line(r, h, "b").reason == "registry: warning");
  CHECK(line(r, h, "c").state == PeerState::healthy);
}

TEST_CASE("reasons from several sources are joined") {
  Harness h(passive(1), {named("a", 1, false, Health::critical), named("b")});
  h.refused("a");
  CHECK(line(h.view(), h, "a").reason ==
        "registry: critical; passive: 1 failure (max_fails 1, fail_timeout 10 s); down for 10 s more");
}

// --- slow start ---------------------------------------------------------------------

TEST_CASE("slow start: the first set attached does not ramp") {
  Harness h(slow(10s), {named("a", 100), named("b", 100)});
  auto r = h.view();
  CHECK(weight(r, h, "a") == 100);
  CHECK(line(r, h, "b").reason == "healthy");
  CHECK_FALSE(r.next_change);
}

TEST_CASE("slow start: a new peer ramps linearly with aggression 1, from the floor") {
  Harness h(slow(10s), {named("a", 100)});
  h.attach({named("a", 100), named("b", 100)});
  auto t0 = h.clock.now();
  auto r = h.view();
  CHECK(weight(r, h, "a") == 100);
  CHECK(weight(r, h, "b") == 10);
  CHECK(line(r, h, "b").reason == "slow start: 10% of weight");
  CHECK(line(r, h, "b").state == PeerState::warning);
  REQUIRE(r.next_change);
  CHECK(*r.next_change == t0 + 1s); // the floor holds until 10% of the window

  h.clock.advance(500ms);
  CHECK(weight(h.view(), h, "b") == 10);
  h.clock.advance(3500ms);
  r = h.view();
  CHECK(weight(r, h, "b") == 40);
  CHECK(line(r, h, "b").reason == "slow start: 40% of weight");
  REQUIRE(r.next_change);
  CHECK(*r.next_change == t0 + 5s);
  h.clock.advance(3500ms);
  CHECK(weight(h.view(), h, "b") == 75);
  h.clock.advance(2s);
  r = h.view();
  CHECK(weight(r, h, "b") == 95);
  REQUIRE(r.next_change);
  CHECK(*r.next_change == t0 + 10s);
  h.clock.advance(500ms);
  r = h.view();
  CHECK(weight(r, h, "b") == 100);
  CHECK(line(r, h, "b").reason == "healthy");
  CHECK_FALSE(r.next_change);
}

TEST_CASE("slow start: aggression 2 ramps faster early") {
  Harness h(slow(10s, 2.0), {named("a", 100)});
  h.attach({named("a", 100), named("b", 100)});
  auto r = h.view();
  CHECK(weight(r, h, "b") == 10); // sqrt(0.0001) is below the floor
  REQUIRE(r.next_change);
  CHECK(*r.next_change - h.clock.now() == 1s); // sqrt(t/10) reaches 10% at t = 0.1 s; steps are 1 s
  h.clock.advance(1s);
  CHECK(weight(h.view(), h, "b") == 32); // sqrt(0.1)
  h.clock.advance(3s);
  CHECK(weight(h.view(), h, "b") == 63); // sqrt(0.4)
  h.clock.advance(5s);
  CHECK(weight(h.view(), h, "b") == 95); // sqrt(0.9)
}

TEST_CASE("slow start: the floor is min_weight_percent and weight never drops below 1") {
  Harness h(slow(100s, 1.0, 25), {named("a", 100)});
  h.attach({named("a", 100), named("b", 100), named("c", 3)});
  h.clock.advance(10s);
  auto r = h.view();
  CHECK(weight(r, h, "b") == 25);
  CHECK(weight(r, h, "c") == 1); // 3 × 25% rounds to 1
  REQUIRE(r.next_change);
  CHECK(*r.next_change - h.clock.now() == 15s); // the ramp leaves the floor at 25 s
  h.clock.advance(40s);
  r = h.view();
  CHECK(weight(r, h, "b") == 50);
  CHECK(weight(r, h, "c") == 2);
  REQUIRE(r.next_change);
  CHECK(*r.next_change - h.clock.now() == 5s); // 5% of 100 s
}

TEST_CASE("slow start: the ramp restarts when a peer recovers") {
  HealthOptions o = slow(10s);
  o.outlier.enabled = true;
  o.outlier.consecutive_5xx = 1;
  Harness h(o, {named("a", 100), named("b", 100), named("c", 100)});
  CHECK(weight(h.view(), h, "a") == 100);
  CHECK(h.status("a", 500));
  CHECK_FALSE(available(h.view(), h, "a"));
  h.clock.advance(30s);
  auto r = h.view();
  CHECK(available(r, h, "a"));
  CHECK(weight(r, h, "a") == 10);
  h.clock.advance(6s);
  r = h.view();
  CHECK(weight(r, h, "a") == 60);
  CHECK(line(r, h, "a").reason == "slow start: 60% of weight");
}

TEST_CASE("slow start: a peer that failed and recovered between two views still ramps") {
  Harness h(slow(10s), {named("a", 100), named("b", 100)});
  h.view();
  for (int i = 0; i < 3; ++i) h.probe("a", false, "timeout");
  CHECK(h.probe("a", true) == false);
  CHECK(h.probe("a", true));
  h.clock.advance(2s);
  CHECK(weight(h.view(), h, "a") == 10);
  h.clock.advance(2s);
  CHECK(weight(h.view(), h, "a") == 20);
}

TEST_CASE("slow start: a registry-critical peer ramps when it passes again") {
  Harness h(slow(10s), {named("a", 100, false, Health::critical), named("b", 100)});
  CHECK_FALSE(available(h.view(), h, "a"));
  h.attach({named("a", 100), named("b", 100)});
  h.clock.advance(1s);
  CHECK(weight(h.view(), h, "a") == 10);
  h.clock.advance(4s);
  CHECK(weight(h.view(), h, "a") == 40);
}

// --- panic --------------------------------------------------------------------------

TEST_CASE("panic all: below the threshold every peer is routed at its configured weight") {
  Harness h(panic(50), {named("a", 1, false, Health::critical), named("b", 2, false, Health::critical),
                        named("c", 3)});
  auto r = h.view(); // 3 of 6: exactly 50%, no panic
  CHECK_FALSE(r.panic);
  CHECK(r.healthy_percent == doctest::Approx(50));
  CHECK_FALSE(available(r, h, "a"));

  h.attach({named("a", 1, false, Health::critical), named("b", 3, false, Health::critical), named("c", 3)});
  r = h.view();
  CHECK(r.panic);
  CHECK(r.healthy_percent == doctest::Approx(300.0 / 7));
  CHECK(r.panic_reason == "panic: 42% of primary weight available, below 50%; routing to every primary peer");
  for (const char* id : {"a", "b", "c"}) CHECK(available(r, h, id));
  CHECK(weight(r, h, "b") == 3);
  CHECK(line(r, h, "a").state == PeerState::unhealthy); // its own health is still shown
  CHECK(line(r, h, "a").available);
  CHECK(line(r, h, "a").effective_weight == 1);
}

TEST_CASE("panic all includes ejected and down peers, at full weight despite slow start") {
  HealthOptions o = panic(60);
  o.passive.max_fails = 1;
  o.slow_start.window = 10s;
  Harness h(o, {named("a", 10)});
  h.attach({named("a", 10), named("b", 10)});
  CHECK(h.refused("a"));
  auto r = h.view();
  CHECK(r.panic);
  CHECK(available(r, h, "a"));
  CHECK(weight(r, h, "a") == 10);
  CHECK(weight(r, h, "b") == 10);
  CHECK(line(r, h, "b").reason == "slow start: 10% of weight");
}

TEST_CASE("panic fail: below the threshold no peer is routed") {
  Harness h(panic(50, PanicOptions::Mode::fail), {named("a", 1, false, Health::critical), named("b", 1, false, Health::critical), named("c")});
  auto r = h.view();
  CHECK(r.panic);
  CHECK(r.panic_reason == "panic: 33% of primary weight available, below 50%; routing to no peer");
  for (const char* id : {"a", "b", "c"}) CHECK_FALSE(available(r, h, id));
  CHECK(line(r, h, "c").state == PeerState::healthy);
  CHECK(line(r, h, "c").effective_weight == 0);
}

TEST_CASE("panic threshold 0 disables panic") {
  Harness h(panic(0), {named("a", 1, false, Health::critical), named("b", 1, false, Health::critical), named("c")});
  auto r = h.view();
  CHECK_FALSE(r.panic);
  CHECK(r.panic_reason.empty());
  CHECK_FALSE(available(r, h, "a"));
  CHECK(available(r, h, "c"));
  h.attach({named("a", 1, false, Health::critical)});
  CHECK_FALSE(h.view().panic);
}

TEST_CASE("panic: backup weight is excluded from the share while a primary is available") {
  Harness h(panic(60), {named("a", 1, false, Health::critical), named("b"), named("z", 10, true)});
  auto r = h.view(); // primaries 1 of 2; counting the backup would make it 11 of 12
  CHECK(r.panic);
  CHECK(r.healthy_percent == doctest::Approx(50));
  CHECK(available(r, h, "a"));
}

TEST_CASE("panic: once no primary is available, the backups' share decides") {
  Harness h(panic(60), {named("a", 1, false, Health::critical), named("b", 1, false, Health::critical),
                        named("y", 1, true), named("z", 1, true)});
  auto r = h.view(); // nginx: the backups take over
  CHECK_FALSE(r.panic);
  CHECK_FALSE(available(r, h, "a"));
  CHECK(available(r, h, "y"));

  h.attach({named("a", 1, false, Health::critical), named("b", 1, false, Health::critical),
            named("y", 1, true, Health::critical), named("z", 1, true)});
  r = h.view();
  CHECK(r.panic);
  CHECK(r.panic_reason == "panic: 50% of backup weight available, below 60%; routing to every backup peer");
  CHECK(available(r, h, "y"));
  CHECK_FALSE(available(r, h, "a")); // backups stay in charge
}

TEST_CASE("panic: a set of backups only is judged as a whole") {
  Harness h(panic(50), {named("a", 1, true, Health::critical), named("b", 1, true, Health::critical), named("c", 1, true)});
  auto r = h.view();
  CHECK(r.panic);
  CHECK(r.panic_reason == "panic: 33% of backup weight available, below 50%; routing to every backup peer");
}

TEST_CASE("panic: every peer down is 0% and panics; an empty set does not") {
  Harness h(panic(50), {named("a", 1, false, Health::critical)});
  CHECK(h.view().panic);
  h.attach({});
  auto r = h.view();
  CHECK_FALSE(r.panic);
  CHECK(r.view.peers.empty());
}

// --- membership ---------------------------------------------------------------------

TEST_CASE("health survives attach() of a new set with the same ids") {
  HealthOptions o = outlier(1, 0);
  o.passive.max_fails = 2;
  o.passive.fail_statuses = {429}; // a passive failure that outlier detection counts as a success
  Harness h(o, lettered(3));
  PeerHealth* a_before = &h.of("a");
  CHECK(h.status("a", 500));
  CHECK_FALSE(h.status("b", 429));
  h.attach({named("a", 5), named("b", 5), named("c", 5)}); // same ids, other weights
  CHECK(&h.of("a") == a_before);
  CHECK(h.tracker.size() == 3);
  auto r = h.view();
  CHECK_FALSE(available(r, h, "a"));
  CHECK(line(r, h, "a").ejected);
  CHECK(line(r, h, "b").passive_failures == 1);
  CHECK(h.status("b", 429)); // the second of max_fails 2
  CHECK_FALSE(available(h.view(), h, "b"));
}

TEST_CASE("ids that leave the set are forgotten and come back fresh") {
  HealthOptions o = outlier(1, 0);
  o.slow_start.window = 10s;
  Harness h(o, lettered(3));
  auto old_a = h.health[h.index("a")];
  CHECK(h.status("a", 500));
  CHECK(h.tracker.ejected() == 1);
  h.attach({named("b"), named("c")});
  CHECK(h.tracker.size() == 2);
  CHECK(h.tracker.ejected() == 0); // its ejection slot is free again
  CHECK_FALSE(h.tracker.report(*old_a, 500, false)); // a late report to the old state is ignored
  CHECK_FALSE(h.tracker.report_active(*old_a, false, "timeout"));
  CHECK(h.tracker.ejected() == 0);

  h.attach({named("a", 100), named("b"), named("c")});
  CHECK(&h.of("a") != old_a.get());
  auto r = h.view();
  CHECK(available(r, h, "a"));
  CHECK(line(r, h, "a").times_ejected == 0);
  CHECK(line(r, h, "a").reason == "slow start: 10% of weight"); // a new peer again
}

// --- threads and the hot path -------------------------------------------------------

TEST_CASE("concurrent reports from two threads are counted exactly") {
  HealthOptions o = outlier(1000000, 0);
  o.passive.max_fails = 1000000;
  o.passive.fail_timeout = 1h;
  o.passive.fail_statuses = {500};
  Harness h(o, lettered(2));
  constexpr int per_thread = 20000;
  PeerHealth& a = h.of("a");
  auto hammer = [&] {
    for (int i = 0; i < per_thread; ++i) h.tracker.report(a, 500, false);
  };
  std::thread t1(hammer), t2(hammer);
  std::thread prober([&] {
    for (int i = 0; i < 1000; ++i) h.tracker.report_active(h.of("b"), i % 2 == 0, "timeout");
  });
  for (int i = 0; i < 50; ++i) (void)h.view(); // the rebuild thread reads meanwhile
  t1.join();
  t2.join();
  prober.join();
  auto r = h.view();
  CHECK(line(r, h, "a").passive_failures == 2 * per_thread);
  CHECK(line(r, h, "a").consecutive_5xx == 2 * per_thread);
  CHECK(available(r, h, "a"));

  // A pick fail_timeout after the last failure lets a success clear the count (nginx).
  h.clock.advance(1h);
  h.tracker.on_pick(const_cast<dynup::PeerStats&>(HealthTracker::stats_of(a)));
  auto succeed = [&] {
    for (int i = 0; i < per_thread; ++i) h.tracker.report(a, 200, false);
  };
  std::thread t3(succeed), t4(succeed);
  t3.join();
  t4.join();
  r = h.view();
  CHECK(line(r, h, "a").passive_failures == 0);
  CHECK(line(r, h, "a").consecutive_5xx == 0);
}

TEST_CASE("concurrent ejections never exceed max_ejection_percent") {
  std::vector<Peer> peers;
  for (int i = 0; i < 30; ++i) peers.push_back(named("p" + std::to_string(100 + i)));
  Harness h(outlier(1, 0), std::move(peers));
  auto eject_half = [&](std::size_t first) {
    for (std::size_t i = first; i < first + 15; ++i) h.tracker.report(*h.health[i], 503, false);
  };
  std::thread t1(eject_half, 0), t2(eject_half, 15);
  t1.join();
  t2.join();
  CHECK(h.tracker.ejected() == 3);
  std::size_t unavailable = 0;
  for (const auto& c : h.view().view.peers) unavailable += c.available ? 0 : 1;
  CHECK(unavailable == 3);
}

TEST_CASE("report does not allocate, on success or failure") {
  HealthOptions o = outlier(3, 3);
  o.passive.max_fails = 2;
  Harness h(o, lettered(3));
  PeerHealth& a = h.of("a");
  dynup_test::AllocationCount count;
  h.tracker.report(a, 200, false);
  h.tracker.report(a, 502, false);
  h.tracker.report(a, 0, true);
  h.tracker.report(a, 200, false);
  for (int i = 0; i < 3; ++i) h.tracker.report(a, 503, false); // ejects
  CHECK(count.value() == 0);
}

TEST_CASE("report accepts a dynup::Outcome") {
  Harness h(passive(1), lettered(2));
  CHECK_FALSE(h.tracker.report(h.of("a"), dynup::Outcome{5ms, 200, false}));
  CHECK(h.tracker.report(h.of("a"), dynup::Outcome{5ms, 0, true}));
  CHECK_FALSE(available(h.view(), h, "a"));
}

// --- JSON options -------------------------------------------------------------------

TEST_CASE("health_options_from_json reads every key") {
  auto j = json::parse(R"({
    "active": {"type": "http", "path": "/healthz", "host_header": "api.internal",
               "expected_statuses": [200, "300-399"], "timeout_ms": 500, "interval_ms": 2000,
               "healthy_threshold": 1, "unhealthy_threshold": 4, "max_concurrent": 2},
    "passive": {"max_fails": 3, "fail_timeout_ms": 5000, "fail_statuses": [502, 503]},
    "outlier": {"consecutive_5xx": 7, "consecutive_gateway_failure": 0, "base_ejection_ms": 1000,
                "max_ejection_ms": 60000, "max_ejection_percent": 25.5},
    "panic": {"threshold_percent": 30, "mode": "fail"},
    "slow_start": {"window_ms": 60000, "aggression": 1.5, "min_weight_percent": 5}})");
  auto r = dynup::health_options_from_json(j);
  REQUIRE_MESSAGE(r, r.error().message());
  const HealthOptions& o = *r;
  CHECK(o.active.kind == dynup::ActiveCheckOptions::Kind::http);
  CHECK(o.active.path == "/healthz");
  CHECK(o.active.host_header == "api.internal");
  CHECK(o.active.expected_statuses == std::vector<std::pair<int, int>>{{200, 200}, {300, 399}});
  CHECK(o.active.timeout == 500ms);
  CHECK(o.active.interval == 2s);
  CHECK(o.active.healthy_threshold == 1);
  CHECK(o.active.unhealthy_threshold == 4);
  CHECK(o.active.max_concurrent == 2);
  CHECK(o.passive.max_fails == 3);
  CHECK(o.passive.fail_timeout == 5s);
  CHECK(o.passive.fail_statuses == std::vector<int>{502, 503});
  CHECK(o.outlier.enabled); // an outlier section turns it on
  CHECK(o.outlier.consecutive_5xx == 7);
  CHECK(o.outlier.consecutive_gateway_failure == 0);
  CHECK(o.outlier.base_ejection_time == 1s);
  CHECK(o.outlier.max_ejection_time == 60s);
  CHECK(o.outlier.max_ejection_percent == 25.5);
  CHECK(o.panic.threshold_percent == 30);
  CHECK(o.panic.mode == PanicOptions::Mode::fail);
  CHECK(o.slow_start.window == 60s);
  CHECK(o.slow_start.aggression == 1.5);
  CHECK(o.slow_start.min_weight_percent == 5);
}

TEST_CASE("health_options_from_json: an empty object gives the defaults; outlier can be switched off") {
  auto r = dynup::health_options_from_json(json::object());
  REQUIRE(r);
  CHECK(dynup::health_options_to_json(*r) == dynup::health_options_to_json(HealthOptions{}));
  CHECK_FALSE(r->outlier.enabled);
  auto off = dynup::health_options_from_json(json::parse(R"({"outlier": {"enabled": false}})"));
  REQUIRE(off);
  CHECK_FALSE(off->outlier.enabled);
  auto tcp = dynup::health_options_from_json(json::parse(R"({"active": {"type": "tcp"}})"));
  REQUIRE(tcp);
  CHECK(tcp->active.kind == dynup::ActiveCheckOptions::Kind::tcp);
}

TEST_CASE("health_options_to_json reads back to the same options") {
  HealthOptions o;
  o.active.kind = dynup::ActiveCheckOptions::Kind::tcp;
  o.active.expected_statuses = {{204, 204}, {200, 299}};
  o.passive.fail_statuses = {500, 502};
  o.outlier.enabled = true;
  o.outlier.max_ejection_percent = 33.5;
  o.panic.mode = PanicOptions::Mode::fail;
  o.slow_start.window = 30s;
  o.slow_start.aggression = 2.5;
  auto j = dynup::health_options_to_json(o);
  auto back = dynup::health_options_from_json(json::parse(j.dump()));
  REQUIRE_MESSAGE(back, back.error().message());
  CHECK(dynup::health_options_to_json(*back) == j);
  CHECK(j["active"]["expected_statuses"].dump() == R"([204,"200-299"])");
}

TEST_CASE("every health option error names its JSON path") {
  struct Case {
    const char* json;
    const char* message;
  };
  const Case cases[] = {
      {R"([])", "health: expected an object, got array"},
      {R"({"activ": {}})", "health.activ: unknown key (expected active, passive, outlier, panic, slow_start)"},
      {R"({"passive": 3})", "health.passive: expected an object, got number"},
      {R"({"active": {"type": "tcp", "port": 1}})",
       "health.active.port: unknown key (expected type, path, host_header, expected_statuses, timeout_ms, "
       "interval_ms, healthy_threshold, unhealthy_threshold, max_concurrent)"},
      {R"({"passive": {"max_fail": 1}})",
       "health.passive.max_fail: unknown key (expected max_fails, fail_timeout_ms, fail_statuses)"},
      {R"({"outlier": {"interval_ms": 1}})",
       "health.outlier.interval_ms: unknown key (expected enabled, consecutive_5xx, consecutive_gateway_failure, "
       "base_ejection_ms, max_ejection_ms, max_ejection_percent)"},
      {R"({"panic": {"threshold": 1}})", "health.panic.threshold: unknown key (expected threshold_percent, mode)"},
      {R"({"slow_start": {"window": 1}})",
       "health.slow_start.window: unknown key (expected window_ms, aggression, min_weight_percent)"},
      {R"({"active": {}})", R"(health.active.type: is required ("http", "tcp" or "none"))"},
      {R"({"active": {"type": "udp"}})", R"(health.active.type: expected "http", "tcp" or "none", got "udp")"},
      {R"({"active": {"type": "http", "path": "healthz"}})",
       R"(health.active.path: expected a string starting with "/", got "healthz")"},
      {R"({"active": {"type": "http", "path": 5}})", R"(health.active.path: expected a string starting with "/", got 5)"},
      {R"({"active": {"type": "http", "path": "/x HTTP/1.1\r\nX-Evil: 1"}})",
       R"(health.active.path: contains a space or a control character (percent-encode it))"},
      {R"({"active": {"type": "http", "host_header": 5}})", "health.active.host_header: expected a string, got number"},
      {R"({"active": {"type": "http", "host_header": "a\r\nX-Evil: 1"}})",
       "health.active.host_header: contains a control character"},
      {R"({"active": {"type": "http", "expected_statuses": []}})",
       R"(health.active.expected_statuses: expected a non-empty array of statuses or "lo-hi" ranges, got [])"},
      {R"({"active": {"type": "http", "expected_statuses": 200}})",
       R"(health.active.expected_statuses: expected a non-empty array of statuses or "lo-hi" ranges, got 200)"},
      {R"({"active": {"type": "http", "expected_statuses": [200, 600]}})",
       R"(health.active.expected_statuses[1]: expected an HTTP status 100..599 or a range "lo-hi" within it, got 600)"},
      {R"({"active": {"type": "http", "expected_statuses": ["399-200"]}})",
       R"(health.active.expected_statuses[0]: expected an HTTP status 100..599 or a range "lo-hi" within it, got "399-200")"},
      {R"({"active": {"type": "http", "expected_statuses": ["2xx"]}})",
       R"(health.active.expected_statuses[0]: expected an HTTP status 100..599 or a range "lo-hi" within it, got "2xx")"},
      {R"({"active": {"type": "http", "timeout_ms": 0}})",
       "health.active.timeout_ms: expected a positive integer of milliseconds, got 0"},
      {R"({"active": {"type": "http", "timeout_ms": 1.5}})",
       "health.active.timeout_ms: expected a positive integer of milliseconds, got 1.5"},
      {R"({"active": {"type": "http", "interval_ms": "5s"}})",
       R"(health.active.interval_ms: expected a positive integer of milliseconds, got "5s")"},
      {R"({"active": {"type": "http", "interval_ms": 86400001}})",
       "health.active.interval_ms: expected at most 86400000 milliseconds (one day), got 86400001"},
      {R"({"active": {"type": "http", "healthy_threshold": 0}})",
       "health.active.healthy_threshold: expected an integer 1..10000, got 0"},
      {R"({"active": {"type": "http", "unhealthy_threshold": -3}})",
       "health.active.unhealthy_threshold: expected an integer 1..10000, got -3"},
      {R"({"active": {"type": "http", "max_concurrent": 0}})",
       "health.active.max_concurrent: expected an integer 1..10000, got 0"},
      {R"({"passive": {"max_fails": -1}})", "health.passive.max_fails: expected an integer 0..1000000, got -1"},
      {R"({"passive": {"fail_timeout_ms": 0}})",
       "health.passive.fail_timeout_ms: expected a positive integer of milliseconds, got 0"},
      {R"({"passive": {"fail_statuses": "502"}})",
       R"(health.passive.fail_statuses: expected an array of HTTP statuses, got "502")"},
      {R"({"passive": {"fail_statuses": [502, 99]}})",
       "health.passive.fail_statuses[1]: expected an HTTP status 100..599, got 99"},
      {R"({"outlier": {"enabled": 1}})", "health.outlier.enabled: expected true or false, got 1"},
      {R"({"outlier": {"consecutive_5xx": -1}})", "health.outlier.consecutive_5xx: expected an integer 0..1000000, got -1"},
      {R"({"outlier": {"consecutive_gateway_failure": 2.5}})",
       "health.outlier.consecutive_gateway_failure: expected an integer 0..1000000, got 2.5"},
      {R"({"outlier": {"base_ejection_ms": -5}})",
       "health.outlier.base_ejection_ms: expected a positive integer of milliseconds, got -5"},
      {R"({"outlier": {"max_ejection_ms": 0}})",
       "health.outlier.max_ejection_ms: expected a positive integer of milliseconds, got 0"},
      {R"({"outlier": {"base_ejection_ms": 30000, "max_ejection_ms": 1000}})",
       "health.outlier.max_ejection_ms: must be at least base_ejection_ms (30000), got 1000"},
      {R"({"outlier": {"base_ejection_ms": 600000}})",
       "health.outlier.base_ejection_ms: must be at most max_ejection_ms (300000, the default), got 600000"},
      {R"({"outlier": {"max_ejection_percent": 101}})",
       "health.outlier.max_ejection_percent: expected a number in [0, 100], got 101"},
      {R"({"panic": {"threshold_percent": -0.5}})", "health.panic.threshold_percent: expected a number in [0, 100], got -0.5"},
      {R"({"panic": {"threshold_percent": "50"}})", R"(health.panic.threshold_percent: expected a number in [0, 100], got "50")"},
      {R"({"panic": {"mode": "none"}})", R"(health.panic.mode: expected "all" or "fail", got "none")"},
      {R"({"slow_start": {"window_ms": -1}})",
       "health.slow_start.window_ms: expected a non-negative integer of milliseconds, got -1"},
      {R"({"slow_start": {"aggression": 0}})", "health.slow_start.aggression: expected a number > 0, got 0"},
      {R"({"slow_start": {"aggression": null}})", "health.slow_start.aggression: expected a number > 0, got null"},
      {R"({"slow_start": {"min_weight_percent": 0}})",
       "health.slow_start.min_weight_percent: expected a number in (0, 100], got 0"},
      {R"({"slow_start": {"min_weight_percent": 100.5}})",
       "health.slow_start.min_weight_percent: expected a number in (0, 100], got 100.5"},
  };
  for (const Case& c : cases) {
    CAPTURE(c.json);
    auto r = dynup::health_options_from_json(json::parse(c.json));
    REQUIRE_FALSE(r);
    CHECK(r.error().code() == Errc::invalid_argument);
    CHECK(r.error().message() == c.message);
  }
}

TEST_CASE("health option errors are all reported, under the caller's path") {
  auto r = dynup::health_options_from_json(
      json::parse(R"({"passive": {"max_fails": -1}, "panic": {"mode": "some"}})"), "upstreams[2].health");
  REQUIRE_FALSE(r);
  CHECK(r.error().message() ==
        "upstreams[2].health.passive.max_fails: expected an integer 0..1000000, got -1; "
        R"(upstreams[2].health.panic.mode: expected "all" or "fail", got "some")");
}
