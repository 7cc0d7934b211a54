// A protocol double of the Consul HTTP API for watcher tests: written from Consul's
// documentation (api-docs/features/blocking.mdx, consistency.mdx, health.mdx,
// catalog.mdx, kv.mdx, docs/agent/limits), not from its code, and serving only what
// dynup reads: GET /v1/health/service/<svc>, /v1/catalog/service/<svc>, /v1/kv/<prefix>.
//
// Blocking is real: `index=N` returns at once when the resource's index is past N, and
// is otherwise held until it moves or `wait` (default 5m, max 10m) plus up to wait/16 of
// jitter passes, then answers the unchanged state with the same index. Every change made
// through the test API bumps one global (Raft-like) index and wakes held requests.
// Faults are injected per request; each one cites the behaviour it reproduces.
//
// Threads: one listener thread plus a small pool (cpp-httplib); every public method is
// safe from any thread. The destructor (and down()) drops open connections, wakes held
// requests and joins everything, so it returns within milliseconds.
#pragma once

#include <httplib.h>
#include <nlohmann/json.hpp>

#include <arpa/inet.h>
#include <dirent.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <initializer_list>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace dynup_test {

/// One registered instance of a service, as the double stores it.
struct ConsulInstance {
  std::string id;                        ///< Service.ID; empty: "<service>-<port>"
  std::string node = "node-1";           ///< Node.Node
  std::string node_address = "10.0.0.1"; ///< Node.Address (used when `address` is empty)
  std::string address;                   ///< Service.Address; may be empty (rule 9)
  std::uint16_t port = 0;
  std::vector<std::string> tags;
  std::map<std::string, std::string> meta;
  int weight_passing = 1;
  int weight_warning = 1;
  bool omit_weights = false; ///< answer without a Weights object, as Consul < 1.2.3 did
  /// Statuses of the instance's own checks: "passing", "warning" or "critical".
  std::vector<std::string> checks{"passing"};
  bool node_maintenance = false;    ///< adds the critical _node_maintenance check
  bool service_maintenance = false; ///< adds the critical _service_maintenance:<id> check
};

/// One request as the double received it.
struct RecordedRequest {
  std::string method;
  std::string path;   ///< without the query string
  std::string target; ///< exactly as sent: path and query
  std::vector<std::pair<std::string, std::string>> params;
  std::vector<std::pair<std::string, std::string>> headers;

  /// The first value of query parameter `name`, if present.
  std::optional<std::string> param(const std::string& name) const {
    for (const auto& [k, v] : params)
      if (k == name) return v;
    return std::nullopt;
  }
  /// The first value of header `name` (case-insensitive), if present.
  std::optional<std::string> header(const std::string& name) const {
    for (const auto& [k, v] : headers)
      if (k.size() == name.size() &&
          std::equal(k.begin(), k.end(), name.begin(), [](char a, char b) { return std::tolower(a) == std::tolower(b); }))
        return v;
    return std::nullopt;
  }
  /// The `index` parameter as a number; nullopt when absent.
  std::optional<std::uint64_t> index() const {
    auto v = param("index");
    if (!v) return std::nullopt;
    return std::strtoull(v->c_str(), nullptr, 10);
  }
};

/// Faults the double can inject, each replacing or altering one response.
enum class ConsulFault {
  /// 500 "No cluster leader": a server without a Raft leader cannot answer a default
  /// (leader-consistent) read (api-docs/features/consistency.mdx, "default" mode).
  no_leader,
  /// 429: the server's rate limiter refuses the request (docs/agent/limits, "Request
  /// denials": 429 Resource Exhausted / rate limit exceeded).
  rate_limited,
  /// 403 "Permission denied": the token lacks service:read / key:read (docs/security/acl;
  /// error bodies are plain text, api-docs/index.mdx).
  permission_denied,
  /// The normal body, written a few bytes at a time with `param` between writes (a
  /// congested link; the client's read timeout applies between bytes, not to the whole).
  slow_body,
  /// Content-Length says the whole body, half of it is sent, then the connection closes
  /// (an agent or proxy dying mid-response).
  truncated_body,
  /// 200 with a body that is not JSON (a misconfigured proxy answering for the agent).
  garbage_json,
  /// X-Consul-Index: 0. blocking.mdx ("Sanity check index is greater than zero"): index
  /// 0 never blocks, so clients must continue from 1.
  index_zero,
  /// The header sent as `x-consul-index`: HTTP header names are case-insensitive
  /// (RFC 9110 §5.1), and HTTP/2 front ends lower-case them.
  lowercase_index_header,
  /// No X-Consul-Index at all (an endpoint or proxy that strips it); treated like 0.
  missing_index_header,
  /// The request is held for `param`, then the connection is dropped with no response
  /// (a load balancer whose idle timeout is shorter than the blocking wait). A long
  /// `param` is a hung agent; release_holds() ends the holds early.
  hold_then_drop,
  /// The normal body, one byte every `param` (an agent or proxy so congested that every
  /// recv gets a byte in time: only a deadline for the whole response ends it).
  trickle_body,
};

/// What to add to each blocking hold on top of `wait` (Consul: uniform in [0, wait/16]).
enum class ConsulJitter { random, none, max };

class ConsulDouble {
public:
  /// Applies a fault until clear_faults().
  static constexpr std::size_t forever = std::numeric_limits<std::size_t>::max();
  static constexpr const char* datacenter = "dc1";

  /// Starts listening on 127.0.0.1 on a free port.
  ConsulDouble() : rng_(std::random_device{}()) { start(0); }
  ~ConsulDouble() { shut(); }
  ConsulDouble(const ConsulDouble&) = delete;
  ConsulDouble& operator=(const ConsulDouble&) = delete;

  std::uint16_t port() const noexcept { return port_; }
  /// A dynup source spec for this double, e.g. spec("/health/api").
  std::string spec(const std::string& path) const {
    return "consul://127.0.0.1:" + std::to_string(port_) + path;
  }

  // --- state ----------------------------------------------------------------------

  /// Replaces every instance of `service` (an empty list deregisters them all).
  void set_service(const std::string& service, std::vector<ConsulInstance> instances) {
    for (auto& i : instances)
      if (i.id.empty()) i.id = service + "-" + std::to_string(i.port);
    change([&] {
      services_[service] = Service{std::move(instances), index_};
      services_table_index_ = index_;
    });
  }

  /// Bumps the service's index without changing what it returns (Consul does this for
  /// writes that do not alter the result, e.g. a check's output: blocking.mdx "a return
  /// is no guarantee of a change").
  void touch_service(const std::string& service) {
    change([&] {
      services_[service].index = index_;
      services_table_index_ = index_;
    });
  }

  void put_kv(const std::string& key, const std::string& value, std::uint64_t flags = 0) {
    change([&] {
      auto it = kv_.find(key);
      std::uint64_t created = it == kv_.end() ? index_ : it->second.create_index;
      kv_[key] = Kv{value, flags, created, index_};
      tombstones_.erase(key);
      kv_table_index_ = index_;
    });
  }

  /// Deletes every key under `prefix` (a tombstone keeps the prefix's index moving
  /// forward, as Consul's KV tombstones do).
  void delete_kv_tree(const std::string& prefix) {
    change([&] {
      for (auto it = kv_.begin(); it != kv_.end();) {
        if (it->first.compare(0, prefix.size(), prefix) == 0) {
          tombstones_[it->first] = index_;
          it = kv_.erase(it);
        } else {
          ++it;
        }
      }
      kv_table_index_ = index_;
    });
  }

  /// A snapshot restore from an older state: the global index and every resource index
  /// go back to `index` (blocking.mdx, "Reset the index if it goes backwards"). Held
  /// requests are woken, see an index not past theirs, and keep waiting.
  void restore_snapshot(std::uint64_t index) {
    std::lock_guard<std::mutex> lock(mu_);
    index_ = index;
    for (auto& [name, s] : services_) s.index = std::min(s.index, index);
    for (auto& [key, kv] : kv_) {
      kv.create_index = std::min(kv.create_index, index);
      kv.modify_index = std::min(kv.modify_index, index);
    }
    for (auto& [key, idx] : tombstones_) idx = std::min(idx, index);
    services_table_index_ = std::min(services_table_index_, index);
    kv_table_index_ = std::min(kv_table_index_, index);
    cv_.notify_all();
  }

  /// Requests must carry this token in X-Consul-Token; others get 403 "ACL not found".
  void require_token(std::string token) {
    std::lock_guard<std::mutex> lock(mu_);
    token_ = std::move(token);
  }

  void set_jitter(ConsulJitter j) {
    std::lock_guard<std::mutex> lock(mu_);
    jitter_ = j;
  }

  /// Each request moves every resource's index first, so no blocking request ever waits
  /// (a cluster whose index changes constantly: blocking.mdx, "Rate limit").
  void set_index_churn(bool on) {
    std::lock_guard<std::mutex> lock(mu_);
    churn_ = on;
  }

  std::uint64_t index() const {
    std::lock_guard<std::mutex> lock(mu_);
    return index_;
  }

  // --- faults ---------------------------------------------------------------------

  /// Applies `fault` to the next `times` requests (forever: until clear_faults()).
  /// `param` is the delay of slow_body and the hold of hold_then_drop.
  void inject(ConsulFault fault, std::size_t times = forever,
              std::chrono::milliseconds param = std::chrono::milliseconds(200)) {
    std::lock_guard<std::mutex> lock(mu_);
    fault_ = ActiveFault{fault, times, param};
  }

  void clear_faults() {
    std::lock_guard<std::mutex> lock(mu_);
    fault_.reset();
  }

  /// Ends every hold_then_drop hold now (their connections are dropped).
  void release_holds() {
    std::lock_guard<std::mutex> lock(mu_);
    ++releases_;
    cv_.notify_all();
  }

  /// Stops listening: connections are refused and open ones dropped, as when the agent
  /// process dies. Held requests get no answer.
  void down() { shut(); }

  /// Listens again on the same port (a restarted agent keeps its address).
  void up() {
    if (running()) return;
    start(port_);
  }

  bool running() const {
    std::lock_guard<std::mutex> lock(mu_);
    return server_ != nullptr;
  }

  // --- observations ---------------------------------------------------------------

  /// API requests received (every path, faults included).
  std::size_t requests() const {
    std::lock_guard<std::mutex> lock(mu_);
    return log_.size();
  }
  /// API requests received for this path (no query string).
  std::size_t requests(const std::string& path) const {
    std::lock_guard<std::mutex> lock(mu_);
    return static_cast<std::size_t>(
        std::count_if(log_.begin(), log_.end(), [&](const RecordedRequest& r) { return r.path == path; }));
  }
  std::vector<RecordedRequest> log() const {
    std::lock_guard<std::mutex> lock(mu_);
    return log_;
  }
  /// The most recent request; throws when there was none.
  RecordedRequest last_request() const {
    std::lock_guard<std::mutex> lock(mu_);
    if (log_.empty()) throw std::logic_error("ConsulDouble: no request yet");
    return log_.back();
  }
  /// Requests a fault was applied to.
  std::size_t faulted() const {
    std::lock_guard<std::mutex> lock(mu_);
    return faulted_;
  }
  /// Requests being held right now.
  std::size_t held() const {
    std::lock_guard<std::mutex> lock(mu_);
    return held_;
  }

private:
  struct Service {
    std::vector<ConsulInstance> instances;
    std::uint64_t index = 0;
  };
  struct Kv {
    std::string value;
    std::uint64_t flags = 0;
    std::uint64_t create_index = 0;
    std::uint64_t modify_index = 0;
  };
  struct ActiveFault {
    ConsulFault kind;
    std::size_t left;
    std::chrono::milliseconds param;
  };
  enum class Kind { health, catalog, kv };
  struct Answer {
    int status = 200;
    std::string body;
    std::uint64_t index = 0;
    bool json = true;
  };

  template <class F> void change(F&& f) {
    std::lock_guard<std::mutex> lock(mu_);
    ++index_;
    f();
    cv_.notify_all();
  }

  void start(std::uint16_t port) {
    auto server = std::make_unique<httplib::Server>();
    server->new_task_queue = [] { return new httplib::ThreadPool(6); };
    // Consul's Go server disables Nagle (Go's default for TCP): without this every held
    // answer would sit ~40 ms behind the client's delayed ACK.
    server->set_tcp_nodelay(true);
    server->set_socket_options([](int sock) {
      int yes = 1;
      ::setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof yes);
      ::setsockopt(sock, SOL_SOCKET, SO_REUSEPORT, &yes, sizeof yes);
    });
    server->Get(R"(/v1/health/service/([^/?]+))",
                [this](const httplib::Request& q, httplib::Response& r) { serve(Kind::health, q, r); });
    server->Get(R"(/v1/catalog/service/([^/?]+))",
                [this](const httplib::Request& q, httplib::Response& r) { serve(Kind::catalog, q, r); });
    server->Get(R"(/v1/kv/(.*))",
                [this](const httplib::Request& q, httplib::Response& r) { serve(Kind::kv, q, r); });
    int bound = -1;
    if (port == 0) {
      bound = server->bind_to_any_port("127.0.0.1");
    } else {
      // The old listener's connections may linger in TIME_WAIT, or a client may briefly
      // hold the port as its ephemeral one: retry for a while.
      auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
      for (;;) {
        if (server->bind_to_port("127.0.0.1", port)) {
          bound = port;
          break;
        }
        if (std::chrono::steady_clock::now() > deadline) break;
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
      }
    }
    if (bound <= 0) throw std::runtime_error("ConsulDouble: cannot listen on 127.0.0.1:" + std::to_string(port));
    httplib::Server* raw = server.get();
    {
      std::lock_guard<std::mutex> lock(mu_);
      port_ = static_cast<std::uint16_t>(bound);
      closing_ = false;
      server_ = std::move(server);
    }
    listener_ = std::thread([raw] { raw->listen_after_bind(); });
    // stop() before the listener runs would be lost (httplib checks is_running()).
    while (!raw->is_running()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }

  void shut() {
    std::unique_ptr<httplib::Server> server;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!server_) return;
      closing_ = true;
      cv_.notify_all();
      server = std::move(server_);
    }
    server->stop();
    drop_connections(-1);
    listener_.join(); // the pool joins its workers, so every handler has returned
  }

  // Shuts down accepted connections on our port (all, or the one from `peer_port`).
  // cpp-httplib gives handlers no socket, so the descriptors are found by address.
  void drop_connections(int peer_port) const {
    for (int fd : connection_fds(peer_port)) ::shutdown(fd, SHUT_RDWR);
  }

  // True when the client on `peer_port` has closed its end (or the socket is gone). A
  // held request notices this, as Consul's HTTP server cancels a blocking query whose
  // client went away, instead of occupying a pool thread until the wait runs out.
  bool client_gone(int peer_port) const {
    for (int fd : connection_fds(peer_port)) {
      char byte = 0;
      ssize_t n = ::recv(fd, &byte, 1, MSG_PEEK | MSG_DONTWAIT);
      return n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR);
    }
    return true;
  }

  // The accepted sockets of this double whose peer is `peer_port` (all when negative).
  std::vector<int> connection_fds(int peer_port) const {
    std::vector<int> fds;
    DIR* dir = ::opendir("/proc/self/fd");
    if (!dir) return fds;
    while (dirent* e = ::readdir(dir)) {
      if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
      int fd = std::atoi(e->d_name);
      sockaddr_in local{}, peer{};
      socklen_t len = sizeof local;
      if (::getsockname(fd, reinterpret_cast<sockaddr*>(&local), &len) != 0 || local.sin_family != AF_INET ||
          ntohs(local.sin_port) != port_)
        continue;
      len = sizeof peer;
      if (::getpeername(fd, reinterpret_cast<sockaddr*>(&peer), &len) != 0) continue; // the listener
      if (peer_port >= 0 && ntohs(peer.sin_port) != peer_port) continue;
      fds.push_back(fd);
    }
    ::closedir(dir);
    return fds;
  }

  static void plain(httplib::Response& res, int status, const std::string& text) {
    res.status = status;
    res.set_content(text, "text/plain; charset=utf-8");
  }

  // Go's time.ParseDuration for what clients send ("1s", "500ms", "1m30s", "2.5s").
  static std::optional<std::chrono::milliseconds> parse_wait(const std::string& s) {
    if (s.empty()) return std::nullopt;
    double total_ms = 0;
    std::size_t i = 0;
    while (i < s.size()) {
      std::size_t start = i;
      while (i < s.size() && (std::isdigit(static_cast<unsigned char>(s[i])) || s[i] == '.')) ++i;
      if (start == i) return std::nullopt;
      double n = std::strtod(s.substr(start, i - start).c_str(), nullptr);
      std::size_t u = i;
      while (i < s.size() && std::isalpha(static_cast<unsigned char>(s[i]))) ++i;
      std::string unit = s.substr(u, i - u);
      static const std::map<std::string, double> units{{"ns", 1e-6}, {"us", 1e-3}, {"ms", 1},
                                                       {"s", 1e3},   {"m", 6e4},   {"h", 3.6e6}};
      auto it = units.find(unit);
      if (it == units.end()) return std::nullopt;
      total_ms += n * it->second;
    }
    return std::chrono::milliseconds(static_cast<std::int64_t>(total_ms));
  }

  // Only `passing` with no value, "1" or "true" filters (Go's strconv.ParseBool).
  static bool flag(const httplib::Request& req, const char* name) {
    if (!req.has_param(name)) return false;
    std::string v = req.get_param_value(name);
    return v.empty() || v == "1" || v == "true" || v == "t" || v == "TRUE" || v == "True";
  }

  void serve(Kind kind, const httplib::Request& req, httplib::Response& res) {
    std::unique_lock<std::mutex> lock(mu_);
    RecordedRequest rec{req.method, req.path, req.target, {}, {}};
    for (const auto& [k, v] : req.params) rec.params.emplace_back(k, v);
    for (const auto& [k, v] : req.headers) rec.headers.emplace_back(k, v);
    log_.push_back(std::move(rec));
    if (churn_) {
      ++index_;
      for (auto& [name, svc] : services_) svc.index = index_;
      for (auto& [key, kv] : kv_) kv.modify_index = index_;
      services_table_index_ = kv_table_index_ = index_;
    }

    std::optional<ActiveFault> fault;
    if (fault_) {
      fault = fault_;
      ++faulted_;
      if (fault_->left != forever && --fault_->left == 0) fault_.reset();
    }
    std::uint64_t now_index = resource_index(kind, req);
    auto header_index = [&](std::uint64_t i) { res.set_header("X-Consul-Index", std::to_string(i)); };
    if (fault) {
      switch (fault->kind) {
      case ConsulFault::no_leader: return plain(res, 500, "No cluster leader");
      case ConsulFault::rate_limited: return plain(res, 429, "rate limit exceeded, try again later");
      case ConsulFault::permission_denied: return plain(res, 403, "Permission denied");
      case ConsulFault::garbage_json:
        header_index(now_index);
        res.set_content("{\"Node\": [<html>502 Bad Gateway", "application/json");
        return;
      default: break;
      }
    }
    if (!token_.empty() && req.get_header_value("X-Consul-Token") != token_)
      return plain(res, 403, "ACL not found");
    if (req.has_param("stale") && req.has_param("consistent"))
      return plain(res, 400, "Cannot specify ?stale with ?consistent, conflicting semantics.");
    if (req.has_param("dc") && req.get_param_value("dc") != datacenter)
      return plain(res, 500, "No path to datacenter");

    std::uint64_t min_index = 0;
    if (req.has_param("index")) {
      const std::string& v = req.get_param_value("index");
      char* end = nullptr;
      min_index = std::strtoull(v.c_str(), &end, 10);
      if (v.empty() || *end != '\0') return plain(res, 400, "Invalid index");
    }
    std::chrono::milliseconds wait = std::chrono::minutes(5);
    if (req.has_param("wait")) {
      auto w = parse_wait(req.get_param_value("wait"));
      if (!w) return plain(res, 400, "Invalid wait time");
      if (w->count() > 0) wait = std::min<std::chrono::milliseconds>(*w, std::chrono::minutes(10));
    }

    if (fault && fault->kind == ConsulFault::hold_then_drop) {
      ++held_;
      const std::uint64_t releases = releases_;
      cv_.wait_for(lock, fault->param, [&] { return closing_ || releases_ != releases; });
      --held_;
      int peer = req.remote_port;
      lock.unlock();
      drop_connections(peer);
      return;
    }

    // blocking.mdx: hold while the index is not past the client's, up to wait + jitter.
    if (min_index > 0) {
      std::chrono::milliseconds jitter{0};
      if (jitter_ == ConsulJitter::max) jitter = wait / 16;
      if (jitter_ == ConsulJitter::random)
        jitter = std::chrono::milliseconds(std::uniform_int_distribution<std::int64_t>(0, (wait / 16).count())(rng_));
      auto deadline = std::chrono::steady_clock::now() + wait + jitter;
      auto done = [&] { return closing_ || resource_index(kind, req) > min_index; };
      ++held_;
      while (!done() && std::chrono::steady_clock::now() < deadline) {
        cv_.wait_until(lock, std::min(deadline, std::chrono::steady_clock::now() + std::chrono::milliseconds(50)),
                       done);
        if (done()) break;
        lock.unlock();
        bool gone = client_gone(req.remote_port);
        lock.lock();
        if (gone) {
          --held_;
          return; // nobody to answer
        }
      }
      --held_;
      if (closing_) {
        // A dying agent answers nothing: drop the connection before httplib can write.
        lock.unlock();
        drop_connections(req.remote_port);
        return;
      }
    }

    Answer a = answer(kind, req);
    if (a.status != 200 && !a.json && a.status != 404) return plain(res, a.status, a.body);
    std::string index_text = std::to_string(a.index);
    if (fault && fault->kind == ConsulFault::index_zero) index_text = "0";
    if (!fault || fault->kind != ConsulFault::missing_index_header)
      res.set_header(fault && fault->kind == ConsulFault::lowercase_index_header ? "x-consul-index" : "X-Consul-Index",
                     index_text);
    res.set_header("X-Consul-KnownLeader", "true");
    res.set_header("X-Consul-LastContact", "0");
    res.status = a.status;
    if (a.status == 404) return; // KV: absent is an empty 404 that still carries the index

    std::chrono::milliseconds param = fault ? fault->param : std::chrono::milliseconds(0);
    if (fault && fault->kind == ConsulFault::slow_body) {
      auto body = std::make_shared<std::string>(std::move(a.body));
      res.set_content_provider(body->size(), "application/json",
                               [this, body, param](std::size_t offset, std::size_t length, httplib::DataSink& sink) {
                                 std::size_t n = std::min<std::size_t>(length, 16);
                                 sink.write(body->data() + offset, n);
                                 std::unique_lock<std::mutex> l(mu_);
                                 cv_.wait_for(l, param, [&] { return closing_; });
                                 return !closing_;
                               });
      return;
    }
    if (fault && fault->kind == ConsulFault::trickle_body) {
      auto body = std::make_shared<std::string>(std::move(a.body));
      res.set_content_provider(body->size(), "application/json",
                               [this, body, param](std::size_t offset, std::size_t, httplib::DataSink& sink) {
                                 {
                                   std::unique_lock<std::mutex> l(mu_);
                                   if (cv_.wait_for(l, param, [&] { return closing_; })) return false;
                                 }
                                 return sink.write(body->data() + offset, 1);
                               });
      return;
    }
    if (fault && fault->kind == ConsulFault::truncated_body) {
      auto body = std::make_shared<std::string>(std::move(a.body));
      res.set_content_provider(body->size(), "application/json",
                               [body](std::size_t offset, std::size_t, httplib::DataSink& sink) {
                                 if (offset > 0) return false; // closes the connection
                                 sink.write(body->data(), body->size() / 2);
                                 return true;
                               });
      return;
    }
    res.set_content(a.body, "application/json");
  }

  std::uint64_t resource_index(Kind kind, const httplib::Request& req) const {
    std::uint64_t i = 0;
    std::string name = req.matches.size() > 1 ? std::string(req.matches[1]) : std::string();
    if (kind == Kind::kv) {
      bool recurse = req.has_param("recurse");
      for (const auto& [key, kv] : kv_)
        if (recurse ? key.compare(0, name.size(), name) == 0 : key == name) i = std::max(i, kv.modify_index);
      for (const auto& [key, idx] : tombstones_)
        if (recurse ? key.compare(0, name.size(), name) == 0 : key == name) i = std::max(i, idx);
      if (i == 0) i = kv_table_index_;
    } else {
      auto it = services_.find(name);
      i = it != services_.end() ? it->second.index : services_table_index_;
    }
    return std::max<std::uint64_t>(i, 1);
  }

  Answer answer(Kind kind, const httplib::Request& req) const {
    Answer a;
    a.index = resource_index(kind, req);
    std::string name = std::string(req.matches[1]);
    nlohmann::json out = nlohmann::json::array();
    if (kind == Kind::kv) {
      bool recurse = req.has_param("recurse");
      for (const auto& [key, kv] : kv_) {
        if (recurse ? key.compare(0, name.size(), name) != 0 : key != name) continue;
        out.push_back({{"LockIndex", 0},
                       {"Key", key},
                       {"Flags", kv.flags},
                       {"Value", kv.value.empty() ? nlohmann::json(nullptr) : nlohmann::json(base64(kv.value))},
                       {"CreateIndex", kv.create_index},
                       {"ModifyIndex", kv.modify_index}});
      }
      // kv.mdx: a missing key (or an empty prefix) is a 404 with X-Consul-Index.
      if (out.empty()) a.status = 404;
      a.body = out.dump();
      return a;
    }
    auto it = services_.find(name);
    std::vector<std::string> tags;
    for (std::size_t t = 0; t < req.get_param_value_count("tag"); ++t) tags.push_back(req.get_param_value("tag", t));
    bool passing_only = kind == Kind::health && flag(req, "passing");
    std::string filter = req.has_param("filter") ? req.get_param_value("filter") : std::string();
    if (it != services_.end()) {
      for (const ConsulInstance& i : it->second.instances) {
        bool tagged = std::all_of(tags.begin(), tags.end(), [&](const std::string& t) {
          return std::find(i.tags.begin(), i.tags.end(), t) != i.tags.end();
        });
        if (!tagged) continue;
        nlohmann::json entry = kind == Kind::health ? health_entry(name, i, it->second.index)
                                                    : catalog_entry(name, i, it->second.index);
        if (passing_only) {
          bool all = std::all_of(entry["Checks"].begin(), entry["Checks"].end(),
                                 [](const nlohmann::json& c) { return c["Status"] == "passing"; });
          if (!all) continue;
        }
        if (!filter.empty()) {
          auto keep = matches_filter(filter, entry);
          if (!keep) {
            a.status = 400;
            a.json = false;
            a.body = "Failed to create boolean expression evaluator: unsupported filter \"" + filter + "\"";
            return a;
          }
          if (!*keep) continue;
        }
        out.push_back(std::move(entry));
      }
    }
    a.body = out.dump();
    return a;
  }

  static nlohmann::json node_json(const ConsulInstance& i, std::uint64_t index) {
    return {{"ID", "00000000-0000-4000-8000-" + std::string(12 - std::min<std::size_t>(12, i.node.size()), '0') +
                       i.node.substr(0, 12)},
            {"Node", i.node},
            {"Address", i.node_address},
            {"Datacenter", datacenter},
            {"TaggedAddresses", {{"lan", i.node_address}, {"wan", i.node_address}}},
            {"Meta", nlohmann::json::object()},
            {"CreateIndex", index},
            {"ModifyIndex", index}};
  }

  static nlohmann::json service_json(const std::string& service, const ConsulInstance& i, std::uint64_t index) {
    nlohmann::json s{{"ID", i.id},
                     {"Service", service},
                     {"Tags", i.tags},
                     {"Address", i.address},
                     {"Meta", i.meta},
                     {"Port", i.port},
                     {"EnableTagOverride", false},
                     {"CreateIndex", index},
                     {"ModifyIndex", index}};
    if (!i.omit_weights) s["Weights"] = {{"Passing", i.weight_passing}, {"Warning", i.weight_warning}};
    return s;
  }

  static nlohmann::json check_json(const ConsulInstance& i, const std::string& service, const std::string& id,
                                   const std::string& name, const std::string& status, bool of_service,
                                   std::uint64_t index) {
    return {{"Node", i.node},
            {"CheckID", id},
            {"Name", name},
            {"Status", status},
            {"Notes", ""},
            {"Output", ""},
            {"ServiceID", of_service ? i.id : ""},
            {"ServiceName", of_service ? service : ""},
            {"ServiceTags", of_service ? nlohmann::json(i.tags) : nlohmann::json::array()},
            {"CreateIndex", index},
            {"ModifyIndex", index}};
  }

  // health.mdx: Node, Service and Checks; maintenance shows as a critical check.
  static nlohmann::json health_entry(const std::string& service, const ConsulInstance& i, std::uint64_t index) {
    nlohmann::json checks = nlohmann::json::array();
    checks.push_back(check_json(i, service, "serfHealth", "Serf Health Status", "passing", false, index));
    if (i.node_maintenance)
      checks.push_back(check_json(i, service, "_node_maintenance", "Node Maintenance Mode", "critical", false, index));
    for (std::size_t c = 0; c < i.checks.size(); ++c)
      checks.push_back(check_json(i, service, "service:" + i.id + (c ? ":" + std::to_string(c + 1) : ""),
                                  "Service '" + service + "' check", i.checks[c], true, index));
    if (i.service_maintenance)
      checks.push_back(check_json(i, service, "_service_maintenance:" + i.id, "Service Maintenance Mode",
                                  "critical", true, index));
    return {{"Node", node_json(i, index)}, {"Service", service_json(service, i, index)}, {"Checks", checks}};
  }

  // catalog.mdx: a flat object per instance.
  static nlohmann::json catalog_entry(const std::string& service, const ConsulInstance& i, std::uint64_t index) {
    nlohmann::json e{{"ID", node_json(i, index)["ID"]},
                     {"Node", i.node},
                     {"Address", i.node_address},
                     {"Datacenter", datacenter},
                     {"TaggedAddresses", {{"lan", i.node_address}, {"wan", i.node_address}}},
                     {"NodeMeta", nlohmann::json::object()},
                     {"ServiceKind", ""},
                     {"ServiceID", i.id},
                     {"ServiceName", service},
                     {"ServiceTags", i.tags},
                     {"ServiceAddress", i.address},
                     {"ServiceMeta", i.meta},
                     {"ServicePort", i.port},
                     {"ServiceEnableTagOverride", false},
                     {"CreateIndex", index},
                     {"ModifyIndex", index}};
    if (!i.omit_weights) e["ServiceWeights"] = {{"Passing", i.weight_passing}, {"Warning", i.weight_warning}};
    return e;
  }

  // A small subset of Consul's filter language (api-docs/features/filtering.mdx):
  // clauses joined by " and ", each `Sel == "v"`, `Sel != "v"`, `"v" in Sel` or
  // `"v" not in Sel`. nullopt when the expression is outside that subset.
  static std::optional<bool> matches_filter(const std::string& expr, const nlohmann::json& entry) {
    auto trim = [](std::string s) {
      s.erase(0, s.find_first_not_of(' '));
      s.erase(s.find_last_not_of(' ') + 1);
      return s;
    };
    auto quoted = [&](const std::string& s) -> std::optional<std::string> {
      std::string t = trim(s);
      if (t.size() < 2 || t.front() != '"' || t.back() != '"') return std::nullopt;
      return t.substr(1, t.size() - 2);
    };
    auto select = [&](const std::string& sel) -> const nlohmann::json* {
      const nlohmann::json* j = &entry;
      std::size_t start = 0;
      std::string path = trim(sel);
      while (start <= path.size()) {
        std::size_t dot = path.find('.', start);
        std::string part = path.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
        if (!j->is_object() || !j->contains(part)) return nullptr;
        j = &(*j)[part];
        if (dot == std::string::npos) break;
        start = dot + 1;
      }
      return j;
    };
    bool result = true;
    std::size_t pos = 0;
    while (pos <= expr.size()) {
      std::size_t next = expr.find(" and ", pos);
      std::string clause = expr.substr(pos, next == std::string::npos ? std::string::npos : next - pos);
      pos = next == std::string::npos ? expr.size() + 1 : next + 5;
      bool ok = false;
      if (auto op = clause.find(" not in "); op != std::string::npos) {
        auto v = quoted(clause.substr(0, op));
        if (!v) return std::nullopt;
        const nlohmann::json* j = select(clause.substr(op + 8));
        ok = !(j && contains(*j, *v));
      } else if (auto op2 = clause.find(" in "); op2 != std::string::npos) {
        auto v = quoted(clause.substr(0, op2));
        if (!v) return std::nullopt;
        const nlohmann::json* j = select(clause.substr(op2 + 4));
        ok = j && contains(*j, *v);
      } else if (auto eq = clause.find("=="); eq != std::string::npos) {
        auto v = quoted(clause.substr(eq + 2));
        if (!v) return std::nullopt;
        const nlohmann::json* j = select(clause.substr(0, eq));
        ok = j && text_of(*j) == *v;
      } else if (auto ne = clause.find("!="); ne != std::string::npos) {
        auto v = quoted(clause.substr(ne + 2));
        if (!v) return std::nullopt;
        const nlohmann::json* j = select(clause.substr(0, ne));
        ok = !(j && text_of(*j) == *v);
      } else {
        return std::nullopt;
      }
      result = result && ok;
    }
    return result;
  }

  static bool contains(const nlohmann::json& j, const std::string& v) {
    if (j.is_array()) return std::any_of(j.begin(), j.end(), [&](const nlohmann::json& e) { return text_of(e) == v; });
    if (j.is_object()) return j.contains(v);
    if (j.is_string()) return j.get<std::string>().find(v) != std::string::npos;
    return false;
  }

  static std::string text_of(const nlohmann::json& j) { return j.is_string() ? j.get<std::string>() : j.dump(); }

  static std::string base64(const std::string& in) {
    static const char* table = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    std::string out;
    std::size_t i = 0;
    for (; i + 2 < in.size(); i += 3) {
      std::uint32_t n = (std::uint32_t(std::uint8_t(in[i])) << 16) | (std::uint32_t(std::uint8_t(in[i + 1])) << 8) |
                        std::uint8_t(in[i + 2]);
      for (int s = 18; s >= 0; s -= 6) out += table[(n >> s) & 63];
    }
    if (i < in.size()) {
      std::uint32_t n = std::uint32_t(std::uint8_t(in[i])) << 16;
      if (i + 1 < in.size()) n |= std::uint32_t(std::uint8_t(in[i + 1])) << 8;
      out += table[(n >> 18) & 63];
      out += table[(n >> 12) & 63];
      out += i + 1 < in.size() ? table[(n >> 6) & 63] : '=';
      out += '=';
    }
    return out;
  }

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::unique_ptr<httplib::Server> server_;
  std::thread listener_; // started and joined by the thread that calls start()/shut()
  std::uint16_t port_ = 0;
  bool closing_ = false;
  std::mt19937_64 rng_;

  std::uint64_t index_ = 100; // a live cluster's index is never small
  std::uint64_t services_table_index_ = 100;
  std::uint64_t kv_table_index_ = 100;
  std::map<std::string, Service> services_;
  std::map<std::string, Kv> kv_;
  std::map<std::string, std::uint64_t> tombstones_;

  std::string token_;
  ConsulJitter jitter_ = ConsulJitter::random;
  bool churn_ = false;
  std::optional<ActiveFault> fault_;
  std::vector<RecordedRequest> log_;
  std::size_t held_ = 0;
  std::size_t faulted_ = 0;
  std::uint64_t releases_ = 0;
};

/// One instance on `port` of `node`, with its own Service.Address (10.1.0.x).
inline ConsulInstance consul_instance(std::uint16_t port, const std::string& node = "node-1") {
  ConsulInstance i;
  i.port = port;
  i.node = node;
  i.address = "10.1.0." + std::to_string(port % 200 + 1);
  return i;
}

/// consul_instance for each port, on node-1.
inline std::vector<ConsulInstance> consul_instances(std::initializer_list<std::uint16_t> ports) {
  std::vector<ConsulInstance> out;
  for (auto p : ports) out.push_back(consul_instance(p));
  return out;
}

} // namespace dynup_test
