// decode_snapshot: the last-known-good file read at boot.
//
// Input: one selector byte, then (by selector % 2)
//   0  the file as it is (header, payload)
//   1  a payload only: the harness writes a correct header for it (format 1, its length,
//      its CRC32C), so the fuzzer reaches the payload parser past the checksum
//
// Properties: nothing throws; a file with a correct header is never refused for its
// header; a decoded set is valid and round-trips through the peer format; encoding it
// again (encode_snapshot, what save_snapshot writes) decodes to the same set, index,
// version and save time; that file cut short by one byte, cut after its header, or
// with one payload byte changed is refused as corrupt.
#include "fuzz_common.hpp"

#include <dynup/detail/crc32.hpp>
#include <dynup/snapshot_file.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>

namespace {

std::string with_header(std::string_view payload) {
  char header[96];
  std::snprintf(header, sizeof header, "dynup-snapshot %d %zu %08x\n", dynup::snapshot_format_version,
                payload.size(), static_cast<unsigned>(dynup::detail::crc32c(payload)));
  return header + std::string(payload);
}

void check_refused(std::string_view data, const char* what) {
  auto r = dynup::decode_snapshot(data);
  DYNUP_FUZZ_CHECK(!r && r.error().code() == dynup::Errc::corrupt, std::string(what) + " was not refused");
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto input = dynup_fuzz::split_selector(data, size);
  if (!input) return 0;
  const unsigned char selector = input->selector;
  std::string_view in = input->rest;
  const bool fixed_header = selector % 2 == 1;
  const std::string file = fixed_header ? with_header(in) : std::string(in);

  auto loaded = dynup::decode_snapshot(file);
  if (!loaded) {
    const std::string& why = loaded.error().message();
    if (fixed_header) DYNUP_FUZZ_CHECK(why.compare(0, 7, "payload") == 0, "a correct header refused: " + why);
    return 0;
  }
  const dynup::PeerSet& set = loaded->set;
  DYNUP_FUZZ_CHECK(set.version() == 0, "a loaded set has a version");
  dynup_fuzz::check_published_set(set);

  std::string again = dynup::encode_snapshot(set, loaded->saved_at);
  auto reloaded = dynup::decode_snapshot(again);
  DYNUP_FUZZ_CHECK(reloaded, again + "\n" + (reloaded ? std::string() : reloaded.error().message()));
  DYNUP_FUZZ_CHECK(reloaded->set.same_content(set), again);
  DYNUP_FUZZ_CHECK(reloaded->set.source_index() == set.source_index(), again);
  DYNUP_FUZZ_CHECK(reloaded->saved_at == loaded->saved_at, again);
  DYNUP_FUZZ_CHECK(reloaded->saved_version == 0, again); // encode_snapshot wrote set.version()
  DYNUP_FUZZ_CHECK(dynup::encode_snapshot(reloaded->set, reloaded->saved_at) == again, again);

  check_refused(std::string_view(again).substr(0, again.size() - 1), "a file cut by one byte");
  check_refused(std::string_view(again).substr(0, again.find('\n') + 1), "a file cut after its header");
  std::string altered = again;
  std::size_t at = again.find('\n') + 1 + (selector >> 1) % (again.size() - again.find('\n') - 1);
  altered[at] = static_cast<char>(altered[at] ^ (1 + (selector >> 5)));
  check_refused(altered, "a file with one payload byte changed");
  return 0;
}
