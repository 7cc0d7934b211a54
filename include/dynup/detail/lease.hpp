// LeaseCount: how many holders an object published through an RcuCell still has,
// counted without a locked instruction on the request path. Each thread counts the
// leases it takes and the leases it returns in its own cache line of the object (it is
// the only writer of that line), so request threads never contend and never pay for an
// atomic read-modify-write (a shared_ptr copy per request would do both: one reference
// count that every core writes).
//
// The owner decides when the object is free: once nobody can take a new lease (it is
// no longer current and no thread's RcuCell cache holds it), and every lease taken has
// been returned. See Upstream::sweep for the reasoning about visibility.
#pragma once

#include <dynup/detail/slots.hpp>
#include <dynup/version.hpp>

#include <atomic>
#include <cstddef>
#include <cstdint>

DYNUP_NAMESPACE_BEGIN
namespace detail {

/// A small number per live thread, recycled when the thread exits (so the numbers stay
/// dense however many short-lived threads come and go).
inline std::size_t thread_number() noexcept {
  static SlotNumbers* numbers = new SlotNumbers; // never destroyed: threads exit after main
  struct Holder {
    std::size_t n;
    Holder() : n(numbers->acquire()) {}
    ~Holder() { numbers->release(n); }
  };
  static thread_local Holder mine;
  return mine.n;
}

class LeaseCount {
public:
  /// Threads numbered below this count in their own line; others share one atomic pair.
  static constexpr std::size_t thread_lines = 64;

  /// Takes a lease. The caller must hold a reference that keeps the object alive (its
  /// RcuCell cache): that reference's release is what publishes this count to idle().
  void acquire() noexcept {
    const std::size_t k = thread_number();
    if (k < thread_lines) {
      auto& c = line_[k].acquired;
      c.store(c.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
    } else {
      overflow_acquired_.fetch_add(1, std::memory_order_relaxed);
    }
  }

  /// Returns a lease (from any thread). The object may be freed as soon as this returns.
  void release() noexcept {
    const std::size_t k = thread_number();
    if (k < thread_lines) {
      auto& c = line_[k].released;
      c.store(c.load(std::memory_order_relaxed) + 1, std::memory_order_release);
    } else {
      overflow_released_.fetch_add(1, std::memory_order_release);
    }
  }

  /// Every lease taken has been returned. Exact only once no thread can take a lease
  /// any more and the caller has synchronized with the release of the last reference
  /// through which one could be taken; until then it may say false, never wrongly true
  /// for leases it can see. A return not yet visible makes it false: ask again later.
  bool idle() const noexcept {
    std::uint64_t taken = overflow_acquired_.load(std::memory_order_relaxed);
    std::uint64_t returned = overflow_released_.load(std::memory_order_acquire);
    for (const Line& l : line_) {
      taken += l.acquired.load(std::memory_order_relaxed);
      returned += l.released.load(std::memory_order_acquire);
    }
    return taken == returned;
  }

private:
  struct alignas(64) Line {
    std::atomic<std::uint64_t> acquired{0}; ///< written by its thread only
    std::atomic<std::uint64_t> released{0}; ///< written by its thread only
  };
  Line line_[thread_lines];
  std::atomic<std::uint64_t> overflow_acquired_{0};
  std::atomic<std::uint64_t> overflow_released_{0};
};

} // namespace detail
DYNUP_NAMESPACE_END
