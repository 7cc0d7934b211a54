// dynup-proxy as an operator runs it: a real process in front of in-process backends on
// loopback, its peers from files and pushes, its admin API and metrics, SIGTERM's drain,
// --check, and wrk through it while its peer file churns.
#include <support/process.hpp>
#include <support/proxy.hpp>
#include <support/temp_dir.hpp>
#include <support/text.hpp>
#include <support/wait.hpp>
#include <support/wrk.hpp>

#include <doctest/doctest.h>
#include <httplib.h>
#include <nlohmann/json.hpp>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace {

using dynup_test::Backend;
using dynup_test::contains;
using dynup_test::ExitStatus;
using dynup_test::Process;
using dynup_test::file_upstream;
using dynup_test::peer;
using dynup_test::peers_doc;
using dynup_test::PeerSpec;
using dynup_test::proxy_config;
using dynup_test::push_upstream;
using dynup_test::route;
using dynup_test::RunningProxy;
using dynup_test::Seen;
using dynup_test::TempDir;
using dynup_test::wait_until;
using dynup_test::write_by_rename;
using dynup_test::write_config;
using nlohmann::json;
using Stream = dynup_test::Process::Stream;
using namespace std::chrono_literals;

// Generous: a sanitizer build starts slowly, and no assertion here is about speed.
constexpr auto start_timeout = 10000ms;
constexpr auto change_timeout = 5000ms;

// A loopback port bound but not listening: a connect to it is refused at once, and no
// other process can take the port while this object lives.
class DeadPort {
public:
  DeadPort() {
    fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    if (fd_ < 0 || ::bind(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 ||
        ::getsockname(fd_, reinterpret_cast<sockaddr*>(&a), &len) != 0)
      throw std::runtime_error("DeadPort: cannot bind a loopback port");
    port_ = ntohs(a.sin_port);
  }
  ~DeadPort() { ::close(fd_); }
  DeadPort(const DeadPort&) = delete;
  DeadPort& operator=(const DeadPort&) = delete;
  int port() const noexcept { return port_; }

private:
  int fd_ = -1;
  int port_ = 0;
};

// True when a TCP connect to the loopback port is refused (nothing listens there).
bool connect_refused(int port) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons(static_cast<std::uint16_t>(port));
  const bool refused = ::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 && errno == ECONNREFUSED;
  ::close(fd);
  return refused;
}

// A reply, or why there was none (status 0).
struct Reply {
  int status = 0;
  std::string body;
  httplib::Headers headers;
  httplib::Error error = httplib::Error::Success;

  std::string header(const std::string& name) const {
    auto it = headers.find(name);
    return it == headers.end() ? std::string() : it->second;
  }
  std::string describe() const {
    return status == 0 ? "no reply: " + httplib::to_string(error) : std::to_string(status) + " " + body;
  }
};

Reply to_reply(const httplib::Result& r) {
  Reply out;
  out.error = r.error();
  if (r) {
    out.status = r->status;
    out.body = r->body;
    out.headers = r->headers;
  }
  return out;
}

std::unique_ptr<httplib::Client> client(int port, bool keep_alive) {
  auto c = std::make_unique<httplib::Client>("127.0.0.1", port);
  c->set_keep_alive(keep_alive);
  c->set_connection_timeout(2, 0);
  c->set_read_timeout(10, 0);
  c->set_write_timeout(10, 0);
  return c;
}

// One request on a connection of its own (no keep-alive: nothing idles in the proxy).
Reply get(int port, const std::string& path, const httplib::Headers& headers = {}) {
  return to_reply(client(port, false)->Get(path.c_str(), headers));
}

Reply put(int port, const std::string& path, const std::string& body, const std::string& token = "") {
  httplib::Headers h;
  if (!token.empty()) h.emplace("Authorization", "Bearer " + token);
  return to_reply(client(port, false)->Put(path.c_str(), h, body, "application/json"));
}

std::size_t count_of(const std::map<std::string, std::size_t>& m, const std::string& key) {
  auto it = m.find(key);
  return it == m.end() ? 0 : it->second;
}

std::string describe(const std::map<std::string, std::size_t>& m) {
  std::string out;
  for (const auto& [name, n] : m) out += (out.empty() ? "" : ", ") + name + ": " + std::to_string(n);
  return out.empty() ? "nobody" : out;
}

// Sends `n` GETs over one kept-alive connection, which one proxy thread serves, so the
// round robin sequence is that thread's own: over whole periods the counts are exact.
// Every answer must be a 200 whose X-Backend names the body's backend.
std::map<std::string, std::size_t> tally(int port, const std::string& path, std::size_t n,
                                         const std::string& host = "") {
  auto c = client(port, true);
  httplib::Headers h;
  if (!host.empty()) h.emplace("Host", host);
  std::map<std::string, std::size_t> counts;
  for (std::size_t i = 0; i < n; ++i) {
    Reply r = to_reply(c->Get(path.c_str(), h));
    REQUIRE_MESSAGE(r.status == 200, "request " << i << " to " << path << ": " << r.describe());
    REQUIRE(r.header("X-Backend") == r.body);
    ++counts[r.body];
  }
  return counts;
}

// Which backend answers one GET (its body), or a description of what came instead.
std::string who(int port, const std::string& path, const std::string& host = "") {
  httplib::Headers h;
  if (!host.empty()) h.emplace("Host", host);
  Reply r = get(port, path, h);
  return r.status == 200 ? r.body : r.describe();
}

// Prometheus text format 0.0.4, read strictly: the metrics test's oracle.
struct Sample {
  std::string name;
  std::map<std::string, std::string> labels;
  double value = 0;
};

struct Exposition {
  std::vector<Sample> samples;
  std::map<std::string, std::string> types; ///< family → counter or gauge

  // The value of the one sample with exactly these labels; nullopt when absent.
  std::optional<double> value(const std::string& name, const std::map<std::string, std::string>& labels = {}) const {
    for (const Sample& s : samples)
      if (s.name == name && s.labels == labels) return s.value;
    return std::nullopt;
  }
};

bool metric_name(const std::string& s) {
  if (s.empty()) return false;
  for (std::size_t i = 0; i < s.size(); ++i) {
    const char c = s[i];
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == ':' ||
                    (i > 0 && c >= '0' && c <= '9');
    if (!ok) return false;
  }
  return true;
}

bool label_name(const std::string& s) {
  return metric_name(s) && s.find(':') == std::string::npos && s.rfind("__", 0) != 0;
}

// Parses `text` into `out`; an empty string, or what is wrong and on which line.
std::string parse_prometheus(const std::string& text, Exposition& out) {
  if (text.empty() || text.back() != '\n') return "the text does not end with a newline";
  std::set<std::string> helped, closed, series;
  std::string current; // the family whose samples are being read
  std::istringstream lines(text);
  std::string line;
  for (std::size_t n = 1; std::getline(lines, line); ++n) {
    const std::string where = "line " + std::to_string(n) + " \"" + line + "\": ";
    if (line.empty()) return where + "empty line";
    if (line[0] == '#') {
      std::istringstream words(line.substr(1));
      std::string keyword, name, rest;
      words >> keyword >> name;
      if (keyword != "HELP" && keyword != "TYPE") continue; // a plain comment
      if (!metric_name(name)) return where + "bad metric name";
      std::getline(words, rest);
      if (rest.empty() || rest[0] != ' ') return where + "no text after the name";
      rest.erase(0, 1);
      if (series.count(name) || closed.count(name) || current == name) return where + keyword + " after samples";
      if (keyword == "HELP") {
        if (!helped.insert(name).second) return where + "a second HELP";
        for (std::size_t i = 0; i < rest.size(); ++i)
          if (rest[i] == '\\' && (i + 1 == rest.size() || (rest[i + 1] != '\\' && rest[i + 1] != 'n')))
            return where + "a bad escape in HELP";
          else if (rest[i] == '\\')
            ++i;
      } else {
        if (out.types.count(name)) return where + "a second TYPE";
        if (rest != "counter" && rest != "gauge") return where + "TYPE is not counter or gauge";
        if (rest == "counter" && (name.size() < 6 || name.compare(name.size() - 6, 6, "_total") != 0))
          return where + "a counter whose name does not end in _total";
        out.types[name] = rest;
      }
      continue;
    }
    Sample s;
    std::size_t i = 0;
    while (i < line.size() && line[i] != '{' && line[i] != ' ') ++i;
    s.name = line.substr(0, i);
    if (!metric_name(s.name)) return where + "bad metric name";
    if (i < line.size() && line[i] == '{') {
      ++i;
      while (i < line.size() && line[i] != '}') {
        std::size_t eq = line.find('=', i);
        if (eq == std::string::npos) return where + "a label without =";
        const std::string key = line.substr(i, eq - i);
        if (!label_name(key)) return where + "bad label name \"" + key + "\"";
        if (eq + 1 >= line.size() || line[eq + 1] != '"') return where + "a label value without quotes";
        std::string value;
        std::size_t j = eq + 2;
        for (; j < line.size() && line[j] != '"'; ++j) {
          if (line[j] != '\\') {
            value += line[j];
            continue;
          }
          if (++j == line.size()) return where + "a label value ends in a backslash";
          if (line[j] == '\\' || line[j] == '"')
            value += line[j];
          else if (line[j] == 'n')
            value += '\n';
          else
            return where + "a bad escape in a label value";
        }
        if (j == line.size()) return where + "an unterminated label value";
        if (!s.labels.emplace(key, value).second) return where + "label " + key + " twice";
        i = j + 1;
        if (i < line.size() && line[i] == ',') {
          ++i;
          if (i < line.size() && line[i] == '}') return where + "a trailing comma";
        } else if (i < line.size() && line[i] != '}') {
          return where + "labels not separated by commas";
        }
      }
      if (i == line.size()) return where + "unterminated labels";
      ++i;
    }
    if (i >= line.size() || line[i] != ' ') return where + "no space before the value";
    const std::string number = line.substr(i + 1);
    char* end = nullptr;
    errno = 0;
    s.value = std::strtod(number.c_str(), &end);
    if (number.empty() || end != number.c_str() + number.size() || number[0] == ' ' || errno == ERANGE)
      return where + "the value is not one number";
    if (!helped.count(s.name)) return where + "no HELP before the sample";
    if (!out.types.count(s.name)) return where + "no TYPE before the sample";
    if (out.types[s.name] == "counter" && !(s.value >= 0)) return where + "a negative counter";
    if (s.name != current) {
      if (closed.count(s.name)) return where + "the family's samples are not together";
      if (!current.empty()) closed.insert(current);
      current = s.name;
    }
    std::string key = s.name;
    for (const auto& [k, v] : s.labels) key += "|" + k + "=" + v;
    if (!series.insert(key).second) return where + "the same series twice";
    out.samples.push_back(std::move(s));
  }
  return {};
}

Exposition scrape(RunningProxy& proxy) {
  Reply r = get(proxy.admin_port(), "/metrics");
  REQUIRE_MESSAGE(r.status == 200, r.describe());
  CHECK(r.header("Content-Type").rfind("text/plain; version=0.0.4", 0) == 0);
  Exposition e;
  const std::string why = parse_prometheus(r.body, e);
  INFO("metrics:\n" << r.body);
  REQUIRE_MESSAGE(why.empty(), why);
  return e;
}

double metric(const Exposition& e, const std::string& name, const std::map<std::string, std::string>& labels = {}) {
  auto v = e.value(name, labels);
  REQUIRE_MESSAGE(v.has_value(), "no sample " << name << " with those labels");
  return *v;
}

json peer_status(const json& status, const std::string& id) {
  for (const json& p : status["peers"])
    if (p["id"] == id) return p;
  FAIL("no peer " << id << " in " << status.dump());
  return {};
}

ExitStatus check_config(const std::string& path, std::string& out, std::string& err) {
  Process p({DYNUP_PROXY_BIN, "--config", path, "--check"});
  auto st = p.wait_exit(start_timeout);
  REQUIRE_MESSAGE(st.has_value(), "dynup-proxy --check did not exit");
  out = p.read_all(Stream::out, 1000ms);
  err = p.read_all(Stream::err, 1000ms);
  return *st;
}

} // namespace

TEST_CASE("proxy: routes by host, then the longest prefix, and follows weights exactly") {
  Backend w1("w1"), w2("w2"), a1("a1");
  TempDir dir;
  write_by_rename(dir.file("web.json"), peers_doc({peer(w1, 1), peer(w2, 2)}));
  write_by_rename(dir.file("api.json"), peers_doc({peer(a1)}));
  json routes = json::array({route("web.example", "/", "web"), route("", "/api", "api"),
                             route("", "/api/v2/legacy", "web"), route("", "/web", "web"),
                             route("api.example", "/web", "api")});
  RunningProxy proxy(write_config(
      dir, proxy_config(json::array({file_upstream("web", dir.file("web.json")), file_upstream("api", dir.file("api.json"))}),
                        routes)));
  const int port = proxy.port();

  auto web = [](const std::string& answer) { return answer == "w1" || answer == "w2"; };
  CHECK(who(port, "/api/users") == "a1");
  CHECK(web(who(port, "/api/v2/legacy/item")));            // the longer prefix beats /api
  CHECK(web(who(port, "/web/index.html")));
  CHECK(web(who(port, "/api/users", "web.example")));      // a host route beats a longer hostless one
  CHECK(web(who(port, "/anything", "WEB.Example:8080")));  // the host without its port, in any case
  CHECK(who(port, "/web/page", "api.example") == "a1");     // the host's /web beats the hostless /web
  CHECK(who(port, "/api/users", "api.example") == "a1");    // no route of that host matches: hostless /api

  for (auto [host, path] : {std::pair<std::string, std::string>{"other.example", "/other"}, {"", "/"}}) {
    CAPTURE(path);
    httplib::Headers h;
    if (!host.empty()) h.emplace("Host", host);
    Reply r = get(port, path, h);
    CHECK(r.status == 404);
    CHECK(contains(r.body, "no route"));
    CHECK(contains(r.body, path));
    if (!host.empty()) CHECK(contains(r.body, host));
  }
  CHECK(a1.requests() == 3);

  // Smooth weighted round robin over whole periods: exactly 1:2.
  auto counts = tally(port, "/web/x", 60);
  INFO("answers: " << describe(counts));
  CHECK(count_of(counts, "w1") == 20);
  CHECK(count_of(counts, "w2") == 40);
  CHECK(count_of(counts, "a1") == 0);
}

TEST_CASE("proxy: the access log escapes what a client sends, so it cannot forge lines") {
  Backend a("a");
  TempDir dir;
  const std::string peers = dir.file("peers.json");
  write_by_rename(peers, peers_doc({peer(a)}));
  json config = proxy_config(json::array({file_upstream("svc", peers)}));
  config["access_log"] = true;
  RunningProxy proxy(write_config(dir, config));
  // cpp-httplib percent-decodes the path: %0A is a newline, %22 a quote, %5C a backslash.
  Reply r = get(proxy.port(), "/x%0A127.0.0.1%20%22GET%20/forged%22%5C%7F%C3%A9");
  CHECK(r.status == 200); // forwarded: the proxy matches a path with a decoded newline
  CHECK(r.header("X-Backend") == "a");
  const std::string log = proxy.log();
  CHECK(contains(log, R"("GET /x\x0A127.0.0.1 \x22GET /forged\x22\x5C\x7F\xC3\xA9" svc )"));
  CHECK_FALSE(contains(log, "\n127.0.0.1 \"GET /forged"));
}

TEST_CASE("proxy: a rewritten peer file moves traffic without a restart") {
  Backend a("a"), b("b"), c("c");
  TempDir dir;
  const std::string peers = dir.file("peers.json");
  write_by_rename(peers, peers_doc({peer(a), peer(b), peer(c)}));
  RunningProxy proxy(write_config(dir, proxy_config(json::array({file_upstream("svc", peers)}))));
  const pid_t pid = proxy.process().pid();

  auto before = tally(proxy.port(), "/", 30);
  INFO("before: " << describe(before));
  CHECK(count_of(before, "a") == 10);
  CHECK(count_of(before, "b") == 10);
  CHECK(count_of(before, "c") == 10);
  const std::uint64_t v0 = proxy.version("svc");

  // c leaves, b's weight goes to 3.
  write_by_rename(peers, peers_doc({peer(a, 1), peer(b, 3)}));
  REQUIRE(wait_until([&] { return proxy.version("svc") > v0; }, change_timeout));
  json st = proxy.status("svc");
  REQUIRE(st["peers"].size() == 2);
  CHECK(peer_status(st, "b")["weight"] == 3);

  const std::size_t c_before = c.requests();
  auto after = tally(proxy.port(), "/", 40);
  INFO("after: " << describe(after));
  CHECK(count_of(after, "c") == 0);
  CHECK(c.requests() == c_before);
  CHECK(count_of(after, "a") == 10);
  CHECK(count_of(after, "b") == 30);

  // The same process all along: it never exited, and it started once.
  CHECK(proxy.process().pid() == pid);
  CHECK_FALSE(proxy.process().wait_exit(0ms).has_value());
  const std::string& log = proxy.log();
  CHECK(log.find("proxy listening") == log.rfind("proxy listening"));
}

TEST_CASE("proxy: a peer that leaves the set takes its pooled connections with it") {
  // Addresses that come and go (a new one on every deploy) must not keep idle
  // connections, and the memory of their pools, for ever.
  Backend a("a"), b("b");
  TempDir dir;
  const std::string peers = dir.file("peers.json");
  write_by_rename(peers, peers_doc({peer(a), peer(b)}));
  RunningProxy proxy(write_config(dir, proxy_config(json::array({file_upstream("svc", peers)}))));
  const std::map<std::string, std::string> svc{{"upstream", "svc"}};

  // One client connection, so one request at a time: each takes its peer's idle
  // connection (or makes one) and gives it back.
  auto before = tally(proxy.port(), "/", 10);
  REQUIRE(count_of(before, "a") == 5);
  REQUIRE(count_of(before, "b") == 5);
  CHECK(metric(scrape(proxy), "dynup_proxy_idle_connections", svc) == 2);

  const std::uint64_t v0 = proxy.version("svc");
  write_by_rename(peers, peers_doc({peer(a)}));
  REQUIRE(wait_until([&] { return proxy.version("svc") > v0; }, change_timeout));
  // The scrape itself prunes: b's pool went with b.
  CHECK(metric(scrape(proxy), "dynup_proxy_idle_connections", svc) == 1);

  auto after = tally(proxy.port(), "/", 4);
  CHECK(count_of(after, "a") == 4);
  CHECK(metric(scrape(proxy), "dynup_proxy_idle_connections", svc) == 1);

  // b comes back: a new pool, a new connection.
  const std::uint64_t v1 = proxy.version("svc");
  write_by_rename(peers, peers_doc({peer(a), peer(b)}));
  REQUIRE(wait_until([&] { return proxy.version("svc") > v1; }, change_timeout));
  auto again = tally(proxy.port(), "/", 4);
  CHECK(count_of(again, "b") == 2);
  CHECK(metric(scrape(proxy), "dynup_proxy_idle_connections", svc) == 2);
}

TEST_CASE("proxy: PUT replaces a push upstream's peers, and a refused PUT changes nothing") {
  Backend p1("p1"), p2("p2"), p3("p3"), f1("f1");
  TempDir dir;
  write_by_rename(dir.file("file.json"), peers_doc({peer(f1)}));
  json config = proxy_config(json::array({push_upstream("pushed"), file_upstream("filed", dir.file("file.json"))}),
                             json::array({route("", "/push", "pushed"), route("", "/", "filed")}));
  config["limits"]["max_push_peers"] = 3;
  config["admin"]["writes_without_token"] = true;
  RunningProxy proxy(write_config(dir, config));
  const int admin = proxy.admin_port();

  // Nothing pushed yet: no peer, and the client is told when to come back.
  Reply empty = get(proxy.port(), "/push/x");
  CHECK(empty.status == 503);
  CHECK(empty.header("Retry-After") == "1");

  Reply first = put(admin, "/upstreams/pushed/peers", peers_doc({peer(p1), peer(p2)}));
  REQUIRE_MESSAGE(first.status == 200, first.describe());
  json body = json::parse(first.body);
  CHECK(body["upstream"] == "pushed");
  CHECK(body["changed"] == true);
  CHECK(body["peers"] == 2);
  const std::uint64_t v1 = body["version"].get<std::uint64_t>();
  auto split = tally(proxy.port(), "/push/x", 20);
  INFO("after the first push: " << describe(split));
  CHECK(count_of(split, "p1") == 10);
  CHECK(count_of(split, "p2") == 10);

  Reply second = put(admin, "/upstreams/pushed/peers", peers_doc({peer(p2, 1), peer(p3, 3)}));
  REQUIRE_MESSAGE(second.status == 200, second.describe());
  const std::uint64_t v2 = json::parse(second.body)["version"].get<std::uint64_t>();
  CHECK(v2 > v1);
  auto moved = tally(proxy.port(), "/push/x", 20);
  INFO("after the second push: " << describe(moved));
  CHECK(count_of(moved, "p1") == 0);
  CHECK(count_of(moved, "p2") == 5);
  CHECK(count_of(moved, "p3") == 15);

  // The same set again: accepted, unchanged, same version.
  Reply again = put(admin, "/upstreams/pushed/peers", peers_doc({peer(p3, 3), peer(p2, 1)}));
  REQUIRE_MESSAGE(again.status == 200, again.describe());
  CHECK(json::parse(again.body)["changed"] == false);
  CHECK(json::parse(again.body)["version"] == v2);

  Reply not_json = put(admin, "/upstreams/pushed/peers", R"({"peers": [ this is not json)");
  CHECK(not_json.status == 400);
  CHECK(json::parse(not_json.body).contains("error"));

  Reply bad_port = put(admin, "/upstreams/pushed/peers",
                       R"({"peers":[{"host":"127.0.0.1","port":)" + std::to_string(p1.port()) +
                           R"(},{"host":"127.0.0.1","port":99999}]})");
  CHECK(bad_port.status == 400);
  CHECK(contains(json::parse(bad_port.body).value("error", ""), "peers[1].port"));

  Reply too_many = put(admin, "/upstreams/pushed/peers", peers_doc({peer(p1), peer(p2), peer(p3), peer(f1)}));
  CHECK(too_many.status == 413);
  CHECK(contains(too_many.body, "max_push_peers"));

  Reply to_file = put(admin, "/upstreams/filed/peers", peers_doc({peer(p1)}));
  CHECK(to_file.status == 409);
  CHECK(contains(json::parse(to_file.body).value("error", ""), "push://"));

  Reply unknown = put(admin, "/upstreams/nosuch/peers", peers_doc({peer(p1)}));
  CHECK(unknown.status == 404);
  CHECK(contains(unknown.body, "nosuch"));

  Reply wrong_method = to_reply(client(admin, false)->Post("/upstreams/pushed/peers", peers_doc({peer(p1)}), "application/json"));
  CHECK(wrong_method.status == 405);
  CHECK(wrong_method.header("Allow") == "PUT");

  // None of the refused requests changed what is served.
  CHECK(proxy.version("pushed") == v2);
  CHECK(proxy.status("pushed")["peers"].size() == 2);
  auto still = tally(proxy.port(), "/push/x", 20);
  INFO("after the refused pushes: " << describe(still));
  CHECK(count_of(still, "p2") == 5);
  CHECK(count_of(still, "p3") == 15);
  CHECK(count_of(tally(proxy.port(), "/", 3), "f1") == 3);
}

TEST_CASE("proxy: with an admin token a PUT needs it, reads stay open, and the token is never shown") {
  Backend p1("p1");
  TempDir dir;
  const std::string token = "tok-4f1c2a9e7b3d5e60";
  REQUIRE(::setenv("DYNUP_PROXY_TEST_TOKEN", token.c_str(), 1) == 0);
  json config = proxy_config(json::array({push_upstream("pushed")}));
  config["admin"]["token_env"] = "DYNUP_PROXY_TEST_TOKEN";
  RunningProxy proxy(write_config(dir, config));
  ::unsetenv("DYNUP_PROXY_TEST_TOKEN");
  const int admin = proxy.admin_port();
  const std::string doc = peers_doc({peer(p1)});

  Reply none = put(admin, "/upstreams/pushed/peers", doc);
  CHECK(none.status == 401);
  CHECK(contains(none.header("WWW-Authenticate"), "Bearer"));
  std::string last_char = token;
  last_char.back() = last_char.back() == '0' ? '1' : '0';
  for (const std::string& wrong : {std::string("not-the-token-at-all"), last_char, token.substr(0, token.size() - 1),
                                   token + "x"}) {
    CAPTURE(wrong);
    Reply r = put(admin, "/upstreams/pushed/peers", doc, wrong);
    CHECK(r.status == 401);
    CHECK(contains(r.header("WWW-Authenticate"), "Bearer"));
  }
  Reply basic = to_reply(client(admin, false)->Put("/upstreams/pushed/peers",
                                                   {{"Authorization", "Basic " + token}}, doc, "application/json"));
  CHECK(basic.status == 401);
  CHECK(proxy.status("pushed")["peers"].empty());

  Reply right = put(admin, "/upstreams/pushed/peers", doc, token);
  REQUIRE_MESSAGE(right.status == 200, right.describe());
  CHECK(who(proxy.port(), "/") == "p1");

  for (const char* path : {"/upstreams", "/upstreams/pushed", "/metrics", "/healthz"}) {
    CAPTURE(path);
    Reply r = get(admin, path);
    CHECK(r.status == 200);
    CHECK_FALSE(contains(r.body, token));
    for (const auto& [name, value] : r.headers) CHECK_FALSE(contains(value, token));
  }
  for (const Reply& r : {none, basic, right}) CHECK_FALSE(contains(r.body, token));

  auto st = proxy.process().stop(5000ms);
  CHECK(st.exited);
  const std::string& log = proxy.log(500ms);
  CHECK(contains(log, "refused PUT")); // the refusals were logged…
  CHECK_FALSE(contains(log, token));    // …without the token
  CHECK_FALSE(contains(log, token.substr(0, token.size() - 1)));
}

TEST_CASE("proxy: without a token, writes are off and a PUT changes nothing") {
  Backend p1("p1");
  TempDir dir;
  RunningProxy proxy(write_config(dir, proxy_config(json::array({push_upstream("pushed")}))));
  Reply r = put(proxy.admin_port(), "/upstreams/pushed/peers", peers_doc({peer(p1)}));
  CHECK(r.status == 403);
  CHECK(contains(r.body, "writes are off: set admin.token_env or admin.token_file"));
  CHECK(proxy.status("pushed")["peers"].empty());
  CHECK(get(proxy.port(), "/").status == 503);
  CHECK(contains(proxy.log(), "refused PUT /upstreams/pushed/peers from 127.0.0.1: writes are off"));
}

TEST_CASE("proxy: a pushed set saved to snapshot_path is served again after a restart") {
  Backend p1("p1"), p2("p2");
  TempDir dir;
  json up = push_upstream("pushed");
  up["snapshot_path"] = dir.file("pushed.snap");
  json doc = proxy_config(json::array({up}));
  doc["admin"]["writes_without_token"] = true;
  const std::string config = write_config(dir, doc);
  std::uint64_t pushed_index = 0; // the push count, which the snapshot carries over
  {
    RunningProxy proxy(config);
    CHECK(get(proxy.port(), "/").status == 503);
    Reply r = put(proxy.admin_port(), "/upstreams/pushed/peers", peers_doc({peer(p1, 1), peer(p2, 3)}));
    REQUIRE_MESSAGE(r.status == 200, r.describe());
    CHECK_FALSE(json::parse(r.body).contains("persist_error"));
    pushed_index = proxy.status("pushed")["index"].get<std::uint64_t>();
    auto st = proxy.process().stop(5000ms);
    CHECK(st.exited);
    CHECK(st.code == 0);
  }
  CHECK(dynup_test::exists(dir.file("pushed.snap")));

  RunningProxy again(config);
  json st = again.status("pushed");
  REQUIRE(st["peers"].size() == 2);
  CHECK(peer_status(st, "p2")["weight"] == 3);
  CHECK(pushed_index >= 1);
  CHECK(st["index"].get<std::uint64_t>() == pushed_index);
  auto counts = tally(again.port(), "/", 40);
  INFO("after the restart: " << describe(counts));
  CHECK(count_of(counts, "p1") == 10);
  CHECK(count_of(counts, "p2") == 30);
}

TEST_CASE("proxy: a refused connect is retried on another peer, and the dead peer is taken out") {
  Backend l1("l1"), l2("l2");
  DeadPort dead, dead_a, dead_b;
  TempDir dir;
  write_by_rename(dir.file("mixed.json"), peers_doc({{"dead", dead.port()}, peer(l1), peer(l2)}));
  write_by_rename(dir.file("gone.json"), peers_doc({{"gone-a", dead_a.port()}, {"gone-b", dead_b.port()}}));
  RunningProxy proxy(write_config(
      dir, proxy_config(json::array({file_upstream("mixed", dir.file("mixed.json")),
                                     file_upstream("gone", dir.file("gone.json"))}),
                        json::array({route("", "/gone", "gone"), route("", "/", "mixed")}))));

  // Each of the first three requests on a thread picks a different peer: one of them
  // is the dead one, and its request goes on to a live peer.
  auto counts = tally(proxy.port(), "/", 30);
  INFO("answers: " << describe(counts));
  CHECK(count_of(counts, "l1") + count_of(counts, "l2") == 30);

  Exposition m = scrape(proxy);
  CHECK(metric(m, "dynup_retries_total", {{"upstream", "mixed"}}) >= 1);
  CHECK(metric(m, "dynup_upstream_failures_total", {{"upstream", "mixed"}, {"kind", "connect"}}) >= 1);
  CHECK(metric(m, "dynup_peer_failures_total", {{"upstream", "mixed"}, {"peer", "dead"}}) >= 1);
  CHECK(metric(m, "dynup_peer_failures_total", {{"upstream", "mixed"}, {"peer", "l1"}}) == 0);

  REQUIRE(wait_until([&] { return peer_status(proxy.status("mixed"), "dead")["available"] == false; }, change_timeout));
  json dead_peer = peer_status(proxy.status("mixed"), "dead");
  CHECK(contains(dead_peer["reason"].get<std::string>(), "passive"));
  CHECK(peer_status(proxy.status("mixed"), "l1")["available"] == true);

  // With every peer dead the client gets a 502 that says why.
  for (int i = 0; i < 3; ++i) {
    CAPTURE(i);
    Reply r = get(proxy.port(), "/gone/x");
    CHECK(r.status == 502);
    CHECK(contains(r.body, "upstream gone"));
    CHECK(contains(r.body, "connect to gone-"));
  }
}

TEST_CASE("proxy: forwarding headers, bodies, and the body limits") {
  Backend h("h", 32768);
  TempDir dir;
  write_by_rename(dir.file("h.json"), peers_doc({peer(h)}));
  json config = proxy_config(json::array({file_upstream("h", dir.file("h.json"))}));
  config["limits"]["max_request_body_bytes"] = 65536;
  config["limits"]["max_response_body_bytes"] = 16384;
  RunningProxy proxy(write_config(dir, config));
  const int port = proxy.port();
  auto last_seen = [&] {
    auto all = h.seen();
    REQUIRE_FALSE(all.empty());
    return all.back();
  };
  auto header = [](const Seen& s, const std::string& name) {
    auto it = s.headers.find(name);
    return it == s.headers.end() ? std::string("<absent>") : it->second;
  };

  SUBCASE("X-Forwarded-For gets the client's address appended, X-Forwarded-Proto is set") {
    REQUIRE(get(port, "/xff", {{"X-Forwarded-For", "1.2.3.4"}}).status == 200);
    Seen s = last_seen();
    CHECK(header(s, "X-Forwarded-For") == "1.2.3.4, 127.0.0.1");
    CHECK(s.headers.count("X-Forwarded-For") == 1);
    CHECK(header(s, "X-Forwarded-Proto") == "http");
    REQUIRE(get(port, "/xff").status == 200);
    CHECK(header(last_seen(), "X-Forwarded-For") == "127.0.0.1");
  }

  SUBCASE("hop-by-hop headers and the headers Connection names are not forwarded") {
    auto kept = client(port, true);
    Reply r = to_reply(kept->Get("/hop", {{"Connection", "keep-alive, X-Hop-Secret"},
                                          {"X-Hop-Secret", "s1"},
                                          {"Keep-Alive", "timeout=5"},
                                          {"Proxy-Authorization", "Basic Zm9vOmJhcg=="},
                                          {"Proxy-Connection", "keep-alive"},
                                          {"X-End-To-End", "kept"}}));
    REQUIRE_MESSAGE(r.status == 200, r.describe());
    Seen s = last_seen();
    CHECK(header(s, "X-End-To-End") == "kept");
    for (const char* name : {"Connection", "X-Hop-Secret", "Keep-Alive", "Proxy-Authorization", "Proxy-Connection"}) {
      CAPTURE(name);
      CHECK(header(s, name) == "<absent>");
    }
    // A client that closes its connection: its Connection: close stays with it.
    REQUIRE(get(port, "/close", {{"Connection", "close"}}).status == 200);
    CHECK(header(last_seen(), "Connection") == "<absent>");
    CHECK(last_seen().path == "/close");
  }

  SUBCASE("a POST body reaches the backend byte for byte") {
    std::string body;
    for (std::size_t i = 0; i < 40000; ++i) body += static_cast<char>((i * 7 + i / 256) % 256);
    Reply r = to_reply(client(port, false)->Post("/upload?x=1", body, "application/octet-stream"));
    REQUIRE_MESSAGE(r.status == 200, r.describe());
    Seen s = last_seen();
    CHECK(s.method == "POST");
    CHECK(s.path == "/upload");
    CHECK(header(s, "Content-Type") == "application/octet-stream");
    CHECK(s.body.size() == body.size());
    CHECK(s.body == body);
  }

  SUBCASE("a request body over max_request_body_bytes is refused with 413 before the backend") {
    const std::size_t before = h.requests();
    Reply r = to_reply(client(port, false)->Post("/upload", std::string(65537, 'b'), "application/octet-stream"));
    CHECK(r.status == 413);
    CHECK(contains(r.body, "max_request_body_bytes"));
    CHECK(h.requests() == before);
    Reply at_limit = to_reply(client(port, false)->Post("/upload", std::string(65536, 'b'), "application/octet-stream"));
    CHECK(at_limit.status == 200);
    CHECK(h.requests() == before + 1);
  }

  SUBCASE("a reply over max_response_body_bytes becomes a 502") {
    Reply r = get(port, "/big");
    CHECK(r.status == 502);
    CHECK(contains(r.body, "max_response_body_bytes"));
    CHECK(r.body.size() < 16384);
    CHECK(h.requests() == 1); // not retried
    Exposition m = scrape(proxy);
    CHECK(metric(m, "dynup_upstream_failures_total", {{"upstream", "h"}, {"kind", "too_large"}}) == 1);
  }
}

TEST_CASE("proxy: the strict Prometheus parser refuses malformed text") {
  const std::string help = "# HELP a_total A.\n# TYPE a_total counter\n";
  const std::vector<std::string> malformed{
      "a_total 1\n",                                                    // no HELP or TYPE
      "# HELP a A.\n# TYPE a counter\na 1\n",                            // a counter without _total
      help + "a_total{x=\"\\q\"} 1\n",                                   // a bad escape
      help + "a_total{x=\"1\",} 1\n",                                    // a trailing comma
      help + "a_total one\n",                                            // not a number
      help + "a_total 1",                                                // no final newline
      help + "a_total{x=\"1\"} 1\na_total{x=\"1\"} 2\n",                 // the same series twice
      "# HELP b A.\n# TYPE b summary\nb 1\n",                            // neither counter nor gauge
      help + "# HELP b B.\n# TYPE b gauge\na_total 1\nb 1\na_total{y=\"2\"} 1\n", // a family split
      help + "9a_total 1\n",                                             // a bad name
  };
  for (const std::string& bad : malformed) {
    CAPTURE(bad);
    Exposition e;
    CHECK_FALSE(parse_prometheus(bad, e).empty());
  }
  Exposition e;
  CHECK(parse_prometheus(help + "a_total{x=\"q\\\"\\\\\\n\"} 3\n", e).empty());
  CHECK(e.value("a_total", {{"x", "q\"\\\n"}}) == 3.0);
}

TEST_CASE("proxy: /metrics is valid Prometheus text whose counts match the traffic sent") {
  Backend b1("b1"), b2("b2");
  TempDir dir;
  const std::string odd = R"(odd "id" \ 1)"; // a peer id a label must escape
  write_by_rename(dir.file("m.json"), peers_doc({{odd, b1.port(), 1}, peer(b2)}));
  RunningProxy proxy(write_config(
      dir, proxy_config(json::array({file_upstream("m", dir.file("m.json"))}), json::array({route("", "/m", "m")}))));

  auto counts = tally(proxy.port(), "/m/ok", 24);
  CHECK(count_of(counts, "b1") == 12);
  CHECK(count_of(counts, "b2") == 12);
  for (int i = 0; i < 3; ++i) CHECK(get(proxy.port(), "/m/status/404").status == 404);
  for (int i = 0; i < 2; ++i) CHECK(get(proxy.port(), "/nothing").status == 404);

  Exposition e = scrape(proxy);
  const std::map<std::string, std::string> m{{"upstream", "m"}};
  auto with = [&](std::map<std::string, std::string> extra) {
    extra.insert(m.begin(), m.end());
    return extra;
  };
  CHECK(e.types.at("dynup_picks_total") == "counter");
  CHECK(e.types.at("dynup_upstream_peers") == "gauge");
  CHECK(metric(e, "dynup_picks_total", m) == 27);
  CHECK(metric(e, "dynup_responses_total", with({{"code", "2xx"}})) == 24);
  CHECK(metric(e, "dynup_responses_total", with({{"code", "4xx"}})) == 3);
  CHECK(metric(e, "dynup_responses_total", with({{"code", "5xx"}})) == 0);
  CHECK(metric(e, "dynup_retries_total", m) == 0);
  CHECK(metric(e, "dynup_pick_failures_total", m) == 0);
  CHECK(metric(e, "dynup_proxy_no_route_total") == 2);
  CHECK(metric(e, "dynup_proxy_requests_in_flight") == 0);
  CHECK(metric(e, "dynup_upstream_peers", m) == 2);
  CHECK(metric(e, "dynup_upstream_version", m) == static_cast<double>(proxy.version("m")));
  CHECK(metric(e, "dynup_upstream_version", m) >= 1);
  CHECK(metric(e, "dynup_upstream_stale", m) == 0);
  CHECK(metric(e, "dynup_peer_available", with({{"peer", odd}})) == 1);
  CHECK(metric(e, "dynup_peer_weight", with({{"peer", "b2"}})) == 1);
  CHECK(metric(e, "dynup_peer_failures_total", with({{"peer", odd}})) == 0);
  CHECK(metric(e, "dynup_pushes_total", with({{"result", "accepted"}})) == 0);
}

TEST_CASE("proxy: SIGTERM finishes the request in flight, refuses new connections and exits 0") {
  Backend slow("slow");
  TempDir dir;
  write_by_rename(dir.file("s.json"), peers_doc({peer(slow)}));
  json config = proxy_config(json::array({file_upstream("s", dir.file("s.json"))}));
  config["limits"]["drain_timeout_ms"] = 60000; // the request is held until the checks below are done
  RunningProxy proxy(write_config(dir, config));
  const int port = proxy.port();

  Reply reply;
  std::atomic<bool> done{false};
  std::thread request([&] {
    reply = get(port, "/hold");
    done = true;
  });
  REQUIRE(wait_until([&] { return slow.requests() == 1; }, change_timeout)); // at the backend now
  proxy.process().send(SIGTERM);
  CHECK(proxy.log_shows("draining"));
  CHECK(contains(proxy.log(0ms), "draining 1 request(s) in flight"));
  // While it drains: the listener is closed and /healthz says so.
  CHECK(wait_until([&] { return connect_refused(port); }, change_timeout));
  CHECK(get(proxy.admin_port(), "/healthz").status == 503);
  const bool was_in_flight = !done; // held at the backend until now
  slow.release();

  request.join();
  CHECK(was_in_flight);
  CHECK_MESSAGE(reply.status == 200, reply.describe());
  CHECK(reply.body == "slow");
  auto st = proxy.process().wait_exit(5000ms);
  REQUIRE_MESSAGE(st.has_value(), "still running 5 s after SIGTERM");
  CHECK(st->exited);
  CHECK(st->code == 0);
  CHECK(connect_refused(port));
  const std::string& log = proxy.log();
  CHECK(contains(log, "stopped"));
  CHECK_FALSE(contains(log, "drain timed out"));
}

TEST_CASE("proxy: SIGTERM with an idle kept-alive client connection exits 0 without waiting for it") {
  Backend b("b");
  TempDir dir;
  write_by_rename(dir.file("b.json"), peers_doc({peer(b)}));
  json config = proxy_config(json::array({file_upstream("b", dir.file("b.json"))}));
  config["limits"]["drain_timeout_ms"] = 3000;
  RunningProxy proxy(write_config(dir, config));

  // A browser or a pooling client keeps its connection open between requests.
  auto kept = client(proxy.port(), true);
  REQUIRE(to_reply(kept->Get("/")).status == 200);
  std::this_thread::sleep_for(200ms); // idle, as between two of a browser's requests
  proxy.process().send(SIGTERM);
  auto st = proxy.process().wait_exit(6000ms);
  REQUIRE_MESSAGE(st.has_value(), "still running 6 s after SIGTERM");
  INFO("stderr:\n" << proxy.log());
  CHECK(st->exited);
  CHECK(st->code == 0); // nothing was in flight: no reason to time out the drain
  CHECK_FALSE(contains(proxy.log(), "drain timed out"));
}

TEST_CASE("proxy: --check accepts a valid config and names the JSON path of a bad one") {
  TempDir dir;
  write_by_rename(dir.file("peers.json"), R"({"peers":["127.0.0.1:9"]})");
  const json up = file_upstream("svc", dir.file("peers.json"));
  std::string out, err;

  ExitStatus ok = check_config(write_config(dir, proxy_config(json::array({up}))), out, err);
  CHECK(ok.exited);
  CHECK(ok.code == 0);
  CHECK(contains(out, "is valid"));

  struct Case {
    std::string what;
    json config;
    std::vector<std::string> says;
  };
  json unknown_route = proxy_config(json::array({up}), json::array({route("", "/", "nope")}));
  json open_admin = proxy_config(json::array({up}));
  open_admin["admin"]["listen"] = "0.0.0.0:0";
  json unset_token = proxy_config(json::array({up}));
  unset_token["admin"]["token_env"] = "DYNUP_PROXY_TEST_UNSET_VARIABLE";
  json both = proxy_config(json::array({up}));
  {
    std::ofstream(dir.file("token")) << "tok-4f1c2a9e7b3d5e60\n";
  }
  both["admin"]["token_file"] = dir.file("token");
  both["admin"]["writes_without_token"] = true;
  json retries = proxy_config(json::array({up}));
  retries["limits"]["retries"] = 17;
  json policy = proxy_config(json::array({up}));
  policy["upstreams"][0]["policy"] = "rr";
  json prefix = proxy_config(json::array({up}), json::array({route("", "api", "svc")}));
  json header_timeout = proxy_config(json::array({up}));
  header_timeout["limits"]["header_timeout_ms"] = 10;
  const std::vector<Case> cases{
      {"a route to an unknown upstream", unknown_route, {"proxy.routes[0].upstream", "no upstream is named \"nope\""}},
      {"an admin listener off loopback without a token", open_admin, {"proxy.admin.listen", "not loopback"}},
      {"a token variable that is not set", unset_token, {"proxy.admin.token_env", "DYNUP_PROXY_TEST_UNSET_VARIABLE"}},
      {"writes_without_token beside a token", both, {"proxy.admin.writes_without_token", "one or the other"}},
      {"retries out of range", retries, {"proxy.limits.retries", "17"}},
      {"an unknown policy", policy, {"proxy.upstreams[0]", "rr"}},
      {"a prefix without a slash", prefix, {"proxy.routes[0].prefix", "must start with /"}},
      {"a header timeout below 100 ms", header_timeout, {"proxy.limits.header_timeout_ms", "10"}},
  };
  ::unsetenv("DYNUP_PROXY_TEST_UNSET_VARIABLE");
  for (const Case& c : cases) {
    CAPTURE(c.what);
    ExitStatus st = check_config(write_config(dir, c.config, "bad.json"), out, err);
    CHECK(st.exited);
    CHECK(st.code == 1);
    CHECK(out.empty());
    for (const std::string& s : c.says) {
      CAPTURE(s);
      CHECK(contains(err, s));
    }
  }

  write_by_rename(dir.file("broken.json"), R"({"listen": "127.0.0.1:0", )");
  ExitStatus broken = check_config(dir.file("broken.json"), out, err);
  CHECK(broken.code == 1);
  CHECK(contains(err, "not valid JSON"));
}

TEST_CASE("proxy: a listen port another process holds ends the start with exit 1 and the reason") {
  TempDir dir;
  write_by_rename(dir.file("peers.json"), R"({"peers":["127.0.0.1:9"]})");
  Backend holder("holder"); // listens on the port the proxy is told to take
  for (const bool admin : {false, true}) {
    CAPTURE(admin);
    json config = proxy_config(json::array({file_upstream("svc", dir.file("peers.json"))}));
    const std::string taken = "127.0.0.1:" + std::to_string(holder.port());
    (admin ? config["admin"]["listen"] : config["listen"]) = taken;
    Process p({DYNUP_PROXY_BIN, "--config", write_config(dir, config)});
    auto st = p.wait_exit(start_timeout);
    REQUIRE_MESSAGE(st.has_value(), "dynup-proxy went on without its listener");
    CHECK(st->exited);
    CHECK(st->code == 1);
    const std::string err = p.read_all(Stream::err, 1000ms);
    CHECK(contains(err, "cannot listen on " + taken + ": Address already in use"));
    CHECK(contains(err, "admin") == admin);
  }
}

TEST_CASE("proxy: wrk through the proxy while its peer file changes 100 times sees no error") {
  const std::string why = dynup_test::wrk_missing_reason();
  REQUIRE_MESSAGE(why.empty(), why);
  Backend b0("b0"), b1("b1"), b2("b2");
  TempDir dir;
  const std::string peers = dir.file("peers.json");
  const std::string two = peers_doc({peer(b0, 1), peer(b1, 2)});
  const std::string three = peers_doc({peer(b0, 2), peer(b1, 1), peer(b2, 1)});
  write_by_rename(peers, two);
  RunningProxy proxy(write_config(dir, proxy_config(json::array({file_upstream("churn", peers)}))));
  const auto published_before = proxy.status("churn")["watcher"]["publish_count"].get<std::uint64_t>();

  // wrk runs until all 100 changes are applied, each one before the next is written, then
  // SIGINT stops it (it prints its summary then); -d is only a cap for a stalled machine.
  Process wrk({dynup_test::wrk_binary(), "-t2", "-c8", "-d300s", "--timeout", "5s",
               "http://127.0.0.1:" + std::to_string(proxy.port()) + "/"});
  REQUIRE(wait_until([&] { return b0.requests() > 0 && b1.requests() > 0; }, start_timeout)); // load is flowing
  const auto churn_cap = std::chrono::steady_clock::now() + 240s;
  int applied = 0;
  for (int k = 0; k < 100 && std::chrono::steady_clock::now() < churn_cap; ++k) {
    const bool three_now = k % 2 == 0;
    write_by_rename(peers, three_now ? three : two);
    if (!wait_until([&] { return proxy.status("churn")["peers"].size() == (three_now ? 3u : 2u); }, change_timeout))
      break;
    ++applied;
  }
  CHECK(applied == 100);
  const bool wrk_ran_through = !wrk.wait_exit(0ms).has_value();
  wrk.send(SIGINT);
  const std::string out = wrk.read_all(Stream::out, 15000ms);
  auto st = wrk.wait_exit(5000ms);
  INFO("wrk:\n" << out << wrk.read_all(Stream::err, 500ms));
  REQUIRE_MESSAGE(st.has_value(), "wrk did not end");
  CHECK(st->exited);
  CHECK(st->code == 0);
  CHECK(wrk_ran_through);
  dynup_test::WrkSummary s = dynup_test::parse_wrk(out);
  CHECK(s.requests > 0);
  CHECK(s.non_2xx_3xx == 0);
  CHECK(s.socket_errors == 0);

  // The changes were taken, and the last one (two backends) is what is served.
  json now = proxy.status("churn");
  CHECK(now["peers"].size() == 2);
  CHECK(now["watcher"]["publish_count"].get<std::uint64_t>() >= published_before + 100);
  CHECK_FALSE(proxy.process().wait_exit(0ms).has_value());
  auto counts = tally(proxy.port(), "/", 30);
  INFO("after the churn: " << describe(counts));
  CHECK(count_of(counts, "b2") == 0);
  CHECK(count_of(counts, "b0") == 10);
  CHECK(count_of(counts, "b1") == 20);
}
