// Watcher (watch/any.hpp): one start() for every scheme. Each case checks that a spec
// reaches the right concrete watcher with the options it can honour, and that the
// handle owns, stops and moves that watcher safely.
#include <dynup/watch/any.hpp>
#include <dynup/watch/file_watcher.hpp>

#include <support/consul_double.hpp>
#include <support/temp_dir.hpp>
#include <support/watching.hpp>
#include <support/wait.hpp>

#include <doctest/doctest.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <future>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace {

using dynup::AnyWatchOptions;
using dynup::Errc;
using dynup::Publisher;
using dynup::Watcher;
using dynup_test::ConsulDouble;
using dynup_test::ConsulInstance;
using dynup_test::stays_true_for;
using dynup_test::TempDir;
using dynup_test::wait_until;
using dynup_test::write_by_rename;
using namespace std::chrono_literals;
using Ports = dynup_test::Ports;
using dynup_test::consul_instances;
using dynup_test::contains;
using dynup_test::ports_of;
using dynup_test::Recorder;

// What the callbacks saw, readable from the test thread while the watcher runs.

std::string peers_doc(int port) {
  return R"({"peers":[{"host":"10.0.0.1","port":)" + std::to_string(port) + "}]}";
}

// Short waits and backoffs for registry sources; left at the defaults for file://.
AnyWatchOptions fast_registry() {
  AnyWatchOptions o;
  o.wait = 300ms;
  o.backoff_base = 20ms;
  o.backoff_cap = 160ms;
  o.min_interval = 5ms;
  return o;
}

Watcher start_ok(Publisher& pub, const std::string& spec, AnyWatchOptions o = {}, Recorder* rec = nullptr) {
  auto w = Watcher::start(pub, spec, std::move(o), rec ? rec->on_publish() : dynup::PublishCallback{},
                          rec ? rec->on_error() : dynup::ErrorCallback{});
  REQUIRE_MESSAGE(w, (w ? std::string() : w.error().message()));
  return std::move(w).value();
}

dynup::Error start_error(Publisher& pub, const std::string& spec, AnyWatchOptions o = {}) {
  auto w = Watcher::start(pub, spec, std::move(o));
  REQUIRE_FALSE(w.ok());
  return w.error();
}

// Runs stop() on another thread; true when it returned within a generous deadline.
bool stops_within(Watcher& w, std::chrono::milliseconds deadline) {
  auto done = std::async(std::launch::async, [&] { w.stop(); });
  return done.wait_for(deadline) == std::future_status::ready;
}

// A loopback port nothing listens on: the double's, after it went down.
std::uint16_t closed_port() {
  ConsulDouble d;
  std::uint16_t port = d.port();
  d.down();
  return port;
}

} // namespace

TEST_CASE("any watcher: a file:// spec publishes the file before start() returns and follows edits") {
  TempDir dir;
  std::string path = dir.file("peers.json");
  write_by_rename(path, peers_doc(8001));
  Publisher pub;
  Recorder rec;
  Watcher w = start_ok(pub, "file://" + path, {}, &rec);

  CHECK(ports_of(pub) == Ports{8001});
  CHECK(rec.published().size() == 1);
  CHECK(w.status().source == "file://" + path);
  CHECK(w.status().publish_count == 1);

  write_by_rename(path, peers_doc(8002));
  REQUIRE(wait_until([&] { return ports_of(pub) == Ports{8002}; }));
  CHECK(rec.published().size() == 2);
  CHECK(rec.errors().empty());
}

TEST_CASE("any watcher: a file:// spec applies the guards and accepts poll_interval and settle") {
  TempDir dir;
  std::string path = dir.file("peers.json");
  write_by_rename(path, R"({"peers":[]})");
  Publisher pub;
  Recorder rec;
  AnyWatchOptions o;
  o.guards.min_peers = 2;
  o.poll_interval = 50ms;
  o.settle = 0ms;
  Watcher w = start_ok(pub, "file://" + path, o, &rec);
  CHECK(pub.version() == 0); // an empty set is refused by default
  REQUIRE_FALSE(rec.errors().empty());

  write_by_rename(path, peers_doc(8001));
  REQUIRE(wait_until([&] { return contains(w.status().last_error, "min_peers 2"); }));
  CHECK(pub.version() == 0);
}

TEST_CASE("any watcher: a consul:// spec publishes through a blocking query and follows a change") {
  ConsulDouble d;
  d.set_service("api", consul_instances({8080, 8081}));
  d.require_token("hunter2-token");
  Publisher pub;
  Recorder rec;
  Watcher w = start_ok(pub, d.spec("/health/api?token=hunter2-token"), fast_registry(), &rec);

  CHECK(ports_of(pub) == Ports{8080, 8081});
  CHECK(pub.current()->source_index() == d.index());
  CHECK(d.log().at(0).path == "/v1/health/service/api");
  CHECK(d.log().at(0).header("X-Consul-Token") == std::string("hunter2-token"));
  CHECK(w.status().source == d.spec("/health/api")); // describe(): never the token
  REQUIRE(wait_until([&] { return d.held() == 1; }));
  CHECK(d.last_request().param("wait") == std::string("300ms"));

  d.set_service("api", consul_instances({9090}));
  REQUIRE(wait_until([&] { return ports_of(pub) == Ports{9090}; }));
  CHECK(rec.published().size() == 2);
  CHECK(w.status().publish_count == 2);
  for (const auto& e : rec.errors()) CHECK_FALSE(contains(e, "hunter2"));
}

TEST_CASE("any watcher: snapshot_path and strong_dependency reach a consul:// watcher") {
  TempDir dir;
  ConsulDouble d;
  d.set_service("api", consul_instances({8080}));
  AnyWatchOptions o = fast_registry();
  o.snapshot_path = dir.file("api.snapshot");
  {
    Publisher pub;
    Watcher w = start_ok(pub, d.spec("/health/api"), o);
    REQUIRE(wait_until([&] { return dynup_test::exists(o.snapshot_path); }));
  }
  d.down();

  Publisher fallback;
  Watcher w = start_ok(fallback, d.spec("/health/api"), o);
  CHECK(ports_of(fallback) == Ports{8080});
  CHECK(w.status().stale);

  o.strong_dependency = true;
  Publisher strong;
  dynup::Error e = start_error(strong, d.spec("/health/api"), o);
  CHECK(e.code() == Errc::unavailable);
  CHECK(contains(e.message(), "strong_dependency"));
  CHECK(strong.version() == 0);
}

TEST_CASE("any watcher: an etcd:// spec starts an etcd watcher with the options given") {
  std::string spec = "etcd://127.0.0.1:" + std::to_string(closed_port()) + "/upstreams/api/";
  AnyWatchOptions o = fast_registry();
  o.strong_dependency = true;
  Publisher strong;
  dynup::Error e = start_error(strong, spec, o);
  CHECK(e.code() == Errc::unavailable);
  CHECK(contains(e.message(), "first range failed and strong_dependency is set"));
  CHECK(contains(e.message(), spec));
  CHECK(contains(e.message(), "/v3/kv/range"));

  o.strong_dependency = false;
  Publisher weak;
  Watcher w = start_ok(weak, spec, o);
  CHECK(w.status().source == spec);
  CHECK(wait_until([&] { return w.status().consecutive_failures >= 2; })); // retrying, backed off
  CHECK(weak.version() == 0);
}

TEST_CASE("any watcher: an unknown scheme is unsupported and the error lists the supported schemes") {
  Publisher pub;
  dynup::Error e = start_error(pub, "zk://127.0.0.1:2181/upstreams/api");
  CHECK(e.code() == Errc::unsupported);
  CHECK(contains(e.message(), "\"zk\""));
  CHECK(contains(e.message(), "zk://127.0.0.1:2181/upstreams/api"));
  for (const char* scheme : {"file://", "consul://", "etcd://"}) CHECK(contains(e.message(), scheme));

  // A mistyped consul:// spec is quoted without its token.
  e = start_error(pub, "consol://127.0.0.1/health/api?token=hunter2");
  CHECK(e.code() == Errc::unsupported);
  CHECK_FALSE(contains(e.message(), "hunter2"));
  CHECK(contains(e.message(), "token=redacted"));

  e = start_error(pub, "/etc/dynup/api.json");
  CHECK(e.code() == Errc::invalid_argument);
  CHECK(contains(e.message(), "expected scheme://"));
  CHECK(contains(e.message(), "consul://"));
  CHECK(pub.version() == 0);

  auto checked = Watcher::validate("zk://h/p");
  REQUIRE_FALSE(checked);
  CHECK(checked.error().code() == Errc::unsupported);
}

TEST_CASE("any watcher: a bad spec gives the source's own error, naming the spec") {
  Publisher pub;
  dynup::Error consul = start_error(pub, "consul://127.0.0.1:8500/services/api?token=hunter2");
  CHECK(consul.code() == Errc::invalid_argument);
  CHECK(contains(consul.message(), "consul://127.0.0.1:8500/services/api"));
  CHECK(contains(consul.message(), "unknown mode \"services\""));
  CHECK_FALSE(contains(consul.message(), "hunter2"));

  dynup::Error unparsable = start_error(pub, "consul://127.0.0.1:99999/health/api?token=hunter2");
  CHECK(contains(unparsable.message(), "port \"99999\""));
  CHECK_FALSE(contains(unparsable.message(), "hunter2"));

  dynup::Error etcd = start_error(pub, "etcd://127.0.0.1:2379/upstreams/api");
  CHECK(etcd.code() == Errc::invalid_argument);
  CHECK(contains(etcd.message(), "etcd://127.0.0.1:2379/upstreams/api"));
  CHECK(contains(etcd.message(), "does not end in '/'"));

  dynup::Error file = start_error(pub, "file://");
  CHECK(contains(file.message(), "the file path is empty"));
}

TEST_CASE("any watcher: options a file watcher cannot honour are an error, never ignored") {
  TempDir dir;
  std::string path = dir.file("peers.json");
  write_by_rename(path, peers_doc(8001));
  std::string spec = "file://" + path;

  struct Case {
    const char* option;
    void (*set)(AnyWatchOptions&);
  };
  const Case cases[] = {
      {"snapshot_path", [](AnyWatchOptions& o) { o.snapshot_path = "/tmp/api.snapshot"; }},
      {"strong_dependency", [](AnyWatchOptions& o) { o.strong_dependency = true; }},
      {"wait", [](AnyWatchOptions& o) { o.wait = 1s; }},
      {"backoff_base", [](AnyWatchOptions& o) { o.backoff_base = 1s; }},
      {"backoff_cap", [](AnyWatchOptions& o) { o.backoff_cap = 1s; }},
      {"min_interval", [](AnyWatchOptions& o) { o.min_interval = 1s; }},
      {"burst", [](AnyWatchOptions& o) { o.burst = 9; }},
  };
  for (const Case& c : cases) {
    CAPTURE(c.option);
    AnyWatchOptions o;
    c.set(o);
    Publisher pub;
    dynup::Error e = start_error(pub, spec, o);
    CHECK(e.code() == Errc::invalid_argument);
    CHECK(contains(e.message(), c.option));
    CHECK(contains(e.message(), path));
    CHECK(pub.version() == 0); // nothing was started
    CHECK_FALSE(Watcher::validate(spec, o));
  }

  AnyWatchOptions both;
  both.snapshot_path = "/tmp/api.snapshot";
  both.strong_dependency = true;
  Publisher pub;
  CHECK(contains(start_error(pub, spec, both).message(), "snapshot_path, strong_dependency"));

  AnyWatchOptions no_poll;
  no_poll.poll_interval = 0ms;
  CHECK(contains(start_error(pub, spec, no_poll).message(), "poll_interval must be positive"));
  CHECK(Watcher::validate(spec));
}

TEST_CASE("any watcher: file-only options on a registry spec are an error and nothing connects") {
  ConsulDouble d;
  d.set_service("api", consul_instances({8080}));
  AnyWatchOptions o = fast_registry();
  o.poll_interval = 50ms;
  Publisher pub;
  dynup::Error consul = start_error(pub, d.spec("/health/api"), o);
  CHECK(consul.code() == Errc::invalid_argument);
  CHECK(contains(consul.message(), "poll_interval apply to file:// sources only"));
  CHECK(contains(consul.message(), d.spec("/health/api")));
  CHECK(d.requests() == 0);

  o.settle = 0ms;
  dynup::Error etcd = start_error(pub, "etcd://127.0.0.1:2379/upstreams/api/", o);
  CHECK(contains(etcd.message(), "poll_interval, settle apply to file:// sources only"));
  CHECK(pub.version() == 0);
}

TEST_CASE("any watcher: validate() checks a spec without connecting") {
  ConsulDouble d;
  d.set_service("api", consul_instances({8080}));
  CHECK(Watcher::validate(d.spec("/health/api?tag=v2"), fast_registry()));
  CHECK(Watcher::validate("etcd://127.0.0.1:2379/upstreams/api/"));
  CHECK(Watcher::validate("file:///no/such/dir/peers.json")); // the file is read by start()
  CHECK(d.requests() == 0);
}

TEST_CASE("any watcher: stop() returns promptly with a query in flight, is idempotent, and keeps status") {
  ConsulDouble d;
  d.set_service("api", consul_instances({8080}));
  Publisher pub;
  AnyWatchOptions o = fast_registry();
  o.wait = std::chrono::minutes(5);
  Watcher w = start_ok(pub, d.spec("/health/api"), o);
  REQUIRE(wait_until([&] { return d.held() == 1; }));

  REQUIRE(stops_within(w, 5000ms));
  std::size_t requests = d.requests();
  w.stop(); // idempotent
  w.stop();
  CHECK(stays_true_for([&] { return d.requests() == requests; }, 200ms));
  CHECK(w.status().source == d.spec("/health/api"));
  CHECK(w.status().publish_count == 1);
  CHECK(ports_of(pub) == Ports{8080}); // the published set stays

  TempDir dir;
  std::string path = dir.file("peers.json");
  write_by_rename(path, peers_doc(8001));
  Publisher file_pub;
  Watcher f = start_ok(file_pub, "file://" + path);
  REQUIRE(stops_within(f, 5000ms));
  f.stop();
  write_by_rename(path, peers_doc(8002));
  CHECK(stays_true_for([&] { return file_pub.version() == 1; }, 300ms)); // stopped: no more reads
}

TEST_CASE("any watcher: a moved-from Watcher is empty and safe to stop and destroy") {
  TempDir dir;
  std::string path = dir.file("peers.json");
  write_by_rename(path, peers_doc(8001));
  Publisher pub;
  Watcher a = start_ok(pub, "file://" + path);

  Watcher b(std::move(a));
  CHECK(b.status().source == "file://" + path);
  CHECK(a.status().source.empty()); // moved-from: empty, as documented
  a.stop();
  a.stop();

  Watcher c = std::move(b);
  CHECK(b.status().source.empty());
  write_by_rename(path, peers_doc(8002));
  REQUIRE(wait_until([&] { return ports_of(pub) == Ports{8002}; })); // c still runs it
  {
    Watcher gone = std::move(c);
  } // the destructor stops it
  write_by_rename(path, peers_doc(8003));
  CHECK(stays_true_for([&] { return ports_of(pub) == Ports{8002}; }, 300ms));
}

TEST_CASE("any watcher: move assignment stops the watcher it replaces") {
  ConsulDouble d;
  d.set_service("api", consul_instances({8080}));
  TempDir dir;
  std::string path = dir.file("peers.json");
  write_by_rename(path, peers_doc(8001));
  Publisher registry_pub, file_pub;
  Watcher w = start_ok(registry_pub, d.spec("/health/api"), fast_registry());
  REQUIRE(wait_until([&] { return d.held() == 1; }));

  w = start_ok(file_pub, "file://" + path);
  CHECK(w.status().source == "file://" + path);
  // A running consul watcher asks again at least every 300 ms wait; this one is gone.
  std::size_t requests = d.requests();
  d.set_service("api", consul_instances({9090}));
  CHECK(stays_true_for([&] { return d.requests() == requests && ports_of(registry_pub) == Ports{8080}; }, 700ms));
}

TEST_CASE("any watcher: a concrete watcher built by hand can be adopted") {
  TempDir dir;
  std::string path = dir.file("peers.json");
  write_by_rename(path, peers_doc(8001));
  Publisher pub;
  dynup::FileWatchOptions fo;
  fo.path = path;
  Watcher w(std::make_unique<dynup::FileWatcher>(pub, fo));
  CHECK(w.status().source == "file://" + path);
  CHECK(ports_of(pub) == Ports{8001});
  REQUIRE(stops_within(w, 5000ms));

  Watcher empty(std::unique_ptr<dynup::FileWatcher>{});
  CHECK(empty.status().source.empty());
  empty.stop();
}

TEST_CASE("any watcher: initial background starts a consul:// watcher without waiting on a hung agent") {
  ConsulDouble d;
  d.set_service("api", consul_instances({8080}));
  d.inject(dynup_test::ConsulFault::hold_then_drop, ConsulDouble::forever, std::chrono::minutes(10));
  Publisher pub;
  AnyWatchOptions o = fast_registry();
  o.initial = dynup::InitialFetch::background;
  Watcher w = start_ok(pub, d.spec("/health/api"), o);
  CHECK(pub.version() == 0);
  CHECK_FALSE(w.status().ready);
  // The first request is held by the agent after start() returned.
  REQUIRE(wait_until([&] { return d.held() == 1; }));
  REQUIRE(stops_within(w, 5000ms)); // stop() ends the hung fetch

  // file:// reads its file at start whatever `initial` says.
  TempDir dir;
  std::string path = dir.file("peers.json");
  write_by_rename(path, peers_doc(8001));
  Publisher file_pub;
  AnyWatchOptions fo;
  fo.initial = dynup::InitialFetch::background;
  Watcher f = start_ok(file_pub, "file://" + path, fo);
  CHECK(ports_of(file_pub) == Ports{8001});
  CHECK(f.status().ready);
}
