// Pick and build costs of every policy in dynup::policy_names.
// Run: build/bench/bench/dynup_bench --benchmark_filter='Pick|Build'
#include <dynup/balance/policy.hpp>
#include <dynup/publisher.hpp>

#include <benchmark/benchmark.h>

#include <cstdio>
#include <tuple>
#include <map>
#include <mutex>
#include <memory>
#include <string>
#include <vector>

namespace {

// n peers with weights 1..10 (unequal: no policy gets its equal-weights shortcut), or
// all of weight 1 (the common case for consistent hashing: 160 ring points per peer).
dynup::Snapshot weighted_set(std::size_t n, bool equal = false) {
  std::vector<dynup::Peer> peers;
  peers.reserve(n);
  for (std::size_t i = 0; i < n; ++i) {
    dynup::Peer p;
    p.host = "10." + std::to_string((i >> 16) & 255) + "." + std::to_string((i >> 8) & 255) + "." +
             std::to_string(i & 255);
    p.port = 8080;
    p.weight = equal ? 1 : static_cast<std::uint32_t>(1 + i % 10);
    peers.push_back(std::move(p));
  }
  return std::make_shared<const dynup::PeerSet>(dynup::PeerSet::make(std::move(peers)).value());
}

const std::vector<std::string>& keys() {
  static const std::vector<std::string> k = [] {
    std::vector<std::string> v;
    for (int i = 0; i < 4096; ++i) v.push_back("/api/users/" + std::to_string(i * 7919));
    return v;
  }();
  return k;
}

struct Fixture {
  std::unique_ptr<dynup::Policy> policy;
  std::shared_ptr<const dynup::Picker> picker;
};

// Built once per (policy, size, weights) and shared by the threads of a multi-threaded run.
Fixture& fixture(const char* name, std::size_t n, bool equal) {
  static std::map<std::tuple<std::string, std::size_t, bool>, Fixture> all;
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  Fixture& f = all[{name, n, equal}];
  if (!f.picker) {
    f.policy = std::move(dynup::make_policy(name).value());
    f.picker = f.policy->build(weighted_set(n, equal));
  }
  return f;
}

void pick(benchmark::State& state, const char* name, bool equal) {
  const dynup::Picker& picker = *fixture(name, static_cast<std::size_t>(state.range(0)), equal).picker;
  const auto& k = keys();
  std::size_t i = static_cast<std::size_t>(state.thread_index()) * 977;
  for (auto _ : state) {
    dynup::PickContext ctx;
    ctx.key = k[i++ & 4095];
    dynup::Selection s = picker.pick(ctx);
    benchmark::DoNotOptimize(s.peer);
  }
  state.SetItemsProcessed(state.iterations());
}

void build(benchmark::State& state, const char* name, bool equal) {
  auto set = weighted_set(static_cast<std::size_t>(state.range(0)), equal);
  auto policy = std::move(dynup::make_policy(name).value());
  for (auto _ : state) {
    auto picker = policy->build(set);
    benchmark::DoNotOptimize(picker.get());
  }
}

const bool registered = [] {
  for (const char* name : dynup::policy_names) {
    std::string n = name;
    benchmark::RegisterBenchmark(("BM_Pick/" + n).c_str(), pick, name, false)
        ->Arg(3)->Arg(100)->Arg(10000)->Threads(1)->Threads(2)->UseRealTime();
    benchmark::RegisterBenchmark(("BM_PickWeight1/" + n).c_str(), pick, name, true)
        ->Arg(10000)->Threads(1)->Threads(2)->UseRealTime();
    benchmark::RegisterBenchmark(("BM_Build/" + n).c_str(), build, name, false)
        ->Arg(10000)->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark(("BM_BuildWeight1/" + n).c_str(), build, name, true)
        ->Arg(10000)->Unit(benchmark::kMillisecond);
  }
  return true;
}();

// Context for the pick figures: the cost of one dependent random load in a working set
// of the given size on this machine (a pointer chase). Large tables are bound by it.
void BM_MemoryLatency(benchmark::State& state) {
  const std::size_t n = static_cast<std::size_t>(state.range(0)) / 64;
  struct alignas(64) Node {
    std::size_t next;
  };
  std::vector<Node> nodes(n);
  std::vector<std::size_t> order(n);
  for (std::size_t i = 0; i < n; ++i) order[i] = i;
  std::uint64_t seed = 42;
  for (std::size_t i = n - 1; i > 0; --i) std::swap(order[i], order[dynup::detail::splitmix64(seed) % (i + 1)]);
  for (std::size_t i = 0; i < n; ++i) nodes[order[i]].next = order[(i + 1) % n];
  std::size_t at = 0;
  for (auto _ : state) {
    at = nodes[at].next;
    benchmark::DoNotOptimize(at);
  }
}
BENCHMARK(BM_MemoryLatency)->Arg(256 << 10)->Arg(1 << 20)->Arg(4 << 20)->Arg(16 << 20)->Arg(64 << 20);

} // namespace
