// Peer: one upstream endpoint as a registry describes it.
#pragma once

#include <dynup/result.hpp>
#include <dynup/version.hpp>

#include <arpa/inet.h>

#include <charconv>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#ifndef DYNUP_MAX_WEIGHT
// Largest accepted weight. 65535 covers Consul Weights and DNS SRV weights, and
// keeps sum(weight) of 10 000 peers far from overflowing a 32-bit counter.
#define DYNUP_MAX_WEIGHT 65535
#endif

DYNUP_NAMESPACE_BEGIN

inline constexpr std::uint32_t max_weight = DYNUP_MAX_WEIGHT;

/// The registry's view of a peer. Active and passive checks (HealthView) come on top.
enum class Health : std::uint8_t { passing, warning, critical, unknown };

constexpr const char* to_string(Health h) noexcept {
  switch (h) {
  case Health::passing: return "passing";
  case Health::warning: return "warning";
  case Health::critical: return "critical";
  case Health::unknown: return "unknown";
  }
  return "unknown";
}

/// Parses "passing" / "warning" / "critical" / "unknown".
inline Result<Health> parse_health(std::string_view s) {
  if (s == "passing") return Health::passing;
  if (s == "warning") return Health::warning;
  if (s == "critical") return Health::critical;
  if (s == "unknown") return Health::unknown;
  return Error(Errc::invalid_argument, "health \"" + std::string(s) +
                                           "\" is not one of passing, warning, critical, unknown");
}

/// One endpoint. A plain value type: copy it, compare it, put it in containers.
/// `PeerSet::make` validates and canonicalizes peers; a Peer on its own may be invalid.
struct Peer {
  std::string id;   ///< unique within a set; defaults to "host:port" ("[v6]:port")
  std::string host; ///< IPv4, IPv6 (no brackets) or DNS name
  std::uint16_t port = 0;
  std::uint32_t weight = 1; ///< 1..max_weight
  bool backup = false;      ///< used only when no primary peer is available
  std::string zone;
  std::vector<std::string> tags;          ///< sorted and de-duplicated by validation
  std::map<std::string, std::string> meta;
  Health health = Health::passing;

  friend bool operator==(const Peer& a, const Peer& b) {
    return a.id == b.id && a.host == b.host && a.port == b.port && a.weight == b.weight &&
           a.backup == b.backup && a.zone == b.zone && a.tags == b.tags && a.meta == b.meta &&
           a.health == b.health;
  }
  friend bool operator!=(const Peer& a, const Peer& b) { return !(a == b); }
};

/// The kind of text in Peer::host.
enum class HostKind { ipv4, ipv6, dns };

namespace detail {

inline bool is_dns_name(std::string_view s) {
  // RFC 1123 host names; '_' is accepted because registries (Consul node names,
  // SRV-style labels) use it in practice.
  if (!s.empty() && s.back() == '.') s.remove_suffix(1); // fully qualified form
  if (s.empty() || s.size() > 253) return false;
  std::size_t label = 0;
  char prev = '.';
  for (char c : s) {
    if (c == '.') {
      if (label == 0 || prev == '-') return false;
      label = 0;
    } else {
      bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                c == '-' || c == '_';
      if (!ok || ++label > 63 || (label == 1 && c == '-')) return false;
    }
    prev = c;
  }
  return label > 0 && prev != '-';
}

} // namespace detail

/// Canonical host text: IPv4 and IPv6 in inet_ntop form (brackets removed),
/// DNS names lower-cased without a trailing dot. Errors name what is wrong.
inline Result<std::string> canonical_host(std::string_view host) {
  if (host.empty()) return Error(Errc::invalid_peer, "host is empty");
  std::string h(host);
  if (h.size() >= 2 && h.front() == '[' && h.back() == ']') h = h.substr(1, h.size() - 2);
  unsigned char buf[16];
  char out[INET6_ADDRSTRLEN];
  // glibc's inet_pton accepts only canonical dotted quads (no leading zeros, no
  // octal or hex parts), so accepted IPv4 text needs no reformatting.
  if (inet_pton(AF_INET, h.c_str(), buf) == 1) return h;
  if (h.find(':') != std::string::npos) {
    if (inet_pton(AF_INET6, h.c_str(), buf) != 1)
      return Error(Errc::invalid_peer, "host \"" + std::string(host) + "\" is not a valid IPv6 address");
    inet_ntop(AF_INET6, buf, out, sizeof out);
    return std::string(out);
  }
  // Resolvers read "0x7f.1" or "0177.0.0.1" as IPv4 (inet_aton); as a "name" it would
  // reach an address nobody wrote and dodge duplicate detection.
  std::string unqualified = !h.empty() && h.back() == '.' ? h.substr(0, h.size() - 1) : h;
  in_addr legacy{};
  if (inet_aton(unqualified.c_str(), &legacy) != 0)
    return Error(Errc::invalid_peer, "host \"" + std::string(host) +
                                         "\" is an IPv4 address in a non-standard form (write a.b.c.d)");
  bool all_digits_and_dots = h.find_first_not_of("0123456789.") == std::string::npos;
  if (all_digits_and_dots || !detail::is_dns_name(h))
    return Error(Errc::invalid_peer, "host \"" + std::string(host) +
                                         "\" is neither an IP address nor a valid DNS name");
  for (char& c : h)
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  if (h.back() == '.') h.pop_back();
  return h;
}

/// Kind of an already canonical host.
inline HostKind host_kind(std::string_view canonical) noexcept {
  if (canonical.find(':') != std::string_view::npos) return HostKind::ipv6;
  if (!canonical.empty() && canonical.find_first_not_of("0123456789.") == std::string_view::npos)
    return HostKind::ipv4;
  return HostKind::dns;
}

/// "host:port", with brackets around IPv6 hosts: the default peer id and the
/// form used in logs.
inline std::string host_port(std::string_view host, std::uint16_t port) {
  std::string s;
  s.reserve(host.size() + 8);
  bool v6 = host.find(':') != std::string_view::npos;
  if (v6) s += '[';
  s += host;
  if (v6) s += ']';
  char digits[8];
  auto end = std::to_chars(digits, digits + sizeof digits, port).ptr;
  s += ':';
  s.append(digits, end);
  return s;
}

/// Parses "host:port" or "[v6]:port" into a peer with default fields (not yet validated).
inline Result<Peer> parse_host_port(std::string_view text) {
  std::string_view host, port;
  if (!text.empty() && text.front() == '[') {
    auto close = text.find(']');
    if (close == std::string_view::npos || close + 1 >= text.size() || text[close + 1] != ':')
      return Error(Errc::invalid_peer, "\"" + std::string(text) + "\" is not [ipv6]:port");
    host = text.substr(1, close - 1);
    port = text.substr(close + 2);
  } else {
    auto colon = text.rfind(':');
    if (colon == std::string_view::npos || text.find(':') != colon)
      return Error(Errc::invalid_peer, "\"" + std::string(text) +
                                           "\" is not host:port (write IPv6 as [addr]:port)");
    host = text.substr(0, colon);
    port = text.substr(colon + 1);
  }
  unsigned long value = 0;
  if (port.empty() || port.size() > 5 || port.find_first_not_of("0123456789") != std::string_view::npos ||
      (value = std::stoul(std::string(port))) < 1 || value > 65535)
    return Error(Errc::invalid_peer, "\"" + std::string(text) + "\": port must be 1..65535");
  Peer p;
  p.host = std::string(host);
  p.port = static_cast<std::uint16_t>(value);
  return p;
}

DYNUP_NAMESPACE_END
