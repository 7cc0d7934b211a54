// Small dense numbers for objects that keep per-thread state in thread-local arrays
// (publisher caches, round-robin positions), plus never-reused generations so a thread
// can tell a recycled number from the object it last saw.
#pragma once

#include <dynup/version.hpp>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <vector>

DYNUP_NAMESPACE_BEGIN
namespace detail {

/// Hands out small numbers, recycled ones first; thread-safe (a mutex: construction and
/// destruction time only).
class SlotNumbers {
public:
  std::size_t acquire() {
    std::lock_guard<std::mutex> lock(mu_);
    if (!free_.empty()) {
      std::size_t n = free_.back();
      free_.pop_back();
      return n;
    }
    return next_++;
  }
  void release(std::size_t n) {
    std::lock_guard<std::mutex> lock(mu_);
    free_.push_back(n);
  }

private:
  std::mutex mu_;
  std::vector<std::size_t> free_;
  std::size_t next_ = 0;
};

inline std::uint64_t next_generation() noexcept {
  static std::atomic<std::uint64_t> next{1};
  return next.fetch_add(1, std::memory_order_relaxed);
}

} // namespace detail
DYNUP_NAMESPACE_END
