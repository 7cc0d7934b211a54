// The native module with hundreds of upstreams in one nginx: 2 workers under
// `worker_rlimit_nofile 1024`, every upstream a consul:// source on one Consul protocol
// double capped like an agent. nginx starts, every upstream serves, a change reaches its
// upstream, the connections stay within the runtime's budget, and a graceful stop ends.
#include <support/consul_double.hpp>
#include <support/module_nginx.hpp>
#include <support/process.hpp>
#include <support/text.hpp>
#include <support/wait.hpp>

#include <doctest/doctest.h>

#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <map>
#include <string>
#include <vector>

namespace {

using dynup_test::ConsulDouble;
using dynup_test::ConsulInstance;
using dynup_test::ModuleNginx;
using dynup_test::ModuleNginxOptions;
using dynup_test::WorkerNginx;
using dynup_test::WorkerNginxLayout;
using namespace std::chrono_literals;

std::vector<ConsulInstance> at_port(std::uint16_t port) {
  ConsulInstance in;
  in.address = "127.0.0.1";
  in.port = port;
  return {in};
}

} // namespace

TEST_CASE("nginx module: 300 consul upstreams in 2 workers under worker_rlimit_nofile 1024 start, serve and stop") {
  std::string missing = dynup_test::module_nginx_missing_reason();
  REQUIRE_MESSAGE(missing.empty(), missing);
  constexpr std::size_t n = 300;
  ConsulDouble consul;
  consul.set_max_conns_per_client(200); // an agent's default limits.http_max_conns_per_client

  ModuleNginxOptions o;
  o.backends = 3;
  o.workers = 2;
  o.extend = [&](const WorkerNginx& ngx, WorkerNginxLayout& l) {
    // The services point at the backends, which only exist once the ports are chosen.
    std::map<std::string, std::vector<ConsulInstance>> services;
    for (std::size_t i = 0; i < n; ++i) services["svc-" + std::to_string(i)] = at_port(ngx.backend_port(i % 3));
    consul.set_services(services);
    l.main += "worker_rlimit_nofile 1024;\n";
    for (std::size_t i = 0; i < n; ++i)
      l.http += "  upstream u" + std::to_string(i) + " {\n    dynup " + consul.spec("/health/svc-" + std::to_string(i)) +
                " shared.dir=" + ngx.file("shm") + ";\n  }\n";
    l.locations += "    location ~ ^/u/(\\d+)$ {\n      proxy_pass http://u$1;\n"
                   "      add_header X-Worker-Pid $pid always;\n    }\n";
  };
  ModuleNginx ngx(o);

  // Every upstream serves its backend (the workers start without waiting on the registry).
  auto serves = [&](std::size_t i, const std::string& want) {
    auto r = ngx.get("/u/" + std::to_string(i));
    return r.status == 200 && r.body == want;
  };
  for (std::size_t i = 0; i < n; ++i) {
    const std::string want = std::to_string(i % 3);
    REQUIRE_MESSAGE(dynup_test::wait_until([&] { return serves(i, want); }, 20s),
                    "upstream u" << i << " never served backend " << want << "\nerror log:\n"
                                 << ngx.error_log());
  }

  // A change reaches its upstream in both workers (requests spread over them).
  consul.set_service("svc-7", at_port(ngx.backend_port(2)));
  REQUIRE(dynup_test::wait_until(
      [&] {
        for (int k = 0; k < 10; ++k)
          if (!serves(7, "2")) return false;
        return true;
      },
      20s));

  auto c = consul.connections();
  MESSAGE("registry connections: peak " << c.peak << ", accepted " << c.accepted << ", refused " << c.refused);
  CHECK(c.refused == 0);
  CHECK(c.peak <= 2 * 16); // each worker's budget, whatever the number of upstreams

  const std::string log = ngx.error_log();
  CHECK_FALSE(dynup_test::contains(log, "Too many open files"));
  CHECK_FALSE(dynup_test::contains(log, "[alert]"));
  CHECK_FALSE(dynup_test::contains(log, "[emerg]"));

  const pid_t master = ngx.master_pid();
  REQUIRE(master > 0);
  ::kill(master, SIGQUIT);
  CHECK_MESSAGE(dynup_test::wait_until([&] { return dynup_test::process_gone(master); }, 20s),
                "nginx did not stop gracefully\n" << ngx.error_log());
}
