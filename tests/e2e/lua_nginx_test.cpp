// The Lua binding (examples/lua/lib/resty/dynup.lua over libdynup_c) in a real nginx
// 1.22 with lua-nginx-module and two workers: traffic follows the peer file, a change
// to the file moves it without a reload, and a dead peer is retried on a live one.
// nginx, the lua module and lua-resty-core are required: without them these tests fail.
#include <support/lua_nginx.hpp>
#include <support/wait.hpp>

#include <doctest/doctest.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <map>
#include <set>
#include <string>
#include <vector>

namespace {

using dynup_test::LuaNginx;
using dynup_test::LuaReply;
using dynup_test::peer_by_id;
using nlohmann::json;
using namespace std::chrono_literals;
using steady = std::chrono::steady_clock;

// CI installs them, so their absence is a broken setup to report, never a skip.
void require_lua_nginx() {
  std::string why = dynup_test::lua_nginx_missing_reason(dynup_test::nginx_binary());
  REQUIRE_MESSAGE(why.empty(), why);
}

// Each worker's status JSON, asked on fresh connections until both have answered.
std::map<std::string, json> status_by_worker(LuaNginx& ngx) {
  std::map<std::string, json> out;
  for (int i = 0; i < 200 && out.size() < 2; ++i) {
    LuaReply r = ngx.get("/status");
    REQUIRE_MESSAGE(r.status == 200, describe(r));
    out[r.worker_pid] = json::parse(r.body);
  }
  REQUIRE_MESSAGE(out.size() == 2, "only " << out.size() << " worker(s) answered /status");
  return out;
}

} // namespace

TEST_CASE("lua binding: traffic reaches exactly the peers in the file, from both workers") {
  require_lua_nginx();
  LuaNginx ngx(3, 0, {0, 1});
  std::map<std::string, int> by_backend;
  std::set<std::string> workers;
  for (int i = 0; i < 60; ++i) {
    LuaReply r = ngx.get();
    REQUIRE_MESSAGE(r.status == 200, describe(r) << "\nerror log:\n" << ngx.error_log());
    ++by_backend[r.body];
    workers.insert(r.worker_pid);
  }
  MESSAGE("60 requests: backend 0 served " << by_backend["0"] << ", backend 1 " << by_backend["1"] << ", workers "
                                           << workers.size());
  CHECK(by_backend.size() == 2);
  CHECK(by_backend["0"] > 0);
  CHECK(by_backend["1"] > 0);
  CHECK(by_backend.count("2") == 0);
  CHECK(workers.size() == 2);

  // Each worker has its own handle, each reading the same file.
  for (const auto& [worker, status] : status_by_worker(ngx)) {
    INFO("worker " << worker << ": " << status.dump());
    CHECK(status.at("name") == "api");
    CHECK(status.at("peers").size() == 2);
    for (const json& p : status.at("peers")) CHECK(p.at("in_flight") == 0);
  }
  CHECK(ngx.error_log().find("[error]") == std::string::npos);
}

TEST_CASE("lua binding: a file change moves the traffic of both workers within 1 s, without a reload") {
  require_lua_nginx();
  LuaNginx ngx(3, 0, {0, 1});
  for (int i = 0; i < 20; ++i) REQUIRE_MESSAGE(ngx.get().status == 200, ngx.error_log());
  const pid_t master = ngx.master_pid();

  // From the write on, every response is recorded; the traffic has moved once the last
  // responses all come from the new peer, on both workers.
  ngx.write_peers(ngx.peers_doc({2}));
  const auto written = steady::now();
  constexpr std::size_t settled_run = 40; // consecutive responses from backend 2
  std::vector<LuaReply> replies;
  std::vector<steady::duration> sent_at;
  std::size_t run_start = 0; // index of the first reply of the current all-"2" run
  bool settled = false;
  int errors = 0;
  while (replies.size() < 5000 && steady::now() - written < 5s) {
    sent_at.push_back(steady::now() - written);
    replies.push_back(ngx.get());
    const LuaReply& r = replies.back();
    if (r.status != 200) ++errors;
    if (r.body != "2") run_start = replies.size();
    if (replies.size() - run_start >= settled_run) {
      std::set<std::string> run_workers;
      for (std::size_t i = run_start; i < replies.size(); ++i) run_workers.insert(replies[i].worker_pid);
      if (run_workers.size() == 2) {
        settled = true;
        break;
      }
    }
  }
  REQUIRE_MESSAGE(settled, "traffic did not settle on the new peer within 5 s (" << replies.size()
                                                                                 << " requests)\nerror log:\n"
                                                                                 << ngx.error_log());
  auto moved = std::chrono::duration_cast<std::chrono::microseconds>(sent_at[run_start]);
  std::size_t old_after_write = run_start;
  MESSAGE("file change: every request goes to the new peer from " << moved.count() / 1000.0
                                                                    << " ms after the write (" << old_after_write
                                                                    << " request(s) still went to the old peers, "
                                                                    << replies.size() << " sent, " << errors
                                                                    << " error(s))");
  CHECK(moved < 1s);
  CHECK(errors == 0);
  CHECK(ngx.master_pid() == master);
  // No reload: the workers serving now are the ones that served before the change.
  std::set<std::string> before, after;
  for (std::size_t i = run_start; i < replies.size(); ++i) after.insert(replies[i].worker_pid);
  for (const auto& [worker, status] : status_by_worker(ngx)) {
    before.insert(worker);
    CHECK(status.at("peers").size() == 1);
    CHECK(status.at("version") == 2);
  }
  CHECK(after == before);
}

// With balance() (the README's way) and with the same steps written out in the block.
static void dead_peer_is_retried(dynup_test::LuaBalancer style) {
  LuaNginx ngx(2, 1, {0, 1}, json::object(), style);
  ngx.write_peers(ngx.peers_doc({0, 1}, {0})); // add a port nothing listens on
  // Both workers see the new file before the traffic starts.
  REQUIRE(dynup_test::wait_until(
      [&] {
        for (const auto& [worker, status] : status_by_worker(ngx))
          if (status.at("peers").size() != 3) return false;
        return true;
      },
      5000ms));

  dynup_test::NginxTraffic t = ngx.send(90);
  for (const std::string& failure : t.failures) MESSAGE(failure);
  MESSAGE("dead peer: 90 requests, " << t.failures.size() << " client error(s), " << t.retried
                                     << " retried after a refused connection, backend 0 served " << t.by_backend["0"]
                                     << ", backend 1 " << t.by_backend["1"]);
  CHECK(t.failures.empty());
  CHECK(t.retried >= 1);
  CHECK(t.by_backend["0"] > 0);
  CHECK(t.by_backend["1"] > 0);

  // Every pick ended (retried tries in balancer_by_lua, final ones in log_by_lua), and
  // the refused connections reached passive health (max_fails 1 by default).
  for (const auto& [worker, status] : status_by_worker(ngx)) {
    INFO("worker " << worker << ": " << status.dump());
    for (const json& p : status.at("peers")) CHECK(p.at("in_flight") == 0);
    const json* dead = peer_by_id(status, "dead0");
    REQUIRE(dead != nullptr);
    CHECK(dead->at("available") == false);
    CHECK(dead->at("reason").get<std::string>().find("passive") != std::string::npos);
  }
}

TEST_CASE("lua binding: a dead peer is retried on a live one, with no client errors") {
  require_lua_nginx();
  SUBCASE("balance()") { dead_peer_is_retried(dynup_test::LuaBalancer::balance); }
  SUBCASE("pick() and set_current_peer in the block") {
    dead_peer_is_retried(dynup_test::LuaBalancer::explicit_steps);
  }
}

TEST_CASE("lua binding: no peer left answers 502, and every pick ends") {
  require_lua_nginx();
  LuaNginx ngx(1, 1, {0});
  ngx.write_peers(ngx.peers_doc({}, {0})); // only a port nothing listens on
  REQUIRE(dynup_test::wait_until(
      [&] {
        for (const auto& [worker, status] : status_by_worker(ngx))
          if (status.at("peers").size() != 1 || peer_by_id(status, "dead0") == nullptr) return false;
        return true;
      },
      5000ms));
  // The first try is refused and the retry finds every peer tried (later requests: the
  // peer taken out): balance() ends the balancer with NO_LIVE_UPSTREAMS, which nginx
  // answers as its own "no live upstreams".
  for (int i = 0; i < 6; ++i) {
    const dynup_test::NginxReply r = ngx.get();
    INFO(describe(r));
    CHECK(r.status == 502);
  }
  // balance() logged why: "all available peers already tried" on a retry, or "all peers
  // unavailable" once passive health has taken the peer out.
  CHECK(ngx.error_log().find("upstream api: all ") != std::string::npos);
  for (const auto& [worker, status] : status_by_worker(ngx)) {
    INFO("worker " << worker << ": " << status.dump());
    for (const json& p : status.at("peers")) CHECK(p.at("in_flight") == 0);
  }
}
