// Test helpers: a private temporary directory removed on scope exit, and small file
// writers that mimic how operators and tools change files on disk.
#pragma once

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <system_error>
#include <vector>

namespace dynup_test {

/// A fresh directory under /tmp (mkdtemp), removed with its contents on destruction.
class TempDir {
public:
  TempDir() {
    char templ[] = "/tmp/dynup-test-XXXXXX";
    if (!::mkdtemp(templ)) throw std::system_error(errno, std::generic_category(), "mkdtemp");
    path_ = templ;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const std::string& path() const noexcept { return path_; }
  std::string file(const std::string& name) const { return path_ + "/" + name; }

  /// Names of the entries in the directory (not recursive), sorted.
  std::vector<std::string> entries() const { return list_dir(path_); }

  static std::vector<std::string> list_dir(const std::string& dir) {
    std::vector<std::string> out;
    std::error_code ec;
    for (const auto& e : std::filesystem::directory_iterator(dir, ec))
      out.push_back(e.path().filename().string());
    std::sort(out.begin(), out.end());
    return out;
  }

private:
  std::string path_;
};

inline void write_fd_all(int fd, const std::string& data, const std::string& path) {
  std::size_t off = 0;
  while (off < data.size()) {
    ssize_t n = ::write(fd, data.data() + off, data.size() - off);
    if (n < 0) {
      if (errno == EINTR) continue;
      int err = errno;
      ::close(fd);
      throw std::system_error(err, std::generic_category(), "write " + path);
    }
    off += static_cast<std::size_t>(n);
  }
}

/// Truncates and rewrites `path` in place (same inode), as an editor without
/// atomic save or `echo … > file` does.
inline void write_in_place(const std::string& path, const std::string& data) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) throw std::system_error(errno, std::generic_category(), "open " + path);
  write_fd_all(fd, data, path);
  ::close(fd);
}

/// Writes a temporary file next to `path` and renames it over `path` (new inode).
inline void write_by_rename(const std::string& path, const std::string& data) {
  std::string tmp = path + ".writing";
  write_in_place(tmp, data);
  if (::rename(tmp.c_str(), path.c_str()) != 0)
    throw std::system_error(errno, std::generic_category(), "rename " + tmp);
}

/// The whole file, or throws.
inline std::string read_all(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw std::system_error(errno, std::generic_category(), "open " + path);
  std::string out;
  char buf[4096];
  for (;;) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    out.append(buf, static_cast<std::size_t>(n));
  }
  ::close(fd);
  return out;
}

inline bool exists(const std::string& path) {
  struct stat st {};
  return ::lstat(path.c_str(), &st) == 0;
}

} // namespace dynup_test
