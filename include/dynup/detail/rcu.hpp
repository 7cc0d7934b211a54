// RcuCell<T>: one immutable T published to many reader threads, read with one atomic
// load and a thread-local lookup when nothing changed. The Publisher publishes peer sets
// through it, the Upstream its routing tables.
#pragma once

#include <dynup/detail/slots.hpp>
#include <dynup/version.hpp>

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

DYNUP_NAMESPACE_BEGIN
namespace detail {

template <class T> class RcuCell {
public:
  using Ptr = std::shared_ptr<const T>;

  explicit RcuCell(Ptr initial) : generation_(next_generation()), slot_(numbers().acquire()), current_(std::move(initial)) {}
  ~RcuCell() { numbers().release(slot_); }
  RcuCell(const RcuCell&) = delete;
  RcuCell& operator=(const RcuCell&) = delete;

  /// The current value. The reference stays valid until this thread calls get() on this
  /// cell again; copy it to hold the value longer. noexcept after a thread's first read
  /// of a cell (which grows its cache).
  const Ptr& get() const {
    auto& slots = cache();
    if (slot_ < slots.size()) {
      Slot& s = *slots[slot_];
      if (s.owner == generation_ && s.version == version_.load(std::memory_order_acquire)) return s.value;
    }
    return refresh();
  }

  /// The current value, read under the lock.
  Ptr load() const {
    std::lock_guard<std::mutex> lock(mu_);
    return current_;
  }

  /// How many times store() ran: 0 for the initial value. One atomic load (acquire).
  std::uint64_t version() const noexcept { return version_.load(std::memory_order_acquire); }

  /// Makes `next` current. Any thread; serialized by a mutex.
  void store(Ptr next) {
    std::lock_guard<std::mutex> lock(mu_);
    current_.swap(next);
    version_.fetch_add(1, std::memory_order_acq_rel);
    // `next` (the previous value) is released on return unless a reader still holds it.
  }

private:
  struct Slot {
    std::uint64_t owner = 0;
    std::uint64_t version = 0;
    Ptr value;
  };

  static std::vector<std::unique_ptr<Slot>>& cache() noexcept {
    static thread_local std::vector<std::unique_ptr<Slot>> slots;
    return slots;
  }
  static SlotNumbers& numbers() {
    // Never destroyed: objects in static storage (an embedder's global publisher) may
    // release their number after other statics are gone.
    static SlotNumbers* n = new SlotNumbers;
    return *n;
  }

  const Ptr& refresh() const {
    auto& slots = cache();
    while (slots.size() <= slot_) slots.push_back(std::make_unique<Slot>());
    Slot& s = *slots[slot_];
    Ptr fresh;
    std::uint64_t version;
    {
      std::lock_guard<std::mutex> lock(mu_);
      fresh = current_;
      version = version_.load(std::memory_order_relaxed);
    }
    s.owner = generation_;
    s.version = version;
    s.value.swap(fresh); // `fresh` drops this thread's previous value, unlocked
    return s.value;
  }

  const std::uint64_t generation_;
  const std::size_t slot_;
  mutable std::mutex mu_;
  Ptr current_;
  std::atomic<std::uint64_t> version_{0};
};

} // namespace detail
DYNUP_NAMESPACE_END
