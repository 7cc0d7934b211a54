// SharedRegion: cross-process publication of the current peer set for multi-process
// servers (nginx workers). One leader (see leader_lock.hpp) writes each new set into a
// file-backed shared mapping; every process notices a change with one atomic load of the
// region version and decodes the set into its own local cache.
//
// File `<dir>/<name>.dynup` (mode 0600; `B` = capacity rounded up to 8 bytes):
//
//   offset  bytes  field
//   0       8      magic "DYNUPSHM"
//   8       4      layout version (1), native byte order
//   12      4      header bytes (4096)
//   16      8      capacity: payload bytes per buffer
//   64      8      version (atomic): last published region version; 0 = never written
//   128     40     slot 0 (atomics): seq, version, source_index, length, crc32
//   192     40     slot 1, same fields
//   4096    B      buffer 0: the set as peer JSON (peer_json.hpp), zero-padded to 8 bytes
//   4096+B  B      buffer 1
//
// Write protocol (one writer): version N goes into slot N % 2, the one readers are not
// sent to. The writer makes that slot's seq odd, stores metadata and payload words, makes
// seq even again, then publishes N in the version word. A reader loads the version, reads
// the slot's seq (even), copies metadata and payload, and accepts the copy only if seq is
// unchanged and the slot holds version N; the copy can only tear when the writer laps it
// (two writes during one copy), and then it retries. Every shared access is an atomic:
// stores are releases and loads acquires, so a reader that sees any byte of a newer write
// also sees that write's odd seq (race-free in the C++ model, and clean under TSan when the
// writer and readers are threads of one process). A writer that dies mid-write leaves only
// the unpublished slot odd; the next writer (the next leader) reuses it.
//
// A worker's use, per pick and per leader period:
//   if (region.version() != seen) if (auto s = region.read()) { publish(s->set); seen = s->version; }
//   if (lock.try_acquire() && watcher_has_new_set) region.write(set);
#pragma once

#include <dynup/detail/crc32.hpp>
#include <dynup/detail/fs.hpp>
#include <dynup/leader_lock.hpp>
#include <dynup/peer_json.hpp>
#include <dynup/peer_set.hpp>
#include <dynup/result.hpp>
#include <dynup/version.hpp>

#include <fcntl.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <new>
#include <string>
#include <vector>
#include <thread>
#include <utility>

#ifndef DYNUP_SHARED_READ_SPINS
// read() attempts made back to back before sleeping: a copy fails only when the writer
// laps it, so a second attempt almost always succeeds.
#define DYNUP_SHARED_READ_SPINS 1000
#endif

#ifndef DYNUP_SHARED_READ_SLEEPS
// Further attempts after sleeps of 50 µs, 100 µs, … (doubling; 8 sleeps ≈ 13 ms in all),
// before read() gives up with Errc::timeout.
#define DYNUP_SHARED_READ_SLEEPS 8
#endif

DYNUP_NAMESPACE_BEGIN

// The version word is shared by processes, so its operations must not depend on a lock
// in one process's memory; lock-free atomics are also address-free.
static_assert(std::atomic<std::uint64_t>::is_always_lock_free, "shared regions need lock-free 64-bit atomics");
static_assert(sizeof(std::atomic<std::uint64_t>) == 8 && alignof(std::atomic<std::uint64_t>) == 8,
              "the region layout assumes 8-byte atomics");

namespace detail {
namespace region_layout {

inline constexpr char magic[8] = {'D', 'Y', 'N', 'U', 'P', 'S', 'H', 'M'};
inline constexpr std::uint32_t layout_version = 1;
inline constexpr std::size_t header_bytes = 4096;
inline constexpr std::size_t layout_at = 8;
inline constexpr std::size_t header_bytes_at = 12;
inline constexpr std::size_t capacity_at = 16;
inline constexpr std::size_t version_at = 64;
inline constexpr std::size_t slot_at[2] = {128, 192};
// Word offsets inside a slot.
inline constexpr std::size_t seq_word = 0;
inline constexpr std::size_t version_word = 8;
inline constexpr std::size_t source_index_word = 16;
inline constexpr std::size_t length_word = 24;
inline constexpr std::size_t crc_word = 32;
inline constexpr std::size_t min_capacity = 1024;
inline constexpr std::size_t max_capacity = std::size_t{1} << 30;

/// Bytes between the two buffers: the capacity rounded up to whole 8-byte words.
constexpr std::size_t stride(std::size_t capacity) noexcept { return (capacity + 7) / 8 * 8; }
constexpr std::size_t file_bytes(std::size_t capacity) noexcept { return header_bytes + 2 * stride(capacity); }
constexpr std::size_t buffer_at(std::size_t capacity, std::size_t slot) noexcept {
  return header_bytes + slot * stride(capacity);
}

} // namespace region_layout

/// "7b 22 70 65" for the first bytes of a file, for errors about what was found.
inline std::string hex_bytes(const unsigned char* p, std::size_t n) {
  std::string out;
  char b[4];
  for (std::size_t i = 0; i < n; ++i) {
    std::snprintf(b, sizeof b, "%02x", p[i]);
    out += (i ? " " : "") + std::string(b);
  }
  return out;
}

/// Validates the first bytes (`got` of them) of an existing region file of `size` bytes
/// against what this process asked for. Errors say what was found and what to do.
inline Result<void> check_region_header(const unsigned char* head, std::size_t got, std::uint64_t size,
                                        std::size_t capacity, const std::string& path) {
  namespace L = region_layout;
  if (got < sizeof L::magic || std::memcmp(head, L::magic, sizeof L::magic) != 0)
    return Error(Errc::corrupt, path + " is not a dynup region: it starts with \"" +
                                    hex_bytes(head, std::min(got, sizeof L::magic)) +
                                    "\" (hex), not the magic \"DYNUPSHM\"; remove it or choose another name");
  if (size < L::header_bytes || got < L::capacity_at + 8)
    return Error(Errc::corrupt, path + " is " + std::to_string(size) + " bytes, shorter than the " +
                                    std::to_string(L::header_bytes) + "-byte region header (truncated)");
  std::uint32_t layout = 0, header = 0;
  std::uint64_t found_capacity = 0;
  std::memcpy(&layout, head + L::layout_at, 4);
  std::memcpy(&header, head + L::header_bytes_at, 4);
  std::memcpy(&found_capacity, head + L::capacity_at, 8);
  if (layout != L::layout_version)
    return Error(Errc::unsupported, path + " has region layout " + std::to_string(layout) +
                                        "; this build reads layout " + std::to_string(L::layout_version) +
                                        ": run one dynup version per region, or use another name");
  if (header != L::header_bytes)
    return Error(Errc::corrupt, path + " declares a " + std::to_string(header) + "-byte header; layout " +
                                    std::to_string(L::layout_version) + " has " +
                                    std::to_string(L::header_bytes));
  if (found_capacity != capacity)
    return Error(Errc::invalid_argument,
                 path + " holds " + std::to_string(found_capacity) + " bytes per buffer, but capacity " +
                     std::to_string(capacity) +
                     " was requested: give every process the same capacity, or remove the file once "
                     "no process uses it");
  if (size != L::file_bytes(capacity))
    return Error(Errc::corrupt, path + " is " + std::to_string(size) + " bytes; a region of capacity " +
                                    std::to_string(capacity) + " is " +
                                    std::to_string(L::file_bytes(capacity)) + " (truncated or extended)");
  return {};
}

/// Takes (without waiting) a lock of `type` (F_RDLCK, F_WRLCK) on byte 0 of `fd`'s open
/// file description: Linux's OFD locks, which neither flock(2) nor another description
/// of the same file shares. false with errno set when another description holds a
/// conflicting lock (EAGAIN) or the call fails.
inline bool ofd_lock(int fd, short type) {
  struct flock fl {};
  fl.l_type = type;
  fl.l_whence = SEEK_SET;
  fl.l_start = 0;
  fl.l_len = 1;
  return ::fcntl(fd, F_OFD_SETLK, &fl) == 0;
}

/// Unlocks and closes a file descriptor on scope exit. The explicit LOCK_UN matters: a
/// mapping keeps the open file description alive, and with it any flock taken through it.
struct LockedFd {
  int fd;
  ~LockedFd() {
    if (fd < 0) return;
    ::flock(fd, LOCK_UN);
    ::close(fd);
  }
};

} // namespace detail

/// Where a SharedRegion lives and how much it holds.
struct SharedRegionOptions {
  /// Directory of `<name>.dynup`; a tmpfs (the default) keeps the region in memory.
  std::string dir = "/dev/shm";
  /// 1..64 characters of [A-Za-z0-9_.-]; every process of one upstream uses the same.
  std::string name;
  /// Payload bytes per buffer (the file holds two plus a 4 KiB header); 1 KiB..1 GiB.
  /// Every process must use the same value; a set whose JSON is larger is refused.
  std::size_t capacity = std::size_t{1} << 20;
  /// Remove the file when its last user closes it, and with it `companions` (paths of
  /// files that belong to the region, such as its leader lock): see SharedRegion.
  bool remove_when_unused = false;
  std::vector<std::string> companions;
};

/// A set read from a region.
struct SharedSnapshot {
  PeerSet set;                    ///< decoded peers; set.version() is 0 (a local Publisher assigns its own)
  std::uint64_t version = 0;      ///< the region version it was written as (not set.version())
  std::uint64_t source_index = 0; ///< the registry index the writer saw, equal to set.source_index()
};

/// A named shared-memory region holding the current peer set of one upstream.
///
/// Thread- and process-safety: version() and read() may run in any number of threads and
/// processes concurrently with a write(). write() calls must not overlap: only the process
/// that holds the upstream's LeaderLock writes, from one thread at a time. The region
/// version counts writes; it lives in the file, so it keeps increasing across writers,
/// leader changes and reopenings (until the file is removed).
///
/// Lifetime: move-only; the destructor unmaps. The file stays for other processes; with
/// `remove_when_unused`, the last user to close it removes it (and its companions), so
/// regions do not pile up in /dev/shm. Every user holds a shared lock on the file for as
/// long as it has it open (a read lock on its first byte, OFD-style); a closing user that
/// can turn that into a write lock without waiting is the last, and removes the file
/// while holding the flock that serializes opens and closes. An open that
/// raced with such a removal finds its file unlinked and starts again, so it never ends
/// up on a removed file. Only the process that opened a region removes it: a copy
/// inherited across fork shares the opener's lock and closes without removing (and the
/// opener should not close it while the child still uses it). A mapping inherited across
/// fork stays shared and usable in the child. A moved-from region may only be destroyed
/// or assigned to. Removing the file while processes use it
/// splits them (old ones keep the old mapping); change the capacity only by restarting
/// every process with the new one after removing the file.
class SharedRegion {
public:
  static constexpr std::size_t default_capacity = std::size_t{1} << 20;

  /// Creates `<dir>/<name>.dynup` (mode 0600, space reserved with posix_fallocate so a
  /// full tmpfs fails here, not with SIGBUS later) or attaches to the existing one; opens
  /// racing in several processes are serialized with a flock on the file. Never reuses
  /// a foreign file: a bad magic, another layout version, another capacity or size, a
  /// symbolic link, or a file owned by another user or writable by others is an error
  /// that says what was found. Bad options: Errc::invalid_argument naming the field.
  /// A file left all-zero by a creator that died mid-way is initialized. Allocates.
  static Result<SharedRegion> open(const SharedRegionOptions& options) {
    namespace L = detail::region_layout;
    if (auto ok = detail::check_shared_name(options.name); !ok) return ok.error();
    if (options.dir.empty()) return Error(Errc::invalid_argument, "dir: is empty");
    if (options.capacity < L::min_capacity || options.capacity > L::max_capacity)
      return Error(Errc::invalid_argument, "capacity: " + std::to_string(options.capacity) +
                                               " bytes is out of range " + std::to_string(L::min_capacity) +
                                               ".." + std::to_string(L::max_capacity));
    std::string path = options.dir + "/" + options.name + ".dynup";
    // A last user removing the file between our open and our lock leaves us an unlinked
    // inode: open again (a removal needs every other user gone, so this ends quickly).
    for (int attempt = 0;; ++attempt) {
      bool raced = false;
      auto r = open_once(options, path, raced);
      if (r || !raced || attempt == 100) return r;
    }
  }

  SharedRegion(SharedRegion&& other) noexcept
      : base_(std::exchange(other.base_, nullptr)), bytes_(std::exchange(other.bytes_, 0)),
        capacity_(other.capacity_), version_(std::exchange(other.version_, nullptr)),
        name_(std::move(other.name_)), path_(std::move(other.path_)), fd_(std::exchange(other.fd_, -1)),
        opener_(other.opener_), remove_when_unused_(other.remove_when_unused_),
        companions_(std::move(other.companions_)) {}
  SharedRegion& operator=(SharedRegion&& other) noexcept {
    if (this != &other) {
      unmap();
      base_ = std::exchange(other.base_, nullptr);
      bytes_ = std::exchange(other.bytes_, 0);
      capacity_ = other.capacity_;
      version_ = std::exchange(other.version_, nullptr);
      name_ = std::move(other.name_);
      path_ = std::move(other.path_);
      fd_ = std::exchange(other.fd_, -1);
      opener_ = other.opener_;
      remove_when_unused_ = other.remove_when_unused_;
      companions_ = std::move(other.companions_);
    }
    return *this;
  }
  SharedRegion(const SharedRegion&) = delete;
  SharedRegion& operator=(const SharedRegion&) = delete;
  ~SharedRegion() { unmap(); }

private:
  // One open; `raced` when the file was unlinked under us (open() tries again).
  static Result<SharedRegion> open_once(const SharedRegionOptions& options, const std::string& path, bool& raced) {
    namespace L = detail::region_layout;
    const std::size_t bytes = L::file_bytes(options.capacity);
    auto opened = detail::open_private_file(path);
    if (!opened) return opened.error();
    detail::LockedFd fd{opened.value()};
    while (::flock(fd.fd, LOCK_EX) != 0)
      if (errno != EINTR) return detail::errno_error("cannot lock", path, errno);
    struct stat st {};
    if (::fstat(fd.fd, &st) != 0) return detail::errno_error("cannot stat", path, errno);
    if (st.st_nlink == 0) {
      raced = true;
      return Error(Errc::io_error, path + " was removed while being opened, 100 times in a row");
    }
    const auto size = static_cast<std::uint64_t>(st.st_size);
    bool init = size == 0;
    if (!init) {
      unsigned char head[32] = {};
      ssize_t got;
      do got = ::pread(fd.fd, head, sizeof head, 0);
      while (got < 0 && errno == EINTR);
      if (got < 0) return detail::errno_error("cannot read", path, errno);
      static constexpr unsigned char zero[sizeof L::magic] = {};
      // Initialization writes the magic last, so an all-zero magic at the size this
      // capacity gives is a creation that never finished, not someone else's file.
      init = size == bytes && std::memcmp(head, zero, sizeof zero) == 0;
      if (!init) {
        auto ok = detail::check_region_header(head, static_cast<std::size_t>(got), size, options.capacity, path);
        if (!ok) return ok.error();
      }
    }
    if (init) {
      int rc;
      do rc = ::posix_fallocate(fd.fd, 0, static_cast<off_t>(bytes));
      while (rc == EINTR);
      if (rc != 0)
        return Error(Errc::io_error, "cannot reserve " + std::to_string(bytes) + " bytes for " + path + ": " +
                                         std::strerror(rc));
    }
    void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd.fd, 0);
    if (p == MAP_FAILED) return detail::errno_error("cannot map", path, errno);
    auto* base = static_cast<unsigned char*>(p);
    if (init) initialize(base, options.capacity);
    SharedRegion region(base, bytes, options.capacity, options.name, path);
    if (!options.remove_when_unused) return region; // fd's destructor unlocks and closes
    // Stay a user: a read lock on byte 0 (an open-file-description lock, independent of
    // the flock that serializes opens and closes), held until close. No closer holds the
    // write lock now: it takes that only under the flock, which we hold.
    if (!detail::ofd_lock(fd.fd, F_RDLCK)) return detail::errno_error("cannot lock", path, errno);
    ::flock(fd.fd, LOCK_UN);
    region.fd_ = std::exchange(fd.fd, -1);
    region.opener_ = ::getpid();
    region.remove_when_unused_ = true;
    region.companions_ = options.companions;
    return region;
  }

public:

  /// The region version: 0 before the first write, then the number of writes so far. One
  /// acquire load, meant for every pick: compare with the version of the set a worker
  /// cached, and read() only when it differs. Lock-free, no allocation.
  std::uint64_t version() const noexcept { return version_->load(std::memory_order_acquire); }

  /// Publishes `set` as version version() + 1 and returns that version. Encodes the set
  /// as peer JSON (allocates); O(size of the JSON). Readers never see a partial set: they
  /// keep getting the previous one until the new one is complete. A set whose JSON
  /// exceeds the capacity is refused with Errc::too_large (nothing is written; the
  /// previous set stays readable). Only the leader may call it; see the class comment.
  Result<std::uint64_t> write(const PeerSet& set) {
    namespace L = detail::region_layout;
    const std::string payload = to_json(set);
    if (payload.size() > capacity_)
      return Error(Errc::too_large, "peer set needs " + std::to_string(payload.size()) + " bytes; region " +
                                        name_ + " holds " + std::to_string(capacity_) +
                                        " per buffer: raise capacity");
    const std::uint64_t next = version_->load(std::memory_order_acquire) + 1;
    const std::size_t slot = static_cast<std::size_t>(next % 2);
    auto meta = [&](std::size_t w) { return word(L::slot_at[slot] + w); };
    const std::uint64_t was = meta(L::seq_word)->load(std::memory_order_relaxed);
    // Odd marks the slot as being written; an odd value left by a writer that died here
    // stays odd (+2), so no reader ever matches it against an earlier even value.
    const std::uint64_t busy = was % 2 == 0 ? was + 1 : was + 2;
    meta(L::seq_word)->store(busy, std::memory_order_relaxed);
    // Release stores below: a reader that observes any of them also observes `busy`.
    meta(L::version_word)->store(next, std::memory_order_release);
    meta(L::source_index_word)->store(set.source_index(), std::memory_order_release);
    meta(L::length_word)->store(payload.size(), std::memory_order_release);
    meta(L::crc_word)->store(detail::crc32(payload), std::memory_order_release);
    std::atomic<std::uint64_t>* dst = word(L::buffer_at(capacity_, slot));
    for (std::size_t off = 0, i = 0; off < payload.size(); off += 8, ++i) {
      std::uint64_t w = 0;
      std::memcpy(&w, payload.data() + off, std::min<std::size_t>(8, payload.size() - off));
      dst[i].store(w, std::memory_order_release);
    }
    meta(L::seq_word)->store(busy + 1, std::memory_order_release);
    version_->store(next, std::memory_order_release);
    return next;
  }

  /// The current set with its region version. Copies the payload (allocates; O(payload)),
  /// checks its CRC-32 and decodes it; never returns a mix of two writes. Errors:
  /// Errc::not_found when the region was never written (version() == 0, a normal state
  /// at startup); Errc::corrupt when the stored bytes fail the checksum or do not decode
  /// (the file was altered); Errc::timeout when writes overlapped every attempt (bounded:
  /// DYNUP_SHARED_READ_SPINS attempts, then DYNUP_SHARED_READ_SLEEPS short sleeps).
  Result<SharedSnapshot> read() const {
    namespace L = detail::region_layout;
    std::string payload;
    const int attempts = DYNUP_SHARED_READ_SPINS + DYNUP_SHARED_READ_SLEEPS;
    for (int attempt = 0; attempt < attempts; ++attempt) {
      if (attempt >= DYNUP_SHARED_READ_SPINS)
        std::this_thread::sleep_for(std::chrono::microseconds(50L << (attempt - DYNUP_SHARED_READ_SPINS)));
      const std::uint64_t v = version_->load(std::memory_order_acquire);
      if (v == 0) return Error(Errc::not_found, "region " + name_ + " has not been written yet");
      const std::size_t slot = static_cast<std::size_t>(v % 2);
      auto meta = [&](std::size_t w) { return word(L::slot_at[slot] + w); };
      const std::uint64_t seq = meta(L::seq_word)->load(std::memory_order_acquire);
      if (seq % 2 != 0) continue;
      // A newer version in this slot means the writer lapped us: start over from the
      // version word, so versions returned to one reader never go backwards.
      if (meta(L::version_word)->load(std::memory_order_acquire) != v) continue;
      const std::uint64_t index = meta(L::source_index_word)->load(std::memory_order_acquire);
      const std::uint64_t length = meta(L::length_word)->load(std::memory_order_acquire);
      const auto crc = static_cast<std::uint32_t>(meta(L::crc_word)->load(std::memory_order_acquire));
      const std::size_t n = static_cast<std::size_t>(std::min<std::uint64_t>(length, capacity_));
      payload.resize(n);
      const std::atomic<std::uint64_t>* src = word(L::buffer_at(capacity_, slot));
      for (std::size_t off = 0, i = 0; off < n; off += 8, ++i) {
        const std::uint64_t w = src[i].load(std::memory_order_acquire);
        std::memcpy(&payload[off], &w, std::min<std::size_t>(8, n - off));
      }
      if (meta(L::seq_word)->load(std::memory_order_relaxed) != seq) continue;
      // The copy is one whole write; from here a mismatch is damage, not a race.
      const std::string what = "region " + name_ + " version " + std::to_string(v) + ": ";
      if (length > capacity_)
        return Error(Errc::corrupt, what + "length " + std::to_string(length) + " exceeds the capacity " +
                                        std::to_string(capacity_));
      if (detail::crc32(payload) != crc) return Error(Errc::corrupt, what + "checksum mismatch (payload altered)");
      auto set = parse_peer_set(payload);
      if (!set) return Error(Errc::corrupt, what + "payload does not decode: " + set.error().message());
      if (set->source_index() != index)
        return Error(Errc::corrupt, what + "payload index " + std::to_string(set->source_index()) +
                                        " differs from the slot's source index " + std::to_string(index));
      return SharedSnapshot{std::move(set).value(), v, index};
    }
    return Error(Errc::timeout, "region " + name_ + ": writes overlapped all " + std::to_string(attempts) +
                                    " read attempts; try again");
  }

  const std::string& name() const noexcept { return name_; }
  /// `<dir>/<name>.dynup`.
  const std::string& path() const noexcept { return path_; }
  /// Payload bytes per buffer.
  std::size_t capacity() const noexcept { return capacity_; }

private:
  SharedRegion(unsigned char* base, std::size_t bytes, std::size_t capacity, std::string name, std::string path)
      : base_(base), bytes_(bytes), capacity_(capacity),
        version_(word(detail::region_layout::version_at)), name_(std::move(name)), path_(std::move(path)) {}

  std::atomic<std::uint64_t>* word(std::size_t offset) const noexcept {
    return reinterpret_cast<std::atomic<std::uint64_t>*>(base_ + offset);
  }

  // Runs under the open() flock, so no other process looks at the header meanwhile.
  // The shared words start life here as atomics holding 0; the buffers' zero bytes
  // (fresh pages) are the representation of atomic 0 as well.
  static void initialize(unsigned char* base, std::size_t capacity) {
    namespace L = detail::region_layout;
    std::memset(base, 0, L::header_bytes);
    new (base + L::version_at) std::atomic<std::uint64_t>(0);
    for (std::size_t slot : L::slot_at)
      for (std::size_t w = 0; w <= L::crc_word; w += 8) new (base + slot + w) std::atomic<std::uint64_t>(0);
    const std::uint32_t layout = L::layout_version;
    const auto header = static_cast<std::uint32_t>(L::header_bytes);
    const std::uint64_t cap = capacity;
    std::memcpy(base + L::layout_at, &layout, sizeof layout);
    std::memcpy(base + L::header_bytes_at, &header, sizeof header);
    std::memcpy(base + L::capacity_at, &cap, sizeof cap);
    // The magic goes last (a compiler barrier keeps it there), so a creator killed
    // before this line leaves a zero magic that the next open() re-initializes.
    std::atomic_signal_fence(std::memory_order_seq_cst);
    std::memcpy(base, L::magic, sizeof L::magic);
  }

  void unmap() noexcept {
    if (base_) ::munmap(base_, bytes_);
    base_ = nullptr;
    version_ = nullptr;
    if (fd_ < 0) return;
    // Under the flock (no open in progress), the last user is the one whose read lock
    // becomes a write lock without waiting; it removes the file if the path still names
    // it. Only the opener: a forked copy shares the opener's description, and with it
    // the lock, so it can neither tell whether it is last nor unlock (close drops only
    // its reference).
    if (remove_when_unused_ && opener_ == ::getpid()) {
      int rc;
      do rc = ::flock(fd_, LOCK_EX);
      while (rc != 0 && errno == EINTR);
      struct stat mine {}, named {};
      if (rc == 0 && detail::ofd_lock(fd_, F_WRLCK) && ::fstat(fd_, &mine) == 0 &&
          ::stat(path_.c_str(), &named) == 0 && mine.st_dev == named.st_dev && mine.st_ino == named.st_ino) {
        for (const std::string& c : companions_) ::unlink(c.c_str());
        ::unlink(path_.c_str());
      }
    }
    ::close(fd_);
    fd_ = -1;
  }

  unsigned char* base_ = nullptr;
  std::size_t bytes_ = 0;
  std::size_t capacity_ = 0;
  std::atomic<std::uint64_t>* version_ = nullptr;
  std::string name_;
  std::string path_;
  int fd_ = -1;        ///< with remove_when_unused: the file, under our shared flock
  pid_t opener_ = 0;   ///< the process that opened it (only it may remove the file)
  bool remove_when_unused_ = false;
  std::vector<std::string> companions_;
};

/// Cross-process sharing (the "shared" section): the processes of one host that run the
/// same upstream elect one leader with a lock file; the leader watches the source, runs
/// the active checks and writes each set into a shared-memory region; the others read
/// it. See docs/SHARED.md.
struct SharedConfig {
  bool enabled = false;
  std::string dir = "/dev/shm";                ///< where <name>.dynup and <name>.lock live
  std::string name;                            ///< region name; empty: the upstream's name
  std::size_t capacity = std::size_t{1} << 20; ///< bytes per buffer of encoded peers
  std::chrono::milliseconds retry{250};        ///< how often a follower tries to lead
  std::chrono::milliseconds poll{100};         ///< a follower's version check without picks
  std::chrono::milliseconds first_wait{2000};  ///< a follower's wait for a first set at start
};

DYNUP_NAMESPACE_END
