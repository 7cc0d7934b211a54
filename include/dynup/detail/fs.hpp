// Small POSIX file helpers shared by the snapshot file, the leader file and the file
// source.
#pragma once

#include <dynup/result.hpp>
#include <dynup/version.hpp>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <string>

DYNUP_NAMESPACE_BEGIN
namespace detail {

inline Error errno_error(const std::string& what, const std::string& path, int err) {
  return Error(err == ENOENT ? Errc::not_found : Errc::io_error,
               what + " " + path + ": " + std::strerror(err));
}

inline bool write_all(int fd, const std::string& data) {
  std::size_t off = 0;
  while (off < data.size()) {
    ssize_t n = ::write(fd, data.data() + off, data.size() - off);
    if (n < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    off += static_cast<std::size_t>(n);
  }
  return true;
}

/// Reads a whole regular file, refusing files larger than `limit`.
inline Result<std::string> read_file(const std::string& path, std::size_t limit) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return errno_error("cannot open", path, errno);
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    return errno_error("cannot stat", path, err);
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return Error(Errc::io_error, path + " is not a regular file");
  }
  if (static_cast<std::uint64_t>(st.st_size) > limit) {
    ::close(fd);
    return Error(Errc::too_large, path + " is " + std::to_string(st.st_size) +
                                              " bytes, more than the limit of " + std::to_string(limit));
  }
  std::string data;
  char buf[65536];
  for (;;) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0) {
      if (errno == EINTR) continue;
      int err = errno;
      ::close(fd);
      return errno_error("cannot read", path, err);
    }
    if (n == 0) break;
    data.append(buf, static_cast<std::size_t>(n));
    if (data.size() > limit) {
      ::close(fd);
      return Error(Errc::too_large, path + " grew past the limit of " + std::to_string(limit) + " bytes");
    }
  }
  ::close(fd);
  return data;
}

inline std::string directory_of(const std::string& path) {
  auto slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

/// Refuses a directory in which another user could plant or swap files: one owned by
/// another user than this process's effective one (root excepted), or writable by group
/// or others without the sticky bit. The error names the directory and the fix.
inline Result<void> check_private_dir(const std::string& dir) {
  struct stat st {};
  if (::stat(dir.c_str(), &st) != 0) return errno_error("cannot stat directory", dir, errno);
  if (!S_ISDIR(st.st_mode)) return Error(Errc::io_error, dir + " is not a directory");
  if (st.st_uid != ::geteuid() && st.st_uid != 0)
    return Error(Errc::io_error, "directory " + dir + " is owned by uid " + std::to_string(st.st_uid) +
                                              ", not by this process's user or root: refusing to write in it");
  if ((st.st_mode & (S_IWGRP | S_IWOTH)) != 0 && (st.st_mode & S_ISVTX) == 0)
    return Error(Errc::io_error, "directory " + dir +
                                              " is writable by group or others without the sticky bit: refusing to "
                                              "write in it (chmod go-w, or chmod +t)");
  return {};
}

/// Sequence numbers of write_file_atomic's temporary files in this process.
inline std::atomic<unsigned>& temp_sequence() {
  static std::atomic<unsigned> n{0};
  return n;
}

/// The temporary file write_file_atomic uses for `path` with sequence number `n`.
inline std::string temp_path_for(const std::string& path, unsigned n) {
  auto slash = path.rfind('/');
  std::string base = path.substr(slash == std::string::npos ? 0 : slash + 1);
  return directory_of(path) + "/." + base + ".tmp." + std::to_string(::getpid()) + "." + std::to_string(n);
}

/// Replaces `path` with `data` atomically, mode 0600 whatever the umask, never through a
/// symbolic link: the directory must pass check_private_dir; the temporary file is
/// created with O_CREAT|O_EXCL|O_NOFOLLOW (a link or file planted at its name is an
/// error, never followed); a symbolic link at `path` is refused, not replaced. `durable`:
/// fsync the file before the rename and the directory after it. Readers see the old
/// file or the new one. On an error before the rename nothing at `path` changes and the
/// temporary file is removed; when only the directory fsync fails the error says so.
inline Result<void> write_file_atomic(const std::string& path, const std::string& data, bool durable) {
  const std::string dir = directory_of(path);
  if (auto ok = check_private_dir(dir); !ok) return ok.error();
  struct stat st {};
  if (::lstat(path.c_str(), &st) == 0 && S_ISLNK(st.st_mode))
    return Error(Errc::io_error, path + " is a symbolic link: refusing to replace it (remove the link)");
  const std::string tmp = temp_path_for(path, temp_sequence().fetch_add(1, std::memory_order_relaxed));
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (fd < 0) {
    int err = errno;
    if (err == EEXIST || err == ELOOP)
      return Error(Errc::io_error, "cannot create " + tmp + ": something (a file or symbolic link) is already there; "
                                                            "not following or replacing it");
    return errno_error("cannot create", tmp, err);
  }
  auto fail = [&](const char* what) {
    int err = errno;
    ::close(fd);
    ::unlink(tmp.c_str());
    return errno_error(what, tmp, err);
  };
  if (::fchmod(fd, 0600) != 0) return fail("cannot chmod");
  if (!write_all(fd, data)) return fail("cannot write");
  if (durable && ::fsync(fd) != 0) return fail("cannot fsync");
  if (::close(fd) != 0) {
    int err = errno;
    ::unlink(tmp.c_str());
    return errno_error("cannot close", tmp, err);
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    int err = errno;
    ::unlink(tmp.c_str());
    return errno_error("cannot rename onto", path, err);
  }
  if (!durable) return {};
  int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0) return errno_error("cannot open directory", dir, errno);
  int rc = ::fsync(dfd);
  int err = errno;
  ::close(dfd);
  if (rc != 0) return errno_error("saved, but cannot fsync directory", dir, err);
  return {};
}

} // namespace detail
DYNUP_NAMESPACE_END
