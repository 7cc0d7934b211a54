// dynup's policies against real nginx: for the same servers and weights, round_robin
// must produce nginx's request sequence and ring_hash must send every key where
// `hash $key consistent` does. nginx is required: without it these tests fail.
#include <support/nginx.hpp>

#include <dynup/balance/policy.hpp>
#include <dynup/balance/ring_hash.hpp>
#include <dynup/detail/crc32.hpp>
#include <dynup/peer_set.hpp>

#include <doctest/doctest.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <vector>

namespace {

using dynup_test::Nginx;
using dynup_test::NginxUpstream;

// CI installs nginx, so its absence is a broken setup to report, never a skip.
void require_nginx() {
  std::string why = dynup_test::nginx_missing_reason(dynup_test::nginx_binary());
  REQUIRE_MESSAGE(why.empty(), why);
}

// Ids that sort in nginx's server-line order ("p00", "p01", ...): dynup orders peers by
// id, nginx by position in the upstream block.
std::string peer_id(std::size_t i) {
  std::string n = std::to_string(i);
  return "p" + std::string(n.size() < 2 ? 2 - n.size() : 0, '0') + n;
}

// Backend i of `ngx` as a dynup peer: same address, same weight, id peer_id(i) (or
// peer_id(n - 1 - i) when `reversed`, so id order is the reverse of server-line order).
dynup::Snapshot peers_of(const Nginx& ngx, const std::vector<std::uint32_t>& weights, bool reversed = false) {
  std::size_t n = weights.size();
  std::vector<dynup::Peer> peers;
  for (std::size_t i = 0; i < n; ++i) {
    dynup::Peer p;
    p.id = peer_id(reversed ? n - 1 - i : i);
    p.host = "127.0.0.1";
    p.port = ngx.backend_ports().at(i);
    p.weight = weights[i];
    peers.push_back(std::move(p));
  }
  auto set = dynup::PeerSet::make(std::move(peers));
  REQUIRE_MESSAGE(set, set.error().message());
  for (std::size_t i = 0; i < n; ++i) REQUIRE((*set)[i].port == ngx.backend_ports().at(reversed ? n - 1 - i : i));
  return std::make_shared<const dynup::PeerSet>(std::move(set).value());
}

std::unique_ptr<dynup::Policy> policy(const char* name, const nlohmann::json& options) {
  auto p = dynup::make_policy(name, options);
  REQUIRE_MESSAGE(p, p.error().message());
  return std::move(p).value();
}

std::string join(const std::vector<std::uint32_t>& v) {
  std::string s = "{";
  for (std::size_t i = 0; i < v.size(); ++i) s += (i ? "," : "") + std::to_string(v[i]);
  return s + "}";
}

// "[from..to): a b c" with backends as their indices, for a mismatch report.
std::string window(const std::vector<std::size_t>& seq, std::size_t at) {
  std::size_t from = at >= 10 ? at - 10 : 0;
  std::size_t to = std::min(seq.size(), at + 10);
  std::ostringstream os;
  os << "[" << from << ".." << to << "):";
  for (std::size_t k = from; k < to; ++k) os << (k == at ? " >" : " ") << seq[k];
  return os.str();
}

// nginx's backend for each of `n` requests vs dynup round_robin pinned at start 0.
void check_round_robin(const std::vector<std::uint32_t>& weights) {
  require_nginx();
  std::uint64_t sum = std::accumulate(weights.begin(), weights.end(), std::uint64_t{0});
  std::size_t n = static_cast<std::size_t>(std::max<std::uint64_t>(100, 3 * sum));
  INFO("weights " << join(weights) << ", " << n << " requests");

  Nginx ngx(NginxUpstream{weights, ""});
  std::vector<std::size_t> want = ngx.record(n);

  auto rr = policy("round_robin", {{"start", 0}});
  auto picker = rr->build(peers_of(ngx, weights));
  std::vector<std::size_t> got;
  for (std::size_t k = 0; k < n; ++k) {
    dynup::Selection s = picker->pick({});
    REQUIRE_MESSAGE(s, "pick " << k << ": " << dynup::to_string(s.error));
    got.push_back(s.index);
  }

  REQUIRE(got.size() == want.size());
  auto at = static_cast<std::size_t>(std::mismatch(want.begin(), want.end(), got.begin()).first - want.begin());
  if (at < n)
    FAIL_CHECK("first difference at request " << at << ": nginx chose backend " << want[at] << ", dynup "
                                              << got[at] << "\n  nginx " << window(want, at) << "\n  dynup "
                                              << window(got, at));
  CHECK(at == n);

  // Every backend served its weight's share (catches a harness that routes wrongly).
  std::vector<std::uint64_t> count(weights.size(), 0);
  for (std::size_t i : want) ++count[i];
  std::uint64_t periods = n / sum;
  for (std::size_t i = 0; i < weights.size(); ++i) CHECK(count[i] >= periods * weights[i]);
}

} // namespace

TEST_CASE("round_robin picks nginx's sequence for equal weights {1,1,1}") { check_round_robin({1, 1, 1}); }

TEST_CASE("round_robin picks nginx's sequence for weights {5,1,1}") { check_round_robin({5, 1, 1}); }

TEST_CASE("round_robin picks nginx's sequence for weights {3,2,1,1}") { check_round_robin({3, 2, 1, 1}); }

TEST_CASE("round_robin picks nginx's sequence for weights {10,7,3,1,1}") { check_round_robin({10, 7, 3, 1, 1}); }

TEST_CASE("round_robin picks nginx's sequence for 50 peers with random weights 1..10") {
  // mt19937's output is fixed by the standard (unlike the distributions), so the vector
  // is the same everywhere.
  std::mt19937 rng(20240611);
  std::vector<std::uint32_t> weights(50);
  for (auto& w : weights) w = 1 + static_cast<std::uint32_t>(rng() % 10);
  check_round_robin(weights);
}

namespace {

// ~1 200 keys: "key-0".."key-999", random printable strings (fixed seed), and unusual
// ones: UTF-8, bytes >= 0x80, characters that mean something in URLs, one very long.
// None empty or with leading/trailing blanks (nginx would hash another key).
std::vector<std::string> ring_keys() {
  std::vector<std::string> keys;
  for (int i = 0; i < 1000; ++i) keys.push_back("key-" + std::to_string(i));
  std::mt19937 rng(7);
  for (int i = 0; i < 200; ++i) {
    std::string k(1 + rng() % 40, ' ');
    for (char& c : k) c = static_cast<char>('!' + rng() % 94); // '!'..'~'
    keys.push_back(k);
  }
  for (const char* k : {"a", "0", "ключ", "日本語のキー", "caf\xc3\xa9", "\xff\xfe\x80\x81", "%41%20b",
                        "a&b=c;d", "/path/to?x=1#frag", "inner  spaces", "tab\tinside", "\"quoted\"",
                        "back\\slash", "user@example.com", "12345678901234567890", "KEY-1", "-", "~!@#$^*()_+"})
    keys.push_back(k);
  keys.push_back(std::string(3000, 'x') + "long");
  return keys;
}

// Backends that own a ketama point with hash `h` in nginx's ring: more than one when
// two servers' points collide, and then nginx keeps either (its qsort is unstable).
std::vector<std::size_t> owners_of_point(const Nginx& ngx, const std::vector<std::uint32_t>& weights,
                                         std::uint32_t h) {
  std::vector<std::size_t> out;
  for (std::size_t i = 0; i < weights.size(); ++i) {
    std::vector<dynup::detail::RingPoint> pts(weights[i] * 160u);
    dynup::detail::ketama_points(dynup::detail::ketama_base(ngx.server_text(i)),
                                 static_cast<std::uint32_t>(pts.size()), 0, pts.data());
    for (const auto& p : pts)
      if (p.hash == h) out.push_back(i);
  }
  return out;
}

// nginx `hash <key> consistent` vs dynup ring_hash, key by key.
void check_ring_hash(const std::vector<std::uint32_t>& weights, bool reversed_ids) {
  require_nginx();
  INFO("weights " << join(weights)
                  << (reversed_ids ? std::string(", dynup ids in reverse server-line order") : std::string()));
  std::vector<std::string> keys = ring_keys();

  Nginx ngx(NginxUpstream{weights, std::string("hash ") + Nginx::key_variable + " consistent;"});
  std::vector<std::size_t> want = ngx.map_keys(keys);

  dynup::Snapshot set = peers_of(ngx, weights, reversed_ids);
  std::map<std::uint16_t, std::size_t> backend_of_port;
  for (std::size_t i = 0; i < weights.size(); ++i) backend_of_port[ngx.backend_ports()[i]] = i;
  // dynup builds the ring from host_port(); nginx from the server line's text.
  for (const dynup::Peer& p : *set)
    CHECK(dynup::host_port(p.host, p.port) == ngx.server_text(backend_of_port.at(p.port)));

  auto rh = policy("ring_hash", {});
  auto picker = rh->build(set);
  auto* ring = dynamic_cast<const dynup::RingHashPicker*>(picker.get());
  REQUIRE(ring != nullptr);
  CHECK(ring->exact());

  std::size_t mismatches = 0, collisions = 0;
  for (std::size_t k = 0; k < keys.size(); ++k) {
    dynup::PickContext ctx;
    ctx.key = keys[k];
    dynup::Selection s = picker->pick(ctx);
    REQUIRE_MESSAGE(s, "key \"" << keys[k] << "\": " << dynup::to_string(s.error));
    std::size_t got = backend_of_port.at(s.peer->port);
    if (got == want[k]) continue;
    // The one documented difference: a key on a hash two servers share.
    std::uint32_t point = ring->ring(0)[ring->ring(0).find(dynup::detail::crc32(keys[k]))].hash;
    auto owners = owners_of_point(ngx, weights, point);
    if (owners.size() > 1 && std::find(owners.begin(), owners.end(), want[k]) != owners.end()) {
      ++collisions;
      continue;
    }
    if (++mismatches <= 10)
      FAIL_CHECK("key #" << k << " \"" << keys[k] << "\" (crc32 " << dynup::detail::crc32(keys[k])
                         << "): nginx chose backend " << want[k] << " (" << ngx.server_text(want[k]) << "), dynup "
                         << got << " (" << ngx.server_text(got) << ")");
  }
  if (collisions > 0) MESSAGE(collisions << " key(s) fell on a point two servers share; nginx may keep either");
  CHECK_MESSAGE(mismatches == 0, mismatches << " of " << keys.size() << " keys map differently");

  // Keys spread over the backends (a harness stuck on one backend would agree with a
  // broken ring only by accident). Not all of them: a weight-1 server among 50 expects
  // ~4 of the keys and may get none.
  std::set<std::size_t> hit(want.begin(), want.end());
  CHECK_MESSAGE(hit.size() >= (weights.size() + 1) / 2, "only " << hit.size() << " backends got keys");
}

} // namespace

TEST_CASE("ring_hash maps keys like nginx hash consistent for 3 equal servers") { check_ring_hash({1, 1, 1}, false); }

TEST_CASE("ring_hash maps keys like nginx hash consistent for weights {1,2,3,1,5}") {
  check_ring_hash({1, 2, 3, 1, 5}, false);
}

TEST_CASE("ring_hash maps keys like nginx hash consistent for 20 mixed weights, any server order") {
  check_ring_hash({1, 3, 2, 5, 1, 1, 4, 10, 2, 1, 7, 1, 3, 2, 1, 6, 1, 2, 9, 1}, true);
}

TEST_CASE("ring_hash maps keys like nginx hash consistent for 50 servers with random weights") {
  std::mt19937 rng(99);
  std::vector<std::uint32_t> weights(50);
  for (auto& w : weights) w = 1 + static_cast<std::uint32_t>(rng() % 10);
  check_ring_hash(weights, false);
}
