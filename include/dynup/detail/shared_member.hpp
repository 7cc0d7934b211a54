// SharedMember: one process's part in an upstream shared by the processes of a host (nginx
// workers). Exactly one process leads: it holds the LeaderLock, watches the source, runs
// the active checks and writes each routing-relevant set into the SharedRegion. The
// others follow: they notice a new region version (one atomic load per pick, and a poll
// when there are no picks), read it and publish it locally. A follower tries to lead
// every retry period, so when the leader dies (its lock goes with it) another takes over.
#pragma once

#include <dynup/detail/fs.hpp>
#include <dynup/leader_lock.hpp>
#include <dynup/peer_set.hpp>
#include <dynup/result.hpp>
#include <dynup/shared_snapshot.hpp>
#include <dynup/upstream_config.hpp>
#include <dynup/version.hpp>

#include <nlohmann/json.hpp>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <utility>

DYNUP_NAMESPACE_BEGIN
namespace detail {

class SharedMember {
public:
  struct Hooks {
    /// Called on the member's thread when this process has just taken the lock: start
    /// watching and probing. false: it could not (the error is reported); the lock is
    /// released and taken again on a later period.
    std::function<bool()> lead;
    /// A follower read a new set from the region: publish it locally.
    std::function<void(PeerSet)> adopt;
    /// Errors that no call returns (a region read or write failing), on the thread that
    /// met them.
    std::function<void(const Error&)> on_error;
    /// Leader: its watcher's status (WatcherStatus::to_json), which the member writes
    /// beside its pid every poll period when it changed, so that followers can say how
    /// fresh the set they serve is.
    std::function<nlohmann::json()> leader_state;
  };

  /// Opens the region and the lock file. Errors name the "shared" field at fault.
  static Result<std::unique_ptr<SharedMember>> open(const SharedConfig& config, Hooks hooks) {
    // The last process to close the region removes it with the lock and leader files:
    // each process opens the lock after the region and closes it before, so no process
    // holds the lock file while the region's last user removes it.
    SharedRegionOptions ro;
    ro.dir = config.dir;
    ro.name = config.name;
    ro.capacity = config.capacity;
    ro.remove_when_unused = true;
    ro.companions = {config.dir + "/" + config.name + ".lock", config.dir + "/" + config.name + ".leader"};
    auto region = SharedRegion::open(ro);
    if (!region) return region.error().with_context("upstream.shared");
    auto lock = LeaderLock::open(config.dir, config.name);
    if (!lock) return lock.error().with_context("upstream.shared");
    return std::unique_ptr<SharedMember>(
        new SharedMember(config, std::move(region).value(), std::move(lock).value(), std::move(hooks)));
  }

  ~SharedMember() { stop(); }
  SharedMember(const SharedMember&) = delete;
  SharedMember& operator=(const SharedMember&) = delete;

  /// Leads if nobody does; otherwise adopts the region's set, waiting up to first_wait
  /// for a leader to write one. Then starts the member's thread. Call once.
  void start() {
    if (!try_lead()) {
      const auto until = std::chrono::steady_clock::now() + config_.first_wait;
      while (!adopt_if_new() && std::chrono::steady_clock::now() < until) {
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
        if (try_lead()) break;
      }
    }
    thread_ = std::thread([this] { run(); });
  }

  /// For every pick: one acquire load of the region version; a follower whose set is
  /// older wakes its thread (once per version). Lock-free, no allocation.
  void notice() noexcept {
    if (region_.version() == applied_.load(std::memory_order_relaxed)) return;
    if (poked_.load(std::memory_order_relaxed) || poked_.exchange(true, std::memory_order_relaxed)) return;
    cv_.notify_one(); // no lock: a missed wake-up costs at most one poll period
  }

  /// Leader: writes `set` into the region unless it is what the region holds. Called by
  /// one thread at a time (the Upstream's rebuild). A set too large is reported and left
  /// out; followers keep the previous one.
  void publish(const PeerSet& set) {
    if (!leader_.load(std::memory_order_acquire)) return;
    if (written_ && written_->same_content(set) && written_->source_index() == set.source_index()) return;
    auto v = region_.write(set);
    if (!v) {
      report(v.error().with_context("shared region"));
      return;
    }
    written_ = std::make_shared<const PeerSet>(set);
    applied_.store(*v, std::memory_order_relaxed);
    std::lock_guard<std::mutex> lock(mu_);
    last_error_.clear();
  }

  bool leader() const noexcept { return leader_.load(std::memory_order_acquire); }

  /// The "shared" part of the status: role, region version, leader pid, the leader's
  /// watcher (as the leader last wrote it; null when no leader lives), last error.
  nlohmann::ordered_json status() const {
    nlohmann::ordered_json j;
    j["role"] = leader() ? "leader" : "follower";
    j["region"] = config_.dir + "/" + config_.name + ".dynup";
    j["region_version"] = region_.version();
    j["applied_version"] = applied_.load(std::memory_order_relaxed);
    nlohmann::json state;
    auto pid = read_leader_file(&state);
    j["leader_pid"] = pid ? nlohmann::ordered_json(*pid) : nlohmann::ordered_json(nullptr);
    j["leader_watcher"] = pid && state.is_object() ? nlohmann::ordered_json(state) : nlohmann::ordered_json(nullptr);
    std::lock_guard<std::mutex> lock(mu_);
    j["last_error"] = last_error_;
    return j;
  }

  /// Stops the thread and gives up the lead (another process takes it on its next try).
  /// Idempotent.
  void stop() noexcept {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
    leader_.store(false, std::memory_order_release);
    lock_.release();
  }

private:
  SharedMember(const SharedConfig& config, SharedRegion region, LeaderLock lock, Hooks hooks)
      : config_(config), region_(std::move(region)), lock_(std::move(lock)), hooks_(std::move(hooks)) {}

  std::string pid_path() const { return config_.dir + "/" + config_.name + ".leader"; }

  // The leader file: the pid on its first line, the leader's watcher status (JSON) on
  // the second. Returns the pid, as the last leader wrote it, if that process still
  // lives, and its status into `state` (left alone when the line is missing or bad).
  std::optional<long> read_leader_file(nlohmann::json* state) const {
    std::ifstream in(pid_path());
    long pid = 0;
    if (!(in >> pid) || pid <= 0) return std::nullopt;
    if (::kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH) return std::nullopt;
    std::string line;
    if (state && std::getline(in, line) && std::getline(in, line)) {
      auto parsed = nlohmann::json::parse(line, nullptr, false);
      if (!parsed.is_discarded()) *state = std::move(parsed);
    }
    return pid;
  }

  // Mode 0600, never through a link (detail::write_file_atomic); a failure is reported.
  void write_leader_file(const nlohmann::json& state) {
    std::string text = std::to_string(::getpid()) + "\n" +
                       state.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
    if (auto ok = write_file_atomic(pid_path(), text, false); !ok) report(ok.error().with_context("leader file"));
  }

  // Leader: writes the leader file when the watcher's status changed since the last write.
  void share_state() {
    nlohmann::json state = hooks_.leader_state ? hooks_.leader_state() : nlohmann::json(nullptr);
    if (written_state_ && *written_state_ == state) return;
    write_leader_file(state);
    written_state_ = std::move(state);
  }

  bool try_lead() {
    if (leader_.load(std::memory_order_relaxed)) return true;
    if (!lock_.try_acquire()) return false;
    leader_.store(true, std::memory_order_release);
    written_state_.reset();
    share_state();
    written_.reset();
    if (hooks_.lead && !hooks_.lead()) {
      leader_.store(false, std::memory_order_release);
      lock_.release();
      return false;
    }
    return true;
  }

  // Follower: reads and adopts the region's set when its version is new; true when the
  // set served is the region's.
  bool adopt_if_new() {
    const std::uint64_t v = region_.version();
    if (v == 0) return false;
    if (v == applied_.load(std::memory_order_relaxed)) return true;
    auto read = region_.read();
    if (!read) {
      report(read.error().with_context("shared region"));
      return false;
    }
    applied_.store(read->version, std::memory_order_relaxed);
    if (hooks_.adopt) hooks_.adopt(std::move(read->set));
    return true;
  }

  void report(const Error& e) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      last_error_ = e.message();
    }
    if (hooks_.on_error) hooks_.on_error(e);
  }

  void run() {
    using clock = std::chrono::steady_clock;
    auto next_try = clock::now() + config_.retry;
    std::unique_lock<std::mutex> lock(mu_);
    while (!stopping_) {
      if (leader_.load(std::memory_order_relaxed)) {
        // The watcher and the rebuild do the work; this thread keeps the leader file's
        // watcher status current for the followers' status().
        if (cv_.wait_for(lock, config_.poll, [&] { return stopping_; })) break;
        lock.unlock();
        share_state();
        lock.lock();
        continue;
      }
      auto wake = std::min(clock::now() + config_.poll, next_try);
      cv_.wait_until(lock, wake, [&] { return stopping_ || poked_.load(std::memory_order_relaxed); });
      if (stopping_) break;
      poked_.store(false, std::memory_order_relaxed);
      lock.unlock();
      adopt_if_new();
      if (clock::now() >= next_try) {
        next_try = clock::now() + config_.retry;
        try_lead();
      }
      lock.lock();
    }
  }

  const SharedConfig config_;
  SharedRegion region_;
  LeaderLock lock_;
  Hooks hooks_;
  std::atomic<bool> leader_{false};
  std::atomic<std::uint64_t> applied_{0}; ///< region version of the set served
  std::atomic<bool> poked_{false};
  std::shared_ptr<const PeerSet> written_; ///< the leader's last write (rebuild thread)
  std::optional<nlohmann::json> written_state_; ///< the leader file's status (the thread that leads)

  mutable std::mutex mu_; // guards the fields below and the thread's waits
  std::condition_variable cv_;
  bool stopping_ = false;
  std::string last_error_;
  std::thread thread_;
};

} // namespace detail
DYNUP_NAMESPACE_END
