// The Lua binding under load while its peer set churns: a real nginx 1.22 with
// lua-nginx-module and two workers sharing one upstream (one fetches, the other follows
// the shared region; tests/support/lua_nginx.hpp), wrk driving traffic
// through balancer_by_lua + resty.dynup for 15 s, and the peer file rewritten 200 times
// during that run (add, remove, reweight among 4 live backends; never empty). No client
// may see an error, and both workers must end on the last file's peers.
// nginx, the lua module, lua-resty-core and wrk are required: without them this fails.
#include <support/lua_nginx.hpp>
#include <support/wait.hpp>
#include <support/wrk.hpp>

#include <doctest/doctest.h>
#include <nlohmann/json.hpp>

#include <unistd.h>

#include <chrono>
#include <map>
#include <sstream>
#include <string>

namespace {

using dynup_test::churn_set;
using dynup_test::describe;
using dynup_test::LuaNginx;
using dynup_test::LuaReply;
using dynup_test::named_peers;
using dynup_test::parse_wrk;
using dynup_test::peers_of;
using dynup_test::PeerWeights;
using dynup_test::WrkSummary;
using nlohmann::json;
using namespace std::chrono_literals;

// Each worker's status JSON, asked on fresh connections until both have answered.
std::map<std::string, json> status_by_worker(LuaNginx& ngx) {
  std::map<std::string, json> out;
  for (int i = 0; i < 200 && out.size() < 2; ++i) {
    LuaReply r = ngx.get("/status");
    REQUIRE_MESSAGE(r.status == 200, "/status: " << r.status << " " << r.error << "\nerror log:\n" << ngx.error_log());
    out[r.worker_pid] = json::parse(r.body);
  }
  REQUIRE_MESSAGE(out.size() == 2, "only " << out.size() << " worker(s) answered /status");
  return out;
}

} // namespace

TEST_CASE("lua load test: wrk's summary is read (requests, non-2xx/3xx responses, socket errors)") {
  const WrkSummary clean = parse_wrk("Running 15s test @ http://127.0.0.1:1/\n"
                                     "  2 threads and 16 connections\n"
                                     "  91607 requests in 15.05s, 16.86MB read\n"
                                     "Requests/sec:   6086.36\n"
                                     "Transfer/sec:      1.12MB\n");
  CHECK(clean.requests == 91607);
  CHECK(clean.non_2xx_3xx == 0);
  CHECK(clean.socket_errors == 0);
  CHECK(clean.requests_per_s == doctest::Approx(6086.36));
  const WrkSummary failing = parse_wrk("  1200 requests in 2.00s, 200.00KB read\n"
                                       "  Socket errors: connect 3, read 4, write 0, timeout 5\n"
                                       "  Non-2xx or 3xx responses: 17\n"
                                       "Requests/sec:    600.00\n");
  CHECK(failing.requests == 1200);
  CHECK(failing.socket_errors == 12);
  CHECK(failing.non_2xx_3xx == 17);
  CHECK(parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n").requests == -1);
}

TEST_CASE("lua binding under wrk load: 200 peer file changes, no client errors, both workers end on the last set") {
  std::string why = dynup_test::lua_nginx_missing_reason(dynup_test::nginx_binary());
  REQUIRE_MESSAGE(why.empty(), why);
  why = dynup_test::wrk_missing_reason();
  REQUIRE_MESSAGE(why.empty(), why);

  constexpr std::size_t changes = 200;
  constexpr auto spacing = 60ms; // 200 changes over 12 s from 1 s after wrk's start, done 2 s before it stops
  // Shared: one worker fetches the file and writes the region, the other follows it.
  dynup_test::TempDir shm;
  LuaNginx ngx(4, 0, {0, 1, 2}, nlohmann::json{{"shared", {{"dir", shm.path()}, {"retry_ms", 100}}}});
  for (int i = 0; i < 10; ++i) REQUIRE_MESSAGE(ngx.get().status == 200, ngx.error_log());
  const pid_t master = ngx.master_pid();

  const dynup_test::ChurnRun run = dynup_test::run_wrk_under_churn(ngx, changes, spacing);
  INFO("wrk output:\n" << run.output);
  dynup_test::require_wrk_succeeded(run);
  const WrkSummary& s = run.summary;

  CHECK(run.written == changes);
  CHECK_MESSAGE(run.wrk_ran_through_all,
                "the last change came " << run.last_write.count() << " ms after wrk's start, after its run had ended");
  CHECK(s.requests >= 1000);
  CHECK(s.non_2xx_3xx == 0);
  CHECK(s.socket_errors == 0);
  CHECK(ngx.master_pid() == master);

  // Both workers end on the last file's peers (ids and weights), with nothing in flight.
  const PeerWeights last = named_peers(churn_set(changes - 1));
  std::map<std::string, json> final_status;
  bool settled = dynup_test::wait_until(
      [&] {
        final_status = status_by_worker(ngx);
        for (const auto& [worker, status] : final_status) {
          if (peers_of(status) != last) return false;
          for (const json& p : status.at("peers"))
            if (p.at("in_flight") != 0) return false;
        }
        return true;
      },
      5000ms);
  std::ostringstream versions;
  for (const auto& [worker, status] : final_status)
    versions << (versions.tellp() > 0 ? ", " : "") << "worker " << worker << " version " << status.at("version");
  for (const auto& [worker, status] : final_status) {
    INFO("worker " << worker << ": " << status.dump());
    CHECK_MESSAGE(peers_of(status) == last,
                  "worker " << worker << " serves " << describe(peers_of(status)) << ", the file has " << describe(last));
    CHECK(status.at("version").get<long long>() > 1);
    CHECK(status.at("version").get<long long>() <= static_cast<long long>(changes) + 1);
  }
  CHECK(settled);
  MESSAGE("wrk -t2 -c16 -d15s under churn: " << s.requests << " requests (" << s.requests_per_s << "/s), "
                                             << s.non_2xx_3xx << " non-2xx/3xx, " << s.socket_errors
                                             << " socket errors; " << run.written << " file changes, the last "
                                             << run.last_write.count() << " ms after wrk's start; versions seen "
                                             << "(1 = the initial file): "
                                             << versions.str());
  std::string log = ngx.error_log();
  CHECK_MESSAGE(log.find("[error]") == std::string::npos, "error log:\n" << log);
}
