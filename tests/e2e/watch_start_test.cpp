// dynup-watch before it watches: SIGTERM while the first fetch is stuck on a registry that
// never answers or trickles its reply, specs it cannot watch (push://), and
// --check-config, the check of an upstream's config that `nginx -t` cannot run.
#include <support/process.hpp>
#include <support/temp_dir.hpp>
#include <support/wait.hpp>

#include <doctest/doctest.h>

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

constexpr auto exit_timeout = 5000ms;

Process watch(const std::vector<std::string>& args) {
  std::vector<std::string> argv{DYNUP_WATCH_BIN};
  argv.insert(argv.end(), args.begin(), args.end());
  return Process(argv);
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
// once watching, within `exit_timeout` (the hung fetch alone takes 10 s, the trickle
// forever).
void sigterm_exits_during_first_fetch(StuckRegistry& registry, const std::function<bool()>& stuck) {
  Process p = watch({registry.consul_spec()});
  REQUIRE_MESSAGE(dynup_test::wait_until(stuck, 10000ms), "dynup-watch never reached the registry");
  const auto sent = std::chrono::steady_clock::now();
  p.send(SIGTERM);
  auto st = p.wait_exit(exit_timeout);
  REQUIRE_MESSAGE(st.has_value(), "still running " << exit_timeout.count() << " ms after SIGTERM");
  MESSAGE("exited "
          << std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - sent).count()
          << " ms after SIGTERM");
  CHECK(st->exited);
  CHECK(st->code == 0);
  CHECK(p.read_all(Stream::out, exit_timeout).empty()); // nothing was published
}

} // namespace

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
  auto st = p.wait_exit(exit_timeout);
  REQUIRE_MESSAGE(st.has_value(), "dynup-watch push:// did not exit");
  CHECK(st->exited);
  CHECK(st->code == 2);
  std::string err = p.read_all(Stream::err, exit_timeout);
  CHECK(err.rfind("dynup-watch: push:// cannot be watched", 0) == 0);
  CHECK(err.find("write API") != std::string::npos);
  CHECK(p.read_all(Stream::out, exit_timeout).empty());
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
    auto st = p.wait_exit(exit_timeout);
    REQUIRE(st.has_value());
    CHECK(st->exited);
    CHECK(st->code == c.code);
    std::string out = p.read_all(Stream::out, exit_timeout);
    std::string err = p.read_all(Stream::err, exit_timeout);
    const std::string& said = c.code == 0 ? out : err;
    CHECK(said.find("dynup-watch: " + file + ": ") == 0);
    CHECK(said.find(c.says) != std::string::npos);
    CHECK((c.code == 0 ? err : out).empty());
  }

  Process missing = watch({"--check-config", dir.file("none.json")});
  auto st = missing.wait_exit(exit_timeout);
  REQUIRE(st.has_value());
  CHECK(st->code == 1);
  CHECK(missing.read_all(Stream::err, exit_timeout).find("cannot read") != std::string::npos);

  Process extra = watch({"--check-config", dir.file("none.json"), "file:///x.json"});
  st = extra.wait_exit(exit_timeout);
  REQUIRE(st.has_value());
  CHECK(st->code == 2);
  CHECK(extra.read_all(Stream::err, exit_timeout).find("takes no SPEC") != std::string::npos);
}
