// Runtime: the one set of threads a process runs for dynup, however many upstreams it
// has. An I/O loop (watchers, HTTP, inotify, health probes, shared-member timers) and a
// worker for CPU work off that loop (routing-table rebuilds). Everything that grows with
// the number of upstreams is data on these two threads.
#pragma once

#include <dynup/result.hpp>
#include <dynup/runtime/loop.hpp>
#include <dynup/version.hpp>

#include <pthread.h>
#include <unistd.h>

#include <condition_variable>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <system_error>
#include <thread>
#include <typeindex>
#include <unordered_map>
#include <utility>
#include <vector>

DYNUP_NAMESPACE_BEGIN
namespace rt {

/// A thread that runs CPU work in order (rebuilding routing tables), so the loop never
/// waits on it. Thread-safe; the destructor drops what is still queued and joins.
class Worker {
public:
  Worker() : thread_([this] { run(); }) {}
  ~Worker() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
  }
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  /// Queues `t`; tasks run one at a time in the order posted. Exceptions are dropped.
  void post(Task t) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      queue_.push_back(std::move(t));
    }
    cv_.notify_one();
  }

  bool on_worker() const noexcept { return std::this_thread::get_id() == thread_.get_id(); }

  /// Runs `t` on the worker and waits (or runs it at once on the worker itself).
  void run_sync(const Task& t) {
    if (on_worker()) {
      t();
      return;
    }
    std::mutex m;
    std::condition_variable cv;
    bool done = false;
    post([&] {
      t();
      std::lock_guard<std::mutex> lock(m);
      done = true;
      cv.notify_one();
    });
    std::unique_lock<std::mutex> lock(m);
    cv.wait(lock, [&] { return done; });
  }

private:
  void run() {
    ::pthread_setname_np(::pthread_self(), "dynup-worker");
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      cv_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
      if (stopping_) return;
      Task t = std::move(queue_.front());
      queue_.pop_front();
      lock.unlock();
      try {
        t();
      } catch (...) {
      }
      lock.lock();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Task> queue_;
  bool stopping_ = false;
  std::thread thread_;
};

/// The process's dynup threads, shared by every upstream, watcher and checker.
///
/// acquire() returns the process's runtime, creating it on first use; the threads stop
/// when the last holder lets go, so a process with no dynup object runs no dynup thread
/// (and a fork copies none). A child process after fork() gets a runtime of its own: the
/// parent's threads do not exist there. Services (the HTTP client, the inotify
/// instance) are created on first use and live as long as the runtime.
class Runtime {
public:
  /// The process's runtime. Errors: Errc::io_error when the kernel refuses a thread or
  /// a descriptor (EMFILE, EAGAIN), with its text.
  static Result<std::shared_ptr<Runtime>> acquire() {
    static std::mutex mu;
    static std::weak_ptr<Runtime>* current = new std::weak_ptr<Runtime>(); // never destroyed
    static pid_t owner = 0;
    std::lock_guard<std::mutex> lock(mu);
    if (owner == ::getpid()) {
      if (auto rt = current->lock()) return rt;
    } else if (owner != 0) {
      // A forked child: the parent's runtime has no threads here. Its holders in this
      // process are broken either way; leave it to them and start afresh.
      *current = std::weak_ptr<Runtime>();
    }
    try {
      // The last holder may let go on the loop or the worker, which cannot join
      // themselves: then a short-lived thread does the stopping.
      std::shared_ptr<Runtime> rt(new Runtime(), [](Runtime* r) {
        if (r->loop_.in_loop() || r->worker_.on_worker())
          std::thread([r] { delete r; }).detach();
        else
          delete r;
      });
      *current = rt;
      owner = ::getpid();
      return rt;
    } catch (const std::system_error& e) {
      return Error(Errc::io_error, std::string("cannot start dynup's runtime: ") + e.what());
    }
  }

  ~Runtime() {
    // Services may hold loop resources: drop them on the loop before it stops.
    // Newest first: a service made with another's help goes before its helper.
    loop_.run_sync([this] {
      std::lock_guard<std::recursive_mutex> lock(services_mu_);
      while (!order_.empty()) {
        services_.erase(order_.back());
        order_.pop_back();
      }
    });
  }
  Runtime(const Runtime&) = delete;
  Runtime& operator=(const Runtime&) = delete;

  Loop& loop() noexcept { return loop_; }
  Worker& worker() noexcept { return worker_; }

  /// The runtime's one instance of service `S`, made by `S(Runtime&)` on first use.
  /// Thread-safe; S's constructor may ask for other services. `S` lives until the runtime
  /// ends and is destroyed on the loop's thread, newest service first.
  template <class S> S& service() {
    std::lock_guard<std::recursive_mutex> lock(services_mu_);
    const std::type_index key(typeid(S));
    if (auto it = services_.find(key); it != services_.end()) return *static_cast<S*>(it->second.get());
    std::shared_ptr<void> made(new S(*this), [](void* p) { delete static_cast<S*>(p); });
    services_.emplace(key, made);
    order_.push_back(key);
    return *static_cast<S*>(made.get());
  }

  /// Threads the runtime runs: the loop and the worker.
  static constexpr int threads = 2;

private:
  Runtime() = default;

  Loop loop_;
  Worker worker_;
  std::recursive_mutex services_mu_; // a service may use another in its constructor
  std::unordered_map<std::type_index, std::shared_ptr<void>> services_;
  std::vector<std::type_index> order_; // creation order, finished constructions first
};

} // namespace rt
DYNUP_NAMESPACE_END
