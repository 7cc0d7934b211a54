#include <dynup/runtime/http.hpp>

#include "support/temp_dir.hpp"
#include "support/tls.hpp"
#include "support/wait.hpp"

#include <doctest/doctest.h>
#include <httplib.h>

#include <netinet/in.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

using namespace std::chrono_literals;
using dynup::Errc;
using dynup::HttpRequest;
using dynup::HttpResponse;
using dynup::Result;
using dynup::rt::HttpClient;
using dynup::rt::HttpEndpoint;
using dynup_test::stays_true_for;
using dynup_test::wait_until;

namespace {

// A cpp-httplib server on 127.0.0.1 and a free port, serving on its own thread until
// the test ends. `threads` bounds the handlers running at once.
class TestServer {
public:
  explicit TestServer(std::size_t threads = 8) {
    server_.new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
    server_.set_keep_alive_max_count(100000);
  }
  ~TestServer() { stop(); }
  httplib::Server& operator*() { return server_; }
  httplib::Server* operator->() { return &server_; }

  HttpEndpoint start() {
    port_ = server_.bind_to_any_port("127.0.0.1");
    REQUIRE(port_ > 0);
    thread_ = std::thread([this] { server_.listen_after_bind(); });
    REQUIRE(wait_until([&] { return server_.is_running(); }));
    return HttpEndpoint{"127.0.0.1", static_cast<std::uint16_t>(port_), false};
  }
  void stop() {
    server_.stop();
    if (thread_.joinable()) thread_.join();
  }

private:
  httplib::Server server_;
  int port_ = 0;
  std::thread thread_;
};

// A latch a handler can wait on, bounded so a failing test never hangs the server.
class Gate {
public:
  void open() {
    std::lock_guard<std::mutex> lock(mu_);
    open_ = true;
    cv_.notify_all();
  }
  void wait() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait_for(lock, 10s, [&] { return open_; });
  }

private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool open_ = false;
};

// GET /hold sets `held`, then answers "late" once `release` opens.
void serve_held(TestServer& server, Gate& release, std::atomic<bool>& held) {
  server->Get("/hold", [&release, &held](const httplib::Request&, httplib::Response& res) {
    held = true;
    release.wait();
    res.set_content("late", "text/plain");
  });
}

// The runtime of the test, with its HTTP client; calls go through the loop's thread.
struct Client {
  std::shared_ptr<dynup::rt::Runtime> rt = dynup::rt::Runtime::acquire().value();
  HttpClient& http = rt->service<HttpClient>();

  void configure(const dynup::rt::HttpClientOptions& o) {
    rt->loop().run_sync([&] { http.configure(o); });
  }

  // One call's outcome, filled on the loop's thread.
  struct Outcome {
    std::mutex mu;
    std::optional<Result<HttpResponse>> result;
    std::atomic<int> done_calls{0};
    bool ready() {
      std::lock_guard<std::mutex> lock(mu);
      return result.has_value();
    }
  };

  std::shared_ptr<Outcome> send(const HttpEndpoint& to, const HttpRequest& req, dynup::rt::CallId* id = nullptr) {
    auto out = std::make_shared<Outcome>();
    rt->loop().run_sync([&] {
      auto got = http.send(to, req, [out](Result<HttpResponse> r) {
        ++out->done_calls;
        std::lock_guard<std::mutex> lock(out->mu);
        out->result.emplace(std::move(r));
      });
      if (id != nullptr) *id = got;
    });
    return out;
  }

  Result<HttpResponse> call(const HttpEndpoint& to, const HttpRequest& req) {
    auto out = send(to, req);
    REQUIRE(wait_until([&] { return out->ready(); }, 15000ms));
    std::lock_guard<std::mutex> lock(out->mu);
    return *out->result;
  }

  void cancel(dynup::rt::CallId id) {
    rt->loop().run_sync([&] { http.cancel(id); });
  }

  HttpClient::HostStats stats(const HttpEndpoint& to) { return http.host_stats(to); }
};

HttpRequest get(std::string target, std::chrono::milliseconds timeout = 10s) {
  HttpRequest r;
  r.target = std::move(target);
  r.read_timeout = timeout;
  return r;
}

// A loopback port nothing listens on: bound, never listened, then closed.
std::uint16_t closed_port() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  REQUIRE(fd >= 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
  socklen_t len = sizeof a;
  REQUIRE(::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0);
  ::close(fd);
  return ntohs(a.sin_port);
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

} // namespace

TEST_CASE("http client: a GET sends its headers and returns status, headers (any case) and body") {
  TestServer server;
  server->Get("/v1/health/service/api", [](const httplib::Request& req, httplib::Response& res) {
    res.set_header("X-Consul-Index", "42");
    res.set_content("token=" + req.get_header_value("X-Consul-Token") + " index=" + req.get_param_value("index"),
                    "application/json");
  });
  auto to = server.start();
  Client c;
  auto req = get("/v1/health/service/api?index=7");
  req.headers.emplace_back("X-Consul-Token", "secret");
  auto r = c.call(to, req);
  REQUIRE_MESSAGE(r.ok(), r.error().message());
  CHECK(r->status == 200);
  CHECK(r->body == "token=secret index=7");
  REQUIRE(r->header("x-consul-index") != nullptr);
  CHECK(*r->header("x-consul-index") == "42");
  REQUIRE(r->header("CONTENT-TYPE") != nullptr);
  CHECK(*r->header("CONTENT-TYPE") == "application/json");
  CHECK(r->header("x-missing") == nullptr);
  auto st = c.stats(to);
  CHECK(st.requests == 1);
  CHECK(st.connects == 1);
  CHECK(st.open_connections == 1); // kept alive for the next call
  CHECK(st.peak_connections == 1);
  CHECK(st.failures == 0);
}

TEST_CASE("http client: a POST carries its body and content type; calls reuse the connection") {
  TestServer server;
  server->Post("/v3/watch", [](const httplib::Request& req, httplib::Response& res) {
    res.set_content(req.get_header_value("Content-Type") + "|" + req.body, "text/plain");
  });
  auto to = server.start();
  Client c;
  HttpRequest req;
  req.method = "POST";
  req.target = "/v3/watch";
  req.content_type = "application/json";
  req.body = std::string(3000, 'x'); // over 1 KiB: no "Expect: 100-continue" round trip
  for (int i = 0; i < 3; ++i) {
    auto r = c.call(to, req);
    REQUIRE_MESSAGE(r.ok(), r.error().message());
    CHECK(r->status == 200);
    CHECK(r->body == "application/json|" + req.body);
  }
  CHECK(c.stats(to).connects == 1);
  CHECK(c.stats(to).requests == 3);
}

TEST_CASE("http client: a 429 is a response, not an error") {
  TestServer server;
  server->Get("/busy", [](const httplib::Request&, httplib::Response& res) {
    res.status = 429;
    res.set_content("Your IP is issuing too many concurrent connections", "text/plain");
  });
  auto to = server.start();
  Client c;
  auto r = c.call(to, get("/busy"));
  REQUIRE_MESSAGE(r.ok(), r.error().message());
  CHECK(r->status == 429);
  CHECK(contains(r->body, "too many"));
  CHECK(c.stats(to).failures == 0);
}

TEST_CASE("http client: a refused connection is unavailable, with the OS reason and the address") {
  Client c;
  HttpEndpoint to{"127.0.0.1", closed_port(), false};
  auto r = c.call(to, get("/v1/kv/x"));
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().code() == Errc::unavailable);
  CHECK_MESSAGE(contains(r.error().message(), "refused"), r.error().message());
  CHECK_MESSAGE(contains(r.error().message(), "127.0.0.1:" + std::to_string(to.port)), r.error().message());
  auto st = c.stats(to);
  CHECK(st.failures == 1);
  CHECK(st.last_error == r.error().message());
  CHECK(st.open_connections == 0);
}

TEST_CASE("http client: done runs later on the loop's thread, never inside send()") {
  Client c;
  HttpEndpoint bad{"127.0.0.1", 0, false}; // fails before any I/O
  std::atomic<bool> inside{false}, ran{false}, on_loop{false};
  std::optional<Result<HttpResponse>> got;
  c.rt->loop().run_sync([&] {
    inside = true;
    c.http.send(bad, get("/"), [&](Result<HttpResponse> r) {
      CHECK_FALSE(inside.load());
      on_loop = c.rt->loop().in_loop();
      got.emplace(std::move(r));
      ran = true;
    });
    inside = false;
  });
  REQUIRE(wait_until([&] { return ran.load(); }));
  CHECK(on_loop);
  c.rt->loop().run_sync([&] {
    REQUIRE_FALSE(got->ok());
    CHECK(got->error().code() == Errc::invalid_argument);
  });
}

TEST_CASE("http client: a server trickling bytes past send()'s deadline times out") {
  TestServer server;
  std::atomic<bool> stop{false};
  server->Get("/slow", [&](const httplib::Request&, httplib::Response& res) {
    res.set_chunked_content_provider("text/plain", [&](std::size_t, httplib::DataSink& sink) {
      if (stop) return false;
      std::this_thread::sleep_for(20ms);
      return sink.write("x", 1); // false once the client has gone
    });
  });
  auto to = server.start();
  Client c;
  auto r = c.call(to, get("/slow", 300ms));
  stop = true;
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().code() == Errc::timeout);
  CHECK_MESSAGE(contains(r.error().message(), "300 ms"), r.error().message());
}

TEST_CASE("http client: cancel ends a call the server holds, and its done never runs") {
  TestServer server;
  Gate release;
  std::atomic<bool> held{false};
  serve_held(server, release, held);
  auto to = server.start();
  Client c;
  dynup::rt::CallId id = 0;
  auto out = c.send(to, get("/hold", 10s), &id);
  CHECK(id != 0);
  REQUIRE(wait_until([&] { return held.load(); }));
  c.cancel(id);
  c.cancel(id); // a second cancel of the same id does nothing
  c.cancel(id + 1000); // nor does an unknown one
  std::size_t left = 1;
  c.rt->loop().run_sync([&] { left = c.http.in_flight(); });
  CHECK(left == 0);
  release.open();
  CHECK(stays_true_for([&] { return out->done_calls.load() == 0; }, 300ms));
}

TEST_CASE("http client: stream chunks arrive in order, and on_body returning false ends the stream") {
  TestServer server;
  std::atomic<bool> stop{false};
  server->Get("/watch", [&](const httplib::Request&, httplib::Response& res) {
    res.set_header("X-Etcd-Cluster-Id", "cafe");
    auto n = std::make_shared<int>(0);
    res.set_chunked_content_provider("application/json", [&, n](std::size_t, httplib::DataSink& sink) {
      if (stop || *n == 1000) {
        sink.done();
        return true;
      }
      std::string piece = std::to_string((*n)++) + ",";
      std::this_thread::sleep_for(2ms);
      return sink.write(piece.data(), piece.size());
    });
  });
  auto to = server.start();
  Client c;

  // The whole stream: every piece, in order, then done with the head and no body.
  std::string seen;
  std::atomic<bool> finished{false};
  std::optional<Result<HttpResponse>> head;
  c.rt->loop().run_sync([&] {
    c.http.stream(
        to, get("/watch", 5s),
        [&](std::string_view piece) {
          seen.append(piece);
          return true;
        },
        [&](Result<HttpResponse> r) {
          head.emplace(std::move(r));
          finished = true;
        });
  });
  REQUIRE(wait_until([&] { return finished.load(); }, 15000ms));
  std::string want;
  for (int i = 0; i < 1000; ++i) want += std::to_string(i) + ",";
  c.rt->loop().run_sync([&] {
    REQUIRE_MESSAGE(head->ok(), head->error().message());
    CHECK((*head)->status == 200);
    CHECK((*head)->body.empty());
    REQUIRE((*head)->header("x-etcd-cluster-id") != nullptr);
    CHECK(seen == want);
  });

  // A reader that has enough: no more pieces after it says so, and done says 200.
  std::string some;
  int pieces_after_stop = 0;
  bool stopped = false;
  finished = false;
  head.reset();
  c.rt->loop().run_sync([&] {
    c.http.stream(
        to, get("/watch", 5s),
        [&](std::string_view piece) {
          if (stopped) ++pieces_after_stop;
          some.append(piece);
          stopped = some.size() >= 20;
          return !stopped;
        },
        [&](Result<HttpResponse> r) {
          head.emplace(std::move(r));
          finished = true;
        });
  });
  REQUIRE(wait_until([&] { return finished.load(); }));
  stop = true;
  c.rt->loop().run_sync([&] {
    REQUIRE_MESSAGE(head->ok(), head->error().message());
    CHECK((*head)->status == 200);
    CHECK(pieces_after_stop == 0);
    CHECK(some.size() >= 20);
    CHECK(want.compare(0, some.size(), some) == 0);
  });
}

TEST_CASE("http client: a stream silent for longer than read_timeout ends with timeout") {
  TestServer server;
  Gate release;
  server->Get("/quiet", [&](const httplib::Request&, httplib::Response& res) {
    auto sent = std::make_shared<bool>(false);
    res.set_chunked_content_provider("text/plain", [&, sent](std::size_t, httplib::DataSink& sink) {
      if (*sent) {
        release.wait(); // silence
        return false;
      }
      *sent = true;
      return sink.write("{}", 2);
    });
  });
  auto to = server.start();
  Client c;
  std::atomic<int> pieces{0};
  std::atomic<bool> finished{false};
  std::optional<Result<HttpResponse>> end;
  c.rt->loop().run_sync([&] {
    c.http.stream(
        to, get("/quiet", 300ms),
        [&](std::string_view) {
          ++pieces;
          return true;
        },
        [&](Result<HttpResponse> r) {
          end.emplace(std::move(r));
          finished = true;
        });
  });
  REQUIRE(wait_until([&] { return finished.load(); }));
  release.open();
  c.rt->loop().run_sync([&] {
    CHECK(pieces.load() >= 1);
    REQUIRE_FALSE(end->ok());
    CHECK(end->error().code() == Errc::timeout);
    CHECK_MESSAGE(contains(end->error().message(), "300 ms"), end->error().message());
  });
}

TEST_CASE("http client: max_host_connections bounds the connections; queued calls all complete") {
  TestServer server(16);
  std::mutex mu;
  std::set<int> open_ports; // client connections with a request in a handler now
  std::size_t most = 0;
  server->Get("/slow", [&](const httplib::Request& req, httplib::Response& res) {
    {
      std::lock_guard<std::mutex> lock(mu);
      open_ports.insert(req.remote_port);
      most = std::max(most, open_ports.size());
    }
    std::this_thread::sleep_for(50ms);
    {
      std::lock_guard<std::mutex> lock(mu);
      open_ports.erase(req.remote_port);
    }
    res.set_content("ok", "text/plain");
  });
  auto to = server.start();
  Client c;
  dynup::rt::HttpClientOptions o;
  o.max_host_connections = 2;
  c.configure(o);
  std::vector<std::shared_ptr<Client::Outcome>> outs;
  for (int i = 0; i < 10; ++i) outs.push_back(c.send(to, get("/slow")));
  for (auto& out : outs) {
    REQUIRE(wait_until([&] { return out->ready(); }, 15000ms));
    std::lock_guard<std::mutex> lock(out->mu);
    REQUIRE_MESSAGE(out->result->ok(), out->result->error().message());
    CHECK((*out->result)->status == 200);
  }
  std::lock_guard<std::mutex> lock(mu);
  CHECK(most >= 1);
  CHECK(most <= 2);
  auto st = c.stats(to);
  CHECK(st.peak_connections <= 2);
  CHECK(st.connects <= 2);
  CHECK(st.requests == 10);
}

TEST_CASE("http client: a body over max_response_bytes is too_large") {
  TestServer server;
  server->Get("/big", [](const httplib::Request&, httplib::Response& res) {
    res.set_content(std::string(100000, 'b'), "text/plain");
  });
  auto to = server.start();
  Client c;
  dynup::rt::HttpClientOptions o;
  o.max_response_bytes = 1000;
  c.configure(o);
  auto r = c.call(to, get("/big"));
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().code() == Errc::too_large);
  CHECK_MESSAGE(contains(r.error().message(), "1000 bytes"), r.error().message());
}

TEST_CASE("http client: no socket is opened into the descriptor reserve") {
  TestServer server;
  server->Get("/", [](const httplib::Request&, httplib::Response& res) { res.set_content("ok", "text/plain"); });
  auto to = server.start();
  rlimit lim{};
  REQUIRE(::getrlimit(RLIMIT_NOFILE, &lim) == 0);
  REQUIRE(lim.rlim_cur != RLIM_INFINITY);
  Client c;
  dynup::rt::HttpClientOptions o;
  o.fd_reserve = static_cast<unsigned>(lim.rlim_cur) + 10;
  c.configure(o);
  auto r = c.call(to, get("/"));
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().code() == Errc::io_error);
  CHECK_MESSAGE(contains(r.error().message(), "descriptor reserve"), r.error().message());
  CHECK_MESSAGE(contains(r.error().message(), "of limit " + std::to_string(lim.rlim_cur)), r.error().message());
  CHECK(c.stats(to).open_connections == 0);

  c.configure(dynup::rt::HttpClientOptions{}); // the default reserve leaves room here
  auto ok = c.call(to, get("/"));
  CHECK_MESSAGE(ok.ok(), ok.error().message());
}

TEST_CASE("http client: EMFILE when opening a socket is an io_error saying so") {
  Client c;
  dynup::rt::HttpClientOptions o;
  o.fd_reserve = 0; // let the kernel's limit, not the reserve, refuse
  c.configure(o);
  HttpEndpoint to{"127.0.0.1", closed_port(), false};
  rlimit saved{};
  REQUIRE(::getrlimit(RLIMIT_NOFILE, &saved) == 0);
  rlimit low = saved;
  low.rlim_cur = std::min<rlim_t>(saved.rlim_cur, 512);
  REQUIRE(::setrlimit(RLIMIT_NOFILE, &low) == 0);
  std::vector<int> filler; // every descriptor left under the lowered limit
  for (;;) {
    int fd = ::dup(0);
    if (fd < 0) break;
    filler.push_back(fd);
  }
  auto out = c.send(to, get("/"));
  bool answered = wait_until([&] { return out->ready(); });
  for (int fd : filler) ::close(fd);
  REQUIRE(::setrlimit(RLIMIT_NOFILE, &saved) == 0);
  REQUIRE(answered);
  std::lock_guard<std::mutex> lock(out->mu);
  REQUIRE_FALSE(out->result->ok());
  CHECK(out->result->error().code() == Errc::io_error);
  CHECK_MESSAGE(contains(out->result->error().message(), "Too many open files"), out->result->error().message());
}

TEST_CASE("http client: 500 concurrent calls all complete on the one loop thread") {
  TestServer server(16);
  std::atomic<int> served{0};
  server->Get(R"(/n/(\d+))", [&](const httplib::Request& req, httplib::Response& res) {
    ++served;
    res.set_content(req.matches[1].str(), "text/plain");
  });
  auto to = server.start();
  Client c;
  constexpr int n = 500;
  std::atomic<int> good{0}, off_loop{0}, wrong{0};
  c.rt->loop().run_sync([&] {
    for (int i = 0; i < n; ++i)
      c.http.send(to, get("/n/" + std::to_string(i), 30s), [&, i](Result<HttpResponse> r) {
        if (!c.rt->loop().in_loop()) ++off_loop;
        if (r && r->status == 200 && r->body == std::to_string(i))
          ++good;
        else
          ++wrong;
      });
  });
  REQUIRE(wait_until([&] { return good + wrong == n; }, 60000ms));
  CHECK(good.load() == n);
  CHECK(off_loop.load() == 0);
  auto st = c.stats(to);
  CHECK(st.peak_connections <= 16);
  CHECK(st.requests == static_cast<std::uint64_t>(n));
}

TEST_CASE("http client: a name that does not resolve is unavailable, naming the host") {
  Client c;
  HttpEndpoint to{"dynup-test.invalid", 80, false}; // .invalid never resolves (RFC 6761)
  auto r = c.call(to, get("/"));
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().code() == Errc::unavailable);
  CHECK_MESSAGE(contains(r.error().message(), "dynup-test.invalid"), r.error().message());
}

TEST_CASE("http client: cancel from inside on_body ends the stream, and a send from there completes") {
  TestServer server;
  std::atomic<bool> stop{false};
  server->Get("/watch", [&](const httplib::Request&, httplib::Response& res) {
    res.set_chunked_content_provider("text/plain", [&](std::size_t, httplib::DataSink& sink) {
      if (stop) return false;
      std::this_thread::sleep_for(5ms);
      return sink.write("e", 1);
    });
  });
  server->Get("/range", [](const httplib::Request&, httplib::Response& res) { res.set_content("all", "text/plain"); });
  auto to = server.start();
  Client c;
  std::atomic<int> pieces{0}, stream_done{0};
  std::atomic<bool> range_ok{false};
  dynup::rt::CallId id = 0;
  c.rt->loop().run_sync([&] {
    id = c.http.stream(
        to, get("/watch", 5s),
        [&](std::string_view) {
          if (++pieces == 3) {
            // What a watcher does on a compacted revision: drop the watch, fetch the range.
            c.http.cancel(id);
            c.http.send(to, get("/range"), [&](Result<HttpResponse> r) { range_ok = r && r->body == "all"; });
          }
          return true;
        },
        [&](Result<HttpResponse>) { ++stream_done; });
  });
  REQUIRE(wait_until([&] { return range_ok.load(); }));
  CHECK(stays_true_for([&] { return pieces.load() == 3 && stream_done.load() == 0; }, 200ms));
  stop = true;
  std::size_t left = 1;
  c.rt->loop().run_sync([&] { left = c.http.in_flight(); });
  CHECK(left == 0);
}

TEST_CASE("http client: ending the runtime aborts calls in flight without running their callbacks") {
  TestServer server;
  Gate release;
  std::atomic<bool> held{false};
  serve_held(server, release, held);
  auto to = server.start();
  std::shared_ptr<Client::Outcome> out;
  {
    Client c;
    out = c.send(to, get("/hold", 10s));
    REQUIRE(wait_until([&] { return held.load(); }));
  } // the last holder lets go: the client is destroyed on the loop's thread
  release.open();
  CHECK(stays_true_for([&] { return out->done_calls.load() == 0; }, 200ms));
}

TEST_CASE("http client: https verifies the server's certificate against ca_file, and refuses an unknown one") {
  dynup_test::TempDir dir;
  dynup_test::write_self_signed(dir.file("cert.pem"), dir.file("key.pem"));
  httplib::SSLServer server(dir.file("cert.pem").c_str(), dir.file("key.pem").c_str());
  REQUIRE(server.is_valid());
  server.Get("/v1/status/leader", [](const httplib::Request&, httplib::Response& res) {
    res.set_content("\"10.0.0.1:8300\"", "application/json");
  });
  int port = server.bind_to_any_port("127.0.0.1");
  REQUIRE(port > 0);
  std::thread serving([&] { server.listen_after_bind(); });
  REQUIRE(wait_until([&] { return server.is_running(); }));
  HttpEndpoint to{"127.0.0.1", static_cast<std::uint16_t>(port), true};
  {
    Client c;
    auto refused = c.call(to, get("/v1/status/leader")); // the system's CAs do not know it
    REQUIRE_FALSE(refused.ok());
    CHECK(refused.error().code() == Errc::unavailable);
    CHECK_MESSAGE(contains(refused.error().message(), "certificate"), refused.error().message());

    dynup::rt::HttpClientOptions o;
    o.ca_file = dir.file("cert.pem");
    c.configure(o);
    auto r = c.call(to, get("/v1/status/leader"));
    REQUIRE_MESSAGE(r.ok(), r.error().message());
    CHECK(r->status == 200);
    CHECK(r->body == "\"10.0.0.1:8300\"");
  }
  server.stop();
  serving.join();
}

TEST_CASE("http client: a throwing callback ends only its own call") {
  TestServer server;
  server->Get("/ok", [](const httplib::Request&, httplib::Response& res) { res.set_content("ok", "text/plain"); });
  auto to = server.start();
  Client c;
  std::atomic<int> answered{0};
  std::optional<Result<HttpResponse>> streamed;
  c.rt->loop().run_sync([&] {
    c.http.stream(
        to, get("/ok"), [](std::string_view) -> bool { throw std::runtime_error("decoder bug"); },
        [&](Result<HttpResponse> r) {
          streamed.emplace(std::move(r));
          ++answered;
        });
    c.http.send(to, get("/ok"), [](Result<HttpResponse>) { throw std::runtime_error("handler bug"); });
    c.http.send(to, get("/ok"), [&](Result<HttpResponse> r) {
      if (r && r->body == "ok") ++answered;
    });
  });
  REQUIRE(wait_until([&] { return answered.load() == 2; }));
  c.rt->loop().run_sync([&] {
    REQUIRE_FALSE(streamed->ok());
    CHECK(streamed->error().code() == Errc::io_error);
    CHECK_MESSAGE(contains(streamed->error().message(), "decoder bug"), streamed->error().message());
  });
}
