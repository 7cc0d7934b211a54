// What N upstreams cost in nginx (issue 19): a real nginx with the native module, 2
// workers, N upstreams each watching one service on a Consul protocol double capped at
// 200 connections per client, as an agent is. For N in --n (default 1,100,1000):
// threads, descriptors and RSS per worker, registry connections, start until every
// upstream of every worker has its peers, one change until routed (p50, p99), and every
// service changed at once until every worker applied it.
//
// Run: build/<dir>/bench/dynup_scale [--n 1,100,1000] [--changes 20] [--module PATH] [--label TEXT] [--cap 200]
// (--module: another build's ngx_http_upstream_dynup_module.so, to compare side by side)
// Loopback only; nginx and the double are stopped by PID. Timings are printed, never
// checked.
#include <support/consul_double.hpp>
#include <support/module_nginx.hpp>
#include <support/wait.hpp>

#include <nlohmann/json.hpp>

#include <dirent.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;
using dynup_test::ConsulDouble;
using dynup_test::ConsulInstance;
using namespace std::chrono_literals;

double ms_since(Clock::time_point t0) { return std::chrono::duration<double, std::milli>(Clock::now() - t0).count(); }

std::size_t count_dir(const std::string& path) {
  std::size_t n = 0;
  if (DIR* d = ::opendir(path.c_str())) {
    while (auto* e = ::readdir(d))
      if (e->d_name[0] != '.') ++n;
    ::closedir(d);
  }
  return n;
}

double rss_mib(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("VmRSS:", 0) == 0) return std::stod(line.substr(6)) / 1024.0;
  return 0;
}

std::vector<ConsulInstance> at_port(std::uint16_t port) {
  ConsulInstance in;
  in.address = "127.0.0.1";
  in.port = port;
  return {in};
}

std::string name(std::size_t i) { return "svc-" + std::to_string(i); }

struct Row {
  std::size_t n = 0;
  std::string threads, fds, rss;
  std::size_t conns_open = 0, conns_peak = 0, refused = 0;
  double start_ms = 0, change_p50 = 0, change_p99 = 0, all_ms = 0;
};

double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  auto i = static_cast<std::size_t>(p * static_cast<double>(v.size() - 1) + 0.5);
  return v[std::min(i, v.size() - 1)];
}

// Whether every upstream u<i> in every worker's status serves `port_of(i)`.
template <class PortOf> bool all_serve(dynup_test::ModuleNginx& ngx, std::size_t n, PortOf port_of) {
  auto docs = ngx.status_by_worker();
  if (docs.size() < 2) return false;
  for (auto& [pid, doc] : docs) {
    std::size_t ok = 0;
    for (const auto& u : doc.at("upstreams")) {
      std::string uname = u.value("name", "");
      if (uname.size() < 2 || uname[0] != 'u') continue;
      std::size_t i = std::stoul(uname.substr(1));
      const auto& peers = u.at("peers");
      if (peers.size() == 1 && peers[0].value("port", 0) == port_of(i)) ++ok;
    }
    if (ok != n) return false;
  }
  return true;
}

Row measure(std::size_t n, std::size_t changes, std::size_t cap) {
  Row row;
  row.n = n;
  ConsulDouble consul;
  consul.set_max_conns_per_client(cap);
  dynup_test::ModuleNginxOptions o;
  o.backends = 3;
  o.workers = 2;
  o.extend = [&](const dynup_test::WorkerNginx& ngx, dynup_test::WorkerNginxLayout& l) {
    std::map<std::string, std::vector<ConsulInstance>> services;
    for (std::size_t i = 0; i < n; ++i) services[name(i)] = at_port(ngx.backend_port(i % 3));
    consul.set_services(services);
    l.main += "worker_rlimit_nofile 65536;\n";
    for (std::size_t i = 0; i < n; ++i)
      l.http += "  upstream u" + std::to_string(i) + " {\n    dynup " + consul.spec("/health/" + name(i)) +
                " shared.dir=" + ngx.file("shm") + ";\n  }\n";
    l.locations += "    location ~ ^/u/(\\d+)$ {\n      proxy_pass http://u$1;\n"
                   "      add_header X-Worker-Pid $pid always;\n    }\n";
  };
  auto t0 = Clock::now();
  dynup_test::ModuleNginx ngx(o);
  auto port_now = [&](std::size_t i) { return ngx.backend_port(i % 3); };
  if (!dynup_test::wait_until([&] { return all_serve(ngx, n, port_now); }, 120s))
    throw std::runtime_error("not every upstream got its peers within 120 s\n" + ngx.error_log());
  row.start_ms = ms_since(t0);

  // Steady state: every worker's threads, descriptors and memory.
  std::set<pid_t> workers;
  for (auto& [pid, doc] : ngx.status_by_worker()) workers.insert(static_cast<pid_t>(std::stol(pid)));
  for (pid_t w : workers) {
    std::string sep = row.threads.empty() ? "" : " / ";
    row.threads += sep + std::to_string(count_dir("/proc/" + std::to_string(w) + "/task"));
    row.fds += sep + std::to_string(count_dir("/proc/" + std::to_string(w) + "/fd"));
    char rss[32];
    std::snprintf(rss, sizeof rss, "%.0f", rss_mib(w));
    row.rss += sep + rss;
  }

  // One change until a request is routed by it.
  std::mt19937 rng(7);
  std::vector<double> lat;
  for (std::size_t c = 0; c < changes; ++c) {
    std::size_t k = rng() % n;
    std::size_t to = (k % 3 + 1 + c % 2) % 3;
    std::string want = std::to_string(to);
    auto t = Clock::now();
    consul.set_service(name(k), at_port(ngx.backend_port(to)));
    if (!dynup_test::wait_until(
            [&] {
              auto r = ngx.get("/u/" + std::to_string(k));
              return r.status == 200 && r.body == want;
            },
            30s))
      throw std::runtime_error("a change to " + name(k) + " was not routed within 30 s");
    lat.push_back(ms_since(t));
    consul.set_service(name(k), at_port(ngx.backend_port(k % 3))); // back
  }
  if (!dynup_test::wait_until([&] { return all_serve(ngx, n, port_now); }, 60s))
    throw std::runtime_error("the changes were not all undone within 60 s");
  row.change_p50 = percentile(lat, 0.5);
  row.change_p99 = percentile(lat, 0.99);

  // Every service changed in one transaction, until every worker applied it.
  auto port_next = [&](std::size_t i) { return ngx.backend_port((i + 1) % 3); };
  std::map<std::string, std::vector<ConsulInstance>> moved;
  for (std::size_t i = 0; i < n; ++i) moved[name(i)] = at_port(port_next(i));
  auto ta = Clock::now();
  consul.set_services(moved);
  if (!dynup_test::wait_until([&] { return all_serve(ngx, n, port_next); }, 120s))
    throw std::runtime_error("not every worker applied the change of all within 120 s");
  row.all_ms = ms_since(ta);

  auto c = consul.connections();
  row.conns_open = c.open;
  row.conns_peak = c.peak;
  row.refused = c.refused;
  ::kill(ngx.master_pid(), SIGQUIT);
  return row;
}

} // namespace

int main(int argc, char** argv) {
  std::vector<std::size_t> ns{1, 100, 1000};
  std::size_t changes = 20;
  std::string label = "dynup";
  std::size_t cap = 200;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) throw std::runtime_error(a + " needs a value");
      return argv[++i];
    };
    if (a == "--n") {
      ns.clear();
      std::stringstream ss(next());
      for (std::string part; std::getline(ss, part, ',');) ns.push_back(std::stoul(part));
    } else if (a == "--changes") {
      changes = std::stoul(next());
    } else if (a == "--module") {
      ::setenv("DYNUP_NGINX_MODULE_FILE", next().c_str(), 1); // another build's module, side by side
    } else if (a == "--cap") {
      cap = std::stoul(next()); // the double's connections per client; 0: none
    } else if (a == "--label") {
      label = next();
    } else {
      std::cerr << "usage: dynup_scale [--n 1,100,1000] [--changes 20] [--module PATH] [--label TEXT] [--cap 200]\n";
      return 2;
    }
  }
  try {
    std::printf("%s, module %s, registry cap %zu connections per client\n\n", label.c_str(),
                dynup_test::nginx_module_file().c_str(), cap);
    std::printf("| upstreams | threads per worker | fds per worker | RSS per worker (MiB) | registry connections "
                "(open / peak) | 429s | start → all have peers (ms) | one change → routed p50 / p99 (ms) | all "
                "changed → applied (ms) |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
    for (std::size_t n : ns) {
      Row r = measure(n, changes, cap);
      std::printf("| %zu | %s | %s | %s | %zu / %zu | %zu | %.0f | %.1f / %.1f | %.0f |\n", r.n, r.threads.c_str(),
                  r.fds.c_str(), r.rss.c_str(), r.conns_open, r.conns_peak, r.refused, r.start_ms, r.change_p50,
                  r.change_p99, r.all_ms);
      std::fflush(stdout);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dynup_scale: %s\n", e.what());
    return 1;
  }
  return 0;
}
