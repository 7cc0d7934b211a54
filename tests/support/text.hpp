// Substring checks for error messages and outputs.
#pragma once

#include <string>

namespace dynup_test {

inline bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

} // namespace dynup_test
