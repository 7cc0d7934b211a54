// dynup-proxy's HTTP/1.1 framing over raw sockets: bodies without a length, pipelining,
// the request-smuggling inputs RFC 9112 says to refuse, and clients that send slowly or
// hold connections open, against the real binary.
#include <support/proxy.hpp>
#include <support/temp_dir.hpp>
#include <support/text.hpp>
#include <support/wait.hpp>

#include <doctest/doctest.h>
#include <httplib.h>
#include <nlohmann/json.hpp>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cctype>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <vector>

namespace {

using dynup_test::Backend;
using dynup_test::contains;
using dynup_test::file_upstream;
using dynup_test::peer;
using dynup_test::peers_doc;
using dynup_test::proxy_config;
using dynup_test::push_upstream;
using dynup_test::route;
using dynup_test::RunningProxy;
using dynup_test::TempDir;
using dynup_test::wait_until;
using dynup_test::write_by_rename;
using dynup_test::write_config;
using nlohmann::json;
using namespace std::chrono_literals;

// A client connection that sends bytes exactly as given and reads what comes back.
class Raw {
public:
  explicit Raw(int port) {
    fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(static_cast<std::uint16_t>(port));
    REQUIRE(fd_ >= 0);
    REQUIRE_MESSAGE(::connect(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0, "connect to port " << port);
  }
  ~Raw() { ::close(fd_); }
  Raw(const Raw&) = delete;
  Raw& operator=(const Raw&) = delete;

  /// False once the peer has closed or reset the connection.
  bool send(const std::string& bytes) {
    std::size_t done = 0;
    while (done < bytes.size()) {
      const ssize_t n = ::send(fd_, bytes.data() + done, bytes.size() - done, MSG_NOSIGNAL);
      if (n <= 0) return false;
      done += static_cast<std::size_t>(n);
    }
    return true;
  }

  /// Reads until `done(received)` holds, the connection ends, or `timeout`.
  template <class Done>
  void read_until(Done done, std::chrono::milliseconds timeout) {
    const auto until = std::chrono::steady_clock::now() + timeout;
    while (!closed_ && !done(in_)) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(until - std::chrono::steady_clock::now());
      if (left.count() <= 0) return;
      pollfd p{fd_, POLLIN, 0};
      if (::poll(&p, 1, static_cast<int>(left.count())) <= 0) continue;
      char buf[16384];
      const ssize_t n = ::recv(fd_, buf, sizeof buf, 0);
      if (n <= 0) {
        closed_ = true; // end of stream, or a reset
      } else {
        in_.append(buf, static_cast<std::size_t>(n));
      }
    }
  }

  /// Everything until the proxy closes the connection (up to `timeout`).
  void read_to_close(std::chrono::milliseconds timeout = 10000ms) {
    read_until([](const std::string&) { return false; }, timeout);
  }

  const std::string& received() const noexcept { return in_; }
  bool closed() const noexcept { return closed_; }

private:
  int fd_ = -1;
  std::string in_;
  bool closed_ = false;
};

// One response as read off the wire.
struct Response {
  int status = 0;
  std::vector<std::pair<std::string, std::string>> headers;
  std::string body;

  std::string header(const std::string& name) const {
    auto lower = [](std::string t) {
      for (char& ch : t) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
      return t;
    };
    for (const auto& [n, v] : headers)
      if (lower(n) == lower(name)) return v;
    return "";
  }
};

// The responses in `bytes`, in order (each framed by its Content-Length); what follows a
// response that cannot be parsed is left out, and `rest` says how many bytes that was.
std::vector<Response> parse_responses(const std::string& bytes, std::size_t* rest = nullptr) {
  std::vector<Response> out;
  std::size_t at = 0;
  while (at < bytes.size()) {
    const std::size_t end = bytes.find("\r\n\r\n", at);
    if (end == std::string::npos || bytes.compare(at, 9, "HTTP/1.1 ") != 0) break;
    Response r;
    r.status = std::stoi(bytes.substr(at + 9, 3));
    std::size_t line = bytes.find("\r\n", at) + 2;
    while (line < end + 2) {
      const std::size_t eol = bytes.find("\r\n", line);
      const std::string field = bytes.substr(line, eol - line);
      const std::size_t colon = field.find(':');
      if (colon != std::string::npos) {
        std::string value = field.substr(colon + 1);
        value.erase(0, value.find_first_not_of(' '));
        r.headers.emplace_back(field.substr(0, colon), value);
      }
      line = eol + 2;
    }
    std::size_t length = 0;
    if (const std::string cl = r.header("Content-Length"); !cl.empty()) length = std::stoul(cl);
    if (r.status / 100 == 1) length = 0;
    if (end + 4 + length > bytes.size()) break;
    r.body = bytes.substr(end + 4, length);
    at = end + 4 + length;
    out.push_back(std::move(r));
  }
  if (rest) *rest = bytes.size() - at;
  return out;
}

// True once `bytes` hold `n` complete responses (1xx not counted).
auto has_responses(std::size_t n) {
  return [n](const std::string& bytes) {
    std::size_t finals = 0;
    for (const Response& r : parse_responses(bytes))
      if (r.status >= 200) ++finals;
    return finals >= n;
  };
}

// A proxy in front of one backend, with the given limits and thread count.
struct Fixture {
  Backend backend{"b"};
  TempDir dir;
  std::unique_ptr<RunningProxy> proxy;

  explicit Fixture(const json& limits = json::object(), unsigned threads = 16) {
    write_by_rename(dir.file("peers.json"), peers_doc({peer(backend)}));
    json config = proxy_config(json::array({file_upstream("b", dir.file("peers.json")), push_upstream("pushed")}),
                               json::array({route("", "/", "b")}));
    config["threads"] = threads;
    config["admin"]["writes_without_token"] = true;
    for (const auto& [key, value] : limits.items()) config["limits"][key] = value;
    proxy = std::make_unique<RunningProxy>(write_config(dir, config));
  }

  std::vector<std::string> paths_seen() const {
    std::vector<std::string> out;
    for (const auto& s : backend.seen()) out.push_back(s.method + " " + s.path);
    return out;
  }
};

std::string joined(const std::vector<std::string>& v) {
  std::string out;
  for (const auto& s : v) out += (out.empty() ? "" : ", ") + s;
  return out.empty() ? "nothing" : out;
}

TEST_CASE("proxy: a POST without Content-Length has an empty body, and the next bytes are the next request") {
  Fixture f;
  Raw c(f.proxy->port());
  REQUIRE(c.send("POST /first HTTP/1.1\r\nHost: x\r\n\r\n"
                 "GET /second HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"));
  c.read_to_close();
  INFO("received:\n" << c.received());
  const auto rs = parse_responses(c.received());
  REQUIRE(rs.size() == 2);
  CHECK(rs[0].status == 200);
  CHECK(rs[0].header("X-Path") == "/first");
  CHECK(rs[1].status == 200);
  CHECK(rs[1].header("X-Path") == "/second");
  CHECK(c.closed());
  const auto seen = f.backend.seen();
  REQUIRE(seen.size() == 2);
  CHECK(seen[0].method == "POST");
  CHECK(seen[0].body.empty());
  CHECK(seen[1].method == "GET");
  CHECK(seen[1].path == "/second");
}

TEST_CASE("proxy: pipelined requests sent in one write get one response each, in order") {
  Fixture f;
  Raw c(f.proxy->port());
  REQUIRE(c.send("GET /p/1 HTTP/1.1\r\nHost: x\r\n\r\n"
                 "POST /p/2 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
                 "POST /p/3 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
                 "GET /p/4 HTTP/1.1\r\nHost: x\r\n\r\n"));
  c.read_until(has_responses(4), 10000ms);
  INFO("received:\n" << c.received());
  const auto rs = parse_responses(c.received());
  REQUIRE(rs.size() == 4);
  for (std::size_t i = 0; i < 4; ++i) {
    CAPTURE(i);
    CHECK(rs[i].status == 200);
    CHECK(rs[i].header("X-Path") == "/p/" + std::to_string(i + 1));
  }
  CHECK_FALSE(c.closed()); // still kept alive: a fifth request is served on it
  REQUIRE(c.send("GET /p/5 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"));
  c.read_to_close();
  const auto all = parse_responses(c.received());
  REQUIRE(all.size() == 5);
  CHECK(all[4].header("X-Path") == "/p/5");
  const auto seen = f.backend.seen();
  REQUIRE(seen.size() == 5);
  CHECK(seen[1].body == "hello");
  CHECK(seen[2].body == "abc");
}

TEST_CASE("proxy: request-smuggling inputs are refused, the connection closed, and nothing reaches the backend") {
  Fixture f;
  const std::string smuggled = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
  struct Case {
    std::string what;
    std::string bytes;
    int status;
  };
  const std::vector<Case> cases{
      {"Content-Length with Transfer-Encoding",
       "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + smuggled, 400},
      {"Transfer-Encoding with Content-Length",
       "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 40\r\n\r\n0\r\n\r\n" + smuggled, 400},
      {"two different Content-Lengths",
       "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 37\r\n\r\n" + smuggled, 400},
      {"a Content-Length list with different values",
       "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 0, 37\r\n\r\n" + smuggled, 400},
      {"a Content-Length that is not a number", "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: +37\r\n\r\n" + smuggled, 400},
      {"two Host headers", "GET /a HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n" + smuggled, 400},
      {"whitespace before a header's colon", "GET /a HTTP/1.1\r\nHost : x\r\n\r\n" + smuggled, 400},
      {"whitespace before Content-Length's colon",
       "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length : 37\r\n\r\n" + smuggled, 400},
      {"Transfer-Encoding: identity, chunked",
       "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity, chunked\r\n\r\n0\r\n\r\n" + smuggled, 501},
      {"Transfer-Encoding whose final coding is not chunked",
       "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n" + smuggled, 400},
      {"Transfer-Encoding: xchunked", "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n" + smuggled, 400},
      {"Transfer-Encoding in an HTTP/1.0 request",
       "POST /a HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + smuggled, 400},
      {"a folded header line", "GET /a HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n b\r\n\r\n" + smuggled, 400},
      {"an HTTP/1.1 request without Host", "GET /a HTTP/1.1\r\nX: y\r\n\r\n" + smuggled, 400},
      {"a chunk not followed by CRLF",
       "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXX0\r\n\r\n" + smuggled, 400},
      {"a bare LF after a chunk size",
       "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\r\n0\r\n\r\n" + smuggled, 400},
  };
  for (const Case& k : cases) {
    CAPTURE(k.what);
    Raw c(f.proxy->port());
    REQUIRE(c.send(k.bytes));
    c.read_to_close();
    INFO("received:\n" << c.received());
    std::size_t rest = 0;
    const auto rs = parse_responses(c.received(), &rest);
    REQUIRE(rs.size() == 1); // one answer: the smuggled request got none
    CHECK(rest == 0);
    CHECK(rs[0].status == k.status);
    CHECK(rs[0].header("Connection") == "close");
    CHECK(contains(rs[0].body, "dynup-proxy: "));
    CHECK(c.closed());
  }
  INFO("the backend saw: " << joined(f.paths_seen()));
  CHECK(f.backend.requests() == 0);
  httplib::Client admin("127.0.0.1", f.proxy->admin_port());
  auto m = admin.Get("/metrics");
  REQUIRE(m);
  CHECK(contains(m->body, "\ndynup_proxy_refused_requests_total " + std::to_string(cases.size()) + "\n"));

  SUBCASE("the admin listener frames requests by the same rules") {
    const auto version = f.proxy->status("pushed")["version"];
    Raw c(f.proxy->admin_port());
    REQUIRE(c.send("GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
                   "PUT /upstreams/pushed/peers HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\n\r\n{\"peers\":[]}"));
    c.read_to_close();
    const auto rs = parse_responses(c.received());
    REQUIRE(rs.size() == 1);
    CHECK(rs[0].status == 400);
    CHECK(rs[0].header("Content-Type") == "application/json");
    CHECK(json::parse(rs[0].body, nullptr, false).contains("error"));
    CHECK(c.closed());
    CHECK(f.proxy->status("pushed")["version"] == version);
  }
}

// Sends `bytes` (one request that ends the connection) and returns the body the backend
// got, once the proxy has answered 200.
std::string body_forwarded(Fixture& f, const std::string& bytes) {
  Raw c(f.proxy->port());
  REQUIRE(c.send(bytes));
  c.read_to_close();
  const auto rs = parse_responses(c.received());
  REQUIRE_MESSAGE(rs.size() == 1, c.received());
  CHECK(rs[0].status == 200);
  REQUIRE(f.backend.requests() == 1);
  return f.backend.seen()[0].body;
}

TEST_CASE("proxy: framing that RFC 9112 allows is served: a chunked body, equal Content-Lengths, 100-continue") {
  Fixture f;
  SUBCASE("a chunked body with extensions and trailers reaches the backend decoded") {
    CHECK(body_forwarded(f, "POST /chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked\r\nConnection: close\r\n\r\n"
                            "5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n") == "hello world");
  }
  SUBCASE("a repeated Content-Length with one value is that length") {
    CHECK(body_forwarded(f, "POST /same HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 3\r\n"
                            "Connection: close\r\n\r\nabc") == "abc");
  }
  SUBCASE("Expect: 100-continue gets 100 before the body is sent, and the body is forwarded") {
    Raw c(f.proxy->port());
    REQUIRE(c.send("PUT /expect HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"));
    c.read_until([](const std::string& in) { return contains(in, "\r\n\r\n"); }, 10000ms);
    REQUIRE_MESSAGE(c.received().rfind("HTTP/1.1 100 Continue\r\n\r\n", 0) == 0, c.received());
    CHECK(f.backend.requests() == 0);
    REQUIRE(c.send("data"));
    c.read_until(has_responses(1), 10000ms);
    const auto rs = parse_responses(c.received());
    REQUIRE(rs.size() == 2);
    CHECK(rs[1].status == 200);
    REQUIRE(f.backend.requests() == 1);
    CHECK(f.backend.seen()[0].body == "data");
    CHECK(f.backend.seen()[0].headers.count("Expect") == 0); // answered here, not forwarded
  }
}

TEST_CASE("proxy: clients sending a header byte at a time cannot take down /healthz or the proxy") {
  // More slow clients than the proxy has threads and the admin listener has workers.
  Fixture f(json{{"header_timeout_ms", 2000}}, 4);
  const int port = f.proxy->port();
  const int admin = f.proxy->admin_port();
  std::vector<std::unique_ptr<Raw>> slow;
  for (int i = 0; i < 64; ++i) slow.push_back(std::make_unique<Raw>(port));
  for (int i = 0; i < 16; ++i) slow.push_back(std::make_unique<Raw>(admin));
  const std::string head = "GET /slow-loris HTTP/1.1\r\nHost: x\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
  // One byte per connection per round, as a slowloris does, until each is cut off.
  std::atomic<bool> stop{false};
  std::thread dribble([&] {
    for (std::size_t at = 0; at < head.size() && !stop; ++at) {
      bool any = false;
      for (auto& c : slow) any = c->send(head.substr(at, 1)) || any;
      if (!any) return; // every one was cut off
      for (int i = 0; i < 20 && !stop; ++i) std::this_thread::sleep_for(25ms);
    }
  });
  struct StopDribble {
    std::atomic<bool>& stop;
    std::thread& t;
    ~StopDribble() {
      stop = true;
      t.join();
    }
  } stop_dribble{stop, dribble};

  httplib::Client health("127.0.0.1", admin);
  health.set_connection_timeout(5, 0);
  health.set_read_timeout(10, 0);
  auto h = health.Get("/healthz");
  REQUIRE_MESSAGE(h, "no /healthz reply: " << httplib::to_string(h.error()));
  CHECK(h->status == 200);
  httplib::Client through("127.0.0.1", port);
  through.set_connection_timeout(5, 0);
  through.set_read_timeout(10, 0);
  auto r = through.Get("/through");
  REQUIRE_MESSAGE(r, "no reply through the proxy: " << httplib::to_string(r.error()));
  CHECK(r->status == 200);
  CHECK(r->body == "b");

  // Each slow client is cut at header_timeout_ms however it keeps sending: 408, closed.
  std::size_t cut = 0;
  for (auto& c : slow) {
    c->read_to_close(15000ms);
    const auto rs = parse_responses(c->received());
    if (c->closed() && rs.size() == 1 && rs[0].status == 408) ++cut;
  }
  CHECK(cut == slow.size());
  CHECK(contains(parse_responses(slow[0]->received()).at(0).body, "limits.header_timeout_ms"));
  INFO("the backend saw: " << joined(f.paths_seen()));
  CHECK(f.backend.requests() == 1); // /through only
}

TEST_CASE("proxy: a body that stops arriving is cut at body_timeout_ms with 408") {
  Fixture f(json{{"body_timeout_ms", 1000}});
  Raw c(f.proxy->port());
  REQUIRE(c.send("POST /stalled HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhalf"));
  c.read_to_close(15000ms);
  INFO("received:\n" << c.received());
  const auto rs = parse_responses(c.received());
  REQUIRE(rs.size() == 1);
  CHECK(rs[0].status == 408);
  CHECK(contains(rs[0].body, "limits.body_timeout_ms"));
  CHECK(c.closed());
  CHECK(f.backend.requests() == 0);
}

TEST_CASE("proxy: past max_connections the connection idle longest is closed to make room") {
  Fixture f(json{{"max_connections", 16}});
  std::vector<std::unique_ptr<Raw>> idle;
  for (int i = 0; i < 40; ++i) idle.push_back(std::make_unique<Raw>(f.proxy->port()));
  // A request on a new connection is served: the oldest idle ones made room.
  Raw c(f.proxy->port());
  REQUIRE(c.send("GET /room HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"));
  c.read_to_close();
  const auto rs = parse_responses(c.received());
  REQUIRE_MESSAGE(rs.size() == 1, c.received());
  CHECK(rs[0].status == 200);
  // The first idle connections were the ones closed.
  idle.front()->read_to_close();
  CHECK(idle.front()->closed());
}

TEST_CASE("proxy: a large push sent with curl's form content type is taken, and an oversized one gets JSON 413") {
  Fixture f(json{{"max_admin_body_bytes", 65536}});
  json peers = json::array();
  for (int i = 0; i < 300; ++i)
    peers.push_back({{"host", "10.0." + std::to_string(i / 200) + "." + std::to_string(i % 200 + 1)}, {"port", 80}});
  const std::string body = json{{"peers", peers}}.dump();
  REQUIRE(body.size() > 8192); // past cpp-httplib's form limit
  REQUIRE(body.size() < 65536);
  httplib::Client admin("127.0.0.1", f.proxy->admin_port());
  admin.set_read_timeout(10, 0);
  auto ok = admin.Put("/upstreams/pushed/peers", body, "application/x-www-form-urlencoded"); // what curl -d sends
  REQUIRE(ok);
  CHECK_MESSAGE(ok->status == 200, ok->body);
  CHECK(f.proxy->status("pushed")["peers"].size() == 300);

  auto big = admin.Put("/upstreams/pushed/peers", std::string(65537, ' '), "application/json");
  REQUIRE(big);
  CHECK(big->status == 413);
  CHECK(big->get_header_value("Content-Type") == "application/json");
  const json err = json::parse(big->body, nullptr, false);
  REQUIRE_MESSAGE(err.is_object(), big->body);
  CHECK(contains(err["error"].get<std::string>(), "65536 bytes (limits.max_admin_body_bytes)"));
  CHECK(f.proxy->status("pushed")["peers"].size() == 300);
}

} // namespace
