// LeaderLock: one leader per host among the processes that share a region (nginx
// workers), chosen with flock(2) so the kernel frees the lock when its holder dies.
//
// How embedders use it: every process opens its own LeaderLock and calls try_acquire()
// on a retry period (e.g. every 250 ms from a worker timer). The one that gets it runs
// the watchers and writes the SharedRegion; the others only read. When the leader exits
// or is killed (even with SIGKILL) the kernel releases the lock, and another process
// takes over on its next try, so the takeover delay is at most one retry period.
#pragma once

#include <dynup/detail/fs.hpp>
#include <dynup/result.hpp>
#include <dynup/version.hpp>

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <string>
#include <utility>

DYNUP_NAMESPACE_BEGIN
namespace detail {

/// Checks a region or lock name: 1..64 characters of [A-Za-z0-9_.-], so it is one path
/// component that cannot climb out of the directory. The error names the field.
inline Result<void> check_shared_name(const std::string& name) {
  bool ok = !name.empty() && name.size() <= 64;
  for (char c : name)
    ok = ok && ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                c == '_' || c == '.' || c == '-');
  if (ok && name.find_first_not_of('.') == std::string::npos) ok = false; // "." and ".."
  if (ok) return {};
  return Error(Errc::invalid_argument,
               "name: \"" + name + "\" must be 1..64 characters of A-Z a-z 0-9 _ . - (and not only dots)");
}

/// Opens (creating with mode 0600) a regular file owned by this user, refusing symbolic
/// links: these files live in world-writable directories such as /dev/shm. A file that
/// exists when we try to create it but is gone when we open it (its last user removed
/// it in between) is created again.
inline Result<int> open_private_file(const std::string& path) {
  int fd = -1;
  for (int attempt = 0; attempt < 100; ++attempt) {
    fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd >= 0) {
      ::fchmod(fd, 0600); // the umask may only have narrowed it; this is the intended mode
      break;
    }
    if (errno != EEXIST) break;
    fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC | O_NOFOLLOW);
    if (fd >= 0 || errno != ENOENT) break;
  }
  if (fd < 0) {
    int err = errno;
    if (err == ELOOP) return Error(Errc::io_error, path + " is a symbolic link; refusing to follow it");
    return errno_error("cannot open", path, err);
  }
  struct stat st {};
  std::string why;
  if (::fstat(fd, &st) != 0)
    why = std::string("cannot stat: ") + std::strerror(errno);
  else if (!S_ISREG(st.st_mode))
    why = "is not a regular file";
  else if (st.st_uid != ::geteuid())
    why = "is owned by uid " + std::to_string(st.st_uid) + ", not by this process's uid " +
          std::to_string(::geteuid());
  else if ((st.st_mode & 022) != 0) {
    char mode[16];
    std::snprintf(mode, sizeof mode, "%04o", static_cast<unsigned>(st.st_mode & 07777));
    why = std::string("is writable by group or others (mode ") + mode + ", expected 0600)";
  }
  if (!why.empty()) {
    ::close(fd);
    return Error(Errc::io_error, path + " " + why);
  }
  return fd;
}

} // namespace detail

/// An exclusive flock(LOCK_EX) on `<dir>/<name>.lock`, taken without blocking.
///
/// Each LeaderLock has its own open file description (open(2), O_CLOEXEC, mode 0600), so
/// two LeaderLocks on the same path contend even inside one process. Fork: open the lock
/// in each process after fork (each nginx worker in its init hook). A LeaderLock inherited
/// across fork shares its lock with the parent: both copies report held(), and release()
/// in either one releases it for both. LeaderLock never removes the lock file: removing it
/// while processes run would let two of them lead (each locking a different inode). A
/// shared upstream removes it with its region when its last process closes both
/// (SharedRegionOptions::companions), when no process can hold it.
///
/// Thread-safety: one object is driven by one thread at a time; distinct objects are
/// independent. Move-only; the destructor closes the file, which releases the lock.
class LeaderLock {
public:
  /// Opens (creating if needed) `<dir>/<name>.lock`; does not take the lock. Errors: a bad
  /// name (invalid_argument naming the field), a missing directory (not_found), a file that
  /// is a symbolic link, not a regular file, owned by someone else or writable by others
  /// (io_error). Allocates.
  static Result<LeaderLock> open(const std::string& dir, const std::string& name) {
    if (auto ok = detail::check_shared_name(name); !ok) return ok.error();
    if (dir.empty()) return Error(Errc::invalid_argument, "dir: is empty");
    std::string path = dir + "/" + name + ".lock";
    auto fd = detail::open_private_file(path);
    if (!fd) return fd.error();
    return LeaderLock(fd.value(), std::move(path));
  }

  LeaderLock(LeaderLock&& other) noexcept
      : fd_(std::exchange(other.fd_, -1)), held_(std::exchange(other.held_, false)),
        path_(std::move(other.path_)) {}
  LeaderLock& operator=(LeaderLock&& other) noexcept {
    if (this != &other) {
      close_fd();
      fd_ = std::exchange(other.fd_, -1);
      held_ = std::exchange(other.held_, false);
      path_ = std::move(other.path_);
    }
    return *this;
  }
  LeaderLock(const LeaderLock&) = delete;
  LeaderLock& operator=(const LeaderLock&) = delete;
  ~LeaderLock() { close_fd(); }

  /// Takes the lock if it is free; true when this object leads (now or already). Never
  /// blocks; one flock(2) call unless already held. A failure of any kind (another holder,
  /// or a system error such as ENOLCK) reports false: call again on the next period.
  bool try_acquire() noexcept {
    if (held_) return true;
    if (fd_ < 0) return false;
    int rc;
    do rc = ::flock(fd_, LOCK_EX | LOCK_NB);
    while (rc != 0 && errno == EINTR);
    held_ = rc == 0;
    return held_;
  }

  /// Whether this object holds the lock (as far as this process knows: see fork above).
  bool held() const noexcept { return held_; }

  /// Gives up leadership; another process can take it at once. No-op when not held.
  void release() noexcept {
    if (!held_) return;
    ::flock(fd_, LOCK_UN);
    held_ = false;
  }

  /// `<dir>/<name>.lock`.
  const std::string& path() const noexcept { return path_; }

private:
  LeaderLock(int fd, std::string path) : fd_(fd), path_(std::move(path)) {}

  void close_fd() noexcept {
    if (fd_ >= 0) ::close(fd_); // closing the last fd of the description drops the lock
    fd_ = -1;
    held_ = false;
  }

  int fd_ = -1;
  bool held_ = false;
  std::string path_;
};

DYNUP_NAMESPACE_END
