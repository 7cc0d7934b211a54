// dynup-proxy started by a test: the ports it says it listens on, its stderr, and its
// admin API's view of an upstream. Needs DYNUP_PROXY_BIN (tests/CMakeLists.txt).
#pragma once

#include <support/process.hpp>
#include <support/text.hpp>

#include <doctest/doctest.h>
#include <httplib.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdint>
#include <string>

#ifndef DYNUP_PROXY_BIN
#error "DYNUP_PROXY_BIN must name the dynup-proxy binary (tests/CMakeLists.txt defines it)"
#endif

namespace dynup_test {

/// dynup-proxy running on a config file; stopped (SIGTERM, then SIGKILL) by its PID on
/// destruction. The stderr lines read so far are kept for assertions on the log.
class RunningProxy {
public:
  explicit RunningProxy(const std::string& config_path,
                        std::chrono::milliseconds start_timeout = std::chrono::milliseconds(10000))
      : process_({DYNUP_PROXY_BIN, "--config", config_path}) {
    const std::string listening = "proxy listening on port ", admin_on = "admin on port ";
    for (;;) {
      auto line = process_.read_line(Process::Stream::err, start_timeout);
      REQUIRE_MESSAGE(line.has_value(), "dynup-proxy did not say it was listening; its stderr:\n" << log_);
      log_ += *line + "\n";
      if (auto at = line->find(listening); at != std::string::npos) {
        port_ = std::stoi(line->substr(at + listening.size()));
        if (auto admin = line->find(admin_on); admin != std::string::npos)
          admin_port_ = std::stoi(line->substr(admin + admin_on.size()));
        break;
      }
    }
    REQUIRE(port_ > 0);
  }

  int port() const noexcept { return port_; }
  int admin_port() const noexcept { return admin_port_; } ///< -1 without an admin listener
  Process& process() noexcept { return process_; }

  /// Everything it wrote on stderr so far, waiting up to `settle` for more. Call it now
  /// and then under load: stderr is a pipe, and a chatty proxy would block on a full one.
  const std::string& log(std::chrono::milliseconds settle = std::chrono::milliseconds(200)) {
    log_ += process_.read_all(Process::Stream::err, settle);
    return log_;
  }

  /// Reads stderr lines until one contains `text`; false after `timeout`.
  bool log_shows(const std::string& text, std::chrono::milliseconds timeout = std::chrono::milliseconds(5000)) {
    if (contains(log_, text)) return true;
    const auto until = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < until) {
      auto line = process_.read_line(Process::Stream::err, std::chrono::duration_cast<std::chrono::milliseconds>(
                                                               until - std::chrono::steady_clock::now()));
      if (!line) return false;
      log_ += *line + "\n";
      if (contains(*line, text)) return true;
    }
    return false;
  }

  /// GET /upstreams/<name> on the admin listener: the document, or a discarded value
  /// when there was no 200 with a JSON object (`why` says what came instead).
  nlohmann::json try_status(const std::string& upstream, std::string* why = nullptr) {
    httplib::Client cli("127.0.0.1", admin_port_);
    cli.set_keep_alive(false);
    cli.set_connection_timeout(2, 0);
    cli.set_read_timeout(10, 0);
    auto res = cli.Get(("/upstreams/" + upstream).c_str());
    if (!res || res->status != 200) {
      if (why) *why = res ? std::to_string(res->status) + " " + res->body : "no reply: " + httplib::to_string(res.error());
      return nlohmann::json(nlohmann::json::value_t::discarded);
    }
    auto doc = nlohmann::json::parse(res->body, nullptr, false);
    if (!doc.is_object()) {
      if (why) *why = "not a JSON object: " + res->body;
      return nlohmann::json(nlohmann::json::value_t::discarded);
    }
    return doc;
  }

  /// The same, required to succeed.
  nlohmann::json status(const std::string& upstream) {
    std::string why;
    auto doc = try_status(upstream, &why);
    REQUIRE_MESSAGE(doc.is_object(), "GET /upstreams/" << upstream << ": " << why);
    return doc;
  }
  std::uint64_t version(const std::string& upstream) { return status(upstream)["version"].get<std::uint64_t>(); }

private:
  Process process_;
  int port_ = -1;
  int admin_port_ = -1;
  std::string log_;
};

} // namespace dynup_test
