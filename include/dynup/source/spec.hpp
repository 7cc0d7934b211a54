// Source specs: the one string that names a source everywhere (config, CLI, nginx, Lua).
//   file:///etc/dynup/api.json          consul://127.0.0.1:8500/health/api?tag=v2
//   etcd://127.0.0.1:2379/upstreams/api/
#pragma once

#include <dynup/result.hpp>
#include <dynup/version.hpp>

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

DYNUP_NAMESPACE_BEGIN

/// A parsed source spec. Query values are percent-decoded; a key may repeat.
struct SourceSpec {
  std::string scheme;     ///< "file", "consul" or "etcd"
  std::string host;       ///< empty for file
  std::uint16_t port = 0; ///< 0 for file
  std::string path;       ///< file: the filesystem path; otherwise the URL path ("/health/api")
  std::vector<std::pair<std::string, std::string>> query;

  /// Every value of `key`, in order.
  std::vector<std::string> values(std::string_view key) const {
    std::vector<std::string> out;
    for (const auto& [k, v] : query)
      if (k == key) out.push_back(v);
    return out;
  }
  /// The last value of `key`, or nullptr.
  const std::string* value(std::string_view key) const noexcept {
    const std::string* found = nullptr;
    for (const auto& kv : query)
      if (kv.first == key) found = &kv.second;
    return found;
  }
};

namespace detail {

/// Percent-encodes every byte of `s` for which `keep(byte)` is false. O(n).
template <class Keep> std::string percent_encode(std::string_view s, Keep keep) {
  static constexpr char hex[] = "0123456789ABCDEF";
  std::string out;
  out.reserve(s.size());
  for (char ch : s) {
    auto c = static_cast<unsigned char>(ch);
    if (keep(c)) {
      out += ch;
    } else {
      out += '%';
      out += hex[c >> 4];
      out += hex[c & 15];
    }
  }
  return out;
}

/// Decodes %XX escapes; a malformed escape is an error naming `what`.
inline Result<std::string> percent_decode(std::string_view s, std::string_view what) {
  std::string out;
  out.reserve(s.size());
  auto hex = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  for (std::size_t i = 0; i < s.size(); ++i) {
    if (s[i] != '%') {
      out += s[i];
      continue;
    }
    if (i + 2 >= s.size() || hex(s[i + 1]) < 0 || hex(s[i + 2]) < 0)
      return Error(Errc::invalid_argument, "bad percent-escape in " + std::string(what));
    out += static_cast<char>(hex(s[i + 1]) * 16 + hex(s[i + 2]));
    i += 2;
  }
  return out;
}

/// Whether `s` is a URI scheme name (RFC 3986: a letter, then letters, digits, + - .).
/// Text before the first ':' that is not one is no scheme, and is not quoted as one: it
/// may hold a query, and a token with it.
inline bool is_scheme_name(std::string_view s) noexcept {
  auto alpha = [](char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); };
  if (s.empty() || !alpha(s.front())) return false;
  for (char c : s)
    if (!alpha(c) && !(c >= '0' && c <= '9') && c != '+' && c != '-' && c != '.') return false;
  return true;
}

/// The spec text with any token value replaced, for parse errors that quote the spec.
inline std::string redact_spec_text(std::string_view text) {
  std::string out(text);
  auto q = out.find('?');
  if (q == std::string::npos) return out;
  std::size_t pos = q + 1;
  while (pos < out.size()) {
    auto amp = out.find('&', pos);
    auto end = amp == std::string::npos ? out.size() : amp;
    auto eq = out.find('=', pos);
    if (eq != std::string::npos && eq < end) {
      auto key = percent_decode(std::string_view(out).substr(pos, eq - pos), "");
      if (key && *key == "token") {
        out.replace(eq + 1, end - eq - 1, "redacted");
        end = eq + 1 + 8;
      }
    }
    pos = end + 1;
  }
  return out;
}

} // namespace detail

/// Parses a spec. Errors say which part is wrong and list the supported schemes; they
/// quote the spec with any token= value replaced by "redacted".
inline Result<SourceSpec> parse_source_spec(std::string_view text) {
  auto bad = [&](const std::string& why) {
    return Error(Errc::invalid_argument, "source \"" + detail::redact_spec_text(text) + "\": " + why);
  };
  auto colon = text.find(':');
  if (colon == std::string_view::npos || !detail::is_scheme_name(text.substr(0, colon)))
    return bad("expected scheme://…, one of file://, consul://, etcd://");
  SourceSpec spec;
  spec.scheme = std::string(text.substr(0, colon));
  std::string_view rest = text.substr(colon + 1);
  if (spec.scheme == "file") {
    if (rest.substr(0, 2) == "//") rest.remove_prefix(2);
    auto path = detail::percent_decode(rest, "the file path");
    if (!path) return bad(path.error().message());
    if (path->empty()) return bad("the file path is empty");
    if (path->find('\0') != std::string::npos) return bad("the file path contains %00");
    spec.path = std::move(path).value();
    return spec;
  }
  if (spec.scheme != "consul" && spec.scheme != "etcd")
    return bad("unknown scheme \"" + spec.scheme + "\" (supported: file, consul, etcd)");
  if (rest.substr(0, 2) != "//") return bad("expected " + spec.scheme + "://host:port/…");
  rest.remove_prefix(2);
  auto q = rest.find('?');
  std::string_view query = q == std::string_view::npos ? std::string_view() : rest.substr(q + 1);
  rest = rest.substr(0, q);
  auto slash = rest.find('/');
  std::string_view authority = rest.substr(0, slash);
  std::string_view path = slash == std::string_view::npos ? std::string_view("/") : rest.substr(slash);
  std::string_view host, port;
  if (!authority.empty() && authority.front() == '[') {
    auto close = authority.find(']');
    if (close == std::string_view::npos) return bad("unterminated [IPv6] host");
    host = authority.substr(1, close - 1);
    if (close + 1 < authority.size()) {
      if (authority[close + 1] != ':') return bad("expected :port after ]");
      port = authority.substr(close + 2);
      if (port.empty()) return bad("the port after ':' is empty");
    }
  } else {
    auto c = authority.rfind(':');
    host = authority.substr(0, c);
    if (c != std::string_view::npos) {
      port = authority.substr(c + 1);
      if (port.empty()) return bad("the port after ':' is empty");
    }
  }
  if (host.empty()) return bad("the host is empty");
  // Brackets only enclose an IPv6 address, and a ':' outside them would make describe()
  // write a spec that does not parse back.
  if (host.find_first_of("[]") != std::string_view::npos ||
      (authority.front() != '[' && host.find(':') != std::string_view::npos))
    return bad("host \"" + std::string(host) + "\" is not a name or address (write IPv6 as [addr]:port)");
  spec.host = std::string(host);
  if (port.empty()) {
    spec.port = spec.scheme == "consul" ? 8500 : 2379;
  } else {
    unsigned long v = 0;
    if (port.size() > 5 || port.find_first_not_of("0123456789") != std::string_view::npos ||
        (v = std::stoul(std::string(port))) < 1 || v > 65535)
      return bad("port \"" + std::string(port) + "\" is not 1..65535");
    spec.port = static_cast<std::uint16_t>(v);
  }
  auto decoded_path = detail::percent_decode(path, "the path");
  if (!decoded_path) return bad(decoded_path.error().message());
  spec.path = std::move(decoded_path).value();
  while (!query.empty()) {
    auto amp = query.find('&');
    std::string_view item = query.substr(0, amp);
    query = amp == std::string_view::npos ? std::string_view() : query.substr(amp + 1);
    if (item.empty()) continue;
    auto eq = item.find('=');
    auto k = detail::percent_decode(item.substr(0, eq), "a query key");
    auto v = detail::percent_decode(eq == std::string_view::npos ? std::string_view() : item.substr(eq + 1),
                                    "a query value");
    if (!k) return bad(k.error().message());
    if (!v) return bad(v.error().message());
    spec.query.emplace_back(std::move(k).value(), std::move(v).value());
  }
  return spec;
}

DYNUP_NAMESPACE_END
