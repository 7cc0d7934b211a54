// Small POSIX file helpers shared by the snapshot file and the file source.
#pragma once

#include <dynup/result.hpp>
#include <dynup/version.hpp>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

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

} // namespace detail
DYNUP_NAMESPACE_END
