// HttpClient: the process's one HTTP client, on the runtime's loop. libcurl's multi
// interface drives every transfer of every watcher from that one thread, keeps a
// bounded number of connections per registry address and reuses them (HTTP/2
// multiplexing over TLS), and turns every failure into an error value with its cause.
#pragma once

#include <dynup/result.hpp>
#include <dynup/runtime/http_message.hpp>
#include <dynup/runtime/runtime.hpp>
#include <dynup/version.hpp>

#include <curl/curl.h>

#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

DYNUP_NAMESPACE_BEGIN
namespace rt {

/// Where a request goes. `tls`: https:// with the peer's certificate verified against
/// the system's CA store (HttpClientOptions::ca_file overrides it).
struct HttpEndpoint {
  std::string host;
  std::uint16_t port = 0;
  bool tls = false;

  /// "host:port" ("[v6]:port"), with "+tls" for https: one key per server a
  /// per-address registry (Consul agents, etcd hubs) keeps state for.
  std::string key() const {
    bool v6 = host.find(':') != std::string::npos && host.front() != '[';
    return (v6 ? "[" + host + "]" : host) + ":" + std::to_string(port) + (tls ? "+tls" : "");
  }
};

/// Limits of the process's HTTP client; HttpClient::configure() changes them.
struct HttpClientOptions {
  std::chrono::milliseconds connect_timeout{3000};
  /// Connections per host:port (CURLMOPT_MAX_HOST_CONNECTIONS); more requests queue
  /// until one is free. A Consul agent refuses more than 200 per client address.
  unsigned max_host_connections = 16;
  /// send(): a larger body fails with Errc::too_large (streams are not buffered).
  std::size_t max_response_bytes = DYNUP_MAX_RESPONSE_BYTES;
  /// A socket is never opened when fewer than this many descriptors would remain under
  /// the soft RLIMIT_NOFILE: the embedding server (nginx's accept()) keeps its own.
  unsigned fd_reserve = 64;
  /// CA bundle for https; empty: the system's.
  std::string ca_file;
};

/// Identifies one call for cancel(); ids are never reused (0 is never an id).
using CallId = std::uint64_t;

namespace detail {

// curl_global_init is not safe to run twice or concurrently: once per process.
inline bool curl_global_ready() {
  static const bool ready = curl_global_init(CURL_GLOBAL_DEFAULT) == CURLE_OK;
  return ready;
}

inline std::string request_line(const HttpRequest& req) {
  return "HTTP " + req.method + " " + req.target.substr(0, req.target.find('?'));
}

} // namespace detail

/// The runtime's HTTP client: one per process, `runtime.service<rt::HttpClient>()`.
///
/// Threads: every member but host_stats() on the loop's thread only; callbacks run on
/// it too, never inside send(), stream() or cancel(). Callbacks must not block (they
/// delay every transfer of the process).
/// Connections: at most `max_host_connections` per host:port, reused across calls
/// (keep-alive; HTTP/2 streams share one TLS connection); calls beyond wait in order.
/// Errors are values passed to `done`: Errc::unavailable (connection refused or reset,
/// name not resolved, connect timeout), Errc::timeout (send's deadline, stream's idle
/// limit), Errc::too_large, Errc::io_error (descriptor reserve, EMFILE, epoll),
/// Errc::invalid_argument (a malformed endpoint or target). An HTTP status such as 429
/// or 500 is a response, not an error.
/// Costs: O(log n) per call (timers, maps); allocates per call.
class HttpClient {
public:
  /// Errors are not thrown: a client whose libcurl failed to start fails every call
  /// with Errc::io_error. Made on the loop's thread or any other (it touches no loop
  /// state until the first call).
  explicit HttpClient(Runtime& rt) : loop_(rt.loop()) {
    if (!detail::curl_global_ready()) return;
    multi_ = curl_multi_init();
    if (multi_ == nullptr) return;
    curl_multi_setopt(multi_, CURLMOPT_SOCKETFUNCTION, &HttpClient::on_socket);
    curl_multi_setopt(multi_, CURLMOPT_SOCKETDATA, this);
    curl_multi_setopt(multi_, CURLMOPT_TIMERFUNCTION, &HttpClient::on_timer);
    curl_multi_setopt(multi_, CURLMOPT_TIMERDATA, this);
    curl_multi_setopt(multi_, CURLMOPT_PIPELINING, static_cast<long>(CURLPIPE_MULTIPLEX));
    curl_multi_setopt(multi_, CURLMOPT_MAX_HOST_CONNECTIONS, static_cast<long>(options_.max_host_connections));
  }

  /// Aborts every transfer without calling its callbacks and closes every connection.
  /// On the loop's thread (the runtime destroys its services there).
  ~HttpClient() {
    if (curl_timer_ != 0) loop_.cancel(curl_timer_);
    if (flush_timer_ != 0) loop_.cancel(flush_timer_);
    for (auto& [id, call] : calls_) {
      (void)id;
      release(*call);
    }
    calls_.clear();
    if (multi_ != nullptr) curl_multi_cleanup(multi_); // closes the cached connections
    for (int fd : watched_) loop_.unwatch(fd);
  }
  HttpClient(const HttpClient&) = delete;
  HttpClient& operator=(const HttpClient&) = delete;

  using Done = std::function<void(Result<HttpResponse>)>;
  /// Receives a stream's body piece by piece; returns false to end the stream.
  using Chunk = std::function<bool(std::string_view)>;

  /// Sends `req` and passes the whole response, or the error, to `done` (exactly once,
  /// unless cancelled first). `req.read_timeout` bounds the whole exchange, from this
  /// call (queueing for a connection included) to the last body byte.
  CallId send(const HttpEndpoint& to, const HttpRequest& req, Done done) {
    return start(to, req, false, nullptr, std::move(done));
  }

  /// Sends `req` and passes each piece of the body to `on_body` as it arrives (an etcd
  /// watch, a long poll); `done` then gets the status and headers with an empty body
  /// when the server ends the stream or `on_body` returns false, or the error.
  /// `req.read_timeout` is the longest silence allowed between bytes (counted from this
  /// call until the first one, so a wait for a connection counts too).
  CallId stream(const HttpEndpoint& to, const HttpRequest& req, Chunk on_body, Done done) {
    return start(to, req, true, std::move(on_body), std::move(done));
  }

  /// Ends the call: neither `done` nor `on_body` runs after this returns (also when
  /// called from inside them). An unknown or finished id does nothing.
  void cancel(CallId id) noexcept {
    auto it = calls_.find(id);
    if (it == calls_.end()) return;
    Call& call = *it->second;
    if (in_curl_) {
      // Inside curl (from on_body): curl forbids removing a handle here; the write
      // callback sees `canceled` and settle() removes the handle once curl returns.
      call.canceled = true;
      doomed_.push_back(id);
      return;
    }
    release(call);
    calls_.erase(it);
  }

  /// Changes the options for calls made from now on (max_host_connections at once).
  void configure(const HttpClientOptions& options) {
    options_ = options;
    if (multi_ != nullptr)
      curl_multi_setopt(multi_, CURLMOPT_MAX_HOST_CONNECTIONS, static_cast<long>(options_.max_host_connections));
  }

  /// Counts for one host:port since the client started: sockets open now (connected or
  /// connecting) and at most at once, sockets opened, calls made, calls that ended with
  /// an error and the last such error. Calls cancelled are not failures.
  struct HostStats {
    unsigned open_connections = 0, peak_connections = 0;
    std::uint64_t connects = 0, requests = 0, failures = 0;
    std::string last_error;
  };
  /// Thread-safe (a status page may read it from any thread); O(log hosts); copies.
  HostStats host_stats(const HttpEndpoint& at) const {
    std::lock_guard<std::mutex> lock(stats_mu_);
    auto it = hosts_.find(host_key(at.host, at.port));
    return it == hosts_.end() ? HostStats{} : it->second.stats;
  }

  /// Calls started and not yet finished or cancelled. Loop thread only.
  std::size_t in_flight() const noexcept { return calls_.size(); }

private:
  struct Host {
    HostStats stats; ///< guarded by stats_mu_
  };

  struct Call {
    CallId id = 0;
    HttpClient* client = nullptr;
    Host* host = nullptr;
    CURL* easy = nullptr;
    curl_slist* headers = nullptr;
    std::string url, what, body;
    bool streaming = false;
    std::chrono::milliseconds limit{0};
    std::size_t max_bytes = 0;
    Chunk on_body;
    Done done;
    HttpResponse response;
    std::string host_only, endpoint; ///< "host", "host:port" for messages
    std::string host_name() const { return endpoint; }
    bool canceled = false, stopped = false, oversized = false, finished = false;
    std::string refusal; ///< why opensocket refused a descriptor
    std::string failed;  ///< an error from on_body or from the loop (epoll)
    TimerId timer = 0;
    steady::time_point last_byte{};
    std::unique_ptr<Result<HttpResponse>> result; ///< set once finished, until done runs
    char errbuf[CURL_ERROR_SIZE] = {};
  };

  static std::string host_key(const std::string& host, std::uint16_t port) {
    bool v6 = host.find(':') != std::string::npos && host.front() != '[';
    return (v6 ? "[" + host + "]" : host) + ":" + std::to_string(port);
  }

  CallId start(const HttpEndpoint& to, const HttpRequest& req, bool streaming, Chunk on_body, Done done) {
    CallId id = ++next_id_;
    auto owned = std::make_unique<Call>();
    Call& call = *owned;
    call.id = id;
    call.client = this;
    call.streaming = streaming;
    call.on_body = std::move(on_body);
    call.done = std::move(done);
    call.limit = req.read_timeout;
    call.max_bytes = options_.max_response_bytes;
    call.what = detail::request_line(req);
    call.host = &host(to);
    call.host_only = to.host;
    call.endpoint = host_key(to.host, to.port);
    calls_.emplace(id, std::move(owned));
    {
      std::lock_guard<std::mutex> lock(stats_mu_);
      ++call.host->stats.requests;
    }
    if (auto err = prepare(call, to, req); !err.empty()) {
      finish_later(call, Error(Errc::invalid_argument, call.what + ": " + err));
      return id;
    }
    if (multi_ == nullptr) {
      finish_later(call, Error(Errc::io_error, call.what + ": libcurl could not be initialized"));
      return id;
    }
    if (in_curl_) {
      pending_adds_.push_back(id); // curl refuses an add from inside its callbacks
    } else if (auto err = add(call); !err.empty()) {
      finish_later(call, Error(Errc::io_error, call.what + ": " + err));
      return id;
    }
    call.last_byte = steady::now();
    call.timer = loop_.after(call.limit, [this, id] { on_deadline(id); });
    return id;
  }

  Host& host(const HttpEndpoint& to) {
    std::string key = host_key(to.host, to.port);
    std::lock_guard<std::mutex> lock(stats_mu_);
    return hosts_[key];
  }

  // Configures the easy handle; returns an error text or empty.
  std::string prepare(Call& call, const HttpEndpoint& to, const HttpRequest& req) {
    if (to.host.empty() || to.port == 0) return "no host or port to send to";
    if (!req.target.empty() && req.target.front() != '/') return "the target must start with '/'";
    call.easy = curl_easy_init();
    if (call.easy == nullptr) return "curl_easy_init failed";
    CURL* e = call.easy;
    call.url = std::string(to.tls ? "https://" : "http://") + call.endpoint + (req.target.empty() ? "/" : req.target);
    curl_easy_setopt(e, CURLOPT_URL, call.url.c_str());
    curl_easy_setopt(e, CURLOPT_PATH_AS_IS, 1L); // the target is encoded already
    curl_easy_setopt(e, CURLOPT_PRIVATE, &call);
    curl_easy_setopt(e, CURLOPT_ERRORBUFFER, call.errbuf);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_PROXY, ""); // never a proxy from the environment
    curl_easy_setopt(e, CURLOPT_TCP_KEEPALIVE, 1L); // a blocking query idles for minutes
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, static_cast<long>(options_.connect_timeout.count()));
    curl_easy_setopt(e, CURLOPT_HTTP_VERSION,
                     static_cast<long>(to.tls ? CURL_HTTP_VERSION_2TLS : CURL_HTTP_VERSION_1_1));
    // Wait for a connection that can multiplex rather than open another one.
    if (to.tls) curl_easy_setopt(e, CURLOPT_PIPEWAIT, 1L);
    if (to.tls && !options_.ca_file.empty()) curl_easy_setopt(e, CURLOPT_CAINFO, options_.ca_file.c_str());
    curl_easy_setopt(e, CURLOPT_OPENSOCKETFUNCTION, &HttpClient::on_open_socket);
    curl_easy_setopt(e, CURLOPT_OPENSOCKETDATA, &call);
    // A connection outlives the call that opened it: close through the client.
    curl_easy_setopt(e, CURLOPT_CLOSESOCKETFUNCTION, &HttpClient::on_close_socket);
    curl_easy_setopt(e, CURLOPT_CLOSESOCKETDATA, this);
    curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, &HttpClient::on_header);
    curl_easy_setopt(e, CURLOPT_HEADERDATA, &call);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, &HttpClient::on_write);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, &call);

    const std::string& m = req.method;
    if (m == "GET" && req.body.empty()) {
      curl_easy_setopt(e, CURLOPT_HTTPGET, 1L);
    } else if (m == "HEAD") {
      curl_easy_setopt(e, CURLOPT_NOBODY, 1L);
    } else {
      if (!req.body.empty() || m == "POST" || m == "PUT" || m == "PATCH") {
        call.body = req.body; // curl reads it during the transfer
        curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, static_cast<curl_off_t>(call.body.size()));
        curl_easy_setopt(e, CURLOPT_POSTFIELDS, call.body.c_str());
      }
      if (m != "POST") curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, m.c_str());
    }
    auto add_header = [&](const std::string& line) {
      if (curl_slist* l = curl_slist_append(call.headers, line.c_str())) {
        call.headers = l;
        return true;
      }
      return false;
    };
    bool ok = true;
    for (const auto& [k, v] : req.headers) {
      if (k.find_first_of(":\r\n") != std::string::npos || v.find_first_of("\r\n") != std::string::npos)
        return "header '" + k + "' has a forbidden character";
      ok = ok && add_header(k + ": " + v);
    }
    // "Name:" removes a header curl would add: no 1 s wait for 100-continue, and no
    // form content type on a body the caller did not type.
    ok = ok && add_header("Expect:");
    ok = ok && add_header(req.content_type.empty() ? "Content-Type:" : "Content-Type: " + req.content_type);
    if (!ok) return "out of memory for the request headers";
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, call.headers);
    return {};
  }

  std::string add(Call& call) {
    CURLMcode rc = curl_multi_add_handle(multi_, call.easy);
    if (rc != CURLM_OK) return std::string("curl_multi_add_handle: ") + curl_multi_strerror(rc);
    return {};
  }

  // Frees the call's curl resources and timer; its record stays with the caller.
  void release(Call& call) noexcept {
    if (call.timer != 0) loop_.cancel(call.timer);
    call.timer = 0;
    if (call.easy != nullptr) {
      if (multi_ != nullptr) curl_multi_remove_handle(multi_, call.easy);
      curl_easy_cleanup(call.easy);
      call.easy = nullptr;
    }
    if (call.headers != nullptr) curl_slist_free_all(call.headers);
    call.headers = nullptr;
  }

  // Stores the result; done runs from a loop timer, so never inside send().
  void finish_later(Call& call, Result<HttpResponse> result) {
    finish(call, std::move(result));
    ready_.push_back(call.id);
    if (flush_timer_ == 0) flush_timer_ = loop_.after(std::chrono::nanoseconds(0), [this] {
      flush_timer_ = 0;
      dispatch();
    });
  }

  void finish(Call& call, Result<HttpResponse> result) {
    release(call);
    call.finished = true;
    if (!result) {
      std::lock_guard<std::mutex> lock(stats_mu_);
      ++call.host->stats.failures;
      call.host->stats.last_error = result.error().message();
    }
    call.result = std::make_unique<Result<HttpResponse>>(std::move(result));
  }

  // Runs `done` of every finished call still there (a done may cancel another one).
  void dispatch() {
    std::vector<CallId> ids;
    ids.swap(ready_);
    for (CallId id : ids) {
      auto it = calls_.find(id);
      if (it == calls_.end() || !it->second->finished) continue;
      std::unique_ptr<Call> call = std::move(it->second);
      calls_.erase(it);
      if (!call->done) continue;
      try {
        call->done(std::move(*call->result));
      } catch (...) {
        // A throwing callback must not cost the other calls their answers.
      }
    }
  }

  void on_deadline(CallId id) {
    auto it = calls_.find(id);
    if (it == calls_.end()) return;
    Call& call = *it->second;
    call.timer = 0;
    if (call.finished) return;
    auto now = steady::now();
    if (call.streaming && now < call.last_byte + call.limit) {
      call.timer = loop_.at(call.last_byte + call.limit, [this, id] { on_deadline(id); });
      return;
    }
    std::string why = call.streaming ? ": no byte for " + std::to_string(call.limit.count()) + " ms"
                                     : ": no complete response within " + std::to_string(call.limit.count()) + " ms";
    finish(call, Error(Errc::timeout, call.what + " to " + call.host_name() + why));
    ready_.push_back(id);
    dispatch();
  }

  // Runs curl for one socket event or its timer, then settles what that finished.
  void drive(curl_socket_t s, int events) {
    if (multi_ == nullptr) return;
    int running = 0;
    in_curl_ = true;
    curl_multi_socket_action(multi_, s, events, &running);
    in_curl_ = false;
    settle();
  }

  void settle() {
    for (CallId id : doomed_) {
      auto it = calls_.find(id);
      if (it == calls_.end()) continue;
      Call& call = *it->second;
      if (call.canceled) {
        release(call);
        calls_.erase(it);
      } else if (!call.finished) {
        finish(call, Error(Errc::io_error, call.what + " to " + call.host_name() + ": " + call.failed));
        ready_.push_back(id);
      }
    }
    doomed_.clear();
    for (CallId id : pending_adds_) {
      auto it = calls_.find(id);
      if (it == calls_.end() || it->second->finished) continue;
      if (auto err = add(*it->second); !err.empty()) {
        finish(*it->second, Error(Errc::io_error, it->second->what + ": " + err));
        ready_.push_back(id);
      }
    }
    pending_adds_.clear();
    int left = 0;
    while (CURLMsg* msg = curl_multi_info_read(multi_, &left)) {
      if (msg->msg != CURLMSG_DONE) continue;
      Call* call = nullptr;
      curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, &call);
      if (call == nullptr || call->finished) continue;
      CURLcode code = msg->data.result;
      finish(*call, outcome(*call, code));
      ready_.push_back(call->id);
    }
    dispatch();
  }

  // The result of a transfer curl ended with `code` (the handle is still valid).
  Result<HttpResponse> outcome(Call& call, CURLcode code) {
    long status = 0;
    curl_easy_getinfo(call.easy, CURLINFO_RESPONSE_CODE, &status);
    std::string where = call.what + " to " + call.host_name();
    auto response = [&]() -> Result<HttpResponse> {
      call.response.status = static_cast<int>(status);
      return std::move(call.response);
    };
    if (code == CURLE_OK) return response();
    if (!call.failed.empty()) return Error(Errc::io_error, where + ": " + call.failed);
    if (call.oversized)
      return Error(Errc::too_large, where + ": the response body exceeds " + std::to_string(call.max_bytes) + " bytes");
    if (call.stopped && code == CURLE_WRITE_ERROR) return response(); // on_body ended it
    if (!call.refusal.empty()) return Error(Errc::io_error, where + ": " + call.refusal);
    long os_errno = 0;
    curl_easy_getinfo(call.easy, CURLINFO_OS_ERRNO, &os_errno);
    std::string text = call.errbuf[0] != '\0' ? std::string(call.errbuf) : curl_easy_strerror(code);
    switch (code) {
    case CURLE_COULDNT_RESOLVE_HOST:
      return Error(Errc::unavailable, where + ": cannot resolve host '" + call.host_only + "': " + text);
    case CURLE_COULDNT_CONNECT:
      return Error(Errc::unavailable, where + ": cannot connect: " +
                                          (os_errno != 0 ? std::strerror(static_cast<int>(os_errno)) : text));
    case CURLE_OPERATION_TIMEDOUT: // only connecting has a curl timeout; the rest is ours
      return Error(Errc::unavailable,
                   where + ": connect timed out after " + std::to_string(options_.connect_timeout.count()) + " ms");
    case CURLE_URL_MALFORMAT:
      return Error(Errc::invalid_argument, where + ": malformed URL " + call.url);
    case CURLE_OUT_OF_MEMORY:
      return Error(Errc::io_error, where + ": out of memory");
    default:
      return Error(Errc::unavailable,
                   where + ": " + text + (os_errno != 0 ? std::string(" (") + std::strerror(static_cast<int>(os_errno)) + ")" : ""));
    }
  }

  // curl callbacks. They run inside curl_multi_* calls on the loop's thread.

  static int on_socket(CURL* easy, curl_socket_t s, int what, void* userp, void*) {
    auto* self = static_cast<HttpClient*>(userp);
    if (what == CURL_POLL_REMOVE) {
      if (self->watched_.erase(s) != 0) self->loop_.unwatch(s);
      return 0;
    }
    std::uint32_t events = 0;
    if (what == CURL_POLL_IN || what == CURL_POLL_INOUT) events |= EPOLLIN;
    if (what == CURL_POLL_OUT || what == CURL_POLL_INOUT) events |= EPOLLOUT;
    Result<void> r;
    if (self->watched_.count(s) != 0) {
      r = self->loop_.modify(s, events);
    } else {
      r = self->loop_.watch(s, events, [self, s](std::uint32_t ev) {
        int flags = 0;
        if (ev & (EPOLLIN | EPOLLHUP)) flags |= CURL_CSELECT_IN;
        if (ev & EPOLLOUT) flags |= CURL_CSELECT_OUT;
        if (ev & EPOLLERR) flags |= CURL_CSELECT_ERR;
        self->drive(s, flags);
      });
      if (r) self->watched_.insert(s);
    }
    if (!r) {
      // The transfer could never progress: end it loudly rather than at its deadline.
      Call* call = nullptr;
      curl_easy_getinfo(easy, CURLINFO_PRIVATE, &call);
      if (call != nullptr && call->failed.empty()) {
        call->failed = r.error().message();
        self->doomed_.push_back(call->id);
      }
    }
    return 0;
  }

  static int on_timer(CURLM*, long timeout_ms, void* userp) {
    auto* self = static_cast<HttpClient*>(userp);
    if (self->curl_timer_ != 0) self->loop_.cancel(self->curl_timer_);
    self->curl_timer_ = 0;
    if (timeout_ms >= 0) // curl forbids driving it from here: run at the loop's next turn
      self->curl_timer_ = self->loop_.after(std::chrono::milliseconds(timeout_ms), [self] {
        self->curl_timer_ = 0;
        self->drive(CURL_SOCKET_TIMEOUT, 0);
      });
    return 0;
  }

  static curl_socket_t on_open_socket(void* clientp, curlsocktype, struct curl_sockaddr* addr) {
    auto* call = static_cast<Call*>(clientp);
    HttpClient* self = call->client;
    int fd = ::socket(addr->family, addr->socktype | SOCK_CLOEXEC, addr->protocol);
    if (fd < 0) {
      int e = errno;
      call->refusal = std::string("cannot open a socket: ") + std::strerror(e);
      return CURL_SOCKET_BAD;
    }
    rlimit lim{};
    if (::getrlimit(RLIMIT_NOFILE, &lim) == 0 && lim.rlim_cur != RLIM_INFINITY) {
      long long limit = static_cast<long long>(lim.rlim_cur);
      if (static_cast<long long>(fd) >= limit - static_cast<long long>(self->options_.fd_reserve)) {
        ::close(fd);
        call->refusal = "descriptor reserve: fd " + std::to_string(fd) + " of limit " + std::to_string(limit) +
                        " leaves fewer than " + std::to_string(self->options_.fd_reserve) + " free";
        return CURL_SOCKET_BAD;
      }
    }
    self->sockets_[fd] = call->host;
    std::lock_guard<std::mutex> lock(self->stats_mu_);
    HostStats& st = call->host->stats;
    ++st.connects;
    ++st.open_connections;
    if (st.open_connections > st.peak_connections) st.peak_connections = st.open_connections;
    return fd;
  }

  static int on_close_socket(void* clientp, curl_socket_t s) {
    auto* self = static_cast<HttpClient*>(clientp);
    if (self->watched_.erase(s) != 0) self->loop_.unwatch(s); // before the number is reused
    auto it = self->sockets_.find(s);
    if (it != self->sockets_.end()) {
      std::lock_guard<std::mutex> lock(self->stats_mu_);
      if (it->second->stats.open_connections > 0) --it->second->stats.open_connections;
      self->sockets_.erase(it);
    }
    return ::close(s);
  }

  static std::size_t on_header(char* data, std::size_t size, std::size_t n, void* userp) {
    auto* call = static_cast<Call*>(userp);
    call->last_byte = steady::now();
    std::string_view line(data, size * n);
    while (!line.empty() && (line.back() == '\n' || line.back() == '\r')) line.remove_suffix(1);
    if (line.substr(0, 5) == "HTTP/") {
      call->response.headers.clear(); // a new response head (after a 100 Continue)
    } else if (auto colon = line.find(':'); colon != std::string_view::npos && colon > 0) {
      auto value = line.substr(colon + 1);
      while (!value.empty() && (value.front() == ' ' || value.front() == '\t')) value.remove_prefix(1);
      while (!value.empty() && (value.back() == ' ' || value.back() == '\t')) value.remove_suffix(1);
      call->response.headers.emplace_back(std::string(line.substr(0, colon)), std::string(value));
    }
    return size * n;
  }

  static std::size_t on_write(char* data, std::size_t size, std::size_t n, void* userp) {
    auto* call = static_cast<Call*>(userp);
    std::size_t len = size * n;
    if (call->canceled) return 0;
    call->last_byte = steady::now();
    if (!call->streaming) {
      if (len > call->max_bytes - call->response.body.size()) {
        call->oversized = true; // stop reading; the connection is closed, not drained
        return 0;
      }
      call->response.body.append(data, len);
      return len;
    }
    bool more = false;
    try {
      more = !call->on_body || call->on_body(std::string_view(data, len));
    } catch (const std::exception& e) {
      call->failed = std::string("the body reader threw: ") + e.what();
    } catch (...) {
      call->failed = "the body reader threw";
    }
    if (call->canceled || !call->failed.empty()) return 0;
    if (!more) {
      call->stopped = true;
      return 0;
    }
    return len;
  }

  Loop& loop_;
  HttpClientOptions options_;
  CURLM* multi_ = nullptr;
  CallId next_id_ = 0;
  bool in_curl_ = false; ///< inside curl_multi_socket_action: no add or remove now
  TimerId curl_timer_ = 0, flush_timer_ = 0;
  std::unordered_map<CallId, std::unique_ptr<Call>> calls_;
  std::vector<CallId> ready_, doomed_, pending_adds_;
  std::unordered_set<int> watched_; ///< descriptors on the loop's epoll
  std::unordered_map<curl_socket_t, Host*> sockets_;
  std::map<std::string, Host> hosts_; ///< node-stable: calls and sockets point into it
  mutable std::mutex stats_mu_;       ///< guards Host::stats and the map's shape
};

} // namespace rt
DYNUP_NAMESPACE_END
