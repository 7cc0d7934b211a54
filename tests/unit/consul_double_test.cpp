// Self-tests of the registry protocol double (tests/support/consul_double.hpp) for
// what the one-runtime watcher (issue 19) leans on: the per-client connection cap, the
// cluster-wide blocking endpoints and their filter, per-service index isolation, node
// checks, and batches of a thousand services. Raw sockets where a test counts
// connections, so no client pool hides one.
#include <support/consul_double.hpp>
#include <support/wait.hpp>

#include <doctest/doctest.h>

#include <httplib.h>
#include <nlohmann/json.hpp>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <future>
#include <map>
#include <string>
#include <vector>

namespace {

using dynup_test::ConsulDouble;
using dynup_test::ConsulInstance;
using dynup_test::consul_instance;
using dynup_test::consul_instances;
using dynup_test::stays_true_for;
using dynup_test::wait_until;
using namespace std::chrono_literals;
using json = nlohmann::json;

// One TCP connection to the double, closed on destruction.
class RawConnection {
public:
  explicit RawConnection(std::uint16_t port) {
    fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    timeval tv{10, 0}; // a bound on every read: a broken double fails the test, not hangs it
    ::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    connected_ = ::connect(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
  }
  ~RawConnection() {
    if (fd_ >= 0) ::close(fd_);
  }
  RawConnection(const RawConnection&) = delete;
  RawConnection& operator=(const RawConnection&) = delete;

  bool connected() const { return connected_; }

  bool send_get(const std::string& target) {
    std::string req = "GET " + target + " HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    return ::send(fd_, req.data(), req.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(req.size());
  }

  // Reads one response: {status, body}; status 0 when the connection ends first.
  std::pair<int, std::string> read_response() {
    std::size_t end;
    while ((end = buf_.find("\r\n\r\n")) == std::string::npos)
      if (!fill()) return {0, {}};
    std::string head = buf_.substr(0, end);
    buf_.erase(0, end + 4);
    int status = std::atoi(head.c_str() + head.find(' ') + 1);
    std::size_t length = 0;
    std::string lower = head;
    std::transform(lower.begin(), lower.end(), lower.begin(), [](char c) { return static_cast<char>(std::tolower(c)); });
    if (auto at = lower.find("content-length:"); at != std::string::npos)
      length = std::strtoull(lower.c_str() + at + 15, nullptr, 10);
    while (buf_.size() < length)
      if (!fill()) return {0, {}};
    std::string body = buf_.substr(0, length);
    buf_.erase(0, length);
    return {status, body};
  }

  std::pair<int, std::string> get(const std::string& target) {
    if (!send_get(target)) return {0, {}};
    return read_response();
  }

  // True when the peer has closed the connection (a read returns end of stream).
  bool closed_by_peer() {
    char c;
    return buf_.empty() && ::recv(fd_, &c, 1, 0) == 0;
  }

private:
  bool fill() {
    char chunk[4096];
    ssize_t n = ::recv(fd_, chunk, sizeof chunk, 0);
    if (n <= 0) return false;
    buf_.append(chunk, static_cast<std::size_t>(n));
    return true;
  }

  int fd_ = -1;
  bool connected_ = false;
  std::string buf_;
};

std::string get_index(httplib::Result& r) { return r ? r->get_header_value("X-Consul-Index") : std::string(); }

// A blocking GET on its own client and thread.
std::future<httplib::Result> blocking_get(std::uint16_t port, std::string target) {
  return std::async(std::launch::async, [port, target] {
    httplib::Client c("127.0.0.1", port);
    c.set_read_timeout(30, 0);
    return c.Get(target.c_str());
  });
}

ConsulInstance on_node(std::uint16_t port, const std::string& node) { return consul_instance(port, node); }

} // namespace

// --- the connection cap ----------------------------------------------------------------

TEST_CASE("consul double: the connection past the per-client cap gets one 429 and is closed") {
  ConsulDouble d;
  d.set_service("api", consul_instances({8080}));
  d.set_max_conns_per_client(3);

  std::vector<std::unique_ptr<RawConnection>> kept;
  for (int i = 0; i < 3; ++i) {
    kept.push_back(std::make_unique<RawConnection>(d.port()));
    REQUIRE(kept.back()->connected());
    CHECK(kept.back()->get("/v1/health/service/api").first == 200);
  }
  REQUIRE(wait_until([&] { return d.connections().open == 3; }));

  RawConnection extra(d.port());
  REQUIRE(extra.connected());
  auto refused = extra.get("/v1/health/service/api");
  CHECK(refused.first == 429);
  CHECK(refused.second.find("Too Many Requests") != std::string::npos);
  CHECK(extra.closed_by_peer());

  REQUIRE(wait_until([&] { return d.connections().open == 3; }));
  auto c = d.connections();
  CHECK(c.refused == 1);
  CHECK(c.accepted == 4);
  CHECK(c.peak == 4);
  CHECK(d.requests("/v1/health/service/api") == 3); // the refused request never reached the API

  // The connections under the cap keep working; a closed one frees a slot.
  CHECK(kept[0]->get("/v1/health/service/api").first == 200);
  kept.pop_back();
  REQUIRE(wait_until([&] { return d.connections().open == 2; }));
  RawConnection again(d.port());
  CHECK(again.get("/v1/health/service/api").first == 200);
  CHECK(d.connections().refused == 1);
}

TEST_CASE("consul double: without a cap every connection is served and the peak is exact") {
  ConsulDouble d;
  d.set_service("api", consul_instances({8080}));
  {
    std::vector<std::unique_ptr<RawConnection>> conns;
    for (int i = 0; i < 20; ++i) {
      conns.push_back(std::make_unique<RawConnection>(d.port()));
      CHECK(conns.back()->get("/v1/health/service/api").first == 200);
    }
    CHECK(d.connections().open == 20);
  }
  REQUIRE(wait_until([&] { return d.connections().open == 0; }));
  auto c = d.connections();
  CHECK(c.peak == 20);
  CHECK(c.accepted == 20);
  CHECK(c.refused == 0);
  d.reset_peak_connections();
  CHECK(d.connections().peak == 0);
}

TEST_CASE("consul double: more than a thousand blocking queries are held at once") {
  // 1 001 client sockets and 1 001 server sockets in this process.
  rlimit lim{};
  ::getrlimit(RLIMIT_NOFILE, &lim);
  if (lim.rlim_cur < 2200 && lim.rlim_max >= 2200) {
    lim.rlim_cur = std::min<rlim_t>(lim.rlim_max, 4096);
    ::setrlimit(RLIMIT_NOFILE, &lim);
  }
  ::getrlimit(RLIMIT_NOFILE, &lim);
  if (lim.rlim_cur < 2200) {
    MESSAGE("skipped: RLIMIT_NOFILE is " << lim.rlim_cur);
    return;
  }
  ConsulDouble d;
  d.set_service("api", consul_instances({8080}));
  const std::string target = "/v1/health/service/api?index=" + std::to_string(d.service_index("api")) + "&wait=60s";
  constexpr std::size_t n = 1001;
  std::vector<std::unique_ptr<RawConnection>> conns;
  for (std::size_t i = 0; i < n; ++i) {
    conns.push_back(std::make_unique<RawConnection>(d.port()));
    REQUIRE(conns.back()->connected());
    REQUIRE(conns.back()->send_get(target));
  }
  REQUIRE(wait_until([&] { return d.held() == n; }, 30s));
  d.set_service("api", consul_instances({8080, 8081}));
  std::size_t woken = 0;
  for (auto& c : conns) {
    auto r = c->read_response();
    woken += r.first == 200 && json::parse(r.second).size() == 2;
  }
  CHECK(woken == n);
  CHECK(d.connections().peak >= n);
}

// --- cluster-wide endpoints --------------------------------------------------------------

TEST_CASE("consul double: /v1/catalog/services blocks until a registration changes, not a check") {
  ConsulDouble d;
  auto web = consul_instances({8080, 8081});
  web[0].tags = {"v2", "blue"};
  web[1].tags = {"v2"};
  d.set_services({{"web", web}, {"db", consul_instances({5432})}});

  httplib::Client c("127.0.0.1", d.port());
  auto first = c.Get("/v1/catalog/services");
  REQUIRE(first);
  CHECK(first->status == 200);
  CHECK(json::parse(first->body) == json{{"db", json::array()}, {"web", {"blue", "v2"}}});
  std::string index = get_index(first);
  CHECK(index == std::to_string(d.catalog_services_index()));

  auto held = blocking_get(d.port(), "/v1/catalog/services?index=" + index + "&wait=10s");
  REQUIRE(wait_until([&] { return d.held() == 1; }));
  d.set_instance_checks("web", "web-8080", {"critical"}); // a check is not a registration
  d.touch_service("db");
  CHECK(stays_true_for([&] { return d.held() == 1; }, 200ms));
  CHECK(std::to_string(d.catalog_services_index()) == index);

  web[1].tags = {"v3"};
  d.set_service("web", web);
  auto woken = held.get();
  REQUIRE(woken);
  CHECK(get_index(woken) == std::to_string(d.index()));
  CHECK(json::parse(woken->body)["web"] == json{"blue", "v2", "v3"});

  // A deregistered service leaves the map.
  auto after = std::to_string(d.catalog_services_index());
  d.set_service("db", {});
  auto gone = c.Get(("/v1/catalog/services?index=" + after + "&wait=10s").c_str());
  REQUIRE(gone);
  CHECK_FALSE(json::parse(gone->body).contains("db"));
}

TEST_CASE("consul double: /v1/health/state/any blocks until a check changes, not a registration") {
  ConsulDouble d;
  d.set_services({{"web", consul_instances({8080})}, {"db", {on_node(5432, "node-2")}}});

  httplib::Client c("127.0.0.1", d.port());
  auto first = c.Get("/v1/health/state/any");
  REQUIRE(first);
  auto checks = json::parse(first->body);
  // serfHealth on each node, one service check per instance.
  REQUIRE(checks.size() == 4);
  for (const auto& k : checks) {
    CHECK(k.contains("ModifyIndex"));
    CHECK(k.contains("CreateIndex"));
    CHECK(k.contains("Output"));
    if (k["CheckID"] == "serfHealth") {
      CHECK(k["ServiceName"] == "");
      CHECK(k["ServiceID"] == "");
    }
  }
  std::string index = get_index(first);
  CHECK(index == std::to_string(d.checks_index()));

  auto held = blocking_get(d.port(), "/v1/health/state/any?index=" + index + "&wait=10s");
  REQUIRE(wait_until([&] { return d.held() == 1; }));
  auto moved = consul_instances({8080});
  moved[0].address = "10.9.9.9"; // a registration change keeps every check as it was
  d.set_service("web", moved);
  CHECK(stays_true_for([&] { return d.held() == 1; }, 200ms));

  d.set_instance_checks("db", "db-5432", {"warning"});
  auto woken = held.get();
  REQUIRE(woken);
  CHECK(get_index(woken) == std::to_string(d.index()));
  auto now = json::parse(woken->body);
  auto db = std::find_if(now.begin(), now.end(), [](const json& k) { return k["ServiceID"] == "db-5432"; });
  REQUIRE(db != now.end());
  CHECK((*db)["Status"] == "warning");
  CHECK((*db)["ModifyIndex"] == d.index());
  CHECK((*db)["CreateIndex"] < (*db)["ModifyIndex"]);

  // A removed instance removes its check: that moves the index too.
  auto before = d.checks_index();
  d.set_service("web", {});
  CHECK(d.checks_index() > before);

  // /v1/health/state/<state> lists only that state.
  auto warning = c.Get("/v1/health/state/warning");
  REQUIRE(warning);
  CHECK(json::parse(warning->body).size() == 1);
  auto bad = c.Get("/v1/health/state/sideways");
  REQUIRE(bad);
  CHECK(bad->status == 400);
}

TEST_CASE("consul double: health/state filter keeps the named services, or node checks with \"\"") {
  ConsulDouble d;
  d.set_services({{"a", consul_instances({1})}, {"b", consul_instances({2})}, {"c", consul_instances({3})}});
  httplib::Client c("127.0.0.1", d.port());
  auto names = [&](const std::string& filter) {
    std::vector<std::string> out;
    auto r = c.Get("/v1/health/state/any", httplib::Params{{"filter", filter}}, httplib::Headers{});
    REQUIRE(r);
    REQUIRE(r->status == 200);
    for (const auto& k : json::parse(r->body)) out.push_back(k["CheckID"].get<std::string>());
    return out;
  };
  CHECK(names(R"(ServiceName == "a" or ServiceName == "c")") == std::vector<std::string>{"service:a-1", "service:c-3"});
  CHECK(names(R"(ServiceName == "b")") == std::vector<std::string>{"service:b-2"});
  CHECK(names(R"(ServiceName == "")") == std::vector<std::string>{"serfHealth"});
  CHECK(names(R"(ServiceName == "" or ServiceName == "a")") == std::vector<std::string>{"serfHealth", "service:a-1"});
  CHECK(names(R"(ServiceName == "zzz")").empty());
  CHECK(names(R"((ServiceName == "a" or ServiceName == "b") and Status == "passing")").size() == 2);
  CHECK(names(R"("a-1" in ServiceID or ServiceName == "b" and not Status == "passing")") ==
        std::vector<std::string>{"service:a-1"});
  CHECK(names("").size() == 4); // an empty filter is no filter
}

TEST_CASE("consul double: a health/state filter it cannot parse is a plain-text 400, before blocking") {
  ConsulDouble d;
  d.set_service("a", consul_instances({1}));
  httplib::Client c("127.0.0.1", d.port());
  const std::string index = std::to_string(d.checks_index());
  for (std::string bad : {R"(ServiceName = "a")", R"(ServiceName == "a" or)", R"(ServiceName == "a)",
                          R"(Bogus == "a")", R"((ServiceName == "a")", R"(ServiceName ~ "a")", R"("a" in)", R"(not)"}) {
    CAPTURE(bad);
    auto t0 = std::chrono::steady_clock::now();
    auto r = c.Get("/v1/health/state/any", httplib::Params{{"filter", bad}, {"index", index}, {"wait", "10s"}},
                   httplib::Headers{});
    REQUIRE(r);
    CHECK(r->status == 400);
    CHECK(r->get_header_value("Content-Type").rfind("text/plain", 0) == 0);
    CHECK(r->body.find("Failed to create boolean expression evaluator") == 0);
    CHECK(std::chrono::steady_clock::now() - t0 < 5s);
  }
}

// --- per-service indexes and node checks ---------------------------------------------

TEST_CASE("consul double: changing one service does not move another's index") {
  ConsulDouble d;
  d.set_services({{"a", consul_instances({1})}, {"b", consul_instances({2})}});
  httplib::Client c("127.0.0.1", d.port());
  auto b0 = c.Get("/v1/health/service/b");
  auto bc0 = c.Get("/v1/catalog/service/b");
  REQUIRE(b0);
  REQUIRE(bc0);
  const std::string b_index = get_index(b0);
  CHECK(b_index == std::to_string(d.service_index("b")));

  auto held = blocking_get(d.port(), "/v1/health/service/b?index=" + b_index + "&wait=10s");
  REQUIRE(wait_until([&] { return d.held() == 1; }));
  d.set_service("a", consul_instances({1, 11}));
  d.set_instance_checks("a", "a-1", {"critical"});
  d.touch_service("a");
  CHECK(stays_true_for([&] { return d.held() == 1; }, 200ms));

  auto a1 = c.Get("/v1/health/service/a");
  auto b1 = c.Get("/v1/health/service/b");
  auto bc1 = c.Get("/v1/catalog/service/b");
  REQUIRE(a1);
  REQUIRE(b1);
  REQUIRE(bc1);
  CHECK(get_index(a1) == std::to_string(d.index())); // the global index at a's last change
  CHECK(get_index(b1) == b_index);
  CHECK(get_index(bc1) == get_index(bc0));

  d.set_service("b", consul_instances({2, 22}));
  auto woken = held.get();
  REQUIRE(woken);
  CHECK(get_index(woken) == std::to_string(d.index()));
}

TEST_CASE("consul double: a node check reaches every instance on its node and health/state once") {
  ConsulDouble d;
  d.set_services({{"a", {on_node(1, "node-2")}}, {"b", {on_node(2, "node-2"), on_node(3, "node-3")}},
                  {"c", {on_node(4, "node-3")}}});
  const auto a0 = d.service_index("a"), b0 = d.service_index("b"), c0 = d.service_index("c");
  const auto checks0 = d.checks_index(), catalog0 = d.catalog_services_index();
  httplib::Client c("127.0.0.1", d.port());

  auto held = blocking_get(d.port(), "/v1/health/service/a?index=" + std::to_string(a0) + "&wait=10s");
  REQUIRE(wait_until([&] { return d.held() == 1; }));
  d.set_node_check("node-2", "critical");
  auto woken = held.get();
  REQUIRE(woken);
  auto serf_of = [](const json& entry) {
    for (const auto& k : entry["Checks"])
      if (k["CheckID"] == "serfHealth") return k;
    return json();
  };
  auto a = json::parse(woken->body);
  REQUIRE(a.size() == 1);
  CHECK(serf_of(a[0])["Status"] == "critical");
  CHECK(serf_of(a[0])["ServiceName"] == "");

  CHECK(d.service_index("a") > a0);
  CHECK(d.service_index("b") > b0); // one of b's instances is on node-2
  CHECK(d.service_index("c") == c0);
  CHECK(d.checks_index() > checks0);
  CHECK(d.catalog_services_index() == catalog0);

  auto b = json::parse(c.Get("/v1/health/service/b")->body);
  REQUIRE(b.size() == 2);
  for (const auto& e : b)
    CHECK(serf_of(e)["Status"] == (e["Node"]["Node"] == "node-2" ? "critical" : "passing"));
  CHECK(json::parse(c.Get("/v1/health/service/b?passing=1")->body).size() == 1);
  CHECK(json::parse(c.Get("/v1/health/service/a?passing=1")->body).empty());

  auto state = json::parse(c.Get("/v1/health/state/critical")->body);
  REQUIRE(state.size() == 1);
  CHECK(state[0]["Node"] == "node-2");
  CHECK(state[0]["CheckID"] == "serfHealth");
  CHECK(state[0]["ServiceName"] == "");

  // Back to passing; a check on a node without services still lists.
  d.remove_node_check("node-2");
  CHECK(json::parse(c.Get("/v1/health/service/a?passing=1")->body).size() == 1);
  d.set_node_check("node-9", "warning", "mem", "Memory");
  auto mem = json::parse(c.Get("/v1/health/state/warning")->body);
  REQUIRE(mem.size() == 1);
  CHECK(mem[0]["Name"] == "Memory");
  CHECK(mem[0]["Node"] == "node-9");
}

// --- many services -----------------------------------------------------------------------

TEST_CASE("consul double: a batch registers, changes and removes a thousand services") {
  ConsulDouble d;
  std::map<std::string, std::vector<ConsulInstance>> fleet;
  for (int s = 0; s < 1000; ++s) {
    auto p = static_cast<std::uint16_t>(10000 + 2 * s);
    fleet["svc-" + std::to_string(s)] = {on_node(p, "node-" + std::to_string(s % 10)),
                                         on_node(static_cast<std::uint16_t>(p + 1), "node-" + std::to_string(s % 7))};
  }
  const auto before = d.index();
  d.set_services(fleet);
  CHECK(d.index() == before + 1); // one transaction
  httplib::Client c("127.0.0.1", d.port());
  auto services = c.Get("/v1/catalog/services");
  REQUIRE(services);
  CHECK(json::parse(services->body).size() == 1000);
  auto state = c.Get("/v1/health/state/any");
  REQUIRE(state);
  CHECK(json::parse(state->body).size() == 2000 + 10); // a check per instance, serfHealth per node
  auto one = c.Get("/v1/health/service/svc-999");
  REQUIRE(one);
  CHECK(json::parse(one->body).size() == 2);

  const auto untouched = d.service_index("svc-1");
  d.batch([](ConsulDouble::Batch& b) {
    b.set_instance_checks("svc-7", "svc-7-10015", {"critical"});
    b.deregister("svc-8");
    b.set_service("svc-1000", {consul_instance(9000)});
  });
  CHECK(d.service_index("svc-7") == d.index());
  CHECK(d.service_index("svc-8") == d.index());
  CHECK(d.service_index("svc-1") == untouched);
  auto after = json::parse(c.Get("/v1/catalog/services")->body);
  CHECK(after.size() == 1000);
  CHECK_FALSE(after.contains("svc-8"));
  CHECK(after.contains("svc-1000"));
  const auto unchanged = d.index();
  CHECK_THROWS_AS(d.set_instance_checks("svc-7", "nope", {"passing"}), std::logic_error);
  CHECK(d.index() == unchanged);
}
