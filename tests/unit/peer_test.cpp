#include <dynup/detail/hash.hpp>
#include <dynup/peer.hpp>

#include <doctest/doctest.h>

#include <string>

using dynup::canonical_host;
using dynup::Errc;
using dynup::Health;
using dynup::HostKind;
using dynup::parse_host_port;

namespace {

std::string canon(const std::string& host) {
  auto r = canonical_host(host);
  REQUIRE_MESSAGE(r.ok(), host, ": ", r.error().message());
  return r.value();
}

bool rejected(const std::string& host) {
  auto r = canonical_host(host);
  if (r) return false;
  CHECK(r.error().code() == Errc::invalid_peer);
  return true;
}

} // namespace

TEST_CASE("canonical_host keeps IPv4 addresses in dotted-quad form") {
  CHECK(canon("10.0.0.1") == "10.0.0.1");
  CHECK(canon("127.0.0.1") == "127.0.0.1");
  CHECK(canon("255.255.255.255") == "255.255.255.255");
  CHECK(canon("0.0.0.0") == "0.0.0.0");
}

TEST_CASE("canonical_host rejects malformed dotted numbers") {
  CHECK(rejected("1.2.3"));
  CHECK(rejected("999.1.1.1"));
  CHECK(rejected("1.2.3.4.5"));
  CHECK(rejected("256.0.0.1"));
  CHECK(rejected("1..2.3"));
  CHECK(rejected("12345"));
  auto r = canonical_host("999.1.1.1");
  REQUIRE_FALSE(r);
  CHECK(r.error().message().find("999.1.1.1") != std::string::npos);
}

TEST_CASE("canonical_host rejects IPv4 in forms a resolver reads differently") {
  // inet_aton would read these as 127.0.0.1, 8.0.0.1, 1.2.0.3, 0.0.0.127.
  for (const char* host : {"0x7f.0.0.1", "010.0.0.1", "10.0.0.01", "0177.0.0.1", "0x7f", "0x7f.1",
                           "0x7f.0.0.1.", "0XA.0.0.1"}) {
    auto r = canonical_host(host);
    REQUIRE_FALSE_MESSAGE(r, host);
    CHECK(r.error().code() == Errc::invalid_peer);
    CHECK(r.error().message().find(host) != std::string::npos);
  }
  auto r = canonical_host("0x7f.0.0.1");
  REQUIRE_FALSE(r);
  CHECK(r.error().message().find("non-standard form") != std::string::npos);
}

TEST_CASE("canonical_host still accepts names with hex-looking labels that are not addresses") {
  CHECK(canon("0xdead.example.com") == "0xdead.example.com");
  CHECK(canon("cafe.babe") == "cafe.babe");
  CHECK(canon("1a.example") == "1a.example");
}

TEST_CASE("canonical_host keeps IPv4-mapped IPv6 in inet_ntop form") {
  CHECK(canon("::FFFF:10.0.0.1") == "::ffff:10.0.0.1");
  CHECK(canon("[::ffff:a00:1]") == "::ffff:10.0.0.1");
}

TEST_CASE("canonical_host puts IPv6 addresses in inet_ntop form") {
  CHECK(canon("::1") == "::1");
  CHECK(canon("0:0::1") == "::1");
  CHECK(canon("0:0:0:0:0:0:0:1") == "::1");
  CHECK(canon("2001:DB8:0:0:0:0:0:1") == "2001:db8::1");
  CHECK(canon("2001:0db8:0000:0000:0000:ff00:0042:8329") == "2001:db8::ff00:42:8329");
  CHECK(canon("fe80::") == "fe80::");
}

TEST_CASE("canonical_host strips brackets around IPv6 addresses") {
  CHECK(canon("[::1]") == "::1");
  CHECK(canon("[0:0::1]") == "::1");
  CHECK(canon("[2001:db8::1]") == "2001:db8::1");
}

TEST_CASE("canonical_host rejects invalid IPv6 and names it as such") {
  CHECK(rejected("::g"));
  CHECK(rejected("1:2:3:4:5:6:7:8:9"));
  CHECK(rejected("1::2::3"));
  CHECK(rejected("[::1"));
  CHECK(rejected("[]"));
  auto r = canonical_host("1::2::3");
  REQUIRE_FALSE(r);
  CHECK(r.error().message().find("IPv6") != std::string::npos);
  CHECK(r.error().message().find("1::2::3") != std::string::npos);
}

TEST_CASE("canonical_host lower-cases DNS names and drops a trailing dot") {
  CHECK(canon("example.com") == "example.com");
  CHECK(canon("API.Example.COM") == "api.example.com");
  CHECK(canon("example.com.") == "example.com");
  CHECK(canon("Host-1.Example.com.") == "host-1.example.com");
  CHECK(canon("localhost") == "localhost");
}

TEST_CASE("canonical_host accepts underscores and digits in DNS labels") {
  CHECK(canon("_api._tcp.service.consul") == "_api._tcp.service.consul");
  CHECK(canon("node_1.dc1") == "node_1.dc1");
  CHECK(canon("3com.com") == "3com.com");
  CHECK(canon("a1-b2") == "a1-b2");
}

TEST_CASE("canonical_host rejects DNS labels starting or ending with a hyphen") {
  CHECK(rejected("-api.example.com"));
  CHECK(rejected("api-.example.com"));
  CHECK(rejected("api.-example.com"));
  CHECK(rejected("api.example-"));
  CHECK(rejected("api.example-."));
}

TEST_CASE("canonical_host rejects empty DNS labels") {
  CHECK(rejected("a..b"));
  CHECK(rejected(".example.com"));
  CHECK(rejected("example.com.."));
  CHECK(rejected("."));
}

TEST_CASE("canonical_host enforces the 63-byte label limit") {
  std::string label63(63, 'a');
  std::string label64(64, 'a');
  CHECK(canon(label63 + ".com") == label63 + ".com");
  CHECK(rejected(label64 + ".com"));
  CHECK(rejected("com." + label64));
}

TEST_CASE("canonical_host enforces the 253-byte name limit") {
  // 4 labels of 61 + 3 dots = 247, plus ".abcde" = 253.
  std::string l(61, 'x');
  std::string name253 = l + "." + l + "." + l + "." + l + ".abcde";
  REQUIRE(name253.size() == 253);
  CHECK(canon(name253) == name253);
  CHECK(rejected(name253 + "f"));
}

TEST_CASE("canonical_host accepts a 253-byte name written fully qualified with a trailing dot") {
  std::string l(61, 'x');
  std::string name253 = l + "." + l + "." + l + "." + l + ".abcde";
  CHECK(canon(name253 + ".") == name253);
}

TEST_CASE("canonical_host rejects empty hosts, spaces and other characters") {
  CHECK(rejected(""));
  CHECK(rejected("a b"));
  CHECK(rejected("host/path"));
  CHECK(rejected("host:80"));
  CHECK(rejected("héllo.com"));
  auto r = canonical_host("");
  REQUIRE_FALSE(r);
  CHECK(r.error().message() == "host is empty");
  auto s = canonical_host("a b");
  REQUIRE_FALSE(s);
  CHECK(s.error().message().find("\"a b\"") != std::string::npos);
}

TEST_CASE("host_kind classifies canonical hosts") {
  CHECK(dynup::host_kind("10.0.0.1") == HostKind::ipv4);
  CHECK(dynup::host_kind("::1") == HostKind::ipv6);
  CHECK(dynup::host_kind("::ffff:10.0.0.1") == HostKind::ipv6);
  CHECK(dynup::host_kind("example.com") == HostKind::dns);
  CHECK(dynup::host_kind("") == HostKind::dns);
}

TEST_CASE("host_port brackets IPv6 hosts only") {
  CHECK(dynup::host_port("10.0.0.1", 80) == "10.0.0.1:80");
  CHECK(dynup::host_port("example.com", 65535) == "example.com:65535");
  CHECK(dynup::host_port("::1", 8080) == "[::1]:8080");
}

TEST_CASE("parse_host_port reads host and port with other fields at defaults") {
  auto p = parse_host_port("h:1");
  REQUIRE(p);
  CHECK(p->host == "h");
  CHECK(p->port == 1);
  CHECK(p->id.empty());
  CHECK(p->weight == 1);
  CHECK_FALSE(p->backup);
  CHECK(p->health == Health::passing);

  auto q = parse_host_port("10.0.0.1:65535");
  REQUIRE(q);
  CHECK(q->host == "10.0.0.1");
  CHECK(q->port == 65535);
}

TEST_CASE("parse_host_port reads bracketed IPv6") {
  auto p = parse_host_port("[::1]:80");
  REQUIRE(p);
  CHECK(p->host == "::1");
  CHECK(p->port == 80);
  auto q = parse_host_port("[2001:db8::1]:8443");
  REQUIRE(q);
  CHECK(q->host == "2001:db8::1");
  CHECK(q->port == 8443);
}

TEST_CASE("parse_host_port rejects a missing port") {
  CHECK_FALSE(parse_host_port("h"));
  CHECK_FALSE(parse_host_port("h:"));
  CHECK_FALSE(parse_host_port("[::1]"));
  CHECK_FALSE(parse_host_port("[::1]:"));
  CHECK_FALSE(parse_host_port("[::1]80"));
  CHECK_FALSE(parse_host_port("[::1"));
  CHECK_FALSE(parse_host_port(""));
}

TEST_CASE("parse_host_port rejects ports outside 1..65535 and names the range") {
  for (const char* text : {"h:0", "h:65536", "h:99999", "h:123456", "[::1]:0", "[::1]:65536"}) {
    auto r = parse_host_port(text);
    REQUIRE_FALSE_MESSAGE(r, text);
    CHECK(r.error().code() == Errc::invalid_peer);
    CHECK(r.error().message().find("1..65535") != std::string::npos);
    CHECK(r.error().message().find(text) != std::string::npos);
  }
}

TEST_CASE("parse_host_port rejects non-digit ports") {
  CHECK_FALSE(parse_host_port("h:http"));
  CHECK_FALSE(parse_host_port("h:8o"));
  CHECK_FALSE(parse_host_port("h:+80"));
  CHECK_FALSE(parse_host_port("h:-1"));
  CHECK_FALSE(parse_host_port("h: 80"));
  CHECK_FALSE(parse_host_port("h:0x50"));
}

TEST_CASE("parse_host_port rejects bare IPv6 without brackets and says how to write it") {
  auto r = parse_host_port("::1:80");
  REQUIRE_FALSE(r);
  CHECK(r.error().message().find("[addr]:port") != std::string::npos);
  CHECK_FALSE(parse_host_port("2001:db8::1:443"));
}

TEST_CASE("parse_health accepts the four states and rejects others naming them") {
  CHECK(dynup::parse_health("passing").value() == Health::passing);
  CHECK(dynup::parse_health("warning").value() == Health::warning);
  CHECK(dynup::parse_health("critical").value() == Health::critical);
  CHECK(dynup::parse_health("unknown").value() == Health::unknown);
  auto r = dynup::parse_health("Passing");
  REQUIRE_FALSE(r);
  CHECK(r.error().code() == Errc::invalid_argument);
  CHECK(r.error().message().find("\"Passing\"") != std::string::npos);
  CHECK(r.error().message().find("passing, warning, critical, unknown") != std::string::npos);
}

TEST_CASE("health names round-trip through to_string and parse_health") {
  for (Health h : {Health::passing, Health::warning, Health::critical, Health::unknown})
    CHECK(dynup::parse_health(dynup::to_string(h)).value() == h);
}

TEST_CASE("peers compare equal only when every field matches") {
  dynup::Peer a;
  a.id = "a";
  a.host = "h";
  a.port = 1;
  dynup::Peer b = a;
  CHECK(a == b);
  b.meta["k"] = "v";
  CHECK(a != b);
  b = a;
  b.health = Health::critical;
  CHECK(a != b);
}

TEST_CASE("crc32c matches the standard check value") {
  CHECK(dynup::detail::crc32c("123456789") == 0xE3069283u);
  CHECK(dynup::detail::crc32c("") == 0u);
}

TEST_CASE("crc32c can be computed incrementally") {
  std::uint32_t part = dynup::detail::crc32c("12345");
  CHECK(dynup::detail::crc32c("6789", part) == 0xE3069283u);
}

TEST_CASE("crc32c changes when one byte changes") {
  CHECK(dynup::detail::crc32c("123456789") != dynup::detail::crc32c("123456788"));
}

TEST_CASE("ContentHash values are fixed across runs and platforms") {
  // Pinned values: snapshot comparisons and cross-process checks rely on them not drifting.
  dynup::detail::ContentHash empty;
  dynup::detail::ContentHash a;
  a.str("a");
  CHECK(empty.value() == 0x9ca066f1a4ab2eeaULL);
  CHECK(a.value() == 0x4439b422fab34a6fULL);
}

TEST_CASE("ContentHash length-prefixes strings so split points matter") {
  dynup::detail::ContentHash x, y;
  x.str("ab");
  x.str("c");
  y.str("a");
  y.str("bc");
  CHECK(x.value() != y.value());
}

TEST_CASE("ContentHash str equals u64 of the length followed by the bytes") {
  dynup::detail::ContentHash a, b;
  a.str("xyz");
  b.u64(3);
  b.bytes("xyz", 3);
  CHECK(a.value() == b.value());
}

TEST_CASE("ContentHash distinguishes inputs that differ in one byte or in length") {
  dynup::detail::ContentHash a, b, c;
  a.bytes("abcdefghij", 10);
  b.bytes("abcdefghik", 10);
  c.bytes("abcdefghij\0", 11);
  CHECK(a.value() != b.value());
  CHECK(a.value() != c.value());
}
