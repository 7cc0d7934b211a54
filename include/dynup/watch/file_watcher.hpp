// FileWatcher: publishes a JSON peer file whenever it changes on disk.
#pragma once

#include <dynup/detail/fs.hpp>
#include <dynup/detail/hash.hpp>
#include <dynup/publisher.hpp>
#include <dynup/result.hpp>
#include <dynup/source/file.hpp>
#include <dynup/version.hpp>
#include <dynup/watch/guard.hpp>
#include <dynup/watch/status.hpp>

#include <poll.h>
#include <sys/eventfd.h>
#include <sys/inotify.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <system_error>
#include <functional>
#include <mutex>
#include <string>
#include <thread>

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
/// Handles an edit in place, a rename over the file (the atomic-write pattern, and
/// Kubernetes ConfigMap symlink swaps via the poll), and delete-then-recreate. An
/// unreadable, invalid or guard-refused file keeps the set already published; the
/// reason goes to the error callback and `status()`.
///
/// Threads: the constructor reads the file once on the calling thread, then starts one
/// watcher thread; callbacks run on whichever of the two does the read, never
/// concurrently. `stop()` (or the destructor) wakes the thread and joins it within
/// milliseconds. `status()` is safe from any thread.
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
    stop_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (stop_fd_ < 0) throw std::system_error(errno, std::generic_category(), "dynup: eventfd");
    // Without inotify (limits reached, exotic file systems) the poll alone still works.
    inotify_fd_ = ::inotify_init1(IN_CLOEXEC | IN_NONBLOCK);
    add_watch();
    try {
      check(true);
      thread_ = std::thread([this] { run(); });
    } catch (...) {
      // No destructor runs for a constructor that throws: close what it opened.
      if (inotify_fd_ >= 0) ::close(inotify_fd_);
      ::close(stop_fd_);
      throw;
    }
  }

  ~FileWatcher() {
    stop();
    if (inotify_fd_ >= 0) ::close(inotify_fd_);
    if (stop_fd_ >= 0) ::close(stop_fd_);
  }

  FileWatcher(const FileWatcher&) = delete;
  FileWatcher& operator=(const FileWatcher&) = delete;

  /// Stops and joins the watcher thread. Idempotent; must not be called from a callback.
  void stop() noexcept {
    if (!thread_.joinable()) return;
    std::uint64_t one = 1;
    [[maybe_unused]] auto n = ::write(stop_fd_, &one, sizeof one);
    thread_.join();
  }

  WatcherStatus status() const {
    std::lock_guard<std::mutex> lock(status_mu_);
    return status_;
  }

private:
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

  void add_watch() {
    if (inotify_fd_ < 0 || watch_ >= 0) return;
    watch_ = ::inotify_add_watch(inotify_fd_, dir_.c_str(),
                                 IN_CLOSE_WRITE | IN_MODIFY | IN_MOVED_TO | IN_MOVED_FROM |
                                     IN_CREATE | IN_DELETE | IN_ATTRIB | IN_DELETE_SELF |
                                     IN_MOVE_SELF | IN_ONLYDIR);
  }

  // Reads and publishes the file if it changed. `force` reads even when stat(2) looks
  // unchanged: two same-size writes within the file system's timestamp granularity.
  void check(bool force) {
    Signature sig = stat_file();
    if (!force && sig == last_sig_) return;
    last_sig_ = sig;
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
        // A throwing callback must not kill the watcher thread; the set is published.
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
    if (on_error_) {
      try {
        on_error_(e);
      } catch (...) {
      }
    }
  }

  void drain_events(bool& named, bool& rewatch) {
    alignas(struct inotify_event) char buf[4096];
    for (;;) {
      ssize_t n = ::read(inotify_fd_, buf, sizeof buf);
      if (n <= 0) return;
      for (char* p = buf; p < buf + n;) {
        auto* ev = reinterpret_cast<struct inotify_event*>(p);
        if ((ev->len > 0 && base_ == ev->name) || (ev->mask & IN_Q_OVERFLOW)) named = true;
        if (ev->mask & (IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED)) rewatch = true;
        p += sizeof(struct inotify_event) + ev->len;
      }
    }
  }

  void run() {
    using clock = std::chrono::steady_clock;
    auto next_poll = clock::now() + options_.poll_interval;
    bool pending = false, force = false;
    clock::time_point settle_at{}, settle_limit{};
    for (;;) {
      auto now = clock::now();
      auto due = pending ? std::min(settle_at, next_poll) : next_poll;
      auto wait_ms = std::chrono::duration_cast<std::chrono::milliseconds>(due - now).count();
      pollfd fds[2] = {{stop_fd_, POLLIN, 0}, {inotify_fd_, POLLIN, 0}};
      int rc = ::poll(fds, inotify_fd_ >= 0 ? 2 : 1, static_cast<int>(std::max<long long>(0, wait_ms)));
      if (rc > 0 && (fds[0].revents & POLLIN)) return;
      if (rc > 0 && inotify_fd_ >= 0 && (fds[1].revents & POLLIN)) {
        bool named = false, rewatch = false;
        drain_events(named, rewatch);
        if (rewatch && watch_ >= 0) {
          // The directory itself was removed or moved: drop the watch (a moved directory's
          // watch would otherwise linger) and let the poll add one on the path again.
          ::inotify_rm_watch(inotify_fd_, watch_);
          watch_ = -1;
        }
        force = force || named;
        now = clock::now();
        if (!pending) settle_limit = now + FileWatchOptions::max_settle_factor * options_.settle;
        pending = true;
        settle_at = std::min(now + options_.settle, settle_limit);
      }
      now = clock::now();
      if (pending && now >= settle_at) {
        check(force);
        pending = force = false;
      }
      if (now >= next_poll) {
        add_watch();
        check(false);
        next_poll = now + options_.poll_interval;
      }
    }
  }

  Publisher& publisher_;
  const FileWatchOptions options_;
  const PublishCallback on_publish_;
  const ErrorCallback on_error_;
  std::string dir_, base_;
  int stop_fd_ = -1;
  int inotify_fd_ = -1;
  int watch_ = -1;
  // Owned by the watcher thread (and by the constructor before the thread starts).
  Signature last_sig_;
  bool have_digest_ = false;
  std::uint64_t last_digest_ = 0;
  std::uint64_t loads_ = 0;
  mutable std::mutex status_mu_;
  WatcherStatus status_;
  std::thread thread_;
};

DYNUP_NAMESPACE_END
