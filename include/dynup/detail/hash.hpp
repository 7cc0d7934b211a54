// Stable, platform-independent hashes: results never depend on pointer values,
// container iteration order or the standard library's std::hash.
#pragma once

#include <dynup/version.hpp>

#include <array>
#include <cstddef>
#include <cstdint>
#include <string_view>

DYNUP_NAMESPACE_BEGIN
namespace detail {

/// 64-bit FNV-1a, fed incrementally. Used for content identity, not security.
class Fnv1a64 {
public:
  void bytes(const void* data, std::size_t n) noexcept {
    auto p = static_cast<const unsigned char*>(data);
    for (std::size_t i = 0; i < n; ++i) {
      h_ ^= p[i];
      h_ *= 0x100000001b3ULL;
    }
  }
  /// Length-prefixed, so ("ab","c") and ("a","bc") hash differently.
  void str(std::string_view s) noexcept {
    u64(s.size());
    bytes(s.data(), s.size());
  }
  void u64(std::uint64_t v) noexcept {
    unsigned char b[8];
    for (int i = 0; i < 8; ++i) b[i] = static_cast<unsigned char>(v >> (8 * i));
    bytes(b, 8);
  }
  std::uint64_t value() const noexcept { return h_; }

private:
  std::uint64_t h_ = 0xcbf29ce484222325ULL;
};

/// CRC-32C (Castagnoli), the checksum of snapshot files; reflected, init and xorout ~0.
inline std::uint32_t crc32c(std::string_view data, std::uint32_t crc = 0) noexcept {
  static constexpr auto table = [] {
    std::array<std::uint32_t, 256> t{};
    for (std::uint32_t i = 0; i < 256; ++i) {
      std::uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  crc = ~crc;
  for (unsigned char b : data) crc = table[(crc ^ b) & 0xFFu] ^ (crc >> 8);
  return ~crc;
}

} // namespace detail
DYNUP_NAMESPACE_END
