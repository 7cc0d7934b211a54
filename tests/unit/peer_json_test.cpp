#include <dynup/peer_json.hpp>
#include <dynup/publisher.hpp>

#include <support/text.hpp>

#include <doctest/doctest.h>

#include <string>
#include <vector>

using dynup::Errc;
using dynup::Error;
using dynup::Result;
using dynup::Health;
using dynup::parse_peer_set;
using dynup::Peer;
using dynup::PeerSet;

namespace {

using dynup_test::contains;
PeerSet parse_ok(const std::string& text) {
  auto r = parse_peer_set(text);
  REQUIRE_MESSAGE(r.ok(), text, " -> ", r.error().message());
  return std::move(r).value();
}

std::string parse_error(const std::string& text) {
  auto r = parse_peer_set(text);
  REQUIRE_FALSE_MESSAGE(r.ok(), text);
  return r.error().message();
}

// A document whose third peer (peers[2]) carries `bad_fields`.
std::string third_peer(const std::string& bad_fields) {
  return R"({"peers":["10.0.0.1:80",{"host":"10.0.0.2","port":80},{)" + bad_fields + "}]}";
}

PeerSet rich_set() {
  Peer a;
  a.id = "api-1";
  a.host = "10.0.0.1";
  a.port = 8080;
  a.weight = 5;
  a.zone = "eu-1a";
  a.tags = {"v2", "blue"};
  a.meta = {{"build", "1.4"}, {"owner", "team \"x\""}};
  a.health = Health::warning;
  Peer b;
  b.host = "2001:db8::1";
  b.port = 443;
  b.backup = true;
  b.health = Health::critical;
  Peer c;
  c.id = "dns";
  c.host = "api.example.com";
  c.port = 1;
  c.weight = dynup::max_weight;
  c.health = Health::unknown;
  c.meta = {{"empty", ""}};
  auto r = PeerSet::make({a, b, c}, 42);
  REQUIRE(r);
  return std::move(r).value();
}

} // namespace

TEST_CASE("a peer set survives a JSON round trip with every field") {
  PeerSet original = rich_set();
  std::string text = dynup::to_json(original);
  PeerSet back = parse_ok(text);
  CHECK(back.same_content(original));
  CHECK(back.peers() == original.peers());
  CHECK(back.source_index() == 42);
  const Peer* v6 = back.find("[2001:db8::1]:443");
  REQUIRE(v6 != nullptr);
  CHECK(v6->host == "2001:db8::1");
  CHECK(v6->backup);
  CHECK(v6->health == Health::critical);
  const Peer* api = back.find("api-1");
  REQUIRE(api != nullptr);
  CHECK(api->tags == std::vector<std::string>{"blue", "v2"});
  CHECK(api->meta.at("owner") == "team \"x\"");
  CHECK(api->health == Health::warning);
  CHECK(api->zone == "eu-1a");
  CHECK(api->weight == 5);
}

TEST_CASE("an empty set survives a JSON round trip") {
  PeerSet back = parse_ok(dynup::to_json(PeerSet()));
  CHECK(back.empty());
  CHECK(back.same_content(PeerSet()));
}

TEST_CASE("JSON output is one line with keys in the order version, index, peers") {
  std::string text = dynup::to_json(rich_set());
  CHECK(text.rfind(R"({"version":0,"index":42,"peers":[)", 0) == 0);
  CHECK_FALSE(contains(text, "\n"));
  CHECK(text.back() == '}');
}

TEST_CASE("JSON output writes each peer with every field in a fixed order") {
  auto set = PeerSet::make({dynup::parse_host_port("10.0.0.1:80").value()});
  REQUIRE(set);
  CHECK(dynup::to_json(*set) ==
        R"({"version":0,"index":0,"peers":[{"id":"10.0.0.1:80","host":"10.0.0.1","port":80,)"
        R"("weight":1,"backup":false,"zone":"","tags":[],"meta":{},"health":"passing"}]})");
}

TEST_CASE("JSON output lists peers in id order") {
  auto set = parse_ok(R"(["10.0.0.3:80","10.0.0.1:80","10.0.0.2:80"])");
  std::string text = dynup::to_json(set);
  auto p1 = text.find("10.0.0.1:80"), p2 = text.find("10.0.0.2:80"), p3 = text.find("10.0.0.3:80");
  CHECK(p1 < p2);
  CHECK(p2 < p3);
}

TEST_CASE("JSON output of a published set carries its version, which parsing ignores") {
  dynup::Publisher pub;
  pub.publish(rich_set());
  pub.publish(PeerSet::make({dynup::parse_host_port("10.0.0.9:80").value()}, 43).value());
  dynup::Snapshot snap = pub.current();
  REQUIRE(snap->version() == 2);
  std::string text = dynup::to_json(*snap);
  CHECK(text.rfind(R"({"version":2,"index":43,"peers":[)", 0) == 0);
  PeerSet back = parse_ok(text);
  CHECK(back.version() == 0);
  CHECK(back.source_index() == 43);
  CHECK(back.same_content(*snap));
}

TEST_CASE("labels that are not UTF-8 never reach JSON output: the set is refused") {
  // JSON output would write such bytes as U+FFFD, so the set would not read back as itself.
  Peer p;
  p.host = "10.0.0.1";
  p.port = 80;
  p.zone = "z\xc3";
  auto set = PeerSet::make({p});
  REQUIRE_FALSE(set);
  CHECK(contains(set.error().message(), "zone is not UTF-8"));
  p.zone = "z";
  p.meta = {{"k", "\xff\xfe"}};
  set = PeerSet::make({p});
  REQUIRE_FALSE(set);
  CHECK(contains(set.error().message(), "a meta value is not UTF-8"));
}

TEST_CASE("JSON output keeps valid UTF-8 as is") {
  Peer p;
  p.id = "caf\xc3\xa9";
  p.host = "10.0.0.1";
  p.port = 80;
  p.meta = {{"who", "\xe6\x97\xa5\xe6\x9c\xac"}};
  PeerSet back = parse_ok(dynup::to_json(PeerSet::make({p}).value()));
  REQUIRE(back.find("caf\xc3\xa9") != nullptr);
  CHECK(back[0].meta.at("who") == "\xe6\x97\xa5\xe6\x9c\xac");
}

TEST_CASE("a bare array of peers is accepted with index 0") {
  PeerSet s = parse_ok(R"([{"host":"10.0.0.1","port":80},"10.0.0.2:81"])");
  CHECK(s.size() == 2);
  CHECK(s.source_index() == 0);
  CHECK(s.find("10.0.0.2:81") != nullptr);
}

TEST_CASE("a host:port string is a peer with default fields") {
  PeerSet s = parse_ok(R"({"peers":["10.0.0.1:8080","[::1]:80","Example.COM:443"]})");
  REQUIRE(s.size() == 3);
  const Peer* p = s.find("10.0.0.1:8080");
  REQUIRE(p != nullptr);
  CHECK(p->weight == 1);
  CHECK_FALSE(p->backup);
  CHECK(p->zone.empty());
  CHECK(p->tags.empty());
  CHECK(p->meta.empty());
  CHECK(p->health == Health::passing);
  REQUIRE(s.find("[::1]:80") != nullptr);
  CHECK(s.find("[::1]:80")->host == "::1");
  CHECK(s.find("example.com:443") != nullptr);
}

TEST_CASE("a bad host:port string names its JSON path") {
  std::string msg = parse_error(R"({"peers":["10.0.0.1:80","10.0.0.2"]})");
  CHECK(contains(msg, "peers[1]: "));
  CHECK(contains(msg, "host:port"));
}

TEST_CASE("the index is read from the document") {
  PeerSet s = parse_ok(R"({"version":3,"index":1234,"peers":[]})");
  CHECK(s.source_index() == 1234);
  CHECK(s.version() == 0);
  CHECK(parse_ok(R"({"index":18446744073709551615,"peers":[]})").source_index() == 18446744073709551615ULL);
}

TEST_CASE("a negative or fractional index is rejected") {
  CHECK(contains(parse_error(R"({"index":-1,"peers":[]})"), "index: expected a non-negative integer, got -1"));
  CHECK(contains(parse_error(R"({"index":1.5,"peers":[]})"), "index: "));
  CHECK(contains(parse_error(R"({"index":"7","peers":[]})"), "index: "));
}

TEST_CASE("a top-level unknown key is rejected naming the key") {
  auto r = parse_peer_set(R"({"peers":[],"extra":1})");
  REQUIRE_FALSE(r);
  CHECK(r.error().code() == Errc::parse_error);
  CHECK(contains(r.error().message(), "extra: unknown key"));
}

TEST_CASE("a document without peers is rejected") {
  auto r = parse_peer_set(R"({"index":1})");
  REQUIRE_FALSE(r);
  CHECK(r.error().code() == Errc::parse_error);
  CHECK(contains(r.error().message(), "peers: is required"));
}

TEST_CASE("peers that is not an array is rejected naming its type") {
  CHECK(contains(parse_error(R"({"peers":{}})"), "peers: expected an array of peers, got object"));
  CHECK(contains(parse_error(R"({"peers":"10.0.0.1:80"})"), "peers: expected an array of peers, got string"));
  CHECK(contains(parse_error(R"({"peers":null})"), "got null"));
}

TEST_CASE("a document that is neither an object nor an array is rejected") {
  CHECK(contains(parse_error("42"), "expected an array of peers, got number"));
  CHECK(contains(parse_error("null"), "got null"));
  CHECK(contains(parse_error(R"("10.0.0.1:80")"), "got string"));
}

TEST_CASE("an empty document is rejected as empty") {
  for (const char* text : {"", "   ", "\n\t\r\n"}) {
    auto r = parse_peer_set(text);
    REQUIRE_FALSE(r);
    CHECK(r.error().code() == Errc::parse_error);
    CHECK(r.error().message() == "document is empty");
  }
}

TEST_CASE("a syntax error says invalid JSON without the library's exception prefix") {
  for (const char* text : {"{", R"({"peers":[}")", "[1,]", "{\"peers\": [] } trailing", "nul"}) {
    auto r = parse_peer_set(text);
    REQUIRE_FALSE_MESSAGE(r, text);
    CHECK(r.error().code() == Errc::parse_error);
    CHECK(r.error().message().rfind("invalid JSON: ", 0) == 0);
    CHECK_FALSE(contains(r.error().message(), "[json.exception"));
  }
}

TEST_CASE("a syntax error reports where it happened") {
  std::string msg = parse_error("{\n\"peers\": [\n  oops ]}");
  CHECK(contains(msg, "line 3"));
}

TEST_CASE("a number too large for a double is an invalid JSON error, not an exception") {
  Result<PeerSet> r = Error(Errc::corrupt, "");
  CHECK_NOTHROW(r = parse_peer_set(R"({"peers":[{"host":"10.0.0.1","port":1e999}]})"));
  REQUIRE_FALSE(r);
  CHECK(r.error().code() == Errc::parse_error);
  CHECK(r.error().message().rfind("invalid JSON: ", 0) == 0);
  CHECK_FALSE(contains(r.error().message(), "[json.exception"));
}

TEST_CASE("an unknown peer key is rejected naming its path and the known keys") {
  std::string msg = parse_error(third_peer(R"("host":"10.0.0.3","port":80,"wieght":5)"));
  CHECK(contains(msg, "peers[2].wieght: unknown key"));
  CHECK(contains(msg, "weight"));
}

TEST_CASE("a missing host is rejected naming its path") {
  CHECK(contains(parse_error(third_peer(R"("port":80)")), "peers[2].host: is required"));
}

TEST_CASE("a missing port is rejected naming its path") {
  CHECK(contains(parse_error(third_peer(R"("host":"10.0.0.3")")), "peers[2].port: is required"));
}

TEST_CASE("a port of the wrong type or range is rejected naming its path") {
  struct Case {
    const char* json;
    const char* got;
  };
  for (Case c : {Case{"\"80\"", "\"80\""}, Case{"-1", "-1"}, Case{"0", "0"}, Case{"65536", "65536"},
                 Case{"80.5", "80.5"}, Case{"true", "true"}, Case{"null", "null"},
                 Case{"18446744073709551616", ""}, Case{"1e3", ""}}) {
    std::string msg = parse_error(third_peer(std::string(R"("host":"10.0.0.3","port":)") + c.json));
    CHECK_MESSAGE(contains(msg, "peers[2].port: expected an integer 1..65535, got "), c.json);
    CHECK_MESSAGE(contains(msg, c.got), c.json);
  }
}

TEST_CASE("port 1 and 65535 are accepted from JSON") {
  PeerSet s = parse_ok(R"([{"host":"10.0.0.1","port":1},{"host":"10.0.0.1","port":65535}])");
  CHECK(s.find("10.0.0.1:1") != nullptr);
  CHECK(s.find("10.0.0.1:65535") != nullptr);
}

TEST_CASE("a weight of the wrong type or range is rejected naming its path") {
  for (const char* w : {"0", "-3", "1.5", "\"5\"", "65536", "4294967297"}) {
    std::string msg = parse_error(third_peer(std::string(R"("host":"10.0.0.3","port":80,"weight":)") + w));
    CHECK_MESSAGE(contains(msg, "peers[2].weight: expected an integer 1.." + std::to_string(dynup::max_weight)), w);
  }
  PeerSet s = parse_ok(R"([{"host":"10.0.0.1","port":80,"weight":65535}])");
  CHECK(s[0].weight == 65535);
}

TEST_CASE("string fields of the wrong type are rejected naming their path") {
  CHECK(contains(parse_error(third_peer(R"("host":5,"port":80)")), "peers[2].host: expected a string, got number"));
  CHECK(contains(parse_error(third_peer(R"("host":"h","port":80,"id":[])")), "peers[2].id: expected a string, got array"));
  CHECK(contains(parse_error(third_peer(R"("host":"h","port":80,"zone":null)")), "peers[2].zone: expected a string, got null"));
}

TEST_CASE("backup must be a boolean") {
  CHECK(contains(parse_error(third_peer(R"("host":"h","port":80,"backup":"yes")")),
                 "peers[2].backup: expected true or false, got \"yes\""));
  CHECK(contains(parse_error(third_peer(R"("host":"h","port":80,"backup":1)")), "peers[2].backup: "));
}

TEST_CASE("a bad health string is rejected naming its path and the allowed values") {
  std::string msg = parse_error(third_peer(R"("host":"h","port":80,"health":"ok")"));
  CHECK(contains(msg, "peers[2].health: "));
  CHECK(contains(msg, "\"ok\""));
  CHECK(contains(msg, "passing, warning, critical, unknown"));
  CHECK(contains(parse_error(third_peer(R"("host":"h","port":80,"health":1)")), "peers[2].health: expected a string"));
}

TEST_CASE("tags that are not strings are rejected naming the element") {
  CHECK(contains(parse_error(third_peer(R"("host":"h","port":80,"tags":["a",2])")),
                 "peers[2].tags[1]: expected a string, got number"));
  CHECK(contains(parse_error(third_peer(R"("host":"h","port":80,"tags":"a")")),
                 "peers[2].tags: expected an array of strings, got string"));
}

TEST_CASE("meta values that are not strings are rejected naming the key") {
  CHECK(contains(parse_error(third_peer(R"("host":"h","port":80,"meta":{"build":14})")),
                 "peers[2].meta.build: expected a string, got number"));
  CHECK(contains(parse_error(third_peer(R"("host":"h","port":80,"meta":{"a":{"b":"c"}})")),
                 "peers[2].meta.a: expected a string, got object"));
  CHECK(contains(parse_error(third_peer(R"("host":"h","port":80,"meta":["x"])")),
                 "peers[2].meta: expected an object of strings, got array"));
}

TEST_CASE("a peer that is neither object nor string is rejected naming its path") {
  CHECK(contains(parse_error(R"({"peers":["10.0.0.1:80",7]})"), "peers[1]: expected an object or \"host:port\", got number"));
  CHECK(contains(parse_error(R"({"peers":[null]})"), "peers[0]: expected an object or \"host:port\", got null"));
}

TEST_CASE("every bad field in a document is reported, not only the first") {
  std::string msg = parse_error(R"({"peers":[{"host":"h","port":0},{"host":"h","port":80,"weight":0},{"port":80}]})");
  CHECK(contains(msg, "peers[0].port"));
  CHECK(contains(msg, "peers[1].weight"));
  CHECK(contains(msg, "peers[2].host"));
}

TEST_CASE("reported JSON errors are capped with an 'and N more' tail") {
  std::string doc = R"({"peers":[)";
  const int n = DYNUP_MAX_REPORTED_ERRORS + 3;
  for (int i = 0; i < n; ++i) doc += std::string(i ? "," : "") + R"({"host":"h","port":0})";
  doc += "]}";
  std::string msg = parse_error(doc);
  CHECK(contains(msg, "; and 3 more"));
  CHECK(contains(msg, "peers[" + std::to_string(DYNUP_MAX_REPORTED_ERRORS - 1) + "].port"));
  CHECK_FALSE(contains(msg, "peers[" + std::to_string(DYNUP_MAX_REPORTED_ERRORS) + "].port"));
}

TEST_CASE("peer validation errors from JSON keep the peer position") {
  auto r = parse_peer_set(R"({"peers":["10.0.0.1:80",{"host":"bad host","port":80,"id":"x"}]})");
  REQUIRE_FALSE(r);
  CHECK(r.error().code() == Errc::invalid_peer);
  CHECK(contains(r.error().message(), "peers[1] \"x\""));
}

TEST_CASE("duplicate ids in a JSON document are rejected naming both positions") {
  auto r = parse_peer_set(R"(["10.0.0.1:80","10.0.0.2:80","10.0.0.1:80"])");
  REQUIRE_FALSE(r);
  CHECK(contains(r.error().message(), "peers[2]"));
  CHECK(contains(r.error().message(), "also peers[0]"));
}

TEST_CASE("peer_set_from_json reads an already parsed document") {
  auto doc = nlohmann::json::parse(R"({"index":5,"peers":[{"host":"10.0.0.1","port":80,"tags":["b","a","b"]}]})");
  auto r = dynup::peer_set_from_json(doc);
  REQUIRE(r);
  CHECK(r->source_index() == 5);
  CHECK((*r)[0].tags == std::vector<std::string>{"a", "b"});
}

TEST_CASE("peer_to_json writes every field") {
  Peer p;
  p.id = "x";
  p.host = "h";
  p.port = 9;
  p.weight = 2;
  p.backup = true;
  p.zone = "z";
  p.tags = {"t"};
  p.meta = {{"k", "v"}};
  p.health = Health::critical;
  auto j = dynup::peer_to_json(p);
  CHECK(j["id"] == "x");
  CHECK(j["host"] == "h");
  CHECK(j["port"] == 9);
  CHECK(j["weight"] == 2);
  CHECK(j["backup"] == true);
  CHECK(j["zone"] == "z");
  CHECK(j["tags"] == nlohmann::ordered_json::array({"t"}));
  CHECK(j["meta"]["k"] == "v");
  CHECK(j["health"] == "critical");
}

TEST_CASE("a document without peers reports its unknown keys too") {
  auto r = parse_peer_set(R"({"peer": ["10.0.0.1:80"]})");
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().message().find("peer: unknown key") != std::string::npos);
  CHECK(r.error().message().find("peers: is required") != std::string::npos);
}

TEST_CASE("a top-level version that is not a non-negative integer is an error") {
  auto r = parse_peer_set(R"({"version": "7", "peers": ["10.0.0.1:80"]})");
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().message().find("version: expected a non-negative integer") != std::string::npos);
  CHECK(parse_peer_set(R"({"version": 7, "peers": ["10.0.0.1:80"]})").ok());
}
