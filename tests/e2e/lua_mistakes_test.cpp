// The Lua binding in a real nginx 1.22 with lua-nginx-module, against its callers'
// mistakes: a report() given $upstream_status text or junk, a string more_tries,
// balance() outside the balancer, an upstream whose new() failed. Each ends as a logged
// reason and a normal answer (the request served, or a 502), never as a 500, a hung
// client or a pick left live to wedge the requests that follow.
#include <support/lua_nginx.hpp>
#include <support/process.hpp>
#include <support/wait.hpp>
#include <support/wrk.hpp>

#include <doctest/doctest.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <string>

namespace {

using dynup_test::LuaBlocks;
using dynup_test::LuaNginx;
using dynup_test::LuaReply;
using nlohmann::json;
using namespace std::chrono_literals;

void require_lua_nginx() {
  std::string why = dynup_test::lua_nginx_missing_reason(dynup_test::nginx_binary());
  REQUIRE_MESSAGE(why.empty(), why);
}

// `n` sequential requests, each on a fresh connection (nginx reuses a finished
// request's memory, so most land at an address an earlier request had): all 200.
void all_served(LuaNginx& ngx, int n) {
  for (int i = 0; i < n; ++i) {
    LuaReply r = ngx.get();
    REQUIRE_MESSAGE(r.status == 200, "request " << i << ": " << describe(r) << "\nerror log:\n" << ngx.error_log());
  }
}

// No pick live in either worker: every in_flight is 0.
void nothing_in_flight(LuaNginx& ngx) {
  auto by_worker = ngx.status_by_worker();
  REQUIRE(by_worker.size() == ngx.workers());
  for (const auto& [worker, status] : by_worker) {
    INFO("worker " << worker << ": " << status.dump());
    for (const json& p : status.at("peers")) CHECK(p.at("in_flight") == 0);
  }
}

} // namespace

TEST_CASE("lua binding: report() given $upstream_status text reports it and wedges nothing") {
  require_lua_nginx();
  LuaBlocks blocks;
  blocks.log = R"(assert(dynup.get("api"):report(nil, ngx.var.upstream_status)))";
  LuaNginx ngx(2, 0, {0, 1}, json::object(), blocks);
  all_served(ngx, 20);
  nothing_in_flight(ngx);

  SUBCASE("and under wrk -c20") {
    std::string why = dynup_test::wrk_missing_reason();
    REQUIRE_MESSAGE(why.empty(), why);
    dynup_test::Process load({dynup_test::wrk_binary(), "-t2", "-c20", "-d2s", "--timeout", "5s",
                              "http://127.0.0.1:" + std::to_string(ngx.proxy_port()) + "/"});
    const std::string out = load.read_all(dynup_test::Process::Stream::out, 30s);
    const auto exit = load.wait_exit(10s);
    INFO("wrk output:\n" << out);
    REQUIRE(exit.has_value());
    REQUIRE(exit->code == 0);
    const dynup_test::WrkSummary s = dynup_test::parse_wrk(out);
    MESSAGE("wrk -t2 -c20 -d2s: " << s.requests << " requests, " << s.non_2xx_3xx << " not 2xx/3xx, "
                                  << s.socket_errors << " socket errors");
    CHECK(s.requests > 0);
    CHECK(s.non_2xx_3xx == 0);
    CHECK(s.socket_errors == 0);
    nothing_in_flight(ngx);
  }
  const std::string log = ngx.error_log();
  CHECK(log.find("still live") == std::string::npos);
  CHECK(log.find("[error]") == std::string::npos);
}

TEST_CASE("lua binding: report() given junk logs why, ends the pick, and the next requests are served") {
  require_lua_nginx();
  LuaBlocks blocks;
  blocks.log = R"(
    local ok, err = dynup.get("api"):report(nil, {})
    if ok or not err:find("status must be", 1, true) then ngx.log(ngx.ERR, "test: report gave ", tostring(ok)) end
  )";
  LuaNginx ngx(2, 0, {0, 1}, json::object(), blocks);
  all_served(ngx, 20);
  nothing_in_flight(ngx);
  const std::string log = ngx.error_log();
  CHECK(log.find("resty.dynup: report(): status must be an HTTP status 0..999") != std::string::npos);
  CHECK(log.find("test: report gave") == std::string::npos);
  CHECK(log.find("still live") == std::string::npos);
}

TEST_CASE("lua binding: balance() takes more_tries as a string, and retries a dead peer with it") {
  require_lua_nginx();
  LuaBlocks blocks;
  blocks.balancer = R"(dynup.get("api"):balance(nil, "2"))";
  LuaNginx ngx(2, 1, {0, 1}, json::object(), blocks);
  ngx.write_peers(ngx.peers_doc({0, 1}, {0}));
  REQUIRE(dynup_test::wait_until(
      [&] {
        for (const auto& [worker, status] : ngx.status_by_worker())
          if (status.at("peers").size() != 3) return false;
        return true;
      },
      5000ms));
  dynup_test::NginxTraffic t = ngx.send(60);
  for (const std::string& failure : t.failures) MESSAGE(failure);
  CHECK(t.failures.empty());
  CHECK(t.retried >= 1);
  CHECK(ngx.error_log().find("attempt to compare") == std::string::npos);
}

TEST_CASE("lua binding: balance() with a more_tries that is no number answers 502 and logs why") {
  require_lua_nginx();
  LuaBlocks blocks;
  blocks.balancer = R"(dynup.get("api"):balance(nil, "two"))";
  LuaNginx ngx(1, 0, {0}, json::object(), blocks);
  for (int i = 0; i < 4; ++i) {
    LuaReply r = ngx.get();
    CHECK_MESSAGE(r.status == 502, describe(r));
  }
  CHECK(ngx.error_log().find("more_tries must be a whole number 0..65535 or its string, got a string \"two\"") !=
        std::string::npos);
  nothing_in_flight(ngx);
}

TEST_CASE("lua binding: balance() outside balancer_by_lua returns why, logged, and the handler goes on") {
  require_lua_nginx();
  LuaBlocks blocks;
  blocks.status = R"(
    local ok, err = dynup.get("api"):balance()
    ngx.print(tostring(ok), "|", err)
  )";
  LuaNginx ngx(1, 0, {0}, json::object(), blocks);
  LuaReply r = ngx.get("/status");
  CHECK_MESSAGE(r.status == 200, describe(r));
  const std::string said = "resty.dynup: balance() must be called in balancer_by_lua*, not in the content phase";
  CHECK(r.body == "nil|" + said);
  CHECK(ngx.error_log().find(said) != std::string::npos);
  all_served(ngx, 4);
}

TEST_CASE("lua binding: dynup.balance and dynup.report by name serve, and answer 502 when new() failed") {
  require_lua_nginx();
  LuaBlocks blocks;
  blocks.balancer = R"(dynup.balance("api", ngx.var.http_x_key, 2))";
  blocks.log = R"(dynup.report("api"))";
  SUBCASE("the upstream runs") {
    LuaNginx ngx(2, 0, {0, 1}, json::object(), blocks);
    all_served(ngx, 20);
    nothing_in_flight(ngx);
    CHECK(ngx.error_log().find("[error]") == std::string::npos);
  }
  SUBCASE("its new() failed in init_worker_by_lua") {
    blocks.status = R"(local up, err = dynup.get("api") ngx.print(tostring(up), "|", err))";
    LuaNginx ngx(1, 0, {0}, json{{"watch", {{"wait_ms", 5}}}}, blocks);
    for (int i = 0; i < 4; ++i) {
      LuaReply r = ngx.get();
      CHECK_MESSAGE(r.status == 502, describe(r));
    }
    const std::string missing = "resty.dynup: no upstream named \"api\" in this worker";
    LuaReply s = ngx.get("/status");
    CHECK(s.status == 200);
    CHECK(s.body.rfind("nil|" + missing, 0) == 0);
    const std::string log = ngx.error_log();
    CHECK(log.find("upstream.watch.wait_ms: expected an integer 10..600000, got 5") != std::string::npos);
    CHECK(log.find(missing) != std::string::npos);
    CHECK(log.find("attempt to index") == std::string::npos);
  }
}
