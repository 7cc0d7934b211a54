// Publisher read and publish costs. Run: build/bench/bench/dynup_bench --benchmark_filter=Publish|Snapshot
#include <dynup/peer_json.hpp>
#include <dynup/publisher.hpp>

#include <benchmark/benchmark.h>

#include <atomic>
#include <memory>
#include <string>
#include <vector>

namespace {

std::vector<dynup::Peer> make_peers(std::size_t n) {
  std::vector<dynup::Peer> peers;
  peers.reserve(n);
  for (std::size_t i = 0; i < n; ++i) {
    dynup::Peer p;
    p.host = "10." + std::to_string((i >> 16) & 255) + "." + std::to_string((i >> 8) & 255) + "." +
             std::to_string(i & 255);
    p.port = static_cast<std::uint16_t>(8000 + i % 1000);
    p.weight = static_cast<std::uint32_t>(1 + i % 10);
    p.zone = i % 2 ? "eu-1a" : "eu-1b";
    p.tags = {"v2", "http"};
    peers.push_back(std::move(p));
  }
  return peers;
}

dynup::Publisher& shared_publisher() {
  static dynup::Publisher pub;
  static bool once = [] {
    (void)pub.publish(dynup::PeerSet::make(make_peers(100)).value());
    return true;
  }();
  (void)once;
  return pub;
}

// The read every request makes: nothing changed since this thread's last read.
void BM_SnapshotUnchanged(benchmark::State& state) {
  const dynup::Publisher& pub = shared_publisher();
  for (auto _ : state) {
    const dynup::Snapshot& s = pub.snapshot();
    benchmark::DoNotOptimize(s.get());
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_SnapshotUnchanged)->Threads(1)->Threads(2)->UseRealTime();

// For contrast: the common alternative, an atomic shared_ptr load per read, which
// writes the shared reference count on every call.
void BM_AtomicSharedPtrLoad(benchmark::State& state) {
  static const auto shared = std::make_shared<const dynup::PeerSet>(dynup::PeerSet::make(make_peers(100)).value());
  for (auto _ : state) {
    auto s = std::atomic_load(&shared);
    benchmark::DoNotOptimize(s.get());
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_AtomicSharedPtrLoad)->Threads(1)->Threads(2)->UseRealTime();

// Validate, canonicalize, sort and hash n peers, then publish: what a watcher does per change.
void BM_BuildAndPublish(benchmark::State& state) {
  const auto input = make_peers(static_cast<std::size_t>(state.range(0)));
  dynup::Publisher pub;
  std::uint32_t flip = 0;
  for (auto _ : state) {
    state.PauseTiming();
    auto peers = input;
    peers[0].weight = 1 + (++flip % 2); // distinct content every time, so it is published
    state.ResumeTiming();
    auto set = dynup::PeerSet::make(std::move(peers));
    auto outcome = pub.publish(std::move(set).value());
    benchmark::DoNotOptimize(outcome.version);
  }
}
BENCHMARK(BM_BuildAndPublish)->Arg(10000)->Unit(benchmark::kMillisecond);

// publish() alone, on a set already built.
void BM_PublishOnly(benchmark::State& state) {
  auto base = dynup::PeerSet::make(make_peers(static_cast<std::size_t>(state.range(0)))).value();
  dynup::Publisher pub;
  std::uint64_t i = 0;
  for (auto _ : state) {
    state.PauseTiming();
    auto peers = base.peers();
    peers[0].weight = 1 + (++i % 2);
    auto set = dynup::PeerSet::make(std::move(peers)).value();
    state.ResumeTiming();
    auto outcome = pub.publish(std::move(set));
    benchmark::DoNotOptimize(outcome.version);
  }
}
BENCHMARK(BM_PublishOnly)->Arg(10000)->Unit(benchmark::kMicrosecond);

// The file source's path per change: JSON text → validated set → published.
void BM_ParseAndPublish(benchmark::State& state) {
  auto set = dynup::PeerSet::make(make_peers(static_cast<std::size_t>(state.range(0)))).value();
  std::string a = dynup::to_json(set);
  std::string b = a;
  b.replace(b.find("\"weight\":1"), 10, "\"weight\":2");
  dynup::Publisher pub;
  bool flip = false;
  for (auto _ : state) {
    flip = !flip;
    auto parsed = dynup::parse_peer_set(flip ? a : b);
    auto outcome = pub.publish(std::move(parsed).value());
    benchmark::DoNotOptimize(outcome.version);
  }
}
BENCHMARK(BM_ParseAndPublish)->Arg(10000)->Unit(benchmark::kMillisecond);

} // namespace
