// A cpp-httplib server that frames requests itself and holds a thread only while a
// request is being served.
//
// cpp-httplib 0.11 serves each connection on one pool thread for as long as it lives,
// reads a request head with a per-recv timeout only (a client sending a byte every few
// seconds holds the thread for ever), reads a POST without Content-Length until the
// client closes, and drops pipelined requests (its read buffer lives for one request).
// FramedServer keeps cpp-httplib's routing, handlers and response writing, and replaces
// the connection handling under them:
//
//   accept (cpp-httplib's loop) ─► reactor: one epoll thread reads heads and bodies of
//   every connection, with total deadlines, and checks framing (http_framing.hpp)
//   ─► a complete request ─► the connection's worker: cpp-httplib's process_request on a
//   normalized copy, the response written; the rest of the connection's bytes (pipelined requests)
//   are served next, in order, else the connection goes back to the reactor.
//
// A slow or idle client costs a descriptor and a buffer, not a thread's time. Past
// max_connections, the connection that has waited longest for its request is closed to
// make room (slow clients are the oldest); if every connection is being served, the new one
// gets 503.
#pragma once

#include "http_framing.hpp"

#include <httplib.h>

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

namespace dynup_proxy {

/// What a FramedServer allows a client. Timeouts are totals, not per recv.
struct ServerLimits {
  std::chrono::milliseconds header_timeout{10000}; ///< a request head, from its first byte (or the accept)
  std::chrono::milliseconds body_timeout{30000};   ///< a request body, from the end of its head
  std::chrono::milliseconds idle_timeout{60000};   ///< a kept-alive connection waiting for its next request
  std::chrono::milliseconds send_timeout{60000};   ///< a response write that makes no progress
  std::size_t max_body_bytes = 1 << 20;            ///< decoded; larger: 413 and close
  std::string body_limit_name = "limits.max_request_body_bytes"; ///< named in the 413
  std::size_t max_head_bytes = 64 << 10;           ///< larger: 431 and close
  std::size_t max_connections = 4096;              ///< open client connections, served or waiting
  unsigned workers = 64;                           ///< requests served at once
};

/// Worker threads, each with its own queue. A connection is given to one worker for its
/// life (the one with the fewest connections), as a connection is to an nginx worker: its
/// requests run in order on one thread, so per-thread balancer state (round robin's
/// position) sees the connection's requests in sequence. Connections beyond the number
/// of workers share them; waiting connections cost a worker nothing.
class Workers {
public:
  explicit Workers(unsigned n) {
    for (unsigned i = 0; i < n; ++i) ws_.push_back(std::make_unique<Worker>());
    for (auto& w : ws_) w->thread = std::thread([p = w.get()] { p->run(); });
  }
  ~Workers() { shutdown(); }
  Workers(const Workers&) = delete;
  Workers& operator=(const Workers&) = delete;

  /// The worker for a new connection; O(workers).
  std::size_t assign() {
    std::lock_guard<std::mutex> lock(assign_mu_);
    std::size_t best = 0;
    for (std::size_t i = 1; i < ws_.size(); ++i)
      if (ws_[i]->conns.load() < ws_[best]->conns.load()) best = i;
    ws_[best]->conns.fetch_add(1);
    return best;
  }
  void release(std::size_t w) { ws_[w]->conns.fetch_sub(1); }

  void post(std::size_t w, std::function<void()> job) {
    Worker& k = *ws_[w];
    {
      std::lock_guard<std::mutex> lock(k.mu);
      k.jobs.push_back(std::move(job));
    }
    k.cv.notify_one();
  }

  /// Runs the jobs posted so far, then joins the threads. Idempotent.
  void shutdown() {
    for (auto& w : ws_) {
      {
        std::lock_guard<std::mutex> lock(w->mu);
        w->stop = true;
      }
      w->cv.notify_one();
    }
    for (auto& w : ws_)
      if (w->thread.joinable()) w->thread.join();
  }

private:
  struct Worker {
    std::mutex mu;
    std::condition_variable cv;
    std::deque<std::function<void()>> jobs;
    bool stop = false;
    std::atomic<std::size_t> conns{0};
    std::thread thread;
    void run() {
      for (;;) {
        std::function<void()> job;
        {
          std::unique_lock<std::mutex> lock(mu);
          cv.wait(lock, [this] { return stop || !jobs.empty(); });
          if (jobs.empty()) return;
          job = std::move(jobs.front());
          jobs.pop_front();
        }
        job();
      }
    }
  };
  std::mutex assign_mu_;
  std::vector<std::unique_ptr<Worker>> ws_;
};

/// Turns a refusal (status, reason) into a response body and its content type.
using RefusalBody = std::function<std::pair<std::string, std::string>(int status, const std::string& reason)>;

class FramedServer : public httplib::Server {
public:
  /// Starts the reactor and the workers; bind and listen as with any httplib::Server.
  FramedServer(ServerLimits limits, RefusalBody refusal_body)
      : limits_(std::move(limits)), refusal_body_(std::move(refusal_body)) {
    new_task_queue = [] { return new httplib::ThreadPool(1); }; // only hands sockets over
    set_payload_max_length(limits_.max_body_bytes);
    epoll_ = ::epoll_create1(EPOLL_CLOEXEC);
    wake_ = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.fd = wake_;
    ::epoll_ctl(epoll_, EPOLL_CTL_ADD, wake_, &ev);
    workers_ = std::make_unique<Workers>(limits_.workers);
    reactor_ = std::thread([this] { react(); });
  }

  ~FramedServer() override {
    workers_->shutdown(); // requests in flight finish; their connections come back to pending_
    quit_ = true;
    wakeup();
    reactor_.join();
    for (auto& [fd, c] : conns_) ::close(fd);
    for (auto& c : pending_) ::close(c->fd);
    ::close(wake_);
    ::close(epoll_);
  }

  FramedServer(const FramedServer&) = delete;
  FramedServer& operator=(const FramedServer&) = delete;

  /// The decoded body of the request being served on the calling thread (a handler's):
  /// cpp-httplib's own body reading is never needed, so its form and multipart handling
  /// never changes or refuses a body. Empty outside a handler.
  static std::string_view request_body() noexcept { return current_body(); }

  /// Requests refused by the framing rules, the limits or the deadlines.
  std::uint64_t refused() const noexcept { return refused_.load(std::memory_order_relaxed); }

private:
  using Clock = std::chrono::steady_clock;

  struct Conn {
    int fd = -1;
    std::string ip, local_ip;
    int port = 0, local_port = 0;
    std::string in; ///< received, not yet served
    enum class Phase { idle, head, body, lingering } phase = Phase::head;
    Clock::time_point deadline, waiting_since;
    bool peer_closed = false;
    bool fresh = true; ///< just accepted: counted against max_connections on arrival
    std::size_t worker = 0;
    http::Head head;
    std::size_t head_len = 0;
    std::size_t head_scanned = 0; ///< head_end's progress through `in`
    std::unique_ptr<http::ChunkedBody> chunked;
    std::size_t chunk_pos = 0;
    bool continue_sent = false;
    std::string message;       ///< the complete request, normalized
    std::size_t body_at = 0;   ///< where its body starts in message
    std::size_t consumed = 0;  ///< its length in `in`
  };
  enum class Progress { more, complete, refused };

  // The request's bytes for cpp-httplib to read; its response straight to the socket.
  class ConnStream final : public httplib::Stream {
  public:
    ConnStream(const Conn& c, std::chrono::milliseconds send_timeout)
        : c_(c), timeout_ms_(static_cast<int>(send_timeout.count())) {}
    bool is_readable() const override { return pos_ < c_.message.size(); }
    bool is_writable() const override {
      pollfd p{c_.fd, POLLOUT, 0};
      return ::poll(&p, 1, timeout_ms_) > 0;
    }
    ssize_t read(char* ptr, size_t size) override {
      const std::size_t n = std::min(size, c_.message.size() - pos_);
      std::memcpy(ptr, c_.message.data() + pos_, n);
      pos_ += n;
      return static_cast<ssize_t>(n);
    }
    ssize_t write(const char* ptr, size_t size) override {
      std::size_t done = 0;
      while (done < size) {
        const ssize_t n = ::send(c_.fd, ptr + done, size - done, MSG_NOSIGNAL);
        if (n > 0) {
          done += static_cast<std::size_t>(n);
        } else if (n < 0 && errno == EINTR) {
          continue;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) && is_writable()) {
          continue;
        } else {
          return -1;
        }
      }
      return static_cast<ssize_t>(size);
    }
    void get_remote_ip_and_port(std::string& ip, int& port) const override {
      ip = c_.ip;
      port = c_.port;
    }
    void get_local_ip_and_port(std::string& ip, int& port) const override {
      ip = c_.local_ip;
      port = c_.local_port;
    }
    socket_t socket() const override { return c_.fd; }

  private:
    const Conn& c_;
    const int timeout_ms_;
    std::size_t pos_ = 0;
  };

  static std::string_view& current_body() noexcept {
    thread_local std::string_view body;
    return body;
  }

  static void address(int fd, bool peer, std::string& ip, int& port) {
    sockaddr_storage a{};
    socklen_t len = sizeof a;
    if ((peer ? ::getpeername(fd, reinterpret_cast<sockaddr*>(&a), &len)
              : ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len)) != 0)
      return;
    char text[INET6_ADDRSTRLEN] = {};
    if (a.ss_family == AF_INET) {
      const auto* v4 = reinterpret_cast<const sockaddr_in*>(&a);
      ::inet_ntop(AF_INET, &v4->sin_addr, text, sizeof text);
      port = ntohs(v4->sin_port);
    } else if (a.ss_family == AF_INET6) {
      const auto* v6 = reinterpret_cast<const sockaddr_in6*>(&a);
      ::inet_ntop(AF_INET6, &v6->sin6_addr, text, sizeof text);
      port = ntohs(v6->sin6_port);
    }
    ip = text;
  }

  bool stopping() const { return svr_sock_ == INVALID_SOCKET; }

  // Called by cpp-httplib's accept loop for each new connection: the reactor takes it.
  bool process_and_close_socket(socket_t sock) override {
    auto c = std::make_unique<Conn>();
    c->fd = sock;
    ::fcntl(sock, F_SETFL, ::fcntl(sock, F_GETFL) | O_NONBLOCK);
    int one = 1;
    ::setsockopt(sock, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    address(sock, true, c->ip, c->port);
    address(sock, false, c->local_ip, c->local_port);
    c->waiting_since = Clock::now();
    c->deadline = c->waiting_since + limits_.header_timeout; // a new connection owes its first head
    c->phase = Conn::Phase::head;
    open_.fetch_add(1);
    c->worker = workers_->assign();
    hand_to_reactor(std::move(c));
    return true;
  }

  void hand_to_reactor(std::unique_ptr<Conn> c) {
    {
      std::lock_guard<std::mutex> lock(pending_mu_);
      pending_.push_back(std::move(c));
    }
    wakeup();
  }

  void wakeup() {
    const std::uint64_t one = 1;
    [[maybe_unused]] const ssize_t n = ::write(wake_, &one, sizeof one);
  }

  void close_conn(const Conn& c) {
    ::close(c.fd);
    workers_->release(c.worker);
    open_.fetch_sub(1);
  }

  // Sends a small response without blocking (it fits a socket buffer), then closes
  // gracefully: the write side at once, the read side after the client's bytes stop
  // (or 2 s), so that unread request bytes do not turn the close into a reset that
  // would destroy the response before the client reads it.
  void refuse(Conn& c, const http::Refusal& why) {
    refused_.fetch_add(1, std::memory_order_relaxed);
    auto [type, body] = refusal_body_(why.status, why.reason);
    std::string out = "HTTP/1.1 " + std::to_string(why.status) + " " + http::reason_phrase(why.status) +
                      "\r\nContent-Type: " + type + "\r\nContent-Length: " + std::to_string(body.size()) +
                      "\r\nConnection: close\r\n\r\n" + body;
    [[maybe_unused]] const ssize_t n = ::send(c.fd, out.data(), out.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
    linger(c);
  }

  void linger(Conn& c) {
    ::shutdown(c.fd, SHUT_WR);
    c.phase = Conn::Phase::lingering;
    c.deadline = Clock::now() + std::chrono::seconds(2);
    c.in.clear();
    c.message.clear();
  }

  // Frames what `in` holds so far: a complete request (message, consumed set), more
  // bytes needed, or a refusal.
  Progress advance(Conn& c, http::Refusal& why) {
    if (c.phase == Conn::Phase::idle || c.phase == Conn::Phase::head) {
      if (c.in.empty()) return Progress::more;
      c.head_len = http::head_end(c.in, c.head_scanned);
      if (c.head_len == 0 && c.in.size() <= limits_.max_head_bytes) return Progress::more;
      if (c.head_len == 0 || c.head_len > limits_.max_head_bytes) {
        why = {431, "a request head larger than " + std::to_string(limits_.max_head_bytes) + " bytes"};
        return Progress::refused;
      }
      c.head = http::Head{};
      if (auto refusal = http::parse_head(std::string_view(c.in).substr(0, c.head_len), c.head)) {
        why = *refusal;
        return Progress::refused;
      }
      if (!c.head.chunked && c.head.content_length > limits_.max_body_bytes) {
        why = {413, too_large()};
        return Progress::refused;
      }
      c.phase = Conn::Phase::body;
      c.head_scanned = 0;
      c.deadline = Clock::now() + limits_.body_timeout;
      c.chunked = c.head.chunked ? std::make_unique<http::ChunkedBody>() : nullptr;
      c.chunk_pos = c.head_len;
      c.continue_sent = false;
    }
    std::string_view body;
    if (c.chunked) {
      switch (c.chunked->feed(c.in, c.chunk_pos, limits_.max_body_bytes, why)) {
      case http::ChunkedBody::Step::refused:
        if (why.status == 413) why.reason = too_large();
        return Progress::refused;
      case http::ChunkedBody::Step::more:
        send_continue(c, c.chunk_pos == c.head_len);
        return Progress::more;
      case http::ChunkedBody::Step::done:
        break;
      }
      body = c.chunked->body();
      c.consumed = c.chunk_pos;
    } else {
      const std::size_t need = c.head_len + static_cast<std::size_t>(c.head.content_length);
      if (c.in.size() < need) {
        send_continue(c, c.in.size() == c.head_len);
        return Progress::more;
      }
      body = std::string_view(c.in).substr(c.head_len, static_cast<std::size_t>(c.head.content_length));
      c.consumed = need;
    }
    c.message = http::normalized(c.head, body);
    c.body_at = c.message.size() - body.size();
    c.chunked.reset();
    return Progress::complete;
  }

  std::string too_large() const {
    return "the request body is larger than " + std::to_string(limits_.max_body_bytes) + " bytes (" +
           limits_.body_limit_name + ")";
  }

  // "Expect: 100-continue" from an HTTP/1.1 client that is waiting before it sends its body.
  static void send_continue(Conn& c, bool body_not_started) {
    if (!c.head.expect_continue || c.continue_sent || !body_not_started || c.head.version != "HTTP/1.1") return;
    c.continue_sent = true;
    static constexpr std::string_view line = "HTTP/1.1 100 Continue\r\n\r\n";
    [[maybe_unused]] const ssize_t n = ::send(c.fd, line.data(), line.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
  }

  // On a worker: serves the complete request, then the next ones the connection already
  // sent (pipelined), in order; then gives the connection back to the reactor.
  void serve(std::unique_ptr<Conn> c) {
    for (;;) {
      const bool close = c->head.close || c->peer_closed || stopping();
      bool closed = false;
      bool ok = false;
      {
        ConnStream strm(*c, limits_.send_timeout);
        current_body() = std::string_view(c->message).substr(c->body_at);
        ok = process_request(strm, close, closed, nullptr);
        current_body() = {};
      }
      c->message = std::string();
      if (!ok) {
        close_conn(*c); // the client is gone or does not read: nothing to linger for
        return;
      }
      if (close || closed) {
        linger(*c);
        break;
      }
      c->in.erase(0, c->consumed);
      c->waiting_since = Clock::now();
      c->phase = c->in.empty() ? Conn::Phase::idle : Conn::Phase::head;
      c->deadline = c->waiting_since + (c->in.empty() ? limits_.idle_timeout : limits_.header_timeout);
      http::Refusal why;
      const Progress p = advance(*c, why);
      if (p == Progress::complete) continue;
      if (p == Progress::refused) refuse(*c, why);
      break;
    }
    hand_to_reactor(std::move(c));
  }

  void watch(Conn& c) {
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.fd = c.fd;
    ::epoll_ctl(epoll_, EPOLL_CTL_ADD, c.fd, &ev);
  }

  void drop(int fd) {
    ::epoll_ctl(epoll_, EPOLL_CTL_DEL, fd, nullptr);
    auto it = conns_.find(fd);
    close_conn(*it->second);
    conns_.erase(it);
  }

  // Makes room for a new connection: closes the one that has waited longest for its
  // request. False when every connection is being served.
  bool evict_oldest() {
    int oldest = -1;
    Clock::time_point since = Clock::time_point::max();
    for (const auto& [fd, c] : conns_) {
      const auto t = c->phase == Conn::Phase::lingering ? Clock::time_point::min() : c->waiting_since;
      if (t < since) {
        since = t;
        oldest = fd;
      }
    }
    if (oldest < 0) return false;
    drop(oldest);
    return true;
  }

  void take_pending() {
    std::vector<std::unique_ptr<Conn>> batch;
    {
      std::lock_guard<std::mutex> lock(pending_mu_);
      batch.swap(pending_);
    }
    for (auto& c : batch) {
      if (c->fresh && open_.load() > limits_.max_connections && !evict_oldest())
        refuse(*c, {503, "too many connections (" + std::to_string(limits_.max_connections) + ")"});
      c->fresh = false;
      const int fd = c->fd;
      watch(*c);
      conns_[fd] = std::move(c);
    }
  }

  // Reads what a connection sent; hands a complete request to a worker.
  void on_readable(int fd) {
    auto it = conns_.find(fd);
    if (it == conns_.end()) return;
    Conn& c = *it->second;
    char buf[16384];
    std::size_t got = 0;
    while (got < 65536) {
      const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
      if (n > 0) {
        got += static_cast<std::size_t>(n);
        if (c.phase != Conn::Phase::lingering) c.in.append(buf, static_cast<std::size_t>(n));
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK)) c.peer_closed = true;
      break;
    }
    if (c.phase == Conn::Phase::lingering) {
      if (c.peer_closed) drop(fd);
      return;
    }
    if (c.phase == Conn::Phase::idle && !c.in.empty()) {
      c.phase = Conn::Phase::head;
      c.deadline = Clock::now() + limits_.header_timeout;
    }
    http::Refusal why;
    switch (advance(c, why)) {
    case Progress::refused:
      refuse(c, why);
      if (c.peer_closed) drop(fd);
      return;
    case Progress::more:
      if (c.peer_closed) drop(fd); // a request cut short: nobody to answer
      return;
    case Progress::complete:
      break;
    }
    ::epoll_ctl(epoll_, EPOLL_CTL_DEL, fd, nullptr);
    std::shared_ptr<Conn> owned(std::move(it->second)); // std::function needs a copyable job
    conns_.erase(it);
    workers_->post(owned->worker, [this, owned] { serve(std::make_unique<Conn>(std::move(*owned))); });
  }

  void expire(Clock::time_point now) {
    std::vector<int> late;
    for (const auto& [fd, c] : conns_)
      if (c->deadline <= now || (stopping() && c->phase == Conn::Phase::idle)) late.push_back(fd);
    for (int fd : late) {
      Conn& c = *conns_.at(fd);
      if (c.phase == Conn::Phase::idle || c.phase == Conn::Phase::lingering || c.in.empty()) {
        drop(fd);
      } else if (c.phase == Conn::Phase::head) {
        refuse(c, {408, "the request head did not arrive within " + std::to_string(limits_.header_timeout.count()) +
                            " ms (limits.header_timeout_ms)"});
      } else {
        refuse(c, {408, "the request body did not arrive within " + std::to_string(limits_.body_timeout.count()) +
                            " ms (limits.body_timeout_ms)"});
      }
    }
  }

  void react() {
    constexpr int max_events = 256;
    epoll_event events[max_events];
    auto next_scan = Clock::now();
    while (!quit_) {
      const int n = ::epoll_wait(epoll_, events, max_events, 50);
      for (int i = 0; i < n; ++i) {
        if (events[i].data.fd == wake_) {
          std::uint64_t count = 0;
          [[maybe_unused]] const ssize_t r = ::read(wake_, &count, sizeof count);
          take_pending();
        } else {
          on_readable(events[i].data.fd);
        }
      }
      const auto now = Clock::now();
      if (now >= next_scan) { // deadlines to within 50 ms: one pass over the table, not one per event
        expire(now);
        next_scan = now + std::chrono::milliseconds(50);
      }
    }
  }

  const ServerLimits limits_;
  const RefusalBody refusal_body_;
  int epoll_ = -1, wake_ = -1;
  std::atomic<bool> quit_{false};
  std::atomic<std::size_t> open_{0};
  std::atomic<std::uint64_t> refused_{0};
  std::mutex pending_mu_;
  std::vector<std::unique_ptr<Conn>> pending_; ///< new connections, and those workers gave back
  std::unordered_map<int, std::unique_ptr<Conn>> conns_; ///< the reactor's own: waiting for bytes
  std::unique_ptr<Workers> workers_;
  std::thread reactor_;
};

} // namespace dynup_proxy
