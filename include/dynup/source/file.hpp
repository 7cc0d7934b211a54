// The file source: a JSON document of peers on disk (docs/FORMAT.md). Decoding only;
// watch/file_watcher.hpp owns the I/O and the change notifications.
#pragma once

#include <dynup/peer_json.hpp>
#include <dynup/peer_set.hpp>
#include <dynup/result.hpp>
#include <dynup/version.hpp>

#include <string_view>

#ifndef DYNUP_MAX_PEER_FILE_BYTES
#define DYNUP_MAX_PEER_FILE_BYTES (64u * 1024u * 1024u)
#endif

DYNUP_NAMESPACE_BEGIN

/// Decodes a peer file's bytes into a set carrying `index` (the file source's load
/// count). An "index" inside the document is ignored: the file source owns its index.
inline Result<PeerSet> decode_peer_file(std::string_view bytes, std::uint64_t index) {
  auto set = parse_peer_set(bytes);
  if (!set) return set.error();
  return std::move(set).value().with_source_index(index);
}

DYNUP_NAMESPACE_END
