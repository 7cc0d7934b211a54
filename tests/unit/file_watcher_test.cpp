#include <dynup/watch/file_watcher.hpp>

#include <support/temp_dir.hpp>
#include <support/wait.hpp>

#include <doctest/doctest.h>

#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

using dynup::Errc;
using dynup::FileWatcher;
using dynup::FileWatchOptions;
using dynup::Publisher;
using dynup_test::TempDir;
using dynup_test::wait_until;
using dynup_test::write_by_rename;
using dynup_test::write_in_place;
using namespace std::chrono_literals;

// What the callbacks saw, readable from the test thread while the watcher runs.
class Recorder {
public:
  FileWatcher::PublishCallback on_publish() {
    return [this](const dynup::Snapshot& s) {
      std::lock_guard<std::mutex> lock(mu_);
      published_.push_back(s->version());
    };
  }
  FileWatcher::ErrorCallback on_error() {
    return [this](const dynup::Error& e) {
      std::lock_guard<std::mutex> lock(mu_);
      errors_.push_back(e);
    };
  }
  std::vector<std::uint64_t> published() const {
    std::lock_guard<std::mutex> lock(mu_);
    return published_;
  }
  std::size_t error_count() const {
    std::lock_guard<std::mutex> lock(mu_);
    return errors_.size();
  }
  dynup::Error last_error() const {
    std::lock_guard<std::mutex> lock(mu_);
    return errors_.empty() ? dynup::Error(Errc::invalid_argument, "<none>") : errors_.back();
  }

private:
  mutable std::mutex mu_;
  std::vector<std::uint64_t> published_;
  std::vector<dynup::Error> errors_;
};

// One-peer documents keyed by port, so each content is distinct and checkable.
std::string doc(int port, int weight = 1) {
  return R"({"peers":[{"host":"10.0.0.1","port":)" + std::to_string(port) +
         R"(,"weight":)" + std::to_string(weight) + "}]}";
}

int current_port(const Publisher& pub) {
  const auto& s = pub.snapshot();
  return s->size() == 1 ? (*s)[0].port : -1;
}

FileWatchOptions options(const std::string& path, std::chrono::milliseconds poll = 1000ms) {
  FileWatchOptions o;
  o.path = path;
  o.poll_interval = poll;
  return o;
}

// Entries of a /proc/self directory whose symlink target is `target` (all when empty).
int count_proc_entries(const char* dir, const std::string& target = "") {
  DIR* d = ::opendir(dir);
  REQUIRE(d != nullptr);
  int n = 0;
  while (dirent* e = ::readdir(d)) {
    std::string name = e->d_name;
    if (name == "." || name == "..") continue;
    if (target.empty()) {
      ++n;
      continue;
    }
    char buf[256];
    ssize_t len = ::readlink((std::string(dir) + "/" + name).c_str(), buf, sizeof buf - 1);
    if (len > 0 && std::string(buf, static_cast<std::size_t>(len)) == target) ++n;
  }
  ::closedir(d);
  return n;
}
int thread_count() { return count_proc_entries("/proc/self/task"); }
int inotify_fd_count() { return count_proc_entries("/proc/self/fd", "anon_inode:inotify"); }

// The runtime's inotify service, with `fault` injected on its loop (see rt::Inotify::inject_faults).
// Holding the runtime keeps the service (and its fault) alive across the watchers made in a test.
std::shared_ptr<dynup::rt::Runtime> runtime_with_fault(std::function<int(const char*, const std::string&)> fault) {
  auto rt = dynup::rt::Runtime::acquire();
  REQUIRE(rt);
  auto& inotify = (*rt)->service<dynup::rt::Inotify>();
  (*rt)->loop().run_sync([&] { inotify.inject_faults(std::move(fault)); });
  return *rt;
}

} // namespace

TEST_CASE("a valid file is published before the constructor returns") {
  TempDir dir;
  std::string path = dir.file("peers.json");
  write_by_rename(path, doc(8001));
  Publisher pub;
  Recorder rec;
  FileWatcher w(pub, options(path), rec.on_publish(), rec.on_error());

  CHECK(pub.version() == 1);
  CHECK(current_port(pub) == 8001);
  CHECK(pub.snapshot()->source_index() == 1);
  CHECK(rec.published() == std::vector<std::uint64_t>{1});
  CHECK(rec.error_count() == 0);
  auto st = w.status();
  CHECK(st.source == "file://" + path);
  CHECK(st.publish_count == 1);
  CHECK(st.last_index == 1);
  CHECK(st.last_error.empty());
  CHECK(st.consecutive_failures == 0);
  CHECK_FALSE(st.stale);
  CHECK(st.last_success.has_value());
}

TEST_CASE("an edit in place publishes a new version") {
  TempDir dir;
  std::string path = dir.file("peers.json");
  write_in_place(path, doc(8001));
  Publisher pub;
  Recorder rec;
  FileWatcher w(pub, options(path), rec.on_publish(), rec.on_error());
  REQUIRE(pub.version() == 1);

  write_in_place(path, doc(8002));
  REQUIRE(wait_until([&] { return pub.version() == 2; }));
  CHECK(current_port(pub) == 8002);
  CHECK(wait_until([&] { return rec.published().size() == 2; }));
  CHECK(rec.published() == std::vector<std::uint64_t>{1, 2});
  CHECK(w.status().publish_count == 2);
  CHECK(w.status().last_error.empty());
}

TEST_CASE("a file renamed over the watched path publishes a new version") {
  TempDir dir;
  std::string path = dir.file("peers.json");
  write_by_rename(path, doc(8001));
  Publisher pub;
  Recorder rec;
  FileWatcher w(pub, options(path), rec.on_publish(), rec.on_error());

  write_by_rename(path, doc(8002));
  REQUIRE(wait_until([&] { return pub.version() == 2; }));
  CHECK(current_port(pub) == 8002);
  write_by_rename(path, doc(8003));
  REQUIRE(wait_until([&] { return pub.version() == 3; }));
  CHECK(current_port(pub) == 8003);
  CHECK(rec.error_count() == 0);
}

TEST_CASE("a deleted file is reported and the last good set stays current") {
  TempDir dir;
  std::string path = dir.file("peers.json");
  write_by_rename(path, doc(8001));
  Publisher pub;
  Recorder rec;
  FileWatcher w(pub, options(path), rec.on_publish(), rec.on_error());
  auto before = pub.current();

  REQUIRE(::unlink(path.c_str()) == 0);
  REQUIRE(wait_until([&] { return rec.error_count() >= 1; }));
  CHECK(rec.last_error().code() == Errc::not_found);
  CHECK(rec.last_error().message().find(path) != std::string::npos);
  auto st = w.status();
  CHECK_FALSE(st.last_error.empty());
  CHECK(st.consecutive_failures >= 1);
  CHECK(st.stale);
  CHECK(pub.version() == 1);
  CHECK(pub.snapshot().get() == before.get());
  CHECK(current_port(pub) == 8001);

  SUBCASE("recreating it with new content publishes it and clears the error") {
    write_by_rename(path, doc(8002));
    REQUIRE(wait_until([&] { return pub.version() == 2; }));
    CHECK(current_port(pub) == 8002);
    CHECK(wait_until([&] { return w.status().last_error.empty(); }));
    st = w.status();
    CHECK(st.consecutive_failures == 0);
    CHECK_FALSE(st.stale);
    CHECK(st.publish_count == 2);
  }
  SUBCASE("recreating it with the old content clears the error without a new version") {
    std::uint64_t index_before = w.status().last_index;
    write_by_rename(path, doc(8001));
    REQUIRE(wait_until([&] { return w.status().last_error.empty(); }));
    st = w.status();
    CHECK(st.consecutive_failures == 0);
    CHECK_FALSE(st.stale);
    CHECK(st.last_index == index_before + 1);
    CHECK(pub.version() == 1);
    CHECK(rec.published() == std::vector<std::uint64_t>{1});
  }
}

TEST_CASE("an invalid file keeps the last good set until the file is fixed") {
  TempDir dir;
  std::string path = dir.file("peers.json");
  write_by_rename(path, doc(8001));
  Publisher pub;
  Recorder rec;
  FileWatcher w(pub, options(path), rec.on_publish(), rec.on_error());

  for (const std::string& garbage :
       {std::string("{not json"), std::string(R"({"peers":[{"host":"10.0.0.1","port":0}]})"),
        std::string(R"({"peers":[{"host":"10.0.0.1","port":80,"wieght":3}]})")}) {
    CAPTURE(garbage);
    std::size_t errors_before = rec.error_count();
    write_by_rename(path, garbage);
    REQUIRE(wait_until([&] { return rec.error_count() > errors_before; }));
    CHECK(rec.last_error().code() == Errc::parse_error);
    CHECK(rec.last_error().message().find(path) != std::string::npos);
    auto st = w.status();
    CHECK_FALSE(st.last_error.empty());
    CHECK(st.stale);
    CHECK(pub.version() == 1);
    CHECK(current_port(pub) == 8001);
  }
  CHECK(w.status().consecutive_failures == 3);

  write_by_rename(path, doc(8002));
  REQUIRE(wait_until([&] { return pub.version() == 2; }));
  CHECK(current_port(pub) == 8002);
  CHECK(wait_until([&] { return w.status().last_error.empty(); }));
  CHECK(w.status().consecutive_failures == 0);
  CHECK_FALSE(w.status().stale);
  CHECK(rec.published() == std::vector<std::uint64_t>{1, 2});
}

TEST_CASE("rewriting the same content does not publish again") {
  TempDir dir;
  std::string path = dir.file("peers.json");
  write_by_rename(path, doc(8001));
  Publisher pub;
  Recorder rec;
  // A short poll as well as inotify: the rewrites below are read more than once.
  FileWatcher w(pub, options(path, 20ms), rec.on_publish(), rec.on_error());

  write_in_place(path, doc(8001));
  write_by_rename(path, doc(8001));
  CHECK(dynup_test::stays_true_for([&] { return pub.version() == 1; }, 300ms));

  // Same peers, other bytes: the watcher reads and decodes it (its index moves) but
  // the content is equal, so there is no new version and no callback.
  write_by_rename(path, R"({"peers":[{"port":8001,"host":"10.0.0.1","weight":1}]} )");
  REQUIRE(wait_until([&] { return w.status().last_index == 2; }));
  CHECK(pub.version() == 1);
  CHECK(w.status().publish_count == 1);
  CHECK(rec.published() == std::vector<std::uint64_t>{1});
  CHECK(rec.error_count() == 0);
}

TEST_CASE("an empty peer list is refused by default and the last set kept") {
  TempDir dir;
  std::string path = dir.file("peers.json");
  write_by_rename(path, doc(8001));
  Publisher pub;
  Recorder rec;
  FileWatcher w(pub, options(path), rec.on_publish(), rec.on_error());

  write_by_rename(path, R"({"peers":[]})");
  REQUIRE(wait_until([&] { return rec.error_count() == 1; }));
  CHECK(rec.last_error().code() == Errc::rejected);
  CHECK(w.status().stale);
  CHECK(current_port(pub) == 8001);

  write_by_rename(path, ""); // a zero-byte file: also refused, not "no peers"
  REQUIRE(wait_until([&] { return rec.error_count() == 2; }));
  CHECK(rec.last_error().code() == Errc::parse_error);
  CHECK(current_port(pub) == 8001);
  CHECK(pub.version() == 1);
}

TEST_CASE("an empty peer list is published when allow_empty is set") {
  TempDir dir;
  std::string path = dir.file("peers.json");
  write_by_rename(path, doc(8001));
  Publisher pub;
  Recorder rec;
  auto o = options(path);
  o.guards.allow_empty = true;
  FileWatcher w(pub, o, rec.on_publish(), rec.on_error());

  write_by_rename(path, R"({"peers":[]})");
  REQUIRE(wait_until([&] { return pub.version() == 2; }));
  CHECK(pub.snapshot()->empty());
  CHECK(rec.error_count() == 0);
}

TEST_CASE("an update removing too many peers is refused by max_removed_share") {
  TempDir dir;
  std::string path = dir.file("peers.json");
  write_by_rename(path, R"(["10.0.0.1:80","10.0.0.2:80","10.0.0.3:80","10.0.0.4:80"])");
  Publisher pub;
  Recorder rec;
  auto o = options(path);
  o.guards.max_removed_share = 0.5;
  FileWatcher w(pub, o, rec.on_publish(), rec.on_error());
  REQUIRE(pub.snapshot()->size() == 4);

  write_by_rename(path, R"(["10.0.0.1:80"])"); // removes 3 of 4
  REQUIRE(wait_until([&] { return rec.error_count() == 1; }));
  CHECK(rec.last_error().code() == Errc::rejected);
  CHECK(pub.snapshot()->size() == 4);

  write_by_rename(path, R"(["10.0.0.1:80","10.0.0.2:80","10.0.0.9:80"])"); // removes 2 of 4
  REQUIRE(wait_until([&] { return pub.version() == 2; }));
  CHECK(pub.snapshot()->size() == 3);
}

TEST_CASE("a symlink re-pointed to another file is picked up") {
  TempDir dir;
  std::string a = dir.file("a.json"), b = dir.file("b.json"), link = dir.file("peers.json");
  write_by_rename(a, doc(8001));
  write_by_rename(b, doc(8002));
  REQUIRE(::symlink("a.json", link.c_str()) == 0);
  Publisher pub;
  Recorder rec;
  FileWatcher w(pub, options(link, 50ms), rec.on_publish(), rec.on_error());
  REQUIRE(current_port(pub) == 8001);

  std::string tmp_link = dir.file("peers.json.new");
  REQUIRE(::symlink("b.json", tmp_link.c_str()) == 0);
  REQUIRE(::rename(tmp_link.c_str(), link.c_str()) == 0);
  REQUIRE(wait_until([&] { return pub.version() == 2; }));
  CHECK(current_port(pub) == 8002);
  CHECK(rec.error_count() == 0);
}

TEST_CASE("a Kubernetes-style ..data directory swap is picked up") {
  TempDir dir;
  REQUIRE(::mkdir(dir.file("..v1").c_str(), 0755) == 0);
  REQUIRE(::mkdir(dir.file("..v2").c_str(), 0755) == 0);
  write_by_rename(dir.file("..v1/peers.json"), doc(8001));
  write_by_rename(dir.file("..v2/peers.json"), doc(8002));
  REQUIRE(::symlink("..v1", dir.file("..data").c_str()) == 0);
  REQUIRE(::symlink("..data/peers.json", dir.file("peers.json").c_str()) == 0);
  Publisher pub;
  Recorder rec;
  FileWatcher w(pub, options(dir.file("peers.json"), 50ms), rec.on_publish(), rec.on_error());
  REQUIRE(current_port(pub) == 8001);

  REQUIRE(::symlink("..v2", dir.file("..data_tmp").c_str()) == 0);
  REQUIRE(::rename(dir.file("..data_tmp").c_str(), dir.file("..data").c_str()) == 0);
  REQUIRE(wait_until([&] { return pub.version() == 2; }));
  CHECK(current_port(pub) == 8002);
}

TEST_CASE("the poll catches a change inotify cannot see (target in another directory)") {
  TempDir watched, elsewhere;
  std::string target = elsewhere.file("real.json");
  std::string link = watched.file("peers.json");
  write_by_rename(target, doc(8001));
  REQUIRE(::symlink(target.c_str(), link.c_str()) == 0);
  Publisher pub;
  FileWatcher w(pub, options(link, 50ms));
  REQUIRE(current_port(pub) == 8001);

  write_by_rename(target, doc(8002)); // no event in the watched directory
  REQUIRE(wait_until([&] { return pub.version() == 2; }));
  CHECK(current_port(pub) == 8002);
}

TEST_CASE("two same-size edits in quick succession end with the latest published") {
  TempDir dir;
  std::string path = dir.file("peers.json");
  write_in_place(path, doc(8000));
  Publisher pub;
  FileWatcher w(pub, options(path));
  for (int round = 1; round <= 10; ++round) {
    CAPTURE(round);
    int first = 8000 + 2 * round - 1, second = 8000 + 2 * round;
    REQUIRE(doc(first).size() == doc(second).size());
    write_in_place(path, doc(first));
    write_in_place(path, doc(second)); // same size, likely the same timestamp
    REQUIRE(wait_until([&] { return current_port(pub) == second; }));
  }
  // Nothing stale arrives later either.
  CHECK(dynup_test::stays_true_for([&] { return current_port(pub) == 8020; }, 200ms));
}

TEST_CASE("a file rewritten faster than the settle time is still read during the burst") {
  TempDir dir;
  std::string path = dir.file("peers.json");
  write_in_place(path, doc(8000));
  Publisher pub;
  FileWatcher w(pub, options(path, 60000ms)); // no fallback poll within the test
  REQUIRE(pub.version() == 1);
  // A write every ~4 ms restarts the 20 ms settle each time: without the cap on the
  // settle (a read at most 100 ms, 5 × settle, into a burst), nothing would be read
  // until the writes stop. The burst goes on until two reads came during it, which on
  // a quiet machine takes about 200 ms; the bound is for a loaded one, not a limit.
  const auto until = std::chrono::steady_clock::now() + 10s;
  int port = 8000;
  while (pub.version() < 3 && std::chrono::steady_clock::now() < until) {
    write_in_place(path, doc(++port));
    std::this_thread::sleep_for(4ms);
  }
  INFO((port - 8000) << " writes");
  CHECK(pub.version() >= 3); // two reads while the writes went on
  REQUIRE(wait_until([&] { return current_port(pub) == port; }));
}

TEST_CASE("stop returns promptly and is idempotent") {
  TempDir dir;
  std::string path = dir.file("peers.json");
  write_by_rename(path, doc(8001));
  Publisher pub;
  FileWatcher w(pub, options(path, std::chrono::milliseconds(10 * 60 * 1000)));
  auto t0 = std::chrono::steady_clock::now();
  w.stop();
  auto took = std::chrono::steady_clock::now() - t0;
  CHECK(took < 2s);
  w.stop();
  // Stopped: later edits are not published.
  write_by_rename(path, doc(8002));
  CHECK(dynup_test::stays_true_for([&] { return pub.version() == 1; }, 200ms));
}

TEST_CASE("the destructor stops the watcher promptly") {
  TempDir dir;
  std::string path = dir.file("peers.json");
  write_by_rename(path, doc(8001));
  Publisher pub;
  auto w = std::make_unique<FileWatcher>(pub, options(path, std::chrono::milliseconds(10 * 60 * 1000)));
  auto t0 = std::chrono::steady_clock::now();
  w.reset();
  CHECK(std::chrono::steady_clock::now() - t0 < 2s);
}

TEST_CASE("a file missing at construction is reported, then published once created") {
  TempDir dir;
  std::string path = dir.file("peers.json");
  Publisher pub;
  Recorder rec;
  FileWatcher w(pub, options(path), rec.on_publish(), rec.on_error());

  CHECK(pub.version() == 0);
  CHECK(rec.error_count() == 1); // reported synchronously by the constructor
  CHECK(rec.last_error().code() == Errc::not_found);
  auto st = w.status();
  CHECK_FALSE(st.last_error.empty());
  CHECK(st.consecutive_failures == 1);
  CHECK(st.stale); // nothing is served: not up to date with the file, and not ready
  CHECK_FALSE(st.ready);
  CHECK_FALSE(st.last_success.has_value());

  write_by_rename(path, doc(8001));
  REQUIRE(wait_until([&] { return pub.version() == 1; }));
  CHECK(current_port(pub) == 8001);
  REQUIRE(wait_until([&] { return w.status().ready; }));
  CHECK_FALSE(w.status().stale);
  CHECK(wait_until([&] { return w.status().last_error.empty(); }));
  CHECK(w.status().consecutive_failures == 0);
  CHECK(rec.published() == std::vector<std::uint64_t>{1});
}

TEST_CASE("a removed and recreated directory is watched again") {
  TempDir dir;
  std::string sub = dir.file("conf");
  std::string path = sub + "/peers.json";
  REQUIRE(::mkdir(sub.c_str(), 0755) == 0);
  write_by_rename(path, doc(8001));
  Publisher pub;
  Recorder rec;
  FileWatcher w(pub, options(path, 50ms), rec.on_publish(), rec.on_error());

  REQUIRE(::unlink(path.c_str()) == 0);
  REQUIRE(::rmdir(sub.c_str()) == 0);
  REQUIRE(wait_until([&] { return rec.error_count() >= 1; }));
  REQUIRE(::mkdir(sub.c_str(), 0755) == 0);
  write_by_rename(path, doc(8002));
  REQUIRE(wait_until([&] { return pub.version() == 2; }));
  CHECK(current_port(pub) == 8002);
  // And edits after that are seen as well.
  write_by_rename(path, doc(8003));
  REQUIRE(wait_until([&] { return pub.version() == 3; }));
  CHECK(current_port(pub) == 8003);
}

TEST_CASE("a throwing publish callback does not stop the watcher") {
  TempDir dir;
  std::string path = dir.file("peers.json");
  write_by_rename(path, doc(8001));
  Publisher pub;
  std::mutex mu;
  std::vector<std::uint64_t> seen;
  FileWatcher w(pub, options(path), [&](const dynup::Snapshot& s) {
    {
      std::lock_guard<std::mutex> lock(mu);
      seen.push_back(s->version());
    }
    throw std::runtime_error("callback failure");
  });
  write_by_rename(path, doc(8002));
  REQUIRE(wait_until([&] { return pub.version() == 2; }));
  write_by_rename(path, doc(8003));
  REQUIRE(wait_until([&] { return pub.version() == 3; }));
  CHECK(current_port(pub) == 8003);
  std::lock_guard<std::mutex> lock(mu);
  CHECK(seen == std::vector<std::uint64_t>{1, 2, 3});
}

TEST_CASE("a thousand file watchers share the runtime's threads and one inotify descriptor, and each change is published") {
  TempDir dir;
  constexpr int n = 1000;
  std::vector<std::string> paths;
  for (int i = 0; i < n; ++i) {
    paths.push_back(dir.file("peers-" + std::to_string(i) + ".json"));
    write_by_rename(paths.back(), doc(10000 + i));
  }
  // A poll far beyond the test: every change below must come through inotify.
  std::vector<std::unique_ptr<Publisher>> pubs;
  std::vector<std::unique_ptr<FileWatcher>> watchers;
  auto add = [&](int i) {
    pubs.push_back(std::make_unique<Publisher>());
    watchers.push_back(std::make_unique<FileWatcher>(*pubs.back(), options(paths[static_cast<std::size_t>(i)], 600s)));
  };
  add(0);
  const int threads_with_one = thread_count();
  CHECK(inotify_fd_count() == 1);
  for (int i = 1; i < n; ++i) add(i);
  CHECK(thread_count() == threads_with_one);
  CHECK(inotify_fd_count() == 1);
  for (int i = 0; i < n; ++i) {
    REQUIRE(pubs[static_cast<std::size_t>(i)]->version() == 1);
    REQUIRE(watchers[static_cast<std::size_t>(i)]->status().mode == "inotify");
  }

  for (int i = 0; i < n; ++i) write_by_rename(paths[static_cast<std::size_t>(i)], doc(20000 + i));
  auto changed = [&] {
    int count = 0;
    for (int i = 0; i < n; ++i) count += current_port(*pubs[static_cast<std::size_t>(i)]) == 20000 + i;
    return count;
  };
  CHECK(wait_until([&] { return changed() == n; }, 30000ms));
  INFO(changed() << " of " << n << " changes published");
  for (int i = 0; i < n; ++i) CHECK(pubs[static_cast<std::size_t>(i)]->version() == 2);
  CHECK(thread_count() == threads_with_one);
  CHECK(inotify_fd_count() == 1);
}

TEST_CASE("a directory inotify cannot watch is polled, and the cause is reported once and shown in status") {
  TempDir dir;
  std::string path = dir.file("peers.json");
  write_by_rename(path, doc(8001));
  auto rt = runtime_with_fault([&](const char* call, const std::string& d) {
    return std::string(call) == "inotify_add_watch" && d == dir.path() ? ENOSPC : 0;
  });
  Publisher pub;
  Recorder rec;
  FileWatcher w(pub, options(path, 50ms), rec.on_publish(), rec.on_error());

  const std::string cause = "inotify_add_watch(" + dir.path() + "): No space left on device; polling every 50 ms";
  REQUIRE(rec.error_count() == 1); // reported by the constructor, before it returns
  CHECK(rec.last_error().code() == Errc::io_error);
  CHECK(rec.last_error().message() == "file://" + path + ": " + cause);
  CHECK(pub.version() == 1);
  auto st = w.status();
  CHECK(st.mode == "poll");
  CHECK(st.mode_error == cause);
  CHECK(st.to_json()["mode"] == "poll");
  CHECK(st.to_json()["mode_error"] == cause);
  CHECK(st.last_error.empty()); // the file itself is served and current
  CHECK_FALSE(st.stale);

  write_by_rename(path, doc(8002)); // found by the poll
  REQUIRE(wait_until([&] { return current_port(pub) == 8002; }));
  // Every poll tries inotify again; the same cause is not reported again.
  CHECK(dynup_test::stays_true_for([&] { return rec.error_count() == 1; }, 300ms));

  SUBCASE("once the watch can be added, the watcher is back on inotify") {
    rt->loop().run_sync([&] { rt->service<dynup::rt::Inotify>().inject_faults({}); });
    REQUIRE(wait_until([&] { return w.status().mode == "inotify"; }));
    CHECK(w.status().mode_error.empty());
    CHECK(rec.error_count() == 1);
  }
}

TEST_CASE("an inotify instance the system refuses (EMFILE) is reported with its cause, and the file polled") {
  TempDir dir;
  std::string path = dir.file("peers.json");
  write_by_rename(path, doc(8001));
  auto rt = runtime_with_fault([](const char* call, const std::string&) {
    return std::string(call) == "inotify_init1" ? EMFILE : 0;
  });
  int fd = 0;
  rt->loop().run_sync([&] { fd = rt->service<dynup::rt::Inotify>().fd(); });
  REQUIRE(fd == -1); // a fresh runtime: the instance is opened by the first subscriber
  Publisher pub;
  Recorder rec;
  FileWatcher w(pub, options(path, 50ms), rec.on_publish(), rec.on_error());

  REQUIRE(rec.error_count() == 1);
  CHECK(rec.last_error().message() == "file://" + path + ": inotify_init1: Too many open files; polling every 50 ms");
  CHECK(w.status().mode == "poll");
  CHECK(inotify_fd_count() == 0);
  write_by_rename(path, doc(8002));
  REQUIRE(wait_until([&] { return current_port(pub) == 8002; }));
  CHECK(rec.error_count() == 1);
}

TEST_CASE("a missing directory is polled for without an inotify error, and watched once it exists") {
  TempDir dir;
  std::string sub = dir.file("conf");
  std::string path = sub + "/peers.json";
  Publisher pub;
  Recorder rec;
  FileWatcher w(pub, options(path, 50ms), rec.on_publish(), rec.on_error());
  REQUIRE(rec.error_count() == 1);
  CHECK(rec.last_error().code() == Errc::not_found); // the file's read, not inotify
  CHECK(w.status().mode == "poll");
  CHECK(w.status().mode_error.find("until the directory exists") != std::string::npos);

  REQUIRE(::mkdir(sub.c_str(), 0755) == 0);
  REQUIRE(wait_until([&] { return w.status().mode == "inotify"; }));
  CHECK(w.status().mode_error.empty());
  write_by_rename(path, doc(8001));
  REQUIRE(wait_until([&] { return pub.version() == 1; }));
  CHECK(rec.error_count() == 1);
}

TEST_CASE("stop() from the watcher's own callback returns at once and no callback follows") {
  TempDir dir;
  std::string path = dir.file("peers.json");
  write_by_rename(path, doc(8001));
  Publisher pub;
  std::atomic<FileWatcher*> self{nullptr};
  std::atomic<int> calls{0};
  std::atomic<bool> stopped_inside{false};
  FileWatcher w(pub, options(path, 20ms), [&](const dynup::Snapshot&) {
    ++calls;
    if (FileWatcher* me = self.load()) {
      me->stop();
      me->stop(); // idempotent there too
      stopped_inside = true;
    }
  });
  self = &w;
  REQUIRE(calls.load() == 1);
  write_by_rename(path, doc(8002));
  REQUIRE(wait_until([&] { return stopped_inside.load(); }));
  CHECK(pub.version() == 2);
  write_by_rename(path, doc(8003));
  CHECK(dynup_test::stays_true_for([&] { return pub.version() == 2; }, 300ms));
  CHECK(calls.load() == 2);
  w.stop(); // and from the owner afterwards
}

TEST_CASE("callbacks run on the runtime's loop thread, the first one included") {
  TempDir dir;
  std::string path = dir.file("peers.json");
  write_by_rename(path, doc(8001));
  auto rt = dynup::rt::Runtime::acquire();
  REQUIRE(rt);
  Publisher pub;
  std::mutex mu;
  std::vector<bool> on_loop;
  FileWatcher w(pub, options(path), [&](const dynup::Snapshot&) {
    std::lock_guard<std::mutex> lock(mu);
    on_loop.push_back((*rt)->loop().in_loop());
  });
  write_by_rename(path, doc(8002));
  REQUIRE(wait_until([&] { return pub.version() == 2; }));
  std::lock_guard<std::mutex> lock(mu);
  CHECK(on_loop == std::vector<bool>{true, true});
}

TEST_CASE("a ..data swap next to a symlinked file is seen through inotify, also when the file became a link later") {
  TempDir dir;
  REQUIRE(::mkdir(dir.file("..v1").c_str(), 0755) == 0);
  REQUIRE(::mkdir(dir.file("..v2").c_str(), 0755) == 0);
  REQUIRE(::mkdir(dir.file("..v3").c_str(), 0755) == 0);
  write_by_rename(dir.file("..v1/peers.json"), doc(8001));
  write_by_rename(dir.file("..v2/peers.json"), doc(8002));
  write_by_rename(dir.file("..v3/peers.json"), doc(8003));
  std::string path = dir.file("peers.json");
  write_by_rename(path, doc(8000)); // a plain file first
  Publisher pub;
  FileWatcher w(pub, options(path, 600s)); // no poll within the test
  REQUIRE(current_port(pub) == 8000);

  // The file becomes a link through ..data (an event naming it), ...
  REQUIRE(::symlink("..v1", dir.file("..data").c_str()) == 0);
  REQUIRE(::symlink("..data/peers.json", dir.file("peers.json.new").c_str()) == 0);
  REQUIRE(::rename(dir.file("peers.json.new").c_str(), path.c_str()) == 0);
  REQUIRE(wait_until([&] { return current_port(pub) == 8001; }));
  // ... then only ..data changes: events that do not name the file.
  for (const char* next : {"..v2", "..v3"}) {
    CAPTURE(next);
    REQUIRE(::symlink(next, dir.file("..data_tmp").c_str()) == 0);
    REQUIRE(::rename(dir.file("..data_tmp").c_str(), dir.file("..data").c_str()) == 0);
    REQUIRE(wait_until([&] { return current_port(pub) == (std::string(next) == "..v2" ? 8002 : 8003); }));
  }
  CHECK(w.status().mode == "inotify");
}
