// A child process for end-to-end tests: spawned with posix_spawn, stdout and stderr
// captured through pipes and read line by line with a timeout, stopped by its own PID
// (SIGTERM, then SIGKILL after a grace period) and always reaped.
#pragma once

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <fstream>
#include <optional>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

extern char** environ;

namespace dynup_test {

/// Whether `pid` has exited: gone, or a zombie its parent (not this process) has not
/// reaped yet.
inline bool process_gone(pid_t pid) {
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!std::getline(stat, line)) return true;
  auto close = line.rfind(')');
  return close != std::string::npos && close + 2 < line.size() && line[close + 2] == 'Z';
}

/// How a child ended.
struct ExitStatus {
  bool exited = false;   ///< returned from main / called exit
  int code = -1;         ///< exit code when `exited`
  bool signaled = false; ///< killed by a signal
  int signal = 0;
};

class Process {
public:
  enum class Stream { out, err };

  /// Starts argv[0] (a path) with the given arguments; stdin is /dev/null.
  explicit Process(const std::vector<std::string>& argv) {
    if (argv.empty()) throw std::invalid_argument("Process: empty argv");
    int out[2], err[2];
    if (::pipe2(out, O_CLOEXEC) != 0) throw std::system_error(errno, std::generic_category(), "pipe2");
    if (::pipe2(err, O_CLOEXEC) != 0) {
      int e = errno;
      ::close(out[0]);
      ::close(out[1]);
      throw std::system_error(e, std::generic_category(), "pipe2");
    }
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_adddup2(&actions, out[1], 1);
    posix_spawn_file_actions_adddup2(&actions, err[1], 2);
    // The child starts with default signal handling and nothing blocked, whatever the
    // test runner did with its own mask.
    posix_spawnattr_t attr;
    posix_spawnattr_init(&attr);
    sigset_t none, defaults;
    sigemptyset(&none);
    sigemptyset(&defaults);
    for (int s : {SIGTERM, SIGINT, SIGHUP, SIGPIPE}) sigaddset(&defaults, s);
    posix_spawnattr_setsigmask(&attr, &none);
    posix_spawnattr_setsigdefault(&attr, &defaults);
    posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);

    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    int rc = ::posix_spawn(&pid_, args[0], &actions, &attr, args.data(), environ);
    posix_spawn_file_actions_destroy(&actions);
    posix_spawnattr_destroy(&attr);
    ::close(out[1]);
    ::close(err[1]);
    fds_[0] = out[0];
    fds_[1] = err[0];
    if (rc != 0) {
      close_pipes();
      throw std::system_error(rc, std::generic_category(), "posix_spawn " + argv[0]);
    }
  }

  ~Process() {
    if (!status_) stop(std::chrono::milliseconds(2000));
    close_pipes();
  }

  Process(const Process&) = delete;
  Process& operator=(const Process&) = delete;

  pid_t pid() const noexcept { return pid_; }

  /// The next complete line (without '\n') within `timeout`; nullopt on timeout or EOF.
  std::optional<std::string> read_line(Stream s, std::chrono::milliseconds timeout) {
    std::size_t i = index(s);
    auto deadline = std::chrono::steady_clock::now() + timeout;
    for (;;) {
      auto nl = buf_[i].find('\n');
      if (nl != std::string::npos) {
        std::string line = buf_[i].substr(0, nl);
        buf_[i].erase(0, nl + 1);
        return line;
      }
      if (fds_[i] < 0) return std::nullopt; // EOF already seen
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      if (left.count() < 0) return std::nullopt;
      pollfd p{fds_[i], POLLIN, 0};
      int rc = ::poll(&p, 1, static_cast<int>(left.count()));
      if (rc < 0 && errno == EINTR) continue;
      if (rc == 0) {
        if (std::chrono::steady_clock::now() >= deadline) return std::nullopt;
        continue;
      }
      if (rc < 0) return std::nullopt;
      if (!fill(i)) return std::nullopt; // EOF with no pending newline
    }
  }

  /// Everything remaining on the stream until EOF (the child closed it or exited), or
  /// what arrived before `timeout`.
  std::string read_all(Stream s, std::chrono::milliseconds timeout) {
    std::size_t i = index(s);
    auto deadline = std::chrono::steady_clock::now() + timeout;
    while (fds_[i] >= 0) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0) break;
      pollfd p{fds_[i], POLLIN, 0};
      int rc = ::poll(&p, 1, static_cast<int>(left.count()));
      if (rc < 0 && errno == EINTR) continue;
      if (rc <= 0) break;
      if (!fill(i)) break;
    }
    std::string out;
    out.swap(buf_[i]);
    return out;
  }

  /// Waits for the child to exit; nullopt if it is still running at the deadline.
  std::optional<ExitStatus> wait_exit(std::chrono::milliseconds timeout) {
    if (status_) return status_;
    auto deadline = std::chrono::steady_clock::now() + timeout;
    for (;;) {
      int st = 0;
      pid_t r = ::waitpid(pid_, &st, WNOHANG);
      if (r == pid_) {
        status_ = decode(st);
        return status_;
      }
      if (r < 0 && errno != EINTR) {
        status_ = ExitStatus{}; // not our child any more: nothing left to wait for
        return status_;
      }
      if (std::chrono::steady_clock::now() >= deadline) return std::nullopt;
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
  }

  /// Sends `sig` to this child only (by PID), unless it was already reaped.
  void send(int sig) {
    if (!status_) ::kill(pid_, sig);
  }

  /// SIGTERM, then SIGKILL if it has not exited within `grace`; always reaps.
  ExitStatus stop(std::chrono::milliseconds grace = std::chrono::milliseconds(2000)) {
    if (status_) return *status_;
    send(SIGTERM);
    if (auto st = wait_exit(grace)) return *st;
    ::kill(pid_, SIGKILL);
    int st = 0;
    while (::waitpid(pid_, &st, 0) < 0 && errno == EINTR) {
    }
    status_ = decode(st);
    return *status_;
  }

private:
  static std::size_t index(Stream s) noexcept { return s == Stream::out ? 0 : 1; }

  static ExitStatus decode(int st) {
    ExitStatus e;
    if (WIFEXITED(st)) {
      e.exited = true;
      e.code = WEXITSTATUS(st);
    } else if (WIFSIGNALED(st)) {
      e.signaled = true;
      e.signal = WTERMSIG(st);
    }
    return e;
  }

  // Reads what is available into the buffer; false on EOF or error (the fd is closed).
  bool fill(std::size_t i) {
    char chunk[4096];
    for (;;) {
      ssize_t n = ::read(fds_[i], chunk, sizeof chunk);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        ::close(fds_[i]);
        fds_[i] = -1;
        return false;
      }
      buf_[i].append(chunk, static_cast<std::size_t>(n));
      return true;
    }
  }

  void close_pipes() {
    for (int& fd : fds_)
      if (fd >= 0) {
        ::close(fd);
        fd = -1;
      }
  }

  pid_t pid_ = -1;
  int fds_[2] = {-1, -1};
  std::string buf_[2];
  std::optional<ExitStatus> status_;
};

} // namespace dynup_test
