// A real nginx with lua-nginx-module running the Lua binding (examples/lua) as a user
// would: a master and two workers, each worker with its own dynup handle made in
// init_worker_by_lua, balancer_by_lua picking, log_by_lua reporting. Its backends are
// extra server blocks of the same nginx, each answering with its own index; a few more
// free ports are left with nothing listening, as dead peers.
//
// Everything lives in its own prefix directory (config, error log, pid file, temp
// paths, the peer file) on free 127.0.0.1 ports. nginx runs in the foreground as our
// child, so the PID we stop is the master's; the workers it reported (X-Worker-Pid on
// every response) are killed by PID only if they outlive it.
#pragma once

#include <support/nginx.hpp>
#include <support/process.hpp>
#include <support/temp_dir.hpp>

#include <httplib.h>
#include <nlohmann/json.hpp>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#ifndef DYNUP_C_LIB
#error "DYNUP_C_LIB must name libdynup_c.so (tests/CMakeLists.txt defines it)"
#endif
#ifndef DYNUP_LUA_LIB_DIR
#error "DYNUP_LUA_LIB_DIR must name examples/lua/lib (tests/CMakeLists.txt defines it)"
#endif

namespace dynup_test {

/// Where nginx's dynamic modules are: $DYNUP_NGINX_MODULES, else nginx -V's
/// --modules-path, else Debian's /usr/lib/nginx/modules.
inline std::string nginx_modules_dir(const std::string& nginx) {
  if (const char* env = std::getenv("DYNUP_NGINX_MODULES"); env && *env) return env;
  Process p({nginx, "-V"});
  std::string out = p.read_all(Process::Stream::err, std::chrono::milliseconds(5000));
  p.wait_exit(std::chrono::milliseconds(2000));
  const std::string flag = "--modules-path=";
  auto at = out.find(flag);
  if (at == std::string::npos) return "/usr/lib/nginx/modules";
  auto end = out.find_first_of(" \n", at);
  return out.substr(at + flag.size(), end == std::string::npos ? std::string::npos : end - at - flag.size());
}

/// The directory holding lua-resty-core's resty/core.lua (lua-nginx-module refuses to
/// start without it), or empty.
inline std::string resty_core_dir() {
  for (const char* d : {"/usr/share/lua/5.1", "/usr/local/share/lua/5.1", "/usr/local/openresty/lualib"})
    if (exists(std::string(d) + "/resty/core.lua")) return d;
  return {};
}

/// Empty when nginx can run the Lua binding, else why not and what to do about it.
inline std::string lua_nginx_missing_reason(const std::string& nginx) {
  if (std::string why = nginx_missing_reason(nginx); !why.empty()) return why;
  std::string modules = nginx_modules_dir(nginx);
  for (const char* m : {"ndk_http_module.so", "ngx_http_lua_module.so"})
    if (!exists(modules + "/" + m))
      return modules + "/" + m + " is missing: install libnginx-mod-http-lua (scripts/install-deps.sh) or point " +
             "$DYNUP_NGINX_MODULES at the directory holding it";
  if (resty_core_dir().empty()) return "lua-resty-core is missing: install it (scripts/install-deps.sh)";
  if (!exists(DYNUP_C_LIB)) return std::string(DYNUP_C_LIB) + " is missing: build the dynup_c target";
  return {};
}

/// One response through the proxy.
struct LuaReply {
  int status = 0;             ///< 0: no response
  std::string body;           ///< the backend's index for a proxied 200
  std::string worker_pid;     ///< X-Worker-Pid: the nginx worker that served it
  std::string upstream_status; ///< X-Upstream-Status: $upstream_status, "502, 200" after a retry
  std::string error;          ///< why there is no response
};

class LuaNginx {
public:
  /// `backends` answering servers, `dead` ports with nothing listening; the peer file
  /// starts with the backends in `initial` (indices). `upstream_extra` is merged into
  /// the upstream's JSON config (policy, health, shared, or a "source" other than the
  /// peer file).
  LuaNginx(std::size_t backends, std::size_t dead, std::vector<std::size_t> initial,
           nlohmann::json upstream_extra = nlohmann::json::object())
      : backends_(backends), dead_(dead), initial_(std::move(initial)), extra_(std::move(upstream_extra)) {
    std::string missing = lua_nginx_missing_reason(nginx_binary());
    if (!missing.empty()) throw std::runtime_error(missing);
    modules_ = nginx_modules_dir(nginx_binary());
    std::string failures;
    for (int attempt = 1; attempt <= 5; ++attempt) {
      std::string why = start();
      if (why.empty()) return;
      failures += "attempt " + std::to_string(attempt) + ": " + why + "\n";
      if (why.find("Address already in use") == std::string::npos) break;
    }
    throw std::runtime_error("nginx (lua) did not start\n" + failures + "config:\n" + config_);
  }

  ~LuaNginx() { stop(); }
  LuaNginx(const LuaNginx&) = delete;
  LuaNginx& operator=(const LuaNginx&) = delete;

  std::uint16_t proxy_port() const noexcept { return proxy_port_; }
  std::uint16_t backend_port(std::size_t i) const { return backend_ports_.at(i); }
  std::uint16_t dead_port(std::size_t i) const { return dead_ports_.at(i); }
  pid_t master_pid() const noexcept { return process_ ? process_->pid() : -1; }
  const std::string& config() const noexcept { return config_; }
  std::string peer_file() const { return dir_.file("peers.json"); }
  std::string error_log() const { return exists(dir_.file("error.log")) ? read_all(dir_.file("error.log")) : ""; }

  /// A peer document: backends by index (ids "b<i>") and dead ports (ids "dead<i>").
  std::string peers_doc(const std::vector<std::size_t>& backends, const std::vector<std::size_t>& dead = {}) const {
    nlohmann::json peers = nlohmann::json::array();
    for (std::size_t i : backends)
      peers.push_back({{"id", "b" + std::to_string(i)}, {"host", "127.0.0.1"}, {"port", backend_port(i)}});
    for (std::size_t i : dead)
      peers.push_back({{"id", "dead" + std::to_string(i)}, {"host", "127.0.0.1"}, {"port", dead_port(i)}});
    return nlohmann::json{{"peers", peers}}.dump();
  }

  /// A peer document of backends by index (ids "b<i>") with their weights.
  std::string weighted_peers_doc(const std::vector<std::pair<std::size_t, std::uint32_t>>& backends) const {
    nlohmann::json peers = nlohmann::json::array();
    for (const auto& [i, weight] : backends)
      peers.push_back(
          {{"id", "b" + std::to_string(i)}, {"host", "127.0.0.1"}, {"port", backend_port(i)}, {"weight", weight}});
    return nlohmann::json{{"peers", peers}}.dump();
  }

  /// Replaces the peer file the way tools do (a rename over it).
  void write_peers(const std::string& doc) { write_by_rename(peer_file(), doc); }

  /// One GET on a fresh connection (so the kernel spreads requests over the workers
  /// through `reuseport`).
  LuaReply get(const std::string& path = "/") {
    httplib::Client cli("127.0.0.1", proxy_port_);
    cli.set_keep_alive(false);
    cli.set_connection_timeout(std::chrono::seconds(5));
    cli.set_read_timeout(std::chrono::seconds(10));
    LuaReply r;
    auto res = cli.Get(path);
    if (!res) {
      r.error = httplib::to_string(res.error());
      return r;
    }
    r.status = res->status;
    r.body = res->body;
    r.worker_pid = res->get_header_value("X-Worker-Pid");
    r.upstream_status = res->get_header_value("X-Upstream-Status");
    if (!r.worker_pid.empty()) workers_.insert(r.worker_pid);
    return r;
  }

  /// SIGTERM to the master (SIGKILL after a grace period), then SIGKILL to any worker it
  /// reported that is still an nginx worker: by PID only, never by name.
  void stop() {
    if (!process_) return;
    process_->stop(std::chrono::milliseconds(3000));
    process_.reset();
    for (const std::string& w : workers_) {
      pid_t pid = static_cast<pid_t>(std::stol(w));
      std::string cmd = exists("/proc/" + w + "/cmdline") ? read_all("/proc/" + w + "/cmdline") : "";
      if (cmd.rfind("nginx: worker process", 0) == 0) ::kill(pid, SIGKILL);
    }
  }

private:
  std::string render_config() const {
    const std::string& d = dir_.path();
    nlohmann::json upstream = extra_;
    upstream["name"] = "api";
    if (!upstream.contains("source")) upstream["source"] = "file://" + peer_file();
    std::string c;
    c += "load_module " + modules_ + "/ndk_http_module.so;\n";
    c += "load_module " + modules_ + "/ngx_http_lua_module.so;\n";
    // Workers of a root master run as nobody, which cannot read our 0700 directory (or
    // the build tree); the file source needs the peer file readable by the workers.
    if (::geteuid() == 0) c += "user root;\n";
    c += "worker_processes 2;\n";
    c += "error_log " + d + "/error.log notice;\n";
    c += "pid " + d + "/nginx.pid;\n";
    c += "events { worker_connections 1024; }\n";
    c += "http {\n";
    c += "  access_log off;\n";
    c += "  default_type text/plain;\n";
    for (const char* t : {"client_body", "proxy", "fastcgi", "uwsgi", "scgi"})
      c += std::string("  ") + t + "_temp_path " + d + "/" + t + ";\n";
    c += "  lua_package_path \"" + std::string(DYNUP_LUA_LIB_DIR) + "/?.lua;" + resty_core_dir() + "/?.lua;;\";\n";
    c += "  init_worker_by_lua_block {\n";
    c += "    local up, err = require(\"resty.dynup\").new([==[" + upstream.dump() + "]==], {lib = \"" +
         std::string(DYNUP_C_LIB) + "\"})\n";
    c += "    if not up then ngx.log(ngx.ERR, \"dynup: \", err) end\n";
    c += "  }\n";
    c += "  upstream api {\n";
    c += "    server 0.0.0.1;\n";
    c += "    balancer_by_lua_block {\n";
    c += "      local balancer = require \"ngx.balancer\"\n";
    c += "      local dynup = require \"resty.dynup\"\n";
    c += "      local up = dynup.get(\"api\")\n";
    c += "      local host, port, err = up:pick(ngx.var.http_x_key)\n";
    c += "      if not host then\n";
    c += "        ngx.log(ngx.ERR, \"dynup: \", err)\n";
    c += "        return ngx.exit(dynup.NO_LIVE_UPSTREAMS)\n";
    c += "      end\n";
    c += "      if up:tries() == 1 then balancer.set_more_tries(2) end\n";
    c += "      local ok, set_err = balancer.set_current_peer(host, port)\n";
    c += "      if not ok then\n";
    c += "        ngx.log(ngx.ERR, \"dynup: set_current_peer: \", set_err)\n";
    c += "        return ngx.exit(ngx.ERROR)\n";
    c += "      end\n";
    c += "    }\n";
    c += "  }\n";
    c += "  server {\n";
    c += "    listen 127.0.0.1:" + std::to_string(proxy_port_) + " reuseport;\n";
    c += "    location = /ready { add_header X-Worker-Pid $pid always; return 200 \"" + token_ + "\"; }\n";
    c += "    location = /status {\n";
    c += "      add_header X-Worker-Pid $pid always;\n";
    c += "      content_by_lua_block { ngx.print(require(\"resty.dynup\").get(\"api\"):status()) }\n";
    c += "    }\n";
    c += "    location / {\n";
    c += "      proxy_pass http://api;\n";
    c += "      proxy_next_upstream error timeout;\n";
    c += "      proxy_next_upstream_tries 3;\n";
    c += "      proxy_connect_timeout 2s;\n";
    c += "      add_header X-Worker-Pid $pid always;\n";
    c += "      add_header X-Upstream-Status $upstream_status always;\n";
    c += "      log_by_lua_block { require(\"resty.dynup\").get(\"api\"):report() }\n";
    c += "    }\n";
    c += "  }\n";
    for (std::size_t i = 0; i < backend_ports_.size(); ++i)
      c += "  server { listen 127.0.0.1:" + std::to_string(backend_ports_[i]) + "; return 200 \"" +
           std::to_string(i) + "\"; }\n";
    c += "}\n";
    return c;
  }

  std::string start() {
    auto ports = free_loopback_ports(1 + backends_ + dead_);
    proxy_port_ = ports[0];
    backend_ports_.assign(ports.begin() + 1, ports.begin() + 1 + static_cast<std::ptrdiff_t>(backends_));
    dead_ports_.assign(ports.begin() + 1 + static_cast<std::ptrdiff_t>(backends_), ports.end());
    token_ = "dynup-lua-nginx-" + std::to_string(std::random_device{}());
    write_peers(peers_doc(initial_));
    config_ = render_config();
    std::string conf = dir_.file("nginx.conf");
    write_in_place(conf, config_);
    process_ = std::make_unique<Process>(std::vector<std::string>{nginx_binary(), "-e", dir_.file("error.log"), "-p",
                                                                  dir_.path() + "/", "-c", conf, "-g", "daemon off;"});
    if (wait_ready()) return {};
    process_->stop(std::chrono::milliseconds(3000));
    std::string out = process_->read_all(Process::Stream::err, std::chrono::milliseconds(500));
    std::string log = error_log();
    if (!log.empty()) out += (out.empty() ? "" : "\n") + log;
    process_.reset();
    std::error_code ec;
    std::filesystem::remove(dir_.file("error.log"), ec);
    return out.empty() ? "not ready within the timeout" : out;
  }

  bool wait_ready() { return wait_nginx_ready(*process_, proxy_port_, token_, backend_ports_); }

  TempDir dir_; // declared first: removed after the process is gone
  std::size_t backends_;
  std::size_t dead_;
  std::vector<std::size_t> initial_;
  nlohmann::json extra_;
  std::string modules_;
  std::uint16_t proxy_port_ = 0;
  std::vector<std::uint16_t> backend_ports_;
  std::vector<std::uint16_t> dead_ports_;
  std::string token_;
  std::string config_;
  std::set<std::string> workers_;
  std::unique_ptr<Process> process_;
};

} // namespace dynup_test
