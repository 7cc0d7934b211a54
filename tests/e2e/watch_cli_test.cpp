// dynup-watch as a user runs it: a real process on a real file; SIGTERM while the first
// fetch is stuck on a registry that never answers or trickles its reply; specs it cannot
// watch (push://); --check-config, the check of an upstream's config that `nginx -t`
// cannot make.
#include <support/process.hpp>
#include <support/temp_dir.hpp>
#include <support/wait.hpp>

#include <doctest/doctest.h>
#include <nlohmann/json.hpp>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#ifndef DYNUP_WATCH_BIN
#error "DYNUP_WATCH_BIN must name the dynup-watch binary (tests/CMakeLists.txt defines it)"
#endif

namespace {

using dynup_test::Process;
using dynup_test::TempDir;
using dynup_test::write_by_rename;
using Stream = dynup_test::Process::Stream;
using namespace std::chrono_literals;

// Generous: a sanitizer build starts slowly, and we never assert tight timing.
constexpr auto line_timeout = 5000ms;

std::string peers_doc(int port) {
  return R"({"peers":[{"host":"10.0.0.1","port":)" + std::to_string(port) +
         R"(,"weight":2,"zone":"z1"},"10.0.0.2:9000"]})";
}

Process watch(const std::vector<std::string>& args) {
  std::vector<std::string> argv{DYNUP_WATCH_BIN};
  argv.insert(argv.end(), args.begin(), args.end());
  return Process(argv);
}

// A stdout line: JSON whose keys start "version","index","peers", in that order.
nlohmann::ordered_json parse_version_line(const std::string& line) {
  INFO("line: " << line);
  CHECK(line.rfind("{\"version\":", 0) == 0);
  auto doc = nlohmann::ordered_json::parse(line, nullptr, false);
  REQUIRE_FALSE(doc.is_discarded());
  REQUIRE(doc.is_object());
  std::vector<std::string> keys;
  for (auto it = doc.begin(); it != doc.end(); ++it) keys.push_back(it.key());
  REQUIRE(keys.size() >= 3);
  CHECK(keys[0] == "version");
  CHECK(keys[1] == "index");
  CHECK(keys[2] == "peers");
  REQUIRE(doc["peers"].is_array());
  return doc;
}

std::string next_line(Process& p, Stream s) {
  auto line = p.read_line(s, line_timeout);
  REQUIRE_MESSAGE(line.has_value(), "no line within the timeout");
  return *line;
}

// A registry that takes connections and reads requests but never completes a reply:
// `silent` sends nothing; `trickle` sends a 200 header promising a large body, then one
// body byte every 500 ms (a client's read timeout applies between bytes, so it waits
// forever). One thread on 127.0.0.1, port 0; stopped and joined by the destructor.
class StuckRegistry {
public:
  enum class Mode { silent, trickle };

  explicit StuckRegistry(Mode mode) : mode_(mode) {
    fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    if (fd_ < 0 || ::bind(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 || ::listen(fd_, 16) != 0 ||
        ::getsockname(fd_, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
      if (fd_ >= 0) ::close(fd_);
      throw std::runtime_error("StuckRegistry: cannot listen on 127.0.0.1:0");
    }
    port_ = ntohs(a.sin_port);
    thread_ = std::thread([this] { run(); });
  }
  ~StuckRegistry() {
    stop_ = true;
    thread_.join();
    for (int c : clients_) ::close(c);
    ::close(fd_);
  }
  StuckRegistry(const StuckRegistry&) = delete;
  StuckRegistry& operator=(const StuckRegistry&) = delete;

  std::string consul_spec() const { return "consul://127.0.0.1:" + std::to_string(port_) + "/health/api"; }
  /// Requests whose whole header has arrived.
  int requests() const { return requests_.load(); }
  /// Body bytes sent (trickle).
  int body_bytes() const { return body_bytes_.load(); }

private:
  void run() {
    std::string request;
    int client = -1;
    auto next_byte = std::chrono::steady_clock::now();
    while (!stop_) {
      pollfd p[2] = {{fd_, POLLIN, 0}, {client, POLLIN, 0}};
      ::poll(p, client >= 0 ? 2 : 1, 50);
      if (p[0].revents & POLLIN) {
        int c = ::accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC);
        if (c >= 0) {
          clients_.push_back(c);
          client = c; // the newest connection is the one served; older ones stay open, unanswered
          request.clear();
        }
      }
      if (client >= 0 && (p[1].revents & POLLIN) && request.find("\r\n\r\n") == std::string::npos) {
        char buf[4096];
        ssize_t n = ::recv(client, buf, sizeof buf, 0);
        if (n > 0) request.append(buf, static_cast<std::size_t>(n));
        if (request.find("\r\n\r\n") != std::string::npos) {
          ++requests_;
          if (mode_ == Mode::trickle) {
            const std::string head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Consul-Index: 7\r\n"
                                     "Content-Length: 1000000\r\n\r\n[";
            (void)::send(client, head.data(), head.size(), MSG_NOSIGNAL);
            ++body_bytes_;
            next_byte = std::chrono::steady_clock::now() + 500ms;
          }
        }
      }
      if (mode_ == Mode::trickle && requests_ > 0 && std::chrono::steady_clock::now() >= next_byte) {
        (void)::send(client, " ", 1, MSG_NOSIGNAL);
        ++body_bytes_;
        next_byte += 500ms;
      }
    }
  }

  Mode mode_;
  int fd_ = -1;
  std::uint16_t port_ = 0;
  std::vector<int> clients_; // the registry thread's until it is joined
  std::atomic<bool> stop_{false};
  std::atomic<int> requests_{0};
  std::atomic<int> body_bytes_{0};
  std::thread thread_;
};

// SIGTERM to a dynup-watch stuck in its first fetch: it exits 0, as after a SIGTERM
// once watching, within `line_timeout` (the hung fetch alone takes 10 s, the trickle
// forever).
void sigterm_exits_during_first_fetch(StuckRegistry& registry, const std::function<bool()>& stuck) {
  Process p = watch({registry.consul_spec()});
  REQUIRE_MESSAGE(dynup_test::wait_until(stuck, 10000ms), "dynup-watch never reached the registry");
  const auto sent = std::chrono::steady_clock::now();
  p.send(SIGTERM);
  auto st = p.wait_exit(line_timeout);
  REQUIRE_MESSAGE(st.has_value(), "still running " << line_timeout.count() << " ms after SIGTERM");
  MESSAGE("exited "
          << std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - sent).count()
          << " ms after SIGTERM");
  CHECK(st->exited);
  CHECK(st->code == 0);
  CHECK(p.read_all(Stream::out, line_timeout).empty()); // nothing was published
}

} // namespace

TEST_CASE("dynup-watch prints each published version and reports bad files on stderr") {
  TempDir dir;
  std::string path = dir.file("peers.json");
  write_by_rename(path, peers_doc(8001));
  Process p = watch({"file://" + path});

  auto first = parse_version_line(next_line(p, Stream::out));
  CHECK(first["version"] == 1);
  CHECK(first["index"] == 1);
  REQUIRE(first["peers"].size() == 2);
  CHECK(first["peers"][0]["id"] == "10.0.0.1:8001");
  CHECK(first["peers"][0]["host"] == "10.0.0.1");
  CHECK(first["peers"][0]["port"] == 8001);
  CHECK(first["peers"][0]["weight"] == 2);
  CHECK(first["peers"][0]["zone"] == "z1");
  CHECK(first["peers"][0]["health"] == "passing");
  CHECK(first["peers"][1]["id"] == "10.0.0.2:9000");

  write_by_rename(path, peers_doc(8002));
  auto second = parse_version_line(next_line(p, Stream::out));
  CHECK(second["version"] == 2);
  CHECK(second["peers"][0]["port"] == 8002);

  write_by_rename(path, "{\"peers\": [ this is not json");
  std::string err = next_line(p, Stream::err);
  CHECK(err.rfind("dynup-watch: ", 0) == 0);
  CHECK(err.find(path) != std::string::npos);
  CHECK_FALSE(p.read_line(Stream::out, 500ms).has_value()); // the last good set stays

  write_by_rename(path, peers_doc(8003));
  auto third = parse_version_line(next_line(p, Stream::out));
  CHECK(third["version"] == 3);
  CHECK(third["peers"][0]["port"] == 8003);

  auto st = p.stop();
  CHECK(st.exited);
  CHECK(st.code == 0);
}

TEST_CASE("dynup-watch does not print a line when the content is unchanged") {
  TempDir dir;
  std::string path = dir.file("peers.json");
  write_by_rename(path, peers_doc(8001));
  Process p = watch({"file://" + path});
  CHECK(parse_version_line(next_line(p, Stream::out))["version"] == 1);

  // Same peers, written in another order: decoded, equal, not printed.
  write_by_rename(path, R"({"peers":["10.0.0.2:9000",{"zone":"z1","weight":2,"port":8001,"host":"10.0.0.1"}]})");
  CHECK_FALSE(p.read_line(Stream::out, 500ms).has_value());
  write_by_rename(path, peers_doc(8002));
  CHECK(parse_version_line(next_line(p, Stream::out))["version"] == 2);
}

TEST_CASE("dynup-watch --once prints one line and exits 0") {
  TempDir dir;
  std::string path = dir.file("peers.json");
  write_by_rename(path, peers_doc(8001));
  Process p = watch({"--once", "file://" + path});
  auto st = p.wait_exit(line_timeout);
  REQUIRE(st.has_value());
  CHECK(st->exited);
  CHECK(st->code == 0);
  std::string out = p.read_all(Stream::out, line_timeout);
  REQUIRE(!out.empty());
  CHECK(out.back() == '\n');
  CHECK(out.find('\n') == out.size() - 1); // exactly one line
  auto doc = parse_version_line(out.substr(0, out.size() - 1));
  CHECK(doc["version"] == 1);
  CHECK(p.read_all(Stream::err, line_timeout).empty());
}

TEST_CASE("dynup-watch --once on a missing file exits 1 with the reason on stderr") {
  TempDir dir;
  std::string path = dir.file("absent.json");
  Process p = watch({"--once", "file://" + path});
  auto st = p.wait_exit(line_timeout);
  REQUIRE(st.has_value());
  CHECK(st->exited);
  CHECK(st->code == 1);
  CHECK(p.read_all(Stream::out, line_timeout).empty());
  std::string err = p.read_all(Stream::err, line_timeout);
  CHECK(err.find("dynup-watch: ") == 0);
  CHECK(err.find(path) != std::string::npos);
}

TEST_CASE("dynup-watch --once on an invalid file exits 1") {
  TempDir dir;
  std::string path = dir.file("peers.json");
  write_by_rename(path, "[1, 2");
  Process p = watch({"--once", "file://" + path});
  auto st = p.wait_exit(line_timeout);
  REQUIRE(st.has_value());
  CHECK(st->code == 1);
  CHECK(p.read_all(Stream::out, line_timeout).empty());
  CHECK(p.read_all(Stream::err, line_timeout).find("invalid JSON") != std::string::npos);
}

TEST_CASE("dynup-watch rejects bad command lines with exit 2 and the usage text") {
  struct Case {
    std::vector<std::string> args;
    std::string says;
  };
  std::vector<Case> cases{
      {{"--frobnicate", "file:///tmp/x.json"}, "unknown option --frobnicate"},
      {{}, "missing SPEC"},
      {{"file:///a.json", "file:///b.json"}, "only one SPEC"},
      {{"--poll-ms", "5", "file:///a.json"}, "--poll-ms"},
      {{"--poll-ms"}, "needs a value"},
      {{"--max-removed", "1.5", "file:///a.json"}, "--max-removed"},
      {{"--max-removed", "nan", "file:///a.json"}, "--max-removed"},
      {{"--min-peers", "2.5", "file:///a.json"}, "--min-peers"},
      {{"--min-peers", "1e300", "file:///a.json"}, "--min-peers"},
      {{"--min-peers", "inf", "file:///a.json"}, "--min-peers"},
      {{"--poll-ms", "nan", "file:///a.json"}, "--poll-ms"},
  };
  for (const auto& c : cases) {
    CAPTURE(c.says);
    Process p = watch(c.args);
    auto st = p.wait_exit(line_timeout);
    REQUIRE(st.has_value());
    CHECK(st->exited);
    CHECK(st->code == 2);
    std::string err = p.read_all(Stream::err, line_timeout);
    CHECK(err.find(c.says) != std::string::npos);
    CHECK(err.find("usage: dynup-watch") != std::string::npos);
    CHECK(p.read_all(Stream::out, line_timeout).empty());
  }
}

TEST_CASE("dynup-watch --min-peers refuses a set that is too small") {
  TempDir dir;
  std::string path = dir.file("peers.json");
  write_by_rename(path, peers_doc(8001)); // two peers
  {
    Process p = watch({"--once", "--min-peers", "3", "file://" + path});
    auto st = p.wait_exit(line_timeout);
    REQUIRE(st.has_value());
    CHECK(st->code == 1);
    CHECK(p.read_all(Stream::out, line_timeout).empty());
    CHECK(p.read_all(Stream::err, line_timeout).find("min_peers") != std::string::npos);
  }
  {
    Process p = watch({"--once", "--min-peers", "2", "file://" + path});
    auto st = p.wait_exit(line_timeout);
    REQUIRE(st.has_value());
    CHECK(st->code == 0);
  }
}

TEST_CASE("dynup-watch --allow-empty prints an empty peer list") {
  TempDir dir;
  std::string path = dir.file("peers.json");
  write_by_rename(path, R"({"peers":[]})");
  Process refused = watch({"--once", "file://" + path});
  REQUIRE(refused.wait_exit(line_timeout).has_value());
  CHECK(refused.wait_exit(line_timeout)->code == 1);

  Process p = watch({"--once", "--allow-empty", "file://" + path});
  auto st = p.wait_exit(line_timeout);
  REQUIRE(st.has_value());
  CHECK(st->code == 0);
  std::string out = p.read_all(Stream::out, line_timeout);
  REQUIRE(out.size() > 1);
  CHECK(parse_version_line(out.substr(0, out.size() - 1))["peers"].empty());
}

TEST_CASE("dynup-watch rejects an unknown scheme with exit 2, naming the supported ones") {
  Process p = watch({"zk://127.0.0.1:2181/upstreams/api"});
  auto st = p.wait_exit(line_timeout);
  REQUIRE(st.has_value());
  CHECK(st->code == 2);
  std::string err = p.read_all(Stream::err, line_timeout);
  CHECK(err.find("unknown scheme \"zk\"") != std::string::npos);
  for (const char* scheme : {"file://", "consul://", "etcd://"}) CHECK(err.find(scheme) != std::string::npos);
  CHECK(p.read_all(Stream::out, line_timeout).empty());
}

TEST_CASE("dynup-watch --help prints the usage on stdout and exits 0") {
  Process p = watch({"--help"});
  auto st = p.wait_exit(line_timeout);
  REQUIRE(st.has_value());
  CHECK(st->code == 0);
  CHECK(p.read_all(Stream::out, line_timeout).rfind("usage: dynup-watch", 0) == 0);
}

TEST_CASE("dynup-watch exits 0 promptly on SIGTERM and SIGINT") {
  TempDir dir;
  std::string path = dir.file("peers.json");
  write_by_rename(path, peers_doc(8001));
  for (int sig : {SIGTERM, SIGINT}) {
    CAPTURE(sig);
    Process p = watch({"--poll-ms", "600000", "file://" + path});
    next_line(p, Stream::out); // running and watching
    auto t0 = std::chrono::steady_clock::now();
    p.send(sig);
    auto st = p.wait_exit(2000ms);
    REQUIRE_MESSAGE(st.has_value(), "still running 2 s after the signal");
    CHECK(std::chrono::steady_clock::now() - t0 < 2s);
    CHECK(st->exited);
    CHECK(st->code == 0);
  }
}

TEST_CASE("dynup-watch starts on a missing file and prints once it appears") {
  TempDir dir;
  std::string path = dir.file("peers.json");
  Process p = watch({"file://" + path});
  std::string err = next_line(p, Stream::err);
  CHECK(err.find(path) != std::string::npos);
  write_by_rename(path, peers_doc(8001));
  CHECK(parse_version_line(next_line(p, Stream::out))["version"] == 1);
}

TEST_CASE("dynup-watch exits 0 on SIGTERM while its first fetch waits on a registry that never answers") {
  StuckRegistry registry(StuckRegistry::Mode::silent);
  sigterm_exits_during_first_fetch(registry, [&] { return registry.requests() >= 1; });
}

TEST_CASE("dynup-watch exits 0 on SIGTERM while a registry trickles its first reply a byte at a time") {
  StuckRegistry registry(StuckRegistry::Mode::trickle);
  // Two bytes of body sent: the fetch is reading a reply that will not end.
  sigterm_exits_during_first_fetch(registry, [&] { return registry.body_bytes() >= 2; });
}

TEST_CASE("dynup-watch refuses push:// with exit 2: there is nobody to push to it") {
  Process p = watch({"push://"});
  auto st = p.wait_exit(line_timeout);
  REQUIRE_MESSAGE(st.has_value(), "dynup-watch push:// did not exit");
  CHECK(st->exited);
  CHECK(st->code == 2);
  std::string err = p.read_all(Stream::err, line_timeout);
  CHECK(err.rfind("dynup-watch: push:// cannot be watched", 0) == 0);
  CHECK(err.find("write API") != std::string::npos);
  CHECK(p.read_all(Stream::out, line_timeout).empty());
}

TEST_CASE("dynup-watch --check-config exits 1 naming the JSON path of a bad config, 0 for a good one") {
  TempDir dir;
  struct Case {
    std::string config;
    int code;
    std::string says;
  };
  // The peer file need not exist: the check starts nothing.
  const std::string source = "\"source\":\"file://" + dir.file("absent.json") + "\"";
  std::vector<Case> cases{
      {"{\"name\":\"api\"," + source + "}", 0, "upstream api is valid"},
      {"{\"name\":\"api\"," + source + ",\"policy\":\"ewma\",\"health\":{\"passive\":{\"max_fails\":3}}}", 0,
       "upstream api is valid"},
      {"{\"name\":\"api\"," + source + ",\"watch\":{\"wait_ms\":5}}", 1,
       "upstream.watch.wait_ms: expected an integer 10..600000, got 5"},
      {"{\"name\":\"api\"," + source + ",\"health\":{\"passive\":{\"max_fails\":-1}}}", 1,
       "upstream.health.passive.max_fails"},
      {"{\"name\":\"a b\"," + source + "}", 1, "upstream.name: \"a b\" must be"},
      {"{\"name\":\"api\",\"source\":\"zk://x/y\"}", 1, "upstream.source: "},
      {"{\"name\":\"api\"", 1, "upstream: invalid JSON: "},
  };
  for (const Case& c : cases) {
    CAPTURE(c.config);
    const std::string file = dir.file("upstream.json");
    write_by_rename(file, c.config);
    Process p = watch({"--check-config", file});
    auto st = p.wait_exit(line_timeout);
    REQUIRE(st.has_value());
    CHECK(st->exited);
    CHECK(st->code == c.code);
    std::string out = p.read_all(Stream::out, line_timeout);
    std::string err = p.read_all(Stream::err, line_timeout);
    const std::string& said = c.code == 0 ? out : err;
    CHECK(said.find("dynup-watch: " + file + ": ") == 0);
    CHECK(said.find(c.says) != std::string::npos);
    CHECK((c.code == 0 ? err : out).empty());
  }

  Process missing = watch({"--check-config", dir.file("none.json")});
  auto st = missing.wait_exit(line_timeout);
  REQUIRE(st.has_value());
  CHECK(st->code == 1);
  CHECK(missing.read_all(Stream::err, line_timeout).find("cannot read") != std::string::npos);

  Process extra = watch({"--check-config", dir.file("none.json"), "file:///x.json"});
  st = extra.wait_exit(line_timeout);
  REQUIRE(st.has_value());
  CHECK(st->code == 2);
  CHECK(extra.read_all(Stream::err, line_timeout).find("takes no SPEC") != std::string::npos);
}
