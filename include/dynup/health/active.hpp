// ActiveChecker: probes every peer of a set over TCP or HTTP on one thread of its own.
#pragma once

#include <dynup/detail/random.hpp>
#include <dynup/health/options.hpp>
#include <dynup/peer.hpp>
#include <dynup/peer_set.hpp>
#include <dynup/version.hpp>

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#ifndef DYNUP_MAX_STATUS_LINE
// An answer with no line end within this many bytes is not HTTP.
#define DYNUP_MAX_STATUS_LINE 1024
#endif

DYNUP_NAMESPACE_BEGIN

/// The outcome of one probe of one peer. Thresholds are not applied: every probe reports.
struct ProbeResult {
  std::string id;  ///< the peer's id
  bool ok = false; ///< tcp: connected; http: a status within expected_statuses
  /// Why, for an operator: "connection refused", "timed out after 1000 ms (connect)",
  /// "HTTP 503 (expected 200-399)", ... On success "connected" or "HTTP 200".
  std::string reason;
  std::chrono::nanoseconds latency{0}; ///< from the probe's start (name resolution included)
  int status = 0;                      ///< the HTTP status when a status line was read, else 0
};

/// Probes the peers of the last set given to `set_targets`, each every `interval`.
///
/// Kind tcp: success is a completed connect. Kind http: "GET <path>" (empty: "/") with
/// Host `host_header` or the peer's host[:port] (":80" left out) and "Connection:
/// close"; success is a status line whose status is in `expected_statuses` (empty:
/// 200-399); nothing past the status line is read. `timeout` covers connect plus the
/// status line, not name resolution. Every peer is probed, backups and peers the
/// registry calls critical included: an active result is evidence of its own, which the
/// tracker merges with the registry's.
///
/// Scheduling: a new peer's first probe comes soon, at a random point within 1 ms per
/// peer added by the same update, capped at min(interval, 1 s), so 10 000 new peers do
/// not fire at once (nor in step afterwards); later probes start `interval` after the
/// previous start. At most `max_concurrent` (at least 1) probes are in flight; the rest
/// wait, earliest due first, and a peer never has two probes at once. A peer whose
/// host or port changes is re-probed promptly at the new address.
///
/// Threads: one checker thread runs a poll(2) loop over non-blocking sockets. IP
/// literals need no lookup; a DNS name is resolved with getaddrinfo on that thread
/// (first address), so a slow resolver delays other probes and stop(). Callbacks run
/// on the checker thread, one at a time; an exception from one is swallowed. A result
/// for a peer that a later `set_targets` removed, or moved, is dropped, unless its
/// delivery had already begun. Kind none: no thread, and `set_targets` does nothing.
/// A zero or negative interval or timeout means the default (5 s, 1 s); max_concurrent
/// 0 means 1. Memory: O(peers) on the checker thread, O(max_concurrent) sockets.
class ActiveChecker {
public:
  using ResultCallback = std::function<void(const ProbeResult&)>;

  /// Starts the checker thread (none for Kind::none); throws std::system_error if the
  /// eventfd or the thread cannot be created.
  ActiveChecker(ActiveCheckOptions options, ResultCallback on_result)
      : options_(with_defaults(std::move(options))), on_result_(std::move(on_result)),
        expected_text_(expected_text(options_.expected_statuses)) {
    if (options_.kind == ActiveCheckOptions::Kind::none) return;
    wake_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (wake_fd_ < 0) throw std::system_error(errno, std::generic_category(), "dynup: eventfd");
    try {
      thread_ = std::thread([this] { run(); });
    } catch (...) {
      ::close(wake_fd_);
      throw;
    }
  }

  /// Stops the thread; must not run on the checker thread (i.e. inside the callback).
  ~ActiveChecker() {
    stop();
    if (wake_fd_ >= 0) ::close(wake_fd_);
  }

  ActiveChecker(const ActiveChecker&) = delete;
  ActiveChecker& operator=(const ActiveChecker&) = delete;

  /// Makes `peers` the probed set. Safe from any thread, the callback included: copies
  /// ids and addresses (O(n), allocates), swaps them in under a mutex and wakes the
  /// thread, which does the rest. Never waits for a probe or a callback.
  void set_targets(const PeerSet& peers) {
    if (options_.kind == ActiveCheckOptions::Kind::none) return;
    std::vector<Target> list;
    list.reserve(peers.size());
    for (const Peer& p : peers) list.push_back({p.id, p.host, p.port}); // sorted by id
    {
      std::lock_guard<std::mutex> lock(mu_);
      pending_ = std::move(list);
      dirty_.store(true, std::memory_order_release);
    }
    target_count_.store(peers.size(), std::memory_order_relaxed);
    wake();
  }

  /// Stops probing and joins the thread within milliseconds, closing probes in flight
  /// (a getaddrinfo or callback under way finishes first). Idempotent, noexcept. Called
  /// from the callback, it only asks the thread to end once the callback returns.
  void stop() noexcept {
    if (wake_fd_ < 0) return;
    stopping_.store(true, std::memory_order_release);
    wake();
    if (self_.load(std::memory_order_acquire) == std::this_thread::get_id()) return;
    std::lock_guard<std::mutex> lock(join_mu_);
    if (thread_.joinable()) thread_.join();
  }

  /// Peers in the last set given to set_targets (0 for Kind::none). Any thread.
  std::size_t targets() const noexcept { return target_count_.load(std::memory_order_relaxed); }

  /// Probes started since construction, failed name lookups included. Any thread.
  std::uint64_t probes_sent() const noexcept { return probes_sent_.load(std::memory_order_relaxed); }

private:
  using Clock = std::chrono::steady_clock;

  struct Target {
    std::string id, host;
    std::uint16_t port;
  };

  struct Probe;
  struct State;
  using Queue = std::multimap<Clock::time_point, State*>;

  // One member of the current set; owned by the checker thread.
  struct State {
    const std::string* id = nullptr; // the key in peers_
    std::string host;
    std::uint16_t port = 0;
    std::uint64_t epoch = 0; // changes when the address does: results of older probes drop
    Probe* probe = nullptr;  // in flight, or nullptr
    bool queued = false;
    Queue::iterator slot;
  };

  enum class Phase : std::uint8_t { connecting, sending, reading, done };

  struct Probe {
    State* peer = nullptr;
    std::uint64_t epoch = 0;
    int fd = -1;
    Phase phase = Phase::connecting;
    Clock::time_point began, deadline;
    std::string request;
    std::size_t sent = 0;
    std::string answer;
  };

  struct Outcome {
    ProbeResult result;
    std::uint64_t epoch;
  };

  static ActiveCheckOptions with_defaults(ActiveCheckOptions o) {
    ActiveCheckOptions d;
    if (o.interval.count() <= 0) o.interval = d.interval;
    if (o.timeout.count() <= 0) o.timeout = d.timeout;
    if (o.max_concurrent == 0) o.max_concurrent = 1;
    if (o.path.empty()) o.path = "/";
    if (o.expected_statuses.empty()) o.expected_statuses = d.expected_statuses;
    return o;
  }

  static std::string expected_text(const std::vector<std::pair<int, int>>& ranges) {
    std::string s;
    for (const auto& [lo, hi] : ranges) {
      if (!s.empty()) s += ", ";
      s += std::to_string(lo);
      if (hi != lo) s += "-" + std::to_string(hi);
    }
    return s;
  }

  void wake() noexcept {
    std::uint64_t one = 1;
    [[maybe_unused]] auto n = ::write(wake_fd_, &one, sizeof one);
  }

  void run() {
    self_.store(std::this_thread::get_id(), std::memory_order_release);
    std::vector<pollfd> fds;
    while (!stopping_.load(std::memory_order_acquire)) {
      apply_targets();
      auto now = Clock::now();
      for (auto& p : inflight_)
        if (now >= p->deadline)
          complete(*p, false,
                   "timed out after " + std::to_string(options_.timeout.count()) + " ms (" +
                       (p->phase == Phase::connecting ? "connect" : "response") + ")");
      compact();
      while (inflight_.size() < options_.max_concurrent && !queue_.empty() &&
             queue_.begin()->first <= Clock::now() && !stopping_.load(std::memory_order_relaxed))
        start(*queue_.begin()->second);
      deliver();
      if (stopping_.load(std::memory_order_acquire)) break;

      now = Clock::now();
      auto wake_at = Clock::time_point::max();
      for (auto& p : inflight_) wake_at = std::min(wake_at, p->deadline);
      if (inflight_.size() < options_.max_concurrent && !queue_.empty())
        wake_at = std::min(wake_at, queue_.begin()->first);
      int wait_ms = -1;
      if (wake_at != Clock::time_point::max()) {
        auto ms = std::chrono::ceil<std::chrono::milliseconds>(wake_at - now).count();
        wait_ms = static_cast<int>(std::clamp<long long>(ms, 0, 60000));
      }
      fds.assign(1, pollfd{wake_fd_, POLLIN, 0});
      for (auto& p : inflight_)
        fds.push_back({p->fd, static_cast<short>(p->phase == Phase::reading ? POLLIN : POLLOUT), 0});
      int rc = ::poll(fds.data(), fds.size(), wait_ms);
      if (rc <= 0) continue; // timeout or EINTR: the top of the loop does the work
      if (fds[0].revents) {
        std::uint64_t count;
        [[maybe_unused]] auto n = ::read(wake_fd_, &count, sizeof count);
      }
      for (std::size_t i = 1; i < fds.size(); ++i)
        if (fds[i].revents) advance(*inflight_[i - 1], fds[i].revents);
      compact();
    }
    for (auto& p : inflight_) close_probe(*p);
    inflight_.clear();
  }

  // Merges the latest set into peers_: both are sorted by id, so O(n + m).
  void apply_targets() {
    if (!dirty_.load(std::memory_order_acquire)) return;
    std::vector<Target> list;
    {
      std::lock_guard<std::mutex> lock(mu_);
      list = std::move(pending_);
      pending_.clear();
      dirty_.store(false, std::memory_order_relaxed);
    }
    auto now = Clock::now();
    std::size_t added = 0; // new or moved peers, to be probed soon
    {
      auto probe = peers_.begin();
      for (const Target& t : list) {
        while (probe != peers_.end() && probe->first < t.id) ++probe;
        if (probe == peers_.end() || probe->first != t.id || probe->second.host != t.host ||
            probe->second.port != t.port)
          ++added;
      }
    }
    auto spread = first_probe_spread(added);
    auto it = peers_.begin();
    for (Target& t : list) {
      while (it != peers_.end() && it->first < t.id) it = erase_peer(it);
      if (it != peers_.end() && it->first == t.id) {
        State& s = it->second;
        if (s.host != t.host || s.port != t.port) {
          if (s.probe) drop(*s.probe);
          s.host = std::move(t.host);
          s.port = t.port;
          s.epoch = ++epochs_;
          schedule(s, std::min(s.queued ? s.slot->first : Clock::time_point::max(), now + jitter(spread)));
        }
        ++it;
      } else {
        it = peers_.emplace_hint(it, std::move(t.id), State{});
        State& s = it->second;
        s.id = &it->first;
        s.host = std::move(t.host);
        s.port = t.port;
        s.epoch = ++epochs_;
        schedule(s, now + jitter(spread));
        ++it;
      }
    }
    while (it != peers_.end()) it = erase_peer(it);
    compact();
  }

  // First probes of `added` new peers spread over 1 ms each, at most min(interval, 1 s):
  // one new peer is probed at once, 10 000 do not fire together nor in step later.
  Clock::duration first_probe_spread(std::size_t added) const {
    auto by_count = std::chrono::milliseconds(static_cast<std::chrono::milliseconds::rep>(std::min<std::size_t>(added, 1000)));
    return std::min<Clock::duration>({options_.interval, std::chrono::seconds(1), by_count});
  }

  static Clock::duration jitter(Clock::duration spread) {
    auto ticks = static_cast<std::uint64_t>(std::max<Clock::rep>(spread.count(), 1));
    return Clock::duration(static_cast<Clock::rep>(detail::thread_random_below(ticks)));
  }

  std::map<std::string, State>::iterator erase_peer(std::map<std::string, State>::iterator it) {
    State& s = it->second;
    if (s.probe) drop(*s.probe);
    if (s.queued) queue_.erase(s.slot);
    return peers_.erase(it);
  }

  void schedule(State& s, Clock::time_point due) {
    if (s.queued) queue_.erase(s.slot);
    s.slot = queue_.emplace(due, &s);
    s.queued = true;
  }

  // Drops a probe whose peer left or moved: no result, no reschedule.
  void drop(Probe& p) {
    close_probe(p);
    p.peer->probe = nullptr;
    p.peer = nullptr;
  }

  void close_probe(Probe& p) {
    if (p.fd >= 0) ::close(p.fd);
    p.fd = -1;
    p.phase = Phase::done;
  }

  void compact() {
    inflight_.erase(std::remove_if(inflight_.begin(), inflight_.end(),
                                   [](const std::unique_ptr<Probe>& p) { return p->phase == Phase::done; }),
                    inflight_.end());
  }

  void start(State& s) {
    queue_.erase(s.slot);
    s.queued = false;
    probes_sent_.fetch_add(1, std::memory_order_relaxed);
    auto p = std::make_unique<Probe>();
    p->peer = &s;
    p->epoch = s.epoch;
    p->began = Clock::now();
    s.probe = p.get();
    open_connection(*p);
    if (p->phase != Phase::done) inflight_.push_back(std::move(p));
  }

  void open_connection(Probe& p) {
    sockaddr_storage addr{};
    socklen_t len = 0;
    const State& s = *p.peer;
    if (!resolve(s.host, s.port, addr, len, p)) return;
    p.deadline = Clock::now() + options_.timeout;
    p.fd = ::socket(addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (p.fd < 0) return complete(p, false, "cannot create a socket: " + error_text(errno));
    int one = 1;
    ::setsockopt(p.fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (::connect(p.fd, reinterpret_cast<const sockaddr*>(&addr), len) == 0) return connected(p);
    if (errno != EINPROGRESS) return complete(p, false, connect_error(errno));
  }

  // IP literals directly; DNS names through getaddrinfo (blocking, first address).
  bool resolve(const std::string& host, std::uint16_t port, sockaddr_storage& addr, socklen_t& len, Probe& p) {
    if (host_kind(host) == HostKind::ipv4) {
      auto* in = reinterpret_cast<sockaddr_in*>(&addr);
      in->sin_family = AF_INET;
      in->sin_port = htons(port);
      if (::inet_pton(AF_INET, host.c_str(), &in->sin_addr) == 1) return len = sizeof *in, true;
    } else if (host_kind(host) == HostKind::ipv6) {
      auto* in6 = reinterpret_cast<sockaddr_in6*>(&addr);
      in6->sin6_family = AF_INET6;
      in6->sin6_port = htons(port);
      if (::inet_pton(AF_INET6, host.c_str(), &in6->sin6_addr) == 1) return len = sizeof *in6, true;
    }
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV;
    addrinfo* found = nullptr;
    int rc = ::getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &found);
    if (rc != 0 || !found || found->ai_addrlen > sizeof addr) {
      std::string why = rc == EAI_SYSTEM ? error_text(errno) : rc != 0 ? ::gai_strerror(rc) : "no address";
      if (found) ::freeaddrinfo(found);
      complete(p, false, "cannot resolve host: " + host + " (" + why + ")");
      return false;
    }
    std::memcpy(&addr, found->ai_addr, found->ai_addrlen);
    len = found->ai_addrlen;
    ::freeaddrinfo(found);
    return true;
  }

  void connected(Probe& p) {
    if (options_.kind == ActiveCheckOptions::Kind::tcp) return complete(p, true, "connected");
    const State& s = *p.peer;
    std::string host = options_.host_header;
    if (host.empty()) {
      host = host_port(s.host, s.port);
      if (s.port == 80) host.resize(host.size() - 3);
    }
    p.request = "GET " + options_.path + " HTTP/1.1\r\nHost: " + host +
                "\r\nUser-Agent: dynup-health\r\nConnection: close\r\n\r\n";
    p.phase = Phase::sending;
    send_some(p);
  }

  void advance(Probe& p, short revents) {
    if (p.phase == Phase::connecting) {
      int err = 0;
      socklen_t len = sizeof err;
      if (::getsockopt(p.fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0) err = errno;
      if (err != 0) return complete(p, false, connect_error(err));
      if (revents & POLLOUT) return connected(p);
      if (revents & (POLLERR | POLLHUP)) return complete(p, false, "connection refused");
    } else if (p.phase == Phase::sending) {
      send_some(p);
    } else if (p.phase == Phase::reading) {
      read_some(p);
    }
  }

  void send_some(Probe& p) {
    while (p.sent < p.request.size()) {
      ssize_t n = ::send(p.fd, p.request.data() + p.sent, p.request.size() - p.sent, MSG_NOSIGNAL);
      if (n > 0) {
        p.sent += static_cast<std::size_t>(n);
      } else if (n < 0 && errno == EINTR) {
        continue;
      } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        return; // the loop polls for POLLOUT
      } else {
        return complete(p, false, transfer_error(errno, "send"));
      }
    }
    p.phase = Phase::reading;
  }

  void read_some(Probe& p) {
    char buf[512];
    for (;;) {
      ssize_t n = ::recv(p.fd, buf, sizeof buf, 0);
      if (n == 0) return complete(p, false, "connection closed before a status line");
      if (n < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) return;
        return complete(p, false, transfer_error(errno, "receive"));
      }
      p.answer.append(buf, static_cast<std::size_t>(n));
      auto eol = p.answer.find('\n');
      if (eol != std::string::npos) {
        p.answer.resize(eol > 0 && p.answer[eol - 1] == '\r' ? eol - 1 : eol);
        return status_line(p);
      }
      if (p.answer.size() > DYNUP_MAX_STATUS_LINE) return complete(p, false, bad_status_line(p.answer));
    }
  }

  // "HTTP/1.1 200 OK": version, three digits, then a space or the end of the line.
  void status_line(Probe& p) {
    const std::string& l = p.answer;
    auto digit = [&](std::size_t i) { return i < l.size() && l[i] >= '0' && l[i] <= '9'; };
    bool valid = l.compare(0, 5, "HTTP/") == 0 && digit(5) && l.size() > 6 && l[6] == '.' && digit(7) &&
                 l.size() > 8 && l[8] == ' ' && digit(9) && digit(10) && digit(11) && l[9] >= '1' &&
                 l[9] <= '5' && (l.size() == 12 || l[12] == ' ');
    if (!valid) return complete(p, false, bad_status_line(l));
    int status = (l[9] - '0') * 100 + (l[10] - '0') * 10 + (l[11] - '0');
    bool ok = std::any_of(options_.expected_statuses.begin(), options_.expected_statuses.end(),
                          [&](const std::pair<int, int>& r) { return status >= r.first && status <= r.second; });
    std::string reason = "HTTP " + std::to_string(status);
    if (!ok) reason += " (expected " + expected_text_ + ")";
    complete(p, ok, std::move(reason), status);
  }

  // The line as the operator should see it: printable, short (it may be any protocol).
  static std::string bad_status_line(const std::string& line) {
    std::string shown;
    for (std::size_t i = 0; i < line.size() && i < 40; ++i)
      shown += (line[i] >= 0x20 && line[i] < 0x7f && line[i] != '"') ? line[i] : '?';
    return "bad status line: \"" + shown + (line.size() > 40 ? "...\"" : "\"");
  }

  static std::string error_text(int err) { return std::generic_category().message(err); }

  static std::string connect_error(int err) {
    if (err == ECONNREFUSED) return "connection refused";
    return "connect failed: " + error_text(err);
  }

  static std::string transfer_error(int err, const char* what) {
    if (err == ECONNRESET || err == EPIPE) return "connection reset before a status line";
    return std::string(what) + " failed: " + error_text(err);
  }

  // Ends a probe with a result for delivery and schedules the peer's next one.
  void complete(Probe& p, bool ok, std::string reason, int status = 0) {
    close_probe(p);
    State& s = *p.peer;
    s.probe = nullptr;
    schedule(s, p.began + options_.interval);
    auto latency = std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - p.began);
    outcomes_.push_back({ProbeResult{*s.id, ok, std::move(reason), latency, status}, p.epoch});
  }

  // Delivers finished probes, each checked against the latest set just before its call.
  void deliver() {
    for (Outcome& o : outcomes_) {
      if (stopping_.load(std::memory_order_acquire)) break;
      apply_targets();
      auto it = peers_.find(o.result.id);
      if (it == peers_.end() || it->second.epoch != o.epoch || !on_result_) continue;
      try {
        on_result_(o.result);
      } catch (...) {
        // A throwing callback must not end probing.
      }
    }
    outcomes_.clear();
  }

  const ActiveCheckOptions options_;
  const ResultCallback on_result_;
  const std::string expected_text_;
  int wake_fd_ = -1;
  std::atomic<bool> stopping_{false};
  std::atomic<std::thread::id> self_{};
  std::atomic<std::size_t> target_count_{0};
  std::atomic<std::uint64_t> probes_sent_{0};

  std::mutex mu_; // guards pending_
  std::vector<Target> pending_;
  std::atomic<bool> dirty_{false};

  // Owned by the checker thread.
  std::map<std::string, State> peers_;
  Queue queue_;
  std::vector<std::unique_ptr<Probe>> inflight_;
  std::vector<Outcome> outcomes_;
  std::uint64_t epochs_ = 0;

  std::mutex join_mu_;
  std::thread thread_;
};

DYNUP_NAMESPACE_END
