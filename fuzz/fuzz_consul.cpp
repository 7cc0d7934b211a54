// ConsulSource::decode on health, catalog and KV replies.
//
// Input: one selector byte, optional lines, then the reply body.
//   selector bits 0-2  source: health, catalog or kv, with the paths the fixtures use
//   selector bits 3-5  HTTP status: 200 (half the values), 404, 400, 403, 503
//   selector bit 6     the next line's [A-Za-z0-9_-] bytes are appended to "SECRET" to
//                      make the ACL token (else a fixed token); the source is built
//                      with token=<it>
//   selector bit 7     the next line is the X-Consul-Index header
//
// Properties: decode never throws; an error never contains the token; the status maps
// to the documented error code; a success is a valid, canonical set that round-trips
// through the peer format, with the index from X-Consul-Index; KV peers keep host:port ids.
#include "fuzz_common.hpp"

#include <dynup/source/consul.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <charconv>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace {

std::string_view take_line(std::string_view& in) {
  auto nl = in.find('\n');
  std::string_view line = in.substr(0, nl);
  in = nl == std::string_view::npos ? std::string_view() : in.substr(nl + 1);
  return line;
}

// consul_index's contract, written independently: a plain uint64 between blanks, else 0.
std::uint64_t expected_index(const std::string* header) {
  if (header == nullptr) return 0;
  std::string_view v = *header;
  auto first = v.find_first_not_of(" \t");
  if (first == std::string_view::npos) return 0;
  v = v.substr(first, v.find_last_not_of(" \t") - first + 1);
  std::uint64_t n = 0;
  auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), n);
  return ec == std::errc() && end == v.data() + v.size() ? n : 0;
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using dynup::ConsulSource;
  using dynup::Errc;
  const auto input = dynup_fuzz::split_selector(data, size);
  if (!input) return 0;
  const unsigned char selector = input->selector;
  std::string_view in = input->rest;

  static constexpr const char* paths[] = {"/health/api",
                                          "/catalog/api",
                                          "/kv/upstreams/api",
                                          "/health/api?zone_meta=rack_name&passing=0",
                                          "/kv/web",
                                          "/kv/zip",
                                          "/health/api?zone_meta=az",
                                          "/catalog/api?zone_meta=rack"};
  static constexpr int statuses[] = {200, 200, 200, 200, 404, 400, 403, 503};
  const int status = statuses[(selector >> 3) & 7u];

  // A token of marked characters only (fuzz_common.hpp), so finding it in a message is a leak.
  std::string token = "SECRET-0b8e1f2c-token";
  if (selector & 0x40u) {
    token = "SECRET";
    for (char c : take_line(in))
      if (dynup_fuzz::is_token_char(c)) token += c;
    token.resize(std::max<std::size_t>(token.size(), 10), '0');
  }
  std::string spec = std::string("consul://127.0.0.1:8500") + paths[selector & 7u];
  spec += (spec.find('?') == std::string::npos ? "?token=" : "&token=") + dynup::detail::url_escape(token);
  auto source = ConsulSource::from_spec(spec);
  DYNUP_FUZZ_CHECK(source, source ? std::string() : source.error().message());
  DYNUP_FUZZ_CHECK(!dynup_fuzz::contains(source->describe(), token), source->describe());

  dynup::HttpResponse reply;
  reply.status = status;
  if (selector & 0x80u) reply.headers.emplace_back("X-Consul-Index", std::string(take_line(in)));
  reply.body = std::string(in);

  auto decoded = source->decode(reply);
  const std::uint64_t index = expected_index(reply.header("x-consul-index"));
  if (!decoded) {
    const dynup::Error& e = decoded.error();
    DYNUP_FUZZ_CHECK(!dynup_fuzz::contains(e.message(), token), "token in error: " + e.message());
    const bool kv = source->mode() == ConsulSource::Mode::kv;
    Errc want = status == 200   ? Errc::parse_error
                : status == 404 ? Errc::not_found
                : status == 400 ? Errc::invalid_argument
                                : Errc::unavailable;
    DYNUP_FUZZ_CHECK(!(kv && status == 404), "KV 404 is an empty set, not an error: " + e.message());
    DYNUP_FUZZ_CHECK(e.code() == want, std::string(dynup::to_string(e.code())) + ": " + e.message());
    return 0;
  }
  DYNUP_FUZZ_CHECK(status == 200 || (status == 404 && source->mode() == ConsulSource::Mode::kv),
                   "HTTP " + std::to_string(status) + " decoded as a set");
  DYNUP_FUZZ_CHECK(decoded->index == index && decoded->set.source_index() == index,
                   std::to_string(decoded->index) + " != " + std::to_string(index));
  if (status == 200) {
    auto doc = nlohmann::json::parse(reply.body, nullptr, false);
    DYNUP_FUZZ_CHECK(!doc.is_discarded() && doc.is_array(), "a set from a body that is not a JSON array");
    DYNUP_FUZZ_CHECK(decoded->set.size() <= doc.size(), "more peers than entries");
  } else {
    DYNUP_FUZZ_CHECK(decoded->set.empty(), "KV 404 with peers");
  }
  dynup_fuzz::check_published_set(decoded->set);
  if (source->mode() == ConsulSource::Mode::kv)
    for (const dynup::Peer& p : decoded->set)
      DYNUP_FUZZ_CHECK(p.id == dynup::host_port(p.host, p.port), "KV peer id " + p.id);
  return 0;
}
