// dynup-demo: the two small programs the demo (scripts/demo.sh) runs around dynup-proxy.
//
//   dynup-demo backend --port 9001 --name backend-1
//       an HTTP backend answering every request with its name (body and X-Backend header);
//       --port 0 takes a free port. Prints "listening on port N" once it accepts connections
//   dynup-demo hit http://127.0.0.1:8080/ 300 [--only backend-1,backend-2]
//       sends that many requests over one kept-alive connection and draws who answered;
//       --only: exit 1 if anyone else answered or a request failed
#include <httplib.h>

#include <pthread.h>

#include <algorithm>
#include <chrono>
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <set>
#include <string>
#include <thread>

namespace {

constexpr const char* usage_text =
    "usage: dynup-demo backend --port PORT (0: any free one) --name NAME [--host 127.0.0.1]\n"
    "       dynup-demo hit URL COUNT [--only NAME,NAME...]\n";

int backend(int argc, char** argv) {
  std::string host = "127.0.0.1", name;
  int port = 0;
  for (int i = 2; i + 1 < argc; i += 2) {
    std::string a = argv[i];
    if (a == "--port") port = std::atoi(argv[i + 1]);
    else if (a == "--name") name = argv[i + 1];
    else if (a == "--host") host = argv[i + 1];
    else {
      std::fputs(usage_text, stderr);
      return 2;
    }
  }
  if (port < 0 || port > 65535 || name.empty()) {
    std::fputs(usage_text, stderr);
    return 2;
  }
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  httplib::Server server;
  auto answer = [name](const httplib::Request&, httplib::Response& res) {
    res.set_header("X-Backend", name);
    res.set_content(name + "\n", "text/plain");
  };
  server.set_tcp_nodelay(true);
  server.set_keep_alive_max_count(100000);
  server.Get(".*", answer);
  server.Post(".*", answer);
  errno = 0;
  const int bound = port == 0 ? server.bind_to_any_port(host) : (server.bind_to_port(host, port) ? port : -1);
  if (bound <= 0) {
    const int e = errno;
    std::fprintf(stderr, "dynup-demo backend %s: cannot listen on %s:%d%s%s\n", name.c_str(), host.c_str(), port,
                 e != 0 ? ": " : "", e != 0 ? std::strerror(e) : "");
    return 1;
  }
  std::printf("listening on port %d\n", bound); // the port a script asked 0 for
  std::fflush(stdout);
  std::thread t([&] { server.listen_after_bind(); });
  int sig = 0;
  sigwait(&signals, &sig);
  server.stop();
  t.join();
  return 0;
}

int hit(int argc, char** argv) {
  if (argc < 4) {
    std::fputs(usage_text, stderr);
    return 2;
  }
  std::string url = argv[2];
  const int count = std::atoi(argv[3]);
  std::set<std::string> only;
  for (int i = 4; i + 1 < argc; i += 2) {
    if (std::string(argv[i]) != "--only") {
      std::fputs(usage_text, stderr);
      return 2;
    }
    std::string list = argv[i + 1];
    for (std::size_t start = 0; start <= list.size();) {
      std::size_t comma = list.find(',', start);
      if (comma == std::string::npos) comma = list.size();
      if (comma > start) only.insert(list.substr(start, comma - start));
      start = comma + 1;
    }
  }
  const std::string prefix = "http://";
  if (url.compare(0, prefix.size(), prefix) != 0 || count <= 0 || count > 1000000) {
    std::fputs(usage_text, stderr);
    return 2;
  }
  std::string rest = url.substr(prefix.size());
  std::string origin = rest.substr(0, rest.find('/'));
  std::string path = rest.find('/') == std::string::npos ? "/" : rest.substr(rest.find('/'));

  httplib::Client client("http://" + origin);
  client.set_keep_alive(true);
  client.set_tcp_nodelay(true);
  client.set_connection_timeout(2, 0);
  client.set_read_timeout(5, 0);
  std::map<std::string, int> by_backend;
  std::map<std::string, int> failures;
  const auto started = std::chrono::steady_clock::now();
  for (int i = 0; i < count; ++i) {
    auto res = client.Get(path.c_str());
    if (!res) {
      ++failures[httplib::to_string(res.error())];
    } else if (res->status != 200) {
      ++failures["HTTP " + std::to_string(res->status)];
    } else {
      ++by_backend[res->get_header_value("X-Backend")];
    }
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  int failed = 0;
  for (const auto& [why, n] : failures) failed += n;
  std::printf("   %d requests in %.2f s, %d failed\n", count, secs, failed);
  std::size_t width = 8;
  for (const auto& [name, n] : by_backend) width = std::max(width, name.size());
  constexpr int bar = 40;
  for (const auto& [name, n] : by_backend) {
    const int filled = static_cast<int>(0.5 + static_cast<double>(bar) * n / count);
    std::string drawn;
    for (int i = 0; i < bar; ++i) drawn += i < filled ? "\u2588" : "\u00b7";
    std::printf("   %-*s %s %5d  %5.1f%%\n", static_cast<int>(width), name.c_str(), drawn.c_str(), n,
                100.0 * n / count);
  }
  for (const auto& [why, n] : failures) std::printf("   failed: %s x%d\n", why.c_str(), n);
  if (only.empty()) return 0;
  bool ok = failed == 0;
  for (const auto& [name, n] : by_backend)
    if (!only.count(name)) {
      std::printf("   unexpected: %s answered %d\n", name.c_str(), n);
      ok = false;
    }
  return ok ? 0 : 1;
}

} // namespace

int main(int argc, char** argv) {
  std::signal(SIGPIPE, SIG_IGN);
  std::string cmd = argc > 1 ? argv[1] : "";
  if (cmd == "backend") return backend(argc, argv);
  if (cmd == "hit") return hit(argc, argv);
  std::fputs(usage_text, cmd == "-h" || cmd == "--help" ? stdout : stderr);
  return cmd == "-h" || cmd == "--help" ? 0 : 2;
}
