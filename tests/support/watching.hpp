// What the watcher tests share: a recorder for a watcher's callbacks and the ports a
// publisher currently holds.
#pragma once

#include <dynup/publisher.hpp>
#include <dynup/result.hpp>
#include <dynup/watch/core.hpp>
#include <dynup/watch/status.hpp>

#include <support/text.hpp>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <vector>

namespace dynup_test {

using Ports = std::vector<std::uint16_t>;

/// The ports of the publisher's current set, sorted.
inline Ports ports_of(const dynup::Publisher& pub) {
  Ports out;
  // Held here: in `for (… : *pub.current())` the temporary would die before the loop.
  dynup::Snapshot set = pub.current();
  for (const auto& p : *set) out.push_back(p.port);
  std::sort(out.begin(), out.end());
  return out;
}

/// Records what a watcher publishes and reports, from its thread; read from the test's.
/// With status_of() set, each failure (not a refusal) also records the watcher's status
/// as it was when the error was reported.
class Recorder {
public:
  dynup::PublishCallback on_publish() {
    return [this](const dynup::Snapshot& s) {
      std::lock_guard<std::mutex> lock(mu_);
      published_.push_back(s);
    };
  }
  dynup::ErrorCallback on_error() {
    return [this](const dynup::Error& e) {
      std::lock_guard<std::mutex> lock(mu_);
      errors_.push_back(e.message());
      if (status_of_ && e.code() != dynup::Errc::rejected) statuses_.push_back(status_of_());
    };
  }
  /// Set before the watcher can report (or under no concurrent report).
  void status_of(std::function<dynup::WatcherStatus()> f) {
    std::lock_guard<std::mutex> lock(mu_);
    status_of_ = std::move(f);
  }
  std::vector<dynup::Snapshot> published() const {
    std::lock_guard<std::mutex> lock(mu_);
    return published_;
  }
  std::vector<std::string> errors() const {
    std::lock_guard<std::mutex> lock(mu_);
    return errors_;
  }
  std::vector<dynup::WatcherStatus> failure_statuses() const {
    std::lock_guard<std::mutex> lock(mu_);
    return statuses_;
  }

private:
  mutable std::mutex mu_;
  std::vector<dynup::Snapshot> published_;
  std::vector<std::string> errors_;
  std::vector<dynup::WatcherStatus> statuses_;
  std::function<dynup::WatcherStatus()> status_of_;
};

} // namespace dynup_test
