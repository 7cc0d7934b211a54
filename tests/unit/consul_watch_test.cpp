// A ConsulDriver run by RegistryWatcher (direct mode: its own blocking query) against
// the Consul protocol double: one test per
// blocking-query rule the watcher owns (DESIGN.md, "Consul blocking queries"), per
// injected fault, and per guarantee (fallback, guards, status, prompt stop).
#include <dynup/snapshot_file.hpp>
#include <dynup/source/consul.hpp>
#include <dynup/watch/consul_watch.hpp>
#include <dynup/watch/registry_watcher.hpp>

#include <support/consul_double.hpp>
#include <support/peers.hpp>
#include <support/temp_dir.hpp>
#include <support/watching.hpp>
#include <support/wait.hpp>

#include <doctest/doctest.h>

#include <httplib.h>

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace {

using dynup::ConsulSource;
using dynup::Errc;
using dynup::Publisher;
using dynup::WatchOptions;
using dynup::WatcherStatus;
using dynup_test::ConsulDouble;
using dynup_test::ConsulFault;
using dynup_test::ConsulInstance;
using dynup_test::ConsulJitter;
using dynup_test::consul_instance;
using dynup_test::consul_instances;
using dynup_test::stays_true_for;
using dynup_test::TempDir;
using dynup_test::wait_until;
using namespace std::chrono_literals;
using Watcher = dynup::RegistryWatcher;
using Ports = dynup_test::Ports;
using dynup_test::contains;
using dynup_test::ports_of;
using dynup_test::Recorder;

// Every request the watcher handed to its transport (to see read timeouts).
class SeenRequests {
public:
  void add(const dynup::HttpRequest& r) {
    std::lock_guard<std::mutex> lock(mu_);
    all_.push_back(r);
  }
  std::vector<dynup::HttpRequest> all() const {
    std::lock_guard<std::mutex> lock(mu_);
    return all_;
  }

private:
  mutable std::mutex mu_;
  std::vector<dynup::HttpRequest> all_;
};

// Short waits and small backoffs keep each test well under a second or two.
WatchOptions fast(std::chrono::milliseconds wait = 300ms) {
  WatchOptions o;
  o.wait = wait;
  o.backoff_base = 20ms;
  o.backoff_cap = 160ms;
  o.min_interval = 5ms;
  o.burst = 2;
  return o;
}

dynup::Result<std::unique_ptr<Watcher>> try_start(const ConsulDouble& d, Publisher& pub, const std::string& path,
                                                  WatchOptions o, Recorder* rec = nullptr,
                                                  std::shared_ptr<SeenRequests> seen = nullptr) {
  auto src = ConsulSource::from_spec(d.spec(path));
  REQUIRE(src);
  auto runtime = dynup::rt::Runtime::acquire();
  REQUIRE(runtime);
  dynup::detail::RequestTap tap;
  if (seen) tap = [seen](const dynup::HttpRequest& r) { seen->add(r); };
  auto driver = std::make_unique<dynup::detail::ConsulDriver>(*runtime, std::move(src).value(), std::move(tap));
  auto w = Watcher::start(*runtime, pub, std::move(driver), std::move(o),
                          rec ? rec->on_publish() : dynup::PublishCallback{},
                          rec ? rec->on_error() : dynup::ErrorCallback{});
  if (w && rec) rec->status_of([p = w->get()] { return p->status(); });
  return w;
}

std::unique_ptr<Watcher> start(const ConsulDouble& d, Publisher& pub, const std::string& path, WatchOptions o,
                               Recorder* rec = nullptr, std::shared_ptr<SeenRequests> seen = nullptr) {
  auto w = try_start(d, pub, path, std::move(o), rec, std::move(seen));
  REQUIRE_MESSAGE(w, (w ? std::string() : w.error().message()));
  return std::move(w).value();
}

// Runs a watcher of /health/api once, so that o.snapshot_path holds the set it published.
void save_through_watcher(const ConsulDouble& d, const WatchOptions& o) {
  Publisher pub;
  auto w = start(d, pub, "/health/api", o);
  REQUIRE(dynup_test::exists(o.snapshot_path));
}

// The fault is injected while the set is A; the registry moves to B while it lasts. A
// must stay (and be reported stale) until the fault clears; then B arrives on its own.
void check_fault_keeps_set_and_recovers(ConsulFault fault, const std::string& expected_error,
                                        std::chrono::milliseconds param = 200ms) {
  ConsulDouble d;
  d.set_service("api", consul_instances({8080}));
  Publisher pub;
  Recorder rec;
  auto w = start(d, pub, "/health/api", fast(200ms), &rec);
  REQUIRE(ports_of(pub) == Ports{8080});

  d.inject(fault, ConsulDouble::forever, param);
  REQUIRE(wait_until([&] { return w->status().consecutive_failures >= 2; }));
  d.set_service("api", consul_instances({9090}));
  CHECK(stays_true_for([&] { return ports_of(pub) == Ports{8080}; }, 300ms));
  WatcherStatus st = w->status();
  CHECK(st.stale);
  CHECK_MESSAGE(contains(st.last_error, expected_error), st.last_error);
  CHECK(pub.version() == 1);

  d.clear_faults();
  REQUIRE(wait_until([&] { return ports_of(pub) == Ports{9090}; }));
  REQUIRE(wait_until([&] { return w->status().consecutive_failures == 0; }));
  st = w->status();
  CHECK(st.last_error.empty());
  CHECK_FALSE(st.stale);
  CHECK(st.current_backoff == 0ms);
  CHECK(st.publish_count == 2);
}

} // namespace

// --- the double itself ---------------------------------------------------------------

TEST_CASE("consul double: a blocking request waits for a change, a stale index returns at once") {
  ConsulDouble d;
  d.set_service("api", consul_instances({8080}));
  httplib::Client c("127.0.0.1", d.port());
  auto first = c.Get("/v1/health/service/api");
  REQUIRE(first);
  CHECK(first->status == 200);
  std::string index = first->get_header_value("X-Consul-Index");
  CHECK(index == std::to_string(d.index()));
  CHECK(nlohmann::json::parse(first->body).size() == 1);

  auto older = c.Get("/v1/health/service/api?index=" + std::to_string(d.index() - 1) + "&wait=5s");
  REQUIRE(older);
  CHECK(older->get_header_value("X-Consul-Index") == index);

  auto t0 = std::chrono::steady_clock::now();
  std::thread change([&] {
    std::this_thread::sleep_for(100ms);
    d.set_service("api", consul_instances({8080, 8081}));
  });
  auto woken = c.Get("/v1/health/service/api?index=" + index + "&wait=5s");
  change.join();
  REQUIRE(woken);
  CHECK(std::chrono::steady_clock::now() - t0 < 3s);
  CHECK(woken->get_header_value("X-Consul-Index") == std::to_string(d.index()));
  CHECK(nlohmann::json::parse(woken->body).size() == 2);
}

TEST_CASE("consul double: an unchanged index is held for wait plus at most wait/16") {
  ConsulDouble d;
  d.set_service("api", consul_instances({8080}));
  d.set_jitter(ConsulJitter::max);
  httplib::Client c("127.0.0.1", d.port());
  std::string index = std::to_string(d.index());
  auto t0 = std::chrono::steady_clock::now();
  auto res = c.Get("/v1/health/service/api?index=" + index + "&wait=320ms");
  auto held = std::chrono::steady_clock::now() - t0;
  REQUIRE(res);
  CHECK(res->status == 200);
  CHECK(res->get_header_value("X-Consul-Index") == index);
  CHECK(held >= 340ms); // 320 + 320/16
  CHECK(held < 2s);
}

TEST_CASE("consul double: KV without keys is a 404 with an index; errors are plain text") {
  ConsulDouble d;
  httplib::Client c("127.0.0.1", d.port());
  auto missing = c.Get("/v1/kv/upstreams/api/?recurse");
  REQUIRE(missing);
  CHECK(missing->status == 404);
  CHECK(missing->has_header("X-Consul-Index"));

  d.put_kv("upstreams/api/10.0.0.1:80", "");
  auto listed = c.Get("/v1/kv/upstreams/api/?recurse");
  REQUIRE(listed);
  CHECK(listed->status == 200);
  CHECK(nlohmann::json::parse(listed->body).at(0).at("Key") == "upstreams/api/10.0.0.1:80");

  d.inject(ConsulFault::permission_denied, 1);
  auto denied = c.Get("/v1/kv/upstreams/api/?recurse");
  REQUIRE(denied);
  CHECK(denied->status == 403);
  CHECK(denied->body == "Permission denied");
  CHECK(contains(denied->get_header_value("Content-Type"), "text/plain"));
  auto after = c.Get("/v1/kv/upstreams/api/?recurse");
  REQUIRE(after);
  CHECK(after->status == 200); // the fault applied to one request only
}

TEST_CASE("consul double: down refuses connections and up listens on the same port") {
  ConsulDouble d;
  d.set_service("api", consul_instances({8080}));
  std::uint16_t port = d.port();
  d.down();
  {
    httplib::Client c("127.0.0.1", port);
    c.set_connection_timeout(1s);
    auto res = c.Get("/v1/health/service/api");
    CHECK_FALSE(res);
  }
  d.up();
  CHECK(d.port() == port);
  httplib::Client c("127.0.0.1", port);
  auto res = c.Get("/v1/health/service/api");
  REQUIRE(res);
  CHECK(res->status == 200);
}

// --- rule 1 and 2: the request sequence ----------------------------------------------

TEST_CASE("consul watch: the first request has no index and its answer is published by start()") {
  ConsulDouble d;
  d.set_service("api", consul_instances({8080, 8081}));
  Publisher pub;
  Recorder rec;
  auto w = start(d, pub, "/health/api", fast(), &rec);

  CHECK(ports_of(pub) == Ports{8080, 8081});
  CHECK(pub.current()->source_index() == d.index());
  auto first = d.log().at(0);
  CHECK(first.path == "/v1/health/service/api");
  CHECK_FALSE(first.param("index"));
  CHECK_FALSE(first.param("wait"));
  CHECK(rec.published().size() == 1);
  CHECK(w->status().last_index == d.index());
}

TEST_CASE("consul watch: later requests carry index and wait, and read longer than wait + wait/16") {
  ConsulDouble d;
  d.set_service("api", consul_instances({8080}));
  d.set_jitter(ConsulJitter::max); // every hold lasts wait + wait/16
  Publisher pub;
  Recorder rec;
  auto seen = std::make_shared<SeenRequests>();
  auto w = start(d, pub, "/health/api", fast(1000ms), &rec, seen);
  std::uint64_t index = d.index();

  // Two full holds of 1062.5 ms each answered: a read timeout of `wait` would have failed.
  REQUIRE(wait_until([&] { return d.requests() >= 3; }, 6s));
  auto log = d.log();
  CHECK(log[1].index() == index);
  CHECK(log[1].param("wait") == std::string("1s"));
  CHECK(log[2].index() == index);
  auto st = w->status();
  CHECK(st.consecutive_failures == 0);
  CHECK(st.last_error.empty());
  auto sent = seen->all();
  REQUIRE(sent.size() >= 2);
  CHECK(sent[1].read_timeout > 1000ms + 1000ms / 16);
}

TEST_CASE("consul watch: no wait asks for the server's 5-minute default and reads longer than that") {
  ConsulDouble d;
  d.set_service("api", consul_instances({8080}));
  Publisher pub;
  auto seen = std::make_shared<SeenRequests>();
  auto w = start(d, pub, "/health/api", fast(0ms), nullptr, seen);
  REQUIRE(wait_until([&] { return d.held() == 1; }));
  CHECK(d.log().at(1).param("wait") == std::string("300s"));
  CHECK(seen->all().at(1).read_timeout > std::chrono::minutes(5) + std::chrono::minutes(5) / 16);
}

// --- rule 3: a return is not a change ------------------------------------------------

TEST_CASE("consul watch: an unchanged index is a timeout, not a change") {
  ConsulDouble d;
  d.set_service("api", consul_instances({8080}));
  Publisher pub;
  Recorder rec;
  auto w = start(d, pub, "/health/api", fast(150ms), &rec);
  std::uint64_t index = d.index();

  REQUIRE(wait_until([&] { return d.requests() >= 5; }));
  auto log = d.log();
  for (std::size_t i = 1; i < log.size(); ++i) CHECK(log[i].index() == index);
  CHECK(pub.version() == 1);
  CHECK(rec.published().size() == 1);
  CHECK(w->status().publish_count == 1);
  CHECK(w->status().consecutive_failures == 0);
}

TEST_CASE("consul watch: a new index with the same content is not republished") {
  ConsulDouble d;
  d.set_service("api", consul_instances({8080}));
  Publisher pub;
  Recorder rec;
  auto w = start(d, pub, "/health/api", fast(), &rec);

  for (int i = 0; i < 3; ++i) {
    d.touch_service("api");
    REQUIRE(wait_until([&] { return w->status().last_index == d.index(); }));
  }
  REQUIRE(wait_until([&] { return d.last_request().index() == d.index(); }));
  CHECK(pub.version() == 1);
  CHECK(rec.published().size() == 1);
  CHECK(w->status().publish_count == 1);
}

// --- rule 4: index going backwards ---------------------------------------------------

TEST_CASE("consul watch: an index going backwards resets to 0 and refetches") {
  ConsulDouble d;
  d.set_service("api", consul_instances({8080}));
  Publisher pub;
  auto w = start(d, pub, "/health/api", fast(200ms));
  std::uint64_t before = d.index();

  d.restore_snapshot(5);
  d.set_service("api", consul_instances({9090})); // index 6, still below the watcher's
  std::uint64_t after = d.index();
  REQUIRE(after < before);
  REQUIRE(wait_until([&] { return d.last_request().index() == after; }, 3s));
  CHECK(ports_of(pub) == Ports{9090});
  CHECK(w->status().last_index == after);

  // ... index=<before> answered with <after>, then a plain request, then index=<after>.
  auto log = d.log();
  auto reset = std::find_if(log.begin() + 1, log.end(), [](const auto& r) { return !r.index(); });
  REQUIRE(reset != log.end());
  for (auto it = log.begin() + 1; it != reset; ++it) CHECK(it->index() == before);
  for (auto it = reset + 1; it != log.end(); ++it) CHECK(it->index() == after);
}

// --- rule 5: index 0 or missing ------------------------------------------------------

TEST_CASE("consul watch: an index of 0 or no index header continues from 1") {
  ConsulFault fault = ConsulFault::index_zero;
  SUBCASE("X-Consul-Index: 0") { fault = ConsulFault::index_zero; }
  SUBCASE("no X-Consul-Index") { fault = ConsulFault::missing_index_header; }
  ConsulDouble d;
  d.set_service("api", consul_instances({8080}));
  d.inject(fault, 1); // the first answer only
  Publisher pub;
  auto w = start(d, pub, "/health/api", fast());

  CHECK(ports_of(pub) == Ports{8080}); // the answer itself is still good
  REQUIRE(wait_until([&] { return d.requests() >= 3; }));
  auto log = d.log();
  CHECK(log[1].index() == 1u);
  CHECK(log[2].index() == d.index());
  CHECK(w->status().last_index == d.index());
}

TEST_CASE("consul watch: X-Consul-Index is read whatever the case of its name") {
  ConsulDouble d;
  d.set_service("api", consul_instances({8080}));
  d.inject(ConsulFault::lowercase_index_header);
  Publisher pub;
  auto w = start(d, pub, "/health/api", fast());
  REQUIRE(wait_until([&] { return d.requests() >= 2; }));
  CHECK(d.log()[1].index() == d.index());
  CHECK(w->status().last_index == d.index());

  d.set_service("api", consul_instances({9090}));
  CHECK(wait_until([&] { return ports_of(pub) == Ports{9090}; }));
}

// --- rule 6: pacing ------------------------------------------------------------------

TEST_CASE("consul watch: an index that changes on every request cannot make the loop spin") {
  ConsulDouble d;
  d.set_service("api", consul_instances({8080}));
  d.set_index_churn(true);
  WatchOptions o = fast(1000ms);
  o.min_interval = 50ms;
  o.burst = 2;
  Publisher pub;
  Recorder rec;
  auto w = start(d, pub, "/health/api", o, &rec);

  auto t0 = std::chrono::steady_clock::now();
  std::size_t n0 = d.requests();
  std::this_thread::sleep_for(1000ms);
  std::size_t n = d.requests() - n0;
  auto elapsed = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0);
  std::size_t bound = o.burst + static_cast<std::size_t>(elapsed / o.min_interval) + 1;
  CAPTURE(n);
  CAPTURE(bound);
  CHECK(n <= bound);
  CHECK(n >= 5); // paced, not stuck
  CHECK(rec.published().size() == 1);
  CHECK(w->status().consecutive_failures == 0);
}

// --- rule 7: failures ----------------------------------------------------------------

TEST_CASE("consul watch: an unreachable agent is retried with capped exponential backoff") {
  ConsulDouble d;
  d.set_service("api", consul_instances({8080}));
  Publisher pub;
  Recorder rec;
  WatchOptions o = fast();
  auto w = start(d, pub, "/health/api", o, &rec);

  d.down();
  REQUIRE(wait_until([&] { return w->status().consecutive_failures >= 8; }));
  auto st = w->status();
  CHECK(ports_of(pub) == Ports{8080});
  CHECK(st.stale);
  CHECK_MESSAGE(contains(st.last_error, "/v1/health/service/api"), st.last_error);
  CHECK(st.last_success.has_value());

  // Failure k waits at most min(cap, base * 2^(k-1)), with full jitter below that.
  auto outage = rec.failure_statuses();
  REQUIRE(outage.size() >= 8);
  std::chrono::milliseconds longest{0};
  for (const auto& s : outage) {
    CAPTURE(s.consecutive_failures);
    CAPTURE(s.current_backoff.count());
    auto ceiling = std::min<std::chrono::milliseconds>(o.backoff_cap, o.backoff_base * (1 << std::min<std::uint64_t>(
                                                                                          s.consecutive_failures - 1, 20)));
    CHECK(s.current_backoff <= ceiling);
    longest = std::max(longest, s.current_backoff);
  }
  CHECK(longest > o.backoff_base); // it grew

  d.set_service("api", consul_instances({9090}));
  d.up();
  REQUIRE(wait_until([&] { return ports_of(pub) == Ports{9090}; }));
  st = w->status();
  CHECK(st.consecutive_failures == 0);
  CHECK(st.current_backoff == 0ms);
  CHECK(st.last_error.empty());
  CHECK_FALSE(st.stale);

  // After a success the next outage starts from the base delay again.
  std::size_t before_second = rec.failure_statuses().size();
  d.down();
  REQUIRE(wait_until([&] { return rec.failure_statuses().size() >= before_second + 2; }));
  auto again = rec.failure_statuses();
  CHECK(again[before_second].consecutive_failures == 1);
  CHECK(again[before_second].current_backoff <= o.backoff_base);
  CHECK(again[before_second + 1].current_backoff <= 2 * o.backoff_base);
}

TEST_CASE("consul watch: a 403 is reported as an ACL problem and backed off, not spun on") {
  ConsulDouble d;
  d.set_service("api", consul_instances({8080}));
  Publisher pub;
  Recorder rec;
  WatchOptions o = fast();
  o.min_interval = 1ms; // the token bucket alone would allow ~1000 requests a second
  auto w = start(d, pub, "/health/api", o, &rec);

  d.inject(ConsulFault::permission_denied);
  REQUIRE(wait_until([&] { return w->status().consecutive_failures >= 1; }));
  std::size_t n0 = d.requests();
  std::this_thread::sleep_for(1000ms);
  std::size_t n = d.requests() - n0;
  CAPTURE(n);
  CHECK(n <= 30);
  CHECK(n >= 3); // still retrying

  auto st = w->status();
  CHECK_MESSAGE(contains(st.last_error, "ACL"), st.last_error);
  CHECK(contains(st.last_error, "Permission denied"));
  CHECK(ports_of(pub) == Ports{8080});
  d.clear_faults();
  CHECK(wait_until([&] { return w->status().consecutive_failures == 0; }));
}

TEST_CASE("consul watch: 500 No cluster leader keeps the last good set and recovers") {
  check_fault_keeps_set_and_recovers(ConsulFault::no_leader, "No cluster leader");
}

TEST_CASE("consul watch: 429 rate limiting keeps the last good set and recovers") {
  check_fault_keeps_set_and_recovers(ConsulFault::rate_limited, "429");
}

TEST_CASE("consul watch: 403 permission denied keeps the last good set and recovers") {
  check_fault_keeps_set_and_recovers(ConsulFault::permission_denied, "ACL");
}

TEST_CASE("consul watch: a truncated body keeps the last good set and recovers") {
  check_fault_keeps_set_and_recovers(ConsulFault::truncated_body, "/v1/health/service/api");
}

TEST_CASE("consul watch: a body that is not JSON keeps the last good set and recovers") {
  check_fault_keeps_set_and_recovers(ConsulFault::garbage_json, "invalid JSON");
}

TEST_CASE("consul watch: a held request whose connection drops keeps the last good set and recovers") {
  check_fault_keeps_set_and_recovers(ConsulFault::hold_then_drop, "/v1/health/service/api", 150ms);
}

TEST_CASE("consul watch: a refused connection keeps the last good set and recovers on the same port") {
  ConsulDouble d;
  d.set_service("api", consul_instances({8080}));
  Publisher pub;
  auto w = start(d, pub, "/health/api", fast(200ms));
  d.down();
  REQUIRE(wait_until([&] { return w->status().consecutive_failures >= 2; }));
  d.set_service("api", consul_instances({9090}));
  CHECK(stays_true_for([&] { return ports_of(pub) == Ports{8080}; }, 200ms));
  d.up();
  REQUIRE(wait_until([&] { return ports_of(pub) == Ports{9090}; }));
  CHECK(w->status().consecutive_failures == 0);
}

TEST_CASE("consul watch: a slow body is read to the end") {
  ConsulDouble d;
  d.set_service("api", consul_instances({8080}));
  d.inject(ConsulFault::slow_body, ConsulDouble::forever, 2ms); // 16 bytes per 2 ms
  Publisher pub;
  auto w = start(d, pub, "/health/api", fast());
  CHECK(ports_of(pub) == Ports{8080});
  d.set_service("api", consul_instances({9090}));
  REQUIRE(wait_until([&] { return ports_of(pub) == Ports{9090}; }));
  CHECK(d.faulted() >= 2);
  CHECK(w->status().consecutive_failures == 0);
}

// --- rule 8: KV 404 ------------------------------------------------------------------

TEST_CASE("consul watch: a KV prefix emptied to 404 keeps blocking on its index and keeps the set") {
  ConsulDouble d;
  d.put_kv("upstreams/api/10.0.0.1:8080", R"({"weight":2})");
  d.put_kv("upstreams/api/10.0.0.2:8080", "");
  Publisher pub;
  Recorder rec;
  auto w = start(d, pub, "/kv/upstreams/api", fast(200ms), &rec);
  REQUIRE(pub.current()->size() == 2);
  CHECK(pub.current()->find("10.0.0.1:8080")->weight == 2);

  d.delete_kv_tree("upstreams/api/");
  std::uint64_t absent = d.index();
  REQUIRE(wait_until([&] { return w->status().last_index == absent; }));
  auto st = w->status();
  CHECK(st.stale);
  CHECK_MESSAGE(contains(st.last_error, "empty"), st.last_error);
  CHECK(pub.current()->size() == 2);
  // Blocking on the 404's index: later requests carry it and are held, not repeated.
  REQUIRE(wait_until([&] { return d.last_request().index() == absent && d.held() == 1; }));
  std::size_t n0 = d.requests();
  std::this_thread::sleep_for(500ms);
  CHECK(d.requests() - n0 <= 4); // about one per 200 ms wait
  CHECK(w->status().stale);
  CHECK(contains(w->status().last_error, "empty")); // still explained while it lasts

  d.put_kv("upstreams/api/10.0.0.3:8080", "");
  REQUIRE(wait_until([&] { return pub.current()->size() == 1; }));
  CHECK(pub.current()->find("10.0.0.3:8080") != nullptr);
  st = w->status();
  CHECK_FALSE(st.stale);
  CHECK(st.last_error.empty());
}

TEST_CASE("consul watch: a KV prefix with no keys yet publishes nothing until a key appears") {
  ConsulDouble d;
  Publisher pub;
  auto w = start(d, pub, "/kv/upstreams/api", fast(200ms));
  CHECK(pub.version() == 0);
  CHECK(w->status().consecutive_failures == 0);
  REQUIRE(wait_until([&] { return d.held() == 1; }));
  d.put_kv("upstreams/api/10.0.0.1:8080", "");
  REQUIRE(wait_until([&] { return pub.version() == 1; }));
  CHECK(pub.current()->find("10.0.0.1:8080") != nullptr);
}

// --- rule 12: the token --------------------------------------------------------------

TEST_CASE("consul watch: the token travels only in the X-Consul-Token header") {
  const std::string token = "b1gs3cret-0b4d-4c6e-9c2a-7e3f5d1a0c88";
  REQUIRE(::setenv("DYNUP_TEST_CONSUL_TOKEN", token.c_str(), 1) == 0);
  ConsulDouble d;
  d.set_service("api", consul_instances({8080}));
  d.require_token(token);
  Publisher pub;
  Recorder rec;
  auto w = start(d, pub, "/health/api?token_env=DYNUP_TEST_CONSUL_TOKEN", fast(200ms), &rec);
  ::unsetenv("DYNUP_TEST_CONSUL_TOKEN");
  CHECK(ports_of(pub) == Ports{8080}); // the double refuses requests without it

  d.inject(ConsulFault::no_leader);
  REQUIRE(wait_until([&] { return w->status().consecutive_failures >= 2; }));
  auto log = d.log();
  REQUIRE(log.size() >= 3);
  for (const auto& r : log) {
    CHECK(r.header("X-Consul-Token") == token);
    CHECK_FALSE(contains(r.target, token));
    CHECK_FALSE(r.param("token"));
  }
  auto st = w->status();
  CHECK_FALSE(contains(st.source, token));
  CHECK_FALSE(contains(st.last_error, token));
  CHECK_FALSE(contains(st.to_json().dump(), token));
  CHECK_FALSE(contains(w->driver().describe(), token));
  for (const auto& e : rec.errors()) CHECK_FALSE(contains(e, token));
}

// --- rule 14: stop -------------------------------------------------------------------

TEST_CASE("consul watch: stop() returns promptly while a five-minute query is in flight") {
  ConsulDouble d;
  d.set_service("api", consul_instances({8080}));
  Publisher pub;
  WatchOptions o = fast(std::chrono::minutes(5));
  auto w = start(d, pub, "/health/api", o);
  REQUIRE(wait_until([&] { return d.held() == 1; }));

  auto t0 = std::chrono::steady_clock::now();
  w->stop();
  auto took = std::chrono::steady_clock::now() - t0;
  MESSAGE("stop() took " << std::chrono::duration_cast<std::chrono::microseconds>(took).count() << " us");
  CHECK(took < 2s);
  w->stop(); // idempotent
}

TEST_CASE("consul watch: stop() returns promptly during a long backoff") {
  ConsulDouble d;
  d.set_service("api", consul_instances({8080}));
  Publisher pub;
  WatchOptions o = fast();
  o.backoff_base = std::chrono::minutes(1);
  o.backoff_cap = std::chrono::minutes(1);
  auto w = start(d, pub, "/health/api", o);
  d.inject(ConsulFault::no_leader);
  REQUIRE(wait_until([&] { return w->status().consecutive_failures >= 1; }));
  auto t0 = std::chrono::steady_clock::now();
  w.reset(); // the destructor stops
  CHECK(std::chrono::steady_clock::now() - t0 < 2s);
}

// --- propagation, fallback, strong dependency ----------------------------------------

TEST_CASE("consul watch: a registry change reaches the publisher and the publish callback") {
  ConsulDouble d;
  d.set_service("api", consul_instances({8080}));
  Publisher pub;
  Recorder rec;
  auto w = start(d, pub, "/health/api", fast(), &rec);

  ConsulInstance on_node = consul_instance(8082, "node-2");
  on_node.address.clear(); // rule 9: Node.Address stands in
  on_node.node_address = "10.2.0.2";
  on_node.weight_passing = 7;
  d.set_service("api", {consul_instance(8080), consul_instance(8081), on_node});
  REQUIRE(wait_until([&] { return rec.published().size() == 2; }));
  auto s = rec.published().back();
  CHECK(s->size() == 3);
  CHECK(s->source_index() == d.index());
  const dynup::Peer* p = s->find("node-2/api-8082");
  REQUIRE(p != nullptr);
  CHECK(p->host == "10.2.0.2");
  CHECK(p->weight == 7);
  CHECK(pub.current().get() == s.get());

  d.set_service("api", consul_instances({8081}));
  REQUIRE(wait_until([&] { return rec.published().size() == 3; }));
  CHECK(ports_of(pub) == Ports{8081});
  CHECK(w->status().publish_count == 3);
}

TEST_CASE("consul watch: instances failing checks or in maintenance are left out by default") {
  ConsulDouble d;
  ConsulInstance failing = consul_instance(8081);
  failing.checks = {"passing", "critical"};
  ConsulInstance node_maint = consul_instance(8082, "node-2");
  node_maint.node_maintenance = true;
  ConsulInstance svc_maint = consul_instance(8083);
  svc_maint.service_maintenance = true;
  d.set_service("api", {consul_instance(8080), failing, node_maint, svc_maint});
  Publisher pub;
  auto w = start(d, pub, "/health/api", fast());
  CHECK(ports_of(pub) == Ports{8080});
  CHECK(d.log()[0].param("passing"));
}

TEST_CASE("consul watch: with the agent down at start the last-known-good snapshot is served, stale") {
  TempDir dir;
  ConsulDouble d;
  d.set_service("api", consul_instances({8080, 8081}));
  WatchOptions o = fast();
  o.snapshot_path = dir.file("api.snapshot");
  save_through_watcher(d, o); // every published set is saved

  d.down();
  d.set_service("api", consul_instances({9090}));
  Publisher pub;
  Recorder rec;
  auto w = start(d, pub, "/health/api", o, &rec);
  CHECK(ports_of(pub) == Ports{8080, 8081});
  auto st = w->status();
  CHECK(st.stale);
  CHECK(st.consecutive_failures >= 1);
  CHECK_FALSE(st.last_error.empty());
  CHECK(st.publish_count == 1);
  CHECK(rec.published().size() == 1); // the embedder hears of the fallback set too

  d.up();
  REQUIRE(wait_until([&] { return ports_of(pub) == Ports{9090}; }));
  st = w->status();
  CHECK_FALSE(st.stale);
  CHECK(st.last_error.empty());
  CHECK(st.consecutive_failures == 0);
  CHECK(wait_until([&] {
    auto saved = dynup::load_snapshot(o.snapshot_path);
    return saved && saved->set.size() == 1 && saved->set[0].port == 9090;
  }));
}

TEST_CASE("consul watch: strong_dependency makes start() fail while the agent is down") {
  ConsulDouble d;
  d.set_service("api", consul_instances({8080}));
  d.down();
  WatchOptions o = fast();
  o.strong_dependency = true;
  Publisher pub;
  auto w = try_start(d, pub, "/health/api", o);
  REQUIRE_FALSE(w);
  CHECK(w.error().code() == Errc::unavailable);
  CHECK(contains(w.error().message(), "strong_dependency"));
  CHECK(contains(w.error().message(), "/v1/health/service/api"));
  CHECK(pub.version() == 0);

  d.up();
  auto ok = try_start(d, pub, "/health/api", o);
  REQUIRE(ok);
  CHECK(ports_of(pub) == Ports{8080});
}

// --- guards --------------------------------------------------------------------------

TEST_CASE("consul watch: an empty service is refused by default and the last set kept") {
  ConsulDouble d;
  d.set_service("api", consul_instances({8080, 8081}));
  Publisher pub;
  Recorder rec;
  auto w = start(d, pub, "/health/api", fast(200ms), &rec);

  d.set_service("api", {});
  REQUIRE(wait_until([&] { return w->status().last_index == d.index(); }));
  auto st = w->status();
  CHECK(st.stale);
  CHECK_MESSAGE(contains(st.last_error, "empty"), st.last_error);
  CHECK(ports_of(pub) == Ports{8080, 8081});
  CHECK(st.consecutive_failures == 0); // a refusal is not a fetch failure
  // It stays explained across later (unchanged) answers.
  CHECK(stays_true_for([&] { return contains(w->status().last_error, "empty"); }, 500ms));

  d.set_service("api", consul_instances({8082}));
  REQUIRE(wait_until([&] { return ports_of(pub) == Ports{8082}; }));
  CHECK(w->status().last_error.empty());
  CHECK_FALSE(w->status().stale);
}

TEST_CASE("consul watch: max_removed_share and min_peers refuse churn beyond their limits") {
  ConsulDouble d;
  d.set_service("api", consul_instances({8080, 8081, 8082, 8083}));
  WatchOptions o = fast();
  o.guards.max_removed_share = 0.5;
  o.guards.min_peers = 2;
  Publisher pub;
  auto w = start(d, pub, "/health/api", o);

  d.set_service("api", consul_instances({8080, 8081, 8082, 9000})); // removes 1 of 4
  REQUIRE(wait_until([&] { return ports_of(pub) == Ports{8080, 8081, 8082, 9000}; }));

  d.set_service("api", consul_instances({8080, 9001, 9002})); // removes 3 of 4
  REQUIRE(wait_until([&] { return w->status().last_index == d.index(); }));
  CHECK(contains(w->status().last_error, "max_removed_share"));
  CHECK(ports_of(pub) == Ports{8080, 8081, 8082, 9000});

  d.set_service("api", consul_instances({8080})); // fewer than min_peers (and too much churn)
  REQUIRE(wait_until([&] { return w->status().last_index == d.index(); }));
  CHECK(w->status().stale);
  CHECK(ports_of(pub) == Ports{8080, 8081, 8082, 9000});

  d.set_service("api", consul_instances({8080, 8081, 8082})); // removes 1 of 4, 3 >= 2
  REQUIRE(wait_until([&] { return ports_of(pub) == Ports{8080, 8081, 8082}; }));
  CHECK_FALSE(w->status().stale);
}

TEST_CASE("consul watch: min_peers refuses a set that is too small") {
  ConsulDouble d;
  d.set_service("api", consul_instances({8080, 8081, 8082}));
  WatchOptions o = fast();
  o.guards.min_peers = 2;
  Publisher pub;
  auto w = start(d, pub, "/health/api", o);
  d.set_service("api", consul_instances({8080}));
  REQUIRE(wait_until([&] { return w->status().last_index == d.index(); }));
  CHECK(contains(w->status().last_error, "min_peers"));
  CHECK(ports_of(pub) == Ports{8080, 8081, 8082});
}

// --- status --------------------------------------------------------------------------

TEST_CASE("consul watch: status reports index, success time, errors, backoff, staleness and publishes") {
  ConsulDouble d;
  d.set_service("api", consul_instances({8080}));
  Publisher pub;
  auto before = std::chrono::system_clock::now();
  auto w = start(d, pub, "/health/api", fast(200ms));
  auto st = w->status();
  CHECK(st.source == "consul://127.0.0.1:" + std::to_string(d.port()) + "/health/api");
  CHECK(st.last_index == d.index());
  REQUIRE(st.last_success.has_value());
  CHECK(*st.last_success >= before);
  CHECK(*st.last_success <= std::chrono::system_clock::now());
  CHECK(st.last_error.empty());
  CHECK(st.consecutive_failures == 0);
  CHECK(st.current_backoff == 0ms);
  CHECK_FALSE(st.stale);
  CHECK(st.publish_count == 1);

  d.set_service("api", consul_instances({8081}));
  REQUIRE(wait_until([&] { return w->status().publish_count == 2; }));
  CHECK(w->status().last_index == d.index());

  auto success = *w->status().last_success;
  d.inject(ConsulFault::no_leader);
  REQUIRE(wait_until([&] { return w->status().consecutive_failures >= 2; }));
  st = w->status();
  CHECK(contains(st.last_error, "No cluster leader"));
  CHECK(st.stale);
  CHECK(st.current_backoff <= fast().backoff_cap);
  CHECK(*st.last_success >= success);
  auto j = st.to_json();
  CHECK(j["consecutive_failures"].get<std::uint64_t>() >= 2);
  CHECK(j["stale"] == true);
  CHECK(j["publish_count"] == 2);
}

// --- deadlines, honest status, background start (issue 18) ---------------------------

TEST_CASE("consul watch: a reply trickled a byte at a time is abandoned at its deadline, reported and retried") {
  ConsulDouble d;
  d.set_service("api", consul_instances({8080}));
  Publisher pub;
  Recorder rec;
  // Deadline of a blocking request: 500 ms + 500/16 ms + read_margin (5 s).
  auto w = start(d, pub, "/health/api", fast(500ms), &rec);
  REQUIRE(ports_of(pub) == Ports{8080});

  // Each byte arrives well within any per-recv timeout; only the total deadline ends it.
  d.inject(ConsulFault::trickle_body, ConsulDouble::forever, 500ms);
  REQUIRE(wait_until([&] { return d.faulted() >= 1; })); // the request in flight was not faulted
  d.set_service("api", consul_instances({9090}));
  REQUIRE(wait_until([&] { return w->status().consecutive_failures >= 1; }, 20s));
  WatcherStatus st = w->status();
  CHECK_MESSAGE(contains(st.last_error, "no complete response within"), st.last_error);
  CHECK(st.stale);
  CHECK(st.ready);
  CHECK(ports_of(pub) == Ports{8080});

  d.clear_faults();
  REQUIRE(wait_until([&] { return ports_of(pub) == Ports{9090}; }, 20s));
  REQUIRE(wait_until([&] { return w->status().consecutive_failures == 0; }));
  CHECK_FALSE(w->status().stale);

  // stop() is prompt in the middle of a trickled reply.
  std::size_t before = d.faulted();
  d.inject(ConsulFault::trickle_body, ConsulDouble::forever, 500ms);
  d.set_service("api", consul_instances({7070}));
  REQUIRE(wait_until([&] { return d.faulted() > before; }));
  auto t0 = std::chrono::steady_clock::now();
  w->stop();
  CHECK(std::chrono::steady_clock::now() - t0 < 2s);
}

TEST_CASE("consul watch: after X-Consul-Index 0 a change answered at index 1 is published") {
  ConsulDouble d;
  d.restore_snapshot(0);                  // a fresh cluster: the next write is index 1
  d.inject(ConsulFault::index_zero, 1);   // the first answer says 0
  WatchOptions o = fast(200ms);
  o.guards.allow_empty = true;
  Publisher pub;
  auto w = start(d, pub, "/health/api", o);
  REQUIRE(pub.version() == 1); // the empty service
  REQUIRE(wait_until([&] { return d.held() == 1; }));
  CHECK(d.last_request().index() == 1u);

  d.set_service("api", consul_instances({8080})); // index 1: not past the request's
  REQUIRE(d.index() == 1u);
  CHECK(wait_until([&] { return ports_of(pub) == Ports{8080}; }));
  CHECK(w->status().last_index == 1u);
}

TEST_CASE("consul watch: a refused snapshot with the agent down serves nothing and status says why") {
  TempDir dir;
  ConsulDouble d;
  d.set_service("api", consul_instances({8080}));
  WatchOptions o = fast();
  o.snapshot_path = dir.file("api.snapshot");
  save_through_watcher(d, o);
  REQUIRE(::truncate(o.snapshot_path.c_str(), 40) == 0);

  d.down();
  Publisher pub;
  Recorder rec;
  auto w = start(d, pub, "/health/api", o, &rec);
  CHECK(pub.version() == 0);
  WatcherStatus st = w->status();
  CHECK(st.stale);
  CHECK_FALSE(st.ready);
  CHECK_MESSAGE(contains(st.last_error, o.snapshot_path), st.last_error);
  CHECK_MESSAGE(contains(st.last_error, "not served"), st.last_error);
  CHECK_MESSAGE(contains(st.last_error, "truncated"), st.last_error);
  auto j = st.to_json();
  CHECK(j["stale"] == true);
  CHECK(j["ready"] == false);

  // Retries replace the fetch error, not the word about the snapshot.
  REQUIRE(wait_until([&] { return w->status().consecutive_failures >= 3; }));
  st = w->status();
  CHECK_MESSAGE(contains(st.last_error, o.snapshot_path), st.last_error);
  CHECK_MESSAGE(contains(st.last_error, "/v1/health/service/api"), st.last_error);

  d.up();
  REQUIRE(wait_until([&] { return ports_of(pub) == Ports{8080}; }));
  st = w->status();
  CHECK(st.ready);
  CHECK_FALSE(st.stale);
  CHECK(st.last_error.empty());
}

TEST_CASE("watcher status: a status that never saw a set is stale and not ready; backoff has one name") {
  WatcherStatus st;
  CHECK(st.stale);
  CHECK_FALSE(st.ready);
  auto j = st.to_json();
  CHECK(j["stale"] == true);
  CHECK(j["ready"] == false);
  CHECK(j.contains("backoff_ms"));
  CHECK_FALSE(j.contains("current_backoff_ms"));
}

TEST_CASE("consul watch: background start against a hung agent returns at once and serves the snapshot") {
  TempDir dir;
  ConsulDouble d;
  d.set_service("api", consul_instances({8080}));
  WatchOptions o = fast();
  o.snapshot_path = dir.file("api.snapshot");
  REQUIRE(dynup::save_snapshot(o.snapshot_path, dynup_test::make_set({dynup_test::peer("10.9.0.1", 7070)}, 42)));
  o.initial = dynup::InitialFetch::background;

  d.inject(ConsulFault::hold_then_drop, 1, std::chrono::minutes(10)); // a hung agent
  Publisher pub;
  Recorder rec;
  auto w = start(d, pub, "/health/api", o, &rec);
  CHECK(ports_of(pub) == Ports{7070});
  WatcherStatus st = w->status();
  CHECK(st.ready);
  CHECK(st.stale);
  // The first request is held now: start() returned before any answer could exist.
  REQUIRE(wait_until([&] { return d.held() == 1; }));
  CHECK(ports_of(pub) == Ports{7070});
  CHECK(rec.published().size() == 1);

  d.release_holds(); // the agent drops the connection; the watcher retries
  REQUIRE(wait_until([&] { return ports_of(pub) == Ports{8080}; }));
  st = w->status();
  CHECK_FALSE(st.stale);
  CHECK(st.ready);
}

TEST_CASE("consul watch: background start against a trickling agent returns at once and stop() interrupts it") {
  ConsulDouble d;
  d.set_service("api", consul_instances({8080}));
  d.inject(ConsulFault::trickle_body, ConsulDouble::forever, 500ms);
  WatchOptions o = fast();
  o.initial = dynup::InitialFetch::background;
  Publisher pub;
  auto w = start(d, pub, "/health/api", o);
  // Nothing to serve yet, and said so.
  CHECK(pub.version() == 0);
  CHECK_FALSE(w->status().ready);
  CHECK(w->status().stale);
  REQUIRE(wait_until([&] { return d.faulted() >= 1; })); // the trickled reply is under way
  CHECK(pub.version() == 0);

  auto t0 = std::chrono::steady_clock::now();
  w->stop();
  CHECK(std::chrono::steady_clock::now() - t0 < 2s);
  CHECK(pub.version() == 0);
}

TEST_CASE("consul watch: strong_dependency with background start is refused") {
  ConsulDouble d;
  WatchOptions o = fast();
  o.initial = dynup::InitialFetch::background;
  o.strong_dependency = true;
  Publisher pub;
  auto w = try_start(d, pub, "/health/api", o);
  REQUIRE_FALSE(w);
  CHECK(w.error().code() == Errc::invalid_argument);
  CHECK(contains(w.error().message(), "strong_dependency"));
  CHECK(d.requests() == 0);
}
