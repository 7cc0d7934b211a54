// Source specs: parse_source_spec, ConsulSource::from_spec, EtcdSource::from_spec and
// Watcher::validate, on the input as spec text. DYNUP_FUZZ_TOKEN holds a token for
// token_env=DYNUP_FUZZ_TOKEN.
//
// Properties: nothing throws; a parsed spec has a known scheme, and a host and port
// 1..65535 (consul, etcd) or a non-empty path without NUL (file); no error, describe()
// or request target quotes a token given with token= or read from token_env; request
// targets hold no control, space or non-ASCII byte; a source built again from its
// describe() describes itself the same way and sends the same requests; validate agrees
// with the scheme's own parser; errors are invalid_argument (unsupported for an unknown
// scheme).
#include "fuzz_common.hpp"

#include <dynup/source/consul.hpp>
#include <dynup/source/etcd.hpp>
#include <dynup/source/spec.hpp>
#include <dynup/watch/any.hpp>

#include <nlohmann/json.hpp>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

namespace {

constexpr const char* env_token = "SECRET-env-9d41c7e2";

void check_secret_free(std::string_view spec, const std::string& text) {
  dynup_fuzz::check_no_token(spec, text);
  if (!dynup_fuzz::contains(spec, env_token))
    DYNUP_FUZZ_CHECK(!dynup_fuzz::contains(text, env_token), "the token_env token in: " + text);
}

void check_target(std::string_view spec, const std::string& target) {
  for (unsigned char c : target) DYNUP_FUZZ_CHECK(c > 0x20 && c < 0x7f, "byte in request target: " + target);
  check_secret_free(spec, target);
}

bool consul(std::string_view text) {
  using namespace std::chrono_literals;
  auto s = dynup::ConsulSource::from_spec(text);
  if (!s) {
    DYNUP_FUZZ_CHECK(s.error().code() == dynup::Errc::invalid_argument, s.error().message());
    check_secret_free(text, s.error().message());
    return false;
  }
  auto parsed = dynup::parse_source_spec(text);
  DYNUP_FUZZ_CHECK(parsed, "from_spec(text) accepted what parse_source_spec refused");
  auto from_parsed = dynup::ConsulSource::from_spec(*parsed);
  DYNUP_FUZZ_CHECK(from_parsed && from_parsed->describe() == s->describe(), s->describe());

  const std::string described = s->describe();
  check_secret_free(text, described);
  auto again = dynup::ConsulSource::from_spec(described);
  DYNUP_FUZZ_CHECK(again, described + " does not parse: " + (again ? std::string() : again.error().message()));
  DYNUP_FUZZ_CHECK(again->describe() == described, described + " → " + again->describe());
  for (std::uint64_t index : {std::uint64_t{0}, std::uint64_t{7}}) {
    auto req = s->request(index, 90s);
    check_target(text, req.target);
    DYNUP_FUZZ_CHECK(again->request(index, 90s).target == req.target, req.target);
    for (const auto& [name, value] : req.headers) {
      DYNUP_FUZZ_CHECK(name == "X-Consul-Token", name);
      for (unsigned char c : value) DYNUP_FUZZ_CHECK(c >= 0x20 && c != 0x7f, "control byte in the token header");
    }
  }
  return true;
}

bool etcd(std::string_view text) {
  auto s = dynup::EtcdSource::from_spec(text);
  if (!s) {
    DYNUP_FUZZ_CHECK(s.error().code() == dynup::Errc::invalid_argument, s.error().message());
    check_secret_free(text, s.error().message());
    return false;
  }
  DYNUP_FUZZ_CHECK(!s->host().empty() && s->port() != 0 && !s->key().empty(), s->describe());
  if (s->layout() == dynup::EtcdLayout::keys) {
    DYNUP_FUZZ_CHECK(s->key().back() == '/', s->key());
    DYNUP_FUZZ_CHECK(s->range_end() > s->key() || s->range_end() == std::string(1, '\0'), s->range_end());
  }
  const std::string described = s->describe();
  auto again = dynup::EtcdSource::from_spec(described);
  DYNUP_FUZZ_CHECK(again, described + " does not parse: " + (again ? std::string() : again.error().message()));
  DYNUP_FUZZ_CHECK(again->describe() == described && again->key() == s->key() && again->layout() == s->layout() &&
                       again->host() == s->host() && again->port() == s->port(),
                   described + " → " + again->describe());
  DYNUP_FUZZ_CHECK(nlohmann::json::accept(s->range_request().body), s->range_request().body);
  DYNUP_FUZZ_CHECK(nlohmann::json::accept(s->watch_request(1).body), s->watch_request(1).body);
  return true;
}

} // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  ::setenv("DYNUP_FUZZ_TOKEN", env_token, 1);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::string_view text = dynup_fuzz::text_of(data, size);

  auto spec = dynup::parse_source_spec(text);
  if (spec) {
    const auto& s = *spec;
    DYNUP_FUZZ_CHECK(s.scheme == "file" || s.scheme == "consul" || s.scheme == "etcd", s.scheme);
    if (s.scheme == "file") {
      DYNUP_FUZZ_CHECK(s.host.empty() && s.port == 0 && s.query.empty(), "a file spec with host, port or query");
      DYNUP_FUZZ_CHECK(!s.path.empty() && s.path.find('\0') == std::string::npos, s.path);
    } else {
      DYNUP_FUZZ_CHECK(!s.host.empty() && s.port != 0, s.host);
    }
  } else {
    DYNUP_FUZZ_CHECK(spec.error().code() == dynup::Errc::invalid_argument, spec.error().message());
  }

  auto colon = text.find(':');
  std::string_view scheme = text.substr(0, colon == std::string_view::npos ? 0 : colon);
  bool built = scheme == "consul" ? consul(text) : scheme == "etcd" ? etcd(text) : false;

  auto valid = dynup::Watcher::validate(text);
  if (!valid) {
    auto code = valid.error().code();
    DYNUP_FUZZ_CHECK(code == dynup::Errc::invalid_argument || code == dynup::Errc::unsupported,
                     valid.error().message());
    if (scheme != "file") check_secret_free(text, valid.error().message());
  }
  if (scheme == "consul" || scheme == "etcd")
    DYNUP_FUZZ_CHECK(bool(valid) == built, "validate and from_spec disagree");
  else if (scheme == "file")
    DYNUP_FUZZ_CHECK(bool(valid) == bool(spec), "validate and parse_source_spec disagree on a file spec");
  return 0;
}
