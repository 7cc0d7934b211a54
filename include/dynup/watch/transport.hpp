// The HTTP transport watchers use, behind an interface so tests and embedders can swap
// it; cpp-httplib by default.
#pragma once

#include <dynup/result.hpp>
#include <dynup/runtime/http_message.hpp>
#include <dynup/version.hpp>

#include <httplib.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cctype>
#include <cstdint>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include <unistd.h>

DYNUP_NAMESPACE_BEGIN

/// A connection to one server. `send` and `stream` are called by one thread (the
/// watcher's); `cancel` may be called from any thread and makes an in-flight or later
/// call return Errc::canceled promptly, whatever its timeout.
class Transport {
public:
  virtual ~Transport() = default;

  /// Sends `req` and returns the whole response, or an error (Errc::unavailable for a
  /// connection failure, Errc::timeout when the response is not complete within
  /// `req.read_timeout`, Errc::canceled). An HTTP error status is a response, not an error.
  virtual Result<HttpResponse> send(const HttpRequest& req) = 0;

  /// Sends `req` and hands the body to `on_body` piece by piece as it arrives (a
  /// streaming response such as an etcd watch); `on_body` returns false to stop reading.
  /// Returns the status and headers (body empty) once the stream ends.
  virtual Result<HttpResponse> stream(const HttpRequest& req,
                                      const std::function<bool(std::string_view)>& on_body) = 0;

  /// Aborts any in-flight call and every later one. Thread-safe, idempotent.
  virtual void cancel() noexcept = 0;
};

namespace detail {

/// One thread per process that enforces the total deadline of every HttplibTransport
/// send(): cpp-httplib's read timeout applies per recv, so a server trickling a byte
/// now and then would otherwise hold a call forever. Past its deadline an armed call's
/// `expire` runs on this thread, again every tick until the call disarms (a call still
/// connecting is reached once it connects). expire runs under the watchdog's lock, so
/// once disarm() returns it never runs again. The thread runs only while a call is
/// armed: a process with no request in flight has no watchdog thread (a fork then
/// copies a process without it). The state is never destroyed (no exit-time order to
/// get wrong), and a forked child starts a watchdog of its own.
class DeadlineWatchdog {
public:
  using clock = std::chrono::steady_clock;
  static constexpr std::chrono::milliseconds tick{20};

  static DeadlineWatchdog& instance() {
    static std::mutex mu;
    static DeadlineWatchdog* current = nullptr;
    std::lock_guard<std::mutex> lock(mu);
    if (current == nullptr || current->pid_ != ::getpid())
      current = new DeadlineWatchdog(); // the parent's thread does not exist in a child
    return *current;
  }

  /// Arms `expire` for `at`; returns the id disarm() takes. Throws std::system_error
  /// only from instance(), when the system refuses the thread.
  std::uint64_t arm(clock::time_point at, std::function<void()> expire) {
    std::lock_guard<std::mutex> lock(mu_);
    if (!running_) {
      std::thread([this] { run(); }).detach(); // throws std::system_error: nothing armed
      running_ = true;
    }
    std::uint64_t id = ++next_id_;
    armed_.push_back(Armed{id, at, std::move(expire)});
    cv_.notify_all();
    return id;
  }

  void disarm(std::uint64_t id) noexcept {
    std::lock_guard<std::mutex> lock(mu_);
    armed_.erase(std::remove_if(armed_.begin(), armed_.end(), [&](const Armed& a) { return a.id == id; }),
                 armed_.end());
    if (armed_.empty()) cv_.notify_all(); // the thread ends now, not at the next deadline
  }

private:
  struct Armed {
    std::uint64_t id;
    clock::time_point at;
    std::function<void()> expire;
  };

  DeadlineWatchdog() : pid_(::getpid()) {}

  // Until nothing is armed: the thread ends, and the next arm() starts another.
  void run() {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      if (armed_.empty()) {
        running_ = false;
        return;
      }
      auto now = clock::now();
      auto next = clock::time_point::max();
      for (auto& a : armed_) {
        if (a.at <= now) {
          a.expire();
          a.at = now + tick;
        }
        next = std::min(next, a.at);
      }
      cv_.wait_until(lock, next);
    }
  }

  const pid_t pid_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Armed> armed_;
  std::uint64_t next_id_ = 0;
  bool running_ = false; ///< a thread runs run(); guarded by mu_
};

} // namespace detail

/// Options of the default transport.
struct HttpTransportOptions {
  std::chrono::milliseconds connect_timeout{2000};
  std::chrono::milliseconds write_timeout{5000};
  /// Longest body send() buffers; a longer one fails with Errc::too_large. stream()
  /// bodies are not buffered here (their decoder bounds each message).
  std::size_t max_body_bytes = DYNUP_MAX_RESPONSE_BYTES;
};

/// The default Transport: cpp-httplib, plain HTTP, one keep-alive connection reused
/// across requests.
class HttplibTransport final : public Transport {
public:
  HttplibTransport(std::string host, std::uint16_t port, HttpTransportOptions options = {})
      : client_(host, port), max_body_bytes_(options.max_body_bytes) {
    client_.set_keep_alive(true);
    // cpp-httplib writes a POST's head and body separately: with Nagle on, the body
    // waits for the server's delayed ACK (~40 ms), which delays every etcd watch.
    client_.set_tcp_nodelay(true);
    client_.set_connection_timeout(options.connect_timeout);
    client_.set_write_timeout(options.write_timeout);
  }

  Result<HttpResponse> send(const HttpRequest& req) override { return run(req, nullptr); }

  Result<HttpResponse> stream(const HttpRequest& req,
                              const std::function<bool(std::string_view)>& on_body) override {
    return run(req, &on_body);
  }

  /// Returns once no call is in flight (within milliseconds, or the connect timeout when
  /// a connection attempt is under way).
  void cancel() noexcept override {
    std::unique_lock<std::mutex> lock(mu_);
    canceled_ = true;
    // client_.stop() only reaches a connection that is open: a call that is still
    // connecting would miss it and then block for its whole read timeout. Repeat.
    while (in_flight_) {
      lock.unlock();
      client_.stop(); // shuts the socket down under a blocked read
      lock.lock();
      idle_.wait_for(lock, std::chrono::milliseconds(5), [&] { return !in_flight_; });
    }
    lock.unlock();
    client_.stop(); // an idle keep-alive connection
  }

private:
  // Marks one call in flight for cancel(); false when canceled already.
  class InFlight {
  public:
    explicit InFlight(HttplibTransport& t) : t_(t) {
      std::lock_guard<std::mutex> lock(t_.mu_);
      entered_ = !t_.canceled_;
      if (entered_) t_.in_flight_ = true;
    }
    ~InFlight() {
      if (!entered_) return;
      {
        std::lock_guard<std::mutex> lock(t_.mu_);
        t_.in_flight_ = false;
      }
      t_.idle_.notify_all();
    }
    InFlight(const InFlight&) = delete;
    InFlight& operator=(const InFlight&) = delete;
    bool entered() const noexcept { return entered_; }

  private:
    HttplibTransport& t_;
    bool entered_ = false;
  };

  bool canceled() {
    std::lock_guard<std::mutex> lock(mu_);
    return canceled_;
  }

  // Arms the watchdog for one send(); disarms when destroyed. expired() tells afterwards
  // whether the deadline, not the server, ended the call.
  class Deadline {
  public:
    Deadline(HttplibTransport& t, std::chrono::milliseconds total)
        : watchdog_(detail::DeadlineWatchdog::instance()),
          id_(watchdog_.arm(detail::DeadlineWatchdog::clock::now() + total, [&t, this] {
            expired_.store(true, std::memory_order_relaxed);
            t.client_.stop(); // shuts the socket down under a read in progress
          })) {}
    ~Deadline() { watchdog_.disarm(id_); }
    Deadline(const Deadline&) = delete;
    Deadline& operator=(const Deadline&) = delete;
    bool expired() const noexcept { return expired_.load(std::memory_order_relaxed); }

  private:
    std::atomic<bool> expired_{false};
    detail::DeadlineWatchdog& watchdog_;
    std::uint64_t id_;
  };

  Result<HttpResponse> run(const HttpRequest& req, const std::function<bool(std::string_view)>* on_body) {
    InFlight flight(*this);
    if (!flight.entered()) return Error(Errc::canceled, "transport canceled");
    client_.set_read_timeout(req.read_timeout);
    httplib::Request r;
    r.method = req.method;
    r.path = req.target;
    for (const auto& [k, v] : req.headers) r.headers.emplace(k, v);
    if (!req.body.empty() || !req.content_type.empty()) {
      r.body = req.body;
      if (!req.content_type.empty()) r.headers.emplace("Content-Type", req.content_type);
    }
    std::string body;
    bool oversized = false;
    // A stream is long-lived by design: only send() has a total deadline.
    std::optional<Deadline> deadline;
    try {
      if (on_body == nullptr) deadline.emplace(*this, req.read_timeout);
    } catch (const std::system_error& e) {
      return Error(Errc::io_error, std::string("cannot start the request deadline watchdog: ") + e.what());
    }
    if (on_body != nullptr) {
      r.content_receiver = [on_body](const char* data, std::size_t n, std::uint64_t, std::uint64_t) {
        return (*on_body)(std::string_view(data, n));
      };
    } else {
      r.content_receiver = [&](const char* data, std::size_t n, std::uint64_t, std::uint64_t) {
        if (n > max_body_bytes_ - body.size()) {
          oversized = true; // stop reading; the connection is closed, not drained
          return false;
        }
        body.append(data, n);
        return true;
      };
    }
    httplib::Response res;
    httplib::Error err = httplib::Error::Success;
    bool ok = client_.send(r, res, err);
    if (canceled()) return Error(Errc::canceled, "transport canceled");
    if (deadline && deadline->expired() && (!ok || oversized)) {
      deadline.reset();
      return Error(Errc::timeout, std::string("HTTP ") + req.method + " " + req.target.substr(0, req.target.find('?')) +
                                      ": no complete response within " + std::to_string(req.read_timeout.count()) +
                                      " ms");
    }
    if (oversized)
      return Error(Errc::too_large, std::string("HTTP ") + req.method + " " + req.target.substr(0, req.target.find('?')) +
                                        ": the response body exceeds " + std::to_string(max_body_bytes_) + " bytes");
    if (!ok) {
      // A receiver that asked to stop ends the stream on purpose.
      if (on_body != nullptr && err == httplib::Error::Canceled) return head_of(res);
      // A read timeout and a dropped connection look alike here: both are "unavailable".
      return Error(Errc::unavailable, std::string("HTTP ") + req.method + " " + req.target.substr(0, req.target.find('?')) +
                                          " failed: " + httplib::to_string(err));
    }
    HttpResponse out = head_of(res);
    out.body = std::move(body);
    return out;
  }

  static HttpResponse head_of(const httplib::Response& res) {
    HttpResponse out;
    out.status = res.status;
    for (const auto& [k, v] : res.headers) out.headers.emplace_back(k, v);
    return out;
  }

  httplib::Client client_;
  std::size_t max_body_bytes_;
  std::mutex mu_;
  std::condition_variable idle_;
  bool canceled_ = false;  ///< guarded by mu_
  bool in_flight_ = false; ///< guarded by mu_
};

DYNUP_NAMESPACE_END
