// UTF-8 validation, for text that leaves dynup as JSON (status, snapshot files, the
// shared region): nlohmann::json writes bytes that are not UTF-8 as U+FFFD, so such text
// would not read back as itself.
#pragma once

#include <dynup/version.hpp>

#include <cstddef>
#include <string_view>

DYNUP_NAMESPACE_BEGIN
namespace detail {

/// Whether `s` is well-formed UTF-8 (RFC 3629: no overlong forms, no surrogates, nothing
/// above U+10FFFF). O(n), no allocation.
inline bool is_utf8(std::string_view s) noexcept {
  std::size_t i = 0;
  while (i < s.size()) {
    auto c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) {
      ++i;
      continue;
    }
    std::size_t len;
    unsigned char lo = 0x80, hi = 0xBF; // allowed range of the second byte
    if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3;
      if (c == 0xE0) lo = 0xA0; // overlong
      if (c == 0xED) hi = 0x9F; // surrogates
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4;
      if (c == 0xF0) lo = 0x90; // overlong
      if (c == 0xF4) hi = 0x8F; // above U+10FFFF
    } else {
      return false;
    }
    if (s.size() - i < len) return false;
    for (std::size_t k = 1; k < len; ++k) {
      auto b = static_cast<unsigned char>(s[i + k]);
      if (k == 1 ? (b < lo || b > hi) : (b < 0x80 || b > 0xBF)) return false;
    }
    i += len;
  }
  return true;
}

} // namespace detail
DYNUP_NAMESPACE_END
