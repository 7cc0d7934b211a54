#include <dynup/runtime/inotify.hpp>

#include <support/temp_dir.hpp>
#include <support/wait.hpp>

#include <doctest/doctest.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <fstream>
#include <future>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

namespace {

using dynup::rt::DirEvent;
using dynup::rt::Inotify;
using dynup_test::TempDir;
using dynup_test::wait_until;
using namespace std::chrono_literals;

// What one subscriber heard, readable from the test thread.
class Heard {
public:
  Inotify::Callback callback() {
    return [this](const DirEvent& e) {
      std::lock_guard<std::mutex> lock(mu_);
      events_.emplace_back(e.mask, std::string(e.name));
    };
  }
  bool saw(std::uint32_t bit, const std::string& name = "") const {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& e : events_)
      if ((e.first & bit) && (name.empty() || e.second == name)) return true;
    return false;
  }
  std::size_t count() const {
    std::lock_guard<std::mutex> lock(mu_);
    return events_.size();
  }

private:
  mutable std::mutex mu_;
  std::vector<std::pair<std::uint32_t, std::string>> events_;
};

struct Fixture {
  std::shared_ptr<dynup::rt::Runtime> rt;
  Inotify* inotify = nullptr;
  Fixture() {
    auto r = dynup::rt::Runtime::acquire();
    REQUIRE(r);
    rt = *r;
    inotify = &rt->service<Inotify>();
  }
  template <class F> auto on_loop(F f) {
    std::optional<decltype(f())> out;
    rt->loop().run_sync([&] { out.emplace(f()); });
    return std::move(*out);
  }
  Inotify::SubscriptionId subscribe(const std::string& dir, Heard& h) {
    auto id = on_loop([&] { return inotify->subscribe(dir, h.callback()); });
    REQUIRE(id);
    return *id;
  }
  void unsubscribe(Inotify::SubscriptionId id) {
    rt->loop().run_sync([&] { inotify->unsubscribe(id); });
  }
  std::size_t watches() { return on_loop([&] { return inotify->watches(); }); }
  std::size_t subscriptions() { return on_loop([&] { return inotify->subscriptions(); }); }
};

void touch(const std::string& path) { dynup_test::write_in_place(path, "x"); }

} // namespace

TEST_CASE("inotify: one close-on-exec, non-blocking descriptor, opened by the first subscriber") {
  TempDir dir;
  Fixture f;
  Heard h;
  f.subscribe(dir.path(), h);
  int fd = f.on_loop([&] { return f.inotify->fd(); });
  REQUIRE(fd >= 0);
  CHECK((::fcntl(fd, F_GETFD) & FD_CLOEXEC) != 0);
  CHECK((::fcntl(fd, F_GETFL) & O_NONBLOCK) != 0);
}

TEST_CASE("inotify: subscribers of one directory share one watch, which goes with the last of them") {
  TempDir dir;
  Fixture f;
  Heard a, b;
  auto ida = f.subscribe(dir.path(), a);
  auto idb = f.subscribe(dir.path() + "/.", b); // another spelling of the same directory
  CHECK(f.watches() == 1);
  CHECK(f.subscriptions() == 2);

  touch(dir.file("one"));
  REQUIRE(wait_until([&] { return a.saw(IN_CLOSE_WRITE, "one") && b.saw(IN_CLOSE_WRITE, "one"); }));

  f.unsubscribe(ida);
  f.unsubscribe(ida); // an ended id does nothing
  CHECK(f.watches() == 1);
  std::size_t a_before = a.count();
  touch(dir.file("two"));
  REQUIRE(wait_until([&] { return b.saw(IN_CLOSE_WRITE, "two"); }));
  CHECK(a.count() == a_before);

  f.unsubscribe(idb);
  CHECK(f.watches() == 0);
  CHECK(f.subscriptions() == 0);
}

TEST_CASE("inotify: an event about an entry reaches its subscribers and the directory's, not the others'") {
  TempDir dir;
  Fixture f;
  Heard one, two, every;
  auto sub = [&](const std::string& name, Heard& h) {
    auto id = f.on_loop([&] { return f.inotify->subscribe(dir.path(), name, h.callback()); });
    REQUIRE(id);
    return *id;
  };
  sub("one", one);
  auto id_two = sub("two", two);
  sub("", every);
  CHECK(f.watches() == 1);

  touch(dir.file("one"));
  REQUIRE(wait_until([&] { return one.saw(IN_CLOSE_WRITE, "one") && every.saw(IN_CLOSE_WRITE, "one"); }));
  touch(dir.file("three"));
  REQUIRE(wait_until([&] { return every.saw(IN_CLOSE_WRITE, "three"); }));
  CHECK(two.count() == 0);
  CHECK_FALSE(one.saw(IN_CLOSE_WRITE, "three"));

  // An event on the directory itself concerns everyone.
  REQUIRE(::chmod(dir.path().c_str(), 0750) == 0);
  REQUIRE(wait_until([&] { return one.saw(IN_ATTRIB) && two.saw(IN_ATTRIB) && every.saw(IN_ATTRIB); }));

  f.unsubscribe(id_two);
  CHECK(f.subscriptions() == 2);
  CHECK(f.watches() == 1);
}

TEST_CASE("inotify: a removed directory ends its subscriptions with IN_IGNORED") {
  TempDir dir;
  std::string sub = dir.file("conf");
  REQUIRE(::mkdir(sub.c_str(), 0755) == 0);
  Fixture f;
  Heard a, b;
  f.subscribe(sub, a);
  f.subscribe(sub, b);
  REQUIRE(::rmdir(sub.c_str()) == 0);
  REQUIRE(wait_until([&] { return a.saw(IN_IGNORED) && b.saw(IN_IGNORED); }));
  CHECK(a.saw(IN_DELETE_SELF));
  CHECK(f.watches() == 0);
  CHECK(f.subscriptions() == 0);
}

TEST_CASE("inotify: a directory moved away ends its subscriptions, so the path can be watched afresh") {
  TempDir dir;
  std::string sub = dir.file("conf"), moved = dir.file("conf.old");
  REQUIRE(::mkdir(sub.c_str(), 0755) == 0);
  Fixture f;
  Heard a;
  f.subscribe(sub, a);
  REQUIRE(::rename(sub.c_str(), moved.c_str()) == 0);
  REQUIRE(wait_until([&] { return a.saw(IN_IGNORED); }));
  CHECK(a.saw(IN_MOVE_SELF));
  CHECK(f.watches() == 0);

  REQUIRE(::mkdir(sub.c_str(), 0755) == 0);
  Heard b;
  f.subscribe(sub, b);
  touch(moved + "/stale");
  touch(sub + "/fresh");
  REQUIRE(wait_until([&] { return b.saw(IN_CLOSE_WRITE, "fresh"); }));
  CHECK_FALSE(b.saw(IN_CLOSE_WRITE, "stale"));
}

TEST_CASE("inotify: a callback may end its own subscription and others'") {
  TempDir dir;
  Fixture f;
  std::atomic<int> calls{0};
  Inotify::SubscriptionId first = 0, second = 0;
  auto cb = [&](const DirEvent&) {
    ++calls;
    f.inotify->unsubscribe(first);
    f.inotify->unsubscribe(second);
  };
  f.rt->loop().run_sync([&] {
    first = *f.inotify->subscribe(dir.path(), cb);
    second = *f.inotify->subscribe(dir.path(), cb);
  });
  touch(dir.file("x"));
  REQUIRE(wait_until([&] { return calls.load() >= 1; }));
  CHECK(dynup_test::stays_true_for([&] { return calls.load() == 1; }, 100ms));
  CHECK(f.watches() == 0);
}

TEST_CASE("inotify: an overflowed event queue tells every subscriber to re-read") {
  TempDir one, two;
  Fixture f;
  Heard a, b;
  f.subscribe(one.path(), a);
  f.subscribe(two.path(), b);
  long queue = 16384;
  std::ifstream("/proc/sys/fs/inotify/max_queued_events") >> queue;
  REQUIRE(queue > 0);
  REQUIRE(queue < 1000000);

  // Hold the loop so nothing drains the queue, then queue more events than it holds.
  std::promise<void> release;
  std::atomic<bool> held{false};
  auto released = release.get_future().share();
  f.rt->loop().post([&held, released] {
    held = true;
    released.wait();
  });
  REQUIRE(wait_until([&] { return held.load(); }));
  int fds[2] = {::open(one.file("a").c_str(), O_CREAT | O_WRONLY | O_CLOEXEC, 0644),
                ::open(one.file("b").c_str(), O_CREAT | O_WRONLY | O_CLOEXEC, 0644)};
  REQUIRE(fds[0] >= 0);
  REQUIRE(fds[1] >= 0);
  // Alternating files: the kernel merges an event only into an identical last one.
  int failed = 0;
  for (long i = 0; i < queue + 100; ++i) failed += ::fchmod(fds[i % 2], (i / 2) % 2 ? 0600 : 0644) != 0;
  CHECK(failed == 0);
  ::close(fds[0]);
  ::close(fds[1]);
  release.set_value();

  REQUIRE(wait_until([&] { return a.saw(IN_Q_OVERFLOW) && b.saw(IN_Q_OVERFLOW); }, 10000ms));
  CHECK(f.watches() == 2); // overflow ends no subscription
}

TEST_CASE("inotify: a failing call names itself, the path and errno's text") {
  TempDir dir;
  Fixture f;
  f.rt->loop().run_sync([&] {
    f.inotify->inject_faults([](const char* call, const std::string&) {
      return std::string(call) == "inotify_add_watch" ? EACCES : 0;
    });
  });
  Heard h;
  auto denied = f.on_loop([&] { return f.inotify->subscribe(dir.path(), h.callback()); });
  REQUIRE_FALSE(denied);
  CHECK(denied.error().code() == dynup::Errc::io_error);
  CHECK(denied.error().message() == "inotify_add_watch(" + dir.path() + "): Permission denied");
  f.rt->loop().run_sync([&] { f.inotify->inject_faults({}); });

  auto missing = f.on_loop([&] { return f.inotify->subscribe(dir.file("nope"), h.callback()); });
  REQUIRE_FALSE(missing);
  CHECK(missing.error().code() == dynup::Errc::not_found);
  touch(dir.file("plain"));
  auto not_dir = f.on_loop([&] { return f.inotify->subscribe(dir.file("plain"), h.callback()); });
  REQUIRE_FALSE(not_dir);
  CHECK(not_dir.error().code() == dynup::Errc::not_found);
  CHECK(f.subscriptions() == 0);
}
