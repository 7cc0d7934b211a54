// dynup-proxy started by a test: the ports it says it listens on, its stderr, and its
// admin API's view of an upstream; the backends it forwards to, and its config files.
// Needs DYNUP_PROXY_BIN (tests/CMakeLists.txt).
#pragma once

#include <support/process.hpp>
#include <support/temp_dir.hpp>
#include <support/text.hpp>
#include <support/wait.hpp>

#include <doctest/doctest.h>
#include <httplib.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#ifndef DYNUP_PROXY_BIN
#error "DYNUP_PROXY_BIN must name the dynup-proxy binary (tests/CMakeLists.txt defines it)"
#endif

namespace dynup_test {

// What a backend was sent.
struct Seen {
  std::string method;
  std::string path;
  httplib::Headers headers;
  std::string body;
};

// An HTTP backend on a free loopback port that answers with its name (body and
// X-Backend, and X-Path: the path it answers) and keeps every request it was sent. A path
// containing "/hold" waits for release() first, one ending in "/big" gets `big_bytes`
// bytes, "/status/N" gets N.
class Backend {
public:
  explicit Backend(std::string name, std::size_t big_bytes = 32768) : name_(std::move(name)), big_bytes_(big_bytes) {
    // Kept-alive connections from the proxy each hold a thread: enough for wrk's.
    server_.new_task_queue = [] { return new httplib::ThreadPool(32); };
    server_.set_tcp_nodelay(true);
    server_.set_keep_alive_max_count(100000);
    server_.set_keep_alive_timeout(30);
    auto handler = [this](const httplib::Request& req, httplib::Response& res) { answer(req, res); };
    const char* any = R"([\s\S]*)"; // "." would not match a decoded %0A
    server_.Get(any, handler);
    server_.Post(any, handler);
    server_.Put(any, handler);
    server_.Delete(any, handler);
    port_ = server_.bind_to_any_port("127.0.0.1");
    if (port_ <= 0) throw std::runtime_error("backend " + name_ + ": cannot bind a loopback port");
    thread_ = std::thread([this] { server_.listen_after_bind(); });
    // stop() before the loop runs would be lost, and the destructor would wait forever.
    if (!wait_until([this] { return server_.is_running(); }, std::chrono::milliseconds(10000))) {
      thread_.detach();
      throw std::runtime_error("backend " + name_ + ": did not start");
    }
  }
  ~Backend() {
    release();
    server_.stop();
    thread_.join();
  }
  Backend(const Backend&) = delete;
  Backend& operator=(const Backend&) = delete;

  int port() const noexcept { return port_; }
  const std::string& name() const noexcept { return name_; }

  std::size_t requests() const {
    std::lock_guard<std::mutex> lock(mu_);
    return seen_.size();
  }
  std::vector<Seen> seen() const {
    std::lock_guard<std::mutex> lock(mu_);
    return seen_;
  }

  /// Lets the requests held at "/hold" (and later ones) answer.
  void release() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      released_ = true;
    }
    released_cv_.notify_all();
  }

private:
  void answer(const httplib::Request& req, httplib::Response& res) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      seen_.push_back({req.method, req.path, req.headers, req.body});
      // Bounded, so a test that fails before release() still ends.
      if (contains(req.path, "/hold")) released_cv_.wait_for(lock, std::chrono::seconds(30), [this] { return released_; });
    }
    res.set_header("X-Backend", name_);
    res.set_header("X-Path", req.path); // which request a response answers, for pipelining
    if (auto at = req.path.find("/status/"); at != std::string::npos) res.status = std::stoi(req.path.substr(at + 8));
    const bool big = req.path.size() >= 4 && req.path.compare(req.path.size() - 4, 4, "/big") == 0;
    res.set_content(big ? std::string(big_bytes_, 'x') : name_, "text/plain");
  }

  const std::string name_;
  const std::size_t big_bytes_;
  httplib::Server server_;
  int port_ = -1;
  std::thread thread_;
  mutable std::mutex mu_;
  std::vector<Seen> seen_;
  std::condition_variable released_cv_;
  bool released_ = false;
};

// One peer of a peer file or push: a backend (or a dead port) under an id, with a weight.
struct PeerSpec {
  std::string id;
  int port;
  int weight = 1;
};

inline PeerSpec peer(const Backend& b, int weight = 1) { return {b.name(), b.port(), weight}; }

inline std::string peers_doc(const std::vector<PeerSpec>& peers) {
  nlohmann::json list = nlohmann::json::array();
  for (const PeerSpec& p : peers)
    list.push_back({{"id", p.id}, {"host", "127.0.0.1"}, {"port", p.port}, {"weight", p.weight}});
  return nlohmann::json{{"peers", list}}.dump();
}

// A config with both listeners on free loopback ports and the given upstreams and routes.
inline nlohmann::json proxy_config(nlohmann::json upstreams, nlohmann::json routes = nullptr) {
  nlohmann::json c{{"listen", "127.0.0.1:0"},
         {"threads", 16},
         {"access_log", false},
         {"admin", {{"listen", "127.0.0.1:0"}}},
         {"limits", {{"drain_timeout_ms", 5000}}},
         {"upstreams", std::move(upstreams)}};
  if (!routes.is_null()) c["routes"] = std::move(routes);
  return c;
}

inline nlohmann::json file_upstream(const std::string& name, const std::string& path) {
  return {{"name", name}, {"source", "file://" + path}, {"policy", "round_robin"}};
}

inline nlohmann::json push_upstream(const std::string& name) {
  return {{"name", name}, {"source", "push://"}, {"policy", "round_robin"}};
}

inline nlohmann::json route(const std::string& host, const std::string& prefix, const std::string& upstream) {
  nlohmann::json r{{"prefix", prefix}, {"upstream", upstream}};
  if (!host.empty()) r["host"] = host;
  return r;
}

inline std::string write_config(const TempDir& dir, const nlohmann::json& config, const std::string& name = "proxy.json") {
  const std::string path = dir.file(name);
  write_by_rename(path, config.dump(2));
  return path;
}

/// dynup-proxy running on a config file; stopped (SIGTERM, then SIGKILL) by its PID on
/// destruction. The stderr lines read so far are kept for assertions on the log.
class RunningProxy {
public:
  explicit RunningProxy(const std::string& config_path,
                        std::chrono::milliseconds start_timeout = std::chrono::milliseconds(10000))
      : process_({DYNUP_PROXY_BIN, "--config", config_path}) {
    const std::string listening = "proxy listening on port ", admin_on = "admin on port ";
    for (;;) {
      auto line = process_.read_line(Process::Stream::err, start_timeout);
      REQUIRE_MESSAGE(line.has_value(), "dynup-proxy did not say it was listening; its stderr:\n" << log_);
      log_ += *line + "\n";
      if (auto at = line->find(listening); at != std::string::npos) {
        port_ = std::stoi(line->substr(at + listening.size()));
        if (auto admin = line->find(admin_on); admin != std::string::npos)
          admin_port_ = std::stoi(line->substr(admin + admin_on.size()));
        break;
      }
    }
    REQUIRE(port_ > 0);
  }

  int port() const noexcept { return port_; }
  int admin_port() const noexcept { return admin_port_; } ///< -1 without an admin listener
  Process& process() noexcept { return process_; }

  /// Everything it wrote on stderr so far, waiting up to `settle` for more. Call it now
  /// and then under load: stderr is a pipe, and a chatty proxy would block on a full one.
  const std::string& log(std::chrono::milliseconds settle = std::chrono::milliseconds(200)) {
    log_ += process_.read_all(Process::Stream::err, settle);
    return log_;
  }

  /// Reads stderr lines until one contains `text`; false after `timeout`.
  bool log_shows(const std::string& text, std::chrono::milliseconds timeout = std::chrono::milliseconds(5000)) {
    if (contains(log_, text)) return true;
    const auto until = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < until) {
      auto line = process_.read_line(Process::Stream::err, std::chrono::duration_cast<std::chrono::milliseconds>(
                                                               until - std::chrono::steady_clock::now()));
      if (!line) return false;
      log_ += *line + "\n";
      if (contains(*line, text)) return true;
    }
    return false;
  }

  /// GET /upstreams/<name> on the admin listener: the document, or a discarded value
  /// when there was no 200 with a JSON object (`why` says what came instead).
  nlohmann::json try_status(const std::string& upstream, std::string* why = nullptr) {
    httplib::Client cli("127.0.0.1", admin_port_);
    cli.set_keep_alive(false);
    cli.set_connection_timeout(2, 0);
    cli.set_read_timeout(10, 0);
    auto res = cli.Get(("/upstreams/" + upstream).c_str());
    if (!res || res->status != 200) {
      if (why) *why = res ? std::to_string(res->status) + " " + res->body : "no reply: " + httplib::to_string(res.error());
      return nlohmann::json(nlohmann::json::value_t::discarded);
    }
    auto doc = nlohmann::json::parse(res->body, nullptr, false);
    if (!doc.is_object()) {
      if (why) *why = "not a JSON object: " + res->body;
      return nlohmann::json(nlohmann::json::value_t::discarded);
    }
    return doc;
  }

  /// The same, required to succeed.
  nlohmann::json status(const std::string& upstream) {
    std::string why;
    auto doc = try_status(upstream, &why);
    REQUIRE_MESSAGE(doc.is_object(), "GET /upstreams/" << upstream << ": " << why);
    return doc;
  }
  std::uint64_t version(const std::string& upstream) { return status(upstream)["version"].get<std::uint64_t>(); }

private:
  Process process_;
  int port_ = -1;
  int admin_port_ = -1;
  std::string log_;
};

} // namespace dynup_test
