// dynup-watch on registry specs as a user runs it: a real process against the Consul
// protocol double and against a real etcd, including --once, --snapshot and --strong.
#include <support/consul_double.hpp>
#include <support/etcd.hpp>
#include <support/process.hpp>
#include <support/temp_dir.hpp>
#include <support/watching.hpp>

#include <doctest/doctest.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <initializer_list>
#include <optional>
#include <string>
#include <vector>

#ifndef DYNUP_WATCH_BIN
#error "DYNUP_WATCH_BIN must name the dynup-watch binary (tests/CMakeLists.txt defines it)"
#endif

namespace {

using dynup_test::ConsulDouble;
using dynup_test::ConsulInstance;
using dynup_test::consul_instances;
using dynup_test::contains;
using dynup_test::Process;
using dynup_test::TempDir;
using Stream = dynup_test::Process::Stream;
using namespace std::chrono_literals;

// Generous: a sanitizer build starts slowly, and we never assert tight timing.
constexpr auto line_timeout = 5000ms;

Process watch(const std::vector<std::string>& args) {
  std::vector<std::string> argv{DYNUP_WATCH_BIN};
  argv.insert(argv.end(), args.begin(), args.end());
  return Process(argv);
}

std::string next_line(Process& p, Stream s) {
  auto line = p.read_line(s, line_timeout);
  REQUIRE_MESSAGE(line.has_value(), "no line within the timeout");
  return *line;
}

nlohmann::json parse_line(const std::string& line) {
  INFO("line: " << line);
  auto doc = nlohmann::json::parse(line, nullptr, false);
  REQUIRE(doc.is_object());
  REQUIRE(doc.contains("peers"));
  return doc;
}

std::vector<int> ports_in(const nlohmann::json& doc) {
  std::vector<int> out;
  for (const auto& p : doc["peers"]) out.push_back(p["port"].get<int>());
  std::sort(out.begin(), out.end());
  return out;
}

std::vector<std::string> ids_in(const nlohmann::json& doc) {
  std::vector<std::string> out;
  for (const auto& p : doc["peers"]) out.push_back(p["id"].get<std::string>());
  return out;
}

// Runs a one-shot dynup-watch to its end: exit code, stdout, stderr.
struct Finished {
  int code = -1;
  std::string out, err;
};
Finished run_to_exit(const std::vector<std::string>& args) {
  Process p = watch(args);
  auto st = p.wait_exit(3 * line_timeout);
  REQUIRE_MESSAGE(st.has_value(), "dynup-watch did not exit");
  REQUIRE(st->exited);
  return {st->code, p.read_all(Stream::out, line_timeout), p.read_all(Stream::err, line_timeout)};
}

} // namespace

TEST_CASE("dynup-watch on consul:// prints the first set, then the set after a registry change") {
  ConsulDouble d;
  d.set_service("api", consul_instances({8080, 8081}));
  Process p = watch({"--wait-ms", "2000", d.spec("/health/api")});

  auto first = parse_line(next_line(p, Stream::out));
  CHECK(first["version"] == 1);
  CHECK(ports_in(first) == std::vector<int>{8080, 8081});
  CHECK(first["index"] == d.index());

  d.set_service("api", consul_instances({9090}));
  auto second = parse_line(next_line(p, Stream::out));
  CHECK(second["version"] == 2);
  CHECK(ports_in(second) == std::vector<int>{9090});
  bool waited = false;
  for (const auto& r : d.log()) waited = waited || r.param("wait") == std::string("2s");
  CHECK(waited); // --wait-ms reached the blocking query

  auto st = p.stop();
  CHECK(st.exited);
  CHECK(st.code == 0);
  CHECK(p.read_all(Stream::err, line_timeout).empty());
}

TEST_CASE("dynup-watch --once on consul:// prints one line and exits 0") {
  ConsulDouble d;
  d.set_service("api", consul_instances({8080}));
  Finished f = run_to_exit({"--once", d.spec("/catalog/api")});
  CHECK(f.code == 0);
  REQUIRE(std::count(f.out.begin(), f.out.end(), '\n') == 1);
  auto doc = parse_line(f.out.substr(0, f.out.size() - 1));
  CHECK(ports_in(doc) == std::vector<int>{8080});
  CHECK(doc["peers"][0]["health"] == "unknown"); // catalog mode: no checks
  CHECK(f.err.empty());
}

TEST_CASE("dynup-watch --once against a down Consul agent exits 1 with the reason") {
  ConsulDouble d;
  d.down();
  Finished f = run_to_exit({"--once", d.spec("/health/api")});
  CHECK(f.code == 1);
  CHECK(f.out.empty());
  CHECK(contains(f.err, "dynup-watch: "));
  CHECK(contains(f.err, d.spec("/health/api")));
}

TEST_CASE("dynup-watch --once serves the --snapshot set while the agent is down; --strong refuses to") {
  TempDir dir;
  std::string snapshot = dir.file("api.snapshot");
  ConsulDouble d;
  d.set_service("api", consul_instances({8080, 8081}));
  Finished saved = run_to_exit({"--once", "--snapshot", snapshot, d.spec("/health/api")});
  REQUIRE(saved.code == 0);
  REQUIRE(dynup_test::exists(snapshot));

  d.down();
  Finished stale = run_to_exit({"--once", "--snapshot", snapshot, d.spec("/health/api")});
  CHECK(stale.code == 0);
  REQUIRE(std::count(stale.out.begin(), stale.out.end(), '\n') == 1);
  CHECK(ports_in(parse_line(stale.out.substr(0, stale.out.size() - 1))) == std::vector<int>{8080, 8081});
  CHECK(contains(stale.err, "last-known-good snapshot " + snapshot));

  Finished strong = run_to_exit({"--once", "--strong", "--snapshot", snapshot, d.spec("/health/api")});
  CHECK(strong.code == 1);
  CHECK(strong.out.empty());
  CHECK(contains(strong.err, "strong_dependency"));
}

TEST_CASE("dynup-watch --strong exits 1 when the first fetch fails, without --once too") {
  ConsulDouble d;
  d.down();
  Finished f = run_to_exit({"--strong", d.spec("/kv/upstreams/api")});
  CHECK(f.code == 1);
  CHECK(f.out.empty());
  CHECK(contains(f.err, "first fetch failed and strong_dependency is set"));
}

TEST_CASE("dynup-watch never prints the Consul token") {
  const std::string token = "e2e-s3cret-t0ken";
  ConsulDouble d;
  d.set_service("api", consul_instances({8080}));
  d.require_token(token);
  {
    Finished ok = run_to_exit({"--once", d.spec("/health/api?token=" + token)});
    CHECK(ok.code == 0);
    CHECK_FALSE(contains(ok.out + ok.err, token));
  }
  {
    Process denied = watch({d.spec("/health/api?token=wrong-" + token)});
    std::string err = next_line(denied, Stream::err);
    CHECK(contains(err, "ACL"));
    CHECK(contains(err, d.spec("/health/api")));
    auto st = denied.stop();
    CHECK(st.code == 0);
    CHECK_FALSE(contains(err + denied.read_all(Stream::err, line_timeout), token));
  }
  {
    Finished bad = run_to_exit({"consul://127.0.0.1:99999/health/api?token=" + token});
    CHECK(bad.code == 2);
    CHECK(contains(bad.err, "99999"));
    CHECK_FALSE(contains(bad.err, token));
  }
}

TEST_CASE("dynup-watch rejects options that do not apply to the spec's scheme") {
  struct Case {
    std::vector<std::string> args;
    std::string says;
  };
  std::vector<Case> cases{
      {{"--poll-ms", "100", "consul://127.0.0.1:8500/health/api"}, "--poll-ms applies to file://"},
      {{"--poll-ms", "100", "etcd://127.0.0.1:2379/upstreams/api/"}, "--poll-ms applies to file://"},
      {{"--wait-ms", "1000", "file:///tmp/peers.json"}, "--wait-ms applies to consul:// and etcd://"},
      {{"--snapshot", "/tmp/x.snap", "file:///tmp/peers.json"}, "--snapshot applies to consul:// and etcd://"},
      {{"--strong", "file:///tmp/peers.json"}, "--strong applies to consul:// and etcd://"},
      {{"--wait-ms", "5", "consul://127.0.0.1:8500/health/api"}, "--wait-ms must be"},
      {{"--snapshot"}, "--snapshot needs a value"},
  };
  for (const auto& c : cases) {
    CAPTURE(c.says);
    Finished f = run_to_exit(c.args);
    CHECK(f.code == 2);
    CHECK(contains(f.err, c.says));
    CHECK(contains(f.err, "usage: dynup-watch"));
    CHECK(f.out.empty());
  }
}

TEST_CASE("dynup-watch on etcd:// prints the keys under the prefix, then a put") {
  std::string missing = dynup_test::etcd_missing_reason(dynup_test::etcd_binary());
  REQUIRE_MESSAGE(missing.empty(), missing);
  dynup_test::Etcd etcd;
  const std::string prefix = "/dynup-e2e/cli/api/";
  etcd.put(prefix + "web-1", "10.0.0.1:8080");
  Process p = watch({"--wait-ms", "60000", etcd.spec(prefix)});

  auto first = parse_line(next_line(p, Stream::out));
  CHECK(first["version"] == 1);
  CHECK(ids_in(first) == std::vector<std::string>{"web-1"});

  std::int64_t rev = etcd.put(prefix + "web-2", R"({"host":"10.0.0.2","port":8080,"weight":3})");
  auto second = parse_line(next_line(p, Stream::out));
  CHECK(second["version"] == 2);
  CHECK(second["index"] == rev);
  CHECK(ids_in(second) == std::vector<std::string>{"web-1", "web-2"});
  CHECK(second["peers"][1]["weight"] == 3);

  auto st = p.stop();
  CHECK(st.exited);
  CHECK(st.code == 0);
  CHECK(p.read_all(Stream::err, line_timeout).empty());
}

TEST_CASE("dynup-watch --once on etcd:// document layout prints the document's peers") {
  std::string missing = dynup_test::etcd_missing_reason(dynup_test::etcd_binary());
  REQUIRE_MESSAGE(missing.empty(), missing);
  dynup_test::Etcd etcd;
  const std::string key = "/dynup-e2e/cli/api.json";
  etcd.put(key, R"({"peers":["10.0.0.1:80","10.0.0.2:80"]})");
  Finished f = run_to_exit({"--once", etcd.spec(key + "?layout=document")});
  CHECK(f.code == 0);
  REQUIRE(!f.out.empty());
  CHECK(ids_in(parse_line(f.out.substr(0, f.out.size() - 1))) ==
        std::vector<std::string>{"10.0.0.1:80", "10.0.0.2:80"});
}
