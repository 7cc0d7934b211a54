// Counting this process's threads, for tests that check a cost does not grow with N.
#pragma once

#include <dirent.h>

#include <fstream>
#include <set>
#include <string>

namespace dynup_test {

/// The ids of this process's threads (the entries of /proc/self/task), leaving out
/// those named `except` (a test double's own threads); empty when it cannot be read.
inline std::set<long> thread_ids(const std::string& except = "") {
  std::set<long> out;
  DIR* d = ::opendir("/proc/self/task");
  if (d == nullptr) return out;
  while (dirent* e = ::readdir(d)) {
    if (e->d_name[0] == '.') continue;
    if (!except.empty()) {
      std::ifstream comm(std::string("/proc/self/task/") + e->d_name + "/comm");
      std::string name;
      std::getline(comm, name);
      if (name == except) continue;
    }
    out.insert(std::stol(e->d_name));
  }
  ::closedir(d);
  return out;
}

/// How many threads this process runs, leaving out those named `except`.
inline std::size_t thread_count(const std::string& except = "") { return thread_ids(except).size(); }

} // namespace dynup_test
