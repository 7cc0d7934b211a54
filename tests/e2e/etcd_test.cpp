// EtcdDriver run by RegistryWatcher against a real etcd (3.4, JSON gateway). etcd is not optional: without it
// every case here fails and says how to install it.
#include <support/etcd.hpp>
#include <support/temp_dir.hpp>
#include <support/wait.hpp>

#include <dynup/source/etcd.hpp>
#include <dynup/runtime/runtime.hpp>
#include <dynup/watch/any.hpp>
#include <dynup/watch/etcd_watch.hpp>
#include <dynup/watch/registry_watcher.hpp>

#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

namespace {

using dynup_test::Etcd;
using dynup_test::EtcdOptions;
using dynup_test::wait_until;
using namespace std::chrono_literals;

// Generous: these wait for a real server and a real network round trip.
constexpr auto change_timeout = 5000ms;

void require_etcd() {
  std::string why = dynup_test::etcd_missing_reason(dynup_test::etcd_binary());
  REQUIRE_MESSAGE(why.empty(), why);
}

// One etcd for the cases that neither stop it nor need special flags; each case works
// under a prefix of its own. Stopped at exit.
Etcd& shared_etcd() {
  require_etcd();
  static Etcd etcd;
  return etcd;
}

// What the watcher and its etcd's shared stream did, observed from the test thread.
struct Probe {
  std::atomic<int> sends{0};   // ranges
  std::atomic<int> streams{0}; // watches opened
  std::function<void()> before_first_stream; // runs on the runtime's loop thread
};

// A publisher, a watcher on it, and what the callbacks saw.
class Harness {
public:
  dynup::Publisher publisher;
  std::shared_ptr<Probe> probe = std::make_shared<Probe>();
  std::shared_ptr<dynup::rt::Runtime> runtime;
  std::unique_ptr<dynup::RegistryWatcher> watcher;

  Harness() {
    auto rt = dynup::rt::Runtime::acquire();
    REQUIRE(rt);
    runtime = *rt;
  }
  ~Harness() {
    if (watcher) watcher->stop(); // before the callbacks' state below goes away
  }
  Harness(const Harness&) = delete;
  Harness& operator=(const Harness&) = delete;

  static dynup::WatchOptions fast() {
    dynup::WatchOptions o;
    o.backoff_base = 20ms;
    o.backoff_cap = 200ms;
    o.min_interval = 10ms;
    return o;
  }

  /// Whether the shared stream of the watched etcd is open and confirmed.
  bool streaming() {
    bool open = false;
    runtime->loop().run_sync([&] { open = runtime->service<dynup::EtcdHubs>().at(endpoint_).streaming(); });
    return open;
  }

  /// Starts the watcher; returns the error start() gave, if any.
  std::optional<dynup::Error> start(const std::string& spec, dynup::WatchOptions options = fast()) {
    auto source = dynup::EtcdSource::from_spec(spec);
    REQUIRE_MESSAGE(source.ok(), source.error().message());
    endpoint_ = dynup::rt::HttpEndpoint{source->host(), source->port(), false};
    runtime->loop().run_sync([&] {
      runtime->service<dynup::EtcdHubs>().at(endpoint_).tap([probe = probe](const dynup::HttpRequest&) {
        if (++probe->streams == 1 && probe->before_first_stream) probe->before_first_stream();
      });
    });
    auto driver = std::make_unique<dynup::detail::EtcdDriver>(
        runtime, *source, [probe = probe](const dynup::HttpRequest&) { ++probe->sends; });
    auto w = dynup::RegistryWatcher::start(runtime, publisher, std::move(driver), std::move(options), {},
                                           [this](const dynup::Error& e) {
                                             std::lock_guard<std::mutex> lock(mu_);
                                             errors_.push_back(e.message());
                                           });
    if (!w) return w.error();
    watcher = std::move(w).value();
    return std::nullopt;
  }

  std::vector<std::string> errors() const {
    std::lock_guard<std::mutex> lock(mu_);
    return errors_;
  }
  bool error_mentions(const std::string& a, const std::string& b = "") const {
    for (const auto& e : errors())
      if (e.find(a) != std::string::npos && e.find(b) != std::string::npos) return true;
    return false;
  }

  std::vector<std::string> ids() const {
    std::vector<std::string> out;
    dynup::Snapshot set = publisher.current(); // held: a temporary would die before the loop
    for (const auto& p : *set) out.push_back(p.id);
    return out;
  }
  bool has_ids(const std::vector<std::string>& want) const { return ids() == want; }
  const dynup::Peer* peer(const std::string& id) const {
    snapshot_ = publisher.current();
    return snapshot_->find(id);
  }

private:
  dynup::rt::HttpEndpoint endpoint_;
  mutable std::mutex mu_;
  std::vector<std::string> errors_;
  mutable dynup::Snapshot snapshot_;
};

std::string ids_text(const std::vector<std::string>& ids) {
  std::string s;
  for (const auto& id : ids) s += (s.empty() ? "" : ",") + id;
  return "[" + s + "]";
}

#define REQUIRE_IDS(h, ...)                                                                          \
  do {                                                                                               \
    std::vector<std::string> want_{__VA_ARGS__};                                                     \
    bool got_ = wait_until([&] { return (h).has_ids(want_); }, change_timeout);                      \
    REQUIRE_MESSAGE(got_, "published " << ids_text((h).ids()) << ", want " << ids_text(want_));     \
  } while (0)

} // namespace

TEST_CASE("etcd: the range at start publishes the peers already under the prefix") {
  Etcd& etcd = shared_etcd();
  const std::string p = "/dynup-e2e/range/api/";
  etcd.put(p + "web-1", R"({"host":"10.0.0.1","port":8080,"weight":3,"zone":"z1"})");
  etcd.put(p + "10.0.0.2:8080", R"("10.0.0.2:8080")");
  etcd.put(p + "web-3", "10.0.0.3:9000"); // what `etcdctl put KEY host:port` stores
  etcd.put(p + "web-4", R"({"id":"api-four","host":"10.0.0.4","port":80})");
  etcd.put("/dynup-e2e/range/api-v2/web-9", "10.0.0.9:80"); // a sibling, not under the prefix
  std::int64_t rev = etcd.revision();

  Harness h;
  REQUIRE_FALSE(h.start(etcd.spec(p)));
  // start() ranged on this thread: the set is there before any watch event.
  CHECK(h.ids() == std::vector<std::string>{"10.0.0.2:8080", "api-four", "web-1", "web-3"});
  REQUIRE(h.peer("web-1"));
  CHECK(h.peer("web-1")->host == "10.0.0.1");
  CHECK(h.peer("web-1")->weight == 3);
  CHECK(h.peer("web-1")->zone == "z1");
  CHECK(h.peer("web-3")->port == 9000);
  CHECK(h.publisher.current()->source_index() == static_cast<std::uint64_t>(rev));
  auto st = h.watcher->status();
  CHECK(st.last_error.empty());
  CHECK_FALSE(st.stale);
  CHECK(st.publish_count == 1);
  CHECK(st.last_index == static_cast<std::uint64_t>(rev));
  CHECK(h.errors().empty());
}

TEST_CASE("etcd: puts and deletes under the prefix reach the publisher through the watch") {
  Etcd& etcd = shared_etcd();
  const std::string p = "/dynup-e2e/watch/api/";
  etcd.put(p + "web-1", "10.0.0.1:80");
  Harness h;
  REQUIRE_FALSE(h.start(etcd.spec(p)));
  REQUIRE_IDS(h, "web-1");

  etcd.put(p + "web-2", "10.0.0.2:80");
  REQUIRE_IDS(h, "web-1", "web-2");

  std::int64_t rev = etcd.put(p + "web-1", R"({"host":"10.0.0.11","port":81,"weight":7})");
  REQUIRE(wait_until([&] { return h.peer("web-1") && h.peer("web-1")->weight == 7; }, change_timeout));
  CHECK(h.peer("web-1")->host == "10.0.0.11"); // same key, same id, new address
  CHECK(h.publisher.current()->source_index() == static_cast<std::uint64_t>(rev));

  rev = etcd.del(p + "web-2");
  REQUIRE_IDS(h, "web-1");
  CHECK(h.publisher.current()->source_index() == static_cast<std::uint64_t>(rev));

  // Outside the prefix: nothing is published.
  std::uint64_t version = h.publisher.version();
  etcd.put("/dynup-e2e/watch/api-v2/web-3", "10.0.0.3:80");
  etcd.put("/dynup-e2e/watch/ap", "10.0.0.3:80");
  CHECK(dynup_test::stays_true_for([&] { return h.publisher.version() == version; }, 300ms));
  CHECK(h.probe->sends == 1); // one range at start, everything else came through the watch
  CHECK(h.probe->streams == 1);
  CHECK(h.errors().empty());
}

TEST_CASE("etcd: the document layout publishes the whole peer set held in one key") {
  Etcd& etcd = shared_etcd();
  const std::string key = "/dynup-e2e/doc/api.json";
  etcd.put(key, R"({"peers":[{"host":"10.0.0.1","port":80,"weight":2},"10.0.0.2:80"]})");
  etcd.put(key + ".bak", R"({"peers":["10.0.0.9:80"]})"); // shares the key as a prefix: ignored
  Harness h;
  REQUIRE_FALSE(h.start(etcd.spec(key + "?layout=document")));
  CHECK(h.ids() == std::vector<std::string>{"10.0.0.1:80", "10.0.0.2:80"});
  CHECK(h.peer("10.0.0.1:80")->weight == 2);

  etcd.put(key, R"(["10.0.0.1:80","10.0.0.2:80","10.0.0.3:80"])");
  REQUIRE_IDS(h, "10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80");
  etcd.put(key + ".bak", R"({"peers":["10.0.0.8:80"]})");

  // An invalid document is reported and the served set stays.
  std::uint64_t version = h.publisher.version();
  etcd.put(key, R"({"peers":[{"host":"10.0.0.1","port":0}]})");
  REQUIRE(wait_until([&] { return h.error_mentions("api.json", "port"); }, change_timeout));
  CHECK(h.publisher.version() == version);

  etcd.put(key, R"({"peers":["10.0.0.5:80"]})");
  REQUIRE_IDS(h, "10.0.0.5:80");

  // Deleting the key is an empty set, which the default guards refuse.
  etcd.del(key);
  REQUIRE(wait_until([&] { return h.error_mentions("empty"); }, change_timeout));
  CHECK(h.ids() == std::vector<std::string>{"10.0.0.5:80"});
  CHECK(h.watcher->status().stale);
}

TEST_CASE("etcd: an invalid value leaves out only its key, with the reason") {
  Etcd& etcd = shared_etcd();
  const std::string p = "/dynup-e2e/invalid/api/";
  etcd.put(p + "good-1", "10.0.0.1:80");
  etcd.put(p + "good-2", "10.0.0.2:80");
  etcd.put(p + "bad", R"({"host":"10.0.0.3"})");
  Harness h;
  REQUIRE_FALSE(h.start(etcd.spec(p)));
  CHECK(h.ids() == std::vector<std::string>{"good-1", "good-2"});
  CHECK(h.error_mentions("\"/dynup-e2e/invalid/api/bad\"", "port: is required"));

  // A valid key turning invalid leaves the set, the others stay.
  etcd.put(p + "good-2", "not a peer");
  REQUIRE_IDS(h, "good-1");
  CHECK(h.error_mentions("good-2"));

  // Two keys claiming one id: the first in key order (".../good-1" < ".../zz-dup") keeps it.
  etcd.put(p + "zz-dup", R"({"id":"good-1","host":"10.0.0.4","port":80})");
  REQUIRE(wait_until([&] { return h.error_mentions("\"good-1\" is already used"); }, change_timeout));
  CHECK(h.ids() == std::vector<std::string>{"good-1"});
  CHECK(h.peer("good-1")->host == "10.0.0.1");

  etcd.del(p + "zz-dup");
  etcd.put(p + "bad", R"({"host":"10.0.0.3","port":80})");
  etcd.put(p + "good-2", "10.0.0.2:80");
  REQUIRE_IDS(h, "bad", "good-1", "good-2");
  CHECK(h.watcher->status().last_error.empty());
}

TEST_CASE("etcd: a watch whose start revision was compacted re-ranges and continues") {
  Etcd& etcd = shared_etcd();
  const std::string p = "/dynup-e2e/compact/api/";
  etcd.put(p + "web-1", "10.0.0.1:80");
  etcd.put(p + "web-2", "10.0.0.2:80");
  Harness h;
  // The watcher ranges, then stalls before opening its watch; meanwhile the keys change
  // and etcd compacts past the revision the watch will ask for.
  h.probe->before_first_stream = [&] {
    etcd.put(p + "web-3", "10.0.0.3:80");
    std::int64_t rev = etcd.del(p + "web-1");
    etcd.compact(rev);
  };
  REQUIRE_FALSE(h.start(etcd.spec(p)));
  CHECK(h.ids() == std::vector<std::string>{"web-1", "web-2"});

  REQUIRE_IDS(h, "web-2", "web-3");
  CHECK(h.probe->sends == 2); // the first range, and the one compact_revision asked for
  CHECK(h.probe->streams >= 2);

  etcd.put(p + "web-4", "10.0.0.4:80");
  REQUIRE_IDS(h, "web-2", "web-3", "web-4");
  CHECK(h.probe->sends == 2);
  auto st = h.watcher->status();
  CHECK(st.consecutive_failures == 0);
  CHECK(st.last_error.empty());
  CHECK(h.errors().empty()); // a compaction is routine, not an error
}

TEST_CASE("etcd: after etcd restarts the watcher backs off, reconnects, re-ranges and follows new changes") {
  require_etcd();
  Etcd etcd;
  const std::string p = "/dynup-e2e/restart/api/";
  etcd.put(p + "web-1", "10.0.0.1:80");
  Harness h;
  REQUIRE_FALSE(h.start(etcd.spec(p)));
  REQUIRE(wait_until([&] { return h.streaming(); }, change_timeout));

  etcd.stop();
  REQUIRE(wait_until([&] { return h.watcher->status().consecutive_failures >= 2; }, change_timeout));
  auto down = h.watcher->status();
  CHECK_FALSE(down.last_error.empty());
  CHECK(h.ids() == std::vector<std::string>{"web-1"}); // the last good set stays
  int ranges_before = h.probe->sends;

  etcd.restart();
  etcd.put(p + "web-2", "10.0.0.2:80"); // likely before the watcher is back: the range finds it
  REQUIRE_IDS(h, "web-1", "web-2");
  REQUIRE(wait_until([&] { return h.watcher->status().consecutive_failures == 0; }, change_timeout));
  CHECK(h.probe->sends > ranges_before);
  REQUIRE(wait_until([&] { return h.streaming(); }, change_timeout));

  int ranges_after = h.probe->sends;
  etcd.del(p + "web-1");
  etcd.put(p + "web-3", "10.0.0.3:80");
  REQUIRE_IDS(h, "web-2", "web-3");
  CHECK(h.probe->sends == ranges_after); // through the new watch, not another range
  CHECK(h.watcher->status().last_error.empty());
}

TEST_CASE("etcd: stop() returns promptly with a watch stream open") {
  Etcd& etcd = shared_etcd();
  const std::string p = "/dynup-e2e/stop/api/";
  etcd.put(p + "web-1", "10.0.0.1:80");
  Harness h;
  auto o = Harness::fast();
  o.wait = std::chrono::minutes(10);
  REQUIRE_FALSE(h.start(etcd.spec(p), o));
  REQUIRE(wait_until([&] { return h.streaming(); }, change_timeout));
  std::this_thread::sleep_for(50ms);

  auto t0 = std::chrono::steady_clock::now();
  h.watcher->stop();
  auto took = std::chrono::steady_clock::now() - t0;
  MESSAGE("stop() took " << std::chrono::duration_cast<std::chrono::microseconds>(took).count() << " us");
  CHECK(took < 500ms);
  h.watcher->stop(); // idempotent
  CHECK_FALSE(h.streaming());
}

TEST_CASE("etcd: when etcd is down at start the last-known-good snapshot is served, then replaced") {
  require_etcd();
  Etcd etcd;
  dynup_test::TempDir dir;
  const std::string p = "/dynup-e2e/fallback/api/";
  etcd.put(p + "web-1", "10.0.0.1:80");
  etcd.put(p + "web-2", "10.0.0.2:80");
  auto o = Harness::fast();
  o.snapshot_path = dir.file("api.snapshot");
  {
    Harness first;
    REQUIRE_FALSE(first.start(etcd.spec(p), o));
    REQUIRE(first.ids() == std::vector<std::string>{"web-1", "web-2"});
  }
  REQUIRE(dynup_test::exists(o.snapshot_path));
  etcd.stop();

  Harness h;
  REQUIRE_FALSE(h.start(etcd.spec(p), o));
  CHECK(h.ids() == std::vector<std::string>{"web-1", "web-2"});
  auto st = h.watcher->status();
  CHECK(st.stale);
  CHECK_FALSE(st.last_error.empty());
  CHECK(st.consecutive_failures >= 1);

  etcd.restart();
  etcd.put(p + "web-3", "10.0.0.3:80");
  REQUIRE_IDS(h, "web-1", "web-2", "web-3");
  REQUIRE(wait_until([&] { return !h.watcher->status().stale; }, change_timeout));
}

TEST_CASE("etcd: strong_dependency makes start() fail when etcd is down") {
  require_etcd();
  auto port = dynup_test::free_loopback_ports(1)[0]; // nothing listens there
  std::string spec = "etcd://127.0.0.1:" + std::to_string(port) + "/dynup-e2e/strong/api/";
  auto o = Harness::fast();
  o.strong_dependency = true;
  Harness strong;
  auto err = strong.start(spec, o);
  REQUIRE(err);
  CHECK(err->code() == dynup::Errc::unavailable);
  CHECK(err->message().find("strong_dependency") != std::string::npos);
  CHECK(err->message().find(spec) != std::string::npos);
  CHECK(strong.publisher.version() == 0);

  // Without it, start() succeeds with nothing to serve and keeps trying.
  o.strong_dependency = false;
  Harness weak;
  REQUIRE_FALSE(weak.start(spec, o));
  CHECK(weak.publisher.version() == 0);
  CHECK(wait_until([&] { return weak.watcher->status().consecutive_failures >= 2; }, change_timeout));
}

TEST_CASE("etcd: a quiet watch is reopened after `wait` from the same revision, without a failure") {
  Etcd& etcd = shared_etcd();
  const std::string p = "/dynup-e2e/quiet/api/";
  etcd.put(p + "web-1", "10.0.0.1:80");
  Harness h;
  auto o = Harness::fast();
  o.wait = 200ms; // read timeout 1.2 s; etcd's progress notifications come every 10 minutes
  REQUIRE_FALSE(h.start(etcd.spec(p), o));
  REQUIRE(wait_until([&] { return h.probe->streams >= 3; }, 6000ms));
  auto st = h.watcher->status();
  CHECK(st.consecutive_failures == 0);
  CHECK(st.last_error.empty());
  CHECK(h.errors().empty());
  CHECK(h.probe->sends == 1); // reopened from the revision it had, no range

  etcd.put(p + "web-2", "10.0.0.2:80");
  REQUIRE_IDS(h, "web-1", "web-2");
}

TEST_CASE("etcd: progress notifications keep a quiet watch open and advance its revision") {
  require_etcd();
  EtcdOptions eo;
  eo.progress_notify_interval = 100ms;
  Etcd etcd(eo);
  const std::string p = "/dynup-e2e/progress/api/";
  etcd.put(p + "web-1", "10.0.0.1:80");
  Harness h;
  auto o = Harness::fast();
  o.wait = 500ms; // read timeout 1.5 s, far above the 100 ms notifications
  REQUIRE_FALSE(h.start(etcd.spec(p), o));
  std::uint64_t published = h.publisher.current()->source_index();

  std::int64_t elsewhere = etcd.put("/dynup-e2e/progress/other", "x");
  REQUIRE(wait_until([&] { return h.watcher->status().last_index >= static_cast<std::uint64_t>(elsewhere); },
                     change_timeout));
  CHECK(dynup_test::stays_true_for([&] { return h.probe->streams == 1; }, 2000ms));
  CHECK(h.publisher.current()->source_index() == published); // nothing here changed
  CHECK(h.errors().empty());
}

TEST_CASE("etcd: 1000 prefixes share one watch stream, and a change under each is published there") {
  Etcd& etcd = shared_etcd();
  constexpr std::size_t n = 1000;
  auto prefix = [](std::size_t i) { return "/dynup-e2e/many/svc-" + std::to_string(i) + "/"; };
  std::vector<std::pair<std::string, std::string>> first, second;
  for (std::size_t i = 0; i < n; ++i) {
    first.emplace_back(prefix(i) + "a", "10.0.0.1:" + std::to_string(10000 + i));
    second.emplace_back(prefix(i) + "b", "10.0.0.2:" + std::to_string(20000 + i));
  }
  etcd.put_many(first);

  auto rt = dynup::rt::Runtime::acquire();
  REQUIRE(rt);
  std::vector<std::unique_ptr<dynup::Publisher>> pubs;
  std::vector<dynup::Watcher> watchers;
  auto o = Harness::fast();
  for (std::size_t i = 0; i < n; ++i) {
    pubs.push_back(std::make_unique<dynup::Publisher>());
    auto w = dynup::Watcher::start(*pubs.back(), etcd.spec(prefix(i)), o);
    REQUIRE_MESSAGE(w, (w ? "" : w.error().message()));
    watchers.push_back(std::move(w).value());
  }
  for (std::size_t i = 0; i < n; ++i) REQUIRE(pubs[i]->current()->size() == 1);

  etcd.put_many(second);
  REQUIRE(wait_until(
      [&] {
        for (std::size_t i = 0; i < n; ++i)
          if (pubs[i]->current()->size() != 2) return false;
        return true;
      },
      30000ms));
  for (std::size_t i = 0; i < n; ++i) CHECK(pubs[i]->version() == 2);

  const dynup::rt::HttpEndpoint at{"127.0.0.1", etcd.client_port(), false};
  std::uint64_t opened = 0;
  bool streaming = false;
  (*rt)->loop().run_sync([&] {
    auto& hub = (*rt)->service<dynup::EtcdHubs>().at(at);
    opened = hub.streams_opened();
    streaming = hub.streaming();
  });
  CHECK(streaming);
  // One stream for the thousand: opened for svc-0/, reopened once, wider, when svc-1/
  // joined ("/dynup-e2e/many/svc-" covers every later one).
  CHECK(opened == 2);
  for (auto& w : watchers) CHECK(w.status().mode == "shared stream");
  for (auto& w : watchers) w.stop();
}
