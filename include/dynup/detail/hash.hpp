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

/// A fast 64-bit content hash fed incrementally, eight bytes per step, with a final
/// avalanche. For content identity and change detection, not security. Its value is
/// the same on every platform and run (explicit little-endian word loads, no seeds).
class ContentHash {
public:
  void bytes(const void* data, std::size_t n) noexcept {
    auto p = static_cast<const unsigned char*>(data);
    while (n >= 8) {
      mix(load64(p));
      p += 8;
      n -= 8;
    }
    std::uint64_t tail = 0;
    for (std::size_t i = 0; i < n; ++i) tail |= static_cast<std::uint64_t>(p[i]) << (8 * i);
    mix(tail ^ (static_cast<std::uint64_t>(n) << 56));
  }
  /// Length-prefixed, so ("ab","c") and ("a","bc") hash differently.
  void str(std::string_view s) noexcept {
    u64(s.size());
    bytes(s.data(), s.size());
  }
  void u64(std::uint64_t v) noexcept { mix(v); }
  std::uint64_t value() const noexcept {
    std::uint64_t h = h_;
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ULL;
    h ^= h >> 33;
    return h;
  }

private:
  static std::uint64_t load64(const unsigned char* p) noexcept {
    std::uint64_t v = 0;
    for (int i = 0; i < 8; ++i) v |= static_cast<std::uint64_t>(p[i]) << (8 * i);
    return v;
  }
  void mix(std::uint64_t w) noexcept {
    w *= 0x87c37b91114253d5ULL;
    w = (w << 31) | (w >> 33);
    w *= 0x4cf5ad432745937fULL;
    h_ ^= w;
    h_ = ((h_ << 27) | (h_ >> 37)) * 5 + 0x52dce729;
  }
  std::uint64_t h_ = 0x9e3779b97f4a7c15ULL;
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
