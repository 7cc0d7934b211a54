// The limits that keep a broken or hostile registry from making dynup allocate without
// bound or forge log lines (docs/SECURITY.md): peers per set, label sizes, response size.
#include <dynup/peer_json.hpp>
#include <dynup/peer_set.hpp>
#include <dynup/upstream_config.hpp>
#include <dynup/watch/guard.hpp>
#include <dynup/runtime/http.hpp>
#include <dynup/runtime/runtime.hpp>

#include <support/text.hpp>

#include <doctest/doctest.h>
#include <httplib.h>

#include <chrono>
#include <future>
#include <string>
#include <thread>
#include <vector>

using dynup::Errc;
using dynup::Peer;
using dynup::PeerSet;
using dynup_test::contains;

namespace {

Peer peer(const std::string& host, std::uint16_t port = 80) {
  Peer p;
  p.host = host;
  p.port = port;
  return p;
}

std::vector<Peer> numbered(std::size_t n) {
  std::vector<Peer> peers;
  peers.reserve(n);
  for (std::size_t i = 0; i < n; ++i)
    peers.push_back(peer("10." + std::to_string(i >> 16 & 255) + "." + std::to_string(i >> 8 & 255) + "." +
                         std::to_string(i & 255)));
  return peers;
}

} // namespace

TEST_CASE("limits: a set of more than DYNUP_MAX_PEERS peers is refused before any peer is validated") {
  std::vector<Peer> peers(DYNUP_MAX_PEERS + 1, peer("10.0.0.1"));
  auto r = PeerSet::make(std::move(peers));
  REQUIRE_FALSE(r);
  CHECK(r.error().code() == Errc::too_large);
  CHECK(contains(r.error().message(), std::to_string(DYNUP_MAX_PEERS + 1) + " peers is more than"));
}

TEST_CASE("limits: zone, tags and meta beyond their limits name the peer and the field") {
  Peer ok = peer("10.0.0.1");
  ok.zone = std::string(DYNUP_MAX_LABEL_BYTES, 'z');
  ok.tags.assign(DYNUP_MAX_PEER_LABELS, std::string(DYNUP_MAX_LABEL_BYTES, 't'));
  for (int i = 0; i < DYNUP_MAX_PEER_LABELS; ++i)
    ok.meta["k" + std::to_string(i)] = std::string(DYNUP_MAX_META_VALUE_BYTES, 'v');
  CHECK(PeerSet::make({ok}).ok()); // exactly at every limit

  auto refused = [](Peer p, const std::string& why) {
    auto r = PeerSet::make({peer("10.0.0.9"), std::move(p)});
    REQUIRE_FALSE(r);
    CHECK(r.error().code() == Errc::invalid_peer);
    CHECK(contains(r.error().message(), "peers[1] \"10.0.0.2:80\": " + why));
  };
  Peer p = peer("10.0.0.2");
  p.zone = std::string(DYNUP_MAX_LABEL_BYTES + 1, 'z');
  refused(p, "zone is " + std::to_string(DYNUP_MAX_LABEL_BYTES + 1) + " bytes");
  p = peer("10.0.0.2");
  p.tags.assign(DYNUP_MAX_PEER_LABELS + 1, "t");
  refused(p, std::to_string(DYNUP_MAX_PEER_LABELS + 1) + " tags");
  p = peer("10.0.0.2");
  p.tags = {"a", std::string(DYNUP_MAX_LABEL_BYTES + 1, 't')};
  refused(p, "tags[1] is");
  p = peer("10.0.0.2");
  for (int i = 0; i <= DYNUP_MAX_PEER_LABELS; ++i) p.meta["k" + std::to_string(i)] = "v";
  refused(p, std::to_string(DYNUP_MAX_PEER_LABELS + 1) + " meta entries");
  p = peer("10.0.0.2");
  p.meta[std::string(DYNUP_MAX_LABEL_BYTES + 1, 'k')] = "v";
  refused(p, "a meta key is");
  p = peer("10.0.0.2");
  p.meta["k"] = std::string(DYNUP_MAX_META_VALUE_BYTES + 1, 'v');
  refused(p, "a meta value is");
}

TEST_CASE("limits: an id or label that is not UTF-8 is refused, whatever the source") {
  // JSON writes such bytes as U+FFFD, so the set would not read back from the status, the
  // snapshot file or the shared region as itself (two ids could even become one).
  auto refused = [](Peer p, const std::string& why) {
    auto r = PeerSet::make({peer("10.0.0.9"), std::move(p)});
    REQUIRE_FALSE(r);
    CHECK(r.error().code() == Errc::invalid_peer);
    CHECK_MESSAGE(contains(r.error().message(), why), r.error().message());
  };
  Peer p = peer("10.0.0.2");
  p.id = "web-\xff";
  refused(p, "id is not UTF-8");
  p = peer("10.0.0.2");
  p.id = "web-\xed\xa0\x80"; // an encoded surrogate
  refused(p, "id is not UTF-8");
  p = peer("10.0.0.2");
  p.zone = "eu-\xc3";
  refused(p, "zone is not UTF-8");
  p = peer("10.0.0.2");
  p.tags = {"ok", "\xc0\xaf"}; // an overlong '/'
  refused(p, "tags[1] is not UTF-8");
  p = peer("10.0.0.2");
  p.meta["\xfe"] = "v";
  refused(p, "a meta key is not UTF-8");
  p = peer("10.0.0.2");
  p.meta["k"] = "\xf4\x90\x80\x80"; // above U+10FFFF
  refused(p, "a meta value is not UTF-8");

  p = peer("10.0.0.2");
  p.id = "web-\xc3\xa9";
  p.zone = "z\xe2\x82\xac";
  p.tags = {"\xf0\x9f\x98\x80"};
  p.meta["cl\xc3\xa9"] = "v\xc3\xa9";
  auto ok = PeerSet::make({p});
  REQUIRE_MESSAGE(ok, ok.error().message());
  auto back = dynup::parse_peer_set(dynup::to_json(*ok));
  REQUIRE_MESSAGE(back, back.error().message());
  CHECK(back->same_content(*ok));
}

TEST_CASE("limits: an error names a peer without control characters and without its whole id") {
  Peer p = peer("10.0.0.1");
  p.id = "evil\n2026-11-26 [info] forged line\x1b[0m" + std::string(300, 'x');
  auto r = PeerSet::make({p});
  REQUIRE_FALSE(r);
  const std::string& m = r.error().message();
  for (unsigned char c : m) CHECK(c >= 0x20);
  CHECK(contains(m, "evil?2026-11-26 [info] forged line?[0m"));
  CHECK(contains(m, "...\": id is longer than 256 bytes"));
  CHECK(m.size() < 200);
}

TEST_CASE("limits: guards.max_peers refuses a larger set, and the config checks it against min_peers") {
  dynup::Guards g;
  g.max_peers = 3;
  auto three = PeerSet::make(numbered(3));
  auto four = PeerSet::make(numbered(4));
  REQUIRE(three);
  REQUIRE(four);
  CHECK(dynup::check_guards(g, PeerSet(), three.value()).ok());
  auto r = dynup::check_guards(g, three.value(), four.value());
  REQUIRE_FALSE(r);
  CHECK(r.error().code() == Errc::rejected);
  CHECK(contains(r.error().message(), "set of 4 peers, more than max_peers 3"));

  nlohmann::json c = {{"name", "api"}, {"source", "push://"}, {"guards", {{"max_peers", 2}}}};
  auto parsed = dynup::parse_upstream_config(c);
  REQUIRE(parsed);
  CHECK(parsed.value().watch.guards.max_peers == 2);
  c["guards"] = {{"max_peers", 2}, {"min_peers", 3}};
  auto bad = dynup::parse_upstream_config(c);
  REQUIRE_FALSE(bad);
  CHECK(contains(bad.error().message(), "upstream.guards: min_peers 3 is more than max_peers 2"));
  c["guards"] = {{"max_peers", DYNUP_MAX_PEERS + 1}};
  bad = dynup::parse_upstream_config(c);
  REQUIRE_FALSE(bad);
  CHECK(contains(bad.error().message(), "upstream.guards.max_peers"));
}

TEST_CASE("limits: the HTTP client refuses a body past max_response_bytes and keeps working") {
  httplib::Server server;
  server.Get("/big", [](const httplib::Request&, httplib::Response& r) {
    r.set_content(std::string(200000, 'x'), "application/json");
  });
  server.Get("/small", [](const httplib::Request&, httplib::Response& r) { r.set_content("[]", "application/json"); });
  server.Get("/chunked", [](const httplib::Request&, httplib::Response& r) {
    r.set_chunked_content_provider("application/json", [](std::size_t offset, httplib::DataSink& sink) {
      if (offset >= 300000) {
        sink.done();
        return true;
      }
      std::string piece(10000, 'y');
      return sink.write(piece.data(), piece.size());
    });
  });
  int port = server.bind_to_any_port("127.0.0.1");
  REQUIRE(port > 0);
  std::thread serving([&] { server.listen_after_bind(); });

  auto runtime = dynup::rt::Runtime::acquire();
  REQUIRE(runtime);
  dynup::rt::Runtime& rt = **runtime;
  auto& client = rt.service<dynup::rt::HttpClient>();
  const dynup::rt::HttpEndpoint at{"127.0.0.1", static_cast<std::uint16_t>(port), false};
  auto limit = [&](std::size_t bytes) {
    rt.loop().run_sync([&] {
      dynup::rt::HttpClientOptions o;
      o.max_response_bytes = bytes;
      client.configure(o);
    });
  };
  auto send = [&](const dynup::HttpRequest& req) {
    std::promise<dynup::Result<dynup::HttpResponse>> answer;
    auto got = answer.get_future();
    rt.loop().post([&] { client.send(at, req, [&](dynup::Result<dynup::HttpResponse> r) { answer.set_value(std::move(r)); }); });
    return got.get();
  };
  limit(100000);
  dynup::HttpRequest req;
  req.method = "GET";
  req.read_timeout = std::chrono::milliseconds(5000);
  for (const char* path : {"/big", "/chunked"}) {
    req.target = std::string(path) + "?token=secret";
    auto r = send(req);
    REQUIRE_FALSE(r);
    CHECK(r.error().code() == Errc::too_large);
    CHECK(contains(r.error().message(), std::string("GET ") + path));
    CHECK(contains(r.error().message(), "the response body exceeds 100000 bytes"));
    CHECK_FALSE(contains(r.error().message(), "secret"));
    req.target = "/small"; // the client still works after refusing
    auto small = send(req);
    REQUIRE(small);
    CHECK(small.value().status == 200);
    CHECK(small.value().body == "[]");
  }
  limit(200000); // exactly the body: accepted
  req.target = "/big";
  auto r = send(req);
  REQUIRE(r);
  CHECK(r.value().body.size() == 200000);
  limit(dynup::rt::HttpClientOptions{}.max_response_bytes);
  server.stop();
  serving.join();
}
