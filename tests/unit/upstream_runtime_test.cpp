// Upstreams on the process runtime: however many upstreams and shared members a process
// runs, its dynup threads are the runtime's; rebuilds, due health changes and a
// follower's reads of the region still happen, and none of them outlives stop().
#include <dynup/detail/task_gate.hpp>
#include <dynup/peer_json.hpp>
#include <dynup/upstream.hpp>

#include <support/threads.hpp>
#include <support/temp_dir.hpp>
#include <support/wait.hpp>

#include <doctest/doctest.h>
#include <nlohmann/json.hpp>

#include <dirent.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

using dynup::ManualClock;
using dynup::Upstream;
using dynup_test::TempDir;
using dynup_test::wait_until;
using dynup_test::write_by_rename;
using nlohmann::json;
using namespace std::chrono_literals;

namespace {


// Threads in `now` that `before` did not have.
std::set<long> new_threads(const std::set<long>& before, const std::set<long>& now) {
  std::set<long> out;
  std::set_difference(now.begin(), now.end(), before.begin(), before.end(), std::inserter(out, out.end()));
  return out;
}

dynup::PeerSet peers(const std::vector<std::string>& ids) {
  json list = json::array();
  for (const auto& id : ids) {
    auto colon = id.rfind(':');
    list.push_back({{"host", id.substr(0, colon)}, {"port", std::stoi(id.substr(colon + 1))}});
  }
  auto set = dynup::parse_peer_set(json{{"peers", list}}.dump());
  REQUIRE_MESSAGE(set.ok(), set.error().message());
  return std::move(set).value();
}

std::unique_ptr<Upstream> start(const json& config, const dynup::Clock& clock = dynup::steady_clock()) {
  auto up = Upstream::start(config, clock);
  REQUIRE_MESSAGE(up.ok(), up.error().message());
  return std::move(up).value();
}

json push_config(int i, json health = json::object()) {
  return json{{"name", "api" + std::to_string(i)}, {"source", "push://"}, {"health", health}};
}

// Whether peer `id` is available in `up`'s current routing table (status() reads it).
bool available(const Upstream& up, const std::string& id) {
  auto st = up.status();
  for (const auto& p : st["peers"])
    if (p["id"] == id) return p["available"].get<bool>();
  return false;
}

// The ids `up` routes to, from its current routing table.
std::vector<std::string> routed(const Upstream& up) {
  auto st = up.status();
  std::vector<std::string> out;
  for (const auto& p : st["peers"]) out.push_back(p["id"].get<std::string>());
  return out;
}

// Reports a connect failure on `id` (picking until it comes up).
void fail(Upstream& up, const std::string& id) {
  for (int tries = 0; tries < 1000; ++tries) {
    auto s = up.pick();
    REQUIRE(s);
    if (s.peer->id == id) {
      up.report(s, {0ms, 0, true});
      return;
    }
    up.report(s, {1ms, 200, false});
  }
  FAIL("never picked " << id);
}

// A health clock that counts the reads made after the test declared its upstream gone.
class WatchedClock final : public dynup::Clock {
public:
  time_point now() const noexcept override {
    if (gone.load()) reads_after.fetch_add(1);
    return std::chrono::steady_clock::now();
  }
  mutable std::atomic<bool> gone{false};
  mutable std::atomic<int> reads_after{0};
};

} // namespace

TEST_CASE("runtime: 200 upstreams in one process run the runtime's threads and no more than one does") {
  // A sanitizer starts a thread of its own with the process's first other thread: let
  // that happen before counting.
  std::thread([] {}).join();
  const auto before = dynup_test::thread_ids();
  std::vector<std::unique_ptr<Upstream>> ups;
  ups.push_back(start(push_config(0)));
  const auto with_one = dynup_test::thread_ids();
  CHECK(new_threads(before, with_one).size() <= static_cast<std::size_t>(dynup::rt::Runtime::threads));
  for (int i = 1; i < 200; ++i) ups.push_back(start(push_config(i)));
  for (auto& up : ups) REQUIRE(up->push(peers({"10.0.0.1:80"})).ok()); // rebuilds and posts work
  const auto with_200 = dynup_test::thread_ids();
  MESSAGE("threads: " << before.size() << " before, " << with_one.size() << " with 1 upstream, " << with_200.size()
                      << " with 200");
  CHECK(new_threads(with_one, with_200).empty());
  CHECK(with_200.size() <= with_one.size());
}

TEST_CASE("runtime: each of 200 upstreams rebuilds on a set change, a health change and a due health change") {
  ManualClock clock;
  const json passive = {{"passive", {{"max_fails", 1}, {"fail_timeout_ms", 300}}}};
  std::vector<std::unique_ptr<Upstream>> ups;
  for (int i = 0; i < 200; ++i) ups.push_back(start(push_config(i, passive), clock));
  const auto with_200 = dynup_test::thread_ids();

  for (auto& up : ups) REQUIRE(up->push(peers({"10.0.0.1:80", "10.0.0.2:80"})).ok());
  for (auto& up : ups) CHECK(routed(*up) == std::vector<std::string>{"10.0.0.1:80", "10.0.0.2:80"});

  // A failure changes health: the runtime's worker rebuilds each upstream by itself.
  for (auto& up : ups) fail(*up, "10.0.0.1:80");
  for (auto& up : ups) CHECK(wait_until([&] { return !available(*up, "10.0.0.1:80"); }, 10000ms));
  std::vector<std::uint64_t> built;
  for (auto& up : ups) built.push_back(up->status()["tables_built"].get<std::uint64_t>());

  // fail_timeout passes on the health clock; nothing else happens, nobody calls
  // refresh(): the due timer (waiting 300 ms in real time) has each one rebuilt.
  clock.advance(301ms);
  for (auto& up : ups) CHECK(wait_until([&] { return available(*up, "10.0.0.1:80"); }, 10000ms));
  for (std::size_t i = 0; i < ups.size(); ++i) CHECK(ups[i]->status()["tables_built"].get<std::uint64_t>() > built[i]);
  CHECK(new_threads(with_200, dynup_test::thread_ids()).empty());
}

TEST_CASE("runtime: shared members following one region in one process run no thread of their own and follow it") {
  // The leader watches a file (push:// cannot be shared); the followers watch nothing.
  TempDir dir;
  const std::string file = dir.file("peers.json");
  auto write_peers = [&](const std::vector<std::string>& ids) { write_by_rename(file, dynup::to_json(peers(ids))); };
  write_peers({"10.0.0.1:80"});
  const json shared = {{"dir", dir.path()}, {"retry_ms", 50}, {"poll_ms", 20}};
  const json config = {{"name", "api"}, {"source", "file://" + file}, {"shared", shared}};
  auto leader = start(config);
  REQUIRE(leader->status()["shared"]["role"] == "leader");
  const auto with_leader = dynup_test::thread_ids();

  std::vector<std::unique_ptr<Upstream>> followers;
  for (int i = 0; i < 16; ++i) followers.push_back(start(config));
  for (auto& f : followers) {
    CHECK(f->status()["shared"]["role"] == "follower");
    CHECK(routed(*f) == std::vector<std::string>{"10.0.0.1:80"}); // adopted in start()
  }
  CHECK(new_threads(with_leader, dynup_test::thread_ids()).empty());

  // A new set reaches every follower without a pick (the poll timer) and is rebuilt
  // there (the adopt posts a rebuild to the worker).
  write_peers({"10.0.0.2:80"});
  for (auto& f : followers)
    CHECK(wait_until([&] { return routed(*f) == std::vector<std::string>{"10.0.0.2:80"}; }, 10000ms));
  // And with picks (notice() posts one read per version).
  write_peers({"10.0.0.3:80"});
  for (auto& f : followers)
    CHECK(wait_until(
        [&] {
          auto s = f->pick();
          const bool moved = s && s.peer->id == "10.0.0.3:80";
          if (s) f->report(s, {1ms, 200, false});
          return moved;
        },
        10000ms));
  CHECK(new_threads(with_leader, dynup_test::thread_ids()).empty());

  // The leader goes: one follower takes the lock on its timer and leads (its watcher
  // starts on the worker). The file watcher's own thread moves to it (watchers are not
  // on the runtime yet); the member adds none.
  leader.reset();
  CHECK(wait_until(
      [&] {
        return std::any_of(followers.begin(), followers.end(),
                           [](const auto& f) { return f->status()["shared"]["role"] == "leader"; });
      },
      10000ms));
  auto now_leading = std::find_if(followers.begin(), followers.end(),
                                  [](const auto& f) { return f->status()["shared"]["role"] == "leader"; });
  REQUIRE(now_leading != followers.end());
  CHECK(wait_until([&] { return !(*now_leading)->watcher_status().source.empty(); }, 10000ms));
  write_peers({"10.0.0.4:80"});
  for (auto& f : followers)
    CHECK(wait_until([&] { return routed(*f) == std::vector<std::string>{"10.0.0.4:80"}; }, 10000ms));
  CHECK(dynup_test::thread_ids().size() <= with_leader.size());
}

TEST_CASE("runtime: no rebuild or timer of an upstream runs after it is destroyed") {
  // Each upstream is destroyed with a rebuild queued (a failure just reported) and a due
  // timer 1 ms away; a task running later would read the health clock.
  WatchedClock clock;
  const json passive = {{"passive", {{"max_fails", 1}, {"fail_timeout_ms", 1}}}};
  for (int round = 0; round < 50; ++round) {
    auto up = start(push_config(round, passive), clock);
    REQUIRE(up->push(peers({"10.0.0.1:80", "10.0.0.2:80"})).ok());
    fail(*up, "10.0.0.1:80");
    if (round % 2 == 1) up->stop(); // stop() then the destructor, or the destructor alone
    up.reset();
    clock.gone = true;
    std::this_thread::sleep_for(2ms);
    clock.gone = false;
  }
  CHECK(clock.reads_after == 0);
}

TEST_CASE("task gate: bodies run while open; close() waits for one running elsewhere, not for its own") {
  dynup::detail::TaskGate gate;
  int ran = 0;
  CHECK(gate.enter([&] { ++ran; }));

  // close() from inside a body (a callback stopping its own object) returns at once.
  dynup::detail::TaskGate inner;
  CHECK(inner.enter([&] {
    inner.close();
    ++ran;
  }));
  CHECK_FALSE(inner.enter([&] { ++ran; }));
  CHECK(ran == 2);

  // close() on another thread waits until the running body leaves.
  std::atomic<bool> entered{false};
  std::atomic<bool> release{false};
  std::atomic<bool> left{false};
  std::thread body([&] {
    gate.enter([&] {
      entered = true;
      while (!release) std::this_thread::sleep_for(1ms);
      left = true;
    });
  });
  REQUIRE(wait_until([&] { return entered.load(); }));
  std::atomic<bool> closed{false};
  std::thread closer([&] {
    gate.close();
    closed = true;
  });
  CHECK(dynup_test::stays_true_for([&] { return !closed; }, 50ms));
  release = true;
  closer.join();
  body.join();
  CHECK(left);
  CHECK(closed);
  CHECK_FALSE(gate.enter([&] { ++ran; }));
  CHECK(ran == 2);
}
