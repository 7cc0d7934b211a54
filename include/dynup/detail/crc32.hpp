// CRC-32 (IEEE 802.3, the zlib and nginx ngx_crc32 checksum), table-driven with
// slicing-by-8: ring_hash needs it bit-for-bit to place keys where nginx does.
#pragma once

#include <dynup/version.hpp>

#include <cstddef>
#include <cstdint>
#include <string_view>

DYNUP_NAMESPACE_BEGIN
namespace detail {

/// Eight 256-entry tables: t[0] is the classic byte table; t[k][b] is the CRC of byte
/// b followed by k zero bytes, so eight bytes take eight independent lookups.
struct Crc32Tables {
  std::uint32_t t[8][256]{};

  constexpr Crc32Tables() {
    for (std::uint32_t i = 0; i < 256; ++i) {
      std::uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1u) ? (c >> 1) ^ 0xEDB88320u : c >> 1;
      t[0][i] = c;
    }
    for (int k = 1; k < 8; ++k)
      for (std::uint32_t i = 0; i < 256; ++i) t[k][i] = (t[k - 1][i] >> 8) ^ t[0][t[k - 1][i] & 0xFFu];
  }
};

inline constexpr Crc32Tables crc32_tables{};

/// The raw CRC state after 4 more bytes, `v` in little-endian byte order (nginx feeds
/// a uint32_t's memory, little-endian on every platform it builds ketama points on).
inline std::uint32_t crc32_update_u32(std::uint32_t state, std::uint32_t v) noexcept {
  const auto& t = crc32_tables.t;
  std::uint32_t c = state ^ v;
  return t[3][c & 0xFFu] ^ t[2][(c >> 8) & 0xFFu] ^ t[1][(c >> 16) & 0xFFu] ^ t[0][c >> 24];
}

/// The raw CRC state after `n` more bytes. Start from 0xFFFFFFFF and complement the
/// result to get the checksum (what crc32() does). Pure function; no allocation.
inline std::uint32_t crc32_update(std::uint32_t state, const void* data, std::size_t n) noexcept {
  const auto& t = crc32_tables.t;
  auto p = static_cast<const unsigned char*>(data);
  auto load32 = [](const unsigned char* q) {
    return static_cast<std::uint32_t>(q[0]) | static_cast<std::uint32_t>(q[1]) << 8 |
           static_cast<std::uint32_t>(q[2]) << 16 | static_cast<std::uint32_t>(q[3]) << 24;
  };
  std::uint32_t c = state;
  while (n >= 8) {
    std::uint32_t lo = load32(p) ^ c;
    std::uint32_t hi = load32(p + 4);
    c = t[7][lo & 0xFFu] ^ t[6][(lo >> 8) & 0xFFu] ^ t[5][(lo >> 16) & 0xFFu] ^ t[4][lo >> 24] ^
        t[3][hi & 0xFFu] ^ t[2][(hi >> 8) & 0xFFu] ^ t[1][(hi >> 16) & 0xFFu] ^ t[0][hi >> 24];
    p += 8;
    n -= 8;
  }
  if (n >= 4) { // one slicing-by-4 step leaves at most 3 bytes for the byte loop
    std::uint32_t x = load32(p) ^ c;
    c = t[3][x & 0xFFu] ^ t[2][(x >> 8) & 0xFFu] ^ t[1][(x >> 16) & 0xFFu] ^ t[0][x >> 24];
    p += 4;
    n -= 4;
  }
  while (n-- > 0) c = t[0][(c ^ *p++) & 0xFFu] ^ (c >> 8);
  return c;
}

/// CRC-32 of `data`: crc32("123456789") == 0xCBF43926, as zlib's crc32() and nginx's
/// ngx_crc32_long(). O(n), about one cycle per byte; no allocation.
inline std::uint32_t crc32(std::string_view data) noexcept {
  return ~crc32_update(0xFFFFFFFFu, data.data(), data.size());
}

} // namespace detail
DYNUP_NAMESPACE_END
