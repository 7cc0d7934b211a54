// The native module (examples/nginx/ngx_http_upstream_dynup_module.c) in a real nginx
// 1.22 with two workers (tests/support/module_nginx.hpp): file and etcd sources, the
// leading worker killed, a registry down at start, upstream keepalive, retries on a
// dead peer, a reload, dynup_status, and 1000 peer file changes under wrk.
// nginx, the module (built from nginx-dev's source tree), etcd and wrk are required:
// without them these tests fail, saying what to install.
#include <support/etcd.hpp>
#include <support/module_nginx.hpp>
#include <support/text.hpp>
#include <support/wait.hpp>
#include <support/wrk.hpp>

#include <doctest/doctest.h>
#include <httplib.h>
#include <nlohmann/json.hpp>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace {

using dynup_test::churn_set;
using dynup_test::describe;
using dynup_test::ModuleNginx;
using dynup_test::ModuleNginxOptions;
using dynup_test::named_peers;
using dynup_test::NginxReply;
using dynup_test::NginxTraffic;
using dynup_test::peer_by_id;
using dynup_test::peers_of;
using dynup_test::PeerWeights;
using dynup_test::WeightedBackends;
using dynup_test::WorkerNginx;
using dynup_test::WrkSummary;
using nlohmann::json;
using namespace std::chrono_literals;
using steady = std::chrono::steady_clock;

// CI installs them, so their absence is a broken setup to report, never a skip.
void require_module_nginx() {
  std::string why = dynup_test::module_nginx_missing_reason();
  REQUIRE_MESSAGE(why.empty(), why);
}

// Options for `backends` backends, the peer file naming those in `initial`; the rest
// as ModuleNginxOptions defaults it.
ModuleNginxOptions with_backends(std::size_t backends, std::vector<std::size_t> initial) {
  ModuleNginxOptions o;
  o.backends = backends;
  o.initial = std::move(initial);
  return o;
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

bool all_workers_serve(ModuleNginx& ngx, const PeerWeights& want, std::chrono::milliseconds limit = 5000ms) {
  return all_workers(ngx, [&](const json& st) { return peers_of(st) == want; }, limit);
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

} // namespace

TEST_CASE("nginx module: adding, removing and reweighting file peers moves both workers' traffic without a reload") {
  require_module_nginx();
  ModuleNginxOptions o = with_backends(3, {0, 1});
  o.params = {"policy=round_robin"};
  ModuleNginx ngx(o);
  const pid_t master = ngx.master_pid();
  const std::set<pid_t> workers = ngx.worker_pids();
  REQUIRE(workers.size() == 2);

  struct Step {
    std::string what;
    WeightedBackends set;
  };
  const std::vector<Step> steps{{"add b2", {{0, 1}, {1, 1}, {2, 1}}},
                                {"remove b0", {{1, 1}, {2, 1}}},
                                {"reweight b1=1 b2=3", {{1, 1}, {2, 3}}}};
  for (const Step& step : steps) {
    CAPTURE(step.what);
    ngx.write_peers(ngx.weighted_peers_doc(step.set));
    const auto written = steady::now();
    REQUIRE_MESSAGE(all_workers_serve(ngx, named_peers(step.set)),
                    "the workers did not all serve " << describe(named_peers(step.set)) << " within 5 s");
    const long long took = ms_since(written);

    // Smooth weighted round robin per worker, the kernel spreading the connections over
    // the workers: each backend's share is within a few requests of its weight's.
    constexpr int n = 60;
    NginxTraffic t = ngx.send(n);
    MESSAGE(step.what << ": both workers' status showed the new set " << took << " ms after the write; " << n
                      << " requests: " << describe(t.by_backend));
    CHECK(took < 1000);
    CHECK_MESSAGE(t.failures.empty(), join(t.failures));
    CHECK(t.workers.size() == 2);
    for (const std::string& w : t.workers) CHECK(workers.count(static_cast<pid_t>(std::stol(w))) == 1);
    std::uint32_t total = 0;
    for (const auto& [i, w] : step.set) total += w;
    for (std::size_t b = 0; b < 3; ++b) {
      std::uint32_t w = 0;
      for (const auto& [i, weight] : step.set)
        if (i == b) w = weight;
      const double want = static_cast<double>(n) * w / total;
      const int got = t.by_backend[std::to_string(b)];
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
  ModuleNginxOptions o = with_backends(3, {});
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
  REQUIRE(all_workers_serve(ngx, PeerWeights{{"b1", 1}, {"b2", 3}}));
  NginxTraffic t = ngx.send(60);
  MESSAGE("after putting b2 with weight 3, 60 requests: " << describe(t.by_backend));
  CHECK(t.failures.empty());
  CHECK(t.by_backend["1"] + t.by_backend["2"] == 60);
  CHECK(std::abs(t.by_backend["2"] - 45) <= 6);
  CHECK_MESSAGE(log_is_clean(ngx.error_log()), ngx.error_log());
}

TEST_CASE("nginx module: kill -9 of the leading worker, nginx respawns it, another leads within 1 s and changes flow") {
  require_module_nginx();
  ModuleNginx ngx(with_backends(3, {0}));
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
    CHECK_MESSAGE(all_workers_serve(ngx, PeerWeights{{"b" + std::to_string(to), 1}}),
                  "the workers did not all serve b" << to);
    auto moved = until_all_go_to(ngx, std::to_string(to));
    CHECK_MESSAGE(moved.count() >= 0, "traffic did not move to backend " << to);
    MESSAGE("file change to b" << to << " after the kill: all traffic there in " << moved.count() << " ms");
  }
}

TEST_CASE("nginx module: a registry down at start serves the snapshot's peers, marked stale") {
  require_module_nginx();
  ModuleNginxOptions o = with_backends(3, {2}); // the peer file is not the source here: nothing may reach backend 2
  o.dead = 1;
  o.source = [](const WorkerNginx& n) {
    return "etcd://127.0.0.1:" + std::to_string(n.dead_port(0)) + "/dynup-e2e/module/api/";
  };
  o.snapshot = std::vector<std::size_t>{0, 1};
  ModuleNginx ngx(o);

  NginxTraffic t = ngx.send(60);
  MESSAGE("etcd unreachable, snapshot {b0, b1}: 60 requests: " << describe(t.by_backend));
  CHECK_MESSAGE(t.failures.empty(), join(t.failures) << "\nerror log:\n" << ngx.error_log());
  CHECK(t.by_backend["0"] > 0);
  CHECK(t.by_backend["1"] > 0);
  CHECK(t.by_backend["0"] + t.by_backend["1"] == 60);
  CHECK(t.workers.size() == 2);

  // The leader's watcher says so, and a follower (no watcher of its own) repeats what
  // the leader wrote about it. The snapshot is served before the first fetch fails.
  REQUIRE(all_workers(ngx, [](const json& st) {
    return st.at("stale") == true && st.at("ready") == true && st.at("watcher").at("last_error") != "";
  }));
  auto statuses = ngx.upstream_status_by_worker();
  REQUIRE(statuses.size() == 2);
  int leaders = 0;
  for (const auto& [pid, st] : statuses) {
    INFO("worker " << pid << ": " << st.dump());
    CHECK(peers_of(st) == PeerWeights{{"b0", 1}, {"b1", 1}});
    CHECK(st.at("stale") == true);
    if (st.at("shared").at("role") == "leader") {
      ++leaders;
      CHECK(st.at("watcher").at("last_error") != "");
      CHECK(st.at("watcher").at("consecutive_failures").get<long long>() >= 1);
    } else {
      CHECK(st.at("shared").at("leader_watcher").at("last_error") != "");
    }
  }
  CHECK(leaders == 1);
  // nginx's own log says it too, with the cause, from the leading worker.
  CHECK_MESSAGE(dynup_test::wait_until([&] {
                  return dynup_test::contains(ngx.error_log(), "[error]") &&
                         dynup_test::contains(ngx.error_log(), "dynup: upstream \"api\": etcd://127.0.0.1:");
                }),
                ngx.error_log());
  CHECK_MESSAGE(log_is_clean(ngx.error_log()), ngx.error_log());
}

// A registry that accepts connections and never answers: a listening socket nobody
// accepts from (the kernel completes the handshakes into its backlog).
class HungRegistry {
public:
  HungRegistry() {
    fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    REQUIRE(fd_ >= 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    REQUIRE(::bind(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
    REQUIRE(::listen(fd_, 64) == 0);
    REQUIRE(::getsockname(fd_, reinterpret_cast<sockaddr*>(&a), &len) == 0);
    port_ = ntohs(a.sin_port);
  }
  ~HungRegistry() { ::close(fd_); }
  std::uint16_t port() const noexcept { return port_; }

private:
  int fd_ = -1;
  std::uint16_t port_ = 0;
};

TEST_CASE("nginx module: a registry that never answers holds up neither the workers' start nor a graceful stop") {
  require_module_nginx();
  HungRegistry registry;
  ModuleNginxOptions o = with_backends(3, {2});
  o.source = [&](const WorkerNginx&) {
    return "consul://127.0.0.1:" + std::to_string(registry.port()) + "/health/api";
  };
  o.snapshot = std::vector<std::size_t>{0, 1};
  ModuleNginx ngx(o); // ready: both listeners answer, so no worker is blocked in init_process

  NginxTraffic t = ngx.send(20);
  CHECK_MESSAGE(t.failures.empty(), join(t.failures) << "\nerror log:\n" << ngx.error_log());
  CHECK(t.by_backend["0"] + t.by_backend["1"] == 20); // the snapshot's peers, at once
  for (const auto& [pid, st] : ngx.upstream_status_by_worker()) {
    INFO("worker " << pid << ": " << st.dump());
    CHECK(st.at("stale") == true);
    CHECK(st.at("ready") == true);
  }

  const pid_t master = ngx.master_pid();
  REQUIRE(master > 0);
  ::kill(master, SIGQUIT); // nginx -s quit
  CHECK_MESSAGE(dynup_test::wait_until([&] { return dynup_test::process_gone(master); }, 10000ms),
                "nginx did not stop on QUIT while its registry hangs\n" << ngx.error_log());
}

TEST_CASE("nginx module: with keepalive, sequential requests reuse a few backend connections; without, none") {
  require_module_nginx();
  constexpr int n = 100;
  std::map<bool, std::size_t> distinct;
  for (bool keepalive : {true, false}) {
    CAPTURE(keepalive);
    ModuleNginxOptions o = with_backends(2, {0, 1});
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

TEST_CASE("nginx module: a peer file that goes away reaches nginx's error log with its cause, and the set is kept") {
  require_module_nginx();
  ModuleNginx ngx(with_backends(2, {0, 1}));
  REQUIRE(all_workers(ngx, [](const json& st) { return st.at("peers").size() == 2; }));
  std::filesystem::remove(ngx.peer_file());
  const std::string expected = "dynup: upstream \"api\": cannot open " + ngx.peer_file() + ": No such file or directory";
  CHECK_MESSAGE(dynup_test::wait_until([&] { return dynup_test::contains(ngx.error_log(), expected); }, 10000ms),
                "error log:\n" << ngx.error_log());
  NginxTraffic t = ngx.send(10);
  CHECK(t.failures.empty());
  CHECK(t.by_backend["0"] + t.by_backend["1"] == 10);
}

TEST_CASE("nginx module: a dead peer is retried on a live one, then passive health takes it out") {
  require_module_nginx();
  ModuleNginxOptions o = with_backends(2, {0, 1});
  o.dead = 1;
  // A long fail_timeout: the dead peer stays down for the rest of the test.
  o.params = {"health.passive.max_fails=1", "health.passive.fail_timeout_ms=60000"};
  ModuleNginx ngx(o);
  ngx.write_peers(ngx.peers_doc({0, 1}, {0}));
  REQUIRE(all_workers(ngx, [](const json& st) { return st.at("peers").size() == 3; }));

  NginxTraffic t = ngx.send(50);
  for (const std::string& failure : t.failures) MESSAGE(failure);
  MESSAGE("dead peer: 50 requests, " << t.failures.size() << " client error(s), " << t.retried
                                     << " retried after a refused connection, " << describe(t.by_backend));
  CHECK(t.failures.empty());
  CHECK(t.retried >= 1);
  CHECK(t.by_backend["0"] > 0);
  CHECK(t.by_backend["1"] > 0);

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
  ModuleNginx ngx(with_backends(3, {0}));
  const pid_t master = ngx.master_pid();
  const std::set<pid_t> old_workers = ngx.worker_pids();
  REQUIRE(old_workers.size() == 2);

  // A change made before the reload: the new workers must not start from the config's
  // first state, nor from the initial file.
  ngx.write_peers(ngx.peers_doc({1}));
  REQUIRE(all_workers_serve(ngx, PeerWeights{{"b1", 1}}));

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
  NginxTraffic after = ngx.send(60);
  MESSAGE("reload: new workers served after " << took << " ms; " << during << " requests during it (" << errors
                                              << " error(s)), the first new worker's answer: backend " << first_new
                                              << "; 60 after: " << describe(after.by_backend));
  CHECK(errors == 0);
  CHECK(first_new == "1");
  CHECK(new_wrong == 0);
  CHECK_MESSAGE(after.failures.empty(), join(after.failures));
  CHECK(after.by_backend["1"] == 60);
  for (const std::string& w : after.workers) CHECK(old_workers.count(static_cast<pid_t>(std::stol(w))) == 0);
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
  ModuleNginx ngx(with_backends(2, {0, 1}));
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
    CHECK(peers_of(up) == PeerWeights{{"b0", 1}, {"b1", 1}});
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

TEST_CASE("nginx module: the last worker to exit removes the shared region and its lock and leader files") {
  require_module_nginx();
  ModuleNginx ngx(with_backends(2, {0, 1}));
  auto files = [&] {
    std::set<std::string> out;
    std::error_code ec;
    for (const auto& e : std::filesystem::directory_iterator(ngx.shared_dir(), ec)) out.insert(e.path().filename());
    return out;
  };
  REQUIRE(ngx.send(10).failures.empty());
  const std::set<std::string> running = files();
  INFO("while running: " << join(std::vector<std::string>(running.begin(), running.end())));
  int regions = 0;
  for (const std::string& f : running) regions += f.size() > 6 && f.compare(f.size() - 6, 6, ".dynup") == 0;
  CHECK(regions == 1);
  CHECK(running.size() >= 2); // the region and its lock (and the leader file)
  ngx.stop();
  const std::set<std::string> left = files();
  CHECK_MESSAGE(left.empty(), "left behind: " << join(std::vector<std::string>(left.begin(), left.end())));
}

TEST_CASE("nginx module under wrk: 1000 peer file changes, no client errors, both workers end on the last set") {
  require_module_nginx();
  std::string why = dynup_test::wrk_missing_reason();
  REQUIRE_MESSAGE(why.empty(), why);
  constexpr std::size_t changes = 1000;
  constexpr auto spacing = 12ms; // 1000 changes over 12 s from 1 s after wrk's start, done 2 s before it stops
  ModuleNginx ngx(with_backends(4, {0, 1, 2}));
  for (int i = 0; i < 10; ++i) REQUIRE_MESSAGE(ngx.get().status == 200, ngx.error_log());
  const pid_t master = ngx.master_pid();
  const std::set<pid_t> workers = ngx.worker_pids();

  const dynup_test::ChurnRun run = dynup_test::run_wrk_under_churn(ngx, changes, spacing);
  INFO("wrk output:\n" << run.output);
  dynup_test::require_wrk_succeeded(run);
  const WrkSummary& s = run.summary;

  const PeerWeights last = named_peers(churn_set(changes - 1));
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
                                             << " socket errors; " << run.written << " file changes, the last "
                                             << run.last_write.count() << " ms after wrk's start; versions reached "
                                             << "(1 = the initial file): " << versions.str());
  CHECK(run.written == changes);
  CHECK_MESSAGE(run.wrk_ran_through_all, "wrk ended before the last change");
  CHECK(s.requests >= 1000);
  CHECK(s.non_2xx_3xx == 0);
  CHECK(s.socket_errors == 0);
  CHECK(settled);
  CHECK(ngx.master_pid() == master);
  CHECK(ngx.worker_pids() == workers);
  std::string log = ngx.error_log();
  CHECK_MESSAGE(log.find("[error]") == std::string::npos, "error log:\n" << log);
}
