// Chaos under load: wrk drives traffic through the native nginx module (two workers, a
// shared region) and through dynup-proxy while the registry double, their consul://
// source, goes down and up, answers 500, 429, garbage, truncated bodies, index 0, no
// index, resets its index, and churns membership. Every backend stays alive, so every
// request must succeed; afterwards both must serve exactly the registry's final set.
// A backend that is deregistered, and only then stopped, must see no traffic after.
// nginx, the module and wrk are required: without them these tests fail, saying so.
#include <support/chaos.hpp>
#include <support/consul_double.hpp>
#ifdef DYNUP_NGINX_MODULE // undefined where the module is not built (a sanitizer build)
#include <support/module_nginx.hpp>
#endif
#include <support/process.hpp>
#include <support/proxy.hpp>
#include <support/temp_dir.hpp>
#include <support/text.hpp>
#include <support/wait.hpp>
#include <support/wrk.hpp>

#include <doctest/doctest.h>
#include <httplib.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

namespace {

using dynup_test::addresses_of;
using dynup_test::ChaosBackend;
using dynup_test::ChaosMember;
using dynup_test::ConsulDouble;
using dynup_test::describe;
using dynup_test::PeerAddresses;
using dynup_test::Process;
using dynup_test::RegistryChaos;
using nlohmann::json;
using namespace std::chrono_literals;
using steady = std::chrono::steady_clock;
using Stream = Process::Stream;

constexpr const char* service = "api";
constexpr std::size_t backends = 4;          // churn_set's subsets are of 4
constexpr std::size_t max_rounds = 36;       // three 12-round cycles
constexpr std::size_t deregister_round = 18; // where the extra backend is taken out
constexpr auto spacing = 250ms;              // between rounds
constexpr auto chaos_for = 14s;              // hard cap on the rounds, from wrk's start
constexpr auto settle_limit = 8s;            // for any set to be served everywhere
const std::string wrk_duration = "16s";      // the rounds and the final change fit in it

// The upstream's watcher tuned for a short test: a blocking query returns within 1 s
// (so an index reset is seen without a change past the old index), retries within 400 ms.
constexpr int wait_ms = 1000;
constexpr int backoff_cap_ms = 400;

long long ms_since(steady::time_point t0) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(steady::now() - t0).count();
}

// The final registry state: a subset of the start's, reweighted.
std::vector<ChaosMember> final_members(const std::vector<std::uint16_t>& ports) {
  return {{"b1", ports.at(1), 3}, {"b3", ports.at(3), 1}};
}

// What the system under test serves, as one status per process that picks (each nginx
// worker, or the proxy); empty when not every one answered.
using Statuses = std::function<std::vector<json>()>;

bool all_serve(const Statuses& statuses, const PeerAddresses& want) {
  auto docs = statuses();
  if (docs.empty()) return false;
  for (const json& st : docs)
    if (addresses_of(st) != want) return false;
  return true;
}

std::string describe_statuses(const Statuses& statuses) {
  std::string out;
  for (const json& st : statuses())
    out += "  serves " + describe(addresses_of(st)) + "; watcher " + st.at("watcher").dump() + "\n";
  return out.empty() ? "  no status\n" : out;
}

// How run_chaos went.
struct ChaosRun {
  dynup_test::ChaosTally tally;
  bool wrk_ran_through = false;           ///< wrk was still running when the final set was made
  std::optional<dynup_test::ExitStatus> exit;
  std::string wrk_output;
  dynup_test::WrkSummary summary;
  std::size_t gone_before = 0;            ///< requests the extra backend served before it was deregistered
  long long gone_removed_ms = -1;         ///< from its deregistration to no status listing it; -1: never
  std::size_t gone_after_removal = 0;     ///< requests it served in the window after that, before its stop
  long long final_ms = -1;                ///< from the final change to every status showing it; -1: never
  PeerAddresses final_set;
  std::string final_statuses;             ///< what the statuses said when the wait ended
};

// Runs wrk against `port` for wrk_duration while `chaos` flaps the registry; halfway it
// deregisters `gone`, waits until no status lists it, watches that it gets no request
// for 500 ms, and stops it. Then clears the faults, sets the final state and waits for
// every status to show it. `between` runs after each round (draining a pipe).
ChaosRun run_chaos(std::uint16_t port, ConsulDouble& registry, RegistryChaos& chaos, ChaosBackend& gone,
                   const std::vector<std::uint16_t>& ports, const Statuses& statuses,
                   const std::function<void()>& between) {
  ChaosRun run;
  const std::string gone_id = dynup_test::peer_id_of({gone.name(), gone.port()});
  Process wrk({dynup_test::wrk_binary(), "-t2", "-c16", "-d" + wrk_duration, "--timeout", "5s",
               "http://127.0.0.1:" + std::to_string(port) + "/"});
  const auto started = steady::now();
  std::this_thread::sleep_for(500ms);
  for (std::size_t k = 0; k < max_rounds && steady::now() - started < chaos_for; ++k) {
    if (k == deregister_round) {
      registry.clear_faults();
      run.gone_before = gone.requests();
      chaos.drop_extra();
      chaos.set(chaos.everyone());
      const auto dropped = steady::now();
      const bool removed = dynup_test::wait_until(
          [&] {
            auto docs = statuses();
            if (docs.empty()) return false;
            for (const json& st : docs)
              for (const json& p : st.at("peers"))
                if (p.at("id") == gone_id) return false;
            return true;
          },
          settle_limit);
      if (removed) {
        run.gone_removed_ms = ms_since(dropped);
        std::this_thread::sleep_for(200ms); // requests picked just before the change
        const std::size_t at = gone.requests();
        std::this_thread::sleep_for(500ms);
        run.gone_after_removal = gone.requests() - at;
      }
      gone.stop();
    }
    chaos.round(k);
    if (between) between();
    std::this_thread::sleep_for(spacing);
  }

  registry.clear_faults();
  registry.up();
  const std::vector<ChaosMember> last = final_members(ports);
  run.final_set = addresses_of(last);
  chaos.set(last);
  const auto changed = steady::now();
  run.wrk_ran_through = !wrk.wait_exit(0ms).has_value();
  if (dynup_test::wait_until([&] { return all_serve(statuses, run.final_set); }, settle_limit))
    run.final_ms = ms_since(changed);
  run.final_statuses = describe_statuses(statuses);
  run.tally = chaos.tally();

  const std::string out = wrk.read_all(Stream::out, 30000ms);
  run.exit = wrk.wait_exit(10000ms);
  run.wrk_output = out + wrk.read_all(Stream::err, 500ms);
  run.summary = dynup_test::parse_wrk(out);
  return run;
}

// The assertions both cases share: wrk saw no error and sent enough, the deregistered
// backend got nothing once it was out, and the final set is the registry's.
void check_run(const ChaosRun& run, const std::string& what) {
  const dynup_test::WrkSummary& s = run.summary;
  MESSAGE(what << ": wrk -t2 -c16 -d" << wrk_duration << ": " << s.requests << " requests (" << s.requests_per_s
               << "/s), " << s.non_2xx_3xx << " non-2xx/3xx, " << s.socket_errors << " socket errors; "
               << describe(run.tally) << "; the deregistered backend served " << run.gone_before
               << " before, left every status in " << run.gone_removed_ms << " ms, then served "
               << run.gone_after_removal << "; the final set was served everywhere " << run.final_ms
               << " ms after the change");
  INFO("wrk output:\n" << run.wrk_output);
  REQUIRE_MESSAGE(run.exit.has_value(), "wrk did not end within 30 s of its run");
  CHECK(run.exit->exited);
  CHECK(run.exit->code == 0);
  CHECK_MESSAGE(run.wrk_ran_through, "wrk ended before the final change");
  CHECK(run.tally.rounds >= 24);
  CHECK(run.tally.outages >= 2);
  CHECK(run.tally.index_resets >= 2);
  CHECK(s.requests >= 2000);
  CHECK(s.non_2xx_3xx == 0);
  CHECK(s.socket_errors == 0);
  CHECK(run.gone_before > 0);
  CHECK_MESSAGE(run.gone_removed_ms >= 0, "a status still listed the deregistered backend after 8 s");
  CHECK(run.gone_after_removal == 0);
  CHECK_MESSAGE(run.final_ms >= 0, "not every status shows the registry's final set "
                                       << describe(run.final_set) << " 8 s after the change:\n"
                                       << run.final_statuses);
}

void require_wrk() {
  const std::string why = dynup_test::wrk_missing_reason();
  REQUIRE_MESSAGE(why.empty(), why);
}

} // namespace

#ifdef DYNUP_NGINX_MODULE
namespace {

// What nginx logs when something is wrong with nginx or the module itself.
bool log_is_clean(const std::string& log) {
  for (const char* level : {"[alert]", "[crit]", "[emerg]"})
    if (dynup_test::contains(log, level)) return false;
  return true;
}

} // namespace

TEST_CASE("chaos: the nginx module under wrk while the registry double flaps fails no request and ends on the "
          "registry's set") {
  const std::string why = dynup_test::module_nginx_missing_reason();
  REQUIRE_MESSAGE(why.empty(), why);
  require_wrk();
  ConsulDouble registry;
  ChaosBackend gone("gone");
  dynup_test::ModuleNginxOptions o;
  o.backends = backends;
  o.initial = {};
  o.source = [&](const dynup_test::WorkerNginx&) { return registry.spec(std::string("/health/") + service); };
  o.params = {"watch.wait_ms=" + std::to_string(wait_ms), "watch.backoff_cap_ms=" + std::to_string(backoff_cap_ms)};
  dynup_test::ModuleNginx ngx(o);
  std::vector<std::uint16_t> ports;
  for (std::size_t i = 0; i < backends; ++i) ports.push_back(ngx.backend_port(i));
  RegistryChaos chaos(registry, service, ports, {{gone.name(), gone.port()}});
  chaos.set(chaos.everyone());

  const Statuses statuses = [&] {
    std::vector<json> out;
    for (auto& [pid, st] : ngx.upstream_status_by_worker()) out.push_back(st);
    if (out.size() != ngx.workers()) out.clear();
    return out;
  };
  REQUIRE_MESSAGE(dynup_test::wait_until([&] { return all_serve(statuses, addresses_of(chaos.everyone())); },
                                         settle_limit),
                  "the workers never served the registry's first set:\n"
                      << describe_statuses(statuses) << "error log:\n" << ngx.error_log());
  const pid_t master = ngx.master_pid();
  const std::set<pid_t> workers = ngx.worker_pids();

  const ChaosRun run = run_chaos(ngx.proxy_port(), registry, chaos, gone, ports, statuses, {});
  check_run(run, "nginx module");

  // The final weights hold in the traffic: b1:b3 = 3:1 per worker, nothing elsewhere.
  dynup_test::NginxTraffic t = ngx.send(60);
  MESSAGE("nginx module after the chaos, 60 requests: " << t.by_backend["1"] << " to b1, " << t.by_backend["3"]
                                                        << " to b3, " << t.failures.size() << " failed");
  CHECK(t.failures.empty());
  CHECK(t.by_backend["1"] + t.by_backend["3"] == 60);
  CHECK(std::abs(t.by_backend["1"] - 45) <= 6);
  CHECK(ngx.master_pid() == master);
  CHECK(ngx.worker_pids() == workers);
  // A request sent to a peer that is not listening is logged as a failed connect: none
  // may be, the stopped backend included.
  const std::string log = ngx.error_log();
  CHECK_MESSAGE(log_is_clean(log), log);
  CHECK_MESSAGE(!dynup_test::contains(log, "connect() failed"), log);
  CHECK_MESSAGE(!dynup_test::contains(log, "upstream prematurely closed"), log);
}
#endif

TEST_CASE("chaos: dynup-proxy under wrk while the registry double flaps fails no request and ends on the "
          "registry's set") {
  require_wrk();
  ConsulDouble registry;
  ChaosBackend gone("gone");
  std::vector<std::unique_ptr<ChaosBackend>> live;
  std::vector<std::uint16_t> ports;
  for (std::size_t i = 0; i < backends; ++i) {
    live.push_back(std::make_unique<ChaosBackend>("b" + std::to_string(i)));
    ports.push_back(live.back()->port());
  }
  RegistryChaos chaos(registry, service, ports, {{gone.name(), gone.port()}});
  chaos.set(chaos.everyone());

  dynup_test::TempDir dir;
  const json upstream{{"name", service},
                      {"source", registry.spec(std::string("/health/") + service)},
                      {"policy", "round_robin"},
                      {"watch", {{"wait_ms", wait_ms}, {"backoff_cap_ms", backoff_cap_ms}}}};
  const json config{{"listen", "127.0.0.1:0"},
                    {"threads", 16},
                    {"access_log", false},
                    {"admin", {{"listen", "127.0.0.1:0"}}},
                    {"upstreams", json::array({upstream})}};
  dynup_test::write_by_rename(dir.file("proxy.json"), config.dump(2));
  dynup_test::RunningProxy proxy(dir.file("proxy.json"));
  const int port = proxy.port(), admin = proxy.admin_port();
  REQUIRE_MESSAGE(admin > 0, proxy.log());

  const Statuses statuses = [&] {
    std::vector<json> out;
    if (json st = proxy.try_status(service); st.is_object()) out.push_back(std::move(st));
    return out;
  };
  // Its stderr is a pipe: read it as it comes, or a chatty watcher would block on it.
  const std::function<void()> drain = [&] { proxy.log(1ms); };
  REQUIRE_MESSAGE(dynup_test::wait_until([&] { return all_serve(statuses, addresses_of(chaos.everyone())); },
                                         settle_limit),
                  "dynup-proxy never served the registry's first set:\n" << describe_statuses(statuses) << proxy.log());

  const ChaosRun run = run_chaos(static_cast<std::uint16_t>(port), registry, chaos, gone, ports, statuses, drain);
  const std::string& log = proxy.log(1ms);
  INFO("dynup-proxy's stderr:\n" << log);
  check_run(run, "dynup-proxy");
  CHECK_MESSAGE(!proxy.process().wait_exit(0ms).has_value(), "dynup-proxy exited");

  // The final weights hold in the traffic: 3:1 over whole periods of one proxy thread's
  // round robin (one kept-alive connection), and nothing reaches b0 or b2.
  const std::size_t b0 = live[0]->requests(), b2 = live[2]->requests();
  httplib::Client cli("127.0.0.1", port);
  cli.set_keep_alive(true);
  cli.set_read_timeout(5, 0);
  std::map<std::string, int> counts;
  int failed = 0;
  for (int i = 0; i < 40; ++i) {
    auto res = cli.Get("/");
    if (!res || res->status != 200) {
      ++failed;
      continue;
    }
    ++counts[res->body];
  }
  MESSAGE("dynup-proxy after the chaos, 40 requests on one connection: " << counts["b1"] << " to b1, "
                                                                          << counts["b3"] << " to b3, " << failed
                                                                          << " failed");
  CHECK(failed == 0);
  CHECK(counts["b1"] == 30);
  CHECK(counts["b3"] == 10);
  CHECK(live[0]->requests() == b0);
  CHECK(live[2]->requests() == b2);
}
