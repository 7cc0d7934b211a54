// Inputs the fuzz targets in fuzz/ found, minimized by hand, each with the property it
// broke. Each input is also a seed: fuzz/corpus/<target>/regression-*.
#include <dynup/source/consul.hpp>

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
