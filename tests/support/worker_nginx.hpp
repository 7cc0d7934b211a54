// A real nginx with a master and worker processes proxying `location /` to an upstream
// named "api" whose balancer is under test (the Lua binding, the native module). What
// differs between those is the WorkerNginxLayout: modules to load, http-level lines, the
// upstream block's body, extra proxy lines, the /status location's body. The rest is
// here: backends as extra server blocks of the same nginx, each answering "/" with its
// index and "/connection" with "<index> <its side's connection number>"; a few more
// free ports with nothing listening, as dead peers; a peer file.
//
// Everything lives in its own prefix directory (config, error log, pid file, temp
// paths, the peer file) on free 127.0.0.1 ports. nginx runs in the foreground as our
// child, so the PID we stop is the master's; its workers (seen in /proc or in
// X-Worker-Pid) are killed by PID only if they outlive it.
#pragma once

#include <support/nginx.hpp>
#include <support/process.hpp>
#include <support/temp_dir.hpp>
#include <support/wait.hpp>

#include <httplib.h>
#include <nlohmann/json.hpp>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <system_error>
#include <tuple>
#include <utility>
#include <vector>

namespace dynup_test {

/// One response through the proxy.
struct NginxReply {
  int status = 0;              ///< 0: no response
  std::string body;            ///< the backend's index for a proxied 200 of "/"
  std::string worker_pid;      ///< X-Worker-Pid: the nginx worker that served it
  std::string upstream_status; ///< X-Upstream-Status: $upstream_status, "502, 200" after a retry
  std::string error;           ///< why there is no response
};

/// A reply in one line, for failure messages.
inline std::string describe(const NginxReply& r) {
  if (r.status == 0) return "no response (" + r.error + ")";
  return std::to_string(r.status) + " \"" + r.body + "\" from worker " + r.worker_pid + ", upstream status \"" +
         r.upstream_status + "\"";
}

/// What a run of requests through the proxy came to (WorkerNginx::send).
struct NginxTraffic {
  std::map<std::string, int> by_backend; ///< answers (200s from a backend) by the backend's index
  std::set<std::string> workers;         ///< the workers (X-Worker-Pid) that gave those answers
  int retried = 0;                       ///< answers after a failed try: X-Upstream-Status "502, …"
  std::vector<std::string> failures;     ///< every other outcome: "request <i>: <the reply>"
};

/// Backends by index, each with a weight: a peer document's content (weighted_peers_doc).
using WeightedBackends = std::vector<std::pair<std::size_t, std::uint32_t>>;

/// Peers as (id, "host:port", weight): what must match between a registry and a status.
using PeerAddresses = std::set<std::tuple<std::string, std::string, std::uint32_t>>;

/// Peers as (id, weight): what a status document lists, or what a peer document names.
using PeerWeights = std::set<std::pair<std::string, std::uint32_t>>;

/// The peers of a status document: the Lua binding's status, one upstream of
/// dynup_status, or one of dynup-proxy's admin API.
inline PeerAddresses addresses_of(const nlohmann::json& status) {
  PeerAddresses out;
  for (const nlohmann::json& p : status.at("peers"))
    out.emplace(p.at("id").get<std::string>(),
                p.at("host").get<std::string>() + ":" + std::to_string(p.at("port").get<int>()),
                p.at("weight").get<std::uint32_t>());
  return out;
}

/// The same without the addresses.
inline PeerWeights peers_of(const nlohmann::json& status) {
  PeerWeights out;
  for (const auto& [id, address, weight] : addresses_of(status)) out.emplace(id, weight);
  return out;
}

/// The peer with id `id` in a status document's "peers", or nullptr.
inline const nlohmann::json* peer_by_id(const nlohmann::json& status, const std::string& id) {
  for (const nlohmann::json& p : status.at("peers"))
    if (p.at("id") == id) return &p;
  return nullptr;
}

/// The peers weighted_peers_doc(`backends`) names, as a status lists them.
inline PeerWeights named_peers(const WeightedBackends& backends) {
  PeerWeights out;
  for (const auto& [i, weight] : backends) out.emplace("b" + std::to_string(i), weight);
  return out;
}

/// "b0=1 b2=3", for failure messages.
inline std::string describe(const PeerWeights& peers) {
  std::string out;
  for (const auto& [id, weight] : peers) out += (out.empty() ? "" : " ") + id + "=" + std::to_string(weight);
  return out;
}

/// "b0@127.0.0.1:1234=1 …", for failure messages.
inline std::string describe(const PeerAddresses& peers) {
  std::string out;
  for (const auto& [id, address, weight] : peers)
    out += (out.empty() ? "" : " ") + id + "@" + address + "=" + std::to_string(weight);
  return out.empty() ? "no peers" : out;
}

/// The parts of nginx.conf that differ between the balancers under test. Each string is
/// whole lines, indented for its place.
struct WorkerNginxLayout {
  std::vector<std::string> load_modules; ///< paths of dynamic modules, in load order
  std::string main;                      ///< main-context lines (worker_rlimit_nofile, …)
  std::string http;                      ///< http-level lines, before `upstream api`
  std::string upstream;                  ///< the body of `upstream api { … }`
  std::string proxy;                     ///< extra lines of `location /`, after the retry rules
  std::string locations;                 ///< extra location blocks of the proxy server
  std::string status;                    ///< the body of `location = /status` (X-Worker-Pid is added)
};

/// What the nginx runs: `backends` answering servers, `dead` ports with nothing
/// listening, the peer file's first content (backend indices) and the worker count.
struct WorkerNginxShape {
  std::size_t backends = 0;
  std::size_t dead = 0;
  std::vector<std::size_t> initial;
  std::size_t workers = 2;
};

class WorkerNginx;

/// Called on every start attempt once the ports are chosen and the peer file written,
/// before nginx starts: returns the layout, and may write files it names.
using WorkerNginxConfigure = std::function<WorkerNginxLayout(const WorkerNginx&)>;

/// A running nginx. Starts in the constructor (throws std::runtime_error with nginx's
/// output if it cannot), stops by PID in the destructor. Not thread-safe: one test
/// thread drives it.
class WorkerNginx {
public:
  /// `what` names this nginx in errors ("nginx (lua)").
  WorkerNginx(std::string what, WorkerNginxShape shape, WorkerNginxConfigure configure)
      : what_(std::move(what)), shape_(std::move(shape)), configure_(std::move(configure)) {
    std::string missing = nginx_missing_reason(nginx_binary());
    if (!missing.empty()) throw std::runtime_error(missing);
    start_with_retries(what_, [this] { return start(); }, config_);
  }

  ~WorkerNginx() { stop(); }
  WorkerNginx(const WorkerNginx&) = delete;
  WorkerNginx& operator=(const WorkerNginx&) = delete;

  std::uint16_t proxy_port() const noexcept { return proxy_port_; }
  std::uint16_t backend_port(std::size_t i) const { return backend_ports_.at(i); }
  std::uint16_t dead_port(std::size_t i) const { return dead_ports_.at(i); }
  std::size_t workers() const noexcept { return shape_.workers; }
  pid_t master_pid() const noexcept { return process_ ? process_->pid() : -1; }
  const std::string& config() const noexcept { return config_; }
  /// A path in this nginx's private prefix directory.
  std::string file(const std::string& name) const { return dir_.file(name); }
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
  std::string weighted_peers_doc(const WeightedBackends& backends) const {
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
  NginxReply get(const std::string& path = "/") {
    httplib::Client cli("127.0.0.1", proxy_port_);
    cli.set_keep_alive(false);
    cli.set_connection_timeout(std::chrono::seconds(5));
    cli.set_read_timeout(std::chrono::seconds(10));
    NginxReply r;
    auto res = cli.Get(path);
    if (!res) {
      r.error = httplib::to_string(res.error());
      return r;
    }
    r.status = res->status;
    r.body = res->body;
    r.worker_pid = res->get_header_value("X-Worker-Pid");
    r.upstream_status = res->get_header_value("X-Upstream-Status");
    if (!r.worker_pid.empty()) seen_.insert(static_cast<pid_t>(std::stol(r.worker_pid)));
    return r;
  }

  /// `n` GETs of "/", each as get() sends it, counted.
  NginxTraffic send(int n) {
    NginxTraffic t;
    for (int i = 0; i < n; ++i) {
      NginxReply r = get();
      if (r.status != 200 || !is_backend_index(r.body)) {
        t.failures.push_back("request " + std::to_string(i) + ": " + describe(r));
        continue;
      }
      ++t.by_backend[r.body];
      t.workers.insert(r.worker_pid);
      if (r.upstream_status.rfind("502, ", 0) == 0) ++t.retried;
    }
    return t;
  }

  /// Each worker's /status document by its pid, asked on fresh connections until
  /// `workers()` distinct workers have answered or 400 requests were made (the caller
  /// checks the count). Throws std::runtime_error on an answer that is not a 200 with
  /// JSON.
  std::map<std::string, nlohmann::json> status_by_worker() {
    std::map<std::string, nlohmann::json> out;
    for (int i = 0; i < 400 && out.size() < shape_.workers; ++i) {
      NginxReply r = get("/status");
      auto doc = nlohmann::json::parse(r.body, nullptr, false);
      if (r.status != 200 || doc.is_discarded())
        throw std::runtime_error("/status: " + std::to_string(r.status) + " " + r.error + " \"" + r.body +
                                 "\"\nerror log:\n" + error_log());
      out[r.worker_pid] = std::move(doc);
    }
    return out;
  }

  /// The master's workers that are serving (not those a reload is shutting down), from
  /// /proc.
  std::set<pid_t> worker_pids() const { return children(false); }

  /// SIGHUP to the master, as `nginx -s reload`: it rereads the config, starts new
  /// workers and shuts the old ones down gracefully. Returns at once.
  void reload() {
    if (process_) process_->send(SIGHUP);
  }

  /// SIGTERM to the master (SIGKILL after a grace period), then SIGKILL to any worker it
  /// had that is still an nginx worker: by PID only, never by name.
  void stop() {
    if (!process_) return;
    for (pid_t w : children(true)) seen_.insert(w);
    process_->stop(std::chrono::milliseconds(3000));
    process_.reset();
    for (pid_t w : seen_)
      if (title_of(w).rfind("nginx: worker process", 0) == 0) ::kill(w, SIGKILL);
  }

private:
  bool is_backend_index(const std::string& body) const {
    for (std::size_t i = 0; i < shape_.backends; ++i)
      if (body == std::to_string(i)) return true;
    return false;
  }

  // A process's title (its argv, which nginx overwrites), or empty if it is gone.
  static std::string title_of(pid_t pid) {
    std::ifstream in("/proc/" + std::to_string(pid) + "/cmdline");
    std::string title;
    std::getline(in, title, '\0');
    return title;
  }

  // The master's worker processes; those shutting down after a reload only if asked.
  std::set<pid_t> children(bool shutting_down_too) const {
    std::set<pid_t> out;
    const pid_t master = master_pid();
    if (master <= 0) return out;
    std::error_code ec;
    for (const auto& e : std::filesystem::directory_iterator("/proc", ec)) {
      const std::string name = e.path().filename().string();
      if (name.find_first_not_of("0123456789") != std::string::npos) continue;
      std::ifstream stat(e.path() / "stat");
      std::string line;
      if (!std::getline(stat, line)) continue;
      // "pid (comm) state ppid …": comm may hold spaces and parentheses.
      auto close = line.rfind(')');
      if (close == std::string::npos) continue;
      std::istringstream rest(line.substr(close + 1));
      std::string state;
      long ppid = 0;
      if (!(rest >> state >> ppid) || ppid != master) continue;
      const pid_t pid = static_cast<pid_t>(std::stol(name));
      const std::string title = title_of(pid);
      if (title == "nginx: worker process" ||
          (shutting_down_too && title == "nginx: worker process is shutting down"))
        out.insert(pid);
    }
    return out;
  }

  std::string render_config(const WorkerNginxLayout& layout) const {
    std::string c;
    for (const std::string& m : layout.load_modules) c += "load_module " + m + ";\n";
    // Workers of a root master run as nobody, which cannot read our 0700 directory (or
    // the build tree); the file source needs the peer file readable by the workers.
    if (::geteuid() == 0) c += "user root;\n";
    c += "worker_processes " + std::to_string(shape_.workers) + ";\n";
    c += layout.main;
    c += nginx_config_head(dir_.path());
    c += layout.http;
    c += "  upstream api {\n";
    c += layout.upstream;
    c += "  }\n";
    c += "  server {\n";
    c += "    listen 127.0.0.1:" + std::to_string(proxy_port_) + " reuseport;\n";
    c += "    location = /ready { add_header X-Worker-Pid $pid always; return 200 \"" + token_ + "\"; }\n";
    c += "    location = /status {\n";
    c += "      add_header X-Worker-Pid $pid always;\n";
    c += layout.status;
    c += "    }\n";
    c += layout.locations;
    c += "    location / {\n";
    c += "      proxy_pass http://api;\n";
    c += "      proxy_next_upstream error timeout;\n";
    c += "      proxy_next_upstream_tries 3;\n";
    c += "      proxy_connect_timeout 2s;\n";
    c += "      add_header X-Worker-Pid $pid always;\n";
    c += "      add_header X-Upstream-Status $upstream_status always;\n";
    c += layout.proxy;
    c += "    }\n";
    c += "  }\n";
    for (std::size_t i = 0; i < backend_ports_.size(); ++i) {
      const std::string index = std::to_string(i);
      c += "  server {\n";
      c += "    listen 127.0.0.1:" + std::to_string(backend_ports_[i]) + ";\n";
      c += "    location = /connection { return 200 \"" + index + " $connection\"; }\n";
      c += "    location / { return 200 \"" + index + "\"; }\n";
      c += "  }\n";
    }
    c += "}\n";
    return c;
  }

  // One startup attempt: empty on success, else what went wrong.
  std::string start() {
    auto ports = free_loopback_ports(1 + shape_.backends + shape_.dead);
    proxy_port_ = ports[0];
    const auto first_dead = ports.begin() + 1 + static_cast<std::ptrdiff_t>(shape_.backends);
    backend_ports_.assign(ports.begin() + 1, first_dead);
    dead_ports_.assign(first_dead, ports.end());
    token_ = "dynup-worker-nginx-" + std::to_string(std::random_device{}());
    write_peers(peers_doc(shape_.initial));
    config_ = render_config(configure_(*this));
    std::string conf = dir_.file("nginx.conf");
    write_in_place(conf, config_);
    process_ = std::make_unique<Process>(std::vector<std::string>{nginx_binary(), "-e", dir_.file("error.log"), "-p",
                                                                  dir_.path() + "/", "-c", conf, "-g", "daemon off;"});
    // Ready once it answers and every worker is past its init (the module's handles
    // are made there; a worker takes its title after).
    if (wait_nginx_ready(*process_, proxy_port_, token_, backend_ports_) &&
        wait_until([&] { return worker_pids().size() == shape_.workers; }, std::chrono::milliseconds(15000)))
      return {};
    std::string why = failed_start_output(*process_, dir_.file("error.log"));
    process_.reset();
    return why;
  }

  TempDir dir_; // declared first: removed after the process is gone
  std::string what_;
  WorkerNginxShape shape_;
  WorkerNginxConfigure configure_;
  std::uint16_t proxy_port_ = 0;
  std::vector<std::uint16_t> backend_ports_;
  std::vector<std::uint16_t> dead_ports_;
  std::string token_;
  std::string config_;
  std::set<pid_t> seen_; // every worker pid seen: stop() kills those that outlive the master
  std::unique_ptr<Process> process_;
};

} // namespace dynup_test
