// Upstreams shared across processes ("shared" config): one leader watches and writes
// the region, followers read it; a follower leads when the leader goes. Two Upstreams in
// one process stand for two workers (each opens its own lock file description, as two
// processes would); the kill -9 case forks a real leader process.
#include <dynup/upstream.hpp>

#include <support/temp_dir.hpp>
#include <support/text.hpp>
#include <support/wait.hpp>

#include <doctest/doctest.h>
#include <httplib.h>
#include <nlohmann/json.hpp>

#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

using dynup::Upstream;
using dynup_test::contains;
using dynup_test::TempDir;
using dynup_test::wait_until;
using dynup_test::write_by_rename;
using nlohmann::json;
using namespace std::chrono_literals;

namespace {

std::string peers_doc(const std::vector<int>& ports, int weight = 1) {
  json peers = json::array();
  for (int port : ports) peers.push_back({{"host", "127.0.0.1"}, {"port", port}, {"weight", weight}});
  return json{{"peers", peers}}.dump();
}

// A peer file and a region directory; config() is what every "worker" runs.
struct Host {
  TempDir dir;
  std::string path = dir.file("peers.json");
  json shared = {{"dir", dir.path()}, {"retry_ms", 50}, {"poll_ms", 20}};

  explicit Host(const std::vector<int>& ports) { write_by_rename(path, peers_doc(ports)); }
  json config(json health = json::object()) const {
    return json{{"name", "api"}, {"source", "file://" + path}, {"health", health}, {"shared", shared}};
  }
};

std::unique_ptr<Upstream> start(const json& config) {
  auto up = Upstream::start(config);
  REQUIRE_MESSAGE(up.ok(), up.error().message());
  return std::move(up).value();
}

std::string role(const Upstream& up) { return up.status()["shared"]["role"].get<std::string>(); }

// The ports of the peers `up` routes to, from status().
std::vector<int> ports(const Upstream& up) {
  auto st = up.status();
  std::vector<int> out;
  for (const auto& p : st["peers"]) out.push_back(p["port"].get<int>());
  return out;
}

// Picks until `up` routes to exactly `want` (picking is what makes a follower look).
bool routes_to(Upstream& up, const std::vector<int>& want) {
  auto pick = up.pick();
  if (pick) up.report(pick, {1ms, 200, false});
  return ports(up) == want;
}

std::string config_error(json config) {
  auto up = Upstream::start(config);
  REQUIRE_FALSE(up.ok());
  return up.error().message();
}

} // namespace

TEST_CASE("shared upstream: the first process leads, the next follows the region") {
  Host h({8001, 8002});
  auto leader = start(h.config());
  auto follower = start(h.config());
  CHECK(role(*leader) == "leader");
  CHECK(role(*follower) == "follower");
  CHECK(ports(*follower) == std::vector<int>{8001, 8002}); // adopted before start() returned
  auto st = follower->status()["shared"];
  CHECK(st["leader_pid"] == ::getpid());
  CHECK(st["region_version"] >= 1);
  CHECK(st["applied_version"] == st["region_version"]);
  CHECK(follower->watcher_status().source.empty()); // a follower fetches nothing
  CHECK(follower->status()["source"] == "file://" + h.path); // but says what its leader watches

  write_by_rename(h.path, peers_doc({8003}));
  auto t0 = std::chrono::steady_clock::now();
  REQUIRE(wait_until([&] { return routes_to(*follower, {8003}); }));
  MESSAGE("follower routes to the new set "
          << std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0).count()
          << " ms after the file changed");
  CHECK(ports(*leader) == std::vector<int>{8003});
}

TEST_CASE("shared upstream: a follower without picks still follows (poll)") {
  Host h({8001});
  auto leader = start(h.config());
  auto follower = start(h.config());
  write_by_rename(h.path, peers_doc({8002}));
  CHECK(wait_until([&] { return ports(*follower) == std::vector<int>{8002}; })); // status() does not pick
}

TEST_CASE("shared upstream: a follower's status says how fresh its leader's set is") {
  Host h({8001});
  auto leader = start(h.config());
  auto follower = start(h.config());
  REQUIRE(role(*follower) == "follower");
  auto fresh = [&](const Upstream& up) {
    auto st = up.status();
    return st["stale"] == false && st["age_ms"].is_number() && st["age_ms"].get<long long>() < 60000;
  };
  REQUIRE(wait_until([&] { return fresh(*follower); }));
  CHECK(follower->status()["shared"]["leader_watcher"]["last_error"] == "");

  write_by_rename(h.path, "{\"peers\": [");  // the leader cannot read it: its set is stale
  REQUIRE(wait_until([&] { return leader->status()["stale"] == true; }));
  CHECK(wait_until([&] { return follower->status()["stale"] == true; }));
  auto st = follower->status();
  CHECK(st["shared"]["leader_watcher"]["last_error"] != "");
  CHECK(ports(*follower) == std::vector<int>{8001}); // the last good set, still served

  write_by_rename(h.path, peers_doc({8002}));
  CHECK(wait_until([&] { return routes_to(*follower, {8002}) && fresh(*follower); }));
}

TEST_CASE("shared upstream: when the leader stops, a follower leads and watches the source") {
  Host h({8001});
  auto a = start(h.config());
  auto b = start(h.config());
  auto c = start(h.config());
  REQUIRE(role(*a) == "leader");
  a.reset(); // its lock goes with it
  auto t0 = std::chrono::steady_clock::now();
  REQUIRE(wait_until([&] { return role(*b) == "leader" || role(*c) == "leader"; }));
  MESSAGE("a follower led after " << std::chrono::duration_cast<std::chrono::milliseconds>(
                                         std::chrono::steady_clock::now() - t0)
                                         .count()
                                  << " ms (retry_ms 50)");
  const bool both = role(*b) == "leader" && role(*c) == "leader";
  CHECK_FALSE(both); // never two
  Upstream& now = role(*b) == "leader" ? *b : *c;
  Upstream& other = role(*b) == "leader" ? *c : *b;
  CHECK(wait_until([&] { return !now.watcher_status().source.empty(); })); // its watcher starts
  write_by_rename(h.path, peers_doc({8009}));
  CHECK(wait_until([&] { return routes_to(other, {8009}); }));
  CHECK(ports(now) == std::vector<int>{8009});
}

TEST_CASE("shared upstream: followers route around the peers the leader's active checks failed") {
  httplib::Server good;
  good.Get("/health", [](const httplib::Request&, httplib::Response& r) { r.set_content("ok", "text/plain"); });
  int good_port = good.bind_to_any_port("127.0.0.1");
  std::thread serving([&] { good.listen_after_bind(); });
  httplib::Server bad;
  bad.Get("/health", [](const httplib::Request&, httplib::Response& r) { r.status = 503; });
  int bad_port = bad.bind_to_any_port("127.0.0.1");
  std::thread serving_bad([&] { bad.listen_after_bind(); });
  {
    Host h({good_port, bad_port});
    json health = {{"active",
                    {{"type", "http"}, {"path", "/health"}, {"interval_ms", 50}, {"timeout_ms", 1000},
                     {"unhealthy_threshold", 2}, {"healthy_threshold", 1}}}};
    auto leader = start(h.config(health));
    auto follower = start(h.config(health));
    REQUIRE(role(*follower) == "follower");
    std::string bad_id = "127.0.0.1:" + std::to_string(bad_port);
    auto bad_in = [&](const Upstream& up) {
      auto st = up.status();
      for (const auto& p : st["peers"])
        if (p["id"] == bad_id) return json(p);
      return json();
    };
    REQUIRE(wait_until([&] { return bad_in(*follower)["available"] == false; }));
    std::string reason = bad_in(*follower)["reason"];
    CHECK_MESSAGE(contains(reason, "active (leader process)"), reason);
    CHECK_MESSAGE(contains(reason, "503"), reason);
    for (int i = 0; i < 20; ++i) {
      auto s = follower->pick();
      REQUIRE(s);
      CHECK(s.peer->port == good_port);
      follower->report(s, {1ms, 200, false});
    }
    // The leader's own view keeps its own reason.
    CHECK(contains(bad_in(*leader)["reason"].get<std::string>(), "active: "));
  }
  good.stop();
  bad.stop();
  serving.join();
  serving_bad.join();
}

TEST_CASE("shared upstream: a set too large for the region is refused and said so; followers keep theirs") {
  Host h({8001});
  h.shared["capacity_bytes"] = 1024;
  auto leader = start(h.config());
  auto follower = start(h.config());
  std::vector<int> many;
  for (int p = 9000; p < 9100; ++p) many.push_back(p);
  write_by_rename(h.path, peers_doc(many));
  REQUIRE(wait_until([&] { return ports(*leader).size() == 100; })); // the leader serves it itself
  REQUIRE(wait_until([&] { return !leader->status()["shared"]["last_error"].get<std::string>().empty(); }));
  std::string error = leader->status()["shared"]["last_error"];
  CHECK_MESSAGE(contains(error, "bytes"), error);
  CHECK_MESSAGE(contains(error, "1024"), error);
  CHECK(routes_to(*follower, {8001}));
  write_by_rename(h.path, peers_doc({8002})); // small again: shared again, error cleared
  CHECK(wait_until([&] { return routes_to(*follower, {8002}); }));
  CHECK(wait_until([&] { return leader->status()["shared"]["last_error"] == ""; }));
}

TEST_CASE("shared upstream: config errors name the field") {
  Host h({8001});
  json c = h.config();
  c["shared"]["capacity_bytes"] = 10;
  CHECK(contains(config_error(c), "upstream.shared.capacity_bytes"));
  c = h.config();
  c["shared"]["name"] = "no spaces";
  CHECK(contains(config_error(c), "upstream.shared.name"));
  c = h.config();
  c["shared"]["ttl"] = 1;
  CHECK(contains(config_error(c), "upstream.shared.ttl: unknown key"));
  c = h.config();
  c["shared"]["dir"] = h.dir.path() + "/missing";
  CHECK(contains(config_error(c), "upstream.shared"));
}

TEST_CASE("shared upstream: kill -9 of the leader process, and a follower leads within a second") {
  Host h({8001});
  int ready[2];
  REQUIRE(::pipe(ready) == 0);
  const json config = h.config();
  pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    // The leader process: leads, says so, and waits to be killed.
    ::close(ready[0]);
    auto up = Upstream::start(config);
    char ok = up.ok() && up.value()->status()["shared"]["role"] == "leader" ? 'L' : 'x';
    if (::write(ready[1], &ok, 1) != 1) ::_exit(2);
    for (int i = 0; i < 600; ++i) ::sleep(1); // bounded: 10 minutes at most
    ::_exit(0);
  }
  ::close(ready[1]);
  char said = 0;
  REQUIRE(::read(ready[0], &said, 1) == 1);
  ::close(ready[0]);
  REQUIRE(said == 'L');
  auto follower = start(config);
  CHECK(role(*follower) == "follower");
  CHECK(follower->status()["shared"]["leader_pid"] == child);
  for (int i = 0; i < 5; ++i) {
    std::this_thread::sleep_for(60ms);
    CHECK(role(*follower) == "follower"); // never leads while the leader lives
  }
  auto t0 = std::chrono::steady_clock::now();
  REQUIRE(::kill(child, SIGKILL) == 0);
  int status = 0;
  REQUIRE(::waitpid(child, &status, 0) == child);
  bool led = wait_until([&] { return role(*follower) == "leader"; });
  auto took = std::chrono::steady_clock::now() - t0;
  REQUIRE(led);
  MESSAGE("after kill -9 of the leader, the follower led in "
          << std::chrono::duration_cast<std::chrono::milliseconds>(took).count() << " ms (retry_ms 50)");
  CHECK(took < 1s);
  CHECK(follower->status()["shared"]["leader_pid"] == ::getpid());
  write_by_rename(h.path, peers_doc({8004}));
  CHECK(wait_until([&] { return routes_to(*follower, {8004}); }));
}

TEST_CASE("shared upstream: the .leader file is mode 0600 under umask 0, and a link planted there is not followed") {
  Host h({8001});
  const std::string leader_file = h.dir.file("api.leader");
  SUBCASE("umask 0") {
    const mode_t old = ::umask(0);
    auto leader = start(h.config());
    ::umask(old);
    REQUIRE(role(*leader) == "leader");
    struct stat st {};
    REQUIRE(::lstat(leader_file.c_str(), &st) == 0);
    CHECK(S_ISREG(st.st_mode));
    CHECK((st.st_mode & 07777) == 0600);
  }
  SUBCASE("a symbolic link at the .leader path") {
    const std::string victim = h.dir.file("victim");
    write_by_rename(victim, "keep me");
    REQUIRE(::symlink(victim.c_str(), leader_file.c_str()) == 0);
    std::mutex mu;
    std::vector<std::string> heard;
    auto up = Upstream::start(h.config(), dynup::steady_clock(), [&](const dynup::Error& e) {
      std::lock_guard<std::mutex> lock(mu);
      heard.push_back(e.message());
    });
    REQUIRE_MESSAGE(up.ok(), up.error().message());
    REQUIRE(role(**up) == "leader");
    CHECK(wait_until([&] {
      std::lock_guard<std::mutex> lock(mu);
      return std::any_of(heard.begin(), heard.end(), [&](const std::string& m) {
        return contains(m, "leader file") && contains(m, "symbolic link") && contains(m, leader_file);
      });
    }));
    CHECK(dynup_test::read_all(victim) == "keep me");
    struct stat st {};
    REQUIRE(::lstat(leader_file.c_str(), &st) == 0);
    CHECK(S_ISLNK(st.st_mode));
  }
}
