// The runtime's HTTP client against a real HTTP/2 server (nginx with TLS and http2):
// what carries every Consul query to an agent's HTTPS port over one connection.
#include <dynup/runtime/http.hpp>

#include <support/nginx.hpp>
#include <support/process.hpp>
#include <support/temp_dir.hpp>
#include <support/tls.hpp>
#include <support/wait.hpp>

#include <doctest/doctest.h>

#include <atomic>
#include <cstdlib>
#include <chrono>
#include <fstream>
#include <memory>
#include <string>

using namespace std::chrono_literals;

namespace {

// nginx, one process, serving https with http2 on `port`; "<protocol> <uri>" as the body.
std::vector<std::string> h2_nginx(const dynup_test::TempDir& dir, std::uint16_t port) {
  std::ofstream conf(dir.file("nginx.conf"));
  conf << "daemon off;\nmaster_process off;\npid " << dir.file("nginx.pid") << ";\nerror_log "
       << dir.file("error.log") << " warn;\nevents { worker_connections 256; }\nhttp {\n"
       << "  access_log off;\n  client_body_temp_path " << dir.path() << ";\n  proxy_temp_path " << dir.path()
       << ";\n  fastcgi_temp_path " << dir.path() << ";\n  uwsgi_temp_path " << dir.path()
       << ";\n  scgi_temp_path " << dir.path() << ";\n"
       << "  server {\n    listen 127.0.0.1:" << port << " ssl http2;\n"
       << "    ssl_certificate " << dir.file("cert.pem") << ";\n    ssl_certificate_key " << dir.file("key.pem")
       << ";\n    location / { add_header X-Consul-Index 7; return 200 \"$server_protocol $uri\"; }\n  }\n}\n";
  return {dynup_test::nginx_binary(), "-p", dir.path(), "-c", dir.file("nginx.conf"), "-e", dir.file("error.log")};
}

} // namespace

TEST_CASE("http client: https calls to one address share one HTTP/2 connection") {
  auto bin = dynup_test::nginx_binary();
  REQUIRE_MESSAGE(dynup_test::nginx_missing_reason(bin).empty(), dynup_test::nginx_missing_reason(bin));
  dynup_test::TempDir dir;
  dynup_test::write_self_signed(dir.file("cert.pem"), dir.file("key.pem"));
  auto port = dynup_test::free_loopback_ports(1).at(0);
  dynup_test::Process nginx(h2_nginx(dir, port));

  auto rt = dynup::rt::Runtime::acquire().value();
  auto& http = rt->service<dynup::rt::HttpClient>();
  dynup::rt::HttpClientOptions o;
  o.ca_file = dir.file("cert.pem");
  rt->loop().run_sync([&] { http.configure(o); });
  dynup::rt::HttpEndpoint to{"127.0.0.1", port, true};

  // nginx may take a moment to listen: one call until it answers.
  REQUIRE(dynup_test::wait_until(
      [&] {
        auto state = std::make_shared<std::atomic<int>>(0); // outlives a late answer
        rt->loop().run_sync([&] {
          dynup::HttpRequest req;
          req.target = "/ping";
          http.send(to, req, [state](dynup::Result<dynup::HttpResponse> r) { *state = r && r->status == 200 ? 1 : 2; });
        });
        dynup_test::wait_until([&] { return state->load() != 0; }, 5000ms);
        return state->load() == 1;
      },
      10000ms));

  // Calls that fit in nginx's 128 concurrent streams ride the probe's connection.
  auto burst = [&](int n) {
    std::atomic<int> good{0}, bad{0};
    std::string first_bad;
    rt->loop().run_sync([&] {
      for (int i = 0; i < n; ++i) {
        dynup::HttpRequest req;
        req.target = "/v1/health/service/s" + std::to_string(i);
        http.send(to, req, [&, i](dynup::Result<dynup::HttpResponse> r) {
          const std::string* index = r ? r->header("X-Consul-Index") : nullptr;
          if (r && r->status == 200 && r->body == "HTTP/2.0 /v1/health/service/s" + std::to_string(i) &&
              index != nullptr && *index == "7") {
            ++good;
          } else if (bad++ == 0) {
            first_bad = r ? std::to_string(r->status) + " " + r->body : r.error().message();
          }
        });
      }
    });
    REQUIRE(dynup_test::wait_until([&] { return good + bad == n; }, 30000ms));
    rt->loop().run_sync([&] { CHECK_MESSAGE(bad.load() == 0, first_bad); });
  };
  auto before = http.host_stats(to);
  CHECK(before.open_connections == 1);
  burst(100);
  auto after = http.host_stats(to);
  CHECK(after.connects == before.connects);
  CHECK(after.peak_connections == 1);

  // Past the server's stream limit more connections open, never past the budget.
  o.max_host_connections = 2;
  rt->loop().run_sync([&] { http.configure(o); });
  burst(400);
  CHECK(http.host_stats(to).open_connections <= 2);
  CHECK(http.host_stats(to).peak_connections <= 2);
  nginx.stop();
}
