// Inotify: the process's one inotify instance, shared by every file watcher on the
// runtime's loop. The kernel allows 128 instances per user by default and 8192 watches
// or more, so a watcher per instance runs out at a few hundred files; one instance with a
// watch per directory does not.
#pragma once

#include <dynup/result.hpp>
#include <dynup/runtime/loop.hpp>
#include <dynup/runtime/runtime.hpp>
#include <dynup/version.hpp>

#include <sys/inotify.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

DYNUP_NAMESPACE_BEGIN
namespace rt {

/// What a subscriber hears about its directory.
struct DirEvent {
  /// The kernel's IN_* bits. Two carry a duty for the subscriber:
  /// IN_Q_OVERFLOW: the kernel dropped events (its queue was full); anything in the
  /// directory may have changed, so re-read what you watch.
  /// IN_IGNORED: the subscription has ended (the directory was deleted, moved away or
  /// unmounted); subscribe again once the path is a directory again. Its id is dead.
  std::uint32_t mask = 0;
  /// The entry's name inside the directory; empty for events on the directory itself,
  /// IN_Q_OVERFLOW and IN_IGNORED. Valid during the callback only.
  std::string_view name;
};

/// The runtime's inotify instance: one descriptor (IN_CLOEXEC | IN_NONBLOCK) for the
/// process, read on the runtime's loop, with one kernel watch per directory however
/// many subscribers share it. Get it with `runtime.service<rt::Inotify>()`.
///
/// Threads: subscribe(), unsubscribe() and the introspection calls on the loop's thread
/// only (use Loop::run_sync or post); callbacks run there, one at a time, and must not
/// block. A callback may subscribe and unsubscribe (itself or others) freely.
/// Costs: subscribe is one inotify_add_watch(2) plus O(1) bookkeeping; unsubscribe
/// O(subscribers of that entry); an event about an entry costs O(its subscribers +
/// the directory's every-entry subscribers); one about the directory O(the directory's
/// subscribers), IN_Q_OVERFLOW O(all subscribers). Allocates per subscription and per
/// event delivered (the list of its subscribers).
/// Watches: every directory is watched for `dir_events` (entries created, deleted,
/// written, renamed in or out, attribute changes, and the directory itself deleted or
/// moved). When it is deleted or moved, the service drops its watch and ends every
/// subscription on it with IN_IGNORED: a moved directory's watch would otherwise follow
/// it away from the path the subscribers asked for.
class Inotify {
public:
  using Callback = std::function<void(const DirEvent&)>;
  /// Names a subscription; never 0, never reused.
  using SubscriptionId = std::uint64_t;

  static constexpr std::uint32_t dir_events = IN_CLOSE_WRITE | IN_MODIFY | IN_MOVED_TO | IN_MOVED_FROM | IN_CREATE |
                                              IN_DELETE | IN_ATTRIB | IN_DELETE_SELF | IN_MOVE_SELF;

  /// Made by Runtime::service(); opens nothing yet (the loop is not this thread): the
  /// descriptor is opened by the first subscribe().
  explicit Inotify(Runtime& runtime) noexcept : loop_(runtime.loop()) {}

  /// On the loop's thread (the Runtime destroys services there): closes the descriptor.
  /// Subscriptions still open end silently.
  ~Inotify() {
    if (fd_ >= 0) {
      loop_.unwatch(fd_);
      ::close(fd_);
    }
  }
  Inotify(const Inotify&) = delete;
  Inotify& operator=(const Inotify&) = delete;

  /// Calls `cb` on the loop's thread for events in directory `dir` until unsubscribe()
  /// or an IN_IGNORED event: events about the entry `name` when it is not empty, about
  /// every entry when it is; events about the directory itself, IN_Q_OVERFLOW and
  /// IN_IGNORED always. Subscribers of the same directory (the same inode, whatever the
  /// spelling of the path) share one kernel watch. Loop thread only.
  /// Errors name the call, the path and errno's text. Errc::not_found when `dir` is not
  /// a directory (ENOENT, ENOTDIR); otherwise Errc::io_error, such as
  /// "inotify_init1: Too many open files" (EMFILE: the per-user instance limit or the
  /// fd limit; tried again by the next subscribe),
  /// "inotify_add_watch(/etc/dynup): No space left on device" (ENOSPC: the per-user
  /// watch limit), "inotify_add_watch(/etc/dynup): Permission denied" (EACCES).
  Result<SubscriptionId> subscribe(const std::string& dir, std::string name, Callback cb) {
    if (fd_ < 0) {
      if (auto opened = open(); !opened) return opened.error();
    }
    int err = fault_ ? fault_("inotify_add_watch", dir) : 0;
    int wd = err != 0 ? -1 : ::inotify_add_watch(fd_, dir.c_str(), dir_events | IN_ONLYDIR);
    if (wd < 0) {
      if (err == 0) err = errno;
      return Error(err == ENOENT || err == ENOTDIR ? Errc::not_found : Errc::io_error,
                   "inotify_add_watch(" + dir + "): " + std::strerror(err));
    }
    SubscriptionId id = ++next_id_;
    Watch& w = watches_[wd];
    w.list(name).push_back(id);
    ++w.count;
    subs_.emplace(id, Sub{wd, std::move(name), std::make_shared<Callback>(std::move(cb))});
    return id;
  }
  /// subscribe(dir, "", cb): every entry of `dir`.
  Result<SubscriptionId> subscribe(const std::string& dir, Callback cb) { return subscribe(dir, {}, std::move(cb)); }

  /// Ends a subscription: its callback is not called again, even for events already
  /// read. The directory's kernel watch goes with its last subscriber. Loop thread
  /// only; an id that ended already (or 0) does nothing.
  void unsubscribe(SubscriptionId id) noexcept {
    auto it = subs_.find(id);
    if (it == subs_.end()) return;
    const int wd = it->second.wd;
    auto w = watches_.find(wd);
    if (w != watches_.end()) {
      w->second.remove(it->second.name, id);
      if (--w->second.count == 0) {
        watches_.erase(w);
        // The kernel answers with IN_IGNORED for this wd, which no longer names anyone.
        ::inotify_rm_watch(fd_, wd);
      }
    }
    subs_.erase(it);
  }

  /// The inotify descriptor, or -1 before the first successful subscribe. Loop thread.
  int fd() const noexcept { return fd_; }
  /// Kernel watches held (directories). Loop thread.
  std::size_t watches() const noexcept { return watches_.size(); }
  /// Subscriptions open. Loop thread.
  std::size_t subscriptions() const noexcept { return subs_.size(); }

  /// For tests: before each inotify_init1 ("inotify_init1", "") and inotify_add_watch
  /// ("inotify_add_watch", dir), `fault` may return an errno for the call to fail with
  /// (0: make the call). Simulates limits without changing the system's. Empty: none.
  /// Loop thread.
  void inject_faults(std::function<int(const char* call, const std::string& dir)> fault) {
    fault_ = std::move(fault);
  }

private:
  struct Sub {
    int wd;
    std::string name;             // empty: every entry
    std::shared_ptr<Callback> cb; // shared: a callback may end its own subscription
  };

  // One kernel watch and its subscribers, indexed by the entry they follow, so an event
  // reaches only those it concerns: a thousand files in one directory do not make each
  // write a thousand calls.
  struct Watch {
    std::vector<SubscriptionId> every;
    std::unordered_map<std::string, std::vector<SubscriptionId>> named;
    std::size_t count = 0;

    std::vector<SubscriptionId>& list(const std::string& name) { return name.empty() ? every : named[name]; }
    void remove(const std::string& name, SubscriptionId id) noexcept {
      auto n = named.end();
      std::vector<SubscriptionId>* ids = &every;
      if (!name.empty()) {
        n = named.find(name);
        if (n == named.end()) return;
        ids = &n->second;
      }
      for (auto& s : *ids)
        if (s == id) {
          s = ids->back();
          ids->pop_back();
          break;
        }
      if (n != named.end() && n->second.empty()) named.erase(n);
    }
    // The subscribers of an event about entry `name` (empty: about the directory).
    std::vector<SubscriptionId> audience(std::string_view name) const {
      std::vector<SubscriptionId> out = every;
      if (name.empty()) {
        for (const auto& n : named) out.insert(out.end(), n.second.begin(), n.second.end());
      } else if (auto n = named.find(std::string(name)); n != named.end()) {
        out.insert(out.end(), n->second.begin(), n->second.end());
      }
      return out;
    }
  };

  Result<void> open() {
    int err = fault_ ? fault_("inotify_init1", std::string()) : 0;
    int fd = err != 0 ? -1 : ::inotify_init1(IN_CLOEXEC | IN_NONBLOCK);
    if (fd < 0) {
      if (err == 0) err = errno;
      return Error(Errc::io_error, std::string("inotify_init1: ") + std::strerror(err));
    }
    if (auto watched = loop_.watch(fd, EPOLLIN, [this](std::uint32_t) { drain(); }); !watched) {
      ::close(fd);
      return watched.error().with_context("inotify");
    }
    fd_ = fd;
    return {};
  }

  void drain() {
    // Aligned for inotify_event; large enough for many events per read(2).
    alignas(struct inotify_event) char buf[16384];
    for (;;) {
      ssize_t n = ::read(fd_, buf, sizeof buf);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return; // EAGAIN: drained
      for (char* p = buf; p < buf + n;) {
        const auto* ev = reinterpret_cast<const struct inotify_event*>(p);
        p += sizeof(struct inotify_event) + ev->len;
        dispatch(*ev);
      }
    }
  }

  void dispatch(const struct inotify_event& ev) {
    if (ev.mask & IN_Q_OVERFLOW) {
      std::vector<SubscriptionId> all;
      all.reserve(subs_.size());
      for (const auto& s : subs_) all.push_back(s.first);
      deliver(all, DirEvent{IN_Q_OVERFLOW, {}});
      return;
    }
    auto w = watches_.find(ev.wd);
    if (w == watches_.end()) return; // a watch already dropped (its IN_IGNORED, late events)
    // ev.len counts the NUL padding; the name ends at the first NUL.
    std::string_view name = ev.len > 0 ? std::string_view(ev.name) : std::string_view();
    // A copy: callbacks may change the lists.
    if (!(ev.mask & IN_IGNORED)) deliver(w->second.audience(name), DirEvent{ev.mask, name});
    if (ev.mask & (IN_IGNORED | IN_DELETE_SELF | IN_MOVE_SELF | IN_UNMOUNT)) end_watch(ev.wd);
  }

  // The directory is gone from its path: drop its watch and tell each subscriber that
  // its subscription has ended.
  void end_watch(int wd) {
    auto w = watches_.find(wd);
    if (w == watches_.end()) return;
    std::vector<SubscriptionId> ids = w->second.audience({});
    watches_.erase(w);
    ::inotify_rm_watch(fd_, wd); // EINVAL when the kernel dropped it already
    std::vector<std::shared_ptr<Callback>> cbs;
    for (SubscriptionId id : ids) {
      auto s = subs_.find(id);
      if (s == subs_.end()) continue;
      cbs.push_back(std::move(s->second.cb));
      subs_.erase(s);
    }
    DirEvent ended{IN_IGNORED, {}};
    for (auto& cb : cbs) call(*cb, ended);
  }

  void deliver(const std::vector<SubscriptionId>& ids, const DirEvent& e) {
    for (SubscriptionId id : ids) {
      auto s = subs_.find(id);
      if (s == subs_.end()) continue; // ended by an earlier callback
      auto cb = s->second.cb;
      call(*cb, e);
    }
  }

  static void call(const Callback& cb, const DirEvent& e) noexcept {
    try {
      if (cb) cb(e);
    } catch (...) {
      // A subscriber's failure must not cost the others their events.
    }
  }

  Loop& loop_;
  int fd_ = -1;
  SubscriptionId next_id_ = 0;
  std::unordered_map<int, Watch> watches_; // by wd
  std::unordered_map<SubscriptionId, Sub> subs_;
  std::function<int(const char*, const std::string&)> fault_;
};

} // namespace rt
DYNUP_NAMESPACE_END
