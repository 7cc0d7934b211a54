#include <dynup/leader_lock.hpp>
#include <dynup/shared_snapshot.hpp>

#include "support/peers.hpp"
#include "support/temp_dir.hpp"
#include <doctest/doctest.h>

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

namespace {

using dynup::Errc;
using dynup::LeaderLock;
using dynup::Peer;
using dynup::PeerSet;
using dynup::SharedRegion;
using dynup::SharedRegionOptions;
using dynup_test::make_set;
using dynup_test::peer;
using dynup_test::TempDir;
using std::chrono::milliseconds;
using std::chrono::steady_clock;

namespace layout = dynup::detail::region_layout;

SharedRegionOptions options(const TempDir& dir, std::size_t capacity = SharedRegion::default_capacity,
                            const std::string& name = "api") {
  SharedRegionOptions o;
  o.dir = dir.path();
  o.name = name;
  o.capacity = capacity;
  return o;
}

SharedRegion open_region(const SharedRegionOptions& o) {
  auto r = SharedRegion::open(o);
  REQUIRE_MESSAGE(r, (r ? "" : r.error().message()));
  return std::move(r).value();
}

// Every field away from its default: tags, meta, backup, zone, IPv6, health, weight.
PeerSet rich_set(std::uint64_t index) {
  Peer a = peer("10.0.0.1", 8080, 5);
  a.id = "api-1";
  a.backup = true;
  a.zone = "eu-1a";
  a.tags = {"v2", "canary"};
  a.meta = {{"build", "1.4"}, {"owner", "team \"quoted\" \\ ü"}};
  a.health = dynup::Health::warning;
  Peer b = peer("2001:db8::1", 443, 65535);
  b.health = dynup::Health::critical;
  Peer c = peer("backend.example.com", 9000);
  c.tags = {"blue"};
  return make_set({a, b, c}, index);
}

// Set number k: k % 50 + 1 peers, all on port 1000 + k % 50, each carrying k and a pad of
// (k % 7) * 150 bytes in meta, source index k. Sizes vary from ~150 bytes to ~60 KB, and
// any mix of two sets breaks at least one of these relations. Uses no doctest macro, so
// forked children may call it.
PeerSet shaped_set(std::uint64_t k) {
  std::vector<Peer> peers;
  const std::size_t n = k % 50 + 1;
  for (std::size_t i = 0; i < n; ++i) {
    Peer p;
    p.host = "10.7.0." + std::to_string(i + 1);
    p.port = static_cast<std::uint16_t>(1000 + k % 50);
    p.meta["k"] = std::to_string(k);
    p.meta["pad"] = std::string((k % 7) * 150, 'x');
    peers.push_back(std::move(p));
  }
  auto s = PeerSet::make(std::move(peers), k);
  if (!s) std::abort();
  return std::move(s).value();
}

// Empty when `snap` is exactly shaped_set(k) written as region version k, else why not.
std::string shape_problem(const dynup::SharedSnapshot& snap) {
  const std::uint64_t k = snap.source_index;
  if (snap.version != k) return "version " + std::to_string(snap.version) + " holds index " + std::to_string(k);
  if (snap.set.source_index() != k) return "set index differs from the slot's";
  if (snap.set.size() != k % 50 + 1) return "set " + std::to_string(k) + " has " + std::to_string(snap.set.size()) + " peers";
  for (const Peer& p : snap.set) {
    if (p.port != 1000 + k % 50) return "set " + std::to_string(k) + " has port " + std::to_string(p.port);
    auto kk = p.meta.find("k");
    auto pad = p.meta.find("pad");
    if (kk == p.meta.end() || kk->second != std::to_string(k)) return "set " + std::to_string(k) + " has a peer of another set";
    if (pad == p.meta.end() || pad->second.size() != (k % 7) * 150) return "set " + std::to_string(k) + " has a torn pad";
  }
  return {};
}

void pwrite_bytes(const std::string& path, std::size_t offset, const void* data, std::size_t n) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CLOEXEC);
  REQUIRE(fd >= 0);
  CHECK(::pwrite(fd, data, n, static_cast<off_t>(offset)) == static_cast<ssize_t>(n));
  ::close(fd);
}

void pwrite_u64(const std::string& path, std::size_t offset, std::uint64_t v) {
  pwrite_bytes(path, offset, &v, sizeof v);
}

mode_t file_mode(const std::string& path) {
  struct stat st {};
  REQUIRE(::stat(path.c_str(), &st) == 0);
  return st.st_mode & 07777;
}

// A forked child process, killed (by PID) and reaped if the test ends before it does.
class Child {
public:
  // Runs `body` in a child that leaves with _exit(body()) (no atexit handlers, no doctest
  // teardown); an escaping exception exits 99.
  template <class F> explicit Child(F body) {
    std::fflush(nullptr); // unflushed stdio buffers would otherwise be written twice
    pid_ = ::fork();
    REQUIRE(pid_ >= 0);
    if (pid_ == 0) {
      int code = 99;
      try {
        code = body();
      } catch (...) {
      }
      ::_exit(code);
    }
  }
  ~Child() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      int st = 0;
      while (::waitpid(pid_, &st, 0) < 0 && errno == EINTR) {
      }
    }
  }
  Child(const Child&) = delete;
  Child& operator=(const Child&) = delete;

  pid_t pid() const noexcept { return pid_; }

  // True once the child has exited (reaping it); `status` gets its wait status.
  bool exited(int& status) {
    if (pid_ > 0 && ::waitpid(pid_, &status_, WNOHANG) == pid_) pid_ = -1;
    status = status_;
    return pid_ <= 0;
  }

  // The child's exit code, waiting up to `timeout`; -1 if it is still running (then it
  // is killed by the destructor), 128 + signal if a signal ended it.
  int exit_code(milliseconds timeout) {
    auto deadline = steady_clock::now() + timeout;
    int st = 0;
    while (!exited(st)) {
      if (steady_clock::now() >= deadline) return -1;
      std::this_thread::sleep_for(milliseconds(5));
    }
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  }

private:
  pid_t pid_ = -1;
  int status_ = 0;
};

// A pipe for a child to tell the parent one byte.
struct Pipe {
  int fd[2] = {-1, -1};
  Pipe() { REQUIRE(::pipe2(fd, O_CLOEXEC) == 0); }
  ~Pipe() {
    for (int f : fd)
      if (f >= 0) ::close(f);
  }
  void send(char c) const { (void)!::write(fd[1], &c, 1); }
  // The byte sent, or 0 when nothing came within `timeout`.
  char receive(milliseconds timeout) const {
    pollfd p{fd[0], POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(timeout.count())) != 1) return 0;
    char c = 0;
    return ::read(fd[0], &c, 1) == 1 ? c : 0;
  }
};

} // namespace

TEST_CASE("shared region: a set round-trips with every field, and counts writes in its version") {
  TempDir dir;
  SharedRegion region = open_region(options(dir));
  CHECK(region.version() == 0);
  CHECK(region.path() == dir.file("api.dynup"));
  CHECK(region.capacity() == SharedRegion::default_capacity);

  const PeerSet first = rich_set(42);
  auto v1 = region.write(first);
  REQUIRE(v1);
  CHECK(v1.value() == 1);
  CHECK(region.version() == 1);
  auto got = region.read();
  REQUIRE_MESSAGE(got, (got ? "" : got.error().message()));
  CHECK(got->version == 1);
  CHECK(got->source_index == 42);
  CHECK(got->set.source_index() == 42);
  CHECK(got->set.peers() == first.peers());
  CHECK(got->set.same_content(first));
  const Peer* v6 = got->set.find("[2001:db8::1]:443");
  REQUIRE(v6 != nullptr);
  CHECK(v6->health == dynup::Health::critical);
  CHECK(v6->weight == 65535);

  const PeerSet second = make_set({peer("10.0.0.9", 81)}, 43);
  CHECK(region.write(second).value() == 2);
  CHECK(region.read()->set.peers() == second.peers());

  SUBCASE("an empty set is a set like any other") {
    CHECK(region.write(PeerSet()).value() == 3);
    auto empty = region.read();
    REQUIRE(empty);
    CHECK(empty->version == 3);
    CHECK(empty->set.empty());
  }
  SUBCASE("the version lives in the file: another object continues it, and both see each other's writes") {
    SharedRegion other = open_region(options(dir));
    CHECK(other.version() == 2);
    auto seen = other.read();
    REQUIRE(seen);
    CHECK(seen->version == 2);
    CHECK(seen->set.peers() == second.peers());
    CHECK(other.write(first).value() == 3);
    CHECK(region.version() == 3);
    CHECK(region.read()->set.peers() == first.peers());
    CHECK(region.write(second).value() == 4);
    CHECK(other.read()->version == 4);
  }
  SUBCASE("with every mapping closed, the file keeps the version and the set") {
    { SharedRegion gone = std::move(region); }
    SharedRegion reopened = open_region(options(dir));
    CHECK(reopened.version() == 2);
    CHECK(reopened.read()->set.peers() == second.peers());
    CHECK(reopened.write(first).value() == 3);
  }
  SUBCASE("a moved region keeps working") {
    SharedRegion moved = std::move(region);
    CHECK(moved.version() == 2);
    CHECK(moved.write(first).value() == 3);
    region = std::move(moved);
    CHECK(region.read()->set.peers() == first.peers());
  }
}

TEST_CASE("shared region: a region never written reads as not_found, version 0") {
  TempDir dir;
  SharedRegion region = open_region(options(dir));
  CHECK(region.version() == 0);
  auto r = region.read();
  REQUIRE_FALSE(r);
  CHECK(r.error().code() == Errc::not_found);
  CHECK(r.error().message() == "region api has not been written yet");
}

TEST_CASE("shared region: region and lock files are created mode 0600 whatever the umask") {
  TempDir dir;
  mode_t old = ::umask(0);
  auto region = SharedRegion::open(options(dir));
  auto lock = LeaderLock::open(dir.path(), "api");
  ::umask(old);
  REQUIRE(region);
  REQUIRE(lock);
  CHECK(file_mode(dir.file("api.dynup")) == 0600);
  CHECK(file_mode(dir.file("api.lock")) == 0600);
  CHECK(lock->path() == dir.file("api.lock"));
}

TEST_CASE("shared region: a set larger than a buffer is refused whole, with the size it needs, and the previous set stays") {
  TempDir dir;
  const std::size_t capacity = 4096;
  SharedRegion region = open_region(options(dir, capacity));
  const PeerSet small = rich_set(1);
  REQUIRE(region.write(small));

  std::vector<Peer> many;
  for (int i = 0; i < 100; ++i) {
    Peer p = peer("10.1.0." + std::to_string(i + 1), 8080);
    p.meta["marker"] = "TOO-BIG-MARKER";
    many.push_back(p);
  }
  const PeerSet big = make_set(many, 2);
  const std::size_t needed = dynup::to_json(big).size();
  REQUIRE(needed > capacity);
  auto w = region.write(big);
  REQUIRE_FALSE(w);
  CHECK(w.error().code() == Errc::too_large);
  CHECK(w.error().message() == "peer set needs " + std::to_string(needed) +
                                   " bytes; region api holds 4096 per buffer: raise capacity");
  CHECK(region.version() == 1);
  auto r = region.read();
  REQUIRE(r);
  CHECK(r->version == 1);
  CHECK(r->set.peers() == small.peers());
  CHECK(dynup_test::read_all(region.path()).find("TOO-BIG-MARKER") == std::string::npos);

  SUBCASE("a set of exactly the capacity fits; one byte more does not") {
    // The JSON grows one byte per pad byte (ASCII), so the pad can hit the size exactly.
    auto with_pad = [](std::size_t n) {
      Peer p = peer("10.2.0.1", 80);
      p.meta["pad"] = std::string(n, 'p');
      return make_set({p}, 3);
    };
    const std::size_t base = dynup::to_json(with_pad(0)).size();
    const PeerSet exact = with_pad(capacity - base);
    REQUIRE(dynup::to_json(exact).size() == capacity);
    CHECK(region.write(exact).value() == 2);
    CHECK(region.read()->set.peers() == exact.peers());
    auto over = region.write(with_pad(capacity - base + 1));
    REQUIRE_FALSE(over);
    CHECK(over.error().code() == Errc::too_large);
    CHECK(region.read()->set.peers() == exact.peers());
  }
}

TEST_CASE("shared region: bad region options are refused with the field named") {
  TempDir dir;
  for (const char* name : {"", "a/b", "..", ".", "has space", "x\n"}) {
    auto r = SharedRegion::open(options(dir, SharedRegion::default_capacity, name));
    REQUIRE_FALSE(r);
    CHECK(r.error().code() == Errc::invalid_argument);
    CHECK(r.error().message().rfind("name: ", 0) == 0);
    auto l = LeaderLock::open(dir.path(), name);
    REQUIRE_FALSE(l);
    CHECK(l.error().message().rfind("name: ", 0) == 0);
  }
  CHECK_FALSE(SharedRegion::open(options(dir, SharedRegion::default_capacity, std::string(65, 'a'))));
  CHECK(SharedRegion::open(options(dir, SharedRegion::default_capacity, std::string(64, 'a'))));
  CHECK(SharedRegion::open(options(dir, SharedRegion::default_capacity, "api.v2_blue-1")));

  auto small = SharedRegion::open(options(dir, 100));
  REQUIRE_FALSE(small);
  CHECK(small.error().code() == Errc::invalid_argument);
  CHECK(small.error().message() == "capacity: 100 bytes is out of range 1024..1073741824");

  SharedRegionOptions no_dir = options(dir);
  no_dir.dir = "";
  CHECK(SharedRegion::open(no_dir).error().message() == "dir: is empty");
  no_dir.dir = dir.file("missing");
  auto missing = SharedRegion::open(no_dir);
  REQUIRE_FALSE(missing);
  CHECK(missing.error().code() == Errc::not_found);
  CHECK(missing.error().message().find(dir.file("missing/api.dynup")) != std::string::npos);
}

TEST_CASE("shared region: a foreign or mismatched region file is refused with what was found") {
  TempDir dir;
  const std::string path = dir.file("api.dynup");

  SUBCASE("bad magic") {
    dynup_test::write_in_place(path, std::string("hello, I am a log file") + std::string(9000, '\n'));
    ::chmod(path.c_str(), 0600);
    auto r = SharedRegion::open(options(dir, 4096));
    REQUIRE_FALSE(r);
    CHECK(r.error().code() == Errc::corrupt);
    CHECK(r.error().message() == path + " is not a dynup region: it starts with \"68 65 6c 6c 6f 2c 20 49\" "
                                        "(hex), not the magic \"DYNUPSHM\"; remove it or choose another name");
    CHECK(dynup_test::read_all(path).rfind("hello, I am a log file", 0) == 0); // left alone
  }
  SUBCASE("another capacity") {
    { SharedRegion first = open_region(options(dir, 4096)); }
    auto r = SharedRegion::open(options(dir, 8192));
    REQUIRE_FALSE(r);
    CHECK(r.error().code() == Errc::invalid_argument);
    CHECK(r.error().message().find(" holds 4096 bytes per buffer, but capacity 8192 was requested") !=
          std::string::npos);
    CHECK(SharedRegion::open(options(dir, 4096)));
  }
  SUBCASE("another layout version") {
    { SharedRegion first = open_region(options(dir, 4096)); }
    const std::uint32_t seven = 7;
    pwrite_bytes(path, layout::layout_at, &seven, sizeof seven);
    auto r = SharedRegion::open(options(dir, 4096));
    REQUIRE_FALSE(r);
    CHECK(r.error().code() == Errc::unsupported);
    CHECK(r.error().message().find("has region layout 7; this build reads layout 1") != std::string::npos);
  }
  SUBCASE("truncated") {
    { SharedRegion first = open_region(options(dir, 4096)); }
    REQUIRE(::truncate(path.c_str(), 6000) == 0);
    auto r = SharedRegion::open(options(dir, 4096));
    REQUIRE_FALSE(r);
    CHECK(r.error().code() == Errc::corrupt);
    CHECK(r.error().message() == path + " is 6000 bytes; a region of capacity 4096 is " +
                                     std::to_string(layout::file_bytes(4096)) + " (truncated or extended)");
  }
  SUBCASE("writable by others") {
    { SharedRegion first = open_region(options(dir, 4096)); }
    REQUIRE(::chmod(path.c_str(), 0666) == 0);
    auto r = SharedRegion::open(options(dir, 4096));
    REQUIRE_FALSE(r);
    CHECK(r.error().message() == path + " is writable by group or others (mode 0666, expected 0600)");
  }
  SUBCASE("a symbolic link") {
    dynup_test::write_in_place(dir.file("target"), "");
    REQUIRE(::symlink(dir.file("target").c_str(), path.c_str()) == 0);
    auto r = SharedRegion::open(options(dir, 4096));
    REQUIRE_FALSE(r);
    CHECK(r.error().message() == path + " is a symbolic link; refusing to follow it");
    CHECK(dynup_test::read_all(dir.file("target")).empty());
  }
  SUBCASE("an all-zero file of the right size (a creator killed mid-way) is initialized") {
    dynup_test::write_in_place(path, std::string(layout::file_bytes(4096), '\0'));
    ::chmod(path.c_str(), 0600);
    SharedRegion region = open_region(options(dir, 4096));
    CHECK(region.version() == 0);
    CHECK(region.write(rich_set(5)).value() == 1);
    CHECK(region.read()->source_index == 5);
  }
}

TEST_CASE("shared region: a payload altered in the file fails its checksum instead of decoding") {
  TempDir dir;
  SharedRegion region = open_region(options(dir, 4096));
  REQUIRE(region.write(rich_set(42)));
  const std::string bytes = dynup_test::read_all(region.path());
  // Turn "api-1" into "api-2": still valid JSON and a valid set, so only the CRC can tell.
  const auto at = bytes.find("\"api-1\"");
  REQUIRE(at != std::string::npos);
  pwrite_bytes(region.path(), at + 5, "2", 1);
  auto r = region.read();
  REQUIRE_FALSE(r);
  CHECK(r.error().code() == Errc::corrupt);
  CHECK(r.error().message() == "region api version 1: checksum mismatch (payload altered)");

  SUBCASE("the next write replaces the damage") {
    REQUIRE(region.write(rich_set(43)));
    REQUIRE(region.write(rich_set(44)));
    auto again = region.read();
    REQUIRE(again);
    CHECK(again->source_index == 44);
  }
}

TEST_CASE("shared region: a writer that died mid-write leaves the published set readable and the next writer continues") {
  TempDir dir;
  SharedRegion region = open_region(options(dir, 4096));
  REQUIRE(region.write(shaped_set(1)));
  REQUIRE(region.write(shaped_set(2))); // version 2 lives in slot 0; slot 1 (seq 2) is next
  // What a writer killed while filling slot 1 for version 3 leaves behind.
  pwrite_u64(region.path(), layout::slot_at[1] + layout::seq_word, 3);
  pwrite_u64(region.path(), layout::slot_at[1] + layout::version_word, 3);
  auto r = region.read();
  REQUIRE(r);
  CHECK(r->version == 2);
  CHECK(shape_problem(r.value()) == "");

  SharedRegion next_leader = open_region(options(dir, 4096));
  CHECK(next_leader.write(shaped_set(3)).value() == 3);
  auto after = region.read();
  REQUIRE(after);
  CHECK(after->version == 3);
  CHECK(shape_problem(after.value()) == "");
}

TEST_CASE("shared region: a read that always overlaps a write gives up with timeout instead of spinning forever") {
  TempDir dir;
  SharedRegion region = open_region(options(dir, 4096));
  REQUIRE(region.write(shaped_set(1))); // slot 1
  // Cannot happen with one writer (it only writes the unpublished slot); forced here to
  // check the bound.
  pwrite_u64(region.path(), layout::slot_at[1] + layout::seq_word, 7);
  auto r = region.read();
  REQUIRE_FALSE(r);
  CHECK(r.error().code() == Errc::timeout);
  CHECK(r.error().message().find("region api: writes overlapped all ") == 0);
  CHECK(region.write(shaped_set(2)).value() == 2); // slot 0: readers recover
  CHECK(region.read()->version == 2);
}

TEST_CASE("shared region: concurrent opens of a new region agree on one file") {
  TempDir dir;
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  std::vector<std::unique_ptr<SharedRegion>> slots(4);
  for (std::size_t i = 0; i < slots.size(); ++i)
    threads.emplace_back([&, i] {
      auto r = SharedRegion::open(options(dir, 8192));
      if (!r) {
        failures.fetch_add(1);
        return;
      }
      slots[i] = std::make_unique<SharedRegion>(std::move(r).value());
    });
  for (auto& t : threads) t.join();
  REQUIRE(failures.load() == 0);
  REQUIRE(slots[0]->write(rich_set(9)).value() == 1);
  for (const auto& s : slots) {
    CHECK(s->version() == 1);
    CHECK(s->read()->source_index == 9);
  }
}

TEST_CASE("shared region: threads of one process never read a torn set from one region object") {
  // One object shared by a writer thread and reader threads, as in a leader worker;
  // under TSan this also checks that the protocol has no data race.
  TempDir dir;
  SharedRegion region = open_region(options(dir, 128 * 1024));
  constexpr std::uint64_t writes = 300;
  std::atomic<bool> done{false};
  std::atomic<int> bad{0};
  std::atomic<std::uint64_t> reads{0};
  std::atomic<int> saw_last{0};
  std::string first_problem;
  std::vector<std::thread> readers;
  for (int t = 0; t < 2; ++t)
    readers.emplace_back([&] {
      std::uint64_t last = 0;
      for (;;) {
        const bool finished = done.load(std::memory_order_acquire);
        auto r = region.read();
        if (r) {
          reads.fetch_add(1, std::memory_order_relaxed);
          std::string why = shape_problem(r.value());
          if (why.empty() && r->version < last) why = "version went back";
          if (!why.empty() && bad.fetch_add(1) == 0) first_problem = why; // one writer: the first
          last = r->version;
          if (finished && last == writes) saw_last.fetch_add(1);
        } else if (r.error().code() != Errc::not_found && bad.fetch_add(1) == 0) {
          first_problem = r.error().message();
        }
        if (finished) return;
      }
    });
  bool wrote_all = true;
  for (std::uint64_t k = 1; k <= writes && wrote_all; ++k)
    wrote_all = region.write(shaped_set(k)).value_or(0) == k;
  done.store(true, std::memory_order_release);
  for (auto& t : readers) t.join();
  CHECK(wrote_all);
  CHECK_MESSAGE(bad.load() == 0, first_problem);
  CHECK(saw_last.load() == 2); // each reader's read after the last write returns it
  MESSAGE(reads.load() << " reads during " << writes << " writes");
}

TEST_CASE("shared region: readers in other processes never see a torn set while a writer process writes 3000") {
  TempDir dir;
  constexpr std::uint64_t writes = 3000;
  const auto deadline = milliseconds(120000); // sanitizer builds on a busy 2-core machine
  {
    SharedRegion create = open_region(options(dir, 128 * 1024)); // fresh: version k holds set k
  }
  Child writer([&] {
    auto region = SharedRegion::open(options(dir, 128 * 1024));
    if (!region) return 2;
    for (std::uint64_t k = 1; k <= writes; ++k) {
      auto v = region->write(shaped_set(k));
      if (!v || v.value() != k) return 3;
    }
    return 0;
  });
  // A second reader process: exit 0 after seeing the last write with every read whole.
  Child reader([&] {
    auto region = SharedRegion::open(options(dir, 128 * 1024));
    if (!region) return 2;
    std::uint64_t last = 0;
    const auto until = steady_clock::now() + deadline;
    while (last < writes && steady_clock::now() < until) {
      auto r = region->read();
      if (!r) {
        if (r.error().code() != Errc::not_found) return 4;
        continue;
      }
      if (!shape_problem(r.value()).empty()) return 5;
      if (r->version < last) return 6;
      last = r->version;
    }
    return last == writes ? 0 : 7;
  });

  SharedRegion region = open_region(options(dir, 128 * 1024));
  std::uint64_t last = 0, reads = 0, distinct = 0, torn = 0, backwards = 0, errors = 0;
  std::string first_problem;
  const auto until = steady_clock::now() + deadline;
  int status = 0;
  bool writer_done = false;
  while (!writer_done && steady_clock::now() < until) {
    writer_done = writer.exited(status);
    if (region.version() == last) { // the one-load fast path a worker uses
      std::this_thread::yield();
      continue;
    }
    auto r = region.read();
    if (!r) {
      ++errors;
      if (first_problem.empty()) first_problem = r.error().message();
      continue;
    }
    ++reads;
    std::string why = shape_problem(r.value());
    if (!why.empty()) {
      ++torn;
      if (first_problem.empty()) first_problem = why;
    }
    if (r->version < last) ++backwards;
    if (r->version != last) ++distinct;
    last = r->version;
  }
  REQUIRE_MESSAGE(writer_done, "the writer did not finish within the deadline");
  REQUIRE(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
  CHECK(reader.exit_code(deadline) == 0);
  CHECK_MESSAGE(torn == 0, first_problem);
  CHECK(backwards == 0);
  CHECK_MESSAGE(errors == 0, first_problem);
  auto final_read = region.read();
  REQUIRE(final_read);
  CHECK(final_read->version == writes);
  CHECK(shape_problem(final_read.value()) == "");
  MESSAGE(reads << " reads saw " << distinct << " distinct versions of " << writes);
}

TEST_CASE("leader lock: of two locks on one path in one process, exactly one leads") {
  TempDir dir;
  auto a = LeaderLock::open(dir.path(), "api");
  auto b = LeaderLock::open(dir.path(), "api");
  REQUIRE(a);
  REQUIRE(b);
  CHECK_FALSE(a->held());
  CHECK(a->try_acquire());
  CHECK(a->try_acquire()); // already held: still true
  CHECK_FALSE(b->try_acquire());
  CHECK(a->held());
  CHECK_FALSE(b->held());

  a->release();
  CHECK_FALSE(a->held());
  CHECK(b->try_acquire());
  CHECK_FALSE(a->try_acquire());

  SUBCASE("destroying the leader frees the lock") {
    { LeaderLock gone = std::move(b).value(); }
    CHECK(a->try_acquire());
  }
  SUBCASE("a moved lock keeps leadership") {
    LeaderLock moved = std::move(b).value();
    CHECK(moved.held());
    CHECK_FALSE(a->try_acquire());
  }
}

TEST_CASE("leader lock: a leader killed with SIGKILL loses the lock, and the next leader continues the region version") {
  TempDir dir;
  Pipe ready;
  Child leader([&] {
    auto lock = LeaderLock::open(dir.path(), "api");
    auto region = SharedRegion::open(options(dir, 8192));
    const bool led = lock && region && lock->try_acquire() && region->write(shaped_set(1)) &&
                     region->write(shaped_set(2));
    ready.send(led ? 'y' : 'n');
    while (led) ::pause(); // lead until killed
    return 2;
  });
  REQUIRE(ready.receive(milliseconds(10000)) == 'y');

  auto lock = LeaderLock::open(dir.path(), "api");
  REQUIRE(lock);
  for (int i = 0; i < 5; ++i) {
    CHECK_FALSE(lock->try_acquire());
    std::this_thread::sleep_for(milliseconds(20));
  }
  SharedRegion region = open_region(options(dir, 8192));
  CHECK(region.version() == 2);

  const auto killed_at = steady_clock::now();
  REQUIRE(::kill(leader.pid(), SIGKILL) == 0);
  bool acquired = false;
  while (!acquired && steady_clock::now() - killed_at < milliseconds(5000)) {
    acquired = lock->try_acquire();
    if (!acquired) std::this_thread::sleep_for(milliseconds(50));
  }
  const auto took = std::chrono::duration_cast<milliseconds>(steady_clock::now() - killed_at);
  REQUIRE(acquired);
  MESSAGE("took over " << took.count() << " ms after SIGKILL");
  CHECK(took < milliseconds(5000));
  CHECK(leader.exit_code(milliseconds(5000)) == 128 + SIGKILL);

  auto v = region.write(shaped_set(3));
  REQUIRE(v);
  CHECK(v.value() == 3);
  CHECK(shape_problem(region.read().value()) == "");
}

TEST_CASE("leader lock: a child process must open its own lock; an inherited one shares the parent's lock") {
  TempDir dir;
  auto parent_lock = LeaderLock::open(dir.path(), "api");
  REQUIRE(parent_lock);
  REQUIRE(parent_lock->try_acquire());
  Child child([&] {
    auto own = LeaderLock::open(dir.path(), "api");
    if (!own) return 2;
    int code = 0;
    if (own->try_acquire()) code |= 4;        // must not lead while the parent does
    if (!parent_lock->held()) code |= 8;      // the inherited copy reports the shared lock
    return code;
  });
  CHECK(child.exit_code(milliseconds(10000)) == 0);
  CHECK(parent_lock->held());
  auto other = LeaderLock::open(dir.path(), "api");
  REQUIRE(other);
  CHECK_FALSE(other->try_acquire()); // the child's exit did not take the lock with it
}

namespace {
SharedRegionOptions removable(const TempDir& dir) {
  SharedRegionOptions o = options(dir, 4096);
  o.remove_when_unused = true;
  o.companions = {dir.file("api.lock"), dir.file("api.leader")};
  return o;
}
bool exists(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0;
}
} // namespace

TEST_CASE("shared region: with remove_when_unused the last user removes the file and its companions") {
  TempDir dir;
  const std::string path = dir.file("api.dynup");
  std::optional<SharedRegion> first(open_region(removable(dir)));
  dynup_test::write_in_place(dir.file("api.leader"), "1\n");
  auto lock = LeaderLock::open(dir.path(), "api");
  REQUIRE(lock);
  {
    SharedRegion second = open_region(removable(dir));
    REQUIRE(second.write(make_set({peer("10.0.0.1", 80)}, 7)));
    CHECK(first->read()->source_index == 7); // one file, both see it
  }
  CHECK(exists(path)); // `first` still uses it
  lock = LeaderLock::open(dir.path(), "other"); // closes the api lock, as a SharedMember does before its region
  first.reset();
  CHECK_FALSE(exists(path));
  CHECK_FALSE(exists(dir.file("api.lock")));
  CHECK_FALSE(exists(dir.file("api.leader")));

  SUBCASE("without the option the file stays, as before") {
    { SharedRegion plain = open_region(options(dir, 4096)); }
    CHECK(exists(path));
  }
}

TEST_CASE("shared region: an inherited copy closed in a child does not remove the parent's file") {
  TempDir dir;
  const std::string path = dir.file("api.dynup");
  std::optional<SharedRegion> parent(open_region(removable(dir)));
  REQUIRE(parent->write(make_set({peer("10.0.0.1", 80)}, 3)));
  Child child([&] {
    std::optional<SharedRegion> inherited(std::move(parent));
    inherited.reset(); // destroyed in the child: not the opener, so it only closes
    return exists(path) ? 0 : 1;
  });
  CHECK(child.exit_code(milliseconds(10000)) == 0);
  CHECK(exists(path));
  // The child's close did not drop the parent's shared lock: another user still cannot
  // think itself the last one.
  { SharedRegion other = open_region(removable(dir)); }
  CHECK(exists(path));
  CHECK(parent->read()->source_index == 3);
  parent.reset();
  CHECK_FALSE(exists(path));
}

TEST_CASE("shared region: an open racing with the last user's close never lands on a removed file") {
  // Each round both threads hold the region; then both close at once and reopen, so one
  // of them is often the last user removing the file while the other opens. After the
  // reopen, a set written by one must be read by the other: they share one file.
  TempDir dir;
  std::atomic<int> arrived{0};
  std::atomic<int> mismatches{0}, errors{0};
  std::string first_error; // written only by the thread that counts the first error
  auto barrier = [&](int round) {
    arrived.fetch_add(1);
    while (arrived.load() < 2 * round && errors.load() == 0) std::this_thread::yield();
  };
  constexpr int rounds = 300;
  auto body = [&](bool writer) {
    std::optional<SharedRegion> r;
    int b = 0;
    for (int i = 1; i <= rounds; ++i) {
      auto opened = SharedRegion::open(removable(dir));
      if (!opened) {
        if (errors.fetch_add(1) == 0) first_error = opened.error().message();
        return;
      }
      r.emplace(std::move(opened).value());
      barrier(++b);
      if (writer && !r->write(make_set({peer("10.0.0.1", 80)}, static_cast<std::uint64_t>(i)))) ++errors;
      barrier(++b);
      if (!writer) {
        auto got = r->read();
        if (!got || got->source_index != static_cast<std::uint64_t>(i)) ++mismatches;
      }
      barrier(++b);
      r.reset(); // both close together; the next open races with the last close
    }
  };
  std::thread a(body, true), c(body, false);
  a.join();
  c.join();
  CHECK_MESSAGE(errors == 0, first_error);
  CHECK(mismatches == 0);
  CHECK_FALSE(exists(dir.file("api.dynup")));
}
