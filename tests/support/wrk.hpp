// wrk driving a WorkerNginx's proxy while its peer file churns, for the load tests of
// the Lua binding and the native module: where wrk is, what its summary says, and the
// churn itself (every non-empty subset of 4 backends in turn, reweighted each time).
#pragma once

#include <support/process.hpp>
#include <support/worker_nginx.hpp>

#include <doctest/doctest.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <sstream>
#include <string>
#include <thread>

namespace dynup_test {

/// wrk: $DYNUP_WRK, else the first of the usual paths that exists, else /usr/bin/wrk.
inline std::string wrk_binary() {
  if (const char* env = std::getenv("DYNUP_WRK"); env && *env) return env;
  for (const char* p : {"/usr/bin/wrk", "/usr/local/bin/wrk"})
    if (::access(p, X_OK) == 0) return p;
  return "/usr/bin/wrk";
}

/// Empty when wrk_binary() can be run, else why not and what to do about it.
inline std::string wrk_missing_reason() {
  const std::string wrk = wrk_binary();
  if (::access(wrk.c_str(), X_OK) == 0) return {};
  return "wrk is required for the load test but \"" + wrk +
         "\" is not an executable (scripts/install-deps.sh installs it; $DYNUP_WRK overrides the path)";
}

/// What wrk's plain-text summary says (its output without --latency).
struct WrkSummary {
  long long requests = -1;     ///< "N requests in 15.00s"; -1 when absent
  long long non_2xx_3xx = 0;   ///< "Non-2xx or 3xx responses: N"; absent means 0
  long long socket_errors = 0; ///< the sum of "Socket errors: connect A, read B, write C, timeout D"
  double requests_per_s = 0;   ///< "Requests/sec: X"
};

inline WrkSummary parse_wrk(const std::string& out) {
  WrkSummary s;
  std::istringstream lines(out);
  std::string line;
  while (std::getline(lines, line)) {
    std::istringstream words(line);
    std::string first;
    words >> first;
    if (line.find(" requests in ") != std::string::npos) {
      s.requests = std::stoll(first);
    } else if (first == "Socket") {
      std::string word;
      while (words >> word) {
        if (!word.empty() && word.back() == ',') word.pop_back();
        if (!word.empty() && word.find_first_not_of("0123456789") == std::string::npos)
          s.socket_errors += std::stoll(word);
      }
    } else if (line.find("Non-2xx or 3xx responses:") != std::string::npos) {
      s.non_2xx_3xx = std::stoll(line.substr(line.rfind(':') + 1));
    } else if (first == "Requests/sec:") {
      words >> s.requests_per_s;
    }
  }
  return s;
}

/// Change k of the churn: backends by the 4-bit mask 1 + 7k mod 15 (every non-empty
/// subset in turn, never the same twice in a row), each weighted 1 + (k + i) mod 4. From
/// one change to the next some backends come, some go and those that stay change weight.
inline WeightedBackends churn_set(std::size_t k) {
  WeightedBackends out;
  const std::size_t mask = 1 + (k * 7) % 15;
  for (std::size_t i = 0; i < 4; ++i)
    if (mask & (std::size_t{1} << i)) out.emplace_back(i, static_cast<std::uint32_t>(1 + (k + i) % 4));
  return out;
}

/// How a run_wrk_under_churn went.
struct ChurnRun {
  std::size_t written = 0;                 ///< peer file changes made
  std::chrono::milliseconds last_write{0}; ///< when the last was made, after wrk's start
  bool wrk_ran_through_all = false;        ///< wrk was still running after the last change
  std::optional<ExitStatus> exit;          ///< empty: wrk did not end within 30 s of its run
  std::string output;                      ///< wrk's stdout, then its stderr
  WrkSummary summary;                      ///< what its stdout says
};

/// Runs `wrk -t2 -c16 -d15s --timeout 5s` through `ngx`'s proxy and meanwhile writes its
/// peer file `changes` times, churn_set(0), churn_set(1), …: the first 1 s after wrk's
/// start, then one every `spacing`. Stops writing 20 s after the start (a stalled
/// machine), then waits up to 40 s for wrk's end.
inline ChurnRun run_wrk_under_churn(WorkerNginx& ngx, std::size_t changes, std::chrono::milliseconds spacing) {
  using steady = std::chrono::steady_clock;
  constexpr auto run_for = std::chrono::seconds(15); // wrk's -d
  constexpr auto first_change_at = std::chrono::milliseconds(1000);
  ChurnRun run;
  Process load({wrk_binary(), "-t2", "-c16", "-d15s", "--timeout", "5s",
                "http://127.0.0.1:" + std::to_string(ngx.proxy_port()) + "/"});
  const auto started = steady::now();
  for (std::size_t k = 0; k < changes; ++k) {
    std::this_thread::sleep_until(started + first_change_at + k * spacing);
    if (steady::now() - started > run_for + std::chrono::seconds(5)) break;
    ngx.write_peers(ngx.weighted_peers_doc(churn_set(k)));
    ++run.written;
  }
  run.last_write = std::chrono::duration_cast<std::chrono::milliseconds>(steady::now() - started);
  run.wrk_ran_through_all = !load.wait_exit(std::chrono::milliseconds(0)).has_value();

  std::string out = load.read_all(Process::Stream::out, std::chrono::seconds(30));
  run.exit = load.wait_exit(std::chrono::seconds(10));
  run.output = out + load.read_all(Process::Stream::err, std::chrono::seconds(1));
  run.summary = parse_wrk(out);
  return run;
}

/// Fails the current test unless wrk ended by itself, with status 0.
inline void require_wrk_succeeded(const ChurnRun& run) {
  REQUIRE_MESSAGE(run.exit.has_value(), "wrk did not end within 30 s of its 15 s run");
  REQUIRE(run.exit->exited);
  REQUIRE(run.exit->code == 0);
}

} // namespace dynup_test
