// A real nginx for compatibility tests: one upstream whose backends are extra server
// blocks of the same nginx, each answering with its own index, so the body of a proxied
// response names the backend nginx's balancer chose.
//
// nginx runs with `daemon off; master_process off;`: exactly one process, which both
// holds the upstream's balancer state (round-robin weights are per process) and is the
// PID we stop. With a master and one worker, the worker is a grandchild we could only
// reach through the master, and a SIGKILLed master would leave it running.
#pragma once

#include <support/process.hpp>
#include <support/temp_dir.hpp>

#include <httplib.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#ifndef DYNUP_NGINX_BIN
#define DYNUP_NGINX_BIN "/usr/sbin/nginx"
#endif

namespace dynup_test {

/// The nginx binary: $DYNUP_NGINX if set, else what CMake found (DYNUP_NGINX_BIN).
inline std::string nginx_binary() {
  const char* env = std::getenv("DYNUP_NGINX");
  return env && *env ? env : DYNUP_NGINX_BIN;
}

/// Empty when `bin` can be run, else why not and what to do about it.
inline std::string nginx_missing_reason(const std::string& bin) {
  if (::access(bin.c_str(), X_OK) == 0) return {};
  return "nginx is required for the nginx compatibility tests but \"" + bin +
         "\" is not an executable (install it with scripts/install-deps.sh, or point "
         "$DYNUP_NGINX at an nginx binary)";
}

/// `n` distinct loopback ports that were free a moment ago: all bound to port 0 at once
/// (so they differ), then released for nginx to bind. Another process may take one in
/// between; Nginx retries its startup for that.
inline std::vector<std::uint16_t> free_loopback_ports(std::size_t n) {
  std::vector<int> fds;
  std::vector<std::uint16_t> ports;
  auto close_all = [&] {
    for (int fd : fds) ::close(fd);
  };
  for (std::size_t i = 0; i < n; ++i) {
    int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
      int e = errno;
      close_all();
      throw std::system_error(e, std::generic_category(), "socket");
    }
    fds.push_back(fd);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = 0;
    socklen_t len = sizeof a;
    if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 ||
        ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
      int e = errno;
      close_all();
      throw std::system_error(e, std::generic_category(), "bind 127.0.0.1:0");
    }
    ports.push_back(ntohs(a.sin_port));
  }
  close_all();
  return ports;
}

/// The upstream under test: one backend per weight, in `server` line order.
struct NginxUpstream {
  std::vector<std::uint32_t> weights;
  /// The balancing directive, e.g. "hash $http_x_key consistent;"; empty: round robin.
  std::string method;
};

/// Whether 127.0.0.1:`port` answers GET `path` with 200 and exactly `body`.
inline bool nginx_answers(const char* path, std::uint16_t port, const std::string& body) {
  httplib::Client cli("127.0.0.1", port);
  cli.set_connection_timeout(std::chrono::milliseconds(200));
  cli.set_read_timeout(std::chrono::seconds(2));
  auto res = cli.Get(path);
  return res && res->status == 200 && res->body == body;
}

/// The start of a test nginx's config, everything kept under `prefix`: the error log,
/// the pid file, events, and `http {` opened with no access log, text/plain and the temp
/// paths. The caller adds its http-level lines and closes the block.
inline std::string nginx_config_head(const std::string& prefix) {
  std::string c;
  c += "error_log " + prefix + "/error.log notice;\n";
  c += "pid " + prefix + "/nginx.pid;\n";
  c += "events { worker_connections 1024; }\n";
  c += "http {\n";
  c += "  access_log off;\n";
  c += "  default_type text/plain;\n";
  for (const char* t : {"client_body", "proxy", "fastcgi", "uwsgi", "scgi"})
    c += std::string("  ") + t + "_temp_path " + prefix + "/" + t + ";\n";
  return c;
}

/// Ready when the proxy answers /ready with this instance's token (so not some other
/// process that took the port) and every backend answers with its index. nginx binds
/// all its ports before it serves anything, so an answer means every bind succeeded.
/// False when nginx exits or 15 s pass.
inline bool wait_nginx_ready(Process& nginx, std::uint16_t proxy_port, const std::string& token,
                             const std::vector<std::uint16_t>& backend_ports) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(15);
  while (std::chrono::steady_clock::now() < deadline) {
    if (nginx.wait_exit(std::chrono::milliseconds(0))) return false;
    if (nginx_answers("/ready", proxy_port, token)) {
      bool all = true;
      for (std::size_t i = 0; i < backend_ports.size() && all; ++i)
        all = nginx_answers("/", backend_ports[i], std::to_string(i));
      if (all) return true;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return false;
}

/// Starts an nginx harness: calls `attempt` (one start on newly chosen ports: empty on
/// success, else what went wrong) up to 5 times, again only after "Address already in
/// use", a port taken between free_loopback_ports and nginx's bind(). Throws
/// std::runtime_error with `what`, every attempt's failure and `config`, read then, so
/// it is the last attempt's.
inline void start_with_retries(const std::string& what, const std::function<std::string()>& attempt,
                               const std::string& config) {
  std::string failures;
  for (int n = 1; n <= 5; ++n) {
    std::string why = attempt();
    if (why.empty()) return;
    failures += "attempt " + std::to_string(n) + ": " + why + "\n";
    if (why.find("Address already in use") == std::string::npos) break;
  }
  throw std::runtime_error(what + " did not start\n" + failures + "config:\n" + config);
}

/// Why a start attempt failed: stops `nginx` and returns its stderr and `error_log`,
/// which it removes so that the next attempt starts a clean log.
inline std::string failed_start_output(Process& nginx, const std::string& error_log) {
  nginx.stop(std::chrono::milliseconds(3000));
  std::string out = nginx.read_all(Process::Stream::err, std::chrono::milliseconds(500));
  std::string log = exists(error_log) ? read_all(error_log) : "";
  if (!log.empty()) out += (out.empty() ? "" : "\n") + log;
  std::error_code ec;
  std::filesystem::remove(error_log, ec);
  return out.empty() ? "not ready within the timeout" : out;
}

/// A running nginx proxying to its own backends. Starts in the constructor (throws
/// std::runtime_error with nginx's output if it cannot), stops by PID in the destructor.
/// Not thread-safe: one test thread drives it.
class Nginx {
public:
  /// The request header that carries a key for `hash $http_x_key`. A header rather than
  /// a query argument: $arg_key is the raw, still percent-encoded text, whereas a header
  /// value reaches the balancer byte for byte (UTF-8, '%', '&', inner spaces).
  static constexpr const char* key_header = "X-Key";
  /// The nginx variable holding that header, for the `hash` directive.
  static constexpr const char* key_variable = "$http_x_key";

  explicit Nginx(NginxUpstream upstream) : upstream_(std::move(upstream)) {
    if (upstream_.weights.empty()) throw std::invalid_argument("Nginx: no backends");
    std::string missing = nginx_missing_reason(nginx_binary());
    if (!missing.empty()) throw std::runtime_error(missing);
    start_with_retries("nginx", [this] { return start(); }, config_);
  }

  ~Nginx() { stop(); }
  Nginx(const Nginx&) = delete;
  Nginx& operator=(const Nginx&) = delete;

  std::uint16_t proxy_port() const noexcept { return proxy_port_; }
  const std::vector<std::uint16_t>& backend_ports() const noexcept { return backend_ports_; }

  /// Backend `i`'s address exactly as its `server` line names it in the upstream block.
  std::string server_text(std::size_t i) const { return "127.0.0.1:" + std::to_string(backend_ports_.at(i)); }

  const std::string& config() const noexcept { return config_; }
  std::string error_log() const { return exists(dir_.file("error.log")) ? read_all(dir_.file("error.log")) : ""; }

  /// Sends `n` sequential requests through the proxy on one keep-alive connection and
  /// returns the index of the backend that served each.
  std::vector<std::size_t> record(std::size_t n) {
    httplib::Client cli = client();
    std::vector<std::size_t> out;
    out.reserve(n);
    for (std::size_t k = 0; k < n; ++k) out.push_back(served_by(cli.Get("/"), "request " + std::to_string(k)));
    return out;
  }

  /// The backend nginx's balancer chose for each key (sent in the `key_header` header,
  /// one request per key, in order). Keys must be non-empty without leading or trailing
  /// blanks and without CR, LF or NUL: nginx would see a different key, or an empty one
  /// (which `hash` answers with plain round robin).
  std::vector<std::size_t> map_keys(const std::vector<std::string>& keys) {
    httplib::Client cli = client();
    std::vector<std::size_t> out;
    out.reserve(keys.size());
    for (const std::string& key : keys) {
      check_key(key);
      out.push_back(served_by(cli.Get("/", httplib::Headers{{key_header, key}}), "key \"" + key + "\""));
    }
    return out;
  }

  /// SIGTERM, then SIGKILL after a grace period, to this nginx's PID only.
  void stop() {
    if (process_) process_->stop(std::chrono::milliseconds(3000));
    process_.reset();
  }

private:
  static void check_key(const std::string& key) {
    auto blank = [](char c) { return c == ' ' || c == '\t'; };
    bool ok = !key.empty() && !blank(key.front()) && !blank(key.back()) &&
              key.find_first_of(std::string("\r\n\0", 3)) == std::string::npos;
    if (!ok) throw std::invalid_argument("Nginx::map_keys: key \"" + key + "\" cannot travel in a header unchanged");
  }

  httplib::Client client() const {
    httplib::Client cli("127.0.0.1", proxy_port_);
    cli.set_keep_alive(true);
    cli.set_connection_timeout(std::chrono::seconds(5));
    cli.set_read_timeout(std::chrono::seconds(10));
    return cli;
  }

  std::size_t served_by(const httplib::Result& res, const std::string& what) const {
    if (!res)
      throw std::runtime_error(what + ": no response from nginx (" + httplib::to_string(res.error()) +
                               ")\nerror log:\n" + error_log());
    if (res->status != 200)
      throw std::runtime_error(what + ": nginx answered " + std::to_string(res->status) + ": " + res->body +
                               "\nerror log:\n" + error_log());
    std::size_t i = parse_index(res->body);
    if (i >= backend_ports_.size()) throw std::runtime_error(what + ": unexpected body \"" + res->body + "\"");
    return i;
  }

  static std::size_t parse_index(const std::string& body) {
    if (body.empty() || body.size() > 9) return static_cast<std::size_t>(-1);
    std::size_t v = 0;
    for (char c : body) {
      if (c < '0' || c > '9') return static_cast<std::size_t>(-1);
      v = v * 10 + static_cast<std::size_t>(c - '0');
    }
    return v;
  }

  std::string render_config() const {
    std::string c = nginx_config_head(dir_.path());
    c += "  keepalive_requests 1000000;\n";
    c += "  upstream dynup_test {\n";
    if (!upstream_.method.empty()) c += "    " + upstream_.method + "\n";
    for (std::size_t i = 0; i < upstream_.weights.size(); ++i)
      c += "    server " + server_text(i) + " weight=" + std::to_string(upstream_.weights[i]) + ";\n";
    c += "  }\n";
    c += "  server {\n";
    c += "    listen 127.0.0.1:" + std::to_string(proxy_port_) + ";\n";
    c += "    location = /ready { return 200 \"" + token_ + "\"; }\n";
    c += "    location / { proxy_pass http://dynup_test; proxy_next_upstream off; }\n";
    c += "  }\n";
    for (std::size_t i = 0; i < backend_ports_.size(); ++i)
      c += "  server { listen " + server_text(i) + "; return 200 \"" + std::to_string(i) + "\"; }\n";
    c += "}\n";
    return c;
  }

  // One startup attempt: empty on success, else what went wrong.
  std::string start() {
    auto ports = free_loopback_ports(upstream_.weights.size() + 1);
    proxy_port_ = ports[0];
    backend_ports_.assign(ports.begin() + 1, ports.end());
    token_ = "dynup-nginx-" + std::to_string(std::random_device{}());
    config_ = render_config();
    std::string conf = dir_.file("nginx.conf");
    write_in_place(conf, config_);
    process_ = std::make_unique<Process>(std::vector<std::string>{
        nginx_binary(), "-e", "stderr", "-p", dir_.path() + "/", "-c", conf, "-g", "daemon off; master_process off;"});
    if (wait_ready()) return {};
    std::string why = failed_start_output(*process_, dir_.file("error.log"));
    process_.reset();
    return why;
  }

  bool wait_ready() { return wait_nginx_ready(*process_, proxy_port_, token_, backend_ports_); }

  TempDir dir_; // declared first: removed after the process is gone
  NginxUpstream upstream_;
  std::uint16_t proxy_port_ = 0;
  std::vector<std::uint16_t> backend_ports_;
  std::string token_;
  std::string config_;
  std::unique_ptr<Process> process_;
};

} // namespace dynup_test
