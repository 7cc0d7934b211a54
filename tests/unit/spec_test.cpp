#include <dynup/source/file.hpp>
#include <dynup/source/spec.hpp>
#include <dynup/upstream_config.hpp>

#include <support/text.hpp>

#include <doctest/doctest.h>

#include <chrono>
#include <string>
#include <vector>

using dynup::Errc;
using dynup::parse_source_spec;
using dynup::SourceSpec;

namespace {

using dynup_test::contains;
SourceSpec spec_ok(const std::string& text) {
  auto r = parse_source_spec(text);
  REQUIRE_MESSAGE(r.ok(), text, " -> ", r.error().message());
  return std::move(r).value();
}

std::string spec_error(const std::string& text) {
  auto r = parse_source_spec(text);
  REQUIRE_FALSE_MESSAGE(r.ok(), text);
  CHECK(r.error().code() == Errc::invalid_argument);
  CHECK(r.error().message().find("source \"" + text + "\"") != std::string::npos);
  return r.error().message();
}

} // namespace

TEST_CASE("file:///abs gives an absolute path and no host or port") {
  SourceSpec s = spec_ok("file:///etc/dynup/api.json");
  CHECK(s.scheme == "file");
  CHECK(s.path == "/etc/dynup/api.json");
  CHECK(s.host.empty());
  CHECK(s.port == 0);
  CHECK(s.query.empty());
}

TEST_CASE("file://relative gives a relative path") {
  SourceSpec s = spec_ok("file://peers/api.json");
  CHECK(s.scheme == "file");
  CHECK(s.path == "peers/api.json");
}

TEST_CASE("file: without slashes gives the path as written") {
  CHECK(spec_ok("file:api.json").path == "api.json");
}

TEST_CASE("file paths are percent-decoded") {
  CHECK(spec_ok("file:///srv/my%20peers/a%2Bb.json").path == "/srv/my peers/a+b.json");
  CHECK(spec_ok("file:///x%2fy").path == "/x/y");
}

TEST_CASE("file paths keep '?' as part of the path") {
  CHECK(spec_ok("file:///tmp/a?b").path == "/tmp/a?b");
}

TEST_CASE("an empty file path is rejected") {
  CHECK(contains(spec_error("file://"), "the file path is empty"));
  CHECK(contains(spec_error("file:"), "the file path is empty"));
}

TEST_CASE("a file path with an encoded NUL byte is rejected") {
  CHECK(contains(spec_error("file:///etc/dynup/api.json%00.bak"), "contains %00"));
}

TEST_CASE("a bad percent escape in a file path is rejected") {
  CHECK(contains(spec_error("file:///a%2"), "bad percent-escape in the file path"));
  CHECK(contains(spec_error("file:///a%zz"), "bad percent-escape"));
  CHECK(contains(spec_error("file:///a%"), "bad percent-escape"));
}

TEST_CASE("consul spec gives host, port, path and query") {
  SourceSpec s = spec_ok("consul://127.0.0.1:8501/health/api?dc=dc1&passing=1");
  CHECK(s.scheme == "consul");
  CHECK(s.host == "127.0.0.1");
  CHECK(s.port == 8501);
  CHECK(s.path == "/health/api");
  REQUIRE(s.query.size() == 2);
  CHECK(s.query[0] == std::make_pair(std::string("dc"), std::string("dc1")));
  REQUIRE(s.value("passing") != nullptr);
  CHECK(*s.value("passing") == "1");
  CHECK(s.value("tag") == nullptr);
  CHECK(s.values("tag").empty());
}

TEST_CASE("repeated query keys are all kept in order") {
  SourceSpec s = spec_ok("consul://host:8500/health/api?tag=a&dc=x&tag=b");
  CHECK(s.values("tag") == std::vector<std::string>{"a", "b"});
  REQUIRE(s.value("tag") != nullptr);
  CHECK(*s.value("tag") == "b"); // the last one wins for single-valued lookups
}

TEST_CASE("query keys and values are percent-decoded") {
  SourceSpec s = spec_ok("consul://h/health/api?tag=v%202&my%5Fkey=a%26b&empty=&flag");
  CHECK(s.values("tag") == std::vector<std::string>{"v 2"});
  REQUIRE(s.value("my_key") != nullptr);
  CHECK(*s.value("my_key") == "a&b");
  REQUIRE(s.value("empty") != nullptr);
  CHECK(s.value("empty")->empty());
  REQUIRE(s.value("flag") != nullptr);
  CHECK(s.value("flag")->empty());
}

TEST_CASE("empty query items are skipped") {
  SourceSpec s = spec_ok("consul://h/p?&a=1&&b=2&");
  REQUIRE(s.query.size() == 2);
  CHECK(*s.value("a") == "1");
  CHECK(*s.value("b") == "2");
}

TEST_CASE("the URL path is percent-decoded") {
  CHECK(spec_ok("consul://h:8500/kv/up%20streams/api").path == "/kv/up streams/api");
}

TEST_CASE("bad percent escapes in path or query are rejected saying where") {
  CHECK(contains(spec_error("consul://h/kv/%g1"), "bad percent-escape in the path"));
  CHECK(contains(spec_error("consul://h/p?tag=%4"), "bad percent-escape in a query value"));
  CHECK(contains(spec_error("consul://h/p?%zz=1"), "bad percent-escape in a query key"));
}

TEST_CASE("consul defaults to port 8500 and etcd to port 2379") {
  SourceSpec c = spec_ok("consul://consul.service/catalog/api");
  CHECK(c.host == "consul.service");
  CHECK(c.port == 8500);
  CHECK(c.path == "/catalog/api");
  SourceSpec e = spec_ok("etcd://etcd.local/upstreams/api/");
  CHECK(e.scheme == "etcd");
  CHECK(e.port == 2379);
  CHECK(e.path == "/upstreams/api/");
}

TEST_CASE("a spec without a path gets path /") {
  SourceSpec s = spec_ok("etcd://10.0.0.1:2380");
  CHECK(s.port == 2380);
  CHECK(s.path == "/");
  SourceSpec q = spec_ok("consul://h?dc=1");
  CHECK(q.path == "/");
  CHECK(*q.value("dc") == "1");
}

TEST_CASE("a bracketed IPv6 host is accepted with or without a port") {
  SourceSpec s = spec_ok("consul://[::1]:8500/health/api");
  CHECK(s.host == "::1");
  CHECK(s.port == 8500);
  CHECK(s.path == "/health/api");
  SourceSpec d = spec_ok("etcd://[2001:db8::1]/p");
  CHECK(d.host == "2001:db8::1");
  CHECK(d.port == 2379);
}

TEST_CASE("a malformed bracketed IPv6 host is rejected") {
  CHECK(contains(spec_error("consul://[::1/health"), "unterminated [IPv6] host"));
  CHECK(contains(spec_error("consul://[::1]8500/health"), "expected :port after ]"));
  CHECK(contains(spec_error("consul://[]:8500/x"), "the host is empty"));
}

TEST_CASE("a bad port is rejected naming the port") {
  for (const char* text : {"consul://h:0/x", "consul://h:65536/x", "consul://h:http/x", "consul://h:-1/x",
                           "etcd://h:123456/x", "consul://[::1]:99999/x"}) {
    std::string msg = spec_error(text);
    CHECK_MESSAGE(contains(msg, "is not 1..65535"), text);
  }
  CHECK(contains(spec_error("consul://h:8o/x"), "port \"8o\""));
}

TEST_CASE("port 1 and 65535 are accepted") {
  CHECK(spec_ok("consul://h:1/x").port == 1);
  CHECK(spec_ok("consul://h:65535/x").port == 65535);
}

TEST_CASE("an empty host is rejected") {
  CHECK(contains(spec_error("consul:///health/api"), "the host is empty"));
  CHECK(contains(spec_error("consul://:8500/health/api"), "the host is empty"));
  CHECK(contains(spec_error("etcd://"), "the host is empty"));
}

TEST_CASE("consul and etcd require //") {
  CHECK(contains(spec_error("consul:h:8500/x"), "expected consul://host:port/"));
  CHECK(contains(spec_error("etcd:/h"), "expected etcd://host:port/"));
}

TEST_CASE("an unknown scheme is rejected listing the supported schemes") {
  std::string msg = spec_error("http://127.0.0.1:8500/x");
  CHECK(contains(msg, "unknown scheme \"http\""));
  CHECK(contains(msg, "file, consul, etcd"));
  CHECK(contains(spec_error("Consul://h/x"), "unknown scheme \"Consul\""));
}

TEST_CASE("text without a scheme is rejected listing the supported schemes") {
  for (const char* text : {"", "/etc/dynup/api.json", "://x"}) {
    std::string msg = spec_error(text);
    CHECK_MESSAGE(contains(msg, "file://, consul://, etcd://"), text);
  }
}

TEST_CASE("decode_peer_file takes the index from the argument, not the document") {
  auto r = dynup::decode_peer_file(R"({"index":999,"peers":["10.0.0.1:80"]})", 7);
  REQUIRE(r);
  CHECK(r->source_index() == 7);
  CHECK(r->version() == 0);
  REQUIRE(r->size() == 1);
  CHECK((*r)[0].id == "10.0.0.1:80");
}

TEST_CASE("decode_peer_file accepts a bare array") {
  auto r = dynup::decode_peer_file(R"(["10.0.0.1:80","10.0.0.2:80"])", 3);
  REQUIRE(r);
  CHECK(r->size() == 2);
  CHECK(r->source_index() == 3);
}

TEST_CASE("decode_peer_file passes parse errors through") {
  auto r = dynup::decode_peer_file("{not json", 1);
  REQUIRE_FALSE(r);
  CHECK(r.error().code() == Errc::parse_error);
  CHECK(contains(r.error().message(), "invalid JSON"));
  auto v = dynup::decode_peer_file(R"(["10.0.0.1:0"])", 1);
  REQUIRE_FALSE(v);
  CHECK(contains(v.error().message(), "port must be 1..65535"));
}

TEST_CASE("an empty port after the colon is an error, not the default port") {
  for (const char* text : {"consul://h:/health/api", "etcd://[::1]:/prefix/"}) {
    auto r = parse_source_spec(text);
    REQUIRE_FALSE(r.ok());
    CHECK(r.error().message().find("port after ':' is empty") != std::string::npos);
  }
}

TEST_CASE("upstream config: the example in upstream_config.hpp parses as written") {
  auto c = dynup::parse_upstream_config(nlohmann::json::parse(dynup::upstream_config_example));
  REQUIRE_MESSAGE(c, (c ? std::string() : c.error().message()));
  CHECK(c->name == "api");
  CHECK(c->policy == "least_request");
  CHECK(c->policy_options["choice_count"] == 2);
  CHECK(c->watch.wait == std::chrono::minutes(5));
  CHECK(c->watch.initial == dynup::InitialFetch::wait);
  CHECK(c->watch.guards.min_peers == 2u);
}

TEST_CASE("upstream config: wait_ms on a file:// source is refused whatever its value, the default too") {
  for (int wait : {299999, 300000}) {
    CAPTURE(wait);
    nlohmann::json doc{{"name", "api"}, {"source", "file:///etc/dynup/api.json"}, {"watch", {{"wait_ms", wait}}}};
    auto c = dynup::parse_upstream_config(doc);
    REQUIRE_FALSE(c);
    CHECK_MESSAGE(contains(c.error().message(), "wait"), c.error().message());
    CHECK(contains(c.error().message(), "file://"));
  }
  // A file-only option written at its default value is refused on a registry source too.
  nlohmann::json doc{{"name", "api"}, {"source", "consul://127.0.0.1:8500/health/api"}, {"watch", {{"poll_ms", 1000}}}};
  auto c = dynup::parse_upstream_config(doc);
  REQUIRE_FALSE(c);
  CHECK_MESSAGE(contains(c.error().message(), "poll_interval"), c.error().message());
}

TEST_CASE("upstream config: watch.initial is wait or background; background refuses strong_dependency") {
  auto parse = [](nlohmann::json watch) {
    return dynup::parse_upstream_config(
        nlohmann::json{{"name", "api"}, {"source", "consul://127.0.0.1:8500/health/api"}, {"watch", watch}});
  };
  auto bg = parse({{"initial", "background"}});
  REQUIRE_MESSAGE(bg, (bg ? std::string() : bg.error().message()));
  CHECK(bg->watch.initial == dynup::InitialFetch::background);
  auto bad = parse({{"initial", "later"}});
  REQUIRE_FALSE(bad);
  CHECK_MESSAGE(contains(bad.error().message(), "upstream.watch.initial"), bad.error().message());
  auto both = parse({{"initial", "background"}, {"strong_dependency", true}});
  REQUIRE_FALSE(both);
  CHECK_MESSAGE(contains(both.error().message(), "strong_dependency"), both.error().message());
  // file:// never waits on the network: either value is accepted.
  auto file = dynup::parse_upstream_config(nlohmann::json{
      {"name", "api"}, {"source", "file:///etc/dynup/api.json"}, {"watch", {{"initial", "background"}}}});
  CHECK_MESSAGE(file, (file ? std::string() : file.error().message()));
}

TEST_CASE("health options: a long list of errors is capped like every other error list") {
  nlohmann::json doc = nlohmann::json::object();
  for (int i = 0; i < 25; ++i) doc["unknown_" + std::to_string(100 + i)] = 1;
  auto h = dynup::health_options_from_json(doc);
  REQUIRE_FALSE(h);
  const std::string& m = h.error().message();
  CHECK_MESSAGE(contains(m, "and 15 more"), m);
  CHECK(contains(m, "unknown_100"));
  CHECK_FALSE(contains(m, "unknown_124"));
}
