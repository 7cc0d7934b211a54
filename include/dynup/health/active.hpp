// ActiveChecker: probes every peer of a set over TCP or HTTP, as data on the process's
// runtime loop (runtime/loop.hpp): no thread of its own, however many checkers there are.
#pragma once

#include <dynup/detail/random.hpp>
#include <dynup/health/options.hpp>
#include <dynup/peer.hpp>
#include <dynup/peer_set.hpp>
#include <dynup/runtime/loop.hpp>
#include <dynup/runtime/resolver.hpp>
#include <dynup/runtime/runtime.hpp>
#include <dynup/version.hpp>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/resource.h>
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
#include <unordered_map>
#include <utility>
#include <vector>

#ifndef DYNUP_FD_RESERVE
// Descriptors a probe never takes, so the embedder can still accept connections.
#define DYNUP_FD_RESERVE 64
#endif

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

namespace detail {

/// One checker's peers, schedule and probes. Everything but set_targets() and the
/// counters runs on the runtime loop's thread, so none of it is locked. Held by a
/// shared_ptr: every loop callback holds it weakly and strongly only while it runs, so a
/// checker destroyed inside its own callback is freed once that callback returns.
class ActiveProbes : public std::enable_shared_from_this<ActiveProbes> {
public:
  using Clock = std::chrono::steady_clock;
  using ResultCallback = std::function<void(const ProbeResult&)>;

  struct Target {
    std::string id, host;
    std::uint16_t port;
  };

  ActiveProbes(std::shared_ptr<rt::Runtime> runtime, ActiveCheckOptions options, ResultCallback on_result)
      : runtime_(std::move(runtime)), loop_(runtime_->loop()), options_(std::move(options)),
        on_result_(std::move(on_result)), expected_text_(expected_text(options_.expected_statuses)) {}

  ActiveProbes(const ActiveProbes&) = delete;
  ActiveProbes& operator=(const ActiveProbes&) = delete;

  rt::Loop& loop() noexcept { return loop_; }

  // Any thread. The set waits in pending_ so that a delivery on the loop can check the
  // newest one first, even before the posted task runs.
  void set_targets(std::vector<Target> list) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      pending_ = std::move(list);
      dirty_.store(true, std::memory_order_release);
    }
    loop_.post([w = weak_from_this()] {
      if (auto self = w.lock()) self->on_targets();
    });
  }

  // Loop thread: closes every probe and forgets every peer; no callback follows.
  void shutdown() noexcept {
    if (stopped_) return;
    stopped_ = true;
    if (timer_ != 0) loop_.cancel(timer_);
    timer_ = 0;
    for (auto& entry : inflight_) close_probe(*entry.second);
    inflight_.clear();
    deadlines_.clear();
    finished_.clear();
    queue_.clear();
    peers_.clear();
    outcomes_.clear();
  }

  // Any thread.
  std::uint64_t probes_sent() const noexcept { return probes_sent_.load(std::memory_order_relaxed); }

private:
  struct Probe;
  struct State;
  using Queue = std::multimap<Clock::time_point, State*>;
  using Deadlines = std::multimap<Clock::time_point, Probe*>;

  // One member of the current set.
  struct State {
    const std::string* id = nullptr; // the key in peers_
    std::string host;
    std::uint16_t port = 0;
    std::uint64_t epoch = 0; // changes when the address does: results of older probes drop
    Probe* probe = nullptr;  // in flight, or nullptr
    bool queued = false;
    Queue::iterator slot;
  };

  enum class Phase : std::uint8_t { resolving, connecting, sending, reading, done };

  struct Probe {
    std::uint64_t serial = 0; // the key in inflight_; loop callbacks find the probe by it
    State* peer = nullptr;
    std::uint64_t epoch = 0;
    int fd = -1;
    Phase phase = Phase::resolving;
    Clock::time_point began;
    bool has_deadline = false;
    Deadlines::iterator deadline;
    std::string request;
    std::size_t sent = 0;
    std::string answer;
  };

  struct Outcome {
    ProbeResult result;
    std::uint64_t epoch;
  };

  static std::string expected_text(const std::vector<std::pair<int, int>>& ranges) {
    std::string s;
    for (const auto& [lo, hi] : ranges) {
      if (!s.empty()) s += ", ";
      s += std::to_string(lo);
      if (hi != lo) s += "-" + std::to_string(hi);
    }
    return s;
  }

  // Every entry point from the loop ends here: start what is due, deliver what finished,
  // and arm the timer for what comes next. After deliver() a callback may have stopped
  // the checker (or destroyed it: this object lives on until the entry point returns).
  void settle() {
    compact();
    while (active() < options_.max_concurrent && !queue_.empty() && queue_.begin()->first <= Clock::now())
      start(*queue_.begin()->second);
    compact();
    deliver();
    if (stopped_) return;
    compact();
    rearm();
  }

  std::size_t active() const noexcept { return inflight_.size() - finished_.size(); }

  void compact() {
    for (std::uint64_t serial : finished_) inflight_.erase(serial);
    finished_.clear();
  }

  // One loop timer per checker, at its earliest due time (a probe's deadline, or the
  // next queued start when a slot is free). Per-peer loop timers would put every peer
  // of every checker (50 000 for 1000 x 50) into the loop's one timer map, each
  // reschedule taking its lock and allocating; here rescheduling a peer is a local
  // multimap move, and the loop holds at most one timer per checker, re-armed only when
  // the earliest due time moves earlier. A timer that fires early re-arms itself.
  void rearm() {
    auto next = Clock::time_point::max();
    if (!deadlines_.empty()) next = deadlines_.begin()->first;
    if (active() < options_.max_concurrent && !queue_.empty()) next = std::min(next, queue_.begin()->first);
    if (next == Clock::time_point::max() || (timer_ != 0 && armed_at_ <= next)) return;
    if (timer_ != 0) loop_.cancel(timer_);
    armed_at_ = next;
    timer_ = loop_.at(next, [w = weak_from_this()] {
      if (auto self = w.lock()) self->on_timer();
    });
  }

  void on_timer() {
    timer_ = 0;
    if (stopped_) return;
    const auto now = Clock::now();
    while (!deadlines_.empty() && deadlines_.begin()->first <= now) {
      Probe& p = *deadlines_.begin()->second;
      complete(p, false,
               "timed out after " + std::to_string(options_.timeout.count()) + " ms (" +
                   (p.phase == Phase::connecting ? "connect" : "response") + ")");
    }
    settle();
  }

  void on_targets() {
    if (stopped_) return;
    apply_targets();
    settle();
  }

  void on_ready(std::uint64_t serial, std::uint32_t events) {
    auto it = inflight_.find(serial);
    if (stopped_ || it == inflight_.end() || it->second->phase == Phase::done) return;
    advance(*it->second, events);
    settle();
  }

  void on_resolved(std::uint64_t serial, const std::string& host, rt::Resolved r) {
    auto it = inflight_.find(serial);
    if (stopped_ || it == inflight_.end() || it->second->phase != Phase::resolving) return; // dropped
    Probe& p = *it->second;
    if (r.ok())
      connect(p, r.addr, r.len);
    else
      complete(p, false, "cannot resolve host: " + host + " (" + r.error + ")");
    settle();
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

  // Closes the socket and marks the probe for removal by compact(): callers up the
  // stack may still hold a reference to it.
  void close_probe(Probe& p) noexcept {
    if (p.phase == Phase::done) return;
    if (p.fd >= 0) {
      loop_.unwatch(p.fd);
      ::close(p.fd);
      p.fd = -1;
    }
    if (p.has_deadline) deadlines_.erase(p.deadline);
    p.has_deadline = false;
    p.phase = Phase::done;
    finished_.push_back(p.serial);
  }

  void start(State& s) {
    queue_.erase(s.slot);
    s.queued = false;
    probes_sent_.fetch_add(1, std::memory_order_relaxed);
    auto owned = std::make_unique<Probe>();
    Probe& p = *owned;
    p.serial = ++serials_;
    p.peer = &s;
    p.epoch = s.epoch;
    p.began = Clock::now();
    s.probe = &p;
    inflight_.emplace(p.serial, std::move(owned));
    sockaddr_storage addr{};
    socklen_t len = 0;
    if (literal_address(s.host, s.port, addr, len)) return connect(p, addr, len);
    // getaddrinfo blocks: on the loop a slow resolver would stall every upstream of the
    // process, so names go to the runtime's resolver threads and come back posted. A
    // slow resolver delays only the probes of peers named by DNS.
    if (!resolver_) resolver_ = &runtime_->service<rt::Resolver>();
    resolver_->resolve(s.host, s.port,
                       [w = weak_from_this(), serial = p.serial, host = s.host](rt::Resolved r) {
                         if (auto self = w.lock()) self->on_resolved(serial, host, std::move(r));
                       });
  }

  static bool literal_address(const std::string& host, std::uint16_t port, sockaddr_storage& addr, socklen_t& len) {
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
    addr = sockaddr_storage{};
    return false;
  }

  // The timeout starts here: it covers connect plus the status line, not the lookup.
  void connect(Probe& p, const sockaddr_storage& addr, socklen_t len) {
    p.phase = Phase::connecting;
    p.deadline = deadlines_.emplace(Clock::now() + options_.timeout, &p);
    p.has_deadline = true;
    p.fd = ::socket(addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (p.fd < 0) return complete(p, false, "cannot create a socket: " + error_text(errno));
    // The embedder (nginx) must keep descriptors to accept with: a probe never takes one
    // of the last DYNUP_FD_RESERVE.
    if (rlimit lim{}; ::getrlimit(RLIMIT_NOFILE, &lim) == 0 && lim.rlim_cur != RLIM_INFINITY &&
                      static_cast<long long>(p.fd) >= static_cast<long long>(lim.rlim_cur) - DYNUP_FD_RESERVE) {
      const std::string why = "descriptor reserve: fd " + std::to_string(p.fd) + " of limit " +
                              std::to_string(lim.rlim_cur) + " leaves fewer than " +
                              std::to_string(DYNUP_FD_RESERVE) + " free";
      ::close(p.fd);
      p.fd = -1;
      return complete(p, false, "cannot create a socket: " + why);
    }
    int one = 1;
    ::setsockopt(p.fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    auto watched = loop_.watch(p.fd, EPOLLOUT, [w = weak_from_this(), serial = p.serial](std::uint32_t events) {
      if (auto self = w.lock()) self->on_ready(serial, events);
    });
    if (!watched) return complete(p, false, "cannot watch a socket: " + watched.error().message());
    if (::connect(p.fd, reinterpret_cast<const sockaddr*>(&addr), len) == 0) return connected(p);
    if (errno != EINPROGRESS) return complete(p, false, connect_error(errno));
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

  void advance(Probe& p, std::uint32_t events) {
    if (p.phase == Phase::connecting) {
      int err = 0;
      socklen_t len = sizeof err;
      if (::getsockopt(p.fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0) err = errno;
      if (err != 0) return complete(p, false, connect_error(err));
      if (events & EPOLLOUT) return connected(p);
      if (events & (EPOLLERR | EPOLLHUP)) return complete(p, false, "connection refused");
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
        return; // still watched for EPOLLOUT
      } else {
        return complete(p, false, transfer_error(errno, "send"));
      }
    }
    p.phase = Phase::reading;
    auto watched = loop_.modify(p.fd, EPOLLIN);
    if (!watched) complete(p, false, "cannot watch a socket: " + watched.error().message());
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

  // Delivers finished probes, each checked against the latest set just before its call
  // (a set_targets from another thread counts from its return, not from its posted task).
  void deliver() {
    if (outcomes_.empty()) return;
    delivering_.swap(outcomes_);
    for (Outcome& o : delivering_) {
      if (stopped_) break;
      apply_targets();
      auto it = peers_.find(o.result.id);
      if (it == peers_.end() || it->second.epoch != o.epoch || !on_result_) continue;
      try {
        on_result_(o.result);
      } catch (...) {
        // A throwing callback must not end probing.
      }
    }
    delivering_.clear();
  }

  const std::shared_ptr<rt::Runtime> runtime_;
  rt::Loop& loop_;
  const ActiveCheckOptions options_;
  const ResultCallback on_result_;
  const std::string expected_text_;

  std::mutex mu_; // guards pending_
  std::vector<Target> pending_;
  std::atomic<bool> dirty_{false};
  std::atomic<std::uint64_t> probes_sent_{0};

  // Loop thread only.
  bool stopped_ = false;
  rt::Resolver* resolver_ = nullptr;
  rt::TimerId timer_ = 0;
  Clock::time_point armed_at_;
  std::map<std::string, State> peers_;
  Queue queue_;
  std::unordered_map<std::uint64_t, std::unique_ptr<Probe>> inflight_;
  Deadlines deadlines_;
  std::vector<std::uint64_t> finished_; // closed probes still in inflight_
  std::vector<Outcome> outcomes_, delivering_;
  std::uint64_t epochs_ = 0, serials_ = 0;
};

} // namespace detail

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
/// Threads: none of its own. Every checker of a process is data on the runtime's loop
/// thread (rt::Runtime::acquire()): non-blocking sockets watched by the loop and one
/// loop timer per checker, so 1000 checkers run on the same threads as one. IP literals
/// need no lookup; a DNS name is resolved with getaddrinfo (first address) on the
/// runtime's resolver threads (rt::Resolver, started on first need), so a slow resolver
/// delays only the probes of peers named by DNS, never the loop, other probes or stop().
/// Callbacks run on the loop thread, one at a time, and must not block: a blocked
/// callback delays every upstream of the process. An exception from one is swallowed. A
/// result for a peer that a later `set_targets` removed, or moved, is dropped, unless
/// its delivery had already begun. Kind none: nothing on the runtime (not even acquired),
/// and `set_targets` does nothing. A zero or negative interval or timeout means the
/// default (5 s, 1 s); max_concurrent 0 means 1. Memory: O(peers), O(max_concurrent)
/// sockets.
class ActiveChecker {
public:
  using ResultCallback = std::function<void(const ProbeResult&)>;

  /// Joins the process's runtime (none for Kind::none); throws std::system_error when
  /// the runtime cannot start (no descriptor or thread left), with its text. Allocates.
  ActiveChecker(ActiveCheckOptions options, ResultCallback on_result) {
    options = with_defaults(std::move(options));
    if (options.kind == ActiveCheckOptions::Kind::none) return;
    auto runtime = rt::Runtime::acquire();
    if (!runtime)
      throw std::system_error(std::make_error_code(std::errc::resource_unavailable_try_again),
                              runtime.error().message());
    core_ = std::make_shared<detail::ActiveProbes>(std::move(runtime).value(), std::move(options), std::move(on_result));
  }

  /// stop(), then lets go of the runtime. May run inside the checker's own callback:
  /// the state it frees lives on until that callback returns.
  ~ActiveChecker() { stop(); }

  ActiveChecker(const ActiveChecker&) = delete;
  ActiveChecker& operator=(const ActiveChecker&) = delete;

  /// Makes `peers` the probed set. Safe from any thread, the callback included: copies
  /// ids and addresses (O(n), allocates), swaps them in under a mutex and posts to the
  /// loop, which does the rest. Never waits for a probe or a callback.
  void set_targets(const PeerSet& peers) {
    if (!core_) return;
    std::vector<detail::ActiveProbes::Target> list;
    list.reserve(peers.size());
    for (const Peer& p : peers) list.push_back({p.id, p.host, p.port}); // sorted by id
    target_count_.store(peers.size(), std::memory_order_relaxed);
    core_->set_targets(std::move(list));
  }

  /// Stops probing and closes probes in flight; no callback of this checker runs after
  /// it returns. From another thread it runs the stop on the loop and waits for it: a
  /// callback under way finishes first (within milliseconds, as callbacks do not block),
  /// so do not call it holding a lock that the callback takes, nor from a thread the
  /// loop may be waiting for. From the loop thread (the callback, or another loop task)
  /// it stops at once without waiting: it cannot deadlock there, and the rest of the
  /// callback still runs. A lookup under way is not waited for; its answer is dropped.
  /// Idempotent, noexcept (out of memory terminates).
  void stop() noexcept {
    if (!core_) return;
    detail::ActiveProbes* core = core_.get();
    core->loop().run_sync([core] { core->shutdown(); });
  }

  /// Peers in the last set given to set_targets (0 for Kind::none). Any thread.
  std::size_t targets() const noexcept { return target_count_.load(std::memory_order_relaxed); }

  /// Probes started since construction, failed name lookups included. Any thread.
  std::uint64_t probes_sent() const noexcept {
    return core_ ? core_->probes_sent() : 0;
  }

private:
  static ActiveCheckOptions with_defaults(ActiveCheckOptions o) {
    ActiveCheckOptions d;
    if (o.interval.count() <= 0) o.interval = d.interval;
    if (o.timeout.count() <= 0) o.timeout = d.timeout;
    if (o.max_concurrent == 0) o.max_concurrent = 1;
    if (o.path.empty()) o.path = "/";
    if (o.expected_statuses.empty()) o.expected_statuses = d.expected_statuses;
    return o;
  }

  std::shared_ptr<detail::ActiveProbes> core_; // null for Kind::none
  std::atomic<std::size_t> target_count_{0};
};

DYNUP_NAMESPACE_END
