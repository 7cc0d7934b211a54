// FileWatcher: publishes a JSON peer file whenever it changes on disk.
#pragma once

#include <dynup/detail/fs.hpp>
#include <dynup/detail/hash.hpp>
#include <dynup/publisher.hpp>
#include <dynup/result.hpp>
#include <dynup/runtime/inotify.hpp>
#include <dynup/runtime/runtime.hpp>
#include <dynup/source/file.hpp>
#include <dynup/version.hpp>
#include <dynup/watch/guard.hpp>
#include <dynup/watch/status.hpp>

#include <sys/inotify.h>
#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <system_error>

DYNUP_NAMESPACE_BEGIN

struct FileWatchOptions {
  std::string path;
  /// Fallback re-check period: catches what inotify cannot see (a symlink swapped in
  /// another directory, network file systems, a directory that was recreated).
  /// 0 or less means the default, 1 s (a zero period would spin).
  std::chrono::milliseconds poll_interval{1000};
  /// After a change notification, wait this long for more writes before reading, so a
  /// writer's half-written file is rarely seen (and if seen, reported then corrected).
  /// Each further write restarts the wait, but a file written without pause is still
  /// read `max_settle_factor` × settle after the first write of the burst: a writer
  /// faster than `settle` cannot hold changes back until the fallback poll.
  std::chrono::milliseconds settle{20};
  static constexpr int max_settle_factor = 5;
  Guards guards;
};

/// Watches one peer file and publishes each valid, changed version into a Publisher.
///
/// Handles an edit in place, a rename over the file (the atomic-write pattern), a
/// symlink re-pointed through its directory (a Kubernetes ConfigMap's "..data" swap),
/// and delete-then-recreate; the poll catches what inotify cannot see. An
/// unreadable, invalid or guard-refused file keeps the set already published; the
/// reason goes to the error callback and `status()`.
///
/// Runs on the process's runtime (rt::Runtime::acquire()): no thread and no inotify
/// instance of its own. It subscribes to its file's directory on the runtime's one
/// inotify instance (rt::Inotify), and its settle and poll timers are the loop's, so a
/// thousand file watchers cost the threads and the descriptor of one.
///
/// Threads: the constructor does the first read on the loop's thread and waits for it,
/// so the file is published (or its failure reported) when it returns. Every callback
/// runs on the loop's thread, one at a time; reading, decoding and publishing happen
/// there too (peer files are small, at most DYNUP_MAX_PEER_FILE_BYTES). A callback must
/// not block: it holds up every watcher of the process. `status()` is safe from any
/// thread; stop() from one thread at a time.
///
/// When inotify cannot be used (inotify_init1 fails: EMFILE, the per-user instance
/// limit; inotify_add_watch fails: ENOSPC, the watch limit, or EACCES), the file is
/// polled every poll_interval, which the error callback hears once per cause, naming it
/// ("inotify_add_watch(/etc/dynup): No space left on device; polling every 1000 ms"),
/// and status().mode ("poll") and mode_error show while it lasts. A directory that does
/// not exist yet is polled for too, shown in status but not reported (the file's read
/// error is). Each poll tries inotify again.
///
/// Errors: the constructor throws std::system_error when the runtime cannot start (no
/// thread or descriptor to be had); everything later is reported, never thrown.
class FileWatcher {
public:
  using PublishCallback = std::function<void(const Snapshot&)>;
  using ErrorCallback = std::function<void(const Error&)>;

  FileWatcher(Publisher& publisher, FileWatchOptions options, PublishCallback on_publish = {},
              ErrorCallback on_error = {})
      : publisher_(publisher), options_(with_defaults(std::move(options))), on_publish_(std::move(on_publish)),
        on_error_(std::move(on_error)) {
    status_.source = "file://" + options_.path;
    auto slash = options_.path.rfind('/');
    dir_ = detail::directory_of(options_.path);
    base_ = slash == std::string::npos ? options_.path : options_.path.substr(slash + 1);
    auto runtime = rt::Runtime::acquire();
    if (!runtime)
      throw std::system_error(std::make_error_code(std::errc::resource_unavailable_try_again),
                              "dynup: " + runtime.error().message());
    runtime_ = std::move(runtime).value();
    loop_ = &runtime_->loop();
    inotify_ = &runtime_->service<rt::Inotify>();
    try {
      loop_->run_sync([this] { start(); });
    } catch (...) {
      // No destructor runs for a constructor that throws: leave nothing on the loop.
      stop();
      throw;
    }
  }

  /// Stops (see stop()). Must not run inside this watcher's own callback: the callback
  /// would return into a destroyed watcher.
  ~FileWatcher() { stop(); }

  FileWatcher(const FileWatcher&) = delete;
  FileWatcher& operator=(const FileWatcher&) = delete;

  /// Stops watching: cancels the timers and drops the inotify subscription; the
  /// published set stays and status() still answers. No callback runs after it returns.
  /// From another thread it waits for the loop to finish the callback it is running, if
  /// any (milliseconds: callbacks do not block). From a callback (the loop's thread, this
  /// watcher's own included) it takes effect at once without waiting, and no further
  /// callback of this watcher follows the one running. Idempotent; the destructor lets
  /// go of the runtime.
  void stop() noexcept {
    loop_->run_sync([this] { halt(); });
  }

  /// A copy of the watcher's state. Any thread.
  WatcherStatus status() const {
    std::lock_guard<std::mutex> lock(status_mu_);
    return status_;
  }

private:
  using steady = std::chrono::steady_clock;

  static FileWatchOptions with_defaults(FileWatchOptions o) {
    if (o.poll_interval.count() <= 0) o.poll_interval = FileWatchOptions{}.poll_interval;
    return o;
  }

  // What stat(2) says about the file; any difference means "read it again".
  struct Signature {
    bool exists = false;
    dev_t dev = 0;
    ino_t ino = 0;
    off_t size = 0;
    std::int64_t mtime_ns = 0, ctime_ns = 0;
    bool operator==(const Signature& o) const {
      return exists == o.exists && dev == o.dev && ino == o.ino && size == o.size &&
             mtime_ns == o.mtime_ns && ctime_ns == o.ctime_ns;
    }
  };

  Signature stat_file() const {
    struct stat st {};
    Signature s;
    if (::stat(options_.path.c_str(), &st) != 0) return s;
    s.exists = true;
    s.dev = st.st_dev;
    s.ino = st.st_ino;
    s.size = st.st_size;
    s.mtime_ns = static_cast<std::int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
    s.ctime_ns = static_cast<std::int64_t>(st.st_ctim.tv_sec) * 1000000000 + st.st_ctim.tv_nsec;
    return s;
  }

  // Everything below runs on the loop's thread.

  // Watch first, then read: a change between the two is then seen, never lost.
  void start() {
    subscribe();
    check(true);
    arm_poll();
  }

  void halt() noexcept {
    stopped_ = true;
    if (settle_timer_ != 0) loop_->cancel(settle_timer_);
    if (poll_timer_ != 0) loop_->cancel(poll_timer_);
    settle_timer_ = poll_timer_ = 0;
    inotify_->unsubscribe(subscription_);
    subscription_ = 0;
  }

  void arm_poll() {
    if (stopped_) return;
    poll_timer_ = loop_->after(options_.poll_interval, [this] { on_poll(); });
  }

  void on_poll() {
    poll_timer_ = 0;
    if (stopped_) return;
    subscribe();
    check(false);
    arm_poll();
  }

  // A symlink's target can change through other entries of the directory (Kubernetes
  // swaps a "..data" link next to it), so a link hears every entry; a plain file only
  // its own name.
  bool path_is_link() const {
    struct stat st {};
    return ::lstat(options_.path.c_str(), &st) == 0 && S_ISLNK(st.st_mode);
  }

  // Subscribes to the directory unless subscribed; on failure, says why the watcher
  // polls (in status, and once per cause to the error callback).
  void subscribe() {
    if (stopped_ || subscription_ != 0) return;
    const bool every = path_is_link();
    auto sub = inotify_->subscribe(dir_, every ? std::string() : base_,
                                   [this](const rt::DirEvent& e) { on_event(e); });
    if (sub) {
      subscription_ = *sub;
      subscribed_every_ = every;
      reported_mode_error_.clear();
      set_mode("inotify", "");
      return;
    }
    const bool missing = sub.error().code() == Errc::not_found;
    std::string why = sub.error().message() + "; polling every " + std::to_string(options_.poll_interval.count()) +
                      " ms" + (missing ? " until the directory exists" : "");
    set_mode("poll", why);
    // A missing directory is not a fault of inotify; the file's own read reports it.
    if (missing || why == reported_mode_error_) return;
    reported_mode_error_ = why;
    report(Error(sub.error().code(), why).with_context("file://" + options_.path));
  }

  void set_mode(const char* mode, const std::string& why) {
    std::lock_guard<std::mutex> lock(status_mu_);
    status_.mode = mode;
    status_.mode_error = why;
  }

  // Each event heard starts or extends the settle; one naming the file, or lost events,
  // force a read.
  void on_event(const rt::DirEvent& e) {
    if (stopped_) return;
    if (e.mask & IN_IGNORED) subscription_ = 0; // the directory went away; the poll subscribes again
    force_ = force_ || (e.mask & IN_Q_OVERFLOW) || e.name == base_;
    const auto now = steady::now();
    if (pending_) {
      settle_at_ = std::min(now + options_.settle, settle_limit_);
      return; // the settle timer, when it fires, follows settle_at_
    }
    pending_ = true;
    settle_limit_ = now + FileWatchOptions::max_settle_factor * options_.settle;
    settle_at_ = std::min(now + options_.settle, settle_limit_);
    settle_timer_ = loop_->at(settle_at_, [this] { on_settle(); });
  }

  void on_settle() {
    settle_timer_ = 0;
    if (stopped_) return;
    // A later event moved the deadline: wait on rather than re-arm on every event.
    if (steady::now() < settle_at_) {
      settle_timer_ = loop_->at(settle_at_, [this] { on_settle(); });
      return;
    }
    const bool force = force_;
    pending_ = force_ = false;
    check(force);
  }

  // Reads and publishes the file if it changed. `force` reads even when stat(2) looks
  // unchanged: two same-size writes within the file system's timestamp granularity.
  void check(bool force) {
    if (stopped_) return;
    Signature sig = stat_file();
    if (!force && sig == last_sig_) return;
    last_sig_ = sig;
    if (subscription_ != 0 && path_is_link() != subscribed_every_) {
      // The file became a link, or stopped being one: subscribe anew, then let the old
      // subscription go, so the directory's watch stays in place between the two.
      auto old = subscription_;
      subscription_ = 0;
      subscribe();
      inotify_->unsubscribe(old);
      if (stopped_) return; // stopped by the error callback
    }
    auto bytes = detail::read_file(options_.path, DYNUP_MAX_PEER_FILE_BYTES);
    if (!bytes) return fail(bytes.error());
    std::uint64_t digest = fingerprint(*bytes);
    if (have_digest_ && digest == last_digest_) return;
    auto set = decode_peer_file(*bytes, loads_ + 1);
    if (!set) return fail(set.error().with_context(options_.path));
    const Snapshot& current = publisher_.snapshot();
    if (auto guard = check_guards(options_.guards, *current, *set); !guard)
      return fail(guard.error().with_context(options_.path));
    have_digest_ = true;
    last_digest_ = digest;
    ++loads_;
    auto outcome = publisher_.publish(std::move(set).value());
    {
      std::lock_guard<std::mutex> lock(status_mu_);
      status_.last_index = loads_;
      status_.last_success = std::chrono::system_clock::now();
      status_.last_error.clear();
      status_.consecutive_failures = 0;
      status_.stale = false;
      status_.ready = true;
      if (outcome.published) ++status_.publish_count;
    }
    if (outcome.published && on_publish_) {
      try {
        on_publish_(publisher_.snapshot());
      } catch (...) {
        // A throwing callback must not end the watch (or reach the loop); the set is published.
      }
    }
  }

  static std::uint64_t fingerprint(const std::string& bytes) {
    detail::ContentHash h;
    h.str(bytes);
    return h.value();
  }

  void fail(const Error& e) {
    {
      std::lock_guard<std::mutex> lock(status_mu_);
      status_.last_error = e.message();
      ++status_.consecutive_failures;
      status_.stale = true; // what the file holds is not what is served (or nothing is)
    }
    // The bytes that failed are not remembered as good, so fixing the file back to the
    // last good content still clears the error.
    have_digest_ = false;
    report(e);
  }

  void report(const Error& e) {
    if (!on_error_) return;
    try {
      on_error_(e);
    } catch (...) {
    }
  }

  Publisher& publisher_;
  const FileWatchOptions options_;
  const PublishCallback on_publish_;
  const ErrorCallback on_error_;
  std::string dir_, base_;
  std::shared_ptr<rt::Runtime> runtime_; // never null: the constructor throws instead
  rt::Loop* loop_ = nullptr;
  rt::Inotify* inotify_ = nullptr;
  // The loop's thread only (and the constructor, before start() is posted).
  bool stopped_ = false;
  rt::Inotify::SubscriptionId subscription_ = 0;
  bool subscribed_every_ = false; // to every entry of the directory, not only the file's
  std::string reported_mode_error_; // the fallback cause last sent to the error callback
  rt::TimerId poll_timer_ = 0, settle_timer_ = 0;
  bool pending_ = false, force_ = false;
  steady::time_point settle_at_{}, settle_limit_{};
  Signature last_sig_;
  bool have_digest_ = false;
  std::uint64_t last_digest_ = 0;
  std::uint64_t loads_ = 0;
  mutable std::mutex status_mu_;
  WatcherStatus status_;
};

DYNUP_NAMESPACE_END
