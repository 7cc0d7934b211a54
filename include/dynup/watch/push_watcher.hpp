// PushWatcher: a source whose sets are pushed in by the embedder (an admin API's
// `PUT /upstreams/<name>/peers`, Tengine dyups' model) rather than fetched. Spec: push://
#pragma once

#include <dynup/peer_set.hpp>
#include <dynup/publisher.hpp>
#include <dynup/result.hpp>
#include <dynup/snapshot_file.hpp>
#include <dynup/version.hpp>
#include <dynup/watch/guard.hpp>
#include <dynup/watch/status.hpp>

#include <sys/stat.h>

#include <cerrno>
#include <chrono>
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <utility>

DYNUP_NAMESPACE_BEGIN

struct PushOptions {
  Guards guards;
  /// Where each accepted push is saved (snapshot_file.hpp's format, mode 0600) and read
  /// back at start, so pushed peers survive a restart. Empty: pushes live in memory.
  std::string snapshot_path;
};

/// What one accepted push did.
struct PushResult {
  std::uint64_t version = 0;  ///< the version serving the pushed set
  bool changed = false;       ///< false: equal to the set served, nothing republished
  std::string persist_error;  ///< the push is served, but saving it failed (why); empty when saved or not asked
};

/// Publishes the sets pushed to it. The first set is the snapshot file's when one
/// exists and is valid; a missing file starts empty (version 0: picks fail with "no
/// peers" until the first push); a corrupt or unreadable one starts empty too, and the
/// reason goes to the error callback and status().last_error.
///
/// Threads: push() from any thread (pushes are serialized); callbacks run on the
/// pushing thread (the constructor's for the snapshot), never concurrently, and an
/// exception a callback throws is swallowed there (the push's outcome stands). No
/// thread of its own: stop() does nothing.
///
/// Status: ready once a set is served (the saved one or a push); stale while nothing is.
class PushWatcher {
public:
  using PublishCallback = std::function<void(const Snapshot&)>;
  using ErrorCallback = std::function<void(const Error&)>;

  PushWatcher(Publisher& publisher, PushOptions options, PublishCallback on_publish = {},
              ErrorCallback on_error = {})
      : publisher_(publisher), options_(std::move(options)), on_publish_(std::move(on_publish)),
        on_error_(std::move(on_error)) {
    status_.source = "push://";
    if (options_.snapshot_path.empty()) return;
    struct stat st {};
    if (::stat(options_.snapshot_path.c_str(), &st) != 0 && errno == ENOENT) return; // nothing pushed yet
    auto loaded = load_snapshot(options_.snapshot_path);
    if (!loaded) {
      Error e = loaded.error().with_context("push://: the saved pushed set is not served");
      status_.last_error = e.message();
      report(e);
      return;
    }
    PublishOutcome out = publisher_.publish(std::move(loaded->set));
    Snapshot now = publisher_.current();
    status_.last_index = now->source_index();
    status_.last_success = std::chrono::system_clock::now();
    status_.ready = true;
    status_.stale = false; // the saved set is the last push: nothing newer exists
    if (out.published) {
      ++status_.publish_count;
      notify_published(now);
    }
  }

  PushWatcher(const PushWatcher&) = delete;
  PushWatcher& operator=(const PushWatcher&) = delete;

  /// Serves `set` from now on. Refused (nothing changes) when the guards refuse it:
  /// Errc::rejected with the reason. The set's source index becomes the push count's
  /// next value, so status()'s index moves with every accepted push. O(n) plus the save.
  Result<PushResult> push(PeerSet set) {
    std::lock_guard<std::mutex> lock(mu_);
    Snapshot current = publisher_.current();
    if (auto ok = check_guards(options_.guards, *current, set); !ok) {
      Error e = ok.error().with_context("push://");
      {
        std::lock_guard<std::mutex> s(status_mu_);
        status_.last_error = e.message();
        ++status_.consecutive_failures;
      }
      report(e);
      return e;
    }
    const std::uint64_t index = current->source_index() + 1;
    auto indexed = PeerSet::make(set.peers(), index);
    if (!indexed) return indexed.error(); // cannot happen: `set` was valid
    PublishOutcome out = publisher_.publish(std::move(indexed).value());
    Snapshot now = publisher_.current(); // pushes are serialized: this is the set just published
    PushResult r;
    r.version = out.version;
    r.changed = out.published;
    if (out.published && !options_.snapshot_path.empty()) {
      if (auto saved = save_snapshot(options_.snapshot_path, *now); !saved)
        r.persist_error = saved.error().message();
    }
    {
      std::lock_guard<std::mutex> s(status_mu_);
      status_.last_index = now->source_index();
      status_.last_success = std::chrono::system_clock::now();
      status_.last_error = r.persist_error.empty() ? "" : "push://: served but not saved: " + r.persist_error;
      status_.consecutive_failures = 0;
      status_.ready = true;
      status_.stale = false;
      if (out.published) ++status_.publish_count;
    }
    if (out.published) notify_published(now);
    return r;
  }

  WatcherStatus status() const {
    std::lock_guard<std::mutex> lock(status_mu_);
    return status_;
  }

  void stop() noexcept {}

private:
  // A throwing callback must not undo a push that is served, nor escape onto the
  // embedder's thread (an admin API handler, say).
  void notify_published(const Snapshot& now) noexcept {
    if (!on_publish_) return;
    try {
      on_publish_(now);
    } catch (...) {
    }
  }
  void report(const Error& e) noexcept {
    if (!on_error_) return;
    try {
      on_error_(e);
    } catch (...) {
    }
  }

  Publisher& publisher_;
  const PushOptions options_;
  PublishCallback on_publish_;
  ErrorCallback on_error_;
  std::mutex mu_; // one push at a time
  mutable std::mutex status_mu_;
  WatcherStatus status_;
};

DYNUP_NAMESPACE_END
