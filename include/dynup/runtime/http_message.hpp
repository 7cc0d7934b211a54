// The HTTP messages every client of dynup speaks: the blocking Transport of the
// watchers (watch/transport.hpp) and the runtime's non-blocking HttpClient
// (runtime/http.hpp). Plain data, no HTTP library behind it.
#pragma once

#include <dynup/version.hpp>

#include <cctype>
#include <chrono>
#include <cstddef>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#ifndef DYNUP_MAX_RESPONSE_BYTES
// A registry answer larger than this is refused, not buffered: a broken or hostile
// endpoint must not make every watcher allocate without bound. 64 MiB holds a Consul
// health answer of roughly 20 000 instances with their checks.
#define DYNUP_MAX_RESPONSE_BYTES (64u * 1024u * 1024u)
#endif

DYNUP_NAMESPACE_BEGIN

using HttpHeaders = std::vector<std::pair<std::string, std::string>>;

/// One request. `target` is the path plus an already encoded query string.
struct HttpRequest {
  std::string method = "GET";
  std::string target;
  HttpHeaders headers;
  std::string body;
  std::string content_type; ///< for a body; empty for none
  /// send(): the deadline for the whole exchange, from the call to the last body byte,
  /// however the server paces its bytes. stream(): the longest silence between bytes
  /// (a stream is long-lived; its reader bounds the time between messages itself). A
  /// blocking query sets it above the server's hold (Consul: wait + wait/16 + margin).
  std::chrono::milliseconds read_timeout{10000};
};

/// One response. Header names keep the server's case; `header` ignores case.
struct HttpResponse {
  int status = 0;
  HttpHeaders headers;
  std::string body;

  /// The first header with this name, compared case-insensitively, or nullptr.
  const std::string* header(std::string_view name) const noexcept {
    for (const auto& [k, v] : headers) {
      if (k.size() != name.size()) continue;
      bool same = true;
      for (std::size_t i = 0; i < k.size() && same; ++i)
        same = std::tolower(static_cast<unsigned char>(k[i])) == std::tolower(static_cast<unsigned char>(name[i]));
      if (same) return &v;
    }
    return nullptr;
  }
};

DYNUP_NAMESPACE_END
