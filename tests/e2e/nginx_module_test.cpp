// The native module (examples/nginx/ngx_http_upstream_dynup_module.c) in a real nginx
// 1.22 with two workers (tests/support/module_nginx.hpp): file and etcd sources, the
// leading worker killed, a registry down at start, upstream keepalive, retries on a
// dead peer, a reload, dynup_status, and 1000 peer file changes under wrk.
// nginx, the module (built from nginx-dev's source tree), etcd and wrk are required:
// without them these tests fail, saying what to install.
#include <support/etcd.hpp>
#include <support/module_nginx.hpp>
#include <support/process.hpp>
#include <support/text.hpp>
#include <support/wait.hpp>

#include <doctest/doctest.h>
#include <httplib.h>
#include <nlohmann/json.hpp>

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
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

using dynup_test::ModuleNginx;
using dynup_test::ModuleNginxOptions;
using dynup_test::NginxReply;
using dynup_test::WorkerNginx;
using nlohmann::json;
using namespace std::chrono_literals;
using steady = std::chrono::steady_clock;

// CI installs them, so their absence is a broken setup to report, never a skip.
void require_module_nginx() {
  std::string why = dynup_test::module_nginx_missing_reason();
  REQUIRE_MESSAGE(why.empty(), why);
}

std::string describe(const NginxReply& r) {
  if (r.status == 0) return "no response (" + r.error + ")";
  return std::to_string(r.status) + " \"" + r.body + "\" from worker " + r.worker_pid + ", upstream status \"" +
         r.upstream_status + "\"";
}

long long ms_since(steady::time_point t0) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(steady::now() - t0).count();
}

// What nginx logs when something is wrong with nginx or the module itself (a refused
// connection to a dead peer is an [error], expected where a test makes one).
bool log_is_clean(const std::string& log) {
  for (const char* level : {"[alert]", "[crit]", "[emerg]"})
    if (dynup_test::contains(log, level)) return false;
  return true;
}

using PeerSet = std::set<std::pair<std::string, std::uint32_t>>; // (id, weight)
using Weighted = std::vector<std::pair<std::size_t, std::uint32_t>>; // (backend, weight)

PeerSet peers_of(const json& upstream_status) {
  PeerSet out;
  for (const json& p : upstream_status.at("peers"))
    out.emplace(p.at("id").get<std::string>(), p.at("weight").get<std::uint32_t>());
  return out;
}

PeerSet expected(const Weighted& set) {
  PeerSet out;
  for (const auto& [i, w] : set) out.emplace("b" + std::to_string(i), w);
  return out;
}

std::string describe(const PeerSet& s) {
  std::string out;
  for (const auto& [id, w] : s) out += (out.empty() ? "" : " ") + id + "=" + std::to_string(w);
  return out;
}

// True once every worker's upstream status satisfies `pred`, within `limit`.
template <class Pred> bool all_workers(ModuleNginx& ngx, Pred pred, std::chrono::milliseconds limit = 5000ms) {
  return dynup_test::wait_until(
      [&] {
        auto statuses = ngx.upstream_status_by_worker();
        if (statuses.size() != ngx.workers()) return false;
        for (const auto& [pid, st] : statuses)
          if (!pred(st)) return false;
        return true;
      },
      limit);
}

bool all_workers_serve(ModuleNginx& ngx, const PeerSet& want, std::chrono::milliseconds limit = 5000ms) {
  return all_workers(ngx, [&](const json& st) { return peers_of(st) == want; }, limit);
}

const json* peer_by_id(const json& upstream_status, const std::string& id) {
  for (const json& p : upstream_status.at("peers"))
    if (p.at("id") == id) return &p;
  return nullptr;
}

// Requests until `streak` consecutive answers came from backend `want`, served by every
// worker; the time it took, or -1 ms after `limit`.
std::chrono::milliseconds until_all_go_to(ModuleNginx& ngx, const std::string& want,
                                          std::chrono::milliseconds limit = 5000ms, std::size_t streak = 40) {
  const auto t0 = steady::now();
  std::vector<std::string> run; // workers of the current streak
  while (steady::now() - t0 < limit) {
    NginxReply r = ngx.get();
    if (r.status != 200 || r.body != want) {
      run.clear();
      continue;
    }
    run.push_back(r.worker_pid);
    std::set<std::string> workers(run.begin(), run.end());
    if (run.size() >= streak && workers.size() == ngx.workers())
      return std::chrono::milliseconds(ms_since(t0));
  }
  return -1ms;
}

// `n` requests: the count of answers per body; every other outcome goes to `failures`.
std::map<std::string, int> spread(ModuleNginx& ngx, int n, std::vector<std::string>& failures,
                                  std::set<std::string>* workers = nullptr) {
  std::map<std::string, int> out;
  for (int i = 0; i < n; ++i) {
    NginxReply r = ngx.get();
    if (r.status != 200) {
      failures.push_back("request " + std::to_string(i) + ": " + describe(r));
      continue;
    }
    ++out[r.body];
    if (workers) workers->insert(r.worker_pid);
  }
  return out;
}

std::string join(const std::vector<std::string>& lines) {
  std::string out;
  for (const std::string& l : lines) out += l + "\n";
  return out;
}

std::string describe(const std::map<std::string, int>& counts) {
  std::string out;
  for (const auto& [body, n] : counts)
    out += (out.empty() ? "backend " : ", backend ") + body + ": " + std::to_string(n);
  return out.empty() ? "nothing" : out;
}

/// wrk: $DYNUP_WRK, else the first of the usual paths that exists, else /usr/bin/wrk.
std::string wrk_binary() {
  if (const char* env = std::getenv("DYNUP_WRK"); env && *env) return env;
  for (const char* p : {"/usr/bin/wrk", "/usr/local/bin/wrk"})
    if (::access(p, X_OK) == 0) return p;
  return "/usr/bin/wrk";
}

/// What wrk's plain-text summary says.
struct WrkSummary {
  long long requests = -1;     ///< "N requests in 15.00s"; -1 when absent
  long long non_2xx_3xx = 0;   ///< "Non-2xx or 3xx responses: N"; absent means 0
  long long socket_errors = 0; ///< the sum of "Socket errors: connect A, read B, write C, timeout D"
  double requests_per_s = 0;   ///< "Requests/sec: X"
};

WrkSummary parse_wrk(const std::string& out) {
  WrkSummary s;
  std::istringstream lines(out);
  std::string line;
  while (std::getline(lines, line)) {
    std::istringstream words(line);
    std::string first;
    words >> first;
    if (dynup_test::contains(line, " requests in ")) {
      s.requests = std::stoll(first);
    } else if (first == "Socket") {
      std::string word;
      while (words >> word) {
        if (!word.empty() && word.back() == ',') word.pop_back();
        if (!word.empty() && word.find_first_not_of("0123456789") == std::string::npos)
          s.socket_errors += std::stoll(word);
      }
    } else if (dynup_test::contains(line, "Non-2xx or 3xx responses:")) {
      s.non_2xx_3xx = std::stoll(line.substr(line.rfind(':') + 1));
    } else if (first == "Requests/sec:") {
      words >> s.requests_per_s;
    }
  }
  return s;
}

// Change k of the churn: backends by the 4-bit mask 1 + 7k mod 15 (every non-empty subset
// in turn, never the same twice in a row), each weighted 1 + (k + i) mod 4.
Weighted churn_set(std::size_t k) {
  Weighted out;
  const std::size_t mask = 1 + (k * 7) % 15;
  for (std::size_t i = 0; i < 4; ++i)
    if (mask & (std::size_t{1} << i)) out.emplace_back(i, static_cast<std::uint32_t>(1 + (k + i) % 4));
  return out;
}

} // namespace

TEST_CASE("nginx module: adding, removing and reweighting file peers moves both workers' traffic without a reload") {
  require_module_nginx();
  ModuleNginxOptions o;
  o.backends = 3;
  o.initial = {0, 1};
  o.params = {"policy=round_robin"};
  ModuleNginx ngx(o);
  const pid_t master = ngx.master_pid();
  const std::set<pid_t> workers = ngx.worker_pids();
  REQUIRE(workers.size() == 2);

  struct Step {
    std::string what;
    Weighted set;
  };
  const std::vector<Step> steps{{"add b2", {{0, 1}, {1, 1}, {2, 1}}},
                                {"remove b0", {{1, 1}, {2, 1}}},
                                {"reweight b1=1 b2=3", {{1, 1}, {2, 3}}}};
  for (const Step& step : steps) {
    CAPTURE(step.what);
    ngx.write_peers(ngx.weighted_peers_doc(step.set));
    const auto written = steady::now();
    REQUIRE_MESSAGE(all_workers_serve(ngx, expected(step.set)),
                    "the workers did not all serve " << describe(expected(step.set)) << " within 5 s");
    const long long took = ms_since(written);

    // Smooth weighted round robin per worker, the kernel spreading the connections over
    // the workers: each backend's share is within a few requests of its weight's.
    constexpr int n = 60;
    std::vector<std::string> failures;
    std::set<std::string> served_by;
    auto counts = spread(ngx, n, failures, &served_by);
    MESSAGE(step.what << ": both workers' status showed the new set " << took << " ms after the write; " << n
                      << " requests: " << describe(counts));
    CHECK(took < 1000);
    CHECK_MESSAGE(failures.empty(), join(failures));
    CHECK(served_by.size() == 2);
    for (const std::string& w : served_by) CHECK(workers.count(static_cast<pid_t>(std::stol(w))) == 1);
    std::uint32_t total = 0;
    for (const auto& [i, w] : step.set) total += w;
    for (std::size_t b = 0; b < 3; ++b) {
      std::uint32_t w = 0;
      for (const auto& [i, weight] : step.set)
        if (i == b) w = weight;
      const double want = static_cast<double>(n) * w / total;
      const int got = counts[std::to_string(b)];
      CHECK_MESSAGE(std::abs(got - want) <= 6.0,
                    "backend " << b << " (weight " << w << ") served " << got << ", expected about " << want);
    }
  }
  // No reload: the master and the workers are the ones that started.
  CHECK(ngx.master_pid() == master);
  CHECK(ngx.worker_pids() == workers);
  CHECK_MESSAGE(log_is_clean(ngx.error_log()), ngx.error_log());
}

TEST_CASE("nginx module: an etcd source moves the traffic, and only the leading worker watches etcd") {
  require_module_nginx();
  std::string missing = dynup_test::etcd_missing_reason(dynup_test::etcd_binary());
  REQUIRE_MESSAGE(missing.empty(), missing);
  dynup_test::Etcd etcd;
  const std::string prefix = "/dynup-e2e/module/api/";
  ModuleNginxOptions o;
  o.backends = 3;
  o.initial = {};
  o.source = [&](const WorkerNginx&) { return etcd.spec(prefix); };
  ModuleNginx ngx(o);

  etcd.put(prefix + "b0", "127.0.0.1:" + std::to_string(ngx.backend_port(0)));
  auto took = until_all_go_to(ngx, "0");
  REQUIRE_MESSAGE(took.count() >= 0, "traffic did not reach backend 0\nerror log:\n" << ngx.error_log());
  MESSAGE("etcd put of the first key reached both workers' picks in " << took.count() << " ms");

  auto statuses = ngx.upstream_status_by_worker();
  REQUIRE(statuses.size() == 2);
  int leaders = 0;
  for (const auto& [pid, st] : statuses) {
    INFO("worker " << pid << ": " << st.dump());
    if (st.at("shared").at("role") == "leader") {
      ++leaders;
      CHECK(st.at("source") == etcd.spec(prefix));
      CHECK(st.at("watcher").at("publish_count").get<long long>() >= 1);
      CHECK(st.at("shared").at("leader_pid") == std::stol(pid));
    } else {
      // A follower has no watcher: it reads the leader's set from the region.
      CHECK(st.at("shared").at("role") == "follower");
      CHECK(st.at("watcher").at("publish_count") == 0);
      CHECK(st.at("watcher").at("last_error") == "");
      CHECK(st.at("watcher").at("consecutive_failures") == 0);
    }
  }
  CHECK(leaders == 1);

  // etcd's own count of open watch streams: one, the leader's.
  httplib::Client cli("127.0.0.1", etcd.client_port());
  auto metrics = cli.Get("/metrics");
  REQUIRE(metrics);
  std::istringstream lines(metrics->body);
  std::string line;
  long long streams = -1;
  while (std::getline(lines, line))
    if (line.rfind("etcd_debugging_mvcc_watch_stream_total ", 0) == 0)
      streams = std::stoll(line.substr(line.find(' ') + 1));
  MESSAGE("etcd counts " << streams << " open watch stream(s) for two nginx workers");
  CHECK(streams == 1);

  etcd.put(prefix + "b1", "127.0.0.1:" + std::to_string(ngx.backend_port(1)));
  etcd.del(prefix + "b0");
  took = until_all_go_to(ngx, "1");
  REQUIRE(took.count() >= 0);
  MESSAGE("etcd put + delete reached both workers' picks in " << took.count() << " ms");
  CHECK(took < 1000ms);

  etcd.put(prefix + "b2", R"({"host":"127.0.0.1","port":)" + std::to_string(ngx.backend_port(2)) + R"(,"weight":3})");
  REQUIRE(all_workers_serve(ngx, PeerSet{{"b1", 1}, {"b2", 3}}));
  std::vector<std::string> failures;
  auto counts = spread(ngx, 60, failures);
  MESSAGE("after putting b2 with weight 3, 60 requests: " << describe(counts));
  CHECK(failures.empty());
  CHECK(counts["1"] + counts["2"] == 60);
  CHECK(std::abs(counts["2"] - 45) <= 6);
  CHECK_MESSAGE(log_is_clean(ngx.error_log()), ngx.error_log());
}

TEST_CASE("nginx module: kill -9 of the leading worker, nginx respawns it, another leads within 1 s and changes flow") {
  require_module_nginx();
  ModuleNginxOptions o;
  o.backends = 3;
  o.initial = {0};
  ModuleNginx ngx(o);
  auto statuses = ngx.upstream_status_by_worker();
  REQUIRE(statuses.size() == 2);
  const json leader_json = statuses.begin()->second.at("shared").at("leader_pid");
  REQUIRE(leader_json.is_number_integer());
  const pid_t leader = static_cast<pid_t>(leader_json.get<long>());
  const std::set<pid_t> before = ngx.worker_pids();
  REQUIRE(before.count(leader) == 1);

  REQUIRE(::kill(leader, SIGKILL) == 0);
  const auto killed = steady::now();
  // Any worker's status names the leader (all read the same lock's owner).
  long next = 0;
  while (steady::now() - killed < 5s) {
    NginxReply r = ngx.get("/status");
    auto doc = json::parse(r.body, nullptr, false);
    if (r.status == 200 && doc.is_object()) {
      const json& pid = doc.at("upstreams").at(0).at("shared").at("leader_pid");
      if (pid.is_number_integer() && pid.get<long>() != leader) {
        next = pid.get<long>();
        break;
      }
    }
    std::this_thread::sleep_for(5ms);
  }
  const long long took = ms_since(killed);
  REQUIRE_MESSAGE(next != 0, "no other worker led within 5 s of the kill");
  MESSAGE("after kill -9 of leading worker " << leader << ", worker " << next << " led within " << took << " ms");
  CHECK(took < 1000);

  REQUIRE(dynup_test::wait_until([&] { return ngx.worker_pids().size() == 2; }));
  const std::set<pid_t> after = ngx.worker_pids();
  CHECK(after.count(leader) == 0); // respawned: a new process in its place
  CHECK(after.count(static_cast<pid_t>(next)) == 1);
  statuses = ngx.upstream_status_by_worker();
  REQUIRE(statuses.size() == 2);
  int leaders = 0;
  for (const auto& [pid, st] : statuses) {
    CHECK(std::stol(pid) != leader);
    leaders += st.at("shared").at("role") == "leader" ? 1 : 0;
  }
  CHECK(leaders == 1);

  for (std::size_t to : {1u, 2u}) {
    ngx.write_peers(ngx.peers_doc({to}));
    CHECK_MESSAGE(all_workers_serve(ngx, PeerSet{{"b" + std::to_string(to), 1}}),
                  "the workers did not all serve b" << to);
    auto moved = until_all_go_to(ngx, std::to_string(to));
    CHECK_MESSAGE(moved.count() >= 0, "traffic did not move to backend " << to);
    MESSAGE("file change to b" << to << " after the kill: all traffic there in " << moved.count() << " ms");
  }
}

TEST_CASE("nginx module: a registry down at start serves the snapshot's peers, marked stale") {
  require_module_nginx();
  ModuleNginxOptions o;
  o.backends = 3;
  o.dead = 1;
  o.initial = {2}; // the peer file is not the source here: nothing may reach backend 2
  o.source = [](const WorkerNginx& n) {
    return "etcd://127.0.0.1:" + std::to_string(n.dead_port(0)) + "/dynup-e2e/module/api/";
  };
  o.snapshot = std::vector<std::size_t>{0, 1};
  ModuleNginx ngx(o);

  std::vector<std::string> failures;
  std::set<std::string> workers;
  auto counts = spread(ngx, 60, failures, &workers);
  MESSAGE("etcd unreachable, snapshot {b0, b1}: 60 requests: " << describe(counts));
  CHECK_MESSAGE(failures.empty(), join(failures) << "\nerror log:\n" << ngx.error_log());
  CHECK(counts["0"] > 0);
  CHECK(counts["1"] > 0);
  CHECK(counts["0"] + counts["1"] == 60);
  CHECK(workers.size() == 2);

  // The leader's watcher says so; a follower has no watcher, and its status says
  // "stale": false for the same set (the region does not carry staleness).
  auto statuses = ngx.upstream_status_by_worker();
  REQUIRE(statuses.size() == 2);
  int leaders = 0;
  for (const auto& [pid, st] : statuses) {
    INFO("worker " << pid << ": " << st.dump());
    CHECK(peers_of(st) == PeerSet{{"b0", 1}, {"b1", 1}});
    if (st.at("shared").at("role") == "leader") {
      ++leaders;
      CHECK(st.at("stale") == true);
      CHECK(st.at("watcher").at("last_error") != "");
      CHECK(st.at("watcher").at("consecutive_failures").get<long long>() >= 1);
    }
  }
  CHECK(leaders == 1);
  CHECK_MESSAGE(log_is_clean(ngx.error_log()), ngx.error_log());
}

TEST_CASE("nginx module: with keepalive, sequential requests reuse a few backend connections; without, none") {
  require_module_nginx();
  constexpr int n = 100;
  std::map<bool, std::size_t> distinct;
  for (bool keepalive : {true, false}) {
    CAPTURE(keepalive);
    ModuleNginxOptions o;
    o.backends = 2;
    o.initial = {0, 1};
    o.keepalive = keepalive;
    ModuleNginx ngx(o);
    std::set<std::string> connections; // "<backend> <its connection number>"
    std::set<char> backends;
    int failures = 0;
    for (int i = 0; i < n; ++i) {
      NginxReply r = ngx.get("/connection");
      if (r.status != 200 || r.body.size() < 3) {
        ++failures;
        MESSAGE("request " << i << ": " << describe(r));
        continue;
      }
      connections.insert(r.body);
      backends.insert(r.body[0]);
    }
    CHECK(failures == 0);
    CHECK(backends.size() == 2);
    distinct[keepalive] = connections.size();
    CHECK_MESSAGE(log_is_clean(ngx.error_log()), ngx.error_log());
  }
  MESSAGE(n << " sequential requests over 2 workers and 2 backends: " << distinct[true]
            << " backend connection(s) with keepalive 16, " << distinct[false] << " without");
  CHECK(distinct[true] <= 8); // one per worker and backend, with room for a few more
  CHECK(distinct[false] == n);
}

TEST_CASE("nginx module: a dead peer is retried on a live one, then passive health takes it out") {
  require_module_nginx();
  ModuleNginxOptions o;
  o.backends = 2;
  o.dead = 1;
  o.initial = {0, 1};
  // A long fail_timeout: the dead peer stays down for the rest of the test.
  o.params = {"health.passive.max_fails=1", "health.passive.fail_timeout_ms=60000"};
  ModuleNginx ngx(o);
  ngx.write_peers(ngx.peers_doc({0, 1}, {0}));
  REQUIRE(all_workers(ngx, [](const json& st) { return st.at("peers").size() == 3; }));

  int errors = 0, retried = 0;
  std::map<std::string, int> by_backend;
  for (int i = 0; i < 50; ++i) {
    NginxReply r = ngx.get();
    if (r.status != 200 || (r.body != "0" && r.body != "1")) {
      ++errors;
      MESSAGE("request " << i << ": " << describe(r));
      continue;
    }
    ++by_backend[r.body];
    if (r.upstream_status.rfind("502, ", 0) == 0) ++retried;
  }
  MESSAGE("dead peer: 50 requests, " << errors << " client error(s), " << retried
                                     << " retried after a refused connection, " << describe(by_backend));
  CHECK(errors == 0);
  CHECK(retried >= 1);
  CHECK(by_backend["0"] > 0);
  CHECK(by_backend["1"] > 0);

  // Each worker keeps its own passive health, as nginx's max_fails is per worker.
  REQUIRE(all_workers(ngx, [](const json& st) {
    const json* dead = peer_by_id(st, "dead0");
    return dead && dead->at("available") == false;
  }));
  for (const auto& [worker, st] : ngx.upstream_status_by_worker()) {
    INFO("worker " << worker << ": " << st.dump());
    const json* dead = peer_by_id(st, "dead0");
    REQUIRE(dead != nullptr);
    CHECK(dead->at("available") == false);
    CHECK(dynup_test::contains(dead->at("reason").get<std::string>(), "passive"));
    for (const json& p : st.at("peers")) CHECK(p.at("in_flight") == 0);
  }

  int later_retries = 0, later_errors = 0;
  for (int i = 0; i < 40; ++i) {
    NginxReply r = ngx.get();
    if (r.status != 200) ++later_errors;
    if (dynup_test::contains(r.upstream_status, ",")) ++later_retries;
  }
  MESSAGE("once it is down: 40 more requests, " << later_retries << " tried it");
  CHECK(later_errors == 0);
  CHECK(later_retries == 0);
}

TEST_CASE("nginx module: a reload keeps serving, and the new workers route to the current set at once") {
  require_module_nginx();
  ModuleNginxOptions o;
  o.backends = 3;
  o.initial = {0};
  ModuleNginx ngx(o);
  const pid_t master = ngx.master_pid();
  const std::set<pid_t> old_workers = ngx.worker_pids();
  REQUIRE(old_workers.size() == 2);

  // A change made before the reload: the new workers must not start from the config's
  // first state, nor from the initial file.
  ngx.write_peers(ngx.peers_doc({1}));
  REQUIRE(all_workers_serve(ngx, PeerSet{{"b1", 1}}));

  ngx.reload();
  const auto reloaded = steady::now();
  int during = 0, errors = 0, new_wrong = 0;
  std::string first_new; // the first answer of a new worker
  auto is_new = [&](const NginxReply& r) {
    return !r.worker_pid.empty() && old_workers.count(static_cast<pid_t>(std::stol(r.worker_pid))) == 0;
  };
  // Until both new workers are up and the old ones no longer serve.
  while (steady::now() - reloaded < 10s) {
    NginxReply r = ngx.get();
    ++during;
    if (r.status != 200) {
      ++errors;
      MESSAGE("during the reload: " << describe(r));
      continue;
    }
    if (is_new(r)) {
      if (first_new.empty()) first_new = r.body;
      if (r.body != "1") ++new_wrong;
    }
    const std::set<pid_t> now = ngx.worker_pids();
    bool all_new = now.size() == 2;
    for (pid_t p : now) all_new = all_new && old_workers.count(p) == 0;
    if (all_new && !first_new.empty()) break;
  }
  const long long took = ms_since(reloaded);
  REQUIRE_MESSAGE(!first_new.empty(), "no new worker answered within 10 s of the reload");
  std::vector<std::string> failures;
  std::set<std::string> after_workers;
  auto after = spread(ngx, 60, failures, &after_workers);
  MESSAGE("reload: new workers served after " << took << " ms; " << during << " requests during it (" << errors
                                              << " error(s)), the first new worker's answer: backend " << first_new
                                              << "; 60 after: " << describe(after));
  CHECK(errors == 0);
  CHECK(first_new == "1");
  CHECK(new_wrong == 0);
  CHECK_MESSAGE(failures.empty(), join(failures));
  CHECK(after["1"] == 60);
  for (const std::string& w : after_workers) CHECK(old_workers.count(static_cast<pid_t>(std::stol(w))) == 0);
  CHECK(ngx.master_pid() == master);

  // Once the old workers are gone one new worker leads, and changes reach both.
  CHECK(all_workers(ngx, [&](const json& st) {
    const json& pid = st.at("shared").at("leader_pid");
    return pid.is_number_integer() && ngx.worker_pids().count(static_cast<pid_t>(pid.get<long>())) == 1;
  }));
  ngx.write_peers(ngx.peers_doc({2}));
  auto moved = until_all_go_to(ngx, "2");
  MESSAGE("a change after the reload reached both new workers' picks in " << moved.count() << " ms");
  CHECK(moved.count() >= 0);
  CHECK(moved < 1000ms);
  CHECK_MESSAGE(log_is_clean(ngx.error_log()), ngx.error_log());
}

TEST_CASE("nginx module: dynup_status answers each worker's JSON: pid, upstream, version, peers, leader") {
  require_module_nginx();
  ModuleNginxOptions o;
  o.backends = 2;
  o.initial = {0, 1};
  ModuleNginx ngx(o);
  const std::set<pid_t> workers = ngx.worker_pids();
  auto docs = ngx.status_by_worker();
  REQUIRE(docs.size() == 2);
  std::set<long> leader_pids;
  int leaders = 0;
  for (const auto& [worker, doc] : docs) {
    INFO("worker " << worker << ": " << doc.dump());
    CHECK(doc.at("pid") == std::stol(worker));
    REQUIRE(doc.at("upstreams").is_array());
    REQUIRE(doc.at("upstreams").size() == 1);
    const json& up = doc.at("upstreams").at(0);
    CHECK(up.at("name") == "api");
    CHECK(up.at("source") == "file://" + ngx.peer_file());
    CHECK(up.at("policy") == "round_robin");
    REQUIRE(up.at("version").is_number_unsigned());
    CHECK(up.at("version").get<long long>() >= 1);
    CHECK(peers_of(up) == PeerSet{{"b0", 1}, {"b1", 1}});
    for (const json& p : up.at("peers")) {
      CHECK(p.at("state") == "healthy");
      CHECK(p.at("reason") == "healthy");
      CHECK(p.at("available") == true);
    }
    const json& shared = up.at("shared");
    REQUIRE(shared.at("leader_pid").is_number_integer());
    leader_pids.insert(shared.at("leader_pid").get<long>());
    leaders += shared.at("role") == "leader" ? 1 : 0;
    CHECK(dynup_test::contains(shared.at("region").get<std::string>(), ngx.shared_dir() + "/"));
  }
  CHECK(leaders == 1);
  REQUIRE(leader_pids.size() == 1); // both name the same leader, one of them
  CHECK(workers.count(static_cast<pid_t>(*leader_pids.begin())) == 1);

  httplib::Client cli("127.0.0.1", ngx.proxy_port());
  auto got = cli.Get("/status");
  REQUIRE(got);
  CHECK(got->get_header_value("Content-Type") == "application/json");
  auto posted = cli.Post("/status", "x", "text/plain");
  REQUIRE(posted);
  CHECK(posted->status == 405);
}

TEST_CASE("nginx module under wrk: 1000 peer file changes, no client errors, both workers end on the last set") {
  require_module_nginx();
  const std::string wrk = wrk_binary();
  REQUIRE_MESSAGE(::access(wrk.c_str(), X_OK) == 0,
                  "wrk is required for the load test but \"" << wrk
                                                             << "\" is not an executable (scripts/install-deps.sh "
                                                                "installs it; $DYNUP_WRK overrides the path)");
  constexpr std::size_t changes = 1000;
  constexpr auto run_for = 15s;            // wrk's -d
  constexpr auto first_change_at = 1000ms; // after wrk's start
  constexpr auto spacing = 12ms;           // 1000 changes over 12 s, done 2 s before wrk stops
  ModuleNginxOptions o;
  o.backends = 4;
  o.initial = {0, 1, 2};
  ModuleNginx ngx(o);
  for (int i = 0; i < 10; ++i) REQUIRE_MESSAGE(ngx.get().status == 200, ngx.error_log());
  const pid_t master = ngx.master_pid();
  const std::set<pid_t> workers = ngx.worker_pids();

  dynup_test::Process load({wrk, "-t2", "-c16", "-d15s", "--timeout", "5s",
                            "http://127.0.0.1:" + std::to_string(ngx.proxy_port()) + "/"});
  const auto started = steady::now();
  std::size_t written = 0;
  for (std::size_t k = 0; k < changes; ++k) {
    std::this_thread::sleep_until(started + first_change_at + k * spacing);
    if (steady::now() - started > run_for + 5s) break; // bounded even on a stalled machine
    ngx.write_peers(ngx.weighted_peers_doc(churn_set(k)));
    ++written;
  }
  const auto last_write = std::chrono::duration_cast<std::chrono::milliseconds>(steady::now() - started);
  const bool wrk_ran_through_all = !load.wait_exit(0ms).has_value();

  std::string out = load.read_all(dynup_test::Process::Stream::out, 30s);
  auto exit = load.wait_exit(10s);
  REQUIRE_MESSAGE(exit.has_value(), "wrk did not end within 30 s of its 15 s run");
  std::string err = load.read_all(dynup_test::Process::Stream::err, 1s);
  INFO("wrk output:\n" << out << err);
  REQUIRE(exit->exited);
  REQUIRE(exit->code == 0);
  const WrkSummary s = parse_wrk(out);

  const PeerSet last = expected(churn_set(changes - 1));
  bool settled = all_workers(ngx, [&](const json& st) {
    if (peers_of(st) != last) return false;
    for (const json& p : st.at("peers"))
      if (p.at("in_flight") != 0) return false;
    return true;
  });
  std::ostringstream versions;
  for (const auto& [worker, st] : ngx.upstream_status_by_worker()) {
    versions << (versions.tellp() > 0 ? ", " : "") << "worker " << worker << " version " << st.at("version");
    CHECK_MESSAGE(peers_of(st) == last,
                  "worker " << worker << " serves " << describe(peers_of(st)) << ", the file has " << describe(last));
  }
  MESSAGE("wrk -t2 -c16 -d15s under churn: " << s.requests << " requests (" << s.requests_per_s << "/s), "
                                             << s.non_2xx_3xx << " non-2xx/3xx, " << s.socket_errors
                                             << " socket errors; " << written << " file changes, the last "
                                             << last_write.count() << " ms after wrk's start; versions reached "
                                             << "(1 = the initial file): " << versions.str());
  CHECK(written == changes);
  CHECK_MESSAGE(wrk_ran_through_all, "wrk ended before the last change");
  CHECK(s.requests >= 1000);
  CHECK(s.non_2xx_3xx == 0);
  CHECK(s.socket_errors == 0);
  CHECK(settled);
  CHECK(ngx.master_pid() == master);
  CHECK(ngx.worker_pids() == workers);
  std::string log = ngx.error_log();
  CHECK_MESSAGE(log.find("[error]") == std::string::npos, "error log:\n" << log);
}
