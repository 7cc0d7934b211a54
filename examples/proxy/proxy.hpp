// dynup-proxy: an HTTP/1.1 reverse proxy on cpp-httplib that takes its peers from dynup
// upstreams. The reference for embedding dynup in a proxy of one's own: pick, forward,
// report, retry with the tried peers excluded, and status, pushes and metrics over an
// admin listener.
//
// Threads: FramedServer (http_server.hpp) reads every client connection on one epoll
// thread and serves each complete request on the connection's worker thread, where it is
// forwarded (blocking I/O). Everything shared between request threads is an Upstream
// (lock-free picks), relaxed counters, and the per-peer pools of idle upstream
// connections (one mutex per peer, held only to take or return one).
#pragma once

#include "http_server.hpp"
#include "proxy_config.hpp"

#include <dynup/peer_json.hpp>
#include <dynup/publisher.hpp>
#include <dynup/upstream.hpp>

#include <httplib.h>
#include <nlohmann/json.hpp>

#include <sys/socket.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

namespace dynup_proxy {

namespace detail {

inline std::string lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

// Hop-by-hop headers (RFC 9110 7.6.1) and the ones cpp-httplib adds to a request it
// received or computes itself for one it sends: never forwarded in either direction.
inline bool hop_by_hop(const std::string& lname) {
  static const char* const names[] = {"connection", "keep-alive", "proxy-connection", "te", "trailer",
                                      "transfer-encoding", "upgrade", "proxy-authorization", "proxy-authenticate",
                                      "content-length", "remote_addr", "remote_port", "local_addr", "local_port"};
  for (const char* n : names)
    if (lname == n) return true;
  return false;
}

// The header names a Connection header lists: hop-by-hop too.
inline std::vector<std::string> connection_tokens(const httplib::Headers& h) {
  std::vector<std::string> out;
  auto range = h.equal_range("Connection");
  for (auto it = range.first; it != range.second; ++it) {
    std::string v = lower(it->second);
    std::size_t start = 0;
    while (start <= v.size()) {
      std::size_t comma = v.find(',', start);
      std::string t = v.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
      t.erase(0, t.find_first_not_of(" \t"));
      t.erase(t.find_last_not_of(" \t") + 1);
      if (!t.empty()) out.push_back(t);
      if (comma == std::string::npos) break;
      start = comma + 1;
    }
  }
  return out;
}

inline httplib::Headers end_to_end(const httplib::Headers& in) {
  const std::vector<std::string> listed = connection_tokens(in);
  httplib::Headers out;
  for (const auto& [name, value] : in) {
    std::string l = lower(name);
    if (hop_by_hop(l) || std::find(listed.begin(), listed.end(), l) != listed.end()) continue;
    out.emplace(name, value);
  }
  return out;
}

// A Prometheus label value: backslash, double quote and newline escaped.
inline std::string label(std::string_view v) {
  std::string out;
  for (char c : v) {
    if (c == '\\' || c == '"') out += '\\';
    if (c == '\n') {
      out += "\\n";
      continue;
    }
    out += c;
  }
  return out;
}

// Compares without an early exit, so the time taken says nothing about the token.
inline bool same_secret(std::string_view a, std::string_view b) {
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  for (std::size_t i = 0; i < a.size(); ++i) diff |= static_cast<unsigned char>(a[i] ^ b[i % (b.empty() ? 1 : b.size())]);
  return diff == 0;
}

} // namespace detail

/// Idle keep-alive connections to one peer. A request takes one (or makes one) and
/// gives it back when the exchange ended cleanly; at most `capacity` wait idle.
class PeerPool {
public:
  PeerPool(std::string host, int port, const Limits& limits) : host_(std::move(host)), port_(port), limits_(limits) {}

  /// An idle connection (`reused` true), else a new client (false).
  std::unique_ptr<httplib::Client> take(bool& reused) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      reused = !idle_.empty();
      if (reused) {
        auto c = std::move(idle_.back());
        idle_.pop_back();
        return c;
      }
    }
    auto c = std::make_unique<httplib::Client>(host_, port_);
    using std::chrono::duration_cast;
    using std::chrono::microseconds;
    const auto conn = duration_cast<microseconds>(limits_.connect_timeout).count();
    const auto read = duration_cast<microseconds>(limits_.read_timeout).count();
    c->set_connection_timeout(static_cast<time_t>(conn / 1000000), static_cast<time_t>(conn % 1000000));
    c->set_read_timeout(static_cast<time_t>(read / 1000000), static_cast<time_t>(read % 1000000));
    c->set_write_timeout(static_cast<time_t>(read / 1000000), static_cast<time_t>(read % 1000000));
    c->set_keep_alive(true);
    c->set_tcp_nodelay(true); // small requests go out at once, not after a delayed ACK
    c->set_follow_location(false);
    c->set_decompress(false); // bodies are relayed as they are, Content-Encoding included
    return c;
  }

  void give_back(std::unique_ptr<httplib::Client> c) {
    std::lock_guard<std::mutex> lock(mu_);
    if (idle_.size() < limits_.pool_size) idle_.push_back(std::move(c));
  }

  std::size_t idle() const {
    std::lock_guard<std::mutex> lock(mu_);
    return idle_.size();
  }

private:
  const std::string host_;
  const int port_;
  const Limits& limits_;
  mutable std::mutex mu_;
  std::vector<std::unique_ptr<httplib::Client>> idle_;
};

/// Counters of one upstream; relaxed atomics, summed when /metrics is read.
struct UpstreamCounters {
  std::atomic<std::uint64_t> picks{0};
  std::atomic<std::uint64_t> no_peer{0};          ///< a request found no peer to try (503)
  std::atomic<std::uint64_t> connect_failures{0};
  std::atomic<std::uint64_t> response_failures{0}; ///< sent, but no (complete) reply (502)
  std::atomic<std::uint64_t> too_large{0};         ///< a reply over max_response_body_bytes (502)
  std::atomic<std::uint64_t> retries{0};
  std::array<std::atomic<std::uint64_t>, 6> responses{}; ///< relayed, by class: [1]=1xx … [5]=5xx, [0]=other
  std::atomic<std::uint64_t> pushes_accepted{0};
  std::atomic<std::uint64_t> pushes_refused{0};
};

/// One upstream as the proxy holds it: the dynup Upstream, its pools, its counters.
struct ProxyUpstream {
  std::unique_ptr<dynup::Upstream> up;
  UpstreamCounters counters;
  std::shared_mutex pools_mu; // guards the map; a pool itself has its own mutex
  /// "host|port" → its pool, shared with the requests using it: a pool dropped by
  /// prune_pools lives until its last request gives its connection back.
  std::unordered_map<std::string, std::shared_ptr<PeerPool>> pools;
  std::atomic<std::uint64_t> pruned_version{0}; ///< the set version pools were last pruned to
  mutable std::mutex failures_mu;
  std::map<std::string, std::uint64_t> failures_by_peer; ///< peer id → failed requests (connect or reply)
};

inline std::string pool_key(const dynup::Peer& peer) { return peer.host + "|" + std::to_string(peer.port); }

/// Erases the entries of a map for which `drop(entry)` is true (std::erase_if before C++20).
template <class Map, class Drop>
void erase_entries(Map& map, Drop&& drop) {
  for (auto it = map.begin(); it != map.end();)
    it = drop(*it) ? map.erase(it) : std::next(it);
}

/// Drops the pools (and failure counts) of peers no longer in the upstream's set, and
/// with them their idle connections: peers that come and go (new addresses on every
/// deploy) must not hold sockets and memory for ever. Does the work once per new set
/// version, on the first request or scrape that sees it; otherwise one snapshot() load.
inline void prune_pools(ProxyUpstream& pu) {
  const dynup::Snapshot& set = pu.up->publisher().snapshot();
  const std::uint64_t v = set->version();
  if (v <= pu.pruned_version.load(std::memory_order_acquire)) return;
  std::unordered_set<std::string> live_addresses;
  std::unordered_set<std::string> live_ids;
  for (const dynup::Peer& p : *set) {
    live_addresses.insert(pool_key(p));
    live_ids.insert(p.id);
  }
  std::vector<std::shared_ptr<PeerPool>> dropped; // closed after the lock is released
  {
    std::unique_lock<std::shared_mutex> lock(pu.pools_mu);
    if (v <= pu.pruned_version.load(std::memory_order_relaxed)) return;
    erase_entries(pu.pools, [&](auto& entry) {
      if (live_addresses.count(entry.first) != 0) return false;
      dropped.push_back(std::move(entry.second));
      return true;
    });
    pu.pruned_version.store(v, std::memory_order_release);
  }
  std::lock_guard<std::mutex> lock(pu.failures_mu);
  erase_entries(pu.failures_by_peer, [&](const auto& entry) { return live_ids.count(entry.first) == 0; });
}

class Proxy {
public:
  using Log = std::function<void(const std::string&)>;

  /// Starts every upstream (each returns once its first set is read); errors name the
  /// upstream. Listeners start with run().
  static Result<std::unique_ptr<Proxy>> create(ProxyConfig config, Log log) {
    std::unique_ptr<Proxy> p(new Proxy(std::move(config), std::move(log)));
    for (auto& uc : p->config_.upstreams) {
      const std::string name = uc.name;
      Log l = p->log_;
      auto up = dynup::Upstream::start(uc, dynup::steady_clock(),
                                       [l, name](const dynup::Error& e) { l("upstream " + name + ": " + e.message()); });
      if (!up) return up.error();
      auto pu = std::make_unique<ProxyUpstream>();
      pu->up = std::move(up).value();
      p->upstreams_.emplace(name, std::move(pu));
    }
    return p;
  }

  ~Proxy() { stop_upstreams(); }

  /// Binds both listeners (port 0 picks a free one: see port()/admin_port()). Call once.
  Result<void> bind() {
    configure_proxy_server();
    configure_admin_server();
    auto bind_one = [](FramedServer& s, const Listen& l, int& port, int& fd) -> Result<void> {
      s.set_socket_options([&fd](int sock) {
        fd = sock;
        int one = 1;
        ::setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
      });
      errno = 0;
      port = l.port == 0 ? s.bind_to_any_port(l.host) : (s.bind_to_port(l.host, l.port) ? l.port : -1);
      if (port < 0) {
        const int e = errno; // "Address already in use" tells a taken port from a missing address
        return Error(dynup::Errc::io_error,
                     "cannot listen on " + l.text() + (e != 0 ? ": " + std::generic_category().message(e) : ""));
      }
      ::listen(fd, 1024); // cpp-httplib's own backlog is 5: a burst of connections would wait for SYN retries
      return {};
    };
    if (auto ok = bind_one(*server_, config_.listen, port_, listen_fd_); !ok) return ok;
    if (config_.admin.enabled) {
      if (auto ok = bind_one(*admin_, config_.admin.listen, admin_port_, admin_fd_); !ok)
        return ok.error().with_context("admin");
    }
    return {};
  }

  /// Serves until stop(): the admin listener on a thread of its own, the proxy on the
  /// calling thread. Returns once both have stopped and every request in flight ended.
  void run() {
    std::thread admin;
    if (config_.admin.enabled) admin = std::thread([this] { admin_->listen_after_bind(); });
    server_->listen_after_bind();
    if (admin.joinable()) admin.join();
  }

  /// Starts draining: the proxy listener closes at once; requests in flight go on, each
  /// kept-alive connection ends after its current request, and idle ones are closed.
  /// Any thread; returns at once. Then wait for drained(), and end the process.
  void stop() {
    draining_ = true;
    server_->stop();
  }

  /// Draining and quiet: no request in flight, and none started for `quiet` (a request
  /// that had reached an idle kept-alive connection as the listener closed still gets
  /// served). Call it from one thread, repeatedly.
  bool drained(std::chrono::milliseconds quiet) {
    const auto now = std::chrono::steady_clock::now();
    const std::uint64_t started = started_.load();
    if (in_flight_.load() > 0 || started != quiet_started_) {
      quiet_started_ = started;
      quiet_since_ = now;
      return false;
    }
    return now - quiet_since_ >= quiet;
  }

  /// Closes the admin listener (after the drain: /healthz says 503 meanwhile).
  void stop_admin() { admin_->stop(); }

  void stop_upstreams() {
    for (auto& [name, pu] : upstreams_) pu->up->stop();
  }

  int port() const noexcept { return port_; }
  int admin_port() const noexcept { return admin_port_; }
  std::uint64_t in_flight() const noexcept { return in_flight_.load(); }

  /// Prometheus text format (version 0.0.4).
  std::string metrics() const;

private:
  Proxy(ProxyConfig config, Log log)
      : config_(std::move(config)), log_(std::move(log)),
        server_(std::make_unique<FramedServer>(proxy_limits(config_), [](int, const std::string& why) {
          return std::make_pair(std::string("text/plain; charset=utf-8"), "dynup-proxy: " + why + "\n");
        })),
        admin_(std::make_unique<FramedServer>(admin_limits(config_), [](int, const std::string& why) {
          return std::make_pair(std::string("application/json"), admin_error_body(why));
        })) {
    // Most specific first: a route with a host before one without, then longer prefixes.
    std::stable_sort(config_.routes.begin(), config_.routes.end(), [](const Route& a, const Route& b) {
      if (a.host.empty() != b.host.empty()) return !a.host.empty();
      return a.prefix.size() > b.prefix.size();
    });
  }

  const Route* route(const httplib::Request& req) const {
    std::string host = detail::lower(req.get_header_value("Host"));
    if (!host.empty() && host.front() == '[') {
      host = host.substr(1, host.find(']') == std::string::npos ? std::string::npos : host.find(']') - 1);
    } else if (auto colon = host.rfind(':'); colon != std::string::npos) {
      host.resize(colon);
    }
    for (const Route& r : config_.routes)
      if ((r.host.empty() || r.host == host) && req.path.compare(0, r.prefix.size(), r.prefix) == 0) return &r;
    return nullptr;
  }

  std::shared_ptr<PeerPool> pool(ProxyUpstream& pu, const dynup::Peer& peer) {
    prune_pools(pu);
    const std::string key = pool_key(peer);
    {
      std::shared_lock<std::shared_mutex> lock(pu.pools_mu);
      auto it = pu.pools.find(key);
      if (it != pu.pools.end()) return it->second;
    }
    std::unique_lock<std::shared_mutex> lock(pu.pools_mu);
    auto& slot = pu.pools[key];
    if (!slot) slot = std::make_shared<PeerPool>(peer.host, peer.port, config_.limits);
    return slot;
  }

  static void count_failure(ProxyUpstream& pu, const std::string& id) {
    std::lock_guard<std::mutex> lock(pu.failures_mu);
    ++pu.failures_by_peer[id];
  }

  static void text(httplib::Response& res, int status, const std::string& body) {
    res.status = status;
    res.set_content(body + "\n", "text/plain; charset=utf-8");
  }

  // One client request: route, then pick → forward → report, retrying a failed connect
  // on peers not tried yet (at most limits.retries more).
  void forward(const httplib::Request& req, httplib::Response& res) {
    struct InFlight {
      std::atomic<std::uint64_t>& n;
      explicit InFlight(std::atomic<std::uint64_t>& c) : n(c) { n.fetch_add(1); }
      ~InFlight() { n.fetch_sub(1); }
    } in_flight(in_flight_);
    started_.fetch_add(1, std::memory_order_relaxed);
    const auto started = std::chrono::steady_clock::now();
    const Route* r = route(req);
    if (r == nullptr) {
      no_route_.fetch_add(1, std::memory_order_relaxed);
      text(res, 404, "dynup-proxy: no route for host \"" + req.get_header_value("Host") + "\" and path " + req.path);
      return;
    }
    ProxyUpstream& pu = *upstreams_.at(r->upstream);
    UpstreamCounters& n = pu.counters;

    httplib::Request out;
    out.method = req.method;
    out.path = req.target.empty() ? req.path : req.target;
    out.headers = detail::end_to_end(req.headers);
    // A Range request goes to the peer as it is, and the peer's 206 (or 200) comes back
    // as it is. cpp-httplib would cut the relayed body to the range a second time, and it
    // does so from req.ranges, which it parsed and owns (the Request is not const there).
    const_cast<httplib::Request&>(req).ranges.clear();
    const_cast<httplib::Request&>(req).headers.erase("Accept-Encoding"); // see relay_body
    std::string xff = req.get_header_value("X-Forwarded-For");
    out.headers.erase("X-Forwarded-For");
    out.headers.emplace("X-Forwarded-For", xff.empty() ? req.remote_addr : xff + ", " + req.remote_addr);
    if (!req.has_header("X-Forwarded-Proto")) out.headers.emplace("X-Forwarded-Proto", "http");
    out.body = std::string(FramedServer::request_body()); // framed by FramedServer, whatever the method
    // A reply larger than the limit is not relayed: the receiver stops reading it.
    std::size_t received = 0;
    bool too_large = false;
    std::string body;
    out.content_receiver = [&](const char* data, std::size_t len, std::uint64_t, std::uint64_t) {
      received += len;
      if (received > config_.limits.max_response_body_bytes) {
        too_large = true;
        return false;
      }
      body.append(data, len);
      return true;
    };

    dynup::TriedPeers tried;
    std::string last_failure;
    bool stale_retried = false;
    for (unsigned attempt = 0; attempt <= config_.limits.retries; ++attempt) {
      dynup::UpstreamSelection sel = pu.up->pick({{}, &tried});
      if (!sel) {
        n.no_peer.fetch_add(1, std::memory_order_relaxed);
        std::string why = dynup::to_string(sel.pick.error);
        if (!last_failure.empty()) {
          text(res, 502, "dynup-proxy: upstream " + r->upstream + ": " + last_failure + "; no other peer to try (" + why + ")");
        } else {
          res.set_header("Retry-After", "1");
          text(res, 503, "dynup-proxy: upstream " + r->upstream + ": " + why);
        }
        log_request(req, r->upstream, "-", res.status, started);
        return;
      }
      n.picks.fetch_add(1, std::memory_order_relaxed);
      if (attempt > 0) n.retries.fetch_add(1, std::memory_order_relaxed);
      const dynup::Peer& peer = *sel.peer;
      const std::string peer_id = peer.id;
      const std::shared_ptr<PeerPool> pp = pool(pu, peer);
      bool reused = false;
      std::unique_ptr<httplib::Client> client = pp->take(reused);
      received = 0;
      too_large = false;
      body.clear();
      httplib::Response reply;
      httplib::Error err = httplib::Error::Success;
      const auto sent = std::chrono::steady_clock::now();
      const bool ok = client->send(out, reply, err);
      const auto latency = std::chrono::steady_clock::now() - sent;

      if (ok && !too_large) {
        pu.up->report(sel, {latency, reply.status, false});
        pp->give_back(std::move(client));
        const int cls = reply.status / 100;
        n.responses[cls >= 1 && cls <= 5 ? static_cast<std::size_t>(cls) : 0].fetch_add(1, std::memory_order_relaxed);
        res.status = reply.status;
        for (const auto& [name, value] : detail::end_to_end(reply.headers)) res.headers.emplace(name, value);
        relay_body(res, std::move(body), reply.get_header_value("Content-Type"));
        if (req.method == "HEAD" && reply.has_header("Content-Length"))
          res.set_header("Content-Length", reply.get_header_value("Content-Length")); // what a GET would get
        log_request(req, r->upstream, peer_id, res.status, started);
        return;
      }
      if (too_large) {
        count_failure(pu, peer_id);
        pu.up->report(sel, {latency, 502, false}); // the peer answered; relaying it is what failed
        n.too_large.fetch_add(1, std::memory_order_relaxed);
        text(res, 502, "dynup-proxy: upstream " + r->upstream + ": peer " + peer_id + " replied with more than " +
                           std::to_string(config_.limits.max_response_body_bytes) + " bytes (limits.max_response_body_bytes)");
        log_request(req, r->upstream, peer_id, res.status, started);
        return;
      }
      const bool no_connection = err == httplib::Error::Connection || err == httplib::Error::ConnectionTimeout ||
                                 err == httplib::Error::BindIPAddress;
      if (no_connection) {
        count_failure(pu, peer_id);
        // Nothing was sent: safe to try another peer whatever the method.
        pu.up->report(sel, {latency, 0, true});
        n.connect_failures.fetch_add(1, std::memory_order_relaxed);
        last_failure = "connect to " + peer_id + " failed (" + httplib::to_string(err) + ")";
        tried.add(sel.pick.id_hash);
        continue;
      }
      if (reused && received == 0 && !stale_retried &&
          (err == httplib::Error::Read || err == httplib::Error::Write)) {
        // A kept-alive connection the peer had closed while it sat idle: not the peer's
        // fault and nothing reached it. Once per request, the same pick again on a new
        // connection, not counted (nginx does the same with its cached connections).
        sel.cancel();
        stale_retried = true;
        --attempt;
        continue;
      }
      // Sent, and the reply did not come whole: the peer may have acted on it, so it is
      // not repeated elsewhere.
      count_failure(pu, peer_id);
      pu.up->report(sel, {latency, 0, false});
      n.response_failures.fetch_add(1, std::memory_order_relaxed);
      text(res, 502, "dynup-proxy: upstream " + r->upstream + ": peer " + peer_id + ": no complete reply (" +
                         httplib::to_string(err) + ")");
      log_request(req, r->upstream, peer_id, res.status, started);
      return;
    }
    text(res, 502, "dynup-proxy: upstream " + r->upstream + ": " + last_failure + "; gave up after " +
                       std::to_string(config_.limits.retries + 1) + " attempts (limits.retries)");
    log_request(req, r->upstream, "-", res.status, started);
  }

  // The peer's body, as it came. cpp-httplib would compress a plain body for a client
  // that accepts it, encoding an encoded body a second time: forward() removed the
  // client's Accept-Encoding (after copying it for the peer), so it relays these bytes
  // untouched. (Not a content provider: cpp-httplib stops writing those once the server
  // is stopping, and a drain must finish the replies in flight.)
  static void relay_body(httplib::Response& res, std::string body, const std::string& type) {
    res.headers.erase("Content-Type");
    if (!type.empty()) res.set_header("Content-Type", type);
    res.body = std::move(body);
  }

  void log_request(const httplib::Request& req, const std::string& upstream, const std::string& peer, int status,
                   std::chrono::steady_clock::time_point started) const {
    if (!config_.access_log) return;
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - started).count();
    char line[64];
    std::snprintf(line, sizeof line, " %d %.3fms", status, ms);
    log_(req.remote_addr + " \"" + log_escape(req.method) + " " + log_escape(req.path) + "\" " + upstream + " " +
         peer + line);
  }

  // As nginx escapes its access log: '"', '\\', control bytes and bytes >= 0x7f become
  // \xHH, so a request path (already percent-decoded: %0A is a newline) cannot forge lines.
  static std::string log_escape(const std::string& text) {
    std::string out;
    out.reserve(text.size());
    for (unsigned char c : text) {
      if (c < 0x20 || c >= 0x7f || c == '"' || c == '\\') {
        char hex[5];
        std::snprintf(hex, sizeof hex, "\\x%02X", c);
        out += hex;
      } else {
        out += static_cast<char>(c);
      }
    }
    return out;
  }

  static ServerLimits proxy_limits(const ProxyConfig& c) {
    ServerLimits l;
    l.header_timeout = c.limits.header_timeout;
    l.body_timeout = c.limits.body_timeout;
    l.idle_timeout = c.limits.keepalive_timeout;
    l.max_body_bytes = c.limits.max_request_body_bytes;
    l.max_connections = c.limits.max_connections;
    l.workers = c.threads;
    return l;
  }

  // The admin listener: few workers, its own connections; a flood of slow clients on the
  // proxy's listener does not reach it.
  static ServerLimits admin_limits(const ProxyConfig& c) {
    ServerLimits l;
    l.header_timeout = c.limits.header_timeout;
    l.body_timeout = c.limits.body_timeout;
    l.idle_timeout = std::chrono::seconds(10);
    l.max_body_bytes = c.limits.max_admin_body_bytes;
    l.body_limit_name = "limits.max_admin_body_bytes";
    l.max_connections = 256;
    l.workers = 4;
    return l;
  }

  static std::string admin_error_body(const std::string& why);

  void configure_proxy_server() {
    server_->set_tcp_nodelay(true);
    server_->set_keep_alive_max_count(100000);
    server_->set_keep_alive_timeout(
        std::chrono::duration_cast<std::chrono::seconds>(config_.limits.keepalive_timeout).count());
    auto handler = [this](const httplib::Request& req, httplib::Response& res) { forward(req, res); };
    // With a body: a handler that takes a content reader, so cpp-httplib leaves the body
    // alone (its form limit would refuse a urlencoded body over 8 KiB, and it would parse a
    // multipart one into parts); forward() takes it from FramedServer as it came.
    auto with_body = [this](const httplib::Request& req, httplib::Response& res, const httplib::ContentReader&) {
      forward(req, res);
    };
    // Every path: cpp-httplib matches the percent-decoded path, and "." stops at a
    // decoded newline (%0A), which would turn such a request into cpp-httplib's 404.
    const char* any = R"([\s\S]*)";
    server_->Get(any, handler); // GET and HEAD
    server_->Post(any, with_body);
    server_->Put(any, with_body);
    server_->Patch(any, with_body);
    server_->Delete(any, with_body);
    server_->Options(any, handler);
    server_->set_error_handler([](const httplib::Request&, httplib::Response& res) {
      if (res.body.empty()) text(res, res.status, "dynup-proxy: status " + std::to_string(res.status));
    });
  }

  void configure_admin_server();

  ProxyConfig config_;
  Log log_;
  std::map<std::string, std::unique_ptr<ProxyUpstream>> upstreams_;
  std::unique_ptr<FramedServer> server_;
  std::unique_ptr<FramedServer> admin_;
  int port_ = -1, admin_port_ = -1, listen_fd_ = -1, admin_fd_ = -1;
  std::atomic<std::uint64_t> in_flight_{0};
  std::atomic<std::uint64_t> started_{0};
  std::uint64_t quiet_started_ = 0;                  // drained()'s, one thread
  std::chrono::steady_clock::time_point quiet_since_{};
  std::atomic<std::uint64_t> no_route_{0};
  std::atomic<bool> draining_{false};
};

} // namespace dynup_proxy

#include "admin.hpp"
