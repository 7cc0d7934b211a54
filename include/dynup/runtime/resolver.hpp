// Resolver: DNS lookups off the runtime loop. getaddrinfo blocks, and on the loop a
// slow resolver would stall every upstream of the process; here it blocks only a small
// helper thread, and the answer comes back to the loop as a posted task.
#pragma once

#include <dynup/runtime/loop.hpp>
#include <dynup/runtime/runtime.hpp>
#include <dynup/version.hpp>

#include <netdb.h>
#include <pthread.h>
#include <sys/socket.h>

#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#ifndef DYNUP_RESOLVER_THREADS
// Lookups that run at once, across the process; more wait in order. Started on demand,
// so a process that only names IP literals runs none.
#define DYNUP_RESOLVER_THREADS 2
#endif
static_assert(DYNUP_RESOLVER_THREADS >= 1, "DYNUP_RESOLVER_THREADS: at least one lookup at a time");

DYNUP_NAMESPACE_BEGIN
namespace rt {

/// The first address getaddrinfo gives for a name, or why there is none.
struct Resolved {
  sockaddr_storage addr{};
  socklen_t len = 0;
  std::string error; ///< empty on success; else the resolver's text ("Name or service not known")
  bool ok() const noexcept { return error.empty(); }
};

/// A runtime service (Runtime::service<Resolver>()) that runs getaddrinfo on at most
/// DYNUP_RESOLVER_THREADS helper threads, started when the first lookup waits for one
/// and kept until the runtime ends.
///
/// Threads: resolve() from any thread; `done` runs on the loop's thread. A slow resolver
/// delays only the lookups queued behind it, never the loop. Ending (on the loop, with
/// the runtime) drops queued lookups without calling them; a lookup under way cannot be
/// interrupted, so its thread is left to finish alone and its answer is dropped.
/// Allocates per lookup.
class Resolver {
public:
  using Done = std::function<void(Resolved)>;

  explicit Resolver(Runtime& runtime) : loop_(runtime.loop()), state_(std::make_shared<State>()) {
    threads_.reserve(DYNUP_RESOLVER_THREADS); // so starting one never reallocates
  }

  ~Resolver() {
    std::vector<std::thread> idle;
    {
      std::lock_guard<std::mutex> lock(state_->mu);
      state_->stopping = true;
      state_->jobs.clear();
      for (std::size_t i = 0; i < threads_.size(); ++i) {
        // Joining a thread inside getaddrinfo could take seconds: leave it to end alone.
        if (state_->busy[i])
          threads_[i].detach();
        else
          idle.push_back(std::move(threads_[i]));
      }
    }
    state_->cv.notify_all();
    for (auto& t : idle) t.join();
  }
  Resolver(const Resolver&) = delete;
  Resolver& operator=(const Resolver&) = delete;

  /// Looks `host` up (any family, first address, `port` in it) and posts `done` with the
  /// answer to the loop. `done` may instead be destroyed, uncalled, on a resolver thread
  /// or the loop when the runtime ends: hold only weak references in it. If no helper
  /// thread can be started, `done` gets that error. Never blocks on a lookup.
  void resolve(std::string host, std::uint16_t port, Done done) {
    std::unique_lock<std::mutex> lock(state_->mu);
    if (state_->stopping) return;
    state_->jobs.push_back({std::move(host), port, std::move(done)});
    if (state_->jobs.size() > state_->idle && threads_.size() < DYNUP_RESOLVER_THREADS) {
      try {
        threads_.emplace_back(&Resolver::run, state_, &loop_, threads_.size());
        ++state_->idle;
      } catch (const std::system_error& e) {
        if (threads_.empty()) {
          Job job = std::move(state_->jobs.back());
          state_->jobs.pop_back();
          lock.unlock();
          Resolved r;
          r.error = std::string("cannot start a resolver thread: ") + e.what();
          loop_.post([d = std::move(job.done), r = std::move(r)]() mutable { d(std::move(r)); });
          return;
        } // else the running threads take it in turn
      }
    }
    lock.unlock();
    state_->cv.notify_one();
  }

  /// getaddrinfo for a stream socket, first address. Blocks. Any thread.
  static Resolved lookup(const std::string& host, std::uint16_t port) {
    Resolved r;
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV;
    addrinfo* found = nullptr;
    int rc = ::getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &found);
    if (rc == 0 && found && found->ai_addrlen <= sizeof r.addr) {
      std::memcpy(&r.addr, found->ai_addr, found->ai_addrlen);
      r.len = found->ai_addrlen;
    } else {
      r.error = rc == EAI_SYSTEM ? std::generic_category().message(errno) : rc != 0 ? ::gai_strerror(rc) : "no address";
    }
    if (found) ::freeaddrinfo(found);
    return r;
  }

private:
  struct Job {
    std::string host;
    std::uint16_t port;
    Done done;
  };

  // Shared with the threads, which may outlive the Resolver while a lookup finishes.
  struct State {
    std::mutex mu;
    std::condition_variable cv;
    std::deque<Job> jobs;
    std::size_t idle = 0;
    bool busy[DYNUP_RESOLVER_THREADS] = {};
    bool stopping = false;
  };

  static void run(std::shared_ptr<State> st, Loop* loop, std::size_t me) {
    ::pthread_setname_np(::pthread_self(), "dynup-resolver");
    std::unique_lock<std::mutex> lock(st->mu);
    for (;;) {
      st->cv.wait(lock, [&] { return st->stopping || !st->jobs.empty(); });
      if (st->stopping) return;
      Job job = std::move(st->jobs.front());
      st->jobs.pop_front();
      --st->idle;
      st->busy[me] = true;
      lock.unlock();
      Resolved r = lookup(job.host, job.port);
      lock.lock();
      st->busy[me] = false;
      ++st->idle;
      // Posting under the lock: once the Resolver has ended (stopping), the loop may be
      // gone, and the destructor takes this lock before it returns.
      if (!st->stopping) {
        try {
          loop->post([d = std::move(job.done), r = std::move(r)]() mutable { d(std::move(r)); });
        } catch (...) {
          // Out of memory: the answer is lost, like a lookup the runtime's end dropped.
        }
      }
      if (st->stopping) return;
    }
  }

  Loop& loop_;
  std::shared_ptr<State> state_;
  std::vector<std::thread> threads_; // guarded by state_->mu
};

} // namespace rt
DYNUP_NAMESPACE_END
