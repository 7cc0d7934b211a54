// Properties the fuzz targets share. A violated property prints what was expected and
// traps, so libFuzzer keeps the input as a crash (crash-<sha1> in the artifact prefix).
#pragma once

#include <dynup/peer.hpp>
#include <dynup/peer_json.hpp>
#include <dynup/peer_set.hpp>
#include <dynup/result.hpp>
#include <dynup/source/spec.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace dynup_fuzz {

[[noreturn]] inline void violated(const char* property, const std::string& detail) {
  std::fprintf(stderr, "\n*** property violated: %s\n%s\n", property, detail.c_str());
  std::fflush(stderr);
  __builtin_trap();
}

// The detail is built only when the property fails: it is often a whole document.
#define DYNUP_FUZZ_CHECK(cond, detail)                                                                                \
  do {                                                                                                                 \
    if (!(cond)) ::dynup_fuzz::violated(#cond, (detail));                                                              \
  } while (0)

/// Input bytes as text.
inline std::string_view text_of(const std::uint8_t* data, std::size_t size) {
  return {reinterpret_cast<const char*>(data), size};
}

/// An input's first byte, which selects what a target exercises, and the rest.
struct Selected {
  unsigned char selector;
  std::string_view rest;
};

/// Splits an input into its selector byte and the rest; nothing for an empty input.
inline std::optional<Selected> split_selector(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return std::nullopt;
  return Selected{data[0], text_of(data + 1, size - 1)};
}

inline bool contains(std::string_view haystack, std::string_view needle) {
  return !needle.empty() && haystack.find(needle) != std::string_view::npos;
}

/// Every peer of a published set is valid and canonical: what PeerSet::make promises,
/// checked from the outside. Building the set again from its own peers changes nothing.
inline void check_valid_set(const dynup::PeerSet& set) {
  const dynup::Peer* prev = nullptr;
  for (const dynup::Peer& p : set) {
    DYNUP_FUZZ_CHECK(!p.host.empty(), "peer " + p.id);
    DYNUP_FUZZ_CHECK(p.port != 0, "peer " + p.id);
    DYNUP_FUZZ_CHECK(p.weight >= 1 && p.weight <= dynup::max_weight, "peer " + p.id);
    DYNUP_FUZZ_CHECK(dynup::detail::bad_id(p.id) == nullptr, "peer " + p.id);
    auto host = dynup::canonical_host(p.host);
    DYNUP_FUZZ_CHECK(host && *host == p.host, "peer " + p.id + " host " + p.host);
    for (std::size_t i = 1; i < p.tags.size(); ++i)
      DYNUP_FUZZ_CHECK(p.tags[i - 1] < p.tags[i], "peer " + p.id + ": tags not sorted and unique");
    DYNUP_FUZZ_CHECK(prev == nullptr || prev->id < p.id, "ids not sorted and unique at " + p.id);
    DYNUP_FUZZ_CHECK(set.find(p.id) == &p, "find(" + p.id + ")");
    prev = &p;
  }
  auto again = dynup::PeerSet::make(set.peers(), set.source_index());
  DYNUP_FUZZ_CHECK(again, again ? std::string() : again.error().message());
  DYNUP_FUZZ_CHECK(again->same_content(set) && again->content_hash() == set.content_hash(), dynup::to_json(set));
  DYNUP_FUZZ_CHECK(dynup::diff(set, *again).empty(), dynup::to_json(set));
}

/// The set written in the peer format (what status output, snapshot files and the shared
/// region carry) reads back as the same set, and writing that again gives the same text.
inline void check_json_round_trip(const dynup::PeerSet& set) {
  std::string text = dynup::to_json(set);
  auto back = dynup::parse_peer_set(text);
  DYNUP_FUZZ_CHECK(back, text + "\n" + (back ? std::string() : back.error().message()));
  DYNUP_FUZZ_CHECK(back->same_content(set), text);
  DYNUP_FUZZ_CHECK(back->content_hash() == set.content_hash(), text);
  DYNUP_FUZZ_CHECK(back->source_index() == set.source_index(), text);
  DYNUP_FUZZ_CHECK(dynup::to_json(*back) == text, text);
}

/// Percent-decodes the valid %XX escapes of `s` and keeps the rest as it is.
inline std::string lenient_decode(std::string_view s) {
  std::string out;
  for (std::size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '%' && i + 2 < s.size()) {
      if (auto d = dynup::detail::percent_decode(s.substr(i, 3), "")) {
        out += *d;
        i += 2;
        continue;
      }
    }
    out += s[i];
  }
  return out;
}

/// A token text no message can put together from other pieces: "SECRET" and at least four
/// more of [A-Za-z0-9_-]. Messages quote spec and body text between quotes, after ':' or
/// '=', or with control bytes made spaces, so a token with a quote, space or ':' could be
/// formed from quoted text and the message's own words.
inline bool is_token_char(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '-';
}
inline bool is_marked_token(std::string_view t) {
  if (t.size() < 10 || t.substr(0, 6) != "SECRET") return false;
  for (char c : t)
    if (!is_token_char(c)) return false;
  return true;
}

/// The values of a spec's token= items (the key may be percent-encoded), raw and decoded,
/// that a message could only have taken from the token: marked (is_marked_token) and
/// found nowhere else in the spec, raw or decoded. An error must never contain one.
inline std::vector<std::string> spec_tokens(std::string_view spec) {
  auto q = spec.find('?');
  if (q == std::string_view::npos) return {};
  std::vector<std::string> values;
  std::string rest(spec.substr(0, q + 1));
  std::string_view query = spec.substr(q + 1);
  while (true) {
    auto amp = query.find('&');
    std::string_view item = query.substr(0, amp);
    auto eq = item.find('=');
    auto key = dynup::detail::percent_decode(item.substr(0, eq), "");
    if (eq != std::string_view::npos && key && *key == "token") {
      std::string_view raw = item.substr(eq + 1);
      values.emplace_back(raw);
      if (auto decoded = dynup::detail::percent_decode(raw, "")) values.push_back(*decoded);
      rest += item.substr(0, eq + 1);
    } else {
      rest += item;
    }
    if (amp == std::string_view::npos) break;
    rest += '&';
    query.remove_prefix(amp + 1);
  }
  std::string decoded_rest = lenient_decode(rest);
  std::vector<std::string> out;
  for (auto& v : values)
    if (is_marked_token(v) && !contains(rest, v) && !contains(decoded_rest, v))
      out.push_back(std::move(v));
  return out;
}

/// No token of `spec` (see spec_tokens) in `message`. `elsewhere`: the rest of the input
/// the spec came from (a config's other fields); a token also found there may reach the
/// message from there (an invalid name is quoted), not from the spec.
inline void check_no_token(std::string_view spec, const std::string& message, std::string_view elsewhere = {}) {
  for (const std::string& t : spec_tokens(spec)) {
    if (contains(elsewhere, t)) continue;
    DYNUP_FUZZ_CHECK(!contains(message, t), "token \"" + t + "\" of spec \"" + std::string(spec) +
                                                 "\" in a message: " + message);
  }
}

/// Both of the above: what every decoder's successful output must satisfy.
inline void check_published_set(const dynup::PeerSet& set) {
  check_valid_set(set);
  check_json_round_trip(set);
}

} // namespace dynup_fuzz
