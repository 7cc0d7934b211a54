// Differential tests: one real nginx runs a static upstream and a dynup upstream side
// by side (two server blocks, each with its own copy of the same backends, so that the
// two sides cannot disturb each other's backend state), the same request sequence goes
// through both, and the per-request $upstream_addr and $upstream_status must match. The
// scenarios come from nginx's documentation of the upstream module: round robin with
// retries (proxy_next_upstream), max_fails/fail_timeout, every peer down ("no live
// upstreams") and back, backup servers, and `hash … consistent` with an empty key.
//
// nginx runs as one process (master_process off), so both balancers keep one state and
// both sequences are deterministic.
#include <support/module_nginx.hpp>
#include <support/nginx.hpp>
#include <support/process.hpp>
#include <support/temp_dir.hpp>
#include <support/text.hpp>
#include <support/wait.hpp>

#include <doctest/doctest.h>
#include <httplib.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

using namespace std::chrono_literals;
using nlohmann::json;

namespace {

// A backend that answers with its name, or fails: 502 always, or on every other request.
class Backend {
public:
  enum class Mode { ok, fail, alternate };

  Backend() {
    server_.Get(".*", [this](const httplib::Request&, httplib::Response& res) {
      const long n = served_.fetch_add(1);
      const Mode m = mode_.load();
      const bool fail = m == Mode::fail || (m == Mode::alternate && n % 2 == 1);
      res.status = fail ? 502 : 200;
      res.set_content(fail ? "failing" : "ok", "text/plain");
    });
    port_ = server_.bind_to_any_port("127.0.0.1");
    if (port_ <= 0) throw std::runtime_error("backend: cannot bind 127.0.0.1:0");
    thread_ = std::thread([this] { server_.listen_after_bind(); });
  }
  ~Backend() {
    server_.stop();
    thread_.join();
  }
  Backend(const Backend&) = delete;
  Backend& operator=(const Backend&) = delete;

  int port() const noexcept { return port_; }
  void set(Mode m) noexcept { mode_ = m; }

private:
  httplib::Server server_;
  std::atomic<Mode> mode_{Mode::ok};
  std::atomic<long> served_{0};
  int port_ = 0;
  std::thread thread_;
};

struct Server {
  int weight = 1;
  bool backup = false;
  Backend::Mode mode = Backend::Mode::ok;
};

struct Scenario {
  std::vector<Server> servers;
  unsigned max_fails = 1;      ///< nginx's default
  unsigned fail_timeout_s = 10; ///< nginx's default
  std::string next_upstream = "error timeout http_502";
  /// `hash $arg_k consistent` against ring_hash key=$arg_k. Both sides then proxy to
  /// the same backends: a key's place on the ring depends on the server's address.
  bool hash = false;
};

// One nginx with both upstreams. Sides: 0 static, 1 dynup.
class SideBySide {
public:
  explicit SideBySide(const Scenario& s) : scenario_(s) {
    std::string missing = dynup_test::module_nginx_missing_reason();
    if (!missing.empty()) throw std::runtime_error(missing);
    for (int side = 0; side < 2; ++side)
      for (const Server& srv : s.servers) {
        backends_[side].push_back(side == 1 && s.hash ? backends_[0][backends_[1].size()] : std::make_shared<Backend>());
        backends_[side].back()->set(srv.mode);
      }
    json peers = json::array();
    for (std::size_t i = 0; i < s.servers.size(); ++i) {
      json p = {{"host", "127.0.0.1"}, {"port", backends_[1][i]->port()}, {"weight", s.servers[i].weight}};
      if (s.servers[i].backup) p["backup"] = true;
      peers.push_back(p);
    }
    dynup_test::write_by_rename(dir_.file("peers.json"), json{{"peers", peers}}.dump());
    std::filesystem::create_directories(dir_.file("shm"));
    dynup_test::start_with_retries("nginx (static and dynup side by side)", [this] { return start(); }, config_);
  }
  ~SideBySide() {
    if (nginx_) nginx_->stop(3000ms);
  }

  Backend& backend(int side, std::size_t i) { return *backends_[side].at(i); }
  void set_all(std::size_t i, Backend::Mode m) {
    for (int side = 0; side < 2; ++side) backend(side, i).set(m);
  }

  // One request through a side: "status addr-indices" such as "200 0,2" or "502 none".
  std::string request(int side, const std::string& key = "") {
    httplib::Client cli("127.0.0.1", ports_[side]);
    cli.set_connection_timeout(5s);
    cli.set_read_timeout(10s);
    auto res = cli.Get(key.empty() ? "/" : "/?k=" + key);
    if (!res) throw std::runtime_error("no answer from nginx: " + httplib::to_string(res.error()) + "\n" + error_log());
    // The times differ between the sides; how many tries each variable lists must not.
    const std::size_t n = entries(res->get_header_value("X-Addr"));
    const bool same_count = entries(res->get_header_value("X-Response-Time")) == n &&
                            entries(res->get_header_value("X-Connect-Time")) == n;
    return std::to_string(res->status) + " " + tries(side, res->get_header_value("X-Addr")) + " " +
           res->get_header_value("X-Status") + (same_count ? "" : " (per-try variables disagree)");
  }

  // The same request through both sides; CHECKs they agree; returns the static side's.
  std::string both(const std::string& key = "") {
    std::string a = request(0, key);
    std::string b = request(1, key);
    CHECK_MESSAGE(a == b, "static: " << a << "  dynup: " << b);
    return a;
  }

  // Whether nginx logged "no live upstreams" for a request to upstream `name`.
  bool logged_no_live(const std::string& name) const {
    std::string log = error_log();
    for (std::size_t at = 0; at < log.size();) {
      std::size_t end = log.find('\n', at);
      std::string line = log.substr(at, end == std::string::npos ? std::string::npos : end - at);
      if (dynup_test::contains(line, "no live upstreams") && dynup_test::contains(line, "\"http://" + name + "/"))
        return true;
      if (end == std::string::npos) break;
      at = end + 1;
    }
    return false;
  }

  std::string error_log() const {
    return dynup_test::exists(dir_.file("error.log")) ? dynup_test::read_all(dir_.file("error.log")) : "";
  }

private:
  static std::size_t entries(const std::string& list) {
    std::size_t n = list.empty() ? 0 : 1;
    for (std::size_t at = list.find(", "); at != std::string::npos; at = list.find(", ", at + 2)) ++n;
    return n;
  }

  // "127.0.0.1:P1, 127.0.0.1:P2" as backend indices "i,j"; an upstream's name (no live
  // upstreams) as "none".
  std::string tries(int side, const std::string& addrs) const {
    std::string out;
    std::size_t at = 0;
    while (at <= addrs.size()) {
      std::size_t end = addrs.find(", ", at);
      std::string one = addrs.substr(at, end == std::string::npos ? std::string::npos : end - at);
      std::string mapped = "none";
      for (std::size_t i = 0; i < backends_[side].size(); ++i)
        if (one == "127.0.0.1:" + std::to_string(backends_[side][i]->port())) mapped = std::to_string(i);
      out += (out.empty() ? "" : ",") + mapped;
      if (end == std::string::npos) break;
      at = end + 2;
    }
    return out;
  }

  std::string render() const {
    const Scenario& s = scenario_;
    std::string c = "load_module " + dynup_test::nginx_module_file() + ";\n";
    c += dynup_test::nginx_config_head(dir_.path());
    c += "  upstream st {\n";
    if (s.hash) c += "    hash $arg_k consistent;\n";
    // dynup keeps a set in id order ("127.0.0.1:PORT" sorted as text), and round robin
    // walks it in that order; the static side lists its servers in the same order.
    std::vector<std::size_t> order(s.servers.size());
    for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
      return std::to_string(backends_[1][a]->port()) < std::to_string(backends_[1][b]->port());
    });
    for (std::size_t i : order) {
      c += "    server 127.0.0.1:" + std::to_string(backends_[0][i]->port()) +
           " weight=" + std::to_string(s.servers[i].weight) + " max_fails=" + std::to_string(s.max_fails) +
           " fail_timeout=" + std::to_string(s.fail_timeout_s) + "s" + (s.servers[i].backup ? " backup" : "") + ";\n";
    }
    c += "  }\n";
    c += "  upstream dy {\n";
    c += "    dynup file://" + dir_.file("peers.json") + (s.hash ? " policy=ring_hash key=$arg_k" : "") +
         " health.passive.max_fails=" + std::to_string(s.max_fails) +
         " health.passive.fail_timeout_ms=" + std::to_string(s.fail_timeout_s * 1000) + " shared.dir=" + dir_.file("shm") +
         ";\n";
    c += "  }\n";
    const char* names[2] = {"st", "dy"};
    for (int side = 0; side < 2; ++side) {
      c += "  server {\n";
      c += "    listen 127.0.0.1:" + std::to_string(ports_[side]) + ";\n";
      c += "    location = /ready { return 200 \"" + token_ + "\"; }\n";
      c += "    location = /status { dynup_status; }\n";
      c += std::string("    location / { proxy_pass http://") + names[side] + "; proxy_next_upstream " +
           s.next_upstream + "; add_header X-Addr $upstream_addr always; add_header X-Status $upstream_status always; "
           "add_header X-Response-Time $upstream_response_time always; "
           "add_header X-Connect-Time $upstream_connect_time always; }\n";
      c += "  }\n";
    }
    c += "}\n";
    return c;
  }

  std::string start() {
    auto ports = dynup_test::free_loopback_ports(2);
    ports_[0] = ports[0];
    ports_[1] = ports[1];
    token_ = "dynup-diff-" + std::to_string(std::random_device{}());
    config_ = render();
    const std::string conf = dir_.file("nginx.conf");
    dynup_test::write_in_place(conf, config_);
    nginx_ = std::make_unique<dynup_test::Process>(std::vector<std::string>{
        dynup_test::nginx_binary(), "-e", "stderr", "-p", dir_.path() + "/", "-c", conf, "-g",
        "daemon off; master_process off;"});
    // Ready: both listeners answer, and the dynup side has its peers (asked through its
    // status, so no request reaches a backend before the scenario's first).
    bool ready = dynup_test::wait_until(
        [&] {
          if (nginx_->wait_exit(0ms)) return true;
          if (!dynup_test::nginx_answers("/ready", ports_[0], token_) ||
              !dynup_test::nginx_answers("/ready", ports_[1], token_))
            return false;
          httplib::Client cli("127.0.0.1", ports_[1]);
          auto res = cli.Get("/status");
          if (!res || res->status != 200) return false;
          json st = json::parse(res->body, nullptr, false);
          return st.is_object() && st["upstreams"][0]["peers"].size() == scenario_.servers.size();
        },
        15s);
    if (ready && !nginx_->wait_exit(0ms)) return {};
    std::string why = dynup_test::failed_start_output(*nginx_, dir_.file("error.log"));
    nginx_.reset();
    return why;
  }

  Scenario scenario_;
  dynup_test::TempDir dir_;
  std::vector<std::shared_ptr<Backend>> backends_[2];
  std::uint16_t ports_[2] = {0, 0};
  std::string token_;
  std::string config_;
  std::unique_ptr<dynup_test::Process> nginx_;
};

// Runs `body` until it completes within `window` (a scenario whose meaning depends on
// fail_timeout not passing mid-way), at most 3 times; a slow machine retries instead
// of comparing two clocks' edges.
template <class Body> void within(std::chrono::seconds window, Body body) {
  for (int attempt = 1;; ++attempt) {
    auto t0 = std::chrono::steady_clock::now();
    body();
    if (std::chrono::steady_clock::now() - t0 < window) return;
    MESSAGE("the scenario took longer than " << window.count() << " s, attempt " << attempt);
    REQUIRE(attempt < 3);
  }
}

} // namespace

TEST_CASE("nginx differential: round robin with a failing peer, retried on the next, with and without max_fails") {
  for (unsigned max_fails : {0u, 1u}) {
    CAPTURE(max_fails);
    within(8s, [&] {
      Scenario s;
      s.servers = {{1, false, Backend::Mode::fail}, {1, false, Backend::Mode::ok}, {2, false, Backend::Mode::ok}};
      s.max_fails = max_fails;
      SideBySide n(s);
      std::string all;
      for (int i = 0; i < 24; ++i) all += n.both() + "|";
      CHECK(dynup_test::contains(all, "200 0,")); // the failing peer was tried and passed on
    });
  }
}

TEST_CASE("nginx differential: max_fails=3 fail_timeout=10s takes out a peer that fails every other request") {
  within(8s, [] {
    Scenario s;
    s.servers = {{1, false, Backend::Mode::alternate}, {1, false, Backend::Mode::ok}};
    s.max_fails = 3;
    s.fail_timeout_s = 10;
    SideBySide n(s);
    int to_first = 0;
    for (int i = 0; i < 30; ++i) {
      std::string r = n.both();
      if (r.rfind("200 0 ", 0) == 0 || r.rfind("200 0,", 0) == 0) ++to_first;
    }
    // Successes do not clear the failures within fail_timeout: after its third failure
    // the peer gets nothing more.
    CHECK(to_first < 10);
  });
}

TEST_CASE("nginx differential: every peer failing gives 502 and no live upstreams, then both recover") {
  Scenario s;
  s.servers = {{1, false, Backend::Mode::fail}, {1, false, Backend::Mode::fail}};
  s.max_fails = 1;
  s.fail_timeout_s = 2;
  for (int attempt = 1;; ++attempt) {
    SideBySide n(s);
    auto t0 = std::chrono::steady_clock::now();
    // The first request tries both; the last try's 502 is not a failure for nginx, so
    // the next request tries that peer once more; then none is left.
    std::string first = n.both();
    CHECK((first == "502 0,1 502, 502" || first == "502 1,0 502, 502"));
    CHECK(dynup_test::contains(n.both(), ",none 502, 502"));
    CHECK(n.both() == "502 none 502");
    if (std::chrono::steady_clock::now() - t0 >= 1500ms) {
      REQUIRE(attempt < 3); // too slow to be inside fail_timeout on both clocks
      continue;
    }
    CHECK(n.logged_no_live("dy"));
    CHECK(n.logged_no_live("st"));
    n.set_all(0, Backend::Mode::ok);
    n.set_all(1, Backend::Mode::ok);
    // nginx measures fail_timeout in whole seconds: 2 s after a failure at t it is back
    // at the latest at t + 3 s; wait that long, then both route again, identically.
    std::this_thread::sleep_until(t0 + 3200ms);
    std::string after;
    for (int i = 0; i < 8; ++i) after += n.both() + "|";
    CHECK(dynup_test::contains(after, "200 0 200"));
    CHECK(dynup_test::contains(after, "200 1 200"));
    break;
  }
}

TEST_CASE("nginx differential: backup servers take traffic only when every primary is down") {
  within(8s, [] {
    Scenario s;
    s.servers = {{1, false, Backend::Mode::ok}, {2, false, Backend::Mode::ok}, {1, true, Backend::Mode::ok}};
    SideBySide n(s);
    std::string before;
    for (int i = 0; i < 9; ++i) before += n.both() + "|";
    CHECK_FALSE(dynup_test::contains(before, "200 2 "));
    n.set_all(0, Backend::Mode::fail);
    n.set_all(1, Backend::Mode::fail);
    std::string during;
    for (int i = 0; i < 9; ++i) during += n.both() + "|";
    CHECK(dynup_test::contains(during, "200 2 200|200 2 200"));
  });
}

TEST_CASE("nginx differential: hash consistent with an empty key falls back to round robin; keys map alike") {
  within(8s, [] {
    Scenario s;
    s.servers = {{1}, {2}, {1}, {3}};
    s.hash = true;
    SideBySide n(s);
    std::string empty, keyed;
    for (int i = 0; i < 14; ++i) {
      empty += n.both() + "|";
      keyed += n.both("user" + std::to_string(i * 7)) + "|";
    }
    std::map<std::string, int> spread; // the backend of each empty-key request
    for (std::size_t at = 0; at < empty.size();) {
      std::size_t end = empty.find('|', at);
      std::string r = empty.substr(at, end - at);
      ++spread[r.substr(4, r.find(' ', 4) - 4)];
      at = end + 1;
    }
    CHECK(spread.size() == 4); // round robin over every peer, not one peer for the empty key
  });
}
