// Inputs the fuzz targets in fuzz/ found, minimized by hand, each with the property it
// broke. Each input is also a seed: fuzz/corpus/<target>/regression-*.
#include <dynup/detail/utf8.hpp>
#include <dynup/peer_json.hpp>
#include <dynup/source/consul.hpp>
#include <dynup/source/etcd.hpp>

#include <support/text.hpp>

#include <doctest/doctest.h>

#include <string>

using dynup::Errc;
using dynup_test::contains;

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
