// The Picker contract, checked for every policy in dynup::policy_names: a policy added
// later is covered without touching this file.
#include <dynup/balance/policy.hpp>

#include "support/allocations.hpp"
#include "support/picking.hpp"
#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <new>
#include <set>
#include <string>
#include <thread>
#include <vector>

// Replacement global allocation functions, for the whole unit-test binary: they count
// allocations made by a thread while its AllocationCount is alive. Every form is
// replaced, so each new pairs with our delete (malloc/free underneath) — under ASan and
// TSan too, which intercept malloc/free and so still see every block.
namespace {
thread_local bool counting = false;
thread_local std::size_t counted = 0;

void* allocate(std::size_t n) noexcept {
  if (counting) ++counted;
  return std::malloc(n == 0 ? 1 : n);
}
void* allocate(std::size_t n, std::align_val_t align) noexcept {
  if (counting) ++counted;
  void* p = nullptr;
  std::size_t a = std::max(static_cast<std::size_t>(align), sizeof(void*));
  return posix_memalign(&p, a, n == 0 ? 1 : n) == 0 ? p : nullptr;
}
void* or_throw(void* p) {
  if (p == nullptr) throw std::bad_alloc();
  return p;
}
// Out of line: inlined into this file's delete expressions, free() would meet pointers
// from operator new and trip -Wmismatched-new-delete.
[[gnu::noinline]] void deallocate(void* p) noexcept { std::free(p); }
} // namespace

void* operator new(std::size_t n) { return or_throw(allocate(n)); }
void* operator new[](std::size_t n) { return or_throw(allocate(n)); }
void* operator new(std::size_t n, const std::nothrow_t&) noexcept { return allocate(n); }
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept { return allocate(n); }
void* operator new(std::size_t n, std::align_val_t a) { return or_throw(allocate(n, a)); }
void* operator new[](std::size_t n, std::align_val_t a) { return or_throw(allocate(n, a)); }
void* operator new(std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept { return allocate(n, a); }
void* operator new[](std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept { return allocate(n, a); }
void operator delete(void* p) noexcept { deallocate(p); }
void operator delete[](void* p) noexcept { deallocate(p); }
void operator delete(void* p, std::size_t) noexcept { deallocate(p); }
void operator delete[](void* p, std::size_t) noexcept { deallocate(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { deallocate(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { deallocate(p); }
void operator delete(void* p, std::align_val_t) noexcept { deallocate(p); }
void operator delete[](void* p, std::align_val_t) noexcept { deallocate(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { deallocate(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { deallocate(p); }
void operator delete(void* p, std::align_val_t, const std::nothrow_t&) noexcept { deallocate(p); }
void operator delete[](void* p, std::align_val_t, const std::nothrow_t&) noexcept { deallocate(p); }

namespace dynup_test {
AllocationCount::AllocationCount() {
  counted = 0;
  counting = true;
}
AllocationCount::~AllocationCount() { counting = false; }
std::size_t AllocationCount::value() const { return counted; }
} // namespace dynup_test

namespace {

using dynup::HealthView;
using dynup::Outcome;
using dynup::PeerSet;
using dynup::PickContext;
using dynup::PickError;
using dynup::Picker;
using dynup::Selection;
using dynup::Snapshot;
using dynup::TriedPeers;

using dynup_test::all_but;
using dynup_test::make;
using dynup_test::numbered_peers;
using dynup_test::select_index;
using dynup_test::snapshot;

const char* const keys[] = {"", "user-42"};

// Keeps test allocations observable: a compiler may drop a new/delete pair it can see.
std::unique_ptr<int> sink;

TEST_CASE("the allocation counter sees plain and over-aligned operator new") {
  dynup_test::AllocationCount count;
  sink = std::make_unique<int>(7);
  auto stats = std::make_shared<dynup::PeerStats>(); // alignas(64): aligned new
  CHECK(count.value() == 2);
  CHECK(stats->in_flight.load() == 0);
}

TEST_CASE("every policy picks, starts and finishes without allocating, on retries and with a hash key") {
  for (const char* name : dynup::policy_names) {
    std::string policy_name = name;
    CAPTURE(policy_name);
    auto policy = make(name);
    // 90 primaries of weights 1..5 and 10 backups; retries of 10, 64 (the inline
    // capacity) and all 90 primaries (spilled to the heap before the count starts).
    auto peers = numbered_peers(100, [](std::size_t i) { return 1 + i % 5; });
    for (std::size_t i = 90; i < 100; ++i) peers[i].backup = true;
    Snapshot set = snapshot(std::move(peers));
    auto picker = policy->build(set);
    TriedPeers tried10, tried64, tried_primaries;
    for (std::size_t i = 0; i < set->size(); ++i) {
      std::uint64_t h = dynup::peer_id_hash((*set)[i].id);
      if (i < 10) tried10.add(h);
      if (i < 64) tried64.add(h);
      if (!(*set)[i].backup) tried_primaries.add(h);
    }
    const PickContext contexts[] = {
        {"", nullptr},      {"user-42", nullptr},   {"", &tried10},  {"", &tried64},
        {"user-42", &tried64}, {"", &tried_primaries}, {"user-42", &tried_primaries},
    };

    // On a fresh thread, so first-use initialization of per-thread state is counted too.
    std::size_t allocations = 0, failures = 0, violations = 0;
    std::thread worker([&] {
      dynup_test::AllocationCount count;
      for (int round = 0; round < 500; ++round) {
        for (const PickContext& ctx : contexts) {
          Selection s = picker->pick(ctx);
          if (!s) {
            ++failures;
            continue;
          }
          if (ctx.tried != nullptr && ctx.tried->contains(s.id_hash)) ++violations;
          picker->on_start(s);
          picker->on_finish(s, Outcome{std::chrono::milliseconds(1 + round % 7), 200, false});
        }
      }
      allocations = count.value();
    });
    worker.join();
    CHECK(allocations == 0);
    CHECK(failures == 0);
    CHECK(violations == 0);
  }
}

TEST_CASE("every policy skips tried peers on retries and reports all_tried when none is left") {
  for (const char* name : dynup::policy_names) {
    std::string policy_name = name;
    CAPTURE(policy_name);
    auto policy = make(name);
    Snapshot set = snapshot(numbered_peers(7, [](std::size_t i) { return 1 + i; }));
    auto picker = policy->build(set);
    for (const char* key : keys) {
      CAPTURE(key);
      for (int round = 0; round < 20; ++round) {
        TriedPeers tried;
        PickContext ctx{key, &tried};
        for (std::size_t k = 0; k < set->size(); ++k) {
          Selection s = picker->pick(ctx);
          REQUIRE(s);
          CHECK(s.error == PickError::none);
          CHECK(s.peer == &(*set)[s.index]);
          CHECK(s.id_hash == dynup::peer_id_hash(s.peer->id));
          CHECK_FALSE(tried.contains(s.id_hash));
          tried.add(s.id_hash);
        }
        Selection last = picker->pick(ctx);
        CHECK_FALSE(last);
        CHECK(last.peer == nullptr);
        CHECK(last.error == PickError::all_tried);
      }
    }
  }
}

TEST_CASE("every policy never picks an unavailable peer and reports all_unavailable") {
  for (const char* name : dynup::policy_names) {
    std::string policy_name = name;
    CAPTURE(policy_name);
    auto policy = make(name);
    auto peers = numbered_peers(6, [](std::size_t i) { return 1 + i; });
    peers[2].health = dynup::Health::critical; // registry says down
    Snapshot set = snapshot(std::move(peers));
    std::size_t critical = dynup_test::index_of(*set, "10.0.0.3:80");
    HealthView health = HealthView::from_registry(*set);
    health.peers[0].available = false; // ejected by the health layer
    health.peers[4].available = false;
    auto picker = policy->build(set, health);
    for (int i = 0; i < 600; ++i) {
      std::string key = i % 2 ? "" : "key-" + std::to_string(i);
      Selection s = picker->pick(PickContext{key, nullptr});
      REQUIRE(s);
      CHECK(s.index != 0);
      CHECK(s.index != 4);
      CHECK(s.index != critical);
    }
    // Everything available tried: the reason is all_tried, not all_unavailable.
    TriedPeers tried;
    for (std::size_t i = 0; i < set->size(); ++i)
      if (health.peers[i].available && i != critical) tried.add(dynup::peer_id_hash((*set)[i].id));
    CHECK(picker->pick(PickContext{"", &tried}).error == PickError::all_tried);

    for (auto& c : health.peers) c.available = false;
    auto down = policy->build(set, health);
    for (const char* key : keys) {
      Selection s = down->pick(PickContext{key, nullptr});
      CHECK_FALSE(s);
      CHECK(s.error == PickError::all_unavailable);
    }
  }
}

TEST_CASE("every policy reports no_peers for an empty set") {
  for (const char* name : dynup::policy_names) {
    std::string policy_name = name;
    CAPTURE(policy_name);
    auto policy = make(name);
    auto picker = policy->build(std::make_shared<const PeerSet>());
    for (const char* key : keys) {
      Selection s = picker->pick(PickContext{key, nullptr});
      CHECK_FALSE(s);
      CHECK(s.error == PickError::no_peers);
    }
  }
}

TEST_CASE("every policy uses backup peers only when no primary is usable") {
  for (const char* name : dynup::policy_names) {
    std::string policy_name = name;
    CAPTURE(policy_name);
    auto policy = make(name);
    auto peers = numbered_peers(5, [](std::size_t i) { return 1 + 2 * i; });
    peers[3].backup = true; // the heaviest two: weight must not pull traffic to them
    peers[4].backup = true;
    Snapshot set = snapshot(std::move(peers));
    auto is_backup = [&](const Selection& s) { return s.peer != nullptr && s.peer->backup; };
    TriedPeers primaries, everyone;
    for (const auto& p : *set) {
      if (!p.backup) primaries.add(dynup::peer_id_hash(p.id));
      everyone.add(dynup::peer_id_hash(p.id));
    }

    auto picker = policy->build(set);
    for (int i = 0; i < 500; ++i) {
      std::string key = i % 2 ? "" : "key-" + std::to_string(i);
      Selection s = picker->pick(PickContext{key, nullptr});
      REQUIRE(s);
      CHECK_FALSE(is_backup(s));
    }
    // Every primary tried: a backup serves the retry.
    for (int i = 0; i < 50; ++i) {
      std::string key = "key-" + std::to_string(i);
      CHECK(is_backup(picker->pick(PickContext{key, &primaries})));
    }
    CHECK(picker->pick(PickContext{"", &everyone}).error == PickError::all_tried);

    // Every primary down: only backups.
    HealthView health = HealthView::from_registry(*set);
    for (std::size_t i = 0; i < set->size(); ++i)
      if (!(*set)[i].backup) health.peers[i].available = false;
    auto degraded = policy->build(set, health);
    for (int i = 0; i < 200; ++i) {
      std::string key = i % 2 ? "" : "key-" + std::to_string(i);
      CHECK(is_backup(degraded->pick(PickContext{key, nullptr})));
    }
    // A tried backup is skipped in favour of the other; both tried: all_tried.
    TriedPeers one_backup;
    std::uint64_t first = dynup::peer_id_hash((*set)[3].id);
    one_backup.add(first);
    for (int i = 0; i < 50; ++i) {
      Selection s = degraded->pick(PickContext{"", &one_backup});
      REQUIRE(s);
      CHECK(s.index == 4);
    }
    CHECK(degraded->pick(PickContext{"", &everyone}).error == PickError::all_tried);
  }
}

TEST_CASE("every policy keeps a staying peer's stats across a rebuild and starts a re-added peer fresh") {
  for (const char* name : dynup::policy_names) {
    std::string policy_name = name;
    CAPTURE(policy_name);
    auto policy = make(name);
    auto abc = numbered_peers(3); // ids 10.0.0.1:80 .. 10.0.0.3:80, at indices 0..2
    auto first = policy->build(snapshot(abc));
    Selection a = select_index(*first, 0);
    Selection c = select_index(*first, 2);
    first->on_start(a);
    first->on_start(c);
    first->on_start(c);

    auto second = policy->build(snapshot({abc[0], abc[1]})); // c removed
    Selection a2 = select_index(*second, 0);
    CHECK(a2.stats == a.stats);
    CHECK(a2.stats->in_flight.load() == 1);

    auto third = policy->build(snapshot(abc)); // c back
    Selection a3 = select_index(*third, 0);
    Selection c3 = select_index(*third, 2);
    CHECK(a3.stats->in_flight.load() == 1);
    CHECK(c3.stats != c.stats);
    CHECK(c3.stats->in_flight.load() == 0);

    // Requests picked from an old picker end on the stats they started on.
    first->on_finish(c, Outcome{});
    first->on_finish(c, Outcome{});
    CHECK(c.stats->in_flight.load() == 0);
    CHECK(c3.stats->in_flight.load() == 0);
    third->on_finish(a3, Outcome{});
    CHECK(a.stats->in_flight.load() == 0);
  }
}

TEST_CASE("an unknown policy name is an error listing every valid name") {
  auto p = dynup::make_policy("no_such_policy");
  REQUIRE_FALSE(p);
  CHECK(p.error().code() == dynup::Errc::invalid_argument);
  CHECK(p.error().message().find("no_such_policy") != std::string::npos);
  for (const char* name : dynup::policy_names) {
    CAPTURE(name);
    CHECK(p.error().message().find(name) != std::string::npos);
  }
}

TEST_CASE("every policy rejects an unknown option, listing its valid ones, and accepts defaults") {
  for (const char* name : dynup::policy_names) {
    std::string policy_name = name;
    CAPTURE(policy_name);
    auto p = dynup::make_policy(name, nlohmann::json{{"no_such_option", 1}});
    REQUIRE_FALSE(p);
    CHECK(p.error().code() == dynup::Errc::invalid_argument);
    const std::string& msg = p.error().message();
    CHECK(msg.find(policy_name) != std::string::npos);
    CHECK(msg.find("\"no_such_option\"") != std::string::npos);
    CHECK(msg.find("(valid: ") != std::string::npos);

    CHECK_FALSE(dynup::make_policy(name, nlohmann::json::array({1})));
    auto defaults = dynup::make_policy(name, nlohmann::json::object());
    REQUIRE(defaults);
    CHECK(std::string(defaults.value()->name()) == policy_name);
  }
}

TEST_CASE("every policy serves concurrent picks and reports while it is rebuilt") {
  for (const char* name : dynup::policy_names) {
    std::string policy_name = name;
    CAPTURE(policy_name);
    auto policy = make(name);
    auto peers = numbered_peers(8, [](std::size_t i) { return 1 + i % 3; });
    peers[7].backup = true;
    auto full = snapshot(peers);
    auto fewer = snapshot({peers[0], peers[1], peers[2], peers[5], peers[7]});

    std::mutex mu; // guards `current` only; the pickers themselves are shared lock-free
    std::shared_ptr<const Picker> current = policy->build(full);
    std::atomic<bool> failed{false};
    constexpr int threads = 3, iterations = 20000;
    std::vector<std::thread> workers;
    for (int t = 0; t < threads; ++t) {
      workers.emplace_back([&, t] {
        std::shared_ptr<const Picker> picker;
        TriedPeers tried;
        tried.add(dynup::peer_id_hash(peers[0].id));
        for (int i = 0; i < iterations; ++i) {
          if (i % 256 == 0) {
            std::lock_guard<std::mutex> lock(mu);
            picker = current;
          }
          PickContext ctx{i % 3 == 0 ? "user-" : "", i % 5 == 0 ? &tried : nullptr};
          Selection s = picker->pick(ctx);
          if (!s) {
            failed = true;
            continue;
          }
          picker->on_start(s);
          picker->on_finish(s, Outcome{std::chrono::microseconds(100 + (i * 7 + t) % 900), 200, false});
        }
      });
    }
    for (int r = 0; r < 40; ++r) {
      auto next = policy->build(r % 2 ? full : fewer);
      {
        std::lock_guard<std::mutex> lock(mu);
        current = std::move(next);
      }
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
    for (auto& w : workers) w.join();
    CHECK_FALSE(failed.load());
    auto last = policy->build(full);
    for (std::size_t i = 0; i < full->size(); ++i) CHECK(select_index(*last, i).stats->in_flight.load() == 0);
  }
}

} // namespace

TEST_CASE("hash policies pick by weight when the request has no key") {
  for (const char* name : {"ring_hash", "maglev"}) {
    CAPTURE(name);
    auto picker = make(name)->build(snapshot({dynup_test::peer("10.0.0.1", 80, 1), dynup_test::peer("10.0.0.2", 80, 3)}));
    int heavy = 0;
    constexpr int picks = 40000;
    for (int i = 0; i < picks; ++i) heavy += picker->pick(PickContext{}).peer->weight == 3;
    // Binomial(40000, 0.75): standard deviation 87 picks; ±1 000 is more than 11 of them.
    CHECK(heavy > 29000);
    CHECK(heavy < 31000);
  }
}
