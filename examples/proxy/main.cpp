// dynup-proxy: an HTTP/1.1 reverse proxy whose peers come from dynup upstreams.
//
//   dynup-proxy --config proxy.json          serve until SIGTERM or SIGINT (then drain)
//   dynup-proxy --config proxy.json --check  check the config and exit (0: valid)
//
// Logs go to stderr, one line each, with a UTC timestamp.
#include "proxy.hpp"

#include <pthread.h>
#include <sys/resource.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <mutex>
#include <string>
#include <thread>

namespace {

constexpr const char* usage_text =
    "usage: dynup-proxy --config FILE [--check]\n"
    "\n"
    "An HTTP/1.1 reverse proxy: requests are routed by Host and path prefix to upstreams\n"
    "whose peers come from dynup sources (file://, consul://, etcd://, push://), changed\n"
    "live without a restart. The admin API (default 127.0.0.1:9901) serves\n"
    "GET /upstreams, GET /upstreams/NAME, PUT /upstreams/NAME/peers, GET /metrics, GET /healthz.\n"
    "SIGTERM or SIGINT: stop accepting, finish the requests in flight, exit 0.\n"
    "\n"
    "options:\n"
    "  --config FILE   the JSON config (examples/proxy/README.md)\n"
    "  --check         check the config (upstreams are not started) and exit\n"
    "  --version       print the dynup version\n"
    "  -h, --help      this text\n";

std::mutex log_mu;
void log_line(const std::string& line) {
  char stamp[32];
  std::time_t t = std::time(nullptr);
  std::tm tm{};
  ::gmtime_r(&t, &tm);
  std::strftime(stamp, sizeof stamp, "%Y-%m-%dT%H:%M:%SZ", &tm);
  std::lock_guard<std::mutex> lock(log_mu);
  std::fprintf(stderr, "%s dynup-proxy: %s\n", stamp, line.c_str());
  std::fflush(stderr);
}

} // namespace

int main(int argc, char** argv) {
  std::string config_path;
  bool check = false;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--config" && i + 1 < argc) {
      config_path = argv[++i];
    } else if (a == "--check") {
      check = true;
    } else if (a == "--version") {
      std::printf("dynup-proxy %s\n", dynup::version_string);
      return 0;
    } else if (a == "-h" || a == "--help") {
      std::fputs(usage_text, stdout);
      return 0;
    } else {
      std::fprintf(stderr, "dynup-proxy: unknown argument \"%s\"\n\n%s", a.c_str(), usage_text);
      return 2;
    }
  }
  if (config_path.empty()) {
    std::fprintf(stderr, "dynup-proxy: --config is required\n\n%s", usage_text);
    return 2;
  }

  auto config = dynup_proxy::load_proxy_config(config_path);
  if (!config) {
    std::fprintf(stderr, "dynup-proxy: %s\n", config.error().message().c_str());
    return 1;
  }
  if (check) {
    std::printf("dynup-proxy: %s is valid: %zu upstream(s), %zu route(s), proxy on %s, admin %s\n",
                config_path.c_str(), config->upstreams.size(), config->routes.size(), config->listen.text().c_str(),
                config->admin.enabled ? config->admin.listen.text().c_str() : "off");
    return 0;
  }

  // Signals are taken by sigwait below: block them before any thread starts, so none of
  // the server's or dynup's threads is interrupted by one.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  std::signal(SIGPIPE, SIG_IGN); // a client or peer that hung up is an error value, not a signal

  // Each client connection is a descriptor: take the hard limit, so max_connections idle
  // or slow clients do not exhaust a soft limit of 1024 and stop every accept, the admin's too.
  rlimit files{};
  if (::getrlimit(RLIMIT_NOFILE, &files) == 0 && files.rlim_cur < files.rlim_max) {
    files.rlim_cur = files.rlim_max;
    ::setrlimit(RLIMIT_NOFILE, &files);
  }
  if (::getrlimit(RLIMIT_NOFILE, &files) == 0 && files.rlim_cur != RLIM_INFINITY &&
      files.rlim_cur < config->limits.max_connections + 1024)
    log_line("warning: the open-file limit (" + std::to_string(files.rlim_cur) + ") is not above limits.max_connections (" +
             std::to_string(config->limits.max_connections) + ") + 1024 for the admin listener and the peers; raise it (ulimit -n)");

  const auto drain_timeout = config->limits.drain_timeout;
  const std::string listen_text = config->listen.text();
  const std::string admin_text = config->admin.enabled ? config->admin.listen.text() : "";
  auto proxy = dynup_proxy::Proxy::create(std::move(config).value(), log_line);
  if (!proxy) {
    log_line(proxy.error().message());
    return 1;
  }
  if (auto bound = (*proxy)->bind(); !bound) {
    log_line(bound.error().message());
    return 1;
  }
  log_line("proxy listening on port " + std::to_string((*proxy)->port()) + " (" + listen_text + ")" +
           (admin_text.empty() ? ", admin off"
                               : ", admin on port " + std::to_string((*proxy)->admin_port()) + " (" + admin_text + ")"));

  std::atomic<bool> served{false};
  std::thread server([&] {
    (*proxy)->run();
    served = true;
  });
  int sig = 0;
  sigwait(&signals, &sig);
  log_line(std::string("signal ") + (sig == SIGTERM ? "SIGTERM" : "SIGINT") + ": draining " +
           std::to_string((*proxy)->in_flight()) + " request(s) in flight");
  (*proxy)->stop();
  // Drained: nothing in flight and nothing new for 100 ms. Idle kept-alive client
  // connections are not waited for (nginx closes those too): the process ends.
  const auto deadline = std::chrono::steady_clock::now() + drain_timeout;
  bool drained = false;
  while (!(drained = (*proxy)->drained(std::chrono::milliseconds(100))) && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  (*proxy)->stop_admin();
  (*proxy)->stop_upstreams();
  if (!drained) {
    log_line("drain timed out (limits.drain_timeout_ms) with " + std::to_string((*proxy)->in_flight()) +
             " request(s) in flight; exiting without them");
    std::fflush(stderr);
    std::_Exit(1);
  }
  if (served) server.join();
  else server.detach(); // run() may still be joining the admin listener just stopped; the exit ends it
  log_line("stopped");
  std::fflush(stdout);
  std::fflush(stderr);
  std::_Exit(0); // no destructors: lingering client connections and the workers end with the process
}
