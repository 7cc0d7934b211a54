// push:// sources: the spec and its options, PushWatcher's guards, index and snapshot,
// and Upstream::push (the admin API's "replace the set").
#include <dynup/peer_json.hpp>
#include <dynup/upstream.hpp>
#include <dynup/watch/any.hpp>

#include <support/temp_dir.hpp>
#include <support/text.hpp>

#include <doctest/doctest.h>
#include <nlohmann/json.hpp>

#include <sys/stat.h>

#include <chrono>
#include <fstream>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>

using dynup::Errc;
using dynup::Upstream;
using dynup_test::contains;
using dynup_test::TempDir;
using nlohmann::json;

namespace {

dynup::PeerSet set_of(const std::string& text) {
  auto s = dynup::parse_peer_set(text);
  REQUIRE_MESSAGE(s.ok(), s.error().message());
  return std::move(s).value();
}

const char* two = R"({"peers":[{"id":"a","host":"127.0.0.1","port":9001,"weight":3},{"id":"b","host":"127.0.0.1","port":9002}]})";
const char* one = R"({"peers":[{"id":"a","host":"127.0.0.1","port":9001}]})";

std::unique_ptr<Upstream> start(const json& config) {
  auto up = Upstream::start(config);
  REQUIRE_MESSAGE(up.ok(), up.error().message());
  return std::move(up).value();
}

} // namespace

TEST_CASE("push://: the spec is exact and fetch-only options are refused by name") {
  CHECK(dynup::Watcher::validate("push://").ok());
  auto extra = dynup::Watcher::validate("push://somewhere");
  REQUIRE_FALSE(extra.ok());
  CHECK(contains(extra.error().message(), "exactly \"push://\""));

  dynup::AnyWatchOptions o;
  o.strong_dependency = true;
  o.poll_interval = std::chrono::milliseconds(5);
  auto bad = dynup::Watcher::validate("push://", o);
  REQUIRE_FALSE(bad.ok());
  CHECK(contains(bad.error().message(), "strong_dependency, poll_interval"));

  dynup::AnyWatchOptions snap;
  snap.snapshot_path = "/tmp/x.snap";
  CHECK(dynup::Watcher::validate("push://", snap).ok());

  auto shared = Upstream::start(json{{"name", "api"}, {"source", "push://"}, {"shared", json::object()}});
  REQUIRE_FALSE(shared.ok());
  CHECK(contains(shared.error().message(), "upstream.shared: a push:// source cannot be shared"));
}

TEST_CASE("push://: an upstream starts empty, serves each push from the next pick, and guards refuse without change") {
  auto up = start(json{{"name", "api"}, {"source", "push://"}, {"guards", {{"max_removed_share", 0.5}}}});
  CHECK(up->peer_count() == 0);
  CHECK_FALSE(up->pick());

  auto r = up->push(set_of(two));
  REQUIRE_MESSAGE(r.ok(), r.error().message());
  CHECK(r->changed);
  CHECK(r->version == 1);
  CHECK(r->persist_error.empty());
  std::map<std::string, int> seen;
  for (int i = 0; i < 40; ++i) {
    auto sel = up->pick();
    REQUIRE(sel);
    ++seen[sel.peer->id];
    up->report(sel, {std::chrono::milliseconds(1), 200, false}); // a default Outcome is "no reply": a failure
  }
  CHECK(seen["a"] == 30); // weights 3:1, smooth round robin
  CHECK(seen["b"] == 10);
  json st = up->status();
  CHECK(st["index"] == 1);
  CHECK(st["source"] == "push://");
  CHECK(st["watcher"]["publish_count"] == 1);

  // The same set again: accepted, nothing republished.
  auto same = up->push(set_of(two));
  REQUIRE(same.ok());
  CHECK_FALSE(same->changed);
  CHECK(same->version == 1);

  // Removing one of two is 50 %: allowed. Then removing the last one is refused (empty).
  auto shrink = up->push(set_of(one));
  REQUIRE(shrink.ok());
  CHECK(shrink->version == 2);
  CHECK(up->peer_count() == 1);
  auto empty = up->push(set_of(R"({"peers":[]})"));
  REQUIRE_FALSE(empty.ok());
  CHECK(empty.error().code() == Errc::rejected);
  CHECK(contains(empty.error().message(), "upstream api: push://: refusing an empty peer set"));
  CHECK(up->peer_count() == 1);
  CHECK(up->status()["version"] == 2);
  CHECK(contains(up->status()["watcher"]["last_error"].get<std::string>(), "refusing an empty peer set"));
  // An accepted push clears the error.
  REQUIRE(up->push(set_of(two)).ok());
  CHECK(up->status()["watcher"]["last_error"] == "");
  CHECK(up->status()["index"] == 3);
}

TEST_CASE("push://: other sources refuse pushes, naming their source") {
  TempDir dir;
  std::string path = dir.file("peers.json");
  std::ofstream(path) << two;
  auto up = start(json{{"name", "api"}, {"source", "file://" + path}});
  auto r = up->push(set_of(one));
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().code() == Errc::unsupported);
  CHECK(contains(r.error().message(), "its source is file://" + path));
  CHECK(up->peer_count() == 2);
}

TEST_CASE("push://: with snapshot_path a pushed set survives a restart; a corrupt file starts empty and says why") {
  TempDir dir;
  std::string snap = dir.file("api.snap");
  json config{{"name", "api"}, {"source", "push://"}, {"snapshot_path", snap}};
  {
    auto up = start(config);
    CHECK(up->peer_count() == 0);
    auto r = up->push(set_of(two));
    REQUIRE(r.ok());
    CHECK(r->persist_error.empty());
    struct stat st {};
    REQUIRE(::stat(snap.c_str(), &st) == 0);
    CHECK((st.st_mode & 0777) == 0600);
  }
  {
    auto up = start(config);
    CHECK(up->peer_count() == 2);
    json st = up->status();
    CHECK(st["index"] == 1); // the pushed index carries over
    CHECK(st["stale"] == false);
    REQUIRE(up->push(set_of(one)).ok());
    CHECK(up->status()["index"] == 2);
  }
  std::ofstream(snap, std::ios::trunc) << "dynup-snapshot 1 5 00000000\nhello";
  std::string heard;
  auto up = Upstream::start(config, dynup::steady_clock(), [&](const dynup::Error& e) { heard = e.message(); });
  REQUIRE(up.ok());
  CHECK((*up)->peer_count() == 0);
  CHECK(contains(heard, "the saved pushed set is not served"));
  CHECK(contains((*up)->status()["watcher"]["last_error"].get<std::string>(), snap));
}

TEST_CASE("push://: a snapshot that cannot be written still serves the push and says so") {
  TempDir dir;
  auto up = start(json{{"name", "api"}, {"source", "push://"}, {"snapshot_path", dir.file("missing/dir/api.snap")}});
  auto r = up->push(set_of(two));
  REQUIRE(r.ok());
  CHECK(r->changed);
  CHECK_FALSE(r->persist_error.empty());
  CHECK(up->peer_count() == 2);
  CHECK(contains(up->status()["watcher"]["last_error"].get<std::string>(), "served but not saved"));
}

TEST_CASE("push://: each accepted push builds one routing table, not one per thread that heard of it") {
  auto up = start(json{{"name", "api"}, {"source", "push://"}});
  const auto built = [&] { return up->status()["tables_built"].get<std::uint64_t>(); };
  const std::uint64_t before = built();
  for (int i = 0; i < 20; ++i) {
    auto r = up->push(set_of(i % 2 == 0 ? two : one));
    REQUIRE_MESSAGE(r.ok(), r.error().message());
    CHECK(up->pick()); // served from the table push() built
  }
  // The rebuild thread was woken by each publish; give it time to (not) build again.
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  CHECK(built() == before + 20);
  auto same = up->push(set_of(one)); // unchanged: nothing to build
  REQUIRE(same.ok());
  CHECK_FALSE(same->changed);
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  CHECK(built() == before + 20);
}

TEST_CASE("push://: a callback that throws does not escape push(), and the push stands") {
  dynup::Publisher pub;
  int published = 0, errors = 0;
  dynup::PushWatcher w(
      pub, dynup::PushOptions{},
      [&](const dynup::Snapshot&) {
        ++published;
        throw std::runtime_error("embedder bug");
      },
      [&](const dynup::Error&) {
        ++errors;
        throw std::runtime_error("embedder bug");
      });
  CHECK_FALSE(w.status().ready);
  CHECK(w.status().stale); // nothing served yet

  dynup::Peer p;
  p.host = "10.0.0.1";
  p.port = 80;
  auto set = dynup::PeerSet::make({p}, 0);
  REQUIRE(set.ok());
  dynup::Result<dynup::PushResult> r = dynup::Error(dynup::Errc::invalid_argument, "not run");
  CHECK_NOTHROW(r = w.push(*set));
  REQUIRE(r.ok());
  CHECK(r->changed);
  CHECK(published == 1);
  CHECK(pub.version() == 1);
  CHECK(w.status().ready);
  CHECK_FALSE(w.status().stale);

  // The default guards refuse an empty set: the error callback throws, push() does not.
  dynup::Result<dynup::PushResult> refused = dynup::Error(dynup::Errc::invalid_argument, "not run");
  CHECK_NOTHROW(refused = w.push(dynup::PeerSet{}));
  REQUIRE_FALSE(refused.ok());
  CHECK(refused.error().code() == Errc::rejected);
  CHECK(errors == 1);
  CHECK(pub.version() == 1);
}
