// The Lua binding in nginx with two workers sharing one upstream ("shared" config): one
// worker leads (fetches, writes the region), the other reads the region; kill -9 of the
// leading worker hands the lead to another, and updates keep flowing. File and etcd
// sources.
#include <support/etcd.hpp>
#include <support/lua_nginx.hpp>
#include <support/temp_dir.hpp>

#include <doctest/doctest.h>
#include <nlohmann/json.hpp>

#include <signal.h>

#include <chrono>
#include <map>
#include <set>
#include <string>
#include <thread>
#include <vector>

using dynup_test::LuaNginx;
using dynup_test::TempDir;
using nlohmann::json;
using namespace std::chrono_literals;

namespace {

// The status of every worker, by pid (fresh connections spread over the workers).
std::map<std::string, json> worker_statuses(LuaNginx& n, std::size_t workers = 2) {
  std::map<std::string, json> out;
  for (int i = 0; i < 200 && out.size() < workers; ++i) {
    auto r = n.get("/status");
    if (r.status != 200) continue;
    auto doc = json::parse(r.body, nullptr, false);
    if (doc.is_object()) out[r.worker_pid] = doc;
  }
  return out;
}

std::string leader_of(LuaNginx& n) {
  std::set<std::string> leaders;
  for (const auto& [pid, st] : worker_statuses(n))
    if (st.contains("shared") && st["shared"]["role"] == "leader") leaders.insert(pid);
  return leaders.size() == 1 ? *leaders.begin() : std::string();
}

// Requests until `want` backend index answers every one of `n` consecutive requests, up
// to `limit`; returns the time it took, or a negative duration.
std::chrono::milliseconds until_all_go_to(LuaNginx& n, const std::string& want, std::chrono::milliseconds limit,
                                          int streak = 40) {
  auto t0 = std::chrono::steady_clock::now();
  int in_a_row = 0;
  while (std::chrono::steady_clock::now() - t0 < limit) {
    auto r = n.get();
    in_a_row = r.status == 200 && r.body == want ? in_a_row + 1 : 0;
    if (in_a_row >= streak)
      return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0);
  }
  return std::chrono::milliseconds(-1);
}

} // namespace

TEST_CASE("lua binding, shared: one worker leads, the other follows the region, and both route the same") {
  TempDir shm;
  LuaNginx n(3, 0, {0}, json{{"shared", {{"dir", shm.path()}, {"retry_ms", 100}}}});
  auto statuses = worker_statuses(n);
  REQUIRE(statuses.size() == 2);
  std::map<std::string, int> roles;
  std::set<long> leader_pids;
  for (const auto& [pid, st] : statuses) {
    ++roles[st["shared"]["role"].get<std::string>()];
    leader_pids.insert(st["shared"]["leader_pid"].get<long>());
    CHECK(st["peers"].size() == 1);
  }
  CHECK(roles["leader"] == 1);
  CHECK(roles["follower"] == 1);
  CHECK(leader_pids.size() == 1); // both name the same leader
  CHECK(statuses.count(std::to_string(*leader_pids.begin())) == 1);

  n.write_peers(n.peers_doc({2}));
  auto took = until_all_go_to(n, "2", 5s);
  REQUIRE(took.count() >= 0);
  MESSAGE("both workers route to the new peer " << took.count() << " ms after the file changed");
  CHECK(took < 1000ms);
}

TEST_CASE("lua binding, shared: kill -9 of the leading worker, another leads and updates keep flowing") {
  TempDir shm;
  LuaNginx n(3, 0, {0}, json{{"shared", {{"dir", shm.path()}, {"retry_ms", 100}}}});
  std::string leader = leader_of(n);
  REQUIRE_FALSE(leader.empty());
  auto t0 = std::chrono::steady_clock::now();
  REQUIRE(::kill(static_cast<pid_t>(std::stol(leader)), SIGKILL) == 0);
  // nginx's master starts a new worker; one of the two leads, and never two.
  std::string next;
  while (std::chrono::steady_clock::now() - t0 < 10s) {
    next = leader_of(n);
    if (!next.empty() && next != leader) break;
    std::this_thread::sleep_for(20ms);
  }
  REQUIRE_FALSE(next.empty());
  REQUIRE(next != leader);
  MESSAGE("after kill -9 of worker " << leader << ", worker " << next << " led within "
                                     << std::chrono::duration_cast<std::chrono::milliseconds>(
                                            std::chrono::steady_clock::now() - t0)
                                            .count()
                                     << " ms");
  auto statuses = worker_statuses(n);
  REQUIRE(statuses.size() == 2);
  CHECK(statuses.count(leader) == 0); // the killed one is gone
  int leaders = 0;
  for (const auto& [pid, st] : statuses) leaders += st["shared"]["role"] == "leader" ? 1 : 0;
  CHECK(leaders == 1);

  for (std::size_t to : {1u, 2u}) {
    n.write_peers(n.peers_doc({to}));
    auto took = until_all_go_to(n, std::to_string(to), 5s);
    CHECK_MESSAGE(took.count() >= 0, "traffic did not move to backend " << to);
    CHECK(took < 1000ms);
  }
}

TEST_CASE("lua binding, shared: an etcd source, fetched by the leader only") {
  std::string missing = dynup_test::etcd_missing_reason(dynup_test::etcd_binary());
  REQUIRE_MESSAGE(missing.empty(), missing);
  dynup_test::Etcd etcd;
  TempDir shm;
  const std::string prefix = "/dynup-e2e/lua/api/";
  LuaNginx n(3, 0, {}, json{{"source", etcd.spec(prefix)}, {"shared", {{"dir", shm.path()}, {"retry_ms", 100}}}});
  etcd.put(prefix + "b0", "127.0.0.1:" + std::to_string(n.backend_port(0)));
  auto took = until_all_go_to(n, "0", 5s);
  REQUIRE(took.count() >= 0);
  auto statuses = worker_statuses(n);
  REQUIRE(statuses.size() == 2);
  for (const auto& [pid, st] : statuses) {
    if (st["shared"]["role"] == "leader")
      CHECK(st["source"] == etcd.spec(prefix)); // the leader watches etcd
    else
      CHECK(st["watcher"]["publish_count"] == 0); // the follower fetches nothing
  }
  etcd.put(prefix + "b1", "127.0.0.1:" + std::to_string(n.backend_port(1)));
  etcd.del(prefix + "b0");
  took = until_all_go_to(n, "1", 5s);
  REQUIRE(took.count() >= 0);
  MESSAGE("etcd put + delete reached both workers' picks in " << took.count() << " ms");
  CHECK(took < 1000ms);
}
