// What the Upstream facade adds to a pick: pick + report through Upstream against the
// bare picker's pick + on_start + on_finish, same policy, same peers, side by side.
// Run: build/bench/bench/dynup_bench --benchmark_filter='PickReport'
#include <dynup/upstream.hpp>

#include <benchmark/benchmark.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unistd.h>

namespace {

nlohmann::json peer_file(std::size_t n) {
  nlohmann::json peers = nlohmann::json::array();
  for (std::size_t i = 0; i < n; ++i)
    peers.push_back({{"host", "10." + std::to_string((i >> 16) & 255) + "." + std::to_string((i >> 8) & 255) + "." +
                                  std::to_string(i & 255)},
                     {"port", 8080},
                     {"weight", 1 + i % 10}});
  return {{"peers", peers}};
}

// One upstream per size on a file source, with passive and outlier checks on (the
// success path is what a healthy upstream runs). Built once, shared by threads.
dynup::Upstream& upstream(std::size_t n) {
  static std::map<std::size_t, std::unique_ptr<dynup::Upstream>> all;
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  auto& up = all[n];
  if (!up) {
    char dir[] = "/tmp/dynup-bench-XXXXXX";
    if (!::mkdtemp(dir)) std::abort();
    std::string path = std::string(dir) + "/peers.json";
    std::ofstream(path) << peer_file(n).dump();
    nlohmann::json config = {{"name", "bench"},
                             {"source", "file://" + path},
                             {"policy", "round_robin"},
                             {"health", {{"passive", {{"max_fails", 3}}}, {"outlier", {{"consecutive_5xx", 5}}}}}};
    auto made = dynup::Upstream::start(config);
    if (!made) {
      std::fprintf(stderr, "%s\n", made.error().message().c_str());
      std::abort();
    }
    up = std::move(made).value();
    std::remove(path.c_str());
    ::rmdir(dir);
  }
  return *up;
}

const dynup::Outcome ok{std::chrono::microseconds(300), 200, false};

void BM_PickReportBare(benchmark::State& state) {
  auto& up = upstream(static_cast<std::size_t>(state.range(0)));
  // The same picker the facade routes with, used directly.
  auto first = up.pick();
  auto picker = first.table()->picker;
  up.report(first, ok);
  for (auto _ : state) {
    auto s = picker->pick({});
    picker->on_start(s);
    picker->on_finish(s, ok);
    benchmark::DoNotOptimize(s.peer);
  }
}

void BM_PickReportUpstream(benchmark::State& state) {
  auto& up = upstream(static_cast<std::size_t>(state.range(0)));
  for (auto _ : state) {
    auto s = up.pick();
    up.report(s, ok);
    benchmark::DoNotOptimize(s.peer);
  }
}

BENCHMARK(BM_PickReportBare)->Arg(100)->Arg(10000)->ThreadRange(1, 2);
BENCHMARK(BM_PickReportUpstream)->Arg(100)->Arg(10000)->ThreadRange(1, 2);

} // namespace
