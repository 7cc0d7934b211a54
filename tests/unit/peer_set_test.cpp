#include <dynup/peer_set.hpp>
#include <dynup/publisher.hpp>

#include <support/text.hpp>

#include <doctest/doctest.h>

#include <algorithm>
#include <functional>
#include <random>
#include <string>
#include <vector>

using dynup::Errc;
using dynup::Health;
using dynup::Peer;
using dynup::PeerSet;

namespace {

using dynup_test::contains;
Peer peer(std::string host, std::uint16_t port, std::string id = "") {
  Peer p;
  p.id = std::move(id);
  p.host = std::move(host);
  p.port = port;
  return p;
}

PeerSet make_ok(std::vector<Peer> peers, std::uint64_t index = 0) {
  auto r = PeerSet::make(std::move(peers), index);
  REQUIRE_MESSAGE(r.ok(), r.error().message());
  return std::move(r).value();
}

std::string make_error(std::vector<Peer> peers) {
  auto r = PeerSet::make(std::move(peers));
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().code() == Errc::invalid_peer);
  return r.error().message();
}

std::size_t count_of(const std::string& haystack, const std::string& needle) {
  std::size_t n = 0;
  for (auto pos = haystack.find(needle); pos != std::string::npos; pos = haystack.find(needle, pos + 1)) ++n;
  return n;
}

std::vector<Peer> many_peers(std::size_t n) {
  std::vector<Peer> out;
  for (std::size_t i = 0; i < n; ++i) {
    Peer p = peer("10.0." + std::to_string(i / 250) + "." + std::to_string(i % 250 + 1),
                  static_cast<std::uint16_t>(8000 + i % 7));
    p.weight = static_cast<std::uint32_t>(1 + i % 13);
    p.backup = i % 5 == 0;
    p.zone = "zone-" + std::to_string(i % 3);
    p.tags = {"t" + std::to_string(i % 4), "common"};
    p.meta = {{"idx", std::to_string(i)}};
    p.health = static_cast<Health>(i % 4);
    out.push_back(std::move(p));
  }
  return out;
}

} // namespace

TEST_CASE("a default PeerSet is empty with version 0 and index 0") {
  PeerSet s;
  CHECK(s.empty());
  CHECK(s.size() == 0);
  CHECK(s.version() == 0);
  CHECK(s.source_index() == 0);
  CHECK(s.begin() == s.end());
  CHECK(s.find("x") == nullptr);
}

TEST_CASE("make of no peers gives an empty set equal in content to the default set") {
  PeerSet s = make_ok({}, 9);
  CHECK(s.empty());
  CHECK(s.source_index() == 9);
  CHECK(s.same_content(PeerSet()));
  CHECK(s.content_hash() == PeerSet().content_hash());
}

TEST_CASE("make keeps the source index and leaves version at 0") {
  PeerSet s = make_ok({peer("10.0.0.1", 80)}, 42);
  CHECK(s.source_index() == 42);
  CHECK(s.version() == 0);
}

TEST_CASE("make sorts peers by id") {
  PeerSet s = make_ok({peer("10.0.0.3", 80, "c"), peer("10.0.0.1", 80, "a"), peer("10.0.0.2", 80, "b")});
  REQUIRE(s.size() == 3);
  CHECK(s[0].id == "a");
  CHECK(s[1].id == "b");
  CHECK(s[2].id == "c");
  CHECK(s[0].host == "10.0.0.1");
  std::vector<std::string> ids;
  for (const Peer& p : s) ids.push_back(p.id);
  CHECK(std::is_sorted(ids.begin(), ids.end()));
}

TEST_CASE("make canonicalizes hosts") {
  PeerSet s = make_ok({peer("API.Example.COM.", 80, "dns"), peer("[0:0::1]", 81, "v6")});
  CHECK(s.find("dns")->host == "api.example.com");
  CHECK(s.find("v6")->host == "::1");
}

TEST_CASE("the default id is host:port from the canonical host") {
  PeerSet s = make_ok({peer("10.0.0.1", 8080), peer("Example.COM", 443)});
  CHECK(s.find("10.0.0.1:8080") != nullptr);
  CHECK(s.find("example.com:443") != nullptr);
}

TEST_CASE("the default id of an IPv6 peer is [v6]:port") {
  PeerSet s = make_ok({peer("0:0::1", 8080), peer("[2001:DB8::1]", 443)});
  REQUIRE(s.find("[::1]:8080") != nullptr);
  CHECK(s.find("[::1]:8080")->host == "::1");
  CHECK(s.find("[2001:db8::1]:443") != nullptr);
}

TEST_CASE("make sorts and de-duplicates tags") {
  Peer p = peer("10.0.0.1", 80);
  p.tags = {"v2", "blue", "v2", "alpha", "blue"};
  PeerSet s = make_ok({p});
  CHECK(s[0].tags == std::vector<std::string>{"alpha", "blue", "v2"});
}

TEST_CASE("an empty host is rejected naming the peer and position") {
  std::string msg = make_error({peer("10.0.0.1", 80), peer("", 80, "api-2")});
  CHECK(contains(msg, "peers[1]"));
  CHECK(contains(msg, "\"api-2\""));
  CHECK(contains(msg, "host is empty"));
  CHECK(contains(msg, "1 invalid peer:"));
}

TEST_CASE("an invalid host is rejected naming host:port when the id is empty") {
  std::string msg = make_error({peer("bad host", 80)});
  CHECK(contains(msg, "peers[0] \"bad host:80\""));
  CHECK(contains(msg, "neither an IP address nor a valid DNS name"));
}

TEST_CASE("port 0 is rejected") {
  std::string msg = make_error({peer("10.0.0.1", 0, "api")});
  CHECK(contains(msg, "peers[0] \"api\""));
  CHECK(contains(msg, "port 0"));
  CHECK(contains(msg, "1..65535"));
}

TEST_CASE("port 1 and 65535 are accepted") {
  PeerSet s = make_ok({peer("10.0.0.1", 1), peer("10.0.0.1", 65535)});
  CHECK(s.size() == 2);
}

TEST_CASE("weight 0 is rejected") {
  Peer p = peer("10.0.0.1", 80, "api");
  p.weight = 0;
  std::string msg = make_error({p});
  CHECK(contains(msg, "peers[0] \"api\""));
  CHECK(contains(msg, "weight 0 is out of range 1.." + std::to_string(dynup::max_weight)));
}

TEST_CASE("weight above max_weight is rejected and max_weight itself is accepted") {
  Peer p = peer("10.0.0.1", 80, "api");
  p.weight = dynup::max_weight + 1;
  std::string msg = make_error({p});
  CHECK(contains(msg, "weight " + std::to_string(dynup::max_weight + 1)));
  p.weight = dynup::max_weight;
  CHECK(make_ok({p})[0].weight == dynup::max_weight);
}

TEST_CASE("duplicate ids are rejected naming both positions") {
  std::string msg =
      make_error({peer("10.0.0.1", 80, "api"), peer("10.0.0.2", 80, "web"), peer("10.0.0.3", 80, "api")});
  CHECK(contains(msg, "peers[2] \"api\""));
  CHECK(contains(msg, "duplicate id (also peers[0])"));
}

TEST_CASE("duplicate default ids are rejected") {
  std::string msg = make_error({peer("10.0.0.1", 80), peer("10.0.0.1", 80)});
  CHECK(contains(msg, "peers[1] \"10.0.0.1:80\""));
  CHECK(contains(msg, "also peers[0]"));
}

TEST_CASE("two hosts that canonicalize to the same address get the same default id") {
  std::string msg = make_error({peer("::1", 80), peer("[0:0::1]", 80)});
  CHECK(contains(msg, "\"[::1]:80\""));
  CHECK(contains(msg, "duplicate id"));
}

TEST_CASE("an id longer than 256 bytes is rejected and 256 bytes is accepted") {
  std::string msg = make_error({peer("10.0.0.1", 80, std::string(257, 'x'))});
  CHECK(contains(msg, "longer than 256 bytes"));
  CHECK(make_ok({peer("10.0.0.1", 80, std::string(256, 'x'))}).size() == 1);
}

TEST_CASE("an id containing a control character is rejected") {
  for (std::string id : {std::string("api\nFAKE LOG LINE"), std::string("a\tb"), std::string("x\x7f"),
                         std::string("nul\0x", 5)}) {
    std::string msg = make_error({peer("10.0.0.1", 80, id)});
    CHECK(contains(msg, "control character"));
  }
}

TEST_CASE("an id with spaces and non-ASCII bytes is accepted") {
  PeerSet s = make_ok({peer("10.0.0.1", 80, "api 1 \xc3\xa9")});
  CHECK(s[0].id == "api 1 \xc3\xa9");
}

TEST_CASE("one peer with several problems reports each of them") {
  Peer p = peer("", 0, "api");
  p.weight = 0;
  std::string msg = make_error({p});
  CHECK(contains(msg, "3 invalid peers:"));
  CHECK(contains(msg, "host is empty"));
  CHECK(contains(msg, "port 0"));
  CHECK(contains(msg, "weight 0"));
}

TEST_CASE("errors in several peers are all reported with their positions") {
  std::string msg = make_error({peer("10.0.0.1", 80), peer("", 80, "a"), peer("10.0.0.3", 0, "b")});
  CHECK(contains(msg, "2 invalid peers:"));
  CHECK(contains(msg, "peers[1] \"a\""));
  CHECK(contains(msg, "peers[2] \"b\""));
  CHECK(msg.find("peers[1]") < msg.find("peers[2]"));
  CHECK_FALSE(contains(msg, "more"));
}

TEST_CASE("reported errors are capped with an 'and N more' tail") {
  std::vector<Peer> peers;
  for (int i = 0; i < DYNUP_MAX_REPORTED_ERRORS + 5; ++i) peers.push_back(peer("10.0.0.1", 0, "p" + std::to_string(i)));
  std::string msg = make_error(peers);
  CHECK(contains(msg, std::to_string(DYNUP_MAX_REPORTED_ERRORS + 5) + " invalid peers:"));
  CHECK(count_of(msg, "port 0") == DYNUP_MAX_REPORTED_ERRORS);
  CHECK(contains(msg, "; and 5 more"));
  CHECK(contains(msg, "peers[" + std::to_string(DYNUP_MAX_REPORTED_ERRORS - 1) + "]"));
  CHECK_FALSE(contains(msg, "peers[" + std::to_string(DYNUP_MAX_REPORTED_ERRORS) + "]"));
}

TEST_CASE("exactly the cap of errors has no 'more' tail") {
  std::vector<Peer> peers;
  for (int i = 0; i < DYNUP_MAX_REPORTED_ERRORS; ++i) peers.push_back(peer("10.0.0.1", 0, "p" + std::to_string(i)));
  std::string msg = make_error(peers);
  CHECK(count_of(msg, "port 0") == DYNUP_MAX_REPORTED_ERRORS);
  CHECK_FALSE(contains(msg, "more"));
}

TEST_CASE("find returns the peer with that id or nullptr") {
  PeerSet s = make_ok({peer("10.0.0.1", 80, "b"), peer("10.0.0.2", 80, "a"), peer("10.0.0.3", 80, "c")});
  REQUIRE(s.find("a") != nullptr);
  CHECK(s.find("a")->host == "10.0.0.2");
  CHECK(s.find("c")->host == "10.0.0.3");
  CHECK(s.find("") == nullptr);
  CHECK(s.find("aa") == nullptr);
  CHECK(s.find("d") == nullptr);
  CHECK(s.find("0") == nullptr);
  CHECK(s.find("a") == &s[0]);
}

TEST_CASE("content hash does not depend on input order") {
  std::vector<Peer> peers = many_peers(200);
  PeerSet reference = make_ok(peers);
  REQUIRE(reference.size() == 200);
  std::mt19937_64 rng(0x5eed);
  for (int round = 0; round < 5; ++round) {
    std::shuffle(peers.begin(), peers.end(), rng);
    PeerSet s = make_ok(peers);
    CHECK(s.content_hash() == reference.content_hash());
    CHECK(s.same_content(reference));
    CHECK(s.peers() == reference.peers());
  }
}

TEST_CASE("content hash does not depend on tag order, duplicate tags or host spelling") {
  Peer a = peer("Example.com.", 80, "x");
  a.tags = {"b", "a", "b"};
  Peer b = peer("example.com", 80, "x");
  b.tags = {"a", "b"};
  CHECK(make_ok({a}).content_hash() == make_ok({b}).content_hash());
}

TEST_CASE("content hash does not cover version or source index") {
  PeerSet a = make_ok({peer("10.0.0.1", 80)}, 1);
  PeerSet b = make_ok({peer("10.0.0.1", 80)}, 999);
  CHECK(a.content_hash() == b.content_hash());
  CHECK(a.same_content(b));
}

TEST_CASE("content hash differs when any single field differs") {
  Peer base = peer("10.0.0.1", 80, "api");
  base.weight = 3;
  base.zone = "z1";
  base.tags = {"v1"};
  base.meta = {{"k", "v"}};
  const std::uint64_t h0 = make_ok({base, peer("10.0.0.9", 90, "other")}).content_hash();

  std::vector<std::pair<const char*, std::function<void(Peer&)>>> mutations = {
      {"id", [](Peer& p) { p.id = "api2"; }},
      {"host", [](Peer& p) { p.host = "10.0.0.2"; }},
      {"port", [](Peer& p) { p.port = 81; }},
      {"weight", [](Peer& p) { p.weight = 4; }},
      {"backup", [](Peer& p) { p.backup = true; }},
      {"zone", [](Peer& p) { p.zone = "z2"; }},
      {"zone empty", [](Peer& p) { p.zone.clear(); }},
      {"tags added", [](Peer& p) { p.tags.push_back("v2"); }},
      {"tags changed", [](Peer& p) { p.tags = {"v2"}; }},
      {"tags removed", [](Peer& p) { p.tags.clear(); }},
      {"meta value", [](Peer& p) { p.meta["k"] = "w"; }},
      {"meta key", [](Peer& p) { p.meta = {{"j", "v"}}; }},
      {"meta added", [](Peer& p) { p.meta["k2"] = "v"; }},
      {"meta removed", [](Peer& p) { p.meta.clear(); }},
      {"health", [](Peer& p) { p.health = Health::critical; }},
  };
  for (auto& [name, mutate] : mutations) {
    Peer changed = base;
    mutate(changed);
    PeerSet a = make_ok({changed, peer("10.0.0.9", 90, "other")});
    CHECK_MESSAGE(a.content_hash() != h0, name);
    CHECK_FALSE_MESSAGE(a.same_content(make_ok({base, peer("10.0.0.9", 90, "other")})), name);
  }
}

TEST_CASE("content hash differs when a peer is added or removed") {
  PeerSet one = make_ok({peer("10.0.0.1", 80)});
  PeerSet two = make_ok({peer("10.0.0.1", 80), peer("10.0.0.2", 80)});
  CHECK(one.content_hash() != two.content_hash());
  CHECK(one.content_hash() != PeerSet().content_hash());
}

TEST_CASE("content hash separates field boundaries") {
  // Same concatenated text, different split between zone and a tag.
  Peer a = peer("10.0.0.1", 80, "x");
  a.zone = "ab";
  a.tags = {"c"};
  Peer b = peer("10.0.0.1", 80, "x");
  b.zone = "a";
  b.tags = {"bc"};
  CHECK(make_ok({a}).content_hash() != make_ok({b}).content_hash());
}

TEST_CASE("same_content compares peers, not metadata of the set") {
  PeerSet a = make_ok({peer("10.0.0.1", 80), peer("10.0.0.2", 80)}, 1);
  PeerSet b = make_ok({peer("10.0.0.2", 80), peer("10.0.0.1", 80)}, 2);
  PeerSet c = make_ok({peer("10.0.0.1", 80)}, 1);
  CHECK(a.same_content(b));
  CHECK(b.same_content(a));
  CHECK_FALSE(a.same_content(c));
  CHECK(a.same_content(a));
}

TEST_CASE("with_source_index keeps the peers and sets the index") {
  PeerSet a = make_ok({peer("10.0.0.1", 80), peer("10.0.0.2", 80)}, 5);
  PeerSet b = a.with_source_index(77);
  CHECK(b.source_index() == 77);
  CHECK(a.source_index() == 5);
  CHECK(b.same_content(a));
  CHECK(b.peers() == a.peers());
  CHECK(b.content_hash() == a.content_hash());
  PeerSet c = std::move(b).with_source_index(78);
  CHECK(c.source_index() == 78);
  CHECK(c.same_content(a));
}

TEST_CASE("with_source_index resets the version of a published set to 0") {
  dynup::Publisher pub;
  auto outcome = pub.publish(make_ok({peer("10.0.0.1", 80)}, 3));
  REQUIRE(outcome.published);
  dynup::Snapshot snap = pub.current();
  REQUIRE(snap->version() == 1);
  PeerSet copy = snap->with_source_index(4);
  CHECK(copy.version() == 0);
  CHECK(copy.source_index() == 4);
  CHECK(copy.same_content(*snap));
  CHECK(snap->version() == 1); // the published set itself is untouched
  CHECK(snap->source_index() == 3);
}

TEST_CASE("diff of equal sets is empty") {
  PeerSet a = make_ok({peer("10.0.0.1", 80), peer("10.0.0.2", 80)}, 1);
  PeerSet b = make_ok({peer("10.0.0.2", 80), peer("10.0.0.1", 80)}, 2);
  auto d = dynup::diff(a, b);
  CHECK(d.empty());
  CHECK(d.added.empty());
  CHECK(d.removed.empty());
  CHECK(d.changed.empty());
}

TEST_CASE("diff of two empty sets is empty") {
  CHECK(dynup::diff(PeerSet(), PeerSet()).empty());
}

TEST_CASE("diff from empty adds every peer and to empty removes every peer") {
  PeerSet a = make_ok({peer("10.0.0.2", 80, "b"), peer("10.0.0.1", 80, "a")});
  auto up = dynup::diff(PeerSet(), a);
  REQUIRE(up.added.size() == 2);
  CHECK(up.added[0].id == "a");
  CHECK(up.added[1].id == "b");
  CHECK(up.removed.empty());
  CHECK(up.changed.empty());
  CHECK_FALSE(up.empty());

  auto down = dynup::diff(a, PeerSet());
  REQUIRE(down.removed.size() == 2);
  CHECK(down.removed[0].id == "a");
  CHECK(down.removed[1].id == "b");
  CHECK(down.added.empty());
}

TEST_CASE("diff of disjoint sets removes all old peers and adds all new ones") {
  PeerSet a = make_ok({peer("10.0.0.1", 80, "a"), peer("10.0.0.3", 80, "c"), peer("10.0.0.5", 80, "e")});
  PeerSet b = make_ok({peer("10.0.0.2", 80, "b"), peer("10.0.0.4", 80, "d")});
  auto d = dynup::diff(a, b);
  REQUIRE(d.removed.size() == 3);
  REQUIRE(d.added.size() == 2);
  CHECK(d.removed[0].id == "a");
  CHECK(d.removed[1].id == "c");
  CHECK(d.removed[2].id == "e");
  CHECK(d.added[0].id == "b");
  CHECK(d.added[1].id == "d");
  CHECK(d.changed.empty());
}

TEST_CASE("diff reports added, removed and changed peers matched by id") {
  Peer keep = peer("10.0.0.1", 80, "keep");
  Peer change_before = peer("10.0.0.2", 80, "change");
  Peer change_after = change_before;
  change_after.weight = 9;
  change_after.health = Health::critical;
  PeerSet before = make_ok({keep, change_before, peer("10.0.0.3", 80, "gone")});
  PeerSet after = make_ok({peer("10.0.0.4", 80, "new"), change_after, keep});
  auto d = dynup::diff(before, after);
  REQUIRE(d.added.size() == 1);
  CHECK(d.added[0].id == "new");
  CHECK(d.added[0].host == "10.0.0.4");
  REQUIRE(d.removed.size() == 1);
  CHECK(d.removed[0].id == "gone");
  REQUIRE(d.changed.size() == 1);
  CHECK(d.changed[0].first.id == "change");
  CHECK(d.changed[0].first.weight == 1);
  CHECK(d.changed[0].second.weight == 9);
  CHECK(d.changed[0].second.health == Health::critical);
}

TEST_CASE("diff detects a change in any field of a peer with the same id") {
  Peer base = peer("10.0.0.1", 80, "x");
  PeerSet a = make_ok({base});
  Peer m = base;
  m.meta["k"] = "v";
  CHECK(dynup::diff(a, make_ok({m})).changed.size() == 1);
  m = base;
  m.tags = {"t"};
  CHECK(dynup::diff(a, make_ok({m})).changed.size() == 1);
  m = base;
  m.host = "10.0.0.2";
  CHECK(dynup::diff(a, make_ok({m})).changed.size() == 1);
}

TEST_CASE("three peers sharing an id are reported in input order") {
  std::vector<Peer> peers;
  for (int i = 0; i < 3; ++i) {
    Peer p;
    p.id = "same";
    p.host = "10.0.0." + std::to_string(i + 1);
    p.port = 80;
    peers.push_back(p);
  }
  auto r = PeerSet::make(peers);
  REQUIRE_FALSE(r.ok());
  const std::string& m = r.error().message();
  auto first = m.find("peers[1] \"same\": duplicate id (also peers[0])");
  auto second = m.find("peers[2] \"same\": duplicate id (also peers[1])");
  CHECK(first != std::string::npos);
  CHECK(second != std::string::npos);
  CHECK(first < second);
}
