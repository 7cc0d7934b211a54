// Loop: one thread that runs timers, posted tasks and descriptor callbacks for every
// watcher, health check and shared member of a process (the runtime's I/O thread). Work
// that grows with the number of upstreams is data on this loop, not threads.
#pragma once

#include <dynup/result.hpp>
#include <dynup/version.hpp>

#include <pthread.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <deque>
#include <functional>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <system_error>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

DYNUP_NAMESPACE_BEGIN
namespace rt {

using Task = std::function<void()>;
using TimerId = std::uint64_t;
using steady = std::chrono::steady_clock;

/// An event loop on its own thread: epoll for descriptors, a timer map, and a queue of
/// posted tasks.
///
/// Threads: post(), at(), after(), cancel() and run_sync() from any thread; watch(),
/// modify() and unwatch() on the loop's thread only. Every callback runs on the loop's
/// thread, one at a time, so state that only callbacks touch needs no lock. Callbacks
/// must not block: a blocked callback delays every upstream of the process. An
/// exception escaping a callback is caught and counted (errors()), never propagated.
/// Costs: post O(1) amortized plus one eventfd write when the queue was empty; timers
/// O(log n). Allocates per task and timer.
class Loop {
public:
  /// Starts the thread. Throws std::system_error when the kernel refuses epoll, eventfd
  /// or the thread (the Runtime turns that into an error value).
  Loop() {
    epfd_ = ::epoll_create1(EPOLL_CLOEXEC);
    if (epfd_ < 0) throw std::system_error(errno, std::generic_category(), "epoll_create1");
    wakefd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (wakefd_ < 0) {
      int e = errno;
      ::close(epfd_);
      throw std::system_error(e, std::generic_category(), "eventfd");
    }
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.fd = wakefd_;
    ::epoll_ctl(epfd_, EPOLL_CTL_ADD, wakefd_, &ev);
    try {
      thread_ = std::thread([this] { run(); });
    } catch (...) {
      ::close(wakefd_);
      ::close(epfd_);
      throw;
    }
  }

  /// Stops the thread: tasks still queued and timers not yet due are dropped (their
  /// owners have stopped by then). Not from the loop's own thread.
  ~Loop() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
    }
    wake();
    if (thread_.joinable()) thread_.join();
    ::close(wakefd_);
    ::close(epfd_);
  }
  Loop(const Loop&) = delete;
  Loop& operator=(const Loop&) = delete;

  /// True on the loop's thread.
  bool in_loop() const noexcept { return std::this_thread::get_id() == loop_id_.load(std::memory_order_acquire); }

  /// Runs `t` on the loop's thread, after the tasks posted before it.
  void post(Task t) {
    bool was_empty;
    {
      std::lock_guard<std::mutex> lock(mu_);
      was_empty = posted_.empty();
      posted_.push_back(std::move(t));
    }
    if (was_empty && !in_loop()) wake();
  }

  /// Runs `t` on the loop's thread at `when` (or at once when that has passed). The id
  /// is for cancel(); ids are never reused.
  TimerId at(steady::time_point when, Task t) {
    std::lock_guard<std::mutex> lock(mu_);
    TimerId id = ++next_timer_;
    bool earliest = timers_.empty() || when < timers_.begin()->first.first;
    timers_.emplace(std::make_pair(when, id), std::move(t));
    timer_at_.emplace(id, when);
    if (earliest && !in_loop()) wake_locked();
    return id;
  }
  TimerId after(std::chrono::nanoseconds d, Task t) { return at(steady::now() + d, std::move(t)); }

  /// Removes a timer that has not run. On the loop's thread it is then certain not to
  /// run; from another thread it may be running at that moment. Returns whether it was
  /// removed. Cancelling 0 or an id that ran does nothing.
  bool cancel(TimerId id) noexcept {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = timer_at_.find(id);
    if (it == timer_at_.end()) return false;
    timers_.erase(std::make_pair(it->second, id));
    timer_at_.erase(it);
    return true;
  }

  /// Runs `t` on the loop's thread and waits for it; runs it at once when called there.
  /// For stopping an object whose state only the loop touches. Exceptions from `t`
  /// are rethrown to the caller.
  void run_sync(const Task& t) {
    if (in_loop()) {
      t();
      return;
    }
    // The caller's stack holds the state, and the loop touches it last under the lock:
    // an exception thrown on the loop is freed on the caller's thread, after the
    // handover (no std::promise, whose shared state the loop might drop last).
    struct Sync {
      std::mutex mu;
      std::condition_variable cv;
      bool done = false;
      std::exception_ptr error;
    } sync;
    post([&t, s = &sync] {
      std::exception_ptr error;
      try {
        t();
      } catch (...) {
        error = std::current_exception();
      }
      std::lock_guard<std::mutex> lock(s->mu);
      s->error = std::move(error);
      s->done = true;
      s->cv.notify_one();
    });
    std::unique_lock<std::mutex> lock(sync.mu);
    sync.cv.wait(lock, [&] { return sync.done; });
    if (sync.error) std::rethrow_exception(std::move(sync.error));
  }

  using FdCallback = std::function<void(std::uint32_t events)>;

  /// Calls `cb` with the epoll events (EPOLLIN, EPOLLOUT, EPOLLERR, EPOLLHUP) whenever
  /// `fd` is ready for `events`. Loop thread only; one registration per descriptor.
  /// Errors: the epoll_ctl errno (EMFILE is not possible here; ENOMEM, EEXIST).
  Result<void> watch(int fd, std::uint32_t events, FdCallback cb) {
    epoll_event ev{};
    ev.events = events;
    ev.data.fd = fd;
    if (::epoll_ctl(epfd_, EPOLL_CTL_ADD, fd, &ev) != 0)
      return Error(Errc::io_error, std::string("epoll_ctl(ADD): ") + std::strerror(errno));
    fds_[fd] = std::make_shared<FdCallback>(std::move(cb));
    return {};
  }
  /// Changes the events `fd` is watched for. Loop thread only.
  Result<void> modify(int fd, std::uint32_t events) {
    epoll_event ev{};
    ev.events = events;
    ev.data.fd = fd;
    if (::epoll_ctl(epfd_, EPOLL_CTL_MOD, fd, &ev) != 0)
      return Error(Errc::io_error, std::string("epoll_ctl(MOD): ") + std::strerror(errno));
    return {};
  }
  /// Stops watching `fd` (call before closing it). Its callback is not called again,
  /// even for events already collected in this round. Loop thread only.
  void unwatch(int fd) noexcept {
    ::epoll_ctl(epfd_, EPOLL_CTL_DEL, fd, nullptr);
    fds_.erase(fd);
  }

  /// Callbacks that threw, since the start.
  std::uint64_t errors() const noexcept { return errors_.load(std::memory_order_relaxed); }

  /// The loop thread's id (for tests and thread accounting).
  std::thread::id thread_id() const noexcept { return loop_id_.load(std::memory_order_acquire); }

private:
  void wake() {
    std::lock_guard<std::mutex> lock(mu_);
    wake_locked();
  }
  void wake_locked() {
    std::uint64_t one = 1;
    ssize_t n = ::write(wakefd_, &one, sizeof one);
    (void)n; // EAGAIN: the counter is already non-zero, the loop will wake
  }

  template <class F> void guarded(F&& f) noexcept {
    try {
      f();
    } catch (...) {
      errors_.fetch_add(1, std::memory_order_relaxed);
    }
  }

  void run() {
    ::pthread_setname_np(::pthread_self(), "dynup-loop");
    loop_id_.store(std::this_thread::get_id(), std::memory_order_release);
    std::vector<epoll_event> events(64);
    for (;;) {
      int timeout_ms = -1;
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (stopping_) break;
        if (!posted_.empty()) {
          timeout_ms = 0;
        } else if (!timers_.empty()) {
          auto d = timers_.begin()->first.first - steady::now();
          // Round up so a timer is never woken for early and spun on.
          auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(d + std::chrono::microseconds(999));
          timeout_ms = ms.count() <= 0 ? 0 : static_cast<int>(std::min<long long>(ms.count(), 60000));
        }
      }
      int n = ::epoll_wait(epfd_, events.data(), static_cast<int>(events.size()), timeout_ms);
      if (n < 0 && errno != EINTR) {
        errors_.fetch_add(1, std::memory_order_relaxed);
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
        n = 0;
      }
      for (int i = 0; i < n; ++i) {
        int fd = events[static_cast<std::size_t>(i)].data.fd;
        if (fd == wakefd_) {
          std::uint64_t v;
          ssize_t r = ::read(wakefd_, &v, sizeof v);
          (void)r;
          continue;
        }
        auto it = fds_.find(fd);
        if (it == fds_.end()) continue; // unwatched by an earlier callback of this round
        auto cb = it->second;           // the callback may unwatch itself
        std::uint32_t ev = events[static_cast<std::size_t>(i)].events;
        guarded([&] { (*cb)(ev); });
      }
      run_timers();
      run_posted();
      if (n == static_cast<int>(events.size())) events.resize(events.size() * 2);
    }
  }

  void run_timers() {
    const auto now = steady::now();
    for (;;) {
      Task t;
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (stopping_ || timers_.empty() || timers_.begin()->first.first > now) return;
        auto it = timers_.begin();
        t = std::move(it->second);
        timer_at_.erase(it->first.second);
        timers_.erase(it);
      }
      guarded(t);
    }
  }

  void run_posted() {
    std::deque<Task> batch;
    {
      std::lock_guard<std::mutex> lock(mu_);
      batch.swap(posted_);
    }
    for (auto& t : batch) guarded(t);
  }

  int epfd_ = -1;
  int wakefd_ = -1;
  std::thread thread_;
  std::atomic<std::thread::id> loop_id_{};
  std::atomic<std::uint64_t> errors_{0};

  std::mutex mu_; // guards the fields below
  bool stopping_ = false;
  std::deque<Task> posted_;
  std::map<std::pair<steady::time_point, TimerId>, Task> timers_;
  std::unordered_map<TimerId, steady::time_point> timer_at_;
  TimerId next_timer_ = 0;

  std::unordered_map<int, std::shared_ptr<FdCallback>> fds_; // loop thread only
};

} // namespace rt
DYNUP_NAMESPACE_END
