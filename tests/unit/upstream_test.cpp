// The Upstream facade: config errors, picking and reporting through it, health through
// it (passive, outlier, panic, active), health surviving updates, and status().
#include <dynup/peer_json.hpp>
#include <dynup/snapshot_file.hpp>
#include <dynup/upstream.hpp>

#include <support/text.hpp>
#include <support/temp_dir.hpp>
#include <support/wait.hpp>

#include <doctest/doctest.h>
#include <httplib.h>
#include <nlohmann/json.hpp>

#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

using dynup::ManualClock;
using dynup::Outcome;
using dynup::Upstream;
using dynup_test::TempDir;
using dynup_test::wait_until;
using dynup_test::write_by_rename;
using nlohmann::json;
using namespace std::chrono_literals;

namespace {

using dynup_test::contains;
std::string peers_doc(const std::vector<std::string>& host_ports) {
  json peers = json::array();
  for (const auto& hp : host_ports) {
    auto colon = hp.rfind(':');
    peers.push_back({{"host", hp.substr(0, colon)}, {"port", std::stoi(hp.substr(colon + 1))}});
  }
  return json{{"peers", peers}}.dump();
}

// A peer file in a temporary directory and a config watching it.
struct Fixture {
  TempDir dir;
  std::string path = dir.file("peers.json");

  explicit Fixture(const std::vector<std::string>& peers) { write_by_rename(path, peers_doc(peers)); }

  json config(json health = json::object(), json policy = "round_robin") const {
    return json{{"name", "api"}, {"source", "file://" + path}, {"policy", policy}, {"health", health}};
  }
};

std::unique_ptr<Upstream> start(const json& config, const dynup::Clock& clock = dynup::steady_clock()) {
  auto up = Upstream::start(config, clock);
  REQUIRE_MESSAGE(up.ok(), up.error().message());
  return std::move(up).value();
}

std::string config_error(json config) {
  auto up = Upstream::start(config);
  REQUIRE_FALSE(up.ok());
  CHECK(up.error().code() == dynup::Errc::invalid_argument);
  return up.error().message();
}

// Ids picked over n picks, each reported with `outcome`.
std::map<std::string, int> picks(Upstream& up, int n, Outcome outcome = {1ms, 200, false}) {
  std::map<std::string, int> seen;
  for (int i = 0; i < n; ++i) {
    auto s = up.pick();
    if (!s) continue;
    ++seen[s.peer->id];
    up.report(s, outcome);
  }
  return seen;
}

// Reports `n` outcomes on `id` (picking until it comes up).
void fail_peer(Upstream& up, const std::string& id, int n, Outcome outcome) {
  for (int done = 0, tries = 0; done < n && tries < 10000; ++tries) {
    auto s = up.pick();
    REQUIRE(s);
    if (s.peer->id == id) {
      up.report(s, outcome);
      ++done;
    } else {
      up.report(s, {1ms, 200, false});
    }
  }
}

// One peer's entry in status(), or null.
json peer_status(const nlohmann::ordered_json& status, const std::string& id) {
  for (const auto& p : status["peers"])
    if (p["id"] == id) return json(p);
  return nullptr;
}

} // namespace

TEST_CASE("upstream config: every error names its path") {
  Fixture f({"10.0.0.1:80"});
  json ok = f.config();
  CHECK(contains(config_error(json::array()), "upstream: expected an object"));
  json c = ok;
  c.erase("name");
  CHECK(contains(config_error(c), "upstream.name: required"));
  c = ok;
  c.erase("source");
  CHECK(contains(config_error(c), "upstream.source: required"));
  c = ok;
  c["name"] = "api v2";
  CHECK(contains(config_error(c), "upstream.name: \"api v2\" must be 1..64 characters"));
  c = ok;
  c["name"] = 7;
  CHECK(contains(config_error(c), "upstream.name: expected a non-empty string, got 7"));
  c = ok;
  c["colour"] = "blue";
  CHECK(contains(config_error(c), "upstream.colour: unknown key (valid: name, source, policy"));
  c = ok;
  c["source"] = "zk://h:1/x";
  CHECK(contains(config_error(c), "upstream.source: "));
  CHECK(contains(config_error(c), "consul://"));
  c = ok;
  c["policy"] = "fastest";
  CHECK(contains(config_error(c), "upstream.policy: unknown policy \"fastest\" (valid: round_robin"));
  c = ok;
  c["policy"] = {{"name", "least_request"}, {"options", {{"choice_count", 0}}}};
  CHECK(contains(config_error(c), "upstream.policy: policy least_request: option \"choice_count\" must be"));
  c = ok;
  c["policy"] = {{"options", json::object()}};
  CHECK(contains(config_error(c), "upstream.policy.name: required"));
  c = ok;
  c["guards"] = {{"max_removed_share", 1.5}};
  CHECK(contains(config_error(c), "upstream.guards.max_removed_share: expected a number in [0, 1], got 1.5"));
  c = ok;
  c["guards"] = {{"allow_empty", "yes"}};
  CHECK(contains(config_error(c), "upstream.guards.allow_empty: expected true or false"));
  c = ok;
  c["guards"] = {{"min_peers", -1}};
  CHECK(contains(config_error(c), "upstream.guards.min_peers: expected an integer 0..1000000, got -1"));
  c = ok;
  c["watch"] = {{"wait_ms", 5}};
  CHECK(contains(config_error(c), "upstream.watch.wait_ms: expected an integer 10..600000, got 5"));
  c = ok;
  c["watch"] = {{"backoff_base_ms", 500}, {"backoff_cap_ms", 100}};
  CHECK(contains(config_error(c), "upstream.watch.backoff_cap_ms: is below backoff_base_ms"));
  c = ok;
  c["watch"] = {{"burst", 0}};
  CHECK(contains(config_error(c), "upstream.watch.burst: expected an integer 1..1000, got 0"));
  c = ok;
  c["watch"] = {{"retries", 3}};
  CHECK(contains(config_error(c), "upstream.watch.retries: unknown key"));
  c = ok;
  c["snapshot_path"] = f.dir.file("api.snap"); // a file source is its own last-known-good
  CHECK(contains(config_error(c), "upstream.source: "));
  CHECK(contains(config_error(c), "snapshot_path"));
  c = ok;
  c["health"] = {{"passive", {{"fail_timeout_ms", -5}}}};
  CHECK(contains(config_error(c), "upstream.health.passive.fail_timeout_ms"));
  c = ok;
  c["health"] = {{"panik", json::object()}};
  CHECK(contains(config_error(c), "upstream.health.panik"));
}

TEST_CASE("upstream: picks follow the policy and every peer is reported back") {
  Fixture f({"10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"});
  auto up = start(f.config());
  auto seen = picks(*up, 300);
  CHECK(seen == std::map<std::string, int>{{"10.0.0.1:80", 100}, {"10.0.0.2:80", 100}, {"10.0.0.3:80", 100}});

  auto st = up->status();
  CHECK(st["name"] == "api");
  CHECK(st["policy"] == "round_robin");
  CHECK(st["version"] == 1);
  CHECK(st["stale"] == false);
  CHECK(st["panic"] == false);
  REQUIRE(st["peers"].size() == 3);
  for (const auto& p : st["peers"]) {
    CHECK(p["in_flight"] == 0); // every pick was reported
    CHECK(p["state"] == "healthy");
    CHECK(p["effective_weight"] == 1);
  }
}

TEST_CASE("upstream: a new file version reaches pick() without a reload") {
  Fixture f({"10.0.0.1:80"});
  auto up = start(f.config());
  CHECK(picks(*up, 10) == std::map<std::string, int>{{"10.0.0.1:80", 10}});
  write_by_rename(f.path, peers_doc({"10.0.0.2:80"}));
  REQUIRE(wait_until([&] {
    auto s = up->pick();
    const bool moved = s && s.peer->id == "10.0.0.2:80";
    up->report(s, {1ms, 200, false});
    return moved;
  }));
}

TEST_CASE("upstream: a selection stays valid after its peer leaves the set") {
  Fixture f({"10.0.0.1:80"});
  auto up = start(f.config());
  auto held = up->pick();
  REQUIRE(held);
  write_by_rename(f.path, peers_doc({"10.0.0.2:80"}));
  REQUIRE(wait_until([&] { return up->status()["peers"][0]["id"] == "10.0.0.2:80"; }));
  CHECK(held.peer->id == "10.0.0.1:80"); // still readable: the selection leases its table
  CHECK(up->status()["retained_tables"] >= 1);
  up->report(held, {1ms, 502, false}); // and reporting it is harmless
  CHECK_FALSE(held);                   // report ended the selection
  CHECK(held.table() == nullptr);
  // The replaced table is freed once nothing leases it and no thread's cache holds it
  // (this thread's does until its next pick); the rebuild thread sweeps.
  CHECK(picks(*up, 1).size() == 1);
  CHECK(wait_until([&] { return up->status()["retained_tables"] == 0; }));
  CHECK(picks(*up, 5) == std::map<std::string, int>{{"10.0.0.2:80", 5}});
}

TEST_CASE("upstream: a selection ends by report, cancel, destruction or move, exactly once") {
  Fixture f({"10.0.0.1:80"});
  auto up = start(f.config(json::object(), "least_request"));
  auto in_flight = [&] {
    auto st = up->status();
    return st["peers"][0]["in_flight"].get<long>();
  };
  {
    auto s = up->pick();
    REQUIRE(s);
    CHECK(in_flight() == 1);
    s.cancel();
    CHECK_FALSE(s);
    CHECK(in_flight() == 0);
    s.cancel(); // idempotent
    up->report(s, {1ms, 502, false}); // an ended selection is ignored
    CHECK(in_flight() == 0);
  }
  {
    auto a = up->pick();
    auto b = up->pick();
    CHECK(in_flight() == 2);
    dynup::UpstreamSelection moved = std::move(a);
    CHECK_FALSE(a); // NOLINT(bugprone-use-after-move): moved-from is empty by contract
    CHECK(moved);
    moved = std::move(b); // the overwritten selection is cancelled
    CHECK(in_flight() == 1);
  } // the destructor cancels `moved`
  CHECK(in_flight() == 0);
  // A cancelled selection is not a failure: no passive report, no latency sample.
  auto st = up->status();
  CHECK(st["peers"][0]["state"] == "healthy");
  CHECK(st["peers"][0]["ewma_ms"].is_null());
}

TEST_CASE("upstream: a success resets the consecutive-failure count through the shared stats line") {
  // consecutive_5xx 3: two 5xx, a success, two 5xx never eject; three in a row do.
  Fixture f({"10.0.0.1:80", "10.0.0.2:80"});
  json health = {{"outlier", {{"consecutive_5xx", 3}, {"max_ejection_percent", 50}}}};
  auto up = start(f.config(health));
  auto ejected = [&] {
    auto st = up->status();
    return peer_status(st, "10.0.0.1:80")["available"] == false;
  };
  for (int round = 0; round < 3; ++round) {
    fail_peer(*up, "10.0.0.1:80", 2, {1ms, 503, false});
    fail_peer(*up, "10.0.0.1:80", 1, {1ms, 200, false});
  }
  up->refresh();
  CHECK_FALSE(ejected());
  fail_peer(*up, "10.0.0.1:80", 3, {1ms, 503, false});
  CHECK(wait_until(ejected));
}

TEST_CASE("upstream: nginx max_fails takes a peer out for fail_timeout, then back") {
  ManualClock clock;
  Fixture f({"10.0.0.1:80", "10.0.0.2:80"});
  auto up = start(f.config({{"passive", {{"max_fails", 2}, {"fail_timeout_ms", 10000}}}}), clock);
  fail_peer(*up, "10.0.0.1:80", 2, {0ms, 0, true});
  up->refresh();
  CHECK(picks(*up, 20) == std::map<std::string, int>{{"10.0.0.2:80", 20}});
  json p = peer_status(up->status(), "10.0.0.1:80");
  REQUIRE_FALSE(p.is_null());
  CHECK(p["available"] == false);
  CHECK_MESSAGE(contains(p["reason"], "passive"), p["reason"]);

  clock.advance(10001ms);
  up->refresh();
  CHECK(picks(*up, 20).size() == 2);
}

TEST_CASE("upstream: consecutive 5xx eject a peer, and the rebuild thread applies it by itself") {
  Fixture f({"10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"});
  json health = {{"outlier", {{"consecutive_5xx", 3}, {"max_ejection_percent", 50}}}};
  auto up = start(f.config(health)); // the steady clock: no refresh() calls
  fail_peer(*up, "10.0.0.3:80", 3, {1ms, 503, false});
  REQUIRE(wait_until([&] {
    json p = peer_status(up->status(), "10.0.0.3:80");
    return !p.is_null() && p["available"] == false;
  }));
  auto seen = picks(*up, 40);
  CHECK(seen.count("10.0.0.3:80") == 0);
  json p = peer_status(up->status(), "10.0.0.3:80");
  CHECK_MESSAGE(contains(p["reason"], "ejected"), p["reason"]);
}

TEST_CASE("upstream: health survives a set update that keeps the peer") {
  ManualClock clock;
  Fixture f({"10.0.0.1:80", "10.0.0.2:80"});
  auto up = start(f.config({{"passive", {{"max_fails", 1}, {"fail_timeout_ms", 60000}}}}), clock);
  fail_peer(*up, "10.0.0.1:80", 1, {0ms, 0, true});
  up->refresh();
  write_by_rename(f.path, peers_doc({"10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"}));
  REQUIRE(wait_until([&] { return up->status()["peers"].size() == 3; }));
  json p = peer_status(up->status(), "10.0.0.1:80");
  REQUIRE_FALSE(p.is_null());
  CHECK(p["available"] == false);
  auto seen = picks(*up, 30);
  CHECK(seen.count("10.0.0.1:80") == 0);
  CHECK(seen.size() == 2);
}

TEST_CASE("upstream: panic all routes to every peer; panic fail routes to none") {
  ManualClock clock;
  Fixture f({"10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"});
  json passive = {{"max_fails", 1}, {"fail_timeout_ms", 60000}};

  auto all = start(f.config({{"passive", passive}, {"panic", {{"threshold_percent", 50}, {"mode", "all"}}}}), clock);
  fail_peer(*all, "10.0.0.1:80", 1, {0ms, 0, true});
  fail_peer(*all, "10.0.0.2:80", 1, {0ms, 0, true});
  all->refresh();
  auto st = all->status();
  CHECK(st["panic"] == true);
  CHECK(contains(st["panic_reason"], "panic"));
  CHECK(picks(*all, 30).size() == 3);

  auto none = start(f.config({{"passive", passive}, {"panic", {{"threshold_percent", 50}, {"mode", "fail"}}}}), clock);
  fail_peer(*none, "10.0.0.1:80", 1, {0ms, 0, true});
  fail_peer(*none, "10.0.0.2:80", 1, {0ms, 0, true});
  none->refresh();
  auto s = none->pick();
  CHECK_FALSE(s);
  CHECK(s.pick.error == dynup::PickError::all_unavailable);
  CHECK(none->status()["panic"] == true);
}

TEST_CASE("upstream: slow start ramps a peer added after the first set") {
  ManualClock clock;
  Fixture f({"10.0.0.1:80"});
  json health = {{"slow_start", {{"window_ms", 10000}, {"min_weight_percent", 10}}}};
  json weighted = {{"peers", {{{"host", "10.0.0.1"}, {"port", 80}, {"weight", 100}}}}};
  write_by_rename(f.path, weighted.dump());
  auto up = start(f.config(health), clock);
  weighted["peers"].push_back({{"host", "10.0.0.2"}, {"port", 80}, {"weight", 100}});
  write_by_rename(f.path, weighted.dump());
  REQUIRE(wait_until([&] { return up->status()["peers"].size() == 2; }));
  up->refresh();
  CHECK(peer_status(up->status(), "10.0.0.1:80")["effective_weight"] == 100);
  CHECK(peer_status(up->status(), "10.0.0.2:80")["effective_weight"] == 10);
  clock.advance(5000ms);
  up->refresh();
  CHECK(peer_status(up->status(), "10.0.0.2:80")["effective_weight"] == 50);
  clock.advance(5000ms);
  up->refresh();
  CHECK(peer_status(up->status(), "10.0.0.2:80")["effective_weight"] == 100);
}

TEST_CASE("upstream: active HTTP checks take a failing peer out and say why") {
  httplib::Server good;
  good.Get("/health", [](const httplib::Request&, httplib::Response& r) { r.set_content("ok", "text/plain"); });
  int good_port = good.bind_to_any_port("127.0.0.1");
  std::thread serving([&] { good.listen_after_bind(); });
  httplib::Server bad;
  bad.Get("/health", [](const httplib::Request&, httplib::Response& r) { r.status = 503; });
  int bad_port = bad.bind_to_any_port("127.0.0.1");
  std::thread serving_bad([&] { bad.listen_after_bind(); });

  Fixture f({"127.0.0.1:" + std::to_string(good_port), "127.0.0.1:" + std::to_string(bad_port)});
  json health = {{"active",
                  {{"type", "http"}, {"path", "/health"}, {"interval_ms", 50}, {"timeout_ms", 1000},
                   {"unhealthy_threshold", 2}, {"healthy_threshold", 1}}}};
  {
    auto up = start(f.config(health));
    std::string bad_id = "127.0.0.1:" + std::to_string(bad_port);
    REQUIRE(wait_until([&] {
      json p = peer_status(up->status(), bad_id);
      return !p.is_null() && p["available"] == false;
    }));
    json p = peer_status(up->status(), bad_id);
    CHECK_MESSAGE(contains(p["reason"], "active"), p["reason"]);
    CHECK_MESSAGE(contains(p["reason"], "503"), p["reason"]);
    auto seen = picks(*up, 20);
    CHECK(seen.size() == 1);
    CHECK(seen.count("127.0.0.1:" + std::to_string(good_port)) == 1);
  }
  good.stop();
  bad.stop();
  serving.join();
  serving_bad.join();
}

TEST_CASE("upstream: two upstreams in one process share nothing") {
  ManualClock clock;
  Fixture a({"10.0.0.1:80", "10.0.0.2:80"});
  Fixture b({"10.0.0.1:80", "10.0.0.2:80"});
  json passive = {{"passive", {{"max_fails", 1}, {"fail_timeout_ms", 60000}}}};
  auto ua = start(a.config(passive), clock);
  auto ub = start(b.config(passive), clock);
  fail_peer(*ua, "10.0.0.1:80", 1, {0ms, 0, true});
  ua->refresh();
  ub->refresh();
  CHECK(picks(*ua, 10).size() == 1);
  CHECK(picks(*ub, 10).size() == 2); // same peer id, other upstream: untouched
}

TEST_CASE("upstream: pick and report from several threads keep in-flight counts exact") {
  Fixture f({"10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"});
  auto up = start(f.config(json::object(), "least_request"));
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&] {
      for (int i = 0; i < 5000; ++i) {
        auto s = up->pick();
        if (s) up->report(s, {1ms, 200, false});
      }
    });
  for (auto& t : threads) t.join();
  auto st = up->status(); // held: the range-for would outlive a temporary
  for (const auto& p : st["peers"]) CHECK(p["in_flight"] == 0);
}

TEST_CASE("upstream: selections held across publishes stay readable; reports from other threads free the tables") {
  // Request threads hold batches of selections while the set changes under them, then
  // hand half of them to another thread to report. Under ASan a table freed while
  // leased is a use-after-free on `peer`.
  Fixture f({"10.0.0.1:80", "10.0.0.2:80"});
  auto up = start(f.config(json::object(), "least_request"));
  std::atomic<bool> done{false};          // request threads stop
  std::atomic<bool> drained{false};       // and have handed everything over
  std::mutex handoff_mu;
  std::vector<dynup::UpstreamSelection> handoff;
  std::atomic<long> reported{0};
  std::thread reporter([&] {
    for (;;) {
      const bool last = drained; // read before the swap: then the swap takes everything
      std::vector<dynup::UpstreamSelection> batch;
      {
        std::lock_guard<std::mutex> lock(handoff_mu);
        batch.swap(handoff);
      }
      for (auto& s : batch) {
        CHECK(!s.peer->host.empty());
        up->report(s, {1ms, 200, false});
        ++reported;
      }
      if (batch.empty()) {
        if (last) break;
        std::this_thread::sleep_for(1ms);
      }
    }
  });
  std::vector<std::thread> threads;
  for (int t = 0; t < 3; ++t)
    threads.emplace_back([&] {
      // Each selection is held ~400 ms: across several publishes and sweeps, while this
      // thread's cache moves on to newer tables.
      std::vector<std::pair<std::chrono::steady_clock::time_point, dynup::UpstreamSelection>> held;
      auto settle = [&](bool all) {
        const auto now = std::chrono::steady_clock::now();
        std::vector<dynup::UpstreamSelection> mine, theirs;
        for (auto it = held.begin(); it != held.end();) {
          if (!all && now - it->first < 400ms) {
            ++it;
            continue;
          }
          CHECK(it->second.peer->port == 80);
          ((mine.size() + theirs.size()) % 2 == 0 ? mine : theirs).push_back(std::move(it->second));
          it = held.erase(it);
        }
        for (auto& s : mine) {
          up->report(s, {1ms, 200, false});
          ++reported;
        }
        std::lock_guard<std::mutex> lock(handoff_mu);
        for (auto& s : theirs) handoff.push_back(std::move(s));
      };
      while (!done) {
        for (int i = 0; i < 4; ++i) {
          auto s = up->pick();
          if (s) held.emplace_back(std::chrono::steady_clock::now(), std::move(s));
        }
        std::this_thread::sleep_for(5ms);
        settle(false);
      }
      settle(true);
    });
  for (int v = 0; v < 20; ++v) {
    std::this_thread::sleep_for(50ms); // 20 publishes over about a second
    write_by_rename(f.path, peers_doc({"10.0.0.1:80", "10.0.0." + std::to_string(3 + v) + ":80"}));
    const std::string id = "10.0.0." + std::to_string(3 + v) + ":80";
    CHECK(wait_until([&] {
      auto st = up->status();
      return !peer_status(st, id).is_null();
    }));
  }
  done = true;
  for (auto& t : threads) t.join();
  drained = true; // the reporter empties the hand-off once more, then stops
  reporter.join();
  CHECK(reported > 0);
  auto st = up->status();
  for (const auto& p : st["peers"]) CHECK(p["in_flight"] == 0);
  CHECK(st["tables_built"] > 20);
  // The request threads have exited (their caches with them): every replaced table goes.
  CHECK(picks(*up, 1).size() == 1);
  CHECK(wait_until([&] { return up->status()["retained_tables"] == 0; }));
}

TEST_CASE("upstream: stop() is prompt and picks keep working on the last table") {
  Fixture f({"10.0.0.1:80"});
  auto up = start(f.config());
  auto t0 = std::chrono::steady_clock::now();
  up->stop();
  up->stop();
  MESSAGE("stop() took " << std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - t0).count()
                         << " us");
  auto s = up->pick();
  REQUIRE(s);
  CHECK(s.peer->id == "10.0.0.1:80");
  up->report(s, {1ms, 200, false});
}

TEST_CASE("upstream status: a set never loaded is not ready and stale, and says why; a snapshot served is ready and stale") {
  Fixture f({"10.0.0.1:80"});
  json config = {{"name", "api"},
                 {"source", "consul://127.0.0.1:1/health/api"},
                 {"watch", {{"initial", "background"}}}};
  auto up = start(config);
  auto st = up->status();
  CHECK(st["ready"] == false);
  CHECK(st["stale"] == true);
  REQUIRE(st.contains("not_ready_reason"));
  CHECK_FALSE(st["not_ready_reason"].get<std::string>().empty());
  CHECK(st["watcher"].contains("backoff_ms"));
  CHECK_FALSE(st["watcher"].contains("current_backoff_ms"));

  const std::string snap = f.dir.file("api.snap");
  auto set = dynup::parse_peer_set(peers_doc({"10.0.0.9:80"}));
  REQUIRE(set);
  REQUIRE(dynup::save_snapshot(snap, *set));
  config["snapshot_path"] = snap;
  auto from_snapshot = start(config);
  auto st2 = from_snapshot->status();
  CHECK(st2["ready"] == true);
  CHECK(st2["stale"] == true);
  CHECK_FALSE(st2.contains("not_ready_reason"));
  CHECK(st2["peers"].size() == 1);
}

namespace {

// In a child whose descriptor limit leaves `free_fds` descriptors free: starts an
// upstream with tcp checks on one peer and waits for its status to say `expect`.
// Returns the child's exit status (0: said).
int probe_failure_with(int free_fds, const char* expect) {
  const pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    auto runtime = dynup::rt::Runtime::acquire(); // held first: its descriptors are open
    if (!runtime) ::_exit(5);
    const int lowest_free = ::dup(0);
    if (lowest_free >= 0) ::close(lowest_free);
    const auto limit = static_cast<rlim_t>(lowest_free + free_fds);
    const rlimit lim{limit, limit};
    if (lowest_free < 0 || ::setrlimit(RLIMIT_NOFILE, &lim) != 0) ::_exit(2);
    try {
      auto up = Upstream::start(json{{"name", "api"},
                                     {"source", "push://"},
                                     {"guards", {{"allow_empty", true}}},
                                     {"health", {{"active", {{"type", "tcp"}, {"interval_ms", 50}}}}}});
      if (!up.ok()) ::_exit(3);
      auto set = dynup::parse_peer_set(R"({"peers":[{"host":"127.0.0.1","port":1}]})");
      if (!set || !(*up)->push(*set)) ::_exit(6);
      for (int i = 0; i < 500; ++i) {
        if (contains((*up)->status().dump(), expect)) ::_exit(0);
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
      ::_exit(7);
    } catch (...) {
      ::_exit(4);
    }
  }
  int status = 0;
  REQUIRE(::waitpid(child, &status, 0) == child);
  REQUIRE(WIFEXITED(status));
  return WEXITSTATUS(status);
}

} // namespace

TEST_CASE("upstream: active checks with no descriptor left start, and each probe says why it failed") {
  // The checker needs no descriptor of its own (it runs on the runtime); a probe that
  // cannot open a socket names the cause in the peer's status.
  CHECK(probe_failure_with(0, "Too many open files") == 0);
}

TEST_CASE("upstream: a probe never takes one of the last descriptors the embedder needs to accept with") {
  // With 8 free, a probe's socket would be among the last DYNUP_FD_RESERVE: closed at once.
  CHECK(probe_failure_with(8, "descriptor reserve") == 0);
}

TEST_CASE("upstream: a process runtime that cannot start (no descriptor left) is start()'s error, not an exception") {
  const pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    const int lowest_free = ::dup(0);
    if (lowest_free >= 0) ::close(lowest_free);
    const rlimit none{static_cast<rlim_t>(lowest_free), static_cast<rlim_t>(lowest_free)};
    if (lowest_free < 0 || ::setrlimit(RLIMIT_NOFILE, &none) != 0) ::_exit(2);
    try {
      auto up = Upstream::start(json{{"name", "api"}, {"source", "push://"}});
      ::_exit(!up.ok() && up.error().code() == dynup::Errc::io_error && contains(up.error().message(), "runtime") ? 0 : 3);
    } catch (...) {
      ::_exit(4);
    }
  }
  int status = 0;
  REQUIRE(::waitpid(child, &status, 0) == child);
  REQUIRE(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
}
