// The Lua binding under load while its peer set churns: a real nginx 1.22 with
// lua-nginx-module and two workers sharing one upstream (one fetches, the other follows
// the shared region; tests/support/lua_nginx.hpp), wrk driving traffic
// through balancer_by_lua + resty.dynup for 15 s, and the peer file rewritten 200 times
// during that run (add, remove, reweight among 4 live backends; never empty). No client
// may see an error, and both workers must end on the last file's peers.
// nginx, the lua module, lua-resty-core and wrk are required: without them this fails.
#include <support/lua_nginx.hpp>
#include <support/process.hpp>
#include <support/wait.hpp>

#include <doctest/doctest.h>
#include <nlohmann/json.hpp>

#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace {

using dynup_test::LuaNginx;
using dynup_test::LuaReply;
using dynup_test::Process;
using nlohmann::json;
using namespace std::chrono_literals;
using steady = std::chrono::steady_clock;

/// wrk: $DYNUP_WRK, else the first of the usual paths that exists, else /usr/bin/wrk.
std::string wrk_binary() {
  if (const char* env = std::getenv("DYNUP_WRK"); env && *env) return env;
  for (const char* p : {"/usr/bin/wrk", "/usr/local/bin/wrk"})
    if (::access(p, X_OK) == 0) return p;
  return "/usr/bin/wrk";
}

/// What wrk's summary says (its plain-text output, without --latency).
struct WrkSummary {
  long long requests = -1;   ///< "N requests in 15.00s"; -1 when absent
  long long non_2xx_3xx = 0; ///< "Non-2xx or 3xx responses: N"; absent means 0
  long long socket_errors = 0; ///< connect + read + write + timeout of "Socket errors: …"; absent means 0
  double requests_per_s = 0; ///< "Requests/sec: X"
};

WrkSummary parse_wrk(const std::string& out) {
  WrkSummary s;
  std::istringstream lines(out);
  std::string line;
  while (std::getline(lines, line)) {
    std::istringstream words(line);
    std::string first;
    words >> first;
    if (line.find(" requests in ") != std::string::npos) {
      s.requests = std::stoll(first);
    } else if (first == "Socket") { // Socket errors: connect 0, read 0, write 0, timeout 0
      std::string word;
      while (words >> word) {
        if (!word.empty() && word.back() == ',') word.pop_back();
        if (!word.empty() && word.find_first_not_of("0123456789") == std::string::npos) s.socket_errors += std::stoll(word);
      }
    } else if (line.find("Non-2xx or 3xx responses:") != std::string::npos) {
      s.non_2xx_3xx = std::stoll(line.substr(line.rfind(':') + 1));
    } else if (first == "Requests/sec:") {
      words >> s.requests_per_s;
    }
  }
  return s;
}

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

using PeerSet = std::set<std::pair<std::string, std::uint32_t>>; // (id, weight)

PeerSet peers_of(const json& status) {
  PeerSet out;
  for (const json& p : status.at("peers")) out.emplace(p.at("id").get<std::string>(), p.at("weight").get<std::uint32_t>());
  return out;
}

// Change k of the churn: backends by the 4-bit mask 1 + 7k mod 15 (every non-empty subset
// in turn, never the same twice in a row), each weighted 1 + (k + i) mod 4. From one
// change to the next some backends come, some go and those that stay change weight.
std::vector<std::pair<std::size_t, std::uint32_t>> churn_set(std::size_t k) {
  std::vector<std::pair<std::size_t, std::uint32_t>> out;
  const std::size_t mask = 1 + (k * 7) % 15;
  for (std::size_t i = 0; i < 4; ++i)
    if (mask & (std::size_t{1} << i)) out.emplace_back(i, static_cast<std::uint32_t>(1 + (k + i) % 4));
  return out;
}

PeerSet expected(const std::vector<std::pair<std::size_t, std::uint32_t>>& set) {
  PeerSet out;
  for (const auto& [i, w] : set) out.emplace("b" + std::to_string(i), w);
  return out;
}

std::string describe(const PeerSet& s) {
  std::string out;
  for (const auto& [id, w] : s) out += (out.empty() ? "" : " ") + id + "=" + std::to_string(w);
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
  const std::string wrk = wrk_binary();
  REQUIRE_MESSAGE(::access(wrk.c_str(), X_OK) == 0,
                  "wrk is required for the load test but \"" << wrk
                                                             << "\" is not an executable (scripts/install-deps.sh "
                                                                "installs it; $DYNUP_WRK overrides the path)");

  constexpr std::size_t changes = 200;
  constexpr auto run_for = 15s;                // wrk's -d
  constexpr auto first_change_at = 1000ms;     // after wrk's start
  constexpr auto spacing = 60ms;               // 200 changes over 12 s, done 2 s before wrk stops
  // Shared: one worker fetches the file and writes the region, the other follows it.
  dynup_test::TempDir shm;
  LuaNginx ngx(4, 0, {0, 1, 2}, nlohmann::json{{"shared", {{"dir", shm.path()}, {"retry_ms", 100}}}});
  for (int i = 0; i < 10; ++i) REQUIRE_MESSAGE(ngx.get().status == 200, ngx.error_log());
  const pid_t master = ngx.master_pid();

  Process load({wrk, "-t2", "-c16", "-d15s", "--timeout", "5s",
                "http://127.0.0.1:" + std::to_string(ngx.proxy_port()) + "/"});
  const auto started = steady::now();
  std::size_t written = 0;
  bool wrk_ran_through_all = true;
  for (std::size_t k = 0; k < changes; ++k) {
    std::this_thread::sleep_until(started + first_change_at + k * spacing);
    if (steady::now() - started > run_for + 5s) break; // bounded even on a stalled machine
    ngx.write_peers(ngx.weighted_peers_doc(churn_set(k)));
    ++written;
  }
  const auto last_write = steady::now() - started;
  if (load.wait_exit(0ms)) wrk_ran_through_all = false; // wrk ended before the last change

  std::string out = load.read_all(Process::Stream::out, 30s);
  auto exit = load.wait_exit(10s);
  REQUIRE_MESSAGE(exit.has_value(), "wrk did not end within 30 s of its 15 s run");
  std::string err = load.read_all(Process::Stream::err, 1s);
  INFO("wrk output:\n" << out << err);
  REQUIRE(exit->exited);
  REQUIRE(exit->code == 0);
  const WrkSummary s = parse_wrk(out);

  CHECK(written == changes);
  CHECK_MESSAGE(wrk_ran_through_all,
                "the last change came " << std::chrono::duration_cast<std::chrono::milliseconds>(last_write).count()
                                        << " ms after wrk's start, after its run had ended");
  CHECK(s.requests >= 1000);
  CHECK(s.non_2xx_3xx == 0);
  CHECK(s.socket_errors == 0);
  CHECK(ngx.master_pid() == master);

  // Both workers end on the last file's peers (ids and weights), with nothing in flight.
  const PeerSet last = expected(churn_set(changes - 1));
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
                                             << " socket errors; " << written << " file changes, the last "
                                             << std::chrono::duration_cast<std::chrono::milliseconds>(last_write).count()
                                             << " ms after wrk's start; versions seen (1 = the initial file): "
                                             << versions.str());
  std::string log = ngx.error_log();
  CHECK_MESSAGE(log.find("[error]") == std::string::npos, "error log:\n" << log);
}
