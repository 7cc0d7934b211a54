#include <dynup/publisher.hpp>
#include <dynup/snapshot_file.hpp>

#include <support/temp_dir.hpp>
#include <support/text.hpp>

#include "support/peers.hpp"
#include <doctest/doctest.h>

#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

namespace {

using dynup::Errc;
using dynup::Peer;
using dynup::PeerSet;
using dynup_test::TempDir;
using std::chrono::milliseconds;
using std::chrono::system_clock;

using dynup_test::make_set;
using dynup_test::peer;

// Every field set to something other than its default, including an IPv6 host.
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
  return make_set({a, b, c}, index);
}

// A set published `times` times so it carries a non-zero version, as the watcher saves it.
dynup::Snapshot published(const PeerSet& set, int times) {
  dynup::Publisher pub;
  for (int i = 1; i < times; ++i)
    (void)pub.publish(make_set({peer("10.9.9.9", static_cast<std::uint16_t>(i))}));
  (void)pub.publish(set);
  return pub.current();
}

const system_clock::time_point fixed_time{milliseconds(1700000000123)}; // 2023-11-14T22:13:20.123Z

std::string saved_bytes(const TempDir& dir, const PeerSet& set) {
  std::string path = dir.file("snap");
  REQUIRE(dynup::save_snapshot(path, set, fixed_time));
  return dynup_test::read_all(path);
}

std::size_t payload_offset(const std::string& data) {
  auto nl = data.find('\n');
  REQUIRE(nl != std::string::npos);
  return nl + 1;
}

struct UmaskGuard {
  explicit UmaskGuard(mode_t m) : old(::umask(m)) {}
  ~UmaskGuard() { ::umask(old); }
  mode_t old;
};

} // namespace

TEST_CASE("a saved snapshot loads back with its peers, index, version and save time") {
  TempDir dir;
  std::string path = dir.file("api.snapshot");
  auto set = published(rich_set(42), 3);
  REQUIRE(set->version() == 3);

  auto saved = dynup::save_snapshot(path, *set, fixed_time);
  REQUIRE_MESSAGE(saved, (saved ? "" : saved.error().message()));
  auto loaded = dynup::load_snapshot(path);
  REQUIRE_MESSAGE(loaded, (loaded ? "" : loaded.error().message()));

  CHECK(loaded->set.same_content(*set));
  CHECK(loaded->set.peers() == set->peers());
  CHECK(loaded->set.source_index() == 42);
  CHECK(loaded->set.version() == 0); // a publisher assigns a fresh one
  CHECK(loaded->saved_version == 3);
  CHECK(loaded->saved_at == fixed_time);
  const Peer* api = loaded->set.find("api-1");
  REQUIRE(api != nullptr);
  CHECK(api->backup);
  CHECK(api->zone == "eu-1a");
  CHECK(api->tags == std::vector<std::string>{"canary", "v2"});
  CHECK(api->meta.at("owner") == "team \"quoted\" \\ ü");
  CHECK(api->health == dynup::Health::warning);
  const Peer* v6 = loaded->set.find("[2001:db8::1]:443");
  REQUIRE(v6 != nullptr);
  CHECK(v6->weight == 65535);
}

TEST_CASE("the save time is stored to the millisecond, readable in the payload") {
  TempDir dir;
  auto t = fixed_time + std::chrono::microseconds(999); // sub-millisecond part is dropped
  std::string path = dir.file("snap");
  REQUIRE(dynup::save_snapshot(path, make_set({peer("10.0.0.1", 80)}), t));
  std::string data = dynup_test::read_all(path);
  CHECK(data.find("\"saved_at\":\"2023-11-14T22:13:20.123Z\"") != std::string::npos);
  auto loaded = dynup::load_snapshot(path);
  REQUIRE(loaded);
  CHECK(loaded->saved_at == fixed_time);
}

TEST_CASE("an empty peer set round-trips") {
  TempDir dir;
  std::string path = dir.file("snap");
  REQUIRE(dynup::save_snapshot(path, PeerSet{}, fixed_time));
  auto loaded = dynup::load_snapshot(path);
  REQUIRE(loaded);
  CHECK(loaded->set.empty());
  CHECK(loaded->saved_version == 0);
}

TEST_CASE("a snapshot with a short payload (empty set saved at the epoch) loads back") {
  TempDir dir;
  std::string path = dir.file("snap");
  // An 88-byte payload, so the header's length field has only two digits.
  for (auto t : {system_clock::time_point{}, system_clock::time_point{milliseconds(5)}}) {
    REQUIRE(dynup::save_snapshot(path, PeerSet{}, t));
    std::string data = dynup_test::read_all(path);
    CHECK(data.size() - payload_offset(data) < 100);
    auto loaded = dynup::load_snapshot(path);
    REQUIRE_MESSAGE(loaded, (loaded ? "" : loaded.error().message()));
    CHECK(loaded->set.empty());
    CHECK(loaded->saved_at == t);
  }
}

TEST_CASE("a second save replaces the first") {
  TempDir dir;
  std::string path = dir.file("snap");
  REQUIRE(dynup::save_snapshot(path, make_set({peer("10.0.0.1", 80)}, 1)));
  REQUIRE(dynup::save_snapshot(path, make_set({peer("10.0.0.2", 81)}, 2)));
  auto loaded = dynup::load_snapshot(path);
  REQUIRE(loaded);
  REQUIRE(loaded->set.size() == 1);
  CHECK(loaded->set[0].id == "10.0.0.2:81");
  CHECK(loaded->set.source_index() == 2);
}

TEST_CASE("the snapshot file has mode 0600 whatever the umask") {
  TempDir dir;
  for (mode_t mask : {mode_t(0), mode_t(022), mode_t(077)}) {
    CAPTURE(mask);
    UmaskGuard guard(mask);
    std::string path = dir.file("snap-" + std::to_string(mask));
    REQUIRE(dynup::save_snapshot(path, make_set({peer("10.0.0.1", 80)})));
    struct stat st {};
    REQUIRE(::stat(path.c_str(), &st) == 0);
    CHECK((st.st_mode & 07777) == 0600);
    CHECK(S_ISREG(st.st_mode));
  }
}

TEST_CASE("saving leaves no temporary file in the directory") {
  TempDir dir;
  std::string path = dir.file("snap");
  for (int i = 0; i < 20; ++i)
    REQUIRE(dynup::save_snapshot(path, make_set({peer("10.0.0.1", static_cast<std::uint16_t>(80 + i))})));
  CHECK(dir.entries() == std::vector<std::string>{"snap"});
}

TEST_CASE("a save that cannot rename removes its temporary file and keeps the target") {
  TempDir dir;
  std::string target = dir.file("occupied");
  REQUIRE(::mkdir(target.c_str(), 0700) == 0); // a non-empty directory cannot be renamed over
  dynup_test::write_in_place(target + "/keep", "x");
  auto r = dynup::save_snapshot(target, make_set({peer("10.0.0.1", 80)}));
  REQUIRE_FALSE(r);
  CHECK(r.error().code() == Errc::io_error);
  CHECK(r.error().message().find(target) != std::string::npos);
  CHECK(dir.entries() == std::vector<std::string>{"occupied"});
  CHECK(TempDir::list_dir(target) == std::vector<std::string>{"keep"});
}

TEST_CASE("saving into a directory that does not exist fails clearly and creates nothing") {
  TempDir dir;
  std::string missing_dir = dir.file("no-such-dir");
  std::string path = missing_dir + "/snap";
  auto r = dynup::save_snapshot(path, make_set({peer("10.0.0.1", 80)}));
  REQUIRE_FALSE(r);
  CHECK(r.error().code() == Errc::not_found);
  CHECK(r.error().message().find(missing_dir) != std::string::npos);
  CHECK(r.error().message().find("No such file or directory") != std::string::npos);
  CHECK_FALSE(dynup_test::exists(missing_dir));
  CHECK(dir.entries().empty());
}

TEST_CASE("a snapshot cut at any byte is rejected as corrupt") {
  TempDir dir;
  std::string data = saved_bytes(dir, *published(rich_set(7), 2));
  REQUIRE(data.size() > 100);
  std::string path = dir.file("cut");
  std::size_t accepted = 0, wrong_code = 0;
  for (std::size_t len = 0; len < data.size(); ++len) {
    dynup_test::write_in_place(path, data.substr(0, len));
    auto r = dynup::load_snapshot(path);
    if (r) {
      ++accepted;
      MESSAGE("accepted a file cut at byte " << len);
    } else if (r.error().code() != Errc::corrupt) {
      ++wrong_code;
      MESSAGE("cut at " << len << ": " << dynup::to_string(r.error().code()) << ": " << r.error().message());
    }
  }
  CHECK(accepted == 0);
  CHECK(wrong_code == 0);
  dynup_test::write_in_place(path, data);
  CHECK(dynup::load_snapshot(path)); // the uncut bytes are fine
}

TEST_CASE("an empty snapshot file is rejected as corrupt, naming the path") {
  TempDir dir;
  std::string path = dir.file("empty");
  dynup_test::write_in_place(path, "");
  auto r = dynup::load_snapshot(path);
  REQUIRE_FALSE(r);
  CHECK(r.error().code() == Errc::corrupt);
  CHECK(r.error().message().find(path) != std::string::npos);
}

TEST_CASE("changing any single byte of the payload is rejected as corrupt") {
  TempDir dir;
  std::string data = saved_bytes(dir, *published(rich_set(7), 2));
  std::size_t start = payload_offset(data);
  std::size_t accepted = 0, wrong_code = 0, tried = 0;
  for (std::size_t i = start; i < data.size(); ++i) {
    for (unsigned char mask : {0x01, 0x20, 0x80, 0xff}) {
      std::string bad = data;
      bad[i] = static_cast<char>(static_cast<unsigned char>(bad[i]) ^ mask);
      ++tried;
      auto r = dynup::decode_snapshot(bad);
      if (r) ++accepted;
      else if (r.error().code() != Errc::corrupt) ++wrong_code;
    }
  }
  CHECK(tried == (data.size() - start) * 4);
  CHECK(accepted == 0);
  CHECK(wrong_code == 0);
}

TEST_CASE("changing a header byte never yields a different set") {
  TempDir dir;
  auto original = published(rich_set(7), 2);
  std::string data = saved_bytes(dir, *original);
  std::size_t end = payload_offset(data);
  std::size_t different = 0;
  for (std::size_t i = 0; i < end; ++i) {
    for (unsigned char mask : {0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80}) {
      std::string bad = data;
      bad[i] = static_cast<char>(static_cast<unsigned char>(bad[i]) ^ mask);
      auto r = dynup::decode_snapshot(bad);
      // A hex digit's case may flip harmlessly; anything that decodes must be the original.
      if (r && !r->set.same_content(*original)) ++different;
    }
  }
  CHECK(different == 0);
}

TEST_CASE("trailing data after the payload is rejected as corrupt") {
  TempDir dir;
  std::string data = saved_bytes(dir, make_set({peer("10.0.0.1", 80)}));
  for (const std::string& extra : {std::string("\n"), std::string("x"), std::string(1, '\0'), data}) {
    auto r = dynup::decode_snapshot(data + extra);
    REQUIRE_FALSE(r);
    CHECK(r.error().code() == Errc::corrupt);
  }
  std::string path = dir.file("extended");
  dynup_test::write_in_place(path, data + "\n");
  auto r = dynup::load_snapshot(path);
  REQUIRE_FALSE(r);
  CHECK(r.error().code() == Errc::corrupt);
}

TEST_CASE("a checksum field that is not exactly 8 hex digits is rejected as corrupt") {
  TempDir dir;
  std::string data = saved_bytes(dir, make_set({peer("10.0.0.1", 80)}));
  std::size_t nl = payload_offset(data) - 1;
  std::string crc = data.substr(nl - 8, 8);
  std::string before = data.substr(0, nl - 8), after = data.substr(nl);
  REQUIRE(dynup::decode_snapshot(before + crc + after)); // the untouched pieces are valid
  for (const std::string& field : {"0" + crc, crc.substr(1), crc + " ", "x" + crc.substr(1)}) {
    CAPTURE(field);
    auto r = dynup::decode_snapshot(before + field + after);
    REQUIRE_FALSE(r);
    CHECK(r.error().code() == Errc::corrupt);
  }
}

TEST_CASE("an unknown format version is reported as unsupported") {
  TempDir dir;
  std::string data = saved_bytes(dir, make_set({peer("10.0.0.1", 80)}));
  REQUIRE(data.rfind("dynup-snapshot 1 ", 0) == 0);
  for (const char* format : {"2", "0", "99"}) {
    CAPTURE(format);
    std::string other = "dynup-snapshot " + std::string(format) + data.substr(16);
    std::string path = dir.file("future");
    dynup_test::write_in_place(path, other);
    auto r = dynup::load_snapshot(path);
    REQUIRE_FALSE(r);
    CHECK(r.error().code() == Errc::unsupported);
    CHECK(r.error().message().find("format") != std::string::npos);
  }
}

TEST_CASE("data that is not a snapshot is rejected as corrupt") {
  for (const std::string& text :
       {std::string(R"({"peers":["10.0.0.1:80"]})"), std::string("dynup-snapshot\n"),
        std::string("dynup-snapshot 1 2 00000000\n{}"), std::string("dynup-snapshot 1 x y\n"),
        std::string("DYNUP-SNAPSHOT 1 2 00000000\n{}")}) {
    CAPTURE(text);
    auto r = dynup::decode_snapshot(text);
    REQUIRE_FALSE(r);
    CHECK(r.error().code() == Errc::corrupt);
  }
}

TEST_CASE("loading a missing snapshot file reports not_found with the path") {
  TempDir dir;
  std::string path = dir.file("absent");
  auto r = dynup::load_snapshot(path);
  REQUIRE_FALSE(r);
  CHECK(r.error().code() == Errc::not_found);
  CHECK(r.error().message().find(path) != std::string::npos);
}

TEST_CASE("loading a directory instead of a file is an error") {
  TempDir dir;
  auto r = dynup::load_snapshot(dir.path());
  REQUIRE_FALSE(r);
  CHECK(r.error().code() == Errc::io_error);
  CHECK(r.error().message().find(dir.path()) != std::string::npos);
}

TEST_CASE("concurrent saves and loads: every load returns one complete saved set") {
  TempDir dir;
  std::string path = dir.file("snap");
  constexpr int savers = 3, saves_each = 100;
  // Set k: 2 + k peers, each carrying k in meta, so a mix of two files would show.
  std::vector<PeerSet> sets;
  for (int k = 0; k <= savers; ++k) {
    std::vector<Peer> peers;
    for (int i = 0; i < 2 + k; ++i) {
      Peer p = peer("10.3." + std::to_string(k) + "." + std::to_string(i + 1), 8080);
      p.meta["saver"] = std::to_string(k);
      peers.push_back(p);
    }
    sets.push_back(make_set(peers, static_cast<std::uint64_t>(k)));
  }
  REQUIRE(dynup::save_snapshot(path, sets[0])); // so the loader never meets "missing"

  std::atomic<int> savers_running{savers};
  std::atomic<int> save_failures{0};
  std::vector<std::thread> threads;
  for (int k = 1; k <= savers; ++k) {
    threads.emplace_back([&, k] {
      for (int i = 0; i < saves_each; ++i)
        if (!dynup::save_snapshot(path, sets[static_cast<std::size_t>(k)])) save_failures.fetch_add(1);
      savers_running.fetch_sub(1);
    });
  }
  std::size_t loads = 0, failed = 0, unknown = 0;
  std::vector<std::string> errors;
  for (int i = 0; i < 100000; ++i) { // bounded; normally ends when the savers do
    bool last_round = savers_running.load() == 0;
    auto r = dynup::load_snapshot(path);
    ++loads;
    if (!r) {
      ++failed;
      if (errors.size() < 3) errors.push_back(r.error().message());
    } else {
      bool known = false;
      for (const auto& s : sets) known = known || (r->set.same_content(s) && r->set.source_index() == s.source_index());
      if (!known) ++unknown;
    }
    if (last_round) break;
  }
  for (auto& t : threads) t.join();
  for (const auto& e : errors) MESSAGE(e);
  CHECK(save_failures.load() == 0);
  CHECK(loads > 0);
  CHECK(failed == 0);
  CHECK(unknown == 0);
  CHECK(dir.entries() == std::vector<std::string>{"snap"});
}

TEST_CASE("an atomic write never follows a symbolic link at its temporary or final name") {
  TempDir dir;
  std::string victim = dir.file("victim");
  {
    std::ofstream out(victim);
    out << "keep me";
  }
  std::string path = dir.file("api.leader");

  SUBCASE("a link planted at the temporary name") {
    unsigned next = dynup::detail::temp_sequence().load();
    std::string tmp = dynup::detail::temp_path_for(path, next);
    REQUIRE(::symlink(victim.c_str(), tmp.c_str()) == 0);
    auto r = dynup::detail::write_file_atomic(path, "123\n", false);
    REQUIRE_FALSE(r);
    CHECK_MESSAGE(dynup_test::contains(r.error().message(), tmp), r.error().message());
    CHECK_MESSAGE(dynup_test::contains(r.error().message(), "not following"), r.error().message());
    ::unlink(tmp.c_str());
  }
  SUBCASE("a link planted at the final name") {
    REQUIRE(::symlink(victim.c_str(), path.c_str()) == 0);
    auto r = dynup::save_snapshot(path, make_set({peer("10.0.0.1", 80)}));
    REQUIRE_FALSE(r);
    CHECK_MESSAGE(dynup_test::contains(r.error().message(), "symbolic link"), r.error().message());
    struct stat st {};
    REQUIRE(::lstat(path.c_str(), &st) == 0);
    CHECK(S_ISLNK(st.st_mode));
  }
  CHECK(dynup_test::read_all(victim) == "keep me");
}

TEST_CASE("an atomic write is mode 0600 under umask 0 and refuses a directory others can write") {
  TempDir dir;
  {
    UmaskGuard guard(0);
    std::string path = dir.file("api.leader");
    REQUIRE(dynup::detail::write_file_atomic(path, "123\n", false));
    struct stat st {};
    REQUIRE(::stat(path.c_str(), &st) == 0);
    CHECK((st.st_mode & 07777) == 0600);
    CHECK(dynup_test::read_all(path) == "123\n");
  }
  REQUIRE(::chmod(dir.path().c_str(), 0777) == 0);
  auto r = dynup::detail::write_file_atomic(dir.file("x"), "1", false);
  REQUIRE_FALSE(r);
  CHECK_MESSAGE(dynup_test::contains(r.error().message(), "writable by group or others"), r.error().message());
  CHECK_MESSAGE(dynup_test::contains(r.error().message(), dir.path()), r.error().message());
  // With the sticky bit (as /tmp and /dev/shm have) others cannot replace our files.
  REQUIRE(::chmod(dir.path().c_str(), 01777) == 0);
  CHECK(dynup::detail::write_file_atomic(dir.file("x"), "1", false));
  ::chmod(dir.path().c_str(), 0700);
}
