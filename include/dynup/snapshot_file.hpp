// Last-known-good persistence: a peer set saved atomically, loaded whole or not at all.
//
// File layout (docs/FORMAT.md):
//   dynup-snapshot <format> <payload bytes> <crc32c of payload, 8 hex digits>\n
//   <payload: {"saved_at":"…Z","saved_at_ms":…,"version":…,"index":…,"peers":[…]}>
// The header's length and checksum reject a file cut at any byte or altered anywhere.
#pragma once

#include <dynup/detail/fs.hpp>
#include <dynup/detail/hash.hpp>
#include <dynup/peer_json.hpp>
#include <dynup/peer_set.hpp>
#include <dynup/result.hpp>
#include <dynup/version.hpp>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <string>

#ifndef DYNUP_MAX_SNAPSHOT_BYTES
// Refuse to read absurdly large files (a wrong path pointing at a disk image, say).
#define DYNUP_MAX_SNAPSHOT_BYTES (256u * 1024u * 1024u)
#endif

DYNUP_NAMESPACE_BEGIN

inline constexpr int snapshot_format_version = 1;

/// A set read back from a snapshot file. `set.version()` is 0 (a publisher assigns a new
/// one); `saved_version` is the version it had when saved.
struct LoadedSnapshot {
  PeerSet set;
  std::uint64_t saved_version = 0;
  std::chrono::system_clock::time_point saved_at;
};

namespace detail {

inline std::string rfc3339_ms(std::chrono::system_clock::time_point t) {
  auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(t.time_since_epoch()).count();
  auto millis = ((ms % 1000) + 1000) % 1000; // floor, so times before 1970 format too
  std::time_t secs = static_cast<std::time_t>((ms - millis) / 1000);
  std::tm tm{};
  gmtime_r(&secs, &tm);
  char buf[96]; // room for seven ints of any value: optimized -Werror builds check this
  std::snprintf(buf, sizeof buf, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900,
                tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, static_cast<int>(millis));
  return buf;
}

} // namespace detail

/// The bytes save_snapshot writes for `set` saved at `now`: header and payload, which
/// decode_snapshot reads back. Pure; allocates.
inline std::string encode_snapshot(const PeerSet& set, std::chrono::system_clock::time_point now) {
  nlohmann::ordered_json payload_doc = peer_set_to_json(set);
  payload_doc["saved_at"] = detail::rfc3339_ms(now);
  payload_doc["saved_at_ms"] =
      std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()).count();
  // Bytes that are not UTF-8 (a Peer built in code may hold any) become U+FFFD rather
  // than throwing.
  std::string payload = payload_doc.dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::replace);
  char header[96];
  std::snprintf(header, sizeof header, "dynup-snapshot %d %zu %08x\n", snapshot_format_version,
                payload.size(), static_cast<unsigned>(detail::crc32c(payload)));
  return header + payload;
}

/// Writes `set` to `path` atomically (detail::write_file_atomic, durable): a temporary
/// file in the same directory, mode 0600 whatever the umask, created without following
/// links; fsync, rename over `path`, fsync of the directory. Readers of `path` see the
/// old file or the new one, never a mix; concurrent saves are safe (the last rename
/// wins). Refused with a clear error: a directory others can write without the sticky
/// bit or owned by another user, a symbolic link at `path` or at the temporary name. On
/// an error before the rename nothing at `path` changes and the temporary file is
/// removed; if only the final directory fsync fails, the new file is in place but may
/// not survive a power loss, and the error says so.
inline Result<void> save_snapshot(const std::string& path, const PeerSet& set,
                                  std::chrono::system_clock::time_point now = std::chrono::system_clock::now()) {
  return detail::write_file_atomic(path, encode_snapshot(set, now), true);
}

/// Decodes snapshot file contents. Rejects (never partially returns) a file that is
/// empty, truncated, extended, altered, or of an unknown format version.
inline Result<LoadedSnapshot> decode_snapshot(std::string_view data) {
  auto corrupt = [](const std::string& why) { return Error(Errc::corrupt, why); };
  if (data.empty()) return corrupt("file is empty");
  static constexpr std::string_view magic = "dynup-snapshot ";
  if (data.substr(0, magic.size()) != magic.substr(0, std::min(magic.size(), data.size())))
    return corrupt("not a dynup snapshot (bad magic)");
  auto nl = data.find('\n');
  if (nl == std::string_view::npos || data.size() < magic.size())
    return corrupt("truncated header");
  std::string header(data.substr(magic.size(), nl - magic.size()));
  int format = 0;
  unsigned long long length = 0;
  unsigned crc = 0;
  int consumed = 0;
  // The checksum is exactly 8 hex digits after a space (%8x alone would accept fewer).
  bool crc_field_ok = header.size() >= 9 && header[header.size() - 9] == ' ' &&
                      header.find_first_not_of("0123456789abcdefABCDEF", header.size() - 8) == std::string::npos;
  if (std::sscanf(header.c_str(), "%d %llu %8x%n", &format, &length, &crc, &consumed) != 3 ||
      static_cast<std::size_t>(consumed) != header.size() || !crc_field_ok)
    return corrupt("malformed header \"" + header + "\"");
  if (format != snapshot_format_version)
    return Error(Errc::unsupported, "snapshot format " + std::to_string(format) +
                                        " is not supported (this build reads format " +
                                        std::to_string(snapshot_format_version) + ")");
  std::string_view payload = data.substr(nl + 1);
  if (payload.size() < length)
    return corrupt("truncated: header declares " + std::to_string(length) + " payload bytes, file has " +
                   std::to_string(payload.size()));
  if (payload.size() > length)
    return corrupt("trailing data: header declares " + std::to_string(length) + " payload bytes, file has " +
                   std::to_string(payload.size()));
  if (detail::crc32c(payload) != crc) return corrupt("checksum mismatch (payload altered)");
  nlohmann::json doc;
  try {
    doc = nlohmann::json::parse(payload.begin(), payload.end());
  } catch (const nlohmann::json::exception& e) {
    return corrupt(std::string("payload is not JSON: ") + e.what());
  }
  LoadedSnapshot out;
  if (!doc.is_object() || !doc.contains("saved_at_ms") || !doc["saved_at_ms"].is_number_integer())
    return corrupt("payload lacks saved_at_ms");
  // system_clock counts nanoseconds in 64 bits (years 1677..2262 here): a time beyond that
  // would overflow the conversion.
  using std::chrono::milliseconds;
  constexpr auto min_ms = std::chrono::duration_cast<milliseconds>(std::chrono::system_clock::duration::min()).count();
  constexpr auto max_ms = std::chrono::duration_cast<milliseconds>(std::chrono::system_clock::duration::max()).count();
  const nlohmann::json& ms = doc["saved_at_ms"];
  if (ms.is_number_unsigned() ? ms.get<std::uint64_t>() > static_cast<std::uint64_t>(max_ms)
                              : (ms.get<std::int64_t>() < min_ms || ms.get<std::int64_t>() > max_ms))
    return corrupt("payload saved_at_ms " + ms.dump() + " is out of range");
  out.saved_at = std::chrono::system_clock::time_point(milliseconds(ms.get<std::int64_t>()));
  if (auto v = doc.find("version"); v != doc.end() && v->is_number_unsigned())
    out.saved_version = v->get<std::uint64_t>();
  doc.erase("saved_at");
  doc.erase("saved_at_ms");
  auto set = peer_set_from_json(doc);
  if (!set) return set.error().with_context("payload");
  out.set = std::move(set).value();
  return out;
}

/// Reads and decodes the snapshot at `path`. Errors name the path and the reason.
inline Result<LoadedSnapshot> load_snapshot(const std::string& path) {
  auto data = detail::read_file(path, DYNUP_MAX_SNAPSHOT_BYTES);
  if (!data) return data.error();
  auto decoded = decode_snapshot(data.value());
  if (!decoded) return decoded.error().with_context(path);
  return decoded;
}

DYNUP_NAMESPACE_END
