// A real nginx running the native module (examples/nginx/ngx_http_upstream_dynup_module)
// as a user would: `load_module`, `dynup <source> <params>` in `upstream api`, optional
// `keepalive`, `dynup_status` at /status. The scaffolding (backends, dead ports, the peer
// file, reload, worker pids, start and stop by PID) is WorkerNginx's
// (tests/support/worker_nginx.hpp).
//
// Every instance keeps its shared region and leader lock (`shared.dir`) in its own
// directory, so two tests, or a test and a real nginx, never share one.
#pragma once

#include <support/nginx.hpp>
#include <support/temp_dir.hpp>
#include <support/worker_nginx.hpp>

#include <dynup/peer_json.hpp>
#include <dynup/snapshot_file.hpp>

#include <nlohmann/json.hpp>

#include <cstdlib>
#include <filesystem>
#include <functional>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#ifndef DYNUP_NGINX_MODULE
#error "DYNUP_NGINX_MODULE must name ngx_http_upstream_dynup_module.so (tests/CMakeLists.txt defines it)"
#endif

namespace dynup_test {

/// The module to load: $DYNUP_NGINX_MODULE_FILE when set (a benchmark comparing two
/// builds), else what CMake built (DYNUP_NGINX_MODULE).
inline std::string nginx_module_file() {
  if (const char* m = std::getenv("DYNUP_NGINX_MODULE_FILE"); m != nullptr && *m != '\0') return m;
  return DYNUP_NGINX_MODULE;
}

/// Empty when nginx can load the native module, else why not and what to do about it.
inline std::string module_nginx_missing_reason() {
  if (std::string why = nginx_missing_reason(nginx_binary()); !why.empty()) return why;
  const std::string module = nginx_module_file();
  if (!exists(module))
    return module + " is missing: it is built against nginx's source tree, which nginx-dev installs " +
           "(apt-get install nginx-dev, or scripts/install-deps.sh), then by the dynup_nginx_module target";
  return {};
}

struct ModuleNginxOptions {
  std::size_t backends = 3;
  std::size_t dead = 0;
  std::vector<std::size_t> initial{0}; ///< the peer file's first backends
  std::size_t workers = 2;
  /// The directive's source; empty: "file://" + the peer file. Called on every start
  /// attempt, so it may name the attempt's ports (`dead_port`).
  std::function<std::string(const WorkerNginx&)> source;
  /// name=value parameters of the directive ("policy=round_robin",
  /// "health.passive.max_fails=1"). `shared.dir=` is added unless given.
  std::vector<std::string> params;
  bool keepalive = false; ///< `keepalive 16`, with HTTP/1.1 and an empty Connection header
  /// When set, these backends are saved as the last-known-good file before nginx starts
  /// and passed as `snapshot=` (registry sources only).
  std::optional<std::vector<std::size_t>> snapshot;
  /// Adds to the layout after the module's lines (more upstreams, locations, main lines).
  std::function<void(const WorkerNginx&, WorkerNginxLayout&)> extend;
};

/// A running nginx with the native module. Not thread-safe: one test thread drives it.
class ModuleNginx : public WorkerNginx {
public:
  explicit ModuleNginx(ModuleNginxOptions options)
      : WorkerNginx("nginx (dynup module)", shape(options), configure(options)) {}

  /// Where the shared region and the leader lock live (unless the params say otherwise).
  std::string shared_dir() const { return file("shm"); }
  /// The last-known-good file `snapshot=` names.
  std::string snapshot_file() const { return file("snapshot.json"); }

  /// The status of upstream "api" (the first in dynup_status's "upstreams") of each
  /// worker, by its pid, as status_by_worker asks for them.
  std::map<std::string, nlohmann::json> upstream_status_by_worker() {
    std::map<std::string, nlohmann::json> out;
    for (auto& [pid, doc] : status_by_worker()) out[pid] = doc.at("upstreams").at(0);
    return out;
  }

private:
  static WorkerNginxShape shape(const ModuleNginxOptions& o) {
    std::string missing = module_nginx_missing_reason();
    if (!missing.empty()) throw std::runtime_error(missing);
    WorkerNginxShape s;
    s.backends = o.backends;
    s.dead = o.dead;
    s.initial = o.initial;
    s.workers = o.workers;
    return s;
  }

  static bool has_param(const std::vector<std::string>& params, const std::string& name) {
    for (const std::string& p : params)
      if (p.rfind(name + "=", 0) == 0) return true;
    return false;
  }

  static WorkerNginxConfigure configure(ModuleNginxOptions o) {
    return [o = std::move(o)](const WorkerNginx& n) {
      // A fresh region per start attempt: one left by a failed attempt names its ports.
      const std::string shm = n.file("shm");
      std::error_code ec;
      std::filesystem::remove_all(shm, ec);
      std::filesystem::create_directories(shm);

      std::string directive = "dynup " + (o.source ? o.source(n) : "file://" + n.peer_file());
      for (const std::string& p : o.params) directive += " " + p;
      if (!has_param(o.params, "shared.dir")) directive += " shared.dir=" + shm;
      if (o.snapshot) {
        const std::string path = n.file("snapshot.json");
        auto set = dynup::parse_peer_set(n.peers_doc(*o.snapshot));
        if (!set) throw std::runtime_error("snapshot peers: " + set.error().message());
        if (auto saved = dynup::save_snapshot(path, *set); !saved)
          throw std::runtime_error("snapshot " + path + ": " + saved.error().message());
        directive += " snapshot=" + path;
      }

      WorkerNginxLayout l;
      l.load_modules = {nginx_module_file()};
      l.upstream += "    " + directive + ";\n";
      if (o.keepalive) {
        l.upstream += "    keepalive 16;\n";
        l.proxy += "      proxy_http_version 1.1;\n";
        l.proxy += "      proxy_set_header Connection \"\";\n";
      }
      l.status += "      dynup_status;\n";
      if (o.extend) o.extend(n, l);
      return l;
    };
  }
};

} // namespace dynup_test
