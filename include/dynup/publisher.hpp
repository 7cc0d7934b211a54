// Publisher: RCU-style publication of immutable peer sets inside one process.
#pragma once

#include <dynup/detail/rcu.hpp>
#include <dynup/peer_set.hpp>
#include <dynup/version.hpp>

#include <cstdint>
#include <memory>
#include <mutex>

DYNUP_NAMESPACE_BEGIN

/// A published set. Holding one keeps that set alive across later publishes.
using Snapshot = std::shared_ptr<const PeerSet>;

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
  Publisher() : cell_(std::make_shared<const PeerSet>()) {}

  Publisher(const Publisher&) = delete;
  Publisher& operator=(const Publisher&) = delete;

  /// The current set (an empty set with version 0 before the first publish); never null.
  /// The reference stays valid until this thread calls snapshot() on this publisher
  /// again; copy it to hold the set longer. noexcept except for the one-time growth of
  /// this thread's cache, which allocates on a thread's first read of a publisher.
  const Snapshot& snapshot() const { return cell_.get(); }

  /// The current set, read under the lock; for callers that want to keep a reference.
  Snapshot current() const { return cell_.load(); }

  /// The current version (0 before the first publish). One atomic load.
  std::uint64_t version() const noexcept { return cell_.version(); }

  /// Makes `set` current unless its content equals the current set's. Assigns the next
  /// version. O(1) apart from the content comparison when the hashes are equal.
  PublishOutcome publish(PeerSet set) {
    std::lock_guard<std::mutex> lock(mu_);
    Snapshot current = cell_.load();
    if (cell_.version() != 0 && set.same_content(*current)) return {false, current->version()};
    // One store per published set, so the cell's store count is the set's version.
    set.version_ = current->version() + 1;
    const std::uint64_t v = set.version_;
    cell_.store(std::make_shared<const PeerSet>(std::move(set)));
    // `current` still holds the previous set; it is freed on return unless a reader or a
    // thread cache still holds it.
    return {true, v};
  }

private:
  std::mutex mu_; // one publish at a time: the content check and the store together
  detail::RcuCell<PeerSet> cell_;
};

DYNUP_NAMESPACE_END
