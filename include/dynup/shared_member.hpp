// SharedMember: one process's part in an upstream shared by the processes of a host (nginx
// workers). Exactly one process leads: it holds the LeaderLock, watches the source, runs
// the active checks and writes each routing-relevant set into the SharedRegion. The
// others follow: they notice a new region version (one atomic load per pick, and a poll
// when there are no picks), read it and publish it locally. A follower tries to lead
// every retry period, so when the leader dies (its lock goes with it) another takes over.
// All of it runs on the process runtime's loop (and a late lead on its worker): a member
// costs timers, not a thread.
#pragma once

#include <dynup/detail/fs.hpp>
#include <dynup/detail/task_gate.hpp>
#include <dynup/leader_lock.hpp>
#include <dynup/peer_set.hpp>
#include <dynup/result.hpp>
#include <dynup/runtime/runtime.hpp>
#include <dynup/shared_snapshot.hpp>
#include <dynup/version.hpp>

#include <nlohmann/json.hpp>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
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

/// One process's membership in a shared upstream.
///
/// Threads: no thread of its own. Its periodic work (a follower's poll of the region and
/// its lead attempts, a leader's leader-file refresh) runs as rt::Loop timers, and a
/// lead taken late (a follower taking over) starts its watcher on the runtime's worker.
/// notice() from any thread; publish() from one thread at a time (the Upstream's
/// rebuilds); status() from any thread; start() and stop() from the owner.
class SharedMember {
public:
  struct Hooks {
    /// Called when this process has just taken the lock: start watching and probing.
    /// On start()'s caller, or on the runtime's worker when the lock is taken later (it
    /// may wait for a first fetch, which the loop must never do). false: it could not
    /// (the error is reported); the lock is released and taken again on a later period.
    std::function<bool()> lead;
    /// A follower read a new set from the region: publish it locally. On start()'s
    /// caller or the runtime's loop; must not block.
    std::function<void(PeerSet)> adopt;
    /// Errors that no call returns (a region read or write failing), on the thread that
    /// met them (the loop, the worker, or a rebuild's).
    std::function<void(const Error&)> on_error;
    /// Leader: its watcher's status (WatcherStatus::to_json), which the member writes
    /// beside its pid every poll period when it changed, so that followers can say how
    /// fresh the set they serve is. On the loop (or start()'s caller); must not block.
    std::function<nlohmann::json()> leader_state;
  };

  /// Opens the region and the lock file; the member's timers run on `runtime`'s loop.
  /// Errors name the "shared" field at fault.
  static Result<std::unique_ptr<SharedMember>> open(const SharedConfig& config, Hooks hooks,
                                                    std::shared_ptr<rt::Runtime> runtime) {
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
    return std::unique_ptr<SharedMember>(new SharedMember(config, std::move(region).value(), std::move(lock).value(),
                                                          std::move(hooks), std::move(runtime)));
  }

  ~SharedMember() { stop(); }
  SharedMember(const SharedMember&) = delete;
  SharedMember& operator=(const SharedMember&) = delete;

  /// Leads if nobody does; otherwise adopts the region's set, waiting up to first_wait
  /// for a leader to write one (on the caller's thread, which runs the hooks meanwhile).
  /// Then arms the member's timer on the loop. Call once.
  void start() {
    if (!try_lead()) {
      const auto until = std::chrono::steady_clock::now() + config_.first_wait;
      while (!adopt_if_new() && std::chrono::steady_clock::now() < until) {
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
        if (try_lead()) break;
      }
    }
    std::lock_guard<std::mutex> lock(mu_);
    next_try_ = std::chrono::steady_clock::now() + config_.retry;
    arm_locked();
  }

  /// For every pick: one acquire load of the region version. A follower whose set is
  /// older posts one task to the loop to read it, once per version (the pick that flips
  /// the flag takes the loop's queue mutex and allocates the task; every other pick is
  /// lock-free and allocation-free). noexcept: without memory the poll catches up.
  void notice() noexcept {
    if (region_.version() == applied_.load(std::memory_order_relaxed)) return;
    if (poked_.load(std::memory_order_relaxed) || poked_.exchange(true, std::memory_order_relaxed)) return;
    try {
      rt_->loop().post([gate = gate_, this] {
        gate->enter([this] {
          poked_.store(false, std::memory_order_relaxed);
          adopt_if_new();
        });
      });
    } catch (...) {
      // The flag stays up until the next poll clears it: no post per pick meanwhile.
    }
  }

  /// Leader: writes `set` into the region unless it is what the region holds. Called by
  /// one thread at a time (the Upstream's rebuilds). A set too large is reported and left
  /// out; followers keep the previous one.
  void publish(const PeerSet& set) {
    if (!leader_.load(std::memory_order_acquire)) return;
    std::lock_guard<std::mutex> written_lock(written_mu_);
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

  /// Ends the member's timer and tasks and gives up the lead (another process takes it
  /// on its next try). Once it returns no timer or task of the member runs any more; it
  /// waits for one under way (a late lead's watcher start included), but not for the
  /// one it is called from. Idempotent.
  void stop() noexcept {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
      if (timer_ != 0) rt_->loop().cancel(timer_);
      timer_ = 0;
    }
    gate_->close();
    leader_.store(false, std::memory_order_release);
    lock_.release();
  }

private:
  using steady = std::chrono::steady_clock;

  SharedMember(const SharedConfig& config, SharedRegion region, LeaderLock lock, Hooks hooks,
               std::shared_ptr<rt::Runtime> runtime)
      : rt_(std::move(runtime)), config_(config), region_(std::move(region)), lock_(std::move(lock)),
        hooks_(std::move(hooks)) {}

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
  // Not durable (no fsync): a small write to the region's directory, fine on the loop.
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

  // Takes the lock if free and says so in the leader file; true when this process now
  // leads (or led already). The caller then starts leading (hooks_.lead). On start()'s
  // caller before the timer exists, then on the loop only.
  bool take_lock() {
    if (leader_.load(std::memory_order_relaxed)) return true;
    if (!lock_.try_acquire()) return false;
    {
      std::lock_guard<std::mutex> written_lock(written_mu_);
      written_.reset();
    }
    // The leader file first: once role() says "leader", status() names this process.
    written_state_.reset();
    share_state();
    leader_.store(true, std::memory_order_release);
    return true;
  }

  // Gives the lead up after hooks_.lead failed: another process may take it.
  void resign() {
    leader_.store(false, std::memory_order_release);
    lock_.release();
  }

  // start()'s attempt: leads on the calling thread.
  bool try_lead() {
    if (leader_.load(std::memory_order_relaxed)) return true;
    if (!take_lock()) return false;
    if (hooks_.lead && !hooks_.lead()) {
      resign();
      return false;
    }
    return true;
  }

  // The timer's attempt (on the loop): the lock is taken here, the lead hook runs on the
  // worker (it starts a watcher, which may wait on a first fetch the loop must drive),
  // and a failure comes back to the loop, which alone touches the lock from now on.
  void try_lead_later() {
    if (leader_.load(std::memory_order_relaxed) || !take_lock() || !hooks_.lead) return;
    rt_->worker().post([gate = gate_, this] {
      gate->enter([this] {
        if (hooks_.lead()) return;
        rt_->loop().post([gate = gate_, this] { gate->enter([this] { resign(); }); });
      });
    });
  }

  // Follower: reads and adopts the region's set when its version is new; true when the
  // set served is the region's. start()'s caller, then the loop only.
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

  // Arms the next tick: every poll period, and a follower's next lead attempt. Under mu_.
  void arm_locked() noexcept {
    if (stopping_) return;
    auto when = steady::now() + config_.poll;
    if (!leader_.load(std::memory_order_relaxed)) when = std::min(when, next_try_);
    try {
      timer_ = rt_->loop().at(when, [gate = gate_, this] { gate->enter([this] { tick(); }); });
    } catch (...) {
      timer_ = 0; // without memory for a timer, picks (notice) still bring new sets
    }
  }

  // The loop's periodic work. A leader keeps the leader file's watcher status current for
  // the followers' status(); a follower adopts a new region version and tries to lead.
  void tick() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      timer_ = 0;
      if (stopping_) return;
    }
    if (leader_.load(std::memory_order_relaxed)) {
      share_state();
    } else {
      poked_.store(false, std::memory_order_relaxed);
      adopt_if_new();
      if (steady::now() >= next_try_) {
        next_try_ = steady::now() + config_.retry;
        try_lead_later();
      }
    }
    std::lock_guard<std::mutex> lock(mu_);
    arm_locked();
  }

  // Declared first: destroyed last.
  std::shared_ptr<rt::Runtime> rt_;
  const SharedConfig config_;
  SharedRegion region_;
  LeaderLock lock_; ///< start()'s caller, then the loop, then stop()
  Hooks hooks_;
  std::atomic<bool> leader_{false};
  std::atomic<std::uint64_t> applied_{0}; ///< region version of the set served
  std::atomic<bool> poked_{false};        ///< a pick posted a read of the region
  std::mutex written_mu_;                 // guards written_: rebuilds write, a new lead resets
  std::shared_ptr<const PeerSet> written_; ///< the leader's last write
  std::optional<nlohmann::json> written_state_; ///< the leader file's status (start()'s caller, then the loop)
  steady::time_point next_try_;                 ///< a follower's next lead attempt (the loop)
  std::shared_ptr<TaskGate> gate_ = std::make_shared<TaskGate>(); ///< what stop() closes

  mutable std::mutex mu_; // guards the fields below
  bool stopping_ = false;
  rt::TimerId timer_ = 0;
  std::string last_error_;
};

} // namespace detail
DYNUP_NAMESPACE_END
