// Inputs the fuzz targets in fuzz/ found, minimized by hand, each with the property it
// broke. Each input is also a seed: fuzz/corpus/<target>/regression-*.
#include <dynup/detail/crc32.hpp>
#include <dynup/detail/utf8.hpp>
#include <dynup/peer_json.hpp>
#include <dynup/snapshot_file.hpp>
#include <dynup/source/consul.hpp>
#include <dynup/source/etcd.hpp>
#include <dynup/source/spec.hpp>
#include <dynup/watch/any.hpp>

#include <support/text.hpp>

#include <doctest/doctest.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>

using dynup::Errc;
using dynup_test::contains;

namespace {

// A snapshot file with a correct header for `payload`, as save_snapshot writes it.
std::string snapshot_file(const std::string& payload) {
  char header[96];
  std::snprintf(header, sizeof header, "dynup-snapshot 1 %zu %08x\n", payload.size(),
                static_cast<unsigned>(dynup::detail::crc32c(payload)));
  return header + payload;
}

std::string payload_saved_at(const std::string& ms) {
  return R"({"version":1,"index":2,"peers":["10.0.0.1:80"],"saved_at":"x","saved_at_ms":)" + ms + "}";
}

} // namespace

// fuzz_consul: a 200 body that is not JSON was quoted by the parser's "last read: '…'".
TEST_CASE("consul: a reply that is not JSON is reported without quoting a token it echoes") {
  const std::string token = "s3cr3t-70k3n-4d2a";
  auto src = dynup::ConsulSource::from_spec("consul://127.0.0.1:8500/health/api?token=" + token);
  REQUIRE(src);
  dynup::HttpResponse reply;
  reply.status = 200;
  reply.body = R"({"Error":"ACL not found for token )" + token; // cut short: an unterminated string
  auto r = src->decode(reply);
  REQUIRE_FALSE(r);
  CHECK(r.error().code() == Errc::parse_error);
  CHECK(contains(r.error().message(), "invalid JSON"));
  CHECK(contains(r.error().message(), "missing closing quote"));
  CHECK_FALSE(contains(r.error().message(), "s3cr3t"));
}

// fuzz_etcd: the id came from a key name with bytes that are not UTF-8; to_json wrote them
// as U+FFFD, so the set did not read back (two such keys even became duplicate ids).
TEST_CASE("etcd: a key name that is not UTF-8 does not become a peer id") {
  auto src = dynup::EtcdSource::from_spec("etcd://127.0.0.1:2379/u/a/");
  REQUIRE(src);
  dynup::EtcdRange range;
  range.revision = 3;
  range.kvs = {{"/u/a/\xff", "10.0.0.1:80", 2},
               {"/u/a/\xfe", "10.0.0.2:80", 2},
               {"/u/a/\xfd", R"({"id":"explicit","host":"10.0.0.3","port":80})", 3},
               {"/u/a/web-\xc3\xa9", "10.0.0.4:80", 3}};
  dynup::EtcdState state;
  auto skipped = src->load(state, range);
  REQUIRE(skipped.size() == 2);
  CHECK(contains(skipped[0], "not UTF-8"));
  CHECK(contains(skipped[1], "not UTF-8"));
  auto peers = src->peers(state);
  REQUIRE(peers);
  REQUIRE(peers->set.size() == 2);
  CHECK(peers->set.find("explicit") != nullptr);
  CHECK(peers->set.find("web-\xc3\xa9") != nullptr);
  auto back = dynup::parse_peer_set(dynup::to_json(peers->set));
  REQUIRE_MESSAGE(back, back.error().message());
  CHECK(back->same_content(peers->set));
}

TEST_CASE("is_utf8 refuses overlong forms, surrogates, code points above U+10FFFF and cut sequences") {
  using dynup::detail::is_utf8;
  CHECK(is_utf8(""));
  CHECK(is_utf8("plain ascii"));
  CHECK(is_utf8("\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80\xf4\x8f\xbf\xbf")); // é € 😀 U+10FFFF
  for (const char* bad : {"\xff", "\x80", "\xc0\xaf", "\xc1\xbf", "\xe0\x80\xaf", "\xed\xa0\x80", "\xf0\x80\x80\xaf",
                          "\xf4\x90\x80\x80", "\xf5\x80\x80\x80", "\xc3", "\xe2\x82", "\xc3\x28"})
    CHECK_MESSAGE(!is_utf8(bad), bad);
}

// fuzz_snapshot: saved_at_ms beyond what system_clock holds (years 1677..2262) overflowed
// the conversion to nanoseconds (UBSan: signed integer overflow in <chrono>).
TEST_CASE("snapshot: a saved_at_ms system_clock cannot hold is refused as corrupt") {
  for (const char* ms : {"17000000000123", "9223372036854775807", "-9223372036854775808", "18446744073709551615"}) {
    auto r = dynup::decode_snapshot(snapshot_file(payload_saved_at(ms)));
    REQUIRE_FALSE_MESSAGE(r, ms);
    CHECK(r.error().code() == Errc::corrupt);
    CHECK(contains(r.error().message(), "saved_at_ms"));
  }
  using std::chrono::milliseconds;
  const auto max_ms =
      std::chrono::duration_cast<milliseconds>(std::chrono::system_clock::duration::max()).count();
  auto last = dynup::decode_snapshot(snapshot_file(payload_saved_at(std::to_string(max_ms))));
  REQUIRE_MESSAGE(last, last.error().message());
  CHECK(std::chrono::duration_cast<milliseconds>(last->saved_at.time_since_epoch()).count() == max_ms);
}

// fuzz_spec: a host with ':' outside brackets (or a stray bracket) parsed, and describe()
// then bracketed it into a spec that did not parse back.
TEST_CASE("spec: a host with ':' or a bracket outside [IPv6] is refused, so describe() parses back") {
  for (const char* text : {"consul://x]:1:8500/health/api", "consul://::1:8500/health/api", "etcd://a[b:2379/u/",
                           "consul://[a[b]:8500/health/api"}) {
    auto r = dynup::parse_source_spec(text);
    REQUIRE_FALSE_MESSAGE(r, text);
    CHECK(r.error().code() == Errc::invalid_argument);
    CHECK_MESSAGE(contains(r.error().message(), "write IPv6 as [addr]:port"), r.error().message());
  }
  auto v6 = dynup::ConsulSource::from_spec("consul://[::1]:8500/health/api");
  REQUIRE(v6);
  auto again = dynup::ConsulSource::from_spec(v6->describe());
  REQUIRE_MESSAGE(again, again.error().message());
  CHECK(again->describe() == v6->describe());
}

// fuzz_spec: parse_source_spec quoted the whole spec in its errors, so an etcd:// spec with
// a token= (and so a bad port, say) showed it; ConsulSource alone redacted it afterwards.
TEST_CASE("spec: parse errors quote the spec with its token redacted, whatever the scheme") {
  for (const char* text : {"etcd://h:99999/u/?token=s3cr3t-70k3n", "consul://h:99999/health/api?token=s3cr3t-70k3n",
                           "consul://h/health/api?tag=%zz&tok%65n=s3cr3t-70k3n"}) {
    auto parsed = dynup::parse_source_spec(text);
    REQUIRE_FALSE(parsed);
    CHECK(contains(parsed.error().message(), "=redacted"));
    CHECK_FALSE(contains(parsed.error().message(), "s3cr3t"));
    auto valid = dynup::Watcher::validate(text);
    REQUIRE_FALSE(valid);
    CHECK_FALSE(contains(valid.error().message(), "s3cr3t"));
  }
  auto etcd = dynup::EtcdSource::from_spec("etcd://h:99999/u/?token=s3cr3t-70k3n");
  REQUIRE_FALSE(etcd);
  CHECK_FALSE(contains(etcd.error().message(), "s3cr3t"));
}

// fuzz_spec: the "scheme" is the text before the first ':', which for a spec missing its
// "://" can run into the query; the unknown-scheme error quoted it, token and all.
TEST_CASE("spec: text before ':' that is no scheme name is not quoted as a scheme") {
  const char* text = "consul//h/health/api?token=s3cr3t-70k3n&near=a:b";
  auto valid = dynup::Watcher::validate(text);
  REQUIRE_FALSE(valid);
  CHECK(valid.error().code() == Errc::invalid_argument);
  CHECK(contains(valid.error().message(), "expected scheme://"));
  CHECK_FALSE(contains(valid.error().message(), "s3cr3t"));
  auto parsed = dynup::parse_source_spec(text);
  REQUIRE_FALSE(parsed);
  CHECK(contains(parsed.error().message(), "expected scheme://"));
  CHECK_FALSE(contains(parsed.error().message(), "s3cr3t"));
  // A real scheme name is still named.
  auto zk = dynup::Watcher::validate("zk://h/p?token=s3cr3t-70k3n");
  REQUIRE_FALSE(zk);
  CHECK(zk.error().code() == Errc::unsupported);
  CHECK(contains(zk.error().message(), "unknown scheme \"zk\""));
  CHECK_FALSE(contains(zk.error().message(), "s3cr3t"));
}
