#include <dynup/publisher.hpp>

#include "support/peers.hpp"
#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <vector>

namespace {

using dynup::Peer;
using dynup::PeerSet;
using dynup::Publisher;
using dynup::Snapshot;

using dynup_test::make_set;
using dynup_test::peer;

// Set number `gen` (>= 1): 1 + gen % 5 peers, each tagged with gen in meta and weight,
// so a reader can tell whether what it sees is one whole set.
PeerSet generation_set(std::uint64_t gen) {
  std::vector<Peer> peers;
  std::size_t n = 1 + gen % 5;
  for (std::size_t i = 0; i < n; ++i) {
    Peer p = peer("10.1.0." + std::to_string(i + 1), 8080, static_cast<std::uint32_t>(gen % 1000 + 1));
    p.meta["gen"] = std::to_string(gen);
    peers.push_back(std::move(p));
  }
  auto s = PeerSet::make(std::move(peers), gen);
  return std::move(s).value();
}

// True when `set` is exactly what generation_set(v) built and published as version v.
// `gen_text[v]` is std::to_string(v), computed once so readers do not allocate.
bool is_whole_generation(const PeerSet& set, const std::vector<std::string>& gen_text) {
  std::uint64_t v = set.version();
  if (v == 0) return set.empty();
  if (v >= gen_text.size() || set.size() != 1 + v % 5 || set.source_index() != v) return false;
  for (const Peer& p : set) {
    auto it = p.meta.find("gen");
    if (it == p.meta.end() || it->second != gen_text[v]) return false;
    if (p.weight != v % 1000 + 1) return false;
  }
  return true;
}

} // namespace

TEST_CASE("snapshot before any publish is an empty set with version 0") {
  Publisher pub;
  const Snapshot& s = pub.snapshot();
  REQUIRE(s.get() != nullptr);
  CHECK(s->empty());
  CHECK(s->version() == 0);
  CHECK(pub.version() == 0);
  REQUIRE(pub.current().get() != nullptr);
  CHECK(pub.current()->empty());
}

TEST_CASE("each published set gets the next version, starting at 1") {
  Publisher pub;
  for (std::uint64_t i = 1; i <= 5; ++i) {
    auto out = pub.publish(make_set({peer("10.0.0.1", static_cast<std::uint16_t>(8000 + i))}, i * 10));
    CHECK(out.published);
    CHECK(out.version == i);
    CHECK(pub.version() == i);
    const Snapshot& s = pub.snapshot();
    CHECK(s->version() == i);
    CHECK(s->source_index() == i * 10);
    REQUIRE(s->size() == 1);
    CHECK((*s)[0].port == 8000 + i);
    CHECK(pub.current().get() == s.get());
  }
}

TEST_CASE("an empty set published first still becomes version 1") {
  Publisher pub;
  auto out = pub.publish(PeerSet{});
  CHECK(out.published);
  CHECK(out.version == 1);
  CHECK(pub.snapshot()->version() == 1);
  CHECK(pub.snapshot()->empty());
  auto again = pub.publish(PeerSet{});
  CHECK_FALSE(again.published);
  CHECK(again.version == 1);
}

TEST_CASE("equal content is not republished, whatever the source index or input order") {
  Publisher pub;
  auto first = pub.publish(make_set({peer("10.0.0.1", 80), peer("10.0.0.2", 80, 3)}, 5));
  REQUIRE(first.published);
  REQUIRE(first.version == 1);
  Snapshot before = pub.snapshot();

  auto same = pub.publish(make_set({peer("10.0.0.1", 80), peer("10.0.0.2", 80, 3)}, 5));
  CHECK_FALSE(same.published);
  CHECK(same.version == 1);

  auto reordered = pub.publish(make_set({peer("10.0.0.2", 80, 3), peer("10.0.0.1", 80)}, 99));
  CHECK_FALSE(reordered.published);
  CHECK(reordered.version == 1);
  CHECK(pub.version() == 1);
  CHECK(pub.snapshot().get() == before.get()); // the very same object: nothing was swapped in

  auto changed = pub.publish(make_set({peer("10.0.0.2", 80, 4), peer("10.0.0.1", 80)}, 99));
  CHECK(changed.published);
  CHECK(changed.version == 2);
  CHECK(pub.snapshot()->version() == 2);
}

TEST_CASE("a held snapshot keeps its content and version across later publishes") {
  Publisher pub;
  (void)pub.publish(make_set({peer("10.0.0.1", 80)}));
  Snapshot held = pub.snapshot();
  for (std::uint16_t port = 81; port < 91; ++port) {
    (void)pub.publish(make_set({peer("10.0.0.9", port), peer("10.0.0.8", port)}));
    (void)pub.snapshot();
  }
  CHECK(pub.version() == 11);
  REQUIRE(held.get() != nullptr);
  CHECK(held->version() == 1);
  REQUIRE(held->size() == 1);
  CHECK(held->peers()[0].id == "10.0.0.1:80");
}

TEST_CASE("an old set is freed once its last holder and this thread's cache drop it") {
  Publisher pub;
  (void)pub.publish(make_set({peer("10.0.0.1", 80)}));
  std::weak_ptr<const PeerSet> old_set;
  Snapshot holder = pub.snapshot();
  old_set = holder;

  (void)pub.publish(make_set({peer("10.0.0.2", 80)}));
  (void)pub.snapshot(); // refreshes this thread's cache to version 2
  CHECK_FALSE(old_set.expired()); // `holder` still has it
  CHECK(old_set.lock()->version() == 1);

  holder.reset();
  CHECK(old_set.expired());
}

TEST_CASE("a set seen only through the cache is freed on this thread's next snapshot") {
  Publisher pub;
  (void)pub.publish(make_set({peer("10.0.0.1", 80)}));
  std::weak_ptr<const PeerSet> v1 = pub.snapshot();
  (void)pub.publish(make_set({peer("10.0.0.2", 80)}));
  // Documented: the cache keeps v1 until this thread reads this publisher again.
  REQUIRE_FALSE(v1.expired());
  const Snapshot& now = pub.snapshot();
  CHECK(now->version() == 2);
  CHECK(v1.expired());
}

TEST_CASE("a set is freed on publish when no thread holds or caches it") {
  Publisher pub;
  (void)pub.publish(make_set({peer("10.0.0.1", 80)}));
  std::weak_ptr<const PeerSet> v1 = pub.current();
  // Another thread reads (and caches) v1, then exits; its cache goes with it.
  std::thread([&] { CHECK(pub.snapshot()->version() == 1); }).join();
  CHECK_FALSE(v1.expired()); // still current
  (void)pub.publish(make_set({peer("10.0.0.2", 80)}));
  CHECK(v1.expired());
}

TEST_CASE("two publishers read from one thread keep their own sets") {
  Publisher a;
  Publisher b;
  // Same version numbers on both, different content: a shared cache would mix them up.
  (void)a.publish(make_set({peer("10.0.0.1", 80)}));
  (void)b.publish(make_set({peer("10.0.0.2", 80)}));
  for (int round = 0; round < 3; ++round) {
    CHECK(a.snapshot()->peers()[0].id == "10.0.0.1:80");
    CHECK(b.snapshot()->peers()[0].id == "10.0.0.2:80");
    CHECK(a.snapshot()->version() == b.snapshot()->version());
  }
  (void)a.publish(make_set({peer("10.0.0.3", 80)}));
  CHECK(b.snapshot()->peers()[0].id == "10.0.0.2:80");
  CHECK(a.snapshot()->peers()[0].id == "10.0.0.3:80");
  CHECK(a.snapshot()->version() == 2);
  CHECK(b.snapshot()->version() == 1);
}

TEST_CASE("a publisher created after another was destroyed never returns the old one's set") {
  std::weak_ptr<const PeerSet> old_set;
  {
    auto first = std::make_unique<Publisher>();
    (void)first->publish(make_set({peer("10.0.0.1", 80)}));
    old_set = first->snapshot(); // cached in this thread's slot, at version 1
    CHECK(first->snapshot()->version() == 1);
  }
  // The slot number is recycled, and this thread's slot still says "version 1"; the
  // new publisher is also at version 1 after one publish, read here for the first time.
  Publisher second;
  (void)second.publish(make_set({peer("10.0.0.2", 80)}));
  const Snapshot& s = second.snapshot();
  CHECK(s->version() == 1);
  REQUIRE(s->size() == 1);
  CHECK(s->peers()[0].id == "10.0.0.2:80");
  CHECK(old_set.expired());
}

TEST_CASE("a new publisher in a recycled slot starts empty at version 0") {
  {
    Publisher first;
    (void)first.publish(make_set({peer("10.0.0.1", 80)}));
    CHECK(first.snapshot()->version() == 1);
  }
  Publisher second;
  CHECK(second.snapshot()->empty());
  CHECK(second.snapshot()->version() == 0);
}

TEST_CASE("many publishers created and destroyed in turn each read back their own set") {
  for (std::uint16_t i = 1; i <= 50; ++i) {
    Publisher pub;
    CHECK(pub.snapshot()->version() == 0);
    CHECK(pub.snapshot()->empty());
    (void)pub.publish(make_set({peer("10.0.0.1", i)}));
    REQUIRE(pub.snapshot()->size() == 1);
    CHECK(pub.snapshot()->peers()[0].port == i);
  }
}

TEST_CASE("concurrent publishers get distinct versions with no gaps") {
  Publisher pub;
  constexpr int threads = 4, per_thread = 100;
  std::vector<std::vector<std::uint64_t>> versions(threads);
  std::vector<std::thread> workers;
  for (int t = 0; t < threads; ++t) {
    workers.emplace_back([&, t] {
      for (int i = 0; i < per_thread; ++i) {
        auto out = pub.publish(make_set({peer("10.2.0.1", static_cast<std::uint16_t>(1 + t * per_thread + i))}));
        if (out.published) versions[static_cast<std::size_t>(t)].push_back(out.version);
      }
    });
  }
  for (auto& w : workers) w.join();
  std::vector<std::uint64_t> all;
  for (auto& v : versions) {
    CHECK(v.size() == per_thread);
    all.insert(all.end(), v.begin(), v.end());
  }
  std::sort(all.begin(), all.end());
  REQUIRE(all.size() == threads * per_thread);
  for (std::size_t i = 0; i < all.size(); ++i) CHECK(all[i] == i + 1);
  CHECK(pub.version() == threads * per_thread);
}

TEST_CASE("readers spinning on snapshot see whole sets in non-decreasing version order") {
  constexpr std::uint64_t versions = 2000;
  constexpr int readers = 4;
  // Bounds the readers even if the writer were to stall (generous: sanitizer builds).
  const auto give_up_at = std::chrono::steady_clock::now() + std::chrono::seconds(60);

  std::vector<PeerSet> sets;
  sets.reserve(versions);
  for (std::uint64_t v = 1; v <= versions; ++v) sets.push_back(generation_set(v));
  std::vector<std::string> gen_text;
  for (std::uint64_t v = 0; v <= versions; ++v) gen_text.push_back(std::to_string(v));

  Publisher pub;
  std::atomic<bool> writer_done{false};
  std::atomic<int> readers_started{0};
  std::atomic<std::uint64_t> newest_seen{0}; // a pacing hint for the writer, nothing more

  struct ReaderResult {
    std::uint64_t reads = 0, distinct = 0, last = 0;
    std::uint64_t went_backwards = 0, torn = 0, version_mismatch = 0;
  };
  std::vector<ReaderResult> results(readers);
  std::vector<std::thread> threads;
  for (int r = 0; r < readers; ++r) {
    threads.emplace_back([&, r] {
      ReaderResult& res = results[static_cast<std::size_t>(r)];
      Snapshot held; // keep some sets alive past later publishes
      readers_started.fetch_add(1);
      for (std::uint64_t i = 0;; ++i) {
        if (i % 1024 == 0 && std::chrono::steady_clock::now() > give_up_at) break;
        bool done = writer_done.load(std::memory_order_acquire);
        const Snapshot& s = pub.snapshot();
        ++res.reads;
        std::uint64_t v = s->version();
        if (v < res.last) ++res.went_backwards;
        if (v != res.last) ++res.distinct;
        if (v > pub.version()) ++res.version_mismatch; // never ahead of the counter
        if (!is_whole_generation(*s, gen_text)) ++res.torn;
        res.last = std::max(res.last, v);
        if (v > newest_seen.load(std::memory_order_relaxed)) newest_seen.store(v, std::memory_order_relaxed);
        if (i % 64 == 0) {
          held = s;
          std::this_thread::yield(); // more readers than cores: let the writer run
        }
        if (held && !is_whole_generation(*held, gen_text)) ++res.torn;
        if (done && v == versions) break;
      }
    });
  }
  while (readers_started.load() < readers) std::this_thread::yield();
  std::uint64_t published = 0;
  for (auto& s : sets) {
    auto out = pub.publish(std::move(s));
    if (out.published) ++published;
    // Give readers a moment to meet each version, so they interleave with the writer
    // instead of only seeing the first and the last.
    auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(200);
    while (newest_seen.load(std::memory_order_relaxed) < out.version && std::chrono::steady_clock::now() < until)
      std::this_thread::yield();
  }
  writer_done.store(true, std::memory_order_release);
  for (auto& t : threads) t.join();

  CHECK(published == versions);
  CHECK(pub.version() == versions);
  for (const auto& res : results) {
    CHECK(res.went_backwards == 0);
    CHECK(res.torn == 0);
    CHECK(res.version_mismatch == 0);
    CHECK(res.last == versions); // every reader caught up with the final version
    CHECK(res.distinct >= 1);
  }
}
