#include <dynup/peer_json.hpp>
#include <dynup/source/consul.hpp>

#include <support/text.hpp>

#include <doctest/doctest.h>

#include <stdlib.h>

#include <chrono>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

using dynup::ConsulSource;
using dynup::Decoded;
using dynup::Errc;
using dynup::Health;
using dynup::HttpRequest;
using dynup::HttpResponse;
using dynup::Peer;
using namespace std::chrono_literals;

namespace {

using dynup_test::contains;
std::string fixture(const std::string& name) {
  std::string path = std::string(DYNUP_FIXTURES_DIR) + "/consul/" + name;
  std::ifstream in(path, std::ios::binary);
  REQUIRE_MESSAGE(in.good(), "cannot open ", path);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

ConsulSource source(const std::string& spec) {
  auto r = ConsulSource::from_spec(spec);
  REQUIRE_MESSAGE(r.ok(), spec, " -> ", r.error().message());
  return std::move(r).value();
}

dynup::Error spec_error(const std::string& spec) {
  auto r = ConsulSource::from_spec(spec);
  REQUIRE_FALSE_MESSAGE(r.ok(), spec);
  return r.error();
}

HttpResponse reply(int status, std::string body, std::string index = "42",
                   std::string header_name = "X-Consul-Index") {
  HttpResponse r;
  r.status = status;
  r.body = std::move(body);
  if (!index.empty()) r.headers.emplace_back(std::move(header_name), std::move(index));
  r.headers.emplace_back("Content-Type", "application/json");
  return r;
}

Decoded decoded(const ConsulSource& src, const HttpResponse& r) {
  auto d = src.decode(r);
  REQUIRE_MESSAGE(d.ok(), d.error().message());
  return std::move(d).value();
}

const Peer& peer(const Decoded& d, const std::string& id) {
  const Peer* p = d.set.find(id);
  REQUIRE_MESSAGE(p != nullptr, "no peer \"", id, "\" in ", dynup::to_json(d.set));
  return *p;
}

std::string query_of(const HttpRequest& r) {
  auto q = r.target.find('?');
  return q == std::string::npos ? std::string() : r.target.substr(q + 1);
}

// Test-side encoder, so KV values can be written as the JSON they hold.
std::string b64(const std::string& in) {
  static const char* a = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  std::size_t i = 0;
  for (; i + 2 < in.size(); i += 3) {
    unsigned v = (unsigned char)in[i] << 16 | (unsigned char)in[i + 1] << 8 | (unsigned char)in[i + 2];
    out += {a[v >> 18], a[(v >> 12) & 63], a[(v >> 6) & 63], a[v & 63]};
  }
  if (in.size() - i == 1) {
    unsigned v = (unsigned char)in[i] << 16;
    out += {a[v >> 18], a[(v >> 12) & 63], '=', '='};
  } else if (in.size() - i == 2) {
    unsigned v = (unsigned char)in[i] << 16 | (unsigned char)in[i + 1] << 8;
    out += {a[v >> 18], a[(v >> 12) & 63], a[(v >> 6) & 63], '='};
  }
  return out;
}

std::string kv_entry(const std::string& key, const std::string& value_json) {
  return R"({"LockIndex":0,"Key":")" + key + R"(","Flags":0,"Value":)" + value_json +
         R"(,"CreateIndex":5,"ModifyIndex":7})";
}
std::string kv_value(const std::string& key, const std::string& plain) { return kv_entry(key, "\"" + b64(plain) + "\""); }

// One /v1/health/service entry with the given checks and Service fields.
std::string health_entry(const std::string& node, const std::string& node_addr, const std::string& service_fields,
                         const std::string& checks = R"([{"CheckID":"serfHealth","Status":"passing"}])") {
  return R"({"Node":{"Node":")" + node + R"(","Address":")" + node_addr + R"(","Datacenter":"dc1"},"Service":{)" +
         service_fields + R"(},"Checks":)" + checks + "}";
}

} // namespace

static_assert(std::is_same_v<decltype(std::declval<const ConsulSource&>().decode(std::declval<const HttpResponse&>())),
                             dynup::Result<Decoded>>);
static_assert(std::is_same_v<decltype(std::declval<const ConsulSource&>().request(0, 1ms)), HttpRequest>);
static_assert(std::is_same_v<decltype(std::declval<const ConsulSource&>().describe()), std::string>);

// ---- fixtures (tests/fixtures/consul, see SOURCES.txt) ----

TEST_CASE("consul fixture: brpc health listing (legacy shape) becomes two node/service-id peers") {
  auto src = source("consul://127.0.0.1:8500/health/qs_show_leaf");
  Decoded d = decoded(src, reply(200, fixture("health_service_brpc_qs_show_leaf.json"), "1"));
  CHECK(d.index == 1);
  CHECK(d.skipped.empty());
  REQUIRE(d.set.size() == 2);
  const Peer& a = peer(d, "sh-qs-10.121.36.189/10.121.36.189_8003_qs_show_leaf");
  CHECK(a.host == "10.121.36.189");
  CHECK(a.port == 8003);
  CHECK(a.weight == 1); // no Weights in this Consul version
  CHECK(a.tags == std::vector<std::string>{"1"});
  CHECK(a.meta.empty()); // no Service.Meta; Node.Meta is not copied
  CHECK(a.zone.empty());
  CHECK(a.health == Health::passing);
  const Peer& b = peer(d, "sh-qs-10.121.36.190/10.121.36.190_8003_qs_show_leaf");
  CHECK(b.host == "10.121.36.190");
  CHECK(b.tags == std::vector<std::string>{"2"});
  CHECK(d.set.source_index() == 1);
}

TEST_CASE("consul fixture: an empty Service.Address falls back to Node.Address (rule 9)") {
  auto src = source("consul://127.0.0.1:8500/health/test?zone_meta=rack_name");
  Decoded d = decoded(src, reply(200, fixture("health_service_prometheus_empty_service_address.json"), "12"));
  CHECK(d.skipped.empty());
  REQUIRE(d.set.size() == 1);
  const Peer& p = peer(d, "node1/test");
  CHECK(p.host == "1.1.1.1");
  CHECK(p.port == 3341);
  CHECK(p.weight == 1);
  CHECK(p.tags == std::vector<std::string>{"tag1"});
  CHECK(p.meta == std::map<std::string, std::string>{{"environment", "staging"}, {"version", "1.0.0"}});
  CHECK(p.zone == "2304"); // Node.Meta.rack_name, as zone_meta asked
  CHECK(p.health == Health::passing); // a truncated Check object is enough
}

TEST_CASE("consul fixture: the docs sample uses Weights.Passing and tolerates TaggedAddresses objects") {
  auto src = source("consul://127.0.0.1:8500/health/my-service");
  Decoded d = decoded(src, reply(200, fixture("health_service_consul_docs.json")));
  CHECK(d.index == 42);
  REQUIRE(d.set.size() == 1);
  const Peer& p = peer(d, "foobar/redis");
  CHECK(p.host == "10.1.10.12"); // Service.Address, not the wan TaggedAddress
  CHECK(p.port == 8000);
  CHECK(p.weight == 10);
  CHECK(p.tags == std::vector<std::string>{"primary"});
  CHECK(p.meta == std::map<std::string, std::string>{{"redis_version", "4.0"}});
  CHECK(p.health == Health::passing);
}

// /v1/catalog/services is a service -> tags map, not an instance listing: pointed at it
// by mistake (a proxy rewriting paths, say), the catalog decoder must say so, not
// publish an empty set.
TEST_CASE("consul fixture: the /v1/catalog/services map is a parse error for the catalog decoder") {
  auto src = source("consul://127.0.0.1:8500/catalog/test");
  auto r = src.decode(reply(200, fixture("catalog_services_prometheus.json")));
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().code() == Errc::parse_error);
  CHECK(contains(r.error().message(), "expected a JSON array of service instances, got object"));
  CHECK(contains(r.error().message(), "/v1/catalog/services"));
}

TEST_CASE("consul fixture: a KV key with LockIndex and Session that is the prefix itself is ignored") {
  auto src = source("consul://127.0.0.1:8500/kv/zip");
  Decoded d = decoded(src, reply(200, fixture("kv_get_single_consul_docs.json"), "200"));
  CHECK(d.set.empty());
  CHECK(d.skipped.empty());
  CHECK(d.index == 200);
}

TEST_CASE("consul fixture: a legacy KV listing without LockIndex decodes; non host:port keys are skipped with reasons") {
  auto src = source("consul://127.0.0.1:8500/kv/web");
  Decoded d = decoded(src, reply(200, fixture("kv_recurse_consul_getting_started_legacy.json"), "99"));
  CHECK(d.set.empty());
  REQUIRE(d.skipped.size() == 3);
  CHECK(contains(d.skipped[0], "web/key1"));
  CHECK(contains(d.skipped[0], "not host:port"));
  CHECK(contains(d.skipped[2], "web/sub/key3"));
  CHECK(contains(d.skipped[2], "nested key"));
}

// ---- requests ----

TEST_CASE("consul request: the first request has no index or wait (rule 1)") {
  auto req = source("consul://127.0.0.1:8500/health/api").request(0, 5min);
  CHECK(req.method == "GET");
  CHECK(req.target == "/v1/health/service/api?passing");
  CHECK(req.headers.empty());
  auto kv = source("consul://127.0.0.1:8500/kv/upstreams/api").request(0, 5min);
  CHECK(kv.target == "/v1/kv/upstreams/api/?recurse");
  auto cat = source("consul://127.0.0.1:8500/catalog/api").request(0, 5min);
  CHECK(cat.target == "/v1/catalog/service/api");
}

TEST_CASE("consul request: later requests send index and wait, capped at 10 minutes (rule 2)") {
  auto src = source("consul://127.0.0.1:8500/health/api");
  CHECK(src.request(7, 5min).target == "/v1/health/service/api?passing&index=7&wait=300s");
  CHECK(src.request(7, 1h).target == "/v1/health/service/api?passing&index=7&wait=600s");
  CHECK(src.request(7, 1500ms).target == "/v1/health/service/api?passing&index=7&wait=1500ms");
  CHECK(src.request(18446744073709551615ull, 0ms).target ==
        "/v1/health/service/api?passing&index=18446744073709551615");
}

TEST_CASE("consul request: passing is a bare flag and passing=0 omits it (rule 10)") {
  CHECK(query_of(source("consul://h/health/api").request(0, 1s)) == "passing");
  CHECK(query_of(source("consul://h/health/api?passing=1").request(0, 1s)) == "passing");
  CHECK(query_of(source("consul://h/health/api?passing").request(0, 1s)) == "passing");
  for (const char* off : {"consul://h/health/api?passing=0", "consul://h/health/api?passing=false"}) {
    auto q = query_of(source(off).request(0, 1s));
    CHECK_FALSE(contains(q, "passing"));
  }
}

TEST_CASE("consul request: tag repeats, and names and values are URL-encoded") {
  auto src = source("consul://h:8500/health/my%20svc?tag=v2&tag=a%26b&dc=dc%2F1&near=_agent"
                    "&filter=Service.Meta.env%20%3D%3D%20%22prod%22");
  CHECK(src.request(3, 10s).target ==
        "/v1/health/service/my%20svc?passing&tag=v2&tag=a%26b&dc=dc%2F1"
        "&filter=Service.Meta.env%20%3D%3D%20%22prod%22&near=_agent&index=3&wait=10s");
  auto kv = source("consul://h/kv/up%20streams/api/");
  CHECK(kv.request(0, 1s).target == "/v1/kv/up%20streams/api/?recurse");
}

TEST_CASE("consul request: stale and consistent are bare flags and never sent together (rule 12)") {
  CHECK(query_of(source("consul://h/catalog/api?stale=1").request(0, 1s)) == "stale");
  CHECK(query_of(source("consul://h/catalog/api?consistent").request(0, 1s)) == "consistent");
  CHECK(query_of(source("consul://h/catalog/api?stale=0").request(0, 1s)).empty());
  auto e = spec_error("consul://h/health/api?stale=1&consistent=1");
  CHECK(e.code() == Errc::invalid_argument);
  CHECK(contains(e.message(), "stale and consistent"));
  // Both false is fine: neither is sent.
  CHECK(query_of(source("consul://h/kv/p?stale=0&consistent=0").request(0, 1s)) == "recurse");
}

TEST_CASE("consul token is sent only as X-Consul-Token, never in the URL, describe() or errors (rule 12)") {
  const std::string token = "s3cr3t-70k3n-b9d2";
  auto src = source("consul://127.0.0.1:8500/health/api?dc=dc1&token=" + token);
  for (std::uint64_t index : {0ull, 9ull}) {
    HttpRequest req = src.request(index, 30s);
    CHECK_FALSE(contains(req.target, token));
    REQUIRE(req.headers.size() == 1);
    CHECK(req.headers[0].first == "X-Consul-Token");
    CHECK(req.headers[0].second == token);
  }
  CHECK_FALSE(contains(src.describe(), token));
  CHECK_FALSE(contains(src.describe(), "token"));
  // Even when a proxy echoes the token in its error body.
  for (int status : {403, 500, 400, 404, 429, 302}) {
    auto r = src.decode(reply(status, "denied for token " + token));
    REQUIRE_FALSE(r.ok());
    CHECK_FALSE(contains(r.error().message(), token));
  }
  // And in spec errors, whether the spec fails to parse or to validate.
  auto parse = spec_error("consul://h:99999/health/api?token=" + token);
  CHECK(contains(parse.message(), "token=redacted"));
  CHECK_FALSE(contains(parse.message(), token));
  auto invalid = spec_error("consul://h/health/api?token=" + token + "&bogus=1");
  CHECK_FALSE(contains(invalid.message(), token));
  auto twice = spec_error("consul://h/health/api?token=" + token + "&token=" + token);
  CHECK_FALSE(contains(twice.message(), token));
}

TEST_CASE("consul token_env reads the token from the environment once, at from_spec") {
  ::setenv("DYNUP_TEST_CONSUL_TOKEN", "env-token-77", 1);
  auto src = source("consul://h/kv/upstreams/api?token_env=DYNUP_TEST_CONSUL_TOKEN");
  ::unsetenv("DYNUP_TEST_CONSUL_TOKEN");
  auto req = src.request(0, 1s);
  REQUIRE(req.headers.size() == 1);
  CHECK(req.headers[0] == std::pair<std::string, std::string>("X-Consul-Token", "env-token-77"));
  CHECK(src.describe() == "consul://h:8500/kv/upstreams/api?token_env=DYNUP_TEST_CONSUL_TOKEN");
  CHECK_FALSE(contains(src.describe(), "env-token-77"));

  auto unset = spec_error("consul://h/kv/upstreams/api?token_env=DYNUP_TEST_CONSUL_TOKEN");
  CHECK(contains(unset.message(), "DYNUP_TEST_CONSUL_TOKEN is not set"));
  auto both = spec_error("consul://h/kv/upstreams/api?token=x&token_env=DYNUP_TEST_CONSUL_TOKEN");
  CHECK(contains(both.message(), "not both"));
}

TEST_CASE("consul describe() is the canonical spec without the token") {
  CHECK(source("consul://127.0.0.1/health/api").describe() == "consul://127.0.0.1:8500/health/api");
  CHECK(source("consul://[::1]:8501/catalog/api?near=_agent&tag=b&stale&tag=a&token=t").describe() ==
        "consul://[::1]:8501/catalog/api?tag=b&tag=a&near=_agent&stale");
  CHECK(source("consul://h:1/health/my%20svc?passing=0&zone_meta=az&filter=a%20b&dc=eu").describe() ==
        "consul://h:1/health/my%20svc?passing=0&dc=eu&filter=a%20b&zone_meta=az");
  auto src = source("consul://[2001:db8::1]:8500/health/api");
  CHECK(src.host() == "2001:db8::1");
  CHECK(src.port() == 8500);
  CHECK(src.mode() == ConsulSource::Mode::health);
}

// ---- decode: index and errors ----

TEST_CASE("consul decode: X-Consul-Index is read whatever its case") {
  auto src = source("consul://h/health/api");
  CHECK(decoded(src, reply(200, "[]", "123", "x-consul-index")).index == 123);
  CHECK(decoded(src, reply(200, "[]", "18446744073709551615", "X-CONSUL-INDEX")).index == 18446744073709551615ull);
}

TEST_CASE("consul decode: a missing, zero or unparsable X-Consul-Index decodes as 0 (rule 5)") {
  auto src = source("consul://h/health/api");
  CHECK(decoded(src, reply(200, "[]", "")).index == 0);
  for (const char* bad : {"0", "-5", "12abc", "abc", "18446744073709551616", " "})
    CHECK_MESSAGE(decoded(src, reply(200, "[]", bad)).index == 0, bad);
}

TEST_CASE("consul decode: garbage JSON is a parse error, not an exception") {
  auto src = source("consul://h/health/api");
  for (const char* body : {"", "[{\"Node\":", "<html>502</html>", "nul", "[1,2,]"}) {
    auto r = src.decode(reply(200, body));
    REQUIRE_FALSE_MESSAGE(r.ok(), body);
    CHECK(r.error().code() == Errc::parse_error);
    CHECK(contains(r.error().message(), "GET /v1/health/service/api: invalid JSON"));
  }
  auto not_array = src.decode(reply(200, "\"hello\""));
  REQUIRE_FALSE(not_array.ok());
  CHECK(contains(not_array.error().message(), "expected a JSON array"));
}

TEST_CASE("consul decode: 403 is an ACL denial quoting the plain-text body (rules 7, 13)") {
  auto r = source("consul://h/health/api").decode(reply(403, "Permission denied: token with AccessorID 'x' lacks service:read"));
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().code() == Errc::unavailable);
  CHECK(contains(r.error().message(), "ACL permission denied"));
  CHECK(contains(r.error().message(), "403"));
  CHECK(contains(r.error().message(), "lacks service:read"));
}

TEST_CASE("consul decode: 5xx is unavailable with the plain-text body (rule 13)") {
  auto r = source("consul://h/catalog/api").decode(reply(500, "No cluster leader\n"));
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().code() == Errc::unavailable);
  CHECK(r.error().message() == "GET /v1/catalog/service/api: HTTP 500: \"No cluster leader\"");
}

TEST_CASE("consul decode: 429 says rate limited") {
  auto r = source("consul://h/health/api").decode(reply(429, "rate limit exceeded"));
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().code() == Errc::unavailable);
  CHECK(contains(r.error().message(), "rate limited"));
}

TEST_CASE("consul decode: 404 on health or catalog is an error naming the path") {
  for (const char* spec : {"consul://h/health/api", "consul://h/catalog/api"}) {
    auto r = source(spec).decode(reply(404, ""));
    REQUIRE_FALSE(r.ok());
    CHECK(r.error().code() == Errc::not_found);
    CHECK(contains(r.error().message(), "/service/api"));
    CHECK(contains(r.error().message(), "(empty body)"));
  }
}

TEST_CASE("consul decode: other statuses report status and a truncated one-line body") {
  auto src = source("consul://h/health/api?filter=bad");
  auto bad_request = src.decode(reply(400, "Failed to create boolexpr evaluator: 1:4 (3): no match found"));
  REQUIRE_FALSE(bad_request.ok());
  CHECK(bad_request.error().code() == Errc::invalid_argument);
  CHECK(contains(bad_request.error().message(), "boolexpr"));

  std::string huge(100000, 'x');
  auto r = src.decode(reply(302, "line1\r\nline2 " + huge));
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().code() == Errc::unavailable);
  CHECK(contains(r.error().message(), "HTTP 302"));
  CHECK(contains(r.error().message(), "line1  line2"));
  CHECK_FALSE(contains(r.error().message(), "\n"));
  CHECK(r.error().message().size() < 800);
  CHECK(contains(r.error().message(), "100013 bytes"));
}

// ---- health mode ----

TEST_CASE("consul health: a critical or maintenance check marks the instance critical (rule 10)") {
  auto src = source("consul://h/health/web?passing=0");
  std::string body = "[" +
                     health_entry("n1", "10.0.0.1", R"("ID":"web-1","Port":80)",
                                  R"([{"CheckID":"serfHealth","Status":"passing"},{"CheckID":"service:web-1","Status":"critical"}])") +
                     "," +
                     health_entry("n2", "10.0.0.2", R"("ID":"web-2","Port":80)",
                                  R"([{"CheckID":"_node_maintenance","Status":"critical"}])") +
                     "," +
                     health_entry("n3", "10.0.0.3", R"("ID":"web-3","Port":80)",
                                  R"([{"CheckID":"_service_maintenance:web-3","Status":"passing"}])") +
                     "," + health_entry("n4", "10.0.0.4", R"("ID":"web-4","Port":80)") + "," +
                     health_entry("n5", "10.0.0.5", R"("ID":"web-5","Port":80)", R"([{"CheckID":"x","Status":"odd"}])") +
                     "]";
  Decoded d = decoded(src, reply(200, body));
  REQUIRE(d.set.size() == 5);
  CHECK(peer(d, "n1/web-1").health == Health::critical);
  CHECK(peer(d, "n2/web-2").health == Health::critical);
  CHECK(peer(d, "n3/web-3").health == Health::critical);
  CHECK(peer(d, "n4/web-4").health == Health::passing);
  CHECK(peer(d, "n5/web-5").health == Health::unknown);
}

TEST_CASE("consul health: a warning instance takes Weights.Warning; a zero weight means no traffic") {
  auto src = source("consul://h/health/web?passing=0");
  const std::string warn = R"([{"CheckID":"service:x","Status":"warning"}])";
  std::string body =
      "[" + health_entry("n1", "10.0.0.1", R"("ID":"a","Port":80,"Weights":{"Passing":10,"Warning":3})", warn) + "," +
      health_entry("n2", "10.0.0.2", R"("ID":"b","Port":80,"Weights":{"Passing":10,"Warning":3})") + "," +
      health_entry("n3", "10.0.0.3", R"("ID":"c","Port":80,"Weights":{"Passing":5,"Warning":0})", warn) + "," +
      health_entry("n4", "10.0.0.4", R"("ID":"d","Port":80,"Weights":{"Passing":0,"Warning":0})") + "," +
      health_entry("n5", "10.0.0.5", R"("ID":"e","Port":80,"Weights":{"Passing":1000000})") + "," +
      health_entry("n6", "10.0.0.6", R"("ID":"f","Port":80,"Weights":{"Passing":"7"})", warn) + "]";
  Decoded d = decoded(src, reply(200, body));
  REQUIRE(d.set.size() == 6);
  CHECK(peer(d, "n1/a").health == Health::warning);
  CHECK(peer(d, "n1/a").weight == 3);
  CHECK(peer(d, "n2/b").health == Health::passing);
  CHECK(peer(d, "n2/b").weight == 10);
  CHECK(peer(d, "n3/c").health == Health::critical);
  CHECK(peer(d, "n3/c").weight == 5);
  CHECK(peer(d, "n4/d").health == Health::critical);
  CHECK(peer(d, "n4/d").weight == 1);
  CHECK(peer(d, "n5/e").weight == dynup::max_weight);
  CHECK(peer(d, "n6/f").weight == 1); // a non-integer weight reads as absent
  CHECK(peer(d, "n6/f").health == Health::warning);
}

TEST_CASE("consul health: absent or null Weights, Meta, Tags, TaggedAddresses and Checks are tolerated (rule 11)") {
  auto src = source("consul://h/health/web");
  std::string body = R"([
    {"Node":{"Node":"n1","Address":"10.0.0.1","TaggedAddresses":null,"Meta":null},
     "Service":{"ID":"a","Port":80,"Tags":null,"Meta":null,"Weights":null,"Address":null,
                "TaggedAddresses":{"lan":"10.0.0.1","wan":{"address":"1.2.3.4","port":80}},"Unknown":{"x":[1]}},
     "Checks":null,"Extra":true},
    {"Node":{"Node":"n2","Address":"10.0.0.2"},"Service":{"ID":"b","Port":81,"Tags":["t",7,null],"Meta":{"k":"v","n":1}}}
  ])";
  Decoded d = decoded(src, reply(200, body));
  CHECK(d.skipped.empty());
  REQUIRE(d.set.size() == 2);
  const Peer& a = peer(d, "n1/a");
  CHECK(a.host == "10.0.0.1");
  CHECK(a.weight == 1);
  CHECK(a.tags.empty());
  CHECK(a.meta.empty());
  CHECK(a.health == Health::passing);
  const Peer& b = peer(d, "n2/b");
  CHECK(b.tags == std::vector<std::string>{"t"});
  CHECK(b.meta == std::map<std::string, std::string>{{"k", "v"}});
}

TEST_CASE("consul health: an entry without address or port is skipped with a reason, the rest published") {
  auto src = source("consul://h/health/web");
  std::string body = "[" + health_entry("n1", "", R"("ID":"no-addr","Port":80,"Address":"")") + "," +
                     health_entry("n2", "10.0.0.2", R"("ID":"no-port","Port":0)") + "," +
                     health_entry("n3", "10.0.0.3", R"("ID":"big-port","Port":70000)") + "," +
                     health_entry("n4", "not a host!", R"("ID":"bad-host","Port":80)") + "," +
                     R"({"Node":{"Node":"n5"}})" + "," + R"(17)" + "," +
                     health_entry("n6", "10.0.0.6", R"("ID":"ok","Port":80)") + "]";
  Decoded d = decoded(src, reply(200, body));
  REQUIRE(d.set.size() == 1);
  CHECK(d.set[0].id == "n6/ok");
  REQUIRE(d.skipped.size() == 6);
  CHECK(contains(d.skipped[0], "n1/no-addr"));
  CHECK(contains(d.skipped[0], "no address"));
  CHECK(contains(d.skipped[1], "n2/no-port"));
  CHECK(contains(d.skipped[1], "Service.Port 0"));
  CHECK(contains(d.skipped[2], "Service.Port 70000"));
  CHECK(contains(d.skipped[3], "n4/bad-host"));
  CHECK(contains(d.skipped[3], "neither an IP address nor a valid DNS name"));
  CHECK(contains(d.skipped[4], "without a Service"));
}

TEST_CASE("consul health: an IPv6 Service.Address is canonicalized") {
  auto src = source("consul://h/health/web");
  std::string body = "[" + health_entry("n1", "10.0.0.1", R"("ID":"v6","Port":8080,"Address":"2001:DB8:0:0::10")") +
                     "," + health_entry("n2", "10.0.0.2", R"("ID":"v6b","Port":8080,"Address":"[fe80::1]")") + "]";
  Decoded d = decoded(src, reply(200, body));
  REQUIRE(d.set.size() == 2);
  CHECK(peer(d, "n1/v6").host == "2001:db8::10");
  CHECK(peer(d, "n2/v6b").host == "fe80::1");
  CHECK(dynup::host_port(peer(d, "n1/v6").host, 8080) == "[2001:db8::10]:8080");
}

TEST_CASE("consul health: zone comes from Service.Meta, then Node.Meta, under the zone_meta key") {
  std::string body = R"([
    {"Node":{"Node":"n1","Address":"10.0.0.1","Meta":{"zone":"node-zone","az":"a1"}},
     "Service":{"ID":"s","Port":80,"Meta":{"zone":"svc-zone"}}},
    {"Node":{"Node":"n2","Address":"10.0.0.2","Meta":{"zone":"node-zone"}},"Service":{"ID":"s","Port":80}}
  ])";
  Decoded d = decoded(source("consul://h/health/web"), reply(200, body));
  CHECK(peer(d, "n1/s").zone == "svc-zone");
  CHECK(peer(d, "n2/s").zone == "node-zone");
  Decoded az = decoded(source("consul://h/health/web?zone_meta=az"), reply(200, body));
  CHECK(peer(az, "n1/s").zone == "a1");
  CHECK(peer(az, "n2/s").zone.empty());
}

TEST_CASE("consul health: a repeated instance id is skipped, the first kept") {
  std::string body = "[" + health_entry("n1", "10.0.0.1", R"("ID":"s","Port":80)") + "," +
                     health_entry("n1", "10.0.0.2", R"("ID":"s","Port":81)") + "]";
  Decoded d = decoded(source("consul://h/health/web"), reply(200, body));
  REQUIRE(d.set.size() == 1);
  CHECK(d.set[0].port == 80);
  REQUIRE(d.skipped.size() == 1);
  CHECK(contains(d.skipped[0], "duplicate id"));
}

TEST_CASE("consul health: an empty listing is an empty set, not an error") {
  Decoded d = decoded(source("consul://h/health/web"), reply(200, "[]", "8"));
  CHECK(d.set.empty());
  CHECK(d.index == 8);
}

TEST_CASE("consul decode: skipped reasons are capped with a count") {
  std::string body = "[";
  for (int i = 0; i < 25; ++i) body += std::string(i ? "," : "") + health_entry("n" + std::to_string(i), "", R"("Port":80)");
  body += "]";
  Decoded d = decoded(source("consul://h/health/web"), reply(200, body));
  CHECK(d.set.empty());
  REQUIRE(d.skipped.size() == DYNUP_MAX_REPORTED_ERRORS + 1);
  CHECK(d.skipped.back() == "and " + std::to_string(25 - DYNUP_MAX_REPORTED_ERRORS) + " more entries skipped");
}

// ---- catalog mode ----

TEST_CASE("consul catalog: ServiceAddress else Address, ServicePort, tags, meta, weights; health unknown") {
  // Shape from /v1/catalog/service (api-docs/catalog.mdx), TaggedAddresses in both forms.
  std::string body = R"([
    {"ID":"40e4a748","Node":"foobar","Address":"192.168.10.10","Datacenter":"dc1",
     "TaggedAddresses":{"lan":"192.168.10.10","wan":"10.0.10.10"},"NodeMeta":{"somekey":"somevalue","zone":"z-node"},
     "ServiceID":"32a2a47f7992:nodea:5000","ServiceName":"foobar","ServiceTags":["tacos"],
     "ServiceAddress":"172.17.0.3","ServicePort":5000,"ServiceMeta":{"foobar_meta_value":"baz"},
     "ServiceTaggedAddresses":{"lan":{"address":"172.17.0.3","port":5000}},
     "ServiceWeights":{"Passing":4,"Warning":1},"ServiceEnableTagOverride":false,"CreateIndex":51,"ModifyIndex":51},
    {"Node":"nodeb","Address":"192.168.10.11","ServiceID":"b","ServiceAddress":"","ServicePort":5001,
     "ServiceTags":null,"ServiceMeta":null},
    {"Node":"nodec","Address":"192.168.10.12","ServiceID":"c","ServicePort":5002,"ServiceWeights":{"Passing":0}},
    {"Node":"noded","Address":"","ServiceID":"d","ServicePort":5003}
  ])";
  auto src = source("consul://h/catalog/foobar");
  Decoded d = decoded(src, reply(200, body, "51"));
  REQUIRE(d.set.size() == 3);
  const Peer& a = peer(d, "foobar/32a2a47f7992:nodea:5000");
  CHECK(a.host == "172.17.0.3");
  CHECK(a.port == 5000);
  CHECK(a.weight == 4);
  CHECK(a.tags == std::vector<std::string>{"tacos"});
  CHECK(a.meta == std::map<std::string, std::string>{{"foobar_meta_value", "baz"}});
  CHECK(a.zone == "z-node");
  CHECK(a.health == Health::unknown);
  const Peer& b = peer(d, "nodeb/b");
  CHECK(b.host == "192.168.10.11");
  CHECK(b.weight == 1);
  CHECK(b.health == Health::unknown);
  CHECK(peer(d, "nodec/c").health == Health::critical); // Passing 0: no traffic
  REQUIRE(d.skipped.size() == 1);
  CHECK(contains(d.skipped[0], "noded/d"));
  CHECK(contains(d.skipped[0], "ServiceAddress and Address are empty"));
}

// ---- KV mode (nginx-upsync layout) ----

TEST_CASE("consul kv: a missing, null or empty value means the defaults") {
  std::string body = "[" + kv_entry("upstreams/api/10.0.0.1:80", "null") + "," +
                     R"({"Key":"upstreams/api/10.0.0.2:80"})" + "," + kv_entry("upstreams/api/10.0.0.3:80", "\"\"") +
                     "," + kv_value("upstreams/api/10.0.0.4:80", " \n") + "," +
                     kv_value("upstreams/api/10.0.0.5:80", "{}") + "]";
  Decoded d = decoded(source("consul://h/kv/upstreams/api"), reply(200, body, "77"));
  CHECK(d.skipped.empty());
  REQUIRE(d.set.size() == 5);
  CHECK(d.index == 77);
  for (const Peer& p : d.set) {
    CHECK(p.id == p.host + ":80");
    CHECK(p.weight == 1);
    CHECK_FALSE(p.backup);
    CHECK(p.health == Health::passing);
    CHECK(p.meta.empty());
  }
}

TEST_CASE("consul kv: weight, down, backup, and max_fails/fail_timeout carried in meta") {
  std::string body =
      "[" + kv_value("upstreams/api/10.0.0.1:8080", R"({"weight":5,"max_fails":2,"fail_timeout":10,"down":0,"backup":0})") +
      "," + kv_value("upstreams/api/10.0.0.2:8080", R"({"down":1})") + "," +
      kv_value("upstreams/api/10.0.0.3:8080", R"({"backup":1,"weight":2})") + "," +
      kv_value("upstreams/api/[2001:db8::7]:8080", R"({"down":true,"backup":false,"future_key":"x"})") + "]";
  Decoded d = decoded(source("consul://h/kv/upstreams/api/"), reply(200, body));
  CHECK(d.skipped.empty());
  REQUIRE(d.set.size() == 4);
  const Peer& a = peer(d, "10.0.0.1:8080");
  CHECK(a.weight == 5);
  CHECK(a.health == Health::passing);
  CHECK(a.meta == std::map<std::string, std::string>{{"fail_timeout", "10"}, {"max_fails", "2"}});
  CHECK(peer(d, "10.0.0.2:8080").health == Health::critical);
  CHECK(peer(d, "10.0.0.3:8080").backup);
  CHECK(peer(d, "10.0.0.3:8080").weight == 2);
  const Peer& v6 = peer(d, "[2001:db8::7]:8080");
  CHECK(v6.host == "2001:db8::7");
  CHECK(v6.health == Health::critical);
}

TEST_CASE("consul kv: an invalid value skips that one peer with a reason, the rest are published") {
  std::string body = "[" + kv_value("up/10.0.0.1:80", "{\"weight\":") + "," +
                     kv_value("up/10.0.0.2:80", R"({"weight":"3"})") + "," + kv_value("up/10.0.0.3:80", R"({"weight":0})") +
                     "," + kv_value("up/10.0.0.4:80", R"({"down":2})") + "," +
                     kv_value("up/10.0.0.5:80", R"({"max_fails":-1})") + "," + kv_value("up/10.0.0.6:80", "[1]") + "," +
                     kv_value("up/10.0.0.7:80", R"({"weight":1000000})") + "," + kv_entry("up/10.0.0.8:80", "5") +
                     "," + kv_value("up/10.0.0.9:80", R"({"weight":3})") + "]";
  Decoded d = decoded(source("consul://h/kv/up"), reply(200, body));
  REQUIRE(d.set.size() == 1);
  CHECK(d.set[0].id == "10.0.0.9:80");
  CHECK(d.set[0].weight == 3);
  REQUIRE(d.skipped.size() == 8);
  CHECK(contains(d.skipped[0], "up/10.0.0.1:80"));
  CHECK(contains(d.skipped[0], "not JSON"));
  CHECK(contains(d.skipped[1], "weight \"3\""));
  CHECK(contains(d.skipped[2], "weight 0 is not an integer 1..65535"));
  CHECK(contains(d.skipped[3], "down 2"));
  CHECK(contains(d.skipped[4], "max_fails -1"));
  CHECK(contains(d.skipped[5], "not an object"));
  CHECK(contains(d.skipped[6], "weight 1000000"));
  CHECK(contains(d.skipped[7], "not base64 text"));
}

TEST_CASE("consul kv: base64 values are decoded; invalid base64 skips only that key") {
  // "eyJ3ZWlnaHQiOjd9" is {"weight":7}.
  std::string body = "[" + kv_entry("up/10.0.0.1:80", "\"eyJ3ZWlnaHQiOjd9\"") + "," +
                     kv_entry("up/10.0.0.2:80", "\"eyJ3ZWlnaHQiOjd9!\"") + "," +
                     kv_entry("up/10.0.0.3:80", "\"e=J3\"") + "," + kv_entry("up/10.0.0.4:80", "\"eyJ\"") + "]";
  Decoded d = decoded(source("consul://h/kv/up"), reply(200, body));
  REQUIRE(d.set.size() == 1);
  CHECK(d.set[0].weight == 7);
  REQUIRE(d.skipped.size() == 3);
  for (const auto& why : d.skipped) CHECK(contains(why, "not valid base64"));
  CHECK(contains(d.skipped[0], "up/10.0.0.2:80"));
}

TEST_CASE("consul kv: 404 is an empty set carrying the index, not an error (rule 8)") {
  auto src = source("consul://h/kv/upstreams/api");
  Decoded d = decoded(src, reply(404, "", "1"));
  CHECK(d.set.empty());
  CHECK(d.index == 1);
  CHECK(d.set.source_index() == 1);
  CHECK(d.skipped.empty());
}

TEST_CASE("consul kv: the prefix key and directory keys are ignored; keys elsewhere are reported") {
  std::string body = "[" + kv_entry("upstreams/api", "null") + "," + kv_entry("upstreams/api/", "null") + "," +
                     kv_entry("upstreams/api/old/", "null") + "," + kv_value("upstreams/api/10.0.0.1:80", "") + "," +
                     kv_value("upstreams/api2/10.0.0.2:80", "") + "," + kv_value("upstreams/api/10.0.0.3", "") + "]";
  Decoded d = decoded(source("consul://h/kv/upstreams/api"), reply(200, body));
  REQUIRE(d.set.size() == 1);
  CHECK(d.set[0].id == "10.0.0.1:80");
  REQUIRE(d.skipped.size() == 2);
  CHECK(contains(d.skipped[0], "not under \"upstreams/api/\""));
  CHECK(contains(d.skipped[1], "upstreams/api/10.0.0.3"));
}

// ---- spec errors ----

TEST_CASE("consul spec: an unknown mode, a missing service or prefix are errors saying what is expected") {
  auto mode = spec_error("consul://h:8500/services/api");
  CHECK(mode.code() == Errc::invalid_argument);
  CHECK(contains(mode.message(), "unknown mode \"services\""));
  CHECK(contains(mode.message(), "/health/<service>, /catalog/<service> or /kv/<prefix>"));
  CHECK(contains(spec_error("consul://h:8500").message(), "no mode"));
  CHECK(contains(spec_error("consul://h:8500/health").message(), "no service name"));
  CHECK(contains(spec_error("consul://h:8500/health/").message(), "no service name"));
  CHECK(contains(spec_error("consul://h:8500/catalog/a/b").message(), "contains '/'"));
  CHECK(contains(spec_error("consul://h:8500/kv/").message(), "no KV prefix"));
  CHECK(contains(spec_error("etcd://h:2379/x").message(), "is not consul"));
}

TEST_CASE("consul spec: an unknown option is an error listing the valid keys for the mode") {
  auto health = spec_error("consul://h/health/api?tags=v2");
  CHECK(contains(health.message(), "unknown option \"tags\" for health"));
  CHECK(contains(health.message(),
                 "(valid: passing, dc, stale, consistent, token, token_env, tag, filter, near, zone_meta)"));
  auto kv = spec_error("consul://h/kv/up?tag=v2");
  CHECK(contains(kv.message(), "unknown option \"tag\" for kv (valid: dc, stale, consistent, token, token_env)"));
  CHECK(contains(spec_error("consul://h/catalog/api?passing=1").message(), "unknown option \"passing\" for catalog"));
}

TEST_CASE("consul spec: bad flag values, empty values and repeated options are errors") {
  CHECK(contains(spec_error("consul://h/health/api?passing=yes").message(), "passing=\"yes\": expected 1, 0, true or false"));
  CHECK(contains(spec_error("consul://h/health/api?dc=").message(), "dc is empty"));
  CHECK(contains(spec_error("consul://h/health/api?tag=").message(), "tag is empty"));
  CHECK(contains(spec_error("consul://h/health/api?token=").message(), "token is empty"));
  CHECK(contains(spec_error("consul://h/health/api?dc=a&dc=b").message(), "option \"dc\" is given twice"));
  CHECK(contains(spec_error("consul://h/health/api?token=a%0Ab").message(), "control character"));
}
