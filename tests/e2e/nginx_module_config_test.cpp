// The native nginx module (examples/nginx) as an operator meets it: `nginx -t` refuses
// every bad `dynup` directive saying what is wrong and where, passes a good one without
// starting anything, and a short run under valgrind shows no memory error and no leak
// from the module or libdynup_c. nginx and valgrind are required: without them these
// tests fail saying so.
#include <support/nginx.hpp>
#include <support/process.hpp>
#include <support/temp_dir.hpp>
#include <support/text.hpp>
#include <support/wait.hpp>

#include <doctest/doctest.h>
#include <httplib.h>
#include <nlohmann/json.hpp>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#ifndef DYNUP_NGINX_MODULE
#error "DYNUP_NGINX_MODULE must name ngx_http_upstream_dynup_module.so (tests/CMakeLists.txt defines it)"
#endif

namespace {

using dynup_test::contains;
using dynup_test::ExitStatus;
using dynup_test::Process;
using dynup_test::TempDir;

// $DYNUP_NGINX_MODULE overrides the built module, as $DYNUP_NGINX overrides nginx: the
// leak check can then be shown to fail on a module that leaks.
std::string module_file() {
  const char* env = std::getenv("DYNUP_NGINX_MODULE");
  return env && *env ? env : DYNUP_NGINX_MODULE;
}

// A missing nginx or module is a broken setup to report, never a skip.
void require_nginx_and_module() {
  std::string why = dynup_test::nginx_missing_reason(dynup_test::nginx_binary());
  REQUIRE_MESSAGE(why.empty(), why);
  REQUIRE_MESSAGE(dynup_test::exists(module_file()),
                  module_file() << " is missing: build the dynup_nginx_module target (needs nginx-dev)");
}

std::string replace_all(std::string s, const std::string& from, const std::string& to) {
  for (auto at = s.find(from); at != std::string::npos; at = s.find(from, at + to.size())) s.replace(at, from.size(), to);
  return s;
}

// Every path nginx writes to at startup, inside `dir`: nothing escapes the test's prefix.
std::string temp_paths(const std::string& dir) {
  std::string c;
  for (const char* t : {"client_body", "proxy", "fastcgi", "uwsgi", "scgi"})
    c += std::string(t) + "_temp_path " + dir + "/" + t + "; ";
  return c;
}

// The config `nginx -t` checks: the upstream "api" opens on line kUpstreamLine and its
// body is line kBodyLine; the server block (which `server_extra` goes into) is line
// kServerLine. "@DIR" in either is the test's directory. `nginx -t` binds no socket, so
// the fixed port is never opened.
constexpr int kUpstreamLine = 7;
constexpr int kBodyLine = 8;
constexpr int kServerLine = 10;

std::string check_config(const std::string& dir, const std::string& upstream_body, const std::string& server_extra) {
  std::string c;
  c += "load_module " + module_file() + ";\n";
  c += "pid " + dir + "/nginx.pid;\n";
  c += "events { worker_connections 64; }\n";
  c += "http {\n";
  c += "  access_log off;\n";
  c += "  " + temp_paths(dir) + "\n";
  c += "  upstream api {\n";
  c += "    " + replace_all(upstream_body, "@DIR", dir) + "\n";
  c += "  }\n";
  c += "  server { listen 127.0.0.1:8080; location / { proxy_pass http://api; } " +
       replace_all(server_extra, "@DIR", dir) + " }\n";
  c += "}\n";
  return c;
}

// The start of a valid directive: a file source that exists.
const std::string kDynup = "dynup file://@DIR/peers.json";

struct TestRun {
  std::string conf;   // the config file's path
  std::string config; // its text
  ExitStatus status;
  std::string output; // what nginx -t printed, both streams
};

// `nginx -t` on check_config() in `dir`, which gets peers.json (two peers) first.
TestRun run_nginx_t(const TempDir& dir, const std::string& upstream_body, const std::string& server_extra) {
  dynup_test::write_in_place(dir.file("peers.json"), R"(["127.0.0.1:1", "127.0.0.1:2"])");
  TestRun run;
  run.conf = dir.file("nginx.conf");
  run.config = check_config(dir.path(), upstream_body, server_extra);
  dynup_test::write_in_place(run.conf, run.config);
  Process p({dynup_test::nginx_binary(), "-t", "-p", dir.path() + "/", "-c", run.conf, "-e", dir.file("error.log")});
  run.output = p.read_all(Process::Stream::err, std::chrono::seconds(20));
  run.output += p.read_all(Process::Stream::out, std::chrono::seconds(1));
  auto st = p.wait_exit(std::chrono::seconds(5));
  run.status = st ? *st : p.stop();
  return run;
}

std::string at_line(const TestRun& run, int line) { return run.conf + ":" + std::to_string(line); }

// `nginx -t` refuses the config, saying each of `says` and naming the line `where`.
void check_rejected(const std::string& upstream_body, const std::vector<std::string>& says, int where,
                    const std::string& server_extra = {}) {
  require_nginx_and_module();
  TempDir dir;
  TestRun run = run_nginx_t(dir, upstream_body, server_extra);
  INFO("config:\n" << run.config << "nginx -t said:\n" << run.output);
  CHECK(run.status.exited);
  CHECK(run.status.code != 0);
  CHECK(contains(run.output, "test failed"));
  for (const std::string& s : says) CHECK_MESSAGE(contains(run.output, s), "expected: " << s);
  CHECK_MESSAGE(contains(run.output, at_line(run, where)), "expected the place: " << at_line(run, where));
}

} // namespace

TEST_CASE("nginx module config: a parameter without '=' is refused with the form parameters take") {
  for (const char* arg : {"foo", "=1"}) {
    CAPTURE(arg);
    check_rejected(kDynup + " " + arg + ";",
                   {std::string("dynup: \"") + arg + "\" is not a name=value parameter", "health.passive.max_fails=3"},
                   kBodyLine);
  }
}

TEST_CASE("nginx module config: a parameter name outside a-z 0-9 _ and dots is refused") {
  for (const char* arg : {"health-x=1", "health..passive=1", ".policy=ewma", "policy.=ewma"}) {
    CAPTURE(arg);
    std::string name(arg, std::string(arg).find('='));
    check_rejected(kDynup + " " + arg + ";",
                   {"dynup: invalid parameter name \"" + name + "\"", "names of a-z, 0-9 and _ joined by dots"},
                   kBodyLine);
  }
}

TEST_CASE("nginx module config: name= and source= are refused: they come from the block and the first argument") {
  for (const char* param : {"name", "source"}) {
    CAPTURE(param);
    check_rejected(kDynup + " " + param + "=x;",
                   {std::string("dynup: \"") + param + "\" cannot be set", "the name is the upstream's",
                    "the source is the first argument"},
                   kBodyLine);
  }
}

TEST_CASE("nginx module config: an unknown config key is refused with its path and the valid keys") {
  check_rejected(kDynup + " foo=1;", {"dynup: upstream.foo: unknown key", "valid: name, source, policy"}, kBodyLine);
  check_rejected(kDynup + " health.passive.nope=1;", {"dynup: upstream.health.passive.nope", "unknown"}, kBodyLine);
}

TEST_CASE("nginx module config: a value out of range is refused with its path and the allowed range") {
  check_rejected(kDynup + " watch.wait_ms=5;", {"dynup: upstream.watch.wait_ms: expected an integer 10..600000, got 5"},
                 kBodyLine);
  check_rejected(kDynup + " health.passive.max_fails=abc;",
                 {"dynup: upstream.health.passive.max_fails: expected an integer", "got \"abc\""}, kBodyLine);
}

TEST_CASE("nginx module config: a source with an unknown scheme is refused listing the supported ones") {
  check_rejected("dynup ftp://x;",
                 {"dynup: upstream.source", "unknown scheme \"ftp\"", "file://, consul://, etcd://"}, kBodyLine);
}

TEST_CASE("nginx module config: an option the file source cannot honour is refused") {
  check_rejected(kDynup + " snapshot=@DIR/s.json;", {"dynup: upstream.source", "cannot honour snapshot_path"},
                 kBodyLine);
}

TEST_CASE("nginx module config: an unknown policy or policy option is refused listing the valid ones") {
  check_rejected(kDynup + " policy=rr;",
                 {"dynup: upstream.policy: unknown policy \"rr\"",
                  "valid: round_robin, random, least_request, ewma, ring_hash, maglev"},
                 kBodyLine);
  check_rejected(kDynup + " policy=ewma policy.options.choice=2;",
                 {"dynup: upstream.policy", "unknown option \"choice\"", "choice_count"}, kBodyLine);
}

TEST_CASE("nginx module config: a hashing policy without key= is refused with an example key") {
  for (const char* policy : {"ring_hash", "maglev"}) {
    CAPTURE(policy);
    check_rejected(kDynup + " policy=" + policy + ";",
                   {std::string("dynup: policy \"") + policy + "\" hashes a key: add key=", "key=$request_uri"},
                   kBodyLine);
  }
}

TEST_CASE("nginx module config: conflicting or repeated parameters are refused naming one of them") {
  check_rejected(kDynup + " policy=ewma policy.name=random;",
                 {"dynup: \"policy.name\" conflicts with another parameter"}, kBodyLine);
  check_rejected(kDynup + " policy=ewma policy=random;",
                 {"dynup: \"policy\" conflicts with another parameter", "the same value twice"}, kBodyLine);
  check_rejected(kDynup + " watch.poll_ms=100 watch.poll_ms=200;",
                 {"dynup: \"watch.poll_ms\" conflicts with another parameter"}, kBodyLine);
  check_rejected(kDynup + " key=$uri key=$args;", {"dynup: \"key\" is duplicate"}, kBodyLine);
}

TEST_CASE("nginx module config: a second dynup directive in one upstream is refused") {
  check_rejected(kDynup + "; " + kDynup + ";", {"\"dynup\" directive is duplicate"}, kBodyLine);
}

TEST_CASE("nginx module config: server lines beside dynup are refused naming the upstream and why") {
  for (const char* body : {"dynup file://@DIR/peers.json; server 127.0.0.1:2;",
                           "server 127.0.0.1:2; dynup file://@DIR/peers.json;"}) {
    CAPTURE(body);
    check_rejected(body,
                   {"upstream \"api\"", "has \"server\" lines beside \"dynup\"",
                    "dynup takes every peer from its source"},
                   kUpstreamLine);
  }
}

TEST_CASE("nginx module config: keepalive before dynup is refused saying dynup must come first") {
  check_rejected("keepalive 16; " + kDynup + ";",
                 {"\"dynup\" directive must come before \"keepalive\"", "choose dynup's with policy="}, kBodyLine);
}

TEST_CASE("nginx module config: a balancing method after dynup is refused saying it replaced dynup") {
  // The postconfiguration check names the upstream and the dynup directive it replaced.
  for (const char* method : {"hash $x consistent;", "least_conn;", "ip_hash;", "random;"}) {
    CAPTURE(method);
    check_rejected(kDynup + "; " + method,
                   {"upstream \"api\": \"dynup\" in", "was replaced by a balancing method declared after it",
                    "choose dynup's with policy="},
                   kBodyLine);
  }
}

TEST_CASE("nginx module config: zone in a dynup upstream is refused: dynup shares the peers itself") {
  check_rejected(kDynup + "; zone api 64k;",
                 {"upstream \"api\"", "\"zone\" cannot be combined with \"dynup\"",
                  "dynup shares its peers between workers itself"},
                 kUpstreamLine);
}

TEST_CASE("nginx module config: dynup outside an upstream block is refused") {
  check_rejected(kDynup + ";", {"\"dynup\" directive is not allowed here"}, kServerLine,
                 "location /elsewhere { dynup file://@DIR/peers.json; }");
}

TEST_CASE("nginx module config: a file source that cannot be read fails nginx -t with the path and why, as an include does") {
  check_rejected("dynup file://@DIR/missing.json;",
                 {"dynup: cannot read the peer file", "missing.json", "No such file or directory"}, kBodyLine);
  check_rejected("dynup file://@DIR;", {"dynup: cannot read the peer file"}, kBodyLine); // a directory
}

TEST_CASE("nginx module config: a valid directive with dotted parameters passes nginx -t and starts nothing") {
  require_nginx_and_module();
  const std::vector<std::string> bodies = {
      kDynup + " policy=ewma policy.options.choice_count=2 policy.options.decay_ms=5000"
               " health.passive.max_fails=3 health.passive.fail_timeout_ms=10000 guards.allow_empty=on"
               " guards.max_removed_share=0.5 watch.poll_ms=200 shared.dir=@DIR/shared; keepalive 16;",
      kDynup + " policy=ring_hash key=$http_x_key shared.dir=@DIR/shared;",
      kDynup + " policy=maglev key=$request_uri shared.dir=@DIR/shared;",
  };
  for (const std::string& body : bodies) {
    TempDir dir;
    std::filesystem::create_directory(dir.file("shared"));
    TestRun run = run_nginx_t(dir, body, "location = /dynup/status { dynup_status; }");
    INFO("config:\n" << run.config << "nginx -t said:\n" << run.output);
    CHECK(run.status.exited);
    CHECK(run.status.code == 0);
    CHECK(contains(run.output, "test is successful"));
    CHECK_FALSE(contains(run.output, "[emerg]"));
    CHECK_FALSE(contains(run.output, "[warn]"));
    // The master only checks the config: the region, its lock and the leader file are
    // made by workers, and no worker runs under -t.
    CHECK(TempDir::list_dir(dir.file("shared")).empty());
  }
}

namespace {

// valgrind: $DYNUP_VALGRIND, else the usual places.
std::string valgrind_binary() {
  if (const char* env = std::getenv("DYNUP_VALGRIND"); env && *env) return env;
  for (const char* p : {"/usr/bin/valgrind", "/usr/local/bin/valgrind"})
    if (::access(p, X_OK) == 0) return p;
  return "/usr/bin/valgrind";
}

// nginx's own leaks are not the module's: ngx_set_environment() builds the environment
// of a single-process nginx and never frees it (definite, 8 bytes). Suppressing exactly
// that stack keeps every other definite leak, the module's and libdynup_c's included,
// an error that makes valgrind exit 99. nginx's pools that are still live at exit show as
// "possibly lost" and are not counted (--errors-for-leak-kinds=definite).
const char* kNginxSuppressions = R"({
   nginx-keeps-its-environment-for-the-process-lifetime
   Memcheck:Leak
   match-leak-kinds: definite
   fun:malloc
   fun:ngx_alloc
   fun:ngx_set_environment
}
)";

// The empty "==pid== " line that ends each of valgrind's reports.
bool ends_report(const std::string& line) {
  auto close = line.rfind("==", 0) == 0 ? line.find("==", 2) : std::string::npos;
  return close != std::string::npos && line.find_first_not_of(" \t\r", close + 2) == std::string::npos;
}

// valgrind's loss records ("N bytes in M blocks are ... lost in loss record i of n" and
// the stack below it) that mention the module or libdynup_c in any frame.
std::vector<std::string> dynup_loss_records(const std::string& log) {
  std::vector<std::string> out;
  std::istringstream in(log);
  std::string line, record;
  bool inside = false;
  auto flush = [&] {
    if (inside && contains(record, "dynup")) out.push_back(record);
    inside = false;
    record.clear();
  };
  while (std::getline(in, line)) {
    if (contains(line, "lost in loss record")) {
      flush();
      inside = true;
    } else if (inside && ends_report(line)) {
      flush();
      continue;
    }
    if (inside) record += line + "\n";
  }
  flush();
  return out;
}

// One nginx process (master_process off) whose upstream "api" takes its peers from
// `dir`/peers.json through the module, with keepalive to the backends; ports[0] serves
// /ready (answering `token`), /dynup/status and the proxy; ports[1..3] are backends
// answering "0", "1", "2".
std::string valgrind_config(const std::string& dir, const std::vector<std::uint16_t>& ports, const std::string& token) {
  std::string c;
  c += "load_module " + module_file() + ";\n";
  c += "error_log " + dir + "/error.log notice;\n";
  c += "pid " + dir + "/nginx.pid;\n";
  c += "events { worker_connections 128; }\n";
  c += "http {\n  access_log off;\n  default_type text/plain;\n  " + temp_paths(dir) + "\n";
  c += "  upstream api {\n";
  c += "    dynup file://" + dir + "/peers.json policy=round_robin health.passive.max_fails=1 watch.poll_ms=100"
       " shared.dir=" + dir + "/shared;\n";
  c += "    keepalive 4;\n  }\n";
  c += "  server {\n    listen 127.0.0.1:" + std::to_string(ports.at(0)) + ";\n";
  c += "    location = /ready { return 200 \"" + token + "\"; }\n";
  c += "    location = /dynup/status { dynup_status; }\n";
  c += "    location / { proxy_pass http://api; proxy_http_version 1.1; proxy_set_header Connection \"\"; }\n";
  c += "  }\n";
  for (std::size_t i = 1; i < ports.size(); ++i)
    c += "  server { listen 127.0.0.1:" + std::to_string(ports[i]) + "; return 200 \"" + std::to_string(i - 1) +
         "\"; }\n";
  c += "}\n";
  return c;
}

// nginx under memcheck, its report in `dir`/valgrind.log. --keep-debuginfo: nginx unloads
// the module before valgrind reports, and a stack through it would read "???" instead
// of ngx_http_upstream_dynup_*.
std::vector<std::string> valgrind_argv(const std::string& valgrind, const TempDir& dir) {
  return {valgrind,
          "--error-exitcode=99",
          "--leak-check=full",
          "--errors-for-leak-kinds=definite",
          "--track-fds=no",
          "--keep-debuginfo=yes",
          "--suppressions=" + dir.file("nginx.supp"),
          "--log-file=" + dir.file("valgrind.log"),
          dynup_test::nginx_binary(),
          "-p",
          dir.path() + "/",
          "-c",
          dir.file("nginx.conf"),
          "-e",
          dir.file("error.log"),
          "-g",
          "daemon off; master_process off;"};
}

// The body of the proxied response, or "status N" / "no response".
std::string fetch(httplib::Client& cli, const char* path) {
  auto res = cli.Get(path);
  if (!res) return "no response (" + httplib::to_string(res.error()) + ")";
  if (res->status != 200) return "status " + std::to_string(res->status) + ": " + res->body;
  return res->body;
}

std::string peers_json(const std::vector<std::uint16_t>& ports) {
  nlohmann::json peers = nlohmann::json::array();
  for (auto p : ports) peers.push_back("127.0.0.1:" + std::to_string(p));
  return nlohmann::json{{"peers", peers}}.dump();
}

} // namespace

TEST_CASE("nginx module under valgrind: requests, a peer change, status and a graceful stop leave no error or leak") {
  require_nginx_and_module();
  const std::string valgrind = valgrind_binary();
  REQUIRE_MESSAGE(::access(valgrind.c_str(), X_OK) == 0,
                  "valgrind is required for the module's memory check but \""
                      << valgrind << "\" is not an executable (apt-get install valgrind, or point $DYNUP_VALGRIND at it)");
  TempDir dir;
  std::filesystem::create_directory(dir.file("shared"));
  dynup_test::write_in_place(dir.file("nginx.supp"), kNginxSuppressions);
  const std::string token = "dynup-valgrind-" + std::to_string(std::random_device{}());

  // ports[0] is the proxy; ports[1 + i] is backend i, which answers "i".
  std::vector<std::uint16_t> ports;
  auto backend_ports = [&](std::initializer_list<std::size_t> which) {
    std::vector<std::uint16_t> out;
    for (std::size_t i : which) out.push_back(ports.at(1 + i));
    return out;
  };
  std::unique_ptr<Process> nginx;
  std::string config, failures;
  // A port taken between free_loopback_ports and nginx's bind() ends the attempt with
  // "Address already in use": new ports, another attempt.
  for (int attempt = 1; attempt <= 3 && !nginx; ++attempt) {
    ports = dynup_test::free_loopback_ports(4);
    dynup_test::write_by_rename(dir.file("peers.json"), peers_json(backend_ports({0, 1})));
    config = valgrind_config(dir.path(), ports, token);
    dynup_test::write_in_place(dir.file("nginx.conf"), config);
    std::filesystem::remove(dir.file("valgrind.log"));
    auto p = std::make_unique<Process>(valgrind_argv(valgrind, dir));
    // valgrind makes startup slow: allow 30 s.
    bool ready = dynup_test::wait_until(
        [&] { return p->wait_exit(std::chrono::milliseconds(0)) || dynup_test::nginx_answers("/ready", ports[0], token); },
        std::chrono::seconds(30));
    if (ready && !p->wait_exit(std::chrono::milliseconds(0))) {
      nginx = std::move(p);
      break;
    }
    p->stop(std::chrono::milliseconds(5000));
    std::string log = dynup_test::exists(dir.file("error.log")) ? dynup_test::read_all(dir.file("error.log")) : "";
    std::string vg = dynup_test::exists(dir.file("valgrind.log")) ? dynup_test::read_all(dir.file("valgrind.log")) : "";
    failures += "attempt " + std::to_string(attempt) + ":\n" + log + vg;
    std::filesystem::remove(dir.file("error.log"));
    if (!contains(log, "Address already in use")) break;
  }
  INFO("config:\n" << config);
  REQUIRE_MESSAGE(nginx, "nginx under valgrind did not answer within 30 s\n" << failures);
  auto error_log = [&] { return dynup_test::read_all(dir.file("error.log")); };

  // The worker's handle publishes the file's set a moment after nginx starts answering.
  auto status_peers = [&] {
    httplib::Client c("127.0.0.1", ports[0]);
    auto res = c.Get("/dynup/status");
    auto doc = nlohmann::json::parse(res ? res->body : std::string(), nullptr, false);
    if (!doc.is_object() || !doc["upstreams"].is_array() || doc["upstreams"].empty()) return std::size_t{0};
    const auto& peers = doc["upstreams"][0]["peers"];
    return peers.is_array() ? peers.size() : std::size_t{0};
  };
  auto two_peers = [&] {
    if (status_peers() == 2) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(50)); // each request is slow under valgrind
    return false;
  };
  REQUIRE_MESSAGE(dynup_test::wait_until(two_peers, std::chrono::seconds(10)),
                  "the upstream never showed the file's 2 peers\nerror log:\n" << error_log());

  httplib::Client cli("127.0.0.1", ports[0]);
  cli.set_keep_alive(true);
  cli.set_connection_timeout(std::chrono::seconds(5));
  cli.set_read_timeout(std::chrono::seconds(10));

  std::multiset<std::string> before, during, after;
  for (int k = 0; k < 10; ++k) before.insert(fetch(cli, "/"));
  CHECK(before == std::multiset<std::string>{"0", "0", "0", "0", "0", "1", "1", "1", "1", "1"});

  // Backend 0 leaves, backend 2 joins; requests keep flowing (one every 50 ms) while the
  // file source notices, until backend 2 answers one or 10 s pass.
  dynup_test::write_by_rename(dir.file("peers.json"), peers_json(backend_ports({1, 2})));
  auto change_deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (!during.count("2") && std::chrono::steady_clock::now() < change_deadline) {
    during.insert(fetch(cli, "/"));
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  INFO("during the change: " << during.size() << " requests");
  for (const std::string& body : during) CHECK_MESSAGE((body == "0" || body == "1" || body == "2"), body);
  CHECK_MESSAGE(during.count("2"), "backend 2 never served\nerror log:\n" << error_log());

  for (int k = 0; k < 10; ++k) after.insert(fetch(cli, "/"));
  CHECK(after == std::multiset<std::string>{"1", "1", "1", "1", "1", "2", "2", "2", "2", "2"});

  std::string status = fetch(cli, "/dynup/status");
  auto doc = nlohmann::json::parse(status, nullptr, false);
  REQUIRE_MESSAGE(doc.is_object(), status);
  CHECK(doc.value("pid", 0) == nginx->pid()); // valgrind runs nginx in its own process
  REQUIRE(doc["upstreams"].size() == 1);
  const auto& api = doc["upstreams"][0];
  CHECK(api.value("name", "") == "api");
  CHECK(api.value("version", 0) >= 2);
  std::set<std::uint16_t> status_ports;
  for (const auto& peer : api["peers"]) status_ports.insert(peer.value("port", std::uint16_t{0}));
  CHECK(status_ports == std::set<std::uint16_t>{ports[2], ports[3]});

  // SIGQUIT makes a single-process nginx finish its requests, run every module's
  // exit_process (where the module frees its dynup handles), destroy its pools and exit.
  cli.stop();
  nginx->send(SIGQUIT);
  auto exited = nginx->wait_exit(std::chrono::seconds(20));
  if (!exited) nginx->stop(std::chrono::milliseconds(3000));
  REQUIRE_MESSAGE(exited, "nginx under valgrind did not exit within 20 s of SIGQUIT\nerror log:\n" << error_log());

  std::string vg = dynup_test::read_all(dir.file("valgrind.log"));
  INFO("valgrind log:\n" << vg << "\nerror log:\n" << error_log());
  CHECK(exited->exited);
  CHECK(exited->code == 0); // 99: valgrind found an error or an unsuppressed definite leak
  CHECK(contains(vg, "ERROR SUMMARY: 0 errors"));
  CHECK(contains(vg, "definitely lost: 0 bytes in 0 blocks"));
  CHECK(contains(vg, "indirectly lost: 0 bytes in 0 blocks"));
  // Stricter than the exit code: not even a "possibly lost" block from dynup's code.
  std::vector<std::string> ours = dynup_loss_records(vg);
  CHECK_MESSAGE(ours.empty(), ours.size() << " loss record(s) from the module or libdynup_c, first:\n"
                                          << (ours.empty() ? std::string() : ours.front()));
  CHECK(contains(error_log(), "exit"));
}
