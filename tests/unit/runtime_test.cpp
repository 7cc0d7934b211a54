#include <dynup/runtime/runtime.hpp>

#include <doctest/doctest.h>

#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

using namespace std::chrono_literals;

namespace {

// Waits (bounded) until `pred` holds; the tests' events come from the loop's thread.
template <class P> bool eventually(P pred, std::chrono::milliseconds limit = 10s) {
  auto until = std::chrono::steady_clock::now() + limit;
  while (!pred()) {
    if (std::chrono::steady_clock::now() > until) return false;
    std::this_thread::sleep_for(1ms);
  }
  return true;
}

} // namespace

TEST_CASE("loop: posted tasks run on the loop's thread in the order posted") {
  dynup::rt::Loop loop;
  std::vector<int> seen;
  std::vector<bool> on_loop;
  for (int i = 0; i < 100; ++i)
    loop.post([&, i] {
      seen.push_back(i);
      on_loop.push_back(loop.in_loop());
    });
  loop.run_sync([] {});
  REQUIRE(seen.size() == 100);
  for (int i = 0; i < 100; ++i) CHECK(seen[static_cast<std::size_t>(i)] == i);
  for (bool b : on_loop) CHECK(b);
  CHECK_FALSE(loop.in_loop());
}

TEST_CASE("loop: timers run in deadline order, and a cancelled one never runs") {
  dynup::rt::Loop loop;
  std::mutex mu;
  std::vector<int> fired;
  auto record = [&](int v) {
    return [&, v] {
      std::lock_guard<std::mutex> lock(mu);
      fired.push_back(v);
    };
  };
  auto now = dynup::rt::steady::now();
  loop.at(now + 30ms, record(3));
  loop.at(now + 10ms, record(1));
  auto doomed = loop.at(now + 20ms, record(99));
  loop.at(now + 20ms, record(2));
  CHECK(loop.cancel(doomed));
  CHECK_FALSE(loop.cancel(doomed));
  REQUIRE(eventually([&] {
    std::lock_guard<std::mutex> lock(mu);
    return fired.size() == 3;
  }));
  std::this_thread::sleep_for(30ms);
  std::lock_guard<std::mutex> lock(mu);
  CHECK(fired == std::vector<int>{1, 2, 3});
}

TEST_CASE("loop: a timer cancelled on the loop's thread by an earlier callback does not run") {
  dynup::rt::Loop loop;
  std::atomic<int> ran{0};
  dynup::rt::TimerId second = 0;
  auto when = dynup::rt::steady::now() + 5ms;
  loop.run_sync([&] {
    loop.at(when, [&] { loop.cancel(second); });
    second = loop.at(when, [&] { ran.fetch_add(1); });
  });
  std::this_thread::sleep_for(50ms);
  loop.run_sync([] {});
  CHECK(ran.load() == 0);
}

TEST_CASE("loop: a descriptor's callback runs when it becomes readable, and not after unwatch") {
  dynup::rt::Loop loop;
  int fds[2];
  REQUIRE(::pipe2(fds, O_CLOEXEC | O_NONBLOCK) == 0);
  std::atomic<int> reads{0};
  loop.run_sync([&] {
    auto ok = loop.watch(fds[0], EPOLLIN, [&](std::uint32_t ev) {
      char buf[16];
      while (::read(fds[0], buf, sizeof buf) > 0) {
      }
      if (ev & EPOLLIN) reads.fetch_add(1);
    });
    REQUIRE(ok);
  });
  REQUIRE(::write(fds[1], "x", 1) == 1);
  REQUIRE(eventually([&] { return reads.load() == 1; }));
  loop.run_sync([&] { loop.unwatch(fds[0]); });
  REQUIRE(::write(fds[1], "y", 1) == 1);
  std::this_thread::sleep_for(30ms);
  loop.run_sync([] {});
  CHECK(reads.load() == 1);
  ::close(fds[0]);
  ::close(fds[1]);
}

TEST_CASE("loop: a throwing callback is counted and the loop keeps running") {
  dynup::rt::Loop loop;
  loop.post([] { throw std::runtime_error("boom"); });
  std::atomic<bool> after{false};
  loop.post([&] { after = true; });
  loop.run_sync([] {});
  CHECK(after.load());
  CHECK(loop.errors() == 1);
  CHECK_THROWS_AS(loop.run_sync([] { throw std::logic_error("to the caller"); }), std::logic_error);
}

TEST_CASE("runtime: one per process while held, and its threads end with the last holder") {
  auto a = dynup::rt::Runtime::acquire();
  REQUIRE(a);
  auto b = dynup::rt::Runtime::acquire();
  REQUIRE(b);
  CHECK(a->get() == b->get());
  std::thread::id loop_thread = (*a)->loop().thread_id();
  REQUIRE(eventually([&] {
    loop_thread = (*a)->loop().thread_id();
    return loop_thread != std::thread::id();
  }));

  struct Counter {
    explicit Counter(dynup::rt::Runtime&) { ++made(); }
    static int& made() {
      static int n = 0;
      return n;
    }
  };
  int before = Counter::made();
  (*a)->service<Counter>();
  (*b)->service<Counter>();
  CHECK(Counter::made() == before + 1);

  std::weak_ptr<dynup::rt::Runtime> weak = *a;
  a = dynup::Error(dynup::Errc::canceled, "released");
  b = dynup::Error(dynup::Errc::canceled, "released");
  CHECK(weak.expired());
  auto c = dynup::rt::Runtime::acquire();
  REQUIRE(c);
  CHECK(Counter::made() == before + 1); // the new runtime has not made one yet
}

TEST_CASE("runtime: the worker runs tasks in order off the loop") {
  auto rt = dynup::rt::Runtime::acquire();
  REQUIRE(rt);
  std::vector<int> order;
  bool on_loop = true;
  for (int i = 0; i < 10; ++i) (*rt)->worker().post([&, i] {
      order.push_back(i);
      on_loop = on_loop && (*rt)->loop().in_loop();
    });
  (*rt)->worker().run_sync([] {});
  REQUIRE(order.size() == 10);
  for (int i = 0; i < 10; ++i) CHECK(order[static_cast<std::size_t>(i)] == i);
  CHECK_FALSE(on_loop);
}
