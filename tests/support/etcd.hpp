// A real etcd for end-to-end tests: one member on free loopback ports with a private
// data directory, driven through its v3 JSON gateway. It can be stopped (SIGTERM, then
// SIGKILL) and started again on the same ports and data, as an operator restarts it.
#pragma once

#include <support/nginx.hpp> // free_loopback_ports
#include <support/process.hpp>
#include <support/temp_dir.hpp>

#include <dynup/source/etcd.hpp>

#include <httplib.h>
#include <nlohmann/json.hpp>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <stdexcept>
#include <algorithm>
#include <string>
#include <utility>
#include <system_error>
#include <thread>
#include <vector>

#ifndef DYNUP_ETCD_BIN
#define DYNUP_ETCD_BIN "/usr/bin/etcd"
#endif

namespace dynup_test {

/// The etcd binary: $DYNUP_ETCD if set, else what CMake found (DYNUP_ETCD_BIN).
inline std::string etcd_binary() {
  const char* env = std::getenv("DYNUP_ETCD");
  return env && *env ? env : DYNUP_ETCD_BIN;
}

/// Empty when `bin` can be run, else why not and what to do about it.
inline std::string etcd_missing_reason(const std::string& bin) {
  if (::access(bin.c_str(), X_OK) == 0) return {};
  return "etcd is required for the etcd end-to-end tests but \"" + bin +
         "\" is not an executable (install the etcd-server package with scripts/install-deps.sh, "
         "or point $DYNUP_ETCD at an etcd 3.4+ binary)";
}

struct EtcdOptions {
  /// --experimental-watch-progress-notify-interval; 0 keeps etcd's default (10 minutes).
  std::chrono::milliseconds progress_notify_interval{0};
};

/// A running single-member etcd. The constructor starts it and waits until /health says
/// so (throws std::runtime_error with the log's tail if it cannot); the destructor stops
/// it by PID. Not thread-safe: one test thread drives it.
class Etcd {
public:
  explicit Etcd(EtcdOptions options = {}) : options_(options) {
    std::string missing = etcd_missing_reason(etcd_binary());
    if (!missing.empty()) throw std::runtime_error(missing);
    std::string failures;
    // A port taken between free_loopback_ports and etcd's bind() makes etcd exit with
    // "address already in use": pick new ports and start again.
    for (int attempt = 1; attempt <= 5; ++attempt) {
      auto ports = free_loopback_ports(2);
      client_port_ = ports[0];
      peer_port_ = ports[1];
      std::error_code ec;
      std::filesystem::remove_all(dir_.file("data"), ec); // it would remember the old peer URL
      std::string why = launch();
      if (why.empty()) return;
      failures += "attempt " + std::to_string(attempt) + ": " + why + "\n";
      if (why.find("address already in use") == std::string::npos) break;
    }
    throw std::runtime_error("etcd did not start\n" + failures);
  }

  ~Etcd() { stop(); }
  Etcd(const Etcd&) = delete;
  Etcd& operator=(const Etcd&) = delete;

  std::uint16_t client_port() const noexcept { return client_port_; }
  /// "etcd://127.0.0.1:<client port>" + path_and_query.
  std::string spec(const std::string& path_and_query) const {
    return "etcd://127.0.0.1:" + std::to_string(client_port_) + path_and_query;
  }
  bool running() const noexcept { return process_ != nullptr; }
  std::string log() const { return exists(log_path()) ? read_all(log_path()) : ""; }

  /// SIGTERM, SIGKILL after two seconds; the data directory stays. Idempotent.
  void stop() {
    if (!process_) return;
    process_->stop(std::chrono::milliseconds(2000));
    process_.reset();
  }

  /// Starts again on the same ports with the same data (the keys and revisions survive).
  void restart() {
    stop();
    std::string why;
    // The old listening sockets may take a moment to be released.
    for (int attempt = 1; attempt <= 20; ++attempt) {
      why = launch();
      if (why.empty()) return;
      if (why.find("address already in use") == std::string::npos) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    throw std::runtime_error("etcd did not restart: " + why);
  }

  /// Puts `value` at `key`; returns the revision of the put.
  std::int64_t put(const std::string& key, const std::string& value) {
    auto doc = call("/v3/kv/put", {{"key", b64(key)}, {"value", b64(value)}});
    return revision_of(doc);
  }

  /// Puts every pair, 100 to a transaction (etcd's --max-txn-ops is 128 by default);
  /// returns the revision of the last transaction.
  std::int64_t put_many(const std::vector<std::pair<std::string, std::string>>& pairs) {
    std::int64_t rev = 0;
    for (std::size_t at = 0; at < pairs.size(); at += 100) {
      nlohmann::json ops = nlohmann::json::array();
      for (std::size_t i = at; i < std::min(pairs.size(), at + 100); ++i)
        ops.push_back({{"request_put", {{"key", b64(pairs[i].first)}, {"value", b64(pairs[i].second)}}}});
      rev = revision_of(call("/v3/kv/txn", {{"success", ops}}));
    }
    return rev;
  }

  /// Deletes `key`; returns the store revision after the delete.
  std::int64_t del(const std::string& key) { return revision_of(call("/v3/kv/deleterange", {{"key", b64(key)}})); }

  /// Compacts the history up to `revision` (physically, so it is gone when this returns).
  void compact(std::int64_t revision) {
    call("/v3/kv/compaction", {{"revision", std::to_string(revision)}, {"physical", true}});
  }

  /// The current store revision.
  std::int64_t revision() { return revision_of(call("/v3/kv/range", {{"key", b64("\x01")}, {"count_only", true}})); }

private:
  std::string log_path() const { return dir_.file("etcd.log"); }
  static std::string b64(const std::string& s) { return dynup::detail::base64_encode(s); }

  static std::int64_t revision_of(const nlohmann::json& doc) {
    std::int64_t rev = 0;
    if (!dynup::detail::etcd_int64(doc.at("header").at("revision"), rev))
      throw std::runtime_error("etcd reply without a revision: " + doc.dump());
    return rev;
  }

  nlohmann::json call(const std::string& path, const nlohmann::json& body) {
    httplib::Client cli("127.0.0.1", client_port_);
    cli.set_connection_timeout(std::chrono::seconds(2));
    cli.set_read_timeout(std::chrono::seconds(10));
    auto res = cli.Post(path.c_str(), body.dump(), "application/json");
    if (!res)
      throw std::runtime_error("etcd " + path + ": " + httplib::to_string(res.error()) +
                               (running() ? "" : " (etcd is stopped)"));
    if (res->status != 200)
      throw std::runtime_error("etcd " + path + ": HTTP " + std::to_string(res->status) + ": " + res->body);
    auto doc = nlohmann::json::parse(res->body, nullptr, false);
    if (!doc.is_object()) throw std::runtime_error("etcd " + path + ": not JSON: " + res->body);
    return doc;
  }

  // Starts etcd and waits for /health; returns why it failed (the process is stopped).
  std::string launch() {
    std::string client = "http://127.0.0.1:" + std::to_string(client_port_);
    std::string peer = "http://127.0.0.1:" + std::to_string(peer_port_);
    std::vector<std::string> argv{etcd_binary(),
                                  "--name", "dynup-test",
                                  "--data-dir", dir_.file("data"),
                                  "--listen-client-urls", client,
                                  "--advertise-client-urls", client,
                                  "--listen-peer-urls", peer,
                                  "--initial-advertise-peer-urls", peer,
                                  "--initial-cluster", "dynup-test=" + peer,
                                  "--logger", "zap",
                                  "--log-outputs", log_path(),
                                  // One member elects itself; short ticks make that (and
                                  // so the start) take milliseconds instead of a second.
                                  "--heartbeat-interval", "10",
                                  "--election-timeout", "100"};
    if (options_.progress_notify_interval.count() > 0) {
      argv.push_back("--experimental-watch-progress-notify-interval");
      argv.push_back(std::to_string(options_.progress_notify_interval.count()) + "ms");
    }
    process_ = std::make_unique<Process>(argv);
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (std::chrono::steady_clock::now() < deadline) {
      if (auto st = process_->wait_exit(std::chrono::milliseconds(0))) {
        process_.reset();
        std::string out = log();
        return "etcd exited (code " + std::to_string(st->code) + "); log tail:\n" + tail(out);
      }
      httplib::Client cli("127.0.0.1", client_port_);
      cli.set_connection_timeout(std::chrono::milliseconds(200));
      cli.set_read_timeout(std::chrono::seconds(2));
      if (auto res = cli.Get("/health"); res && res->status == 200 && res->body.find("\"true\"") != std::string::npos)
        return {};
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    stop();
    return "etcd did not report healthy within 20 s; log tail:\n" + tail(log());
  }

  static std::string tail(const std::string& s) { return s.size() > 3000 ? s.substr(s.size() - 3000) : s; }

  EtcdOptions options_;
  TempDir dir_;
  std::uint16_t client_port_ = 0;
  std::uint16_t peer_port_ = 0;
  std::unique_ptr<Process> process_;
};

} // namespace dynup_test
