// TaskGate: lets the tasks and timers an object hands to the shared runtime (rt::Loop,
// rt::Worker) run only while the object lives, without a thread of its own to join.
#pragma once

#include <dynup/version.hpp>

#include <condition_variable>
#include <mutex>

DYNUP_NAMESPACE_BEGIN
namespace detail {

/// The "alive" state an object shares with the callbacks it posts: each callback runs
/// its body through enter(), and the object's stop calls close(), which bars later
/// entries and waits for the bodies inside to leave. Held by std::shared_ptr by the
/// object and by every task it posted, so a task that runs after the object is gone
/// finds the gate closed and touches nothing.
///
/// Threads: any. close() from inside a body (a callback stopping its own object) does
/// not wait for the bodies this thread is running, only for the other threads' ones:
/// no self-deadlock. Costs: enter() takes the gate's mutex twice, no allocation; close()
/// waits as long as the longest body running on another thread.
class TaskGate {
public:
  TaskGate() = default;
  TaskGate(const TaskGate&) = delete;
  TaskGate& operator=(const TaskGate&) = delete;

  /// Runs `body()` unless the gate is closed; returns whether it ran. An exception from
  /// `body` leaves the gate and propagates.
  template <class F> bool enter(F&& body) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (closed_) return false;
      ++inside_;
    }
    Frame frame{this, top()};
    top() = &frame;
    struct Leave {
      TaskGate* gate;
      Frame* frame;
      ~Leave() {
        top() = frame->up;
        std::lock_guard<std::mutex> lock(gate->mu_);
        --gate->inside_;
        if (gate->closed_) gate->cv_.notify_all(); // close() is waiting
      }
    } leave{this, &frame};
    body();
    return true;
  }

  /// Bars every later enter() and waits until no other thread runs a body. Idempotent.
  void close() noexcept {
    int mine = 0; // bodies this thread is inside: close() was called from one of them
    for (const Frame* f = top(); f != nullptr; f = f->up)
      if (f->gate == this) ++mine;
    std::unique_lock<std::mutex> lock(mu_);
    closed_ = true;
    cv_.wait(lock, [&] { return inside_ == mine; });
  }

  bool closed() const noexcept {
    std::lock_guard<std::mutex> lock(mu_);
    return closed_;
  }

private:
  // The gates this thread is inside, innermost first: a linked list on its stack.
  struct Frame {
    const TaskGate* gate;
    Frame* up;
  };
  static Frame*& top() noexcept {
    static thread_local Frame* innermost = nullptr;
    return innermost;
  }

  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool closed_ = false;
  int inside_ = 0;
};

} // namespace detail
DYNUP_NAMESPACE_END
