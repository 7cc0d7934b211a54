// nginx parity of the policies and passive health: a reference model of nginx 1.22's
// round robin (ngx_http_upstream_get_peer and ngx_http_upstream_free_round_robin_peer, as
// nginx's documentation and source describe them) drives the same requests as dynup, and
// the tries must match one for one. The end-to-end check against a real nginx is
// tests/e2e/nginx_module_differential_test.cpp.
#include <dynup/balance/maglev.hpp>
#include <dynup/balance/ring_hash.hpp>
#include <dynup/balance/round_robin.hpp>
#include <dynup/health/tracker.hpp>
#include <dynup/upstream.hpp>

#include "support/picking.hpp"
#include <support/temp_dir.hpp>
#include <support/text.hpp>
#include <doctest/doctest.h>

#include <chrono>
#include <cstdint>
#include <set>
#include <string>
#include <vector>

using namespace std::chrono_literals;
using nlohmann::json;

namespace {

// nginx's per-worker round robin over one tier, with max_fails/fail_timeout.
struct NginxModel {
  struct Peer {
    std::string id;
    std::int64_t weight, current = 0, effective;
    unsigned fails = 0;
    std::int64_t accessed = 0, checked = 0;
  };
  std::vector<Peer> peers; // in id order, as dynup sorts them
  unsigned max_fails;
  std::int64_t fail_timeout;

  NginxModel(const std::vector<std::pair<std::string, int>>& weights, unsigned mf, std::int64_t ft)
      : max_fails(mf), fail_timeout(ft) {
    for (const auto& [id, w] : weights) peers.push_back({id, w, 0, w});
  }

  // ngx_http_upstream_get_peer: -1 when every peer is tried or down.
  int get(std::vector<bool>& tried, std::int64_t now) {
    int best = -1;
    std::int64_t total = 0;
    for (std::size_t i = 0; i < peers.size(); ++i) {
      Peer& p = peers[i];
      if (tried[i]) continue;
      if (max_fails && p.fails >= max_fails && now - p.checked <= fail_timeout) continue;
      p.current += p.effective;
      total += p.effective;
      if (p.effective < p.weight) ++p.effective;
      if (best < 0 || p.current > peers[static_cast<std::size_t>(best)].current) best = static_cast<int>(i);
    }
    if (best < 0) return -1;
    Peer& b = peers[static_cast<std::size_t>(best)];
    tried[static_cast<std::size_t>(best)] = true;
    b.current -= total;
    if (now - b.checked > fail_timeout) b.checked = now;
    return best;
  }
  // ngx_http_upstream_free_round_robin_peer
  void failed(int i, std::int64_t now) {
    Peer& p = peers[static_cast<std::size_t>(i)];
    ++p.fails;
    p.accessed = p.checked = now;
    if (max_fails) p.effective = std::max<std::int64_t>(0, p.effective - p.weight / max_fails);
  }
  void succeeded(int i) {
    Peer& p = peers[static_cast<std::size_t>(i)];
    if (p.accessed < p.checked) p.fails = 0;
  }
};

struct Fixture {
  dynup_test::TempDir dir;
  std::string path = dir.file("peers.json");

  explicit Fixture(const std::vector<std::pair<std::string, int>>& weights) {
    json peers = json::array();
    for (const auto& [port, w] : weights) peers.push_back({{"host", "10.0.0.1"}, {"port", std::stoi(port)}, {"weight", w}});
    dynup_test::write_by_rename(path, json{{"peers", peers}}.dump());
  }
  json config(json health, json policy) const {
    return json{{"name", "api"}, {"source", "file://" + path}, {"policy", policy}, {"health", health}};
  }
};

std::unique_ptr<dynup::Upstream> start(const json& config, const dynup::Clock& clock) {
  auto up = dynup::Upstream::start(config, clock);
  REQUIRE_MESSAGE(up.ok(), up.error().message());
  return std::move(up).value();
}

std::int64_t ns(const dynup::Clock& c) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(c.now().time_since_epoch()).count();
}

// Runs `requests` requests through dynup and the model, each retried on the next peer
// while the tried one is in `dead`; returns every try of both as "id,id|id|...".
std::pair<std::string, std::string> run_both(dynup::Upstream& up, NginxModel& model, const std::set<std::string>& dead,
                                             int requests, const dynup::Clock& clock) {
  std::string ours, theirs;
  for (int r = 0; r < requests; ++r) {
    dynup::TriedPeers tried;
    for (;;) {
      auto s = up.pick({{}, &tried});
      if (!s) {
        ours += "-";
        break;
      }
      const std::string id = s.peer->id;
      ours += id;
      tried.add(s.pick.id_hash);
      const bool fails = dead.count(id) > 0;
      up.report(s, fails ? dynup::Outcome{1ms, 0, true} : dynup::Outcome{1ms, 200, false});
      if (!fails) break;
      ours += ",";
    }
    ours += "|";
    std::vector<bool> tried_model(model.peers.size());
    for (;;) {
      int i = model.get(tried_model, ns(clock));
      if (i < 0) {
        theirs += "-";
        break;
      }
      const std::string& id = model.peers[static_cast<std::size_t>(i)].id;
      theirs += id;
      if (!dead.count(id)) {
        model.succeeded(i);
        break;
      }
      model.failed(i, ns(clock));
      theirs += ",";
    }
    theirs += "|";
  }
  return {ours, theirs};
}

} // namespace

TEST_CASE("round_robin sequence nginx: tries match nginx's round robin through retries, max_fails and recovery") {
  dynup::ManualClock clock;
  const std::vector<std::pair<std::string, int>> weights = {{"8081", 3}, {"8082", 1}, {"8083", 2}, {"8084", 1}, {"8085", 1}};
  Fixture f(weights);
  json health = {{"passive", {{"max_fails", 2}, {"fail_timeout_ms", 10000}}}, {"panic", {{"threshold_percent", 0}}}};
  auto up = start(f.config(health, {{"name", "round_robin"}, {"options", {{"sequence", "nginx"}}}}), clock);
  std::vector<std::pair<std::string, int>> ids;
  for (const auto& [port, w] : weights) ids.push_back({"10.0.0.1:" + port, w});
  NginxModel model(ids, 2, 10'000'000'000);

  auto [ours, theirs] = run_both(*up, model, {"10.0.0.1:8082", "10.0.0.1:8084"}, 40, clock);
  CHECK(ours == theirs);
  // Both dead peers were tried, then held out.
  CHECK(dynup_test::contains(ours, "10.0.0.1:8082,"));
  CHECK(dynup_test::contains(ours, "10.0.0.1:8084,"));

  // fail_timeout later one request tries each again; 8082 has recovered, 8084 has not.
  clock.advance(11s);
  up->refresh();
  auto [ours2, theirs2] = run_both(*up, model, {"10.0.0.1:8084"}, 40, clock);
  CHECK(ours2 == theirs2);
  CHECK(dynup_test::contains(ours2, "10.0.0.1:8082|"));
}

TEST_CASE("round_robin sequence nginx: a retry takes its turn out of the same weights, so a dead peer costs every other request") {
  dynup::ManualClock clock;
  Fixture f({{"8081", 1}, {"8082", 1}});
  json health = {{"passive", {{"max_fails", 0}}}, {"panic", {{"threshold_percent", 0}}}};
  auto up = start(f.config(health, {{"name", "round_robin"}, {"options", {{"sequence", "nginx"}}}}), clock);
  NginxModel model({{"10.0.0.1:8081", 1}, {"10.0.0.1:8082", 1}}, 0, 10'000'000'000);
  auto [ours, theirs] = run_both(*up, model, {"10.0.0.1:8081"}, 10, clock);
  CHECK(ours == theirs);
  std::size_t retried = 0;
  for (std::size_t at = ours.find(','); at != std::string::npos; at = ours.find(',', at + 1)) ++retried;
  CHECK(retried == 5);
}

TEST_CASE("passive gate: the failure that takes a peer down keeps it from the very next pick, with no rebuild") {
  dynup::ManualClock clock;
  dynup::HealthOptions o;
  o.passive.max_fails = 1;
  o.panic.threshold_percent = 0;
  dynup::HealthTracker tracker(o, clock);
  auto set = dynup_test::snapshot({dynup_test::peer("10.0.0.1", 80), dynup_test::peer("10.0.0.2", 80),
                                   dynup_test::peer("10.0.0.3", 80)});
  auto health = tracker.attach(*set);
  auto policy = dynup_test::make("round_robin", {{"start", 0}});
  policy->share_stats([&](const dynup::Peer& p) { return tracker.stats_of(p.id); });
  auto picker = policy->build(set, tracker.view(*set, health).view); // built once, never again

  auto first = picker->pick({});
  REQUIRE(first);
  const std::uint32_t down = first.index;
  CHECK(tracker.report(*health[down], 0, true));
  for (int i = 0; i < 30; ++i) {
    auto s = picker->pick({});
    REQUIRE(s);
    CHECK(s.index != down);
  }
  clock.advance(10s); // fail_timeout over: the next pick of it goes through
  std::set<std::uint32_t> seen;
  for (int i = 0; i < 3; ++i) {
    auto s = picker->pick({});
    REQUIRE(s);
    seen.insert(s.index);
    if (s.index == down) tracker.on_pick(*s.stats);
  }
  CHECK(seen.count(down) == 1);
  for (int i = 0; i < 6; ++i) CHECK(picker->pick({}).index != down); // one try at a time
}

TEST_CASE("every peer down: no peer and all_unavailable without panic; panic all routes to them") {
  dynup::ManualClock clock;
  Fixture f({{"8081", 1}, {"8082", 1}});
  json passive = {{"max_fails", 1}, {"fail_timeout_ms", 10000}};
  for (bool panic : {false, true}) {
    CAPTURE(panic);
    json health = {{"passive", passive}, {"panic", {{"threshold_percent", panic ? 50 : 0}}}};
    auto up = start(f.config(health, "round_robin"), clock);
    for (int i = 0; i < 2; ++i) {
      auto s = up->pick();
      REQUIRE(s);
      up->report(s, {1ms, 0, true});
    }
    auto s = up->pick(); // before or after the rebuild thread saw it: the same answer
    CHECK(static_cast<bool>(s) == panic);
    if (!panic) CHECK(s.pick.error == dynup::PickError::all_unavailable);
    up->refresh();
    auto again = up->pick();
    CHECK(static_cast<bool>(again) == panic);
  }
}

TEST_CASE("ring_hash and maglev with an empty key fall back to nginx's round robin") {
  const std::vector<std::pair<std::string, int>> weights = {{"a", 2}, {"b", 1}, {"c", 1}};
  std::vector<dynup::Peer> peers;
  for (const auto& [id, w] : weights) {
    dynup::Peer p = dynup_test::peer(id + ".test", 80, static_cast<std::uint32_t>(w));
    p.id = id;
    peers.push_back(p);
  }
  auto set = dynup_test::snapshot(peers);
  for (const char* name : {"ring_hash", "maglev"}) {
    CAPTURE(name);
    auto picker = dynup_test::make(name, json::object())->build(set);
    NginxModel model(weights, 0, 0);
    std::string ours, theirs;
    for (int i = 0; i < 12; ++i) {
      auto s = picker->pick({});
      REQUIRE(s);
      ours += s.peer->id;
      std::vector<bool> tried(weights.size());
      theirs += model.peers[static_cast<std::size_t>(model.get(tried, 0))].id;
    }
    CHECK(ours == theirs);
    CHECK(ours.substr(0, 4) == "abca");
  }
}
