// Publisher: RCU-style publication of immutable peer sets inside one process.
#pragma once

#include <dynup/detail/slots.hpp>
#include <dynup/peer_set.hpp>
#include <dynup/version.hpp>

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

DYNUP_NAMESPACE_BEGIN

/// A published set. Holding one keeps that set alive across later publishes.
using Snapshot = std::shared_ptr<const PeerSet>;

namespace detail {

// A thread's cached view of one publisher. `owner` is the publisher's unique
// generation, so a slot left behind by a destroyed publisher never matches a new one.
struct SnapshotCacheSlot {
  std::uint64_t owner = 0;
  std::uint64_t version = 0;
  Snapshot set;
};

// Slots are indexed by a small per-publisher number that is recycled when a publisher
// dies; the unique_ptr keeps each slot's address stable while the vector grows.
inline std::vector<std::unique_ptr<SnapshotCacheSlot>>& snapshot_cache() noexcept {
  static thread_local std::vector<std::unique_ptr<SnapshotCacheSlot>> slots;
  return slots;
}

inline SlotNumbers& publisher_slots() {
  // Never destroyed: objects in static storage (an embedder's global policy or
  // publisher) may release their number after other statics are gone.
  static SlotNumbers* numbers = new SlotNumbers;
  return *numbers;
}

} // namespace detail

/// What `publish` did.
struct PublishOutcome {
  bool published = false;    ///< false when the content equals the current set
  std::uint64_t version = 0; ///< the version now current
};

/// Publishes immutable PeerSets to any number of reader threads.
///
/// Readers: `snapshot()` costs one atomic load plus a thread-local lookup when nothing
/// changed, and writes nothing shared, so reader threads do not contend. After a
/// publish, each thread's next `snapshot()` takes a mutex once to refresh its cache.
/// A set stays alive while anyone holds a Snapshot to it; a thread's cache holds the
/// set it last saw until that thread's next `snapshot()` call on this publisher (or
/// thread exit).
///
/// Writers: `publish` is serialized internally and may be called from any thread.
/// Versions start at 1 and increase by one per published set; a set whose content
/// equals the current one is not published.
class Publisher {
public:
  Publisher()
      : generation_(detail::next_generation()),
        slot_(detail::publisher_slots().acquire()),
        current_(std::make_shared<const PeerSet>()) {}

  ~Publisher() { detail::publisher_slots().release(slot_); }

  Publisher(const Publisher&) = delete;
  Publisher& operator=(const Publisher&) = delete;

  /// The current set (an empty set with version 0 before the first publish); never null.
  /// The reference stays valid until this thread calls snapshot() on this publisher
  /// again; copy it to hold the set longer. noexcept except for the one-time growth of
  /// this thread's cache, which allocates on a thread's first read of a publisher.
  const Snapshot& snapshot() const {
    auto& slots = detail::snapshot_cache();
    if (slot_ < slots.size()) {
      detail::SnapshotCacheSlot& s = *slots[slot_];
      if (s.owner == generation_ && s.version == version_.load(std::memory_order_acquire))
        return s.set;
    }
    return refresh();
  }

  /// The current set, read under the lock; for callers that want to keep a reference.
  Snapshot current() const {
    std::lock_guard<std::mutex> lock(mu_);
    return current_;
  }

  /// The current version (0 before the first publish). One atomic load.
  std::uint64_t version() const noexcept { return version_.load(std::memory_order_acquire); }

  /// Makes `set` current unless its content equals the current set's. Assigns the next
  /// version. O(1) apart from the content comparison when the hashes are equal.
  PublishOutcome publish(PeerSet set) {
    std::lock_guard<std::mutex> lock(mu_);
    if (version_.load(std::memory_order_relaxed) != 0 && set.same_content(*current_))
      return {false, current_->version()};
    set.version_ = current_->version() + 1;
    std::uint64_t v = set.version_;
    Snapshot next = std::make_shared<const PeerSet>(std::move(set));
    current_.swap(next);
    version_.store(v, std::memory_order_release);
    // `next` now holds the previous set; it is freed on return unless a reader or a
    // thread cache still holds it.
    return {true, v};
  }

private:
  const Snapshot& refresh() const {
    auto& slots = detail::snapshot_cache();
    while (slots.size() <= slot_) slots.push_back(std::make_unique<detail::SnapshotCacheSlot>());
    detail::SnapshotCacheSlot& s = *slots[slot_];
    Snapshot fresh;
    {
      std::lock_guard<std::mutex> lock(mu_);
      fresh = current_;
    }
    s.owner = generation_;
    s.version = fresh->version();
    s.set.swap(fresh); // `fresh` takes this thread's previous set and drops it, unlocked
    return s.set;
  }

  const std::uint64_t generation_;
  const std::size_t slot_;
  mutable std::mutex mu_;
  Snapshot current_;
  std::atomic<std::uint64_t> version_{0};
};

DYNUP_NAMESPACE_END
