#include <dynup/health/active.hpp>

#include <support/threads.hpp>
#include <support/peers.hpp>
#include <support/wait.hpp>

#include <doctest/doctest.h>
#include <httplib.h>

#include <arpa/inet.h>
#include <dirent.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace {

using dynup_test::thread_count;

using dynup::ActiveChecker;
using dynup::ActiveCheckOptions;
using dynup::ProbeResult;
using dynup_test::make_set;
using dynup_test::stays_true_for;
using dynup_test::wait_until;
using namespace std::chrono_literals;
using Kind = ActiveCheckOptions::Kind;

dynup::Peer peer(const std::string& id, const std::string& host, std::uint16_t port) {
  dynup::Peer p = dynup_test::peer(host, port);
  p.id = id;
  return p;
}

ActiveCheckOptions options(Kind kind, std::chrono::milliseconds interval, std::chrono::milliseconds timeout) {
  ActiveCheckOptions o;
  o.kind = kind;
  o.interval = interval;
  o.timeout = timeout;
  return o;
}

bool ipv6_loopback_available() {
  int fd = ::socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  sockaddr_in6 a{};
  a.sin6_family = AF_INET6;
  a.sin6_addr = in6addr_loopback;
  bool ok = ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
  ::close(fd);
  return ok;
}

// Every result the checker delivered, readable from the test thread.
class Recorder {
public:
  ActiveChecker::ResultCallback callback() {
    return [this](const ProbeResult& r) {
      std::lock_guard<std::mutex> lock(mu_);
      all_.push_back(r);
    };
  }
  std::vector<ProbeResult> of(const std::string& id) const {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<ProbeResult> out;
    for (const auto& r : all_)
      if (r.id == id) out.push_back(r);
    return out;
  }
  std::size_t count(const std::string& id) const { return of(id).size(); }
  std::size_t total() const {
    std::lock_guard<std::mutex> lock(mu_);
    return all_.size();
  }
  /// Waits for a result of `id` that satisfies `pred` and returns the first one.
  std::optional<ProbeResult> wait_for(const std::string& id, std::function<bool(const ProbeResult&)> pred,
                                      std::chrono::milliseconds timeout = 5000ms) const {
    std::optional<ProbeResult> found;
    wait_until(
        [&] {
          for (const auto& r : of(id))
            if (pred(r)) return found = r, true;
          return false;
        },
        timeout);
    return found;
  }
  std::optional<ProbeResult> wait_any(const std::string& id, std::chrono::milliseconds timeout = 5000ms) const {
    return wait_for(id, [](const ProbeResult&) { return true; }, timeout);
  }

private:
  mutable std::mutex mu_;
  std::vector<ProbeResult> all_;
};

// A real HTTP server on a loopback address and a free port: answers `status`, may hold
// each request for `hold` first, and records what it received and how many requests it
// held at once. The destructor releases held requests, so it returns promptly.
class HttpServer {
public:
  struct Seen {
    std::string path, host, user_agent;
  };

  explicit HttpServer(const std::string& address = "127.0.0.1") {
    server_.new_task_queue = [] { return new httplib::ThreadPool(16); };
    server_.Get(".*", [this](const httplib::Request& q, httplib::Response& r) { handle(q, r); });
    int port = server_.bind_to_any_port(address);
    if (port <= 0) throw std::runtime_error("HttpServer: cannot listen on " + address);
    port_ = static_cast<std::uint16_t>(port);
    listener_ = std::thread([this] { server_.listen_after_bind(); });
    while (!server_.is_running()) std::this_thread::sleep_for(1ms);
  }
  ~HttpServer() {
    release();
    server_.stop();
    listener_.join();
  }

  std::uint16_t port() const { return port_; }
  void set_status(int s) { status_ = s; }
  void set_hold(std::chrono::milliseconds d) { hold_ms_ = d.count(); }
  /// Answers every held request now, and holds no more.
  void release() {
    std::lock_guard<std::mutex> lock(mu_);
    released_ = true;
    cv_.notify_all();
  }
  std::size_t hits() const {
    std::lock_guard<std::mutex> lock(mu_);
    return seen_.size();
  }
  std::vector<Seen> seen() const {
    std::lock_guard<std::mutex> lock(mu_);
    return seen_;
  }
  int max_held_at_once() const {
    std::lock_guard<std::mutex> lock(mu_);
    return max_active_;
  }

private:
  void handle(const httplib::Request& q, httplib::Response& r) {
    std::unique_lock<std::mutex> lock(mu_);
    seen_.push_back({q.path, q.get_header_value("Host"), q.get_header_value("User-Agent")});
    max_active_ = std::max(max_active_, ++active_);
    auto hold = std::chrono::milliseconds(hold_ms_.load());
    if (hold > 0ms) cv_.wait_for(lock, hold, [&] { return released_; });
    --active_;
    r.status = status_;
    r.set_content("ok", "text/plain");
  }

  httplib::Server server_;
  std::uint16_t port_ = 0;
  std::thread listener_;
  std::atomic<int> status_{200};
  std::atomic<long long> hold_ms_{0};
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool released_ = false;
  std::vector<Seen> seen_;
  int active_ = 0, max_active_ = 0;
};

// A listening TCP socket on a loopback address; closes on destruction.
class Listener {
public:
  Listener(int backlog, bool listen = true, int family = AF_INET) {
    fd_ = ::socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    REQUIRE(fd_ >= 0);
    sockaddr_storage a{};
    socklen_t len = 0;
    if (family == AF_INET) {
      auto* in = reinterpret_cast<sockaddr_in*>(&a);
      in->sin_family = AF_INET;
      in->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
      len = sizeof *in;
    } else {
      auto* in6 = reinterpret_cast<sockaddr_in6*>(&a);
      in6->sin6_family = AF_INET6;
      in6->sin6_addr = in6addr_loopback;
      len = sizeof *in6;
    }
    REQUIRE(::bind(fd_, reinterpret_cast<sockaddr*>(&a), len) == 0);
    if (listen) REQUIRE(::listen(fd_, backlog) == 0);
    REQUIRE(::getsockname(fd_, reinterpret_cast<sockaddr*>(&a), &len) == 0);
    port_ = ntohs(family == AF_INET ? reinterpret_cast<sockaddr_in*>(&a)->sin_port
                                    : reinterpret_cast<sockaddr_in6*>(&a)->sin6_port);
  }
  ~Listener() { ::close(fd_); }
  Listener(const Listener&) = delete;
  Listener& operator=(const Listener&) = delete;
  int fd() const { return fd_; }
  std::uint16_t port() const { return port_; }

private:
  int fd_ = -1;
  std::uint16_t port_ = 0;
};

// A port nothing listens on: bound (so no one else takes it) but not listening, so a
// connect is refused.
class ClosedPort : public Listener {
public:
  ClosedPort() : Listener(0, false) {}
};

// A raw TCP server: reads each request's head, writes `answer` (maybe nothing), closes.
class RawServer {
public:
  /// `trickle`: write the answer a byte at a time, so it arrives in many reads.
  /// `backlog`: connections the kernel completes before this thread accepts them.
  explicit RawServer(std::string answer, bool trickle = false, int backlog = 16)
      : listener_(backlog), answer_(std::move(answer)), trickle_(trickle) {
    stop_fd_ = ::eventfd(0, EFD_CLOEXEC);
    REQUIRE(stop_fd_ >= 0);
    thread_ = std::thread([this] { run(); });
  }
  ~RawServer() {
    std::uint64_t one = 1;
    [[maybe_unused]] auto n = ::write(stop_fd_, &one, sizeof one);
    thread_.join();
    ::close(stop_fd_);
  }
  std::uint16_t port() const { return listener_.port(); }
  std::size_t accepted() const { return accepted_; }

private:
  void run() {
    for (;;) {
      pollfd fds[2] = {{stop_fd_, POLLIN, 0}, {listener_.fd(), POLLIN, 0}};
      if (::poll(fds, 2, -1) <= 0) continue;
      if (fds[0].revents) return;
      int c = ::accept4(listener_.fd(), nullptr, nullptr, SOCK_CLOEXEC);
      if (c < 0) continue;
      ++accepted_;
      timeval tv{1, 0};
      ::setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
      std::string head;
      char buf[512];
      while (head.find("\r\n\r\n") == std::string::npos) {
        ssize_t n = ::recv(c, buf, sizeof buf, 0);
        if (n <= 0) break;
        head.append(buf, static_cast<std::size_t>(n));
      }
      int one = 1;
      ::setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
      for (std::size_t i = 0; i < answer_.size();) {
        std::size_t chunk = trickle_ ? 1 : answer_.size() - i;
        if (::send(c, answer_.data() + i, chunk, MSG_NOSIGNAL) <= 0) break;
        i += chunk;
        if (trickle_) std::this_thread::sleep_for(2ms);
      }
      ::close(c);
    }
  }

  Listener listener_;
  std::string answer_;
  bool trickle_ = false;
  int stop_fd_ = -1;
  std::atomic<std::size_t> accepted_{0};
  std::thread thread_;
};


bool starts_with(const std::string& s, const std::string& prefix) { return s.compare(0, prefix.size(), prefix) == 0; }

} // namespace

TEST_CASE("http probe of a 200 server succeeds with the status and latency") {
  HttpServer server;
  Recorder rec;
  ActiveChecker checker(options(Kind::http, 5000ms, 1000ms), rec.callback());
  checker.set_targets(make_set({peer("a", "127.0.0.1", server.port())}));
  CHECK(checker.targets() == 1);
  auto r = rec.wait_any("a");
  REQUIRE(r);
  CHECK(r->ok);
  CHECK(r->status == 200);
  CHECK(r->reason == "HTTP 200");
  CHECK(r->latency > 0ns);
  CHECK(checker.probes_sent() >= 1);
}

TEST_CASE("a 503 answer fails with the status and the expected ranges") {
  HttpServer server;
  Recorder rec;
  ActiveChecker checker(options(Kind::http, 50ms, 1000ms), rec.callback());
  checker.set_targets(make_set({peer("a", "127.0.0.1", server.port())}));
  REQUIRE(rec.wait_for("a", [](const ProbeResult& x) { return x.ok; }));
  server.set_status(503);
  auto r = rec.wait_for("a", [](const ProbeResult& x) { return !x.ok; });
  REQUIRE(r);
  CHECK(r->status == 503);
  CHECK(r->reason == "HTTP 503 (expected 200-399)");
}

TEST_CASE("expected_statuses ranges decide which statuses are healthy") {
  HttpServer server;
  server.set_status(404);
  Recorder rec;
  auto o = options(Kind::http, 50ms, 1000ms);
  o.expected_statuses = {{204, 204}, {404, 410}};
  ActiveChecker checker(o, rec.callback());
  checker.set_targets(make_set({peer("a", "127.0.0.1", server.port())}));
  auto first = rec.wait_any("a");
  REQUIRE(first);
  CHECK(first->ok);
  CHECK(first->reason == "HTTP 404");
  server.set_status(200);
  auto r = rec.wait_for("a", [](const ProbeResult& x) { return x.status == 200; });
  REQUIRE(r);
  CHECK_FALSE(r->ok);
  CHECK(r->reason == "HTTP 200 (expected 204, 404-410)");
}

TEST_CASE("the request carries the path, Host header and User-Agent") {
  HttpServer server;
  Recorder rec;
  SUBCASE("configured path and Host header") {
    auto o = options(Kind::http, 5000ms, 1000ms);
    o.path = "/healthz?deep=1";
    o.host_header = "api.example.com";
    ActiveChecker checker(o, rec.callback());
    checker.set_targets(make_set({peer("a", "127.0.0.1", server.port())}));
    REQUIRE(rec.wait_any("a"));
    auto seen = server.seen();
    REQUIRE(seen.size() == 1);
    CHECK(seen[0].path == "/healthz");
    CHECK(seen[0].host == "api.example.com");
    CHECK(seen[0].user_agent == "dynup-health");
  }
  SUBCASE("default Host header is the peer's host:port") {
    ActiveChecker checker(options(Kind::http, 5000ms, 1000ms), rec.callback());
    checker.set_targets(make_set({peer("a", "127.0.0.1", server.port())}));
    REQUIRE(rec.wait_any("a"));
    auto seen = server.seen();
    REQUIRE(seen.size() == 1);
    CHECK(seen[0].path == "/");
    CHECK(seen[0].host == "127.0.0.1:" + std::to_string(server.port()));
  }
}

TEST_CASE("a server slower than the timeout gives a response timeout") {
  HttpServer server;
  server.set_hold(10000ms);
  Recorder rec;
  ActiveChecker checker(options(Kind::http, 5000ms, 200ms), rec.callback());
  checker.set_targets(make_set({peer("a", "127.0.0.1", server.port())}));
  auto r = rec.wait_any("a");
  REQUIRE(r);
  CHECK_FALSE(r->ok);
  CHECK(r->status == 0);
  CHECK(r->reason == "timed out after 200 ms (response)");
  CHECK(r->latency >= 200ms);
}

TEST_CASE("stop() returns promptly while a probe waits on a server that never answers") {
  Recorder rec;
  SUBCASE("http server holding the request") {
    HttpServer server;
    server.set_hold(10000ms);
    ActiveChecker checker(options(Kind::http, 5000ms, 5000ms), rec.callback());
    checker.set_targets(make_set({peer("a", "127.0.0.1", server.port())}));
    REQUIRE(wait_until([&] { return server.hits() == 1; }));
    auto t0 = std::chrono::steady_clock::now();
    checker.stop();
    CHECK(std::chrono::steady_clock::now() - t0 < 1000ms);
    checker.stop(); // idempotent
  }
  SUBCASE("listener that never accepts") {
    Listener silent(16);
    ActiveChecker checker(options(Kind::http, 5000ms, 5000ms), rec.callback());
    checker.set_targets(make_set({peer("a", "127.0.0.1", silent.port())}));
    REQUIRE(wait_until([&] { return checker.probes_sent() == 1; }));
    std::this_thread::sleep_for(20ms); // let it connect and send
    auto t0 = std::chrono::steady_clock::now();
    checker.stop();
    CHECK(std::chrono::steady_clock::now() - t0 < 1000ms);
  }
  CHECK(rec.total() == 0);
}

TEST_CASE("a connect that gets no answer times out in the connect phase") {
  // A full accept queue makes Linux drop further SYNs: the closest local stand-in for a
  // black-holed address.
  Listener full(0);
  std::vector<int> clients;
  bool saturated = false;
  for (int i = 0; i < 8 && !saturated; ++i) {
    int c = ::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    REQUIRE(c >= 0);
    clients.push_back(c);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(full.port());
    if (::connect(c, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0) continue;
    pollfd p{c, POLLOUT, 0};
    saturated = ::poll(&p, 1, 200) == 0;
  }
  if (!saturated) {
    MESSAGE("skipped: this kernel completes connects to a full accept queue");
  } else {
    Recorder rec;
    ActiveChecker checker(options(Kind::tcp, 5000ms, 300ms), rec.callback());
    checker.set_targets(make_set({peer("a", "127.0.0.1", full.port())}));
    auto r = rec.wait_any("a");
    REQUIRE(r);
    CHECK_FALSE(r->ok);
    CHECK(r->reason == "timed out after 300 ms (connect)");
  }
  for (int c : clients) ::close(c);
}

TEST_CASE("a server that closes without answering fails before a status line") {
  RawServer server("");
  Recorder rec;
  ActiveChecker checker(options(Kind::http, 5000ms, 2000ms), rec.callback());
  checker.set_targets(make_set({peer("a", "127.0.0.1", server.port())}));
  auto r = rec.wait_any("a");
  REQUIRE(r);
  CHECK_FALSE(r->ok);
  CHECK(r->status == 0);
  CHECK(r->reason == "connection closed before a status line");
}

TEST_CASE("an answer that is not HTTP is a bad status line") {
  RawServer server("SSH-2.0-OpenSSH_9.2p1\r\n");
  Recorder rec;
  ActiveChecker checker(options(Kind::http, 5000ms, 2000ms), rec.callback());
  checker.set_targets(make_set({peer("a", "127.0.0.1", server.port())}));
  auto r = rec.wait_any("a");
  REQUIRE(r);
  CHECK_FALSE(r->ok);
  CHECK(r->status == 0);
  CHECK(r->reason == "bad status line: \"SSH-2.0-OpenSSH_9.2p1\"");
}

TEST_CASE("a status line split across packets is read whole") {
  RawServer server("HTTP/1.0 204 No Content\r\n\r\n", true);
  Recorder rec;
  ActiveChecker checker(options(Kind::http, 5000ms, 2000ms), rec.callback());
  checker.set_targets(make_set({peer("a", "127.0.0.1", server.port())}));
  auto r = rec.wait_any("a");
  REQUIRE(r);
  CHECK(r->ok);
  CHECK(r->status == 204);
}

TEST_CASE("a closed port is connection refused, for http and tcp") {
  ClosedPort closed;
  Recorder rec;
  Kind kind = Kind::http;
  SUBCASE("http") { kind = Kind::http; }
  SUBCASE("tcp") { kind = Kind::tcp; }
  ActiveChecker checker(options(kind, 5000ms, 1000ms), rec.callback());
  checker.set_targets(make_set({peer("a", "127.0.0.1", closed.port())}));
  auto r = rec.wait_any("a");
  REQUIRE(r);
  CHECK_FALSE(r->ok);
  CHECK(r->reason == "connection refused");
}

TEST_CASE("a tcp probe succeeds once connected, without sending anything") {
  Listener open(16);
  Recorder rec;
  ActiveChecker checker(options(Kind::tcp, 5000ms, 1000ms), rec.callback());
  checker.set_targets(make_set({peer("a", "127.0.0.1", open.port())}));
  auto r = rec.wait_any("a");
  REQUIRE(r);
  CHECK(r->ok);
  CHECK(r->reason == "connected");
  CHECK(r->status == 0);
}

TEST_CASE("DNS names are resolved, and an unresolvable name says so") {
  Recorder rec;
  SUBCASE("localhost") {
    // The checker takes getaddrinfo's first address; serve exactly there.
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV;
    addrinfo* found = nullptr;
    REQUIRE(::getaddrinfo("localhost", "80", &hints, &found) == 0);
    char text[INET6_ADDRSTRLEN] = {};
    if (found->ai_family == AF_INET6)
      ::inet_ntop(AF_INET6, &reinterpret_cast<sockaddr_in6*>(found->ai_addr)->sin6_addr, text, sizeof text);
    else
      ::inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(found->ai_addr)->sin_addr, text, sizeof text);
    ::freeaddrinfo(found);
    HttpServer server(text);
    ActiveChecker checker(options(Kind::http, 5000ms, 1000ms), rec.callback());
    checker.set_targets(make_set({peer("a", "localhost", server.port())}));
    auto r = rec.wait_any("a");
    REQUIRE(r);
    CHECK(r->ok);
    REQUIRE(server.hits() == 1);
    CHECK(server.seen()[0].host == "localhost:" + std::to_string(server.port()));
  }
  SUBCASE("nonexistent.invalid") {
    ActiveChecker checker(options(Kind::tcp, 5000ms, 1000ms), rec.callback());
    checker.set_targets(make_set({peer("a", "nonexistent.invalid", 80)}));
    auto r = rec.wait_any("a");
    REQUIRE(r);
    CHECK_FALSE(r->ok);
    CHECK(starts_with(r->reason, "cannot resolve host: nonexistent.invalid ("));
  }
}

TEST_CASE("IPv6 literals are probed") {
  if (!ipv6_loopback_available()) {
    MESSAGE("skipped: no IPv6 loopback on this machine");
    return;
  }
  HttpServer server("::1");
  Recorder rec;
  ActiveChecker checker(options(Kind::http, 5000ms, 1000ms), rec.callback());
  checker.set_targets(make_set({peer("v6", "::1", server.port())}));
  auto r = rec.wait_any("v6");
  REQUIRE(r);
  CHECK(r->ok);
  REQUIRE(server.hits() == 1);
  CHECK(server.seen()[0].host == "[::1]:" + std::to_string(server.port()));
}

TEST_CASE("backup peers and peers the registry calls critical are probed") {
  HttpServer server;
  Recorder rec;
  auto backup = peer("backup", "127.0.0.1", server.port());
  backup.backup = true;
  auto critical = peer("critical", "127.0.0.1", server.port());
  critical.health = dynup::Health::critical;
  ActiveChecker checker(options(Kind::http, 5000ms, 1000ms), rec.callback());
  checker.set_targets(make_set({backup, critical}));
  CHECK(rec.wait_any("backup"));
  CHECK(rec.wait_any("critical"));
}

TEST_CASE("a new peer gets its first probe promptly, long before the interval") {
  HttpServer server;
  Recorder rec;
  ActiveChecker checker(options(Kind::http, 60000ms, 1000ms), rec.callback());
  checker.set_targets(make_set({peer("a", "127.0.0.1", server.port())}));
  REQUIRE(rec.wait_any("a"));
  checker.set_targets(make_set({peer("a", "127.0.0.1", server.port()), peer("b", "127.0.0.1", server.port())}));
  CHECK(checker.targets() == 2);
  CHECK(rec.wait_any("b", 3000ms));
  CHECK(rec.count("a") == 1); // unchanged peers keep their schedule
}

TEST_CASE("first probes of a large batch of new peers are spread out, not fired at once") {
  ClosedPort closed; // refused at once, so a probe's time is its start time
  std::mutex mu;
  std::vector<std::chrono::steady_clock::time_point> at;
  auto o = options(Kind::tcp, 60000ms, 1000ms);
  o.max_concurrent = 1000;
  ActiveChecker checker(o, [&](const ProbeResult&) {
    std::lock_guard<std::mutex> lock(mu);
    at.push_back(std::chrono::steady_clock::now());
  });
  std::vector<dynup::Peer> peers;
  for (int i = 0; i < 300; ++i) peers.push_back(peer("p" + std::to_string(i), "127.0.0.1", closed.port()));
  checker.set_targets(make_set(peers));
  REQUIRE(wait_until([&] {
    std::lock_guard<std::mutex> lock(mu);
    return at.size() == 300;
  }));
  // 300 peers spread over 300 ms: uniform starts span nearly all of it.
  std::lock_guard<std::mutex> lock(mu);
  auto span = *std::max_element(at.begin(), at.end()) - *std::min_element(at.begin(), at.end());
  INFO("span " << std::chrono::duration_cast<std::chrono::milliseconds>(span).count() << " ms");
  CHECK(span >= 150ms);
  CHECK(span < 1100ms);
}

TEST_CASE("a removed peer is no longer probed") {
  HttpServer kept, removed;
  Recorder rec;
  ActiveChecker checker(options(Kind::http, 50ms, 1000ms), rec.callback());
  checker.set_targets(make_set({peer("kept", "127.0.0.1", kept.port()), peer("gone", "127.0.0.1", removed.port())}));
  REQUIRE(wait_until([&] { return rec.count("gone") >= 2 && rec.count("kept") >= 2; }));
  checker.set_targets(make_set({peer("kept", "127.0.0.1", kept.port())}));
  CHECK(checker.targets() == 1);
  // A probe already under way may still reach the server, and a delivery already begun
  // may still land: at most one of each.
  auto hits = removed.hits();
  auto results = rec.count("gone");
  auto kept_before = rec.count("kept");
  CHECK(stays_true_for([&] { return removed.hits() <= hits + 1 && rec.count("gone") <= results + 1; }, 500ms));
  CHECK(rec.count("kept") >= kept_before + 3);
}

TEST_CASE("a result for a peer removed while its probe is in flight is dropped") {
  HttpServer server;
  server.set_hold(10000ms);
  Recorder rec;
  ActiveChecker checker(options(Kind::http, 5000ms, 3000ms), rec.callback());
  checker.set_targets(make_set({peer("a", "127.0.0.1", server.port())}));
  REQUIRE(wait_until([&] { return server.hits() == 1; }));
  checker.set_targets(make_set({}));
  CHECK(checker.targets() == 0);
  server.release(); // the server answers 200 now, to a probe that no longer matters
  CHECK(stays_true_for([&] { return rec.total() == 0; }, 300ms));
}

TEST_CASE("a peer whose address changes is probed at the new address") {
  HttpServer before, after;
  after.set_status(503);
  Recorder rec;
  ActiveChecker checker(options(Kind::http, 60000ms, 1000ms), rec.callback());
  checker.set_targets(make_set({peer("p", "127.0.0.1", before.port())}));
  REQUIRE(rec.wait_for("p", [](const ProbeResult& x) { return x.ok; }));
  checker.set_targets(make_set({peer("p", "127.0.0.1", after.port())}));
  auto r = rec.wait_for("p", [](const ProbeResult& x) { return x.status == 503; }, 3000ms);
  REQUIRE(r); // long before the 60 s interval
  CHECK(after.hits() == 1);
  CHECK(before.hits() == 1);
}

TEST_CASE("an address change during a probe drops the old probe's result") {
  HttpServer before, after;
  before.set_hold(10000ms);
  after.set_status(503);
  Recorder rec;
  ActiveChecker checker(options(Kind::http, 60000ms, 3000ms), rec.callback());
  checker.set_targets(make_set({peer("p", "127.0.0.1", before.port())}));
  REQUIRE(wait_until([&] { return before.hits() == 1; }));
  checker.set_targets(make_set({peer("p", "127.0.0.1", after.port())}));
  REQUIRE(rec.wait_any("p", 3000ms));
  before.release();
  CHECK(stays_true_for([&] { return rec.count("p") == 1; }, 200ms));
  CHECK(rec.of("p")[0].status == 503);
}

TEST_CASE("max_concurrent bounds the probes in flight") {
  HttpServer server;
  server.set_hold(200ms);
  Recorder rec;
  auto o = options(Kind::http, 300ms, 2000ms);
  o.max_concurrent = 3;
  ActiveChecker checker(o, rec.callback());
  std::vector<dynup::Peer> peers;
  for (int i = 0; i < 12; ++i) peers.push_back(peer("c" + std::to_string(i), "127.0.0.1", server.port()));
  checker.set_targets(make_set(peers));
  // 12 peers x 200 ms each per 300 ms interval need 8 slots: with 3, all stay busy.
  CHECK(wait_until([&] { return server.max_held_at_once() >= 3 && server.hits() >= 15; }));
  CHECK(server.max_held_at_once() == 3);
  for (int i = 0; i < 12; ++i) CHECK(rec.count("c" + std::to_string(i)) >= 1); // nobody starves
}

TEST_CASE("probes of a peer are an interval apart") {
  HttpServer server;
  Recorder rec;
  ActiveChecker checker(options(Kind::http, 100ms, 1000ms), rec.callback());
  auto t0 = std::chrono::steady_clock::now();
  checker.set_targets(make_set({peer("a", "127.0.0.1", server.port())}));
  std::this_thread::sleep_for(1000ms);
  auto hits = server.hits();
  auto elapsed = std::chrono::steady_clock::now() - t0;
  auto most = static_cast<std::size_t>(elapsed / 100ms) + 2;
  INFO("hits " << hits << " in " << std::chrono::duration_cast<std::chrono::milliseconds>(elapsed).count() << " ms");
  CHECK(hits >= 3);
  CHECK(hits <= most);
}

TEST_CASE("a throwing callback does not stop probing") {
  HttpServer server;
  std::atomic<int> calls{0};
  ActiveChecker checker(options(Kind::http, 30ms, 1000ms), [&](const ProbeResult&) {
    ++calls;
    throw std::runtime_error("callback failed");
  });
  checker.set_targets(make_set({peer("a", "127.0.0.1", server.port())}));
  CHECK(wait_until([&] { return calls >= 3; }));
}

TEST_CASE("stop() from inside the callback ends the checker without deadlock") {
  HttpServer server;
  std::atomic<int> calls{0};
  std::unique_ptr<ActiveChecker> checker;
  checker = std::make_unique<ActiveChecker>(options(Kind::http, 30ms, 1000ms), [&](const ProbeResult&) {
    ++calls;
    checker->stop();
  });
  checker->set_targets(make_set({peer("a", "127.0.0.1", server.port())}));
  REQUIRE(wait_until([&] { return calls == 1; }));
  CHECK(stays_true_for([&] { return calls == 1; }, 200ms));
  checker->stop();
  checker.reset();
}

TEST_CASE("kind none probes nothing") {
  HttpServer server;
  Recorder rec;
  ActiveChecker checker(options(Kind::none, 20ms, 1000ms), rec.callback());
  checker.set_targets(make_set({peer("a", "127.0.0.1", server.port())}));
  CHECK(checker.targets() == 0);
  CHECK(stays_true_for([&] { return server.hits() == 0 && checker.probes_sent() == 0; }, 200ms));
  checker.stop();
}

// Answers every connection at once with 200 and closes: many checkers' probes, tcp
// (which close without sending) and http alike, on one thread.
const char* const kOk = "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";

// Results of one checker among many.
struct Tally {
  std::atomic<int> ok{0}, total{0};
};

TEST_CASE("300 checkers probing loopback listeners run on as many threads as one, and each delivers") {
  RawServer server(kOk, false, 1024);
  const std::size_t before = thread_count();
  constexpr int kCheckers = 300;
  std::vector<std::unique_ptr<Tally>> tallies;
  std::vector<std::unique_ptr<ActiveChecker>> checkers;
  auto add = [&](int i) {
    tallies.push_back(std::make_unique<Tally>());
    Tally* t = tallies.back().get();
    // A long interval: each peer is probed once here, so every result can be counted.
    auto o = options(i % 2 ? Kind::tcp : Kind::http, 60000ms, 5000ms);
    checkers.push_back(std::make_unique<ActiveChecker>(o, [t](const ProbeResult& r) {
      if (r.ok) ++t->ok;
      ++t->total;
    }));
    auto n = std::to_string(i);
    checkers.back()->set_targets(
        make_set({peer("a" + n, "127.0.0.1", server.port()), peer("b" + n, "127.0.0.1", server.port())}));
  };
  add(0);
  REQUIRE(wait_until([&] { return tallies[0]->ok == 2; }, 10000ms));
  const std::size_t with_one = thread_count();
  CHECK(with_one <= before + static_cast<std::size_t>(dynup::rt::Runtime::threads));
  for (int i = 1; i < kCheckers; ++i) add(i);
  bool all = wait_until(
      [&] {
        return std::all_of(tallies.begin(), tallies.end(), [](const std::unique_ptr<Tally>& t) { return t->ok == 2; });
      },
      10000ms);
  // At most: a thread of an earlier test may still be ending, never one more.
  CHECK(thread_count() <= with_one);
  CHECK(all);
  int failed = 0;
  for (const auto& t : tallies) failed += t->total - t->ok;
  CHECK(failed == 0);
}

TEST_CASE("stopping one of 300 checkers while its probes are in flight delivers nothing afterwards") {
  RawServer fast(kOk, false, 1024);
  HttpServer held;
  held.set_hold(10000ms);
  std::atomic<int> others{0};
  std::vector<std::unique_ptr<ActiveChecker>> checkers;
  for (int i = 0; i < 299; ++i) {
    auto o = options(i % 2 ? Kind::tcp : Kind::http, 500ms, 5000ms);
    checkers.push_back(std::make_unique<ActiveChecker>(o, [&](const ProbeResult&) { ++others; }));
    checkers.back()->set_targets(make_set({peer("p" + std::to_string(i), "127.0.0.1", fast.port())}));
  }
  // The victim has a probe held by the server, and quick ones finishing all the time,
  // so its stop() races with deliveries.
  std::atomic<bool> stopped{false};
  std::atomic<int> victim{0}, late{0};
  ActiveChecker checker(options(Kind::http, 10ms, 5000ms), [&](const ProbeResult&) {
    if (stopped) ++late;
    ++victim;
  });
  std::vector<dynup::Peer> peers{peer("held", "127.0.0.1", held.port())};
  for (int i = 0; i < 5; ++i) peers.push_back(peer("quick" + std::to_string(i), "127.0.0.1", fast.port()));
  checker.set_targets(make_set(peers));
  REQUIRE(wait_until([&] { return held.hits() >= 1 && victim >= 10; }, 10000ms));
  checker.stop();
  stopped = true;
  const int delivered = victim;
  held.release(); // the held probe now gets its answer, which nobody may see
  const int others_before = others;
  CHECK(stays_true_for([&] { return late == 0; }, 500ms));
  CHECK(victim == delivered);
  CHECK(others > others_before); // the loop went on serving every other checker
  CHECK(wait_until([&] { return others >= others_before + 100; }, 10000ms));
}

TEST_CASE("a checker destroyed inside its own callback delivers nothing more") {
  HttpServer server;
  std::atomic<int> calls{0};
  std::unique_ptr<ActiveChecker> checker;
  checker = std::make_unique<ActiveChecker>(options(Kind::http, 10ms, 1000ms), [&](const ProbeResult&) {
    checker.reset();
    ++calls; // after the reset, so the test thread sees it done
  });
  std::vector<dynup::Peer> peers;
  for (int i = 0; i < 4; ++i) peers.push_back(peer("d" + std::to_string(i), "127.0.0.1", server.port()));
  checker->set_targets(make_set(peers));
  REQUIRE(wait_until([&] { return calls == 1; }));
  CHECK(stays_true_for([&] { return calls == 1; }, 200ms));
}

TEST_CASE("a callback may stop another checker without deadlock") {
  HttpServer server;
  std::atomic<int> first_calls{0}, second_calls{0};
  std::atomic<bool> second_stopped{false};
  ActiveChecker second(options(Kind::http, 10ms, 1000ms), [&](const ProbeResult&) {
    if (second_stopped) first_calls = -1000; // would be a callback after stop() returned
    ++second_calls;
  });
  ActiveChecker first(options(Kind::http, 10ms, 1000ms), [&](const ProbeResult&) {
    if (++first_calls == 3) {
      second.stop(); // on the loop's thread: stops at once, cannot wait for itself
      second_stopped = true;
    }
  });
  second.set_targets(make_set({peer("s", "127.0.0.1", server.port())}));
  REQUIRE(wait_until([&] { return second_calls >= 1; }));
  first.set_targets(make_set({peer("f", "127.0.0.1", server.port())}));
  REQUIRE(wait_until([&] { return second_stopped.load(); }));
  const int seen = second_calls;
  CHECK(stays_true_for([&] { return second_calls == seen && first_calls >= 0; }, 200ms));
  CHECK(wait_until([&] { return first_calls >= 6; })); // the first checker goes on
}

TEST_CASE("kind none starts no thread") {
  const std::size_t before = thread_count();
  {
    ActiveChecker checker(options(Kind::none, 20ms, 1000ms), [](const ProbeResult&) {});
    checker.set_targets(make_set({peer("a", "127.0.0.1", 1)}));
    CHECK(thread_count() <= before); // an earlier test's runtime may still be ending
    checker.stop();
  }
  CHECK(thread_count() <= before);
}
