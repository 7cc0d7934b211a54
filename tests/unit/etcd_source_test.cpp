// The etcd source's pure half: specs, request bodies, range and watch decoding, and the
// local state the watcher keeps. Response bodies are what etcd 3.4.23's gateway sent.
#include <dynup/source/etcd.hpp>

#include <support/text.hpp>

#include <doctest/doctest.h>
#include <nlohmann/json.hpp>

#include <cstdint>
#include <random>
#include <string>
#include <vector>

using dynup::EtcdEvent;
using dynup::EtcdLayout;
using dynup::EtcdSource;
using dynup::EtcdState;
using dynup::EtcdWatchResponse;
using dynup::EtcdWatchStream;
using dynup::Errc;

namespace {

using dynup_test::contains;
std::string b64(const std::string& s) { return dynup::detail::base64_encode(s); }

EtcdSource source(const std::string& spec) {
  auto s = EtcdSource::from_spec(spec);
  REQUIRE_MESSAGE(s.ok(), spec, " -> ", s.error().message());
  return std::move(s).value();
}

std::string spec_error(const std::string& spec) {
  auto s = EtcdSource::from_spec(spec);
  REQUIRE_FALSE_MESSAGE(s.ok(), spec);
  CHECK(s.error().code() == Errc::invalid_argument);
  return s.error().message();
}

const std::string header = R"("header":{"cluster_id":"324952591200643719","member_id":"3319814642761637952","revision":"5","raft_term":"2"})";

std::string kv_json(const std::string& key, const std::string& value, int rev) {
  std::string r = std::to_string(rev);
  return R"({"key":")" + b64(key) + R"(","create_revision":")" + r + R"(","mod_revision":")" + r +
         R"(","version":"1")" + (value.empty() ? "" : R"(,"value":")" + b64(value) + "\"") + "}";
}

std::string range_body(const std::vector<std::pair<std::string, std::string>>& kvs, int revision = 5) {
  std::string body = R"({"header":{"cluster_id":"1","member_id":"2","revision":")" + std::to_string(revision) +
                     R"(","raft_term":"2"})";
  if (!kvs.empty()) {
    body += R"(,"kvs":[)";
    int rev = 2;
    for (std::size_t i = 0; i < kvs.size(); ++i) body += (i ? "," : "") + kv_json(kvs[i].first, kvs[i].second, rev++);
    body += R"(],"count":")" + std::to_string(kvs.size()) + "\"";
  }
  return body + "}";
}

std::vector<std::string> ids(const dynup::PeerSet& set) {
  std::vector<std::string> out;
  for (const auto& p : set) out.push_back(p.id);
  return out;
}

dynup::EtcdPeers peers_of(const EtcdSource& s, const EtcdState& st) {
  auto r = s.peers(st);
  REQUIRE_MESSAGE(r.ok(), r.error().message());
  return std::move(r).value();
}

EtcdState loaded(const EtcdSource& s, const std::vector<std::pair<std::string, std::string>>& kvs,
                 std::vector<std::string>* skipped = nullptr) {
  auto range = EtcdSource::decode_range(200, range_body(kvs));
  REQUIRE_MESSAGE(range.ok(), range.error().message());
  EtcdState st;
  auto why = s.load(st, *range);
  if (skipped) *skipped = why;
  return st;
}

EtcdWatchResponse event_response(EtcdEvent::Type type, const std::string& key, const std::string& value, int rev) {
  EtcdWatchResponse r;
  r.revision = rev;
  EtcdEvent e;
  e.type = type;
  e.kv.key = key;
  e.kv.value = value;
  e.kv.mod_revision = rev;
  r.events.push_back(e);
  return r;
}

// Everything a stream yields for `bytes` fed in the given pieces.
std::vector<dynup::Result<EtcdWatchResponse>> drain(const std::vector<std::string>& pieces) {
  EtcdWatchStream stream;
  std::vector<dynup::Result<EtcdWatchResponse>> out;
  for (const auto& piece : pieces) {
    stream.feed(piece);
    while (auto r = stream.next()) {
      bool failed = !r->ok();
      out.push_back(std::move(*r));
      if (failed) return out;
    }
  }
  return out;
}

// Two messages as etcd 3.4.23 streamed them: a PUT batch and a DELETE, newline-separated.
const std::string two_messages =
    R"({"result":{)" + header + R"(,"events":[{"kv":)" + kv_json("/u/a/p1", "10.0.0.1:80", 2) + R"(},{"kv":)" +
    kv_json("/u/a/p2", R"({"host":"10.0.0.2","port":81})", 3) + R"(}]}})" + "\n" + R"({"result":{)" + header +
    R"(,"events":[{"type":"DELETE","kv":{"key":")" + b64("/u/a/p1") + R"(","mod_revision":"4"}}]}})" + "\n";

} // namespace

TEST_CASE("etcd spec: a path ending in / is a prefix watched with layout=keys") {
  EtcdSource s = source("etcd://10.1.2.3:2380/upstreams/api/");
  CHECK(s.host() == "10.1.2.3");
  CHECK(s.port() == 2380);
  CHECK(s.layout() == EtcdLayout::keys);
  CHECK(s.key() == "/upstreams/api/");
  CHECK(s.range_end() == "/upstreams/api0"); // '/' + 1
  CHECK(s.describe() == "etcd://10.1.2.3:2380/upstreams/api/");
  CHECK(source("etcd://h/x/").port() == 2379);
  CHECK(source("etcd://h:1/x/?layout=keys").layout() == EtcdLayout::keys);
}

TEST_CASE("etcd spec: layout=document names one key exactly") {
  EtcdSource s = source("etcd://[::1]:2379/upstreams/api.json?layout=document");
  CHECK(s.layout() == EtcdLayout::document);
  CHECK(s.key() == "/upstreams/api.json");
  CHECK(s.range_end().empty());
  CHECK(s.describe() == "etcd://[::1]:2379/upstreams/api.json?layout=document");
  // Percent-escapes reach the key decoded, and describe() escapes them again.
  EtcdSource odd = source("etcd://h:1/a%20b%3Fc?layout=document");
  CHECK(odd.key() == "/a b?c");
  CHECK(odd.describe() == "etcd://h:1/a%20b%3Fc?layout=document");
}

TEST_CASE("etcd spec: mistakes are errors that say what to write") {
  CHECK(contains(spec_error("etcd://h:2379/upstreams/api"), "does not end in '/'"));
  CHECK(contains(spec_error("etcd://h:2379/upstreams/api"), "layout=document"));
  CHECK(contains(spec_error("etcd://h:2379/u/?layout=tree"), "layout=\"tree\" is not keys or document"));
  CHECK(contains(spec_error("etcd://h:2379/u/?prefix=1"), "unknown option \"prefix\""));
  CHECK(contains(spec_error("consul://h:8500/kv/u/"), "not an etcd:// spec"));
  CHECK(contains(spec_error("etcd://:2379/u/"), "host is empty"));
}

TEST_CASE("etcd prefix range end: the last byte below 0xff is incremented") {
  using dynup::detail::etcd_prefix_end;
  CHECK(etcd_prefix_end("/a/") == "/a0");
  CHECK(etcd_prefix_end("ab\xff") == "ac");
  CHECK(etcd_prefix_end("\xff\xff") == std::string(1, '\0'));
}

TEST_CASE("etcd requests: keys and range ends are base64, the start revision a string") {
  EtcdSource s = source("etcd://h:2379/upstreams/api/");
  auto range = s.range_request();
  CHECK(range.target == "/v3/kv/range");
  auto body = nlohmann::json::parse(range.body);
  CHECK(body == nlohmann::json{{"key", b64("/upstreams/api/")}, {"range_end", b64("/upstreams/api0")}});

  auto watch = s.watch_request(42);
  CHECK(watch.target == "/v3/watch");
  auto create = nlohmann::json::parse(watch.body).at("create_request");
  CHECK(create.at("key") == b64("/upstreams/api/"));
  CHECK(create.at("range_end") == b64("/upstreams/api0"));
  CHECK(create.at("start_revision") == "42");
  CHECK(create.at("progress_notify") == true);

  EtcdSource doc = source("etcd://h:2379/upstreams/api.json?layout=document");
  auto one = nlohmann::json::parse(doc.watch_request(7).body).at("create_request");
  CHECK(one.at("key") == b64("/upstreams/api.json"));
  CHECK_FALSE(one.contains("range_end"));
}

TEST_CASE("etcd base64: encodes every tail length like Go's StdEncoding") {
  using dynup::detail::base64_encode;
  CHECK(base64_encode("") == "");
  CHECK(base64_encode("f") == "Zg==");
  CHECK(base64_encode("fo") == "Zm8=");
  CHECK(base64_encode("foo") == "Zm9v");
  CHECK(base64_encode("/u/a/p1") == "L3UvYS9wMQ==");
  std::string all;
  for (int c = 0; c < 256; ++c) all += static_cast<char>(c);
  std::string back;
  REQUIRE(dynup::detail::base64_decode(base64_encode(all), back));
  CHECK(back == all);
}

TEST_CASE("etcd range: a real reply decodes to keys, values and the header revision") {
  // Verbatim from etcd 3.4.23; the second key has an empty value, so no "value" field.
  std::string body =
      R"({"header":{"cluster_id":"324952591200643719","member_id":"3319814642761637952","revision":"3","raft_term":"2"},"kvs":[{"key":"L3UvYS9wMQ==","create_revision":"2","mod_revision":"2","version":"1","value":"IjEwLjAuMC4xOjgwIg=="},{"key":"L3UvYS9wMg==","create_revision":"3","mod_revision":"3","version":"1"}],"count":"2"})";
  auto r = EtcdSource::decode_range(200, body);
  REQUIRE_MESSAGE(r.ok(), r.error().message());
  CHECK(r->revision == 3);
  REQUIRE(r->kvs.size() == 2);
  CHECK(r->kvs[0].key == "/u/a/p1");
  CHECK(r->kvs[0].value == "\"10.0.0.1:80\"");
  CHECK(r->kvs[0].mod_revision == 2);
  CHECK(r->kvs[1].key == "/u/a/p2");
  CHECK(r->kvs[1].value.empty());

  // An empty range has no kvs at all.
  auto empty = EtcdSource::decode_range(
      200, R"({"header":{"cluster_id":"1","member_id":"2","revision":"1","raft_term":"2"}})");
  REQUIRE(empty.ok());
  CHECK(empty->revision == 1);
  CHECK(empty->kvs.empty());
}

TEST_CASE("etcd range: HTTP errors carry etcd's message; malformed replies are parse errors") {
  auto e = EtcdSource::decode_range(
      400, R"({"error":"invalid character 'g' looking for beginning of value","message":"invalid character 'g' looking for beginning of value","code":3})");
  REQUIRE_FALSE(e.ok());
  CHECK(e.error().code() == Errc::unavailable);
  CHECK(contains(e.error().message(), "HTTP 400"));
  CHECK(contains(e.error().message(), "invalid character 'g'"));
  CHECK(contains(e.error().message(), "gRPC code 3"));

  auto missing = EtcdSource::decode_range(404, "404 page not found\n");
  REQUIRE_FALSE(missing.ok());
  CHECK(missing.error().code() == Errc::unsupported);
  CHECK(contains(missing.error().message(), "404 page not found"));

  for (const char* body : {"", "garbage", "[]", R"({"kvs":[]})", R"({"header":{}})",
                           R"({"header":{"revision":"x"}})", R"({"header":{"revision":"5"},"kvs":{}})",
                           R"({"header":{"revision":"5"},"kvs":[{"key":"***"}]})",
                           R"({"header":{"revision":"5"},"kvs":[{"key":"YQ==","value":7}]})",
                           R"({"header":{"revision":"5"},"kvs":[{"key":"YQ==","mod_revision":"9x"}]})",
                           R"({"header":{"revision":"5"},"more":true})"}) {
    INFO("body: " << body);
    auto r = EtcdSource::decode_range(200, body);
    REQUIRE_FALSE(r.ok());
    CHECK(r.error().code() == Errc::parse_error);
  }
}

TEST_CASE("etcd keys layout: the id is the key name after the prefix unless the value sets one") {
  EtcdSource s = source("etcd://h:2379/u/a/");
  EtcdState st = loaded(s, {{"/u/a/web-1", R"({"host":"10.0.0.1","port":80,"weight":4,"tags":["b","a","b"]})"},
                            {"/u/a/10.0.0.2:80", R"("10.0.0.2:80")"},
                            {"/u/a/web-3", "  10.0.0.3:80\n"},
                            {"/u/a/web-4", R"({"id":"four","host":"Host.Example.","port":443})"},
                            {"/u/a/zone-b/web-5", "[::1]:80"}});
  CHECK(st.revision == 5);
  auto out = peers_of(s, st);
  CHECK(out.skipped.empty());
  CHECK(ids(out.set) == std::vector<std::string>{"10.0.0.2:80", "four", "web-1", "web-3", "zone-b/web-5"});
  CHECK(out.set.source_index() == 5);
  CHECK(out.set.find("web-1")->weight == 4);
  CHECK(out.set.find("web-1")->tags == std::vector<std::string>{"a", "b"});
  CHECK(out.set.find("four")->host == "host.example");
  CHECK(out.set.find("zone-b/web-5")->host == "::1");
}

TEST_CASE("etcd keys layout: an invalid value leaves out its key with a reason naming it") {
  EtcdSource s = source("etcd://h:2379/u/a/");
  std::vector<std::string> skipped;
  EtcdState st = loaded(s,
                        {{"/u/a/good", "10.0.0.1:80"},
                         {"/u/a/no-port", R"({"host":"10.0.0.2"})"},
                         {"/u/a/typo", R"({"host":"10.0.0.3","port":80,"wieght":2})"},
                         {"/u/a/not-json", R"({"host":)"},
                         {"/u/a/empty", ""},
                         {"/u/a/bad-host", "300.1.1.1:80"},
                         {"/u/a/ctl\x01", "10.0.0.4:80"}},
                        &skipped);
  CHECK(ids(peers_of(s, st).set) == std::vector<std::string>{"good"});
  REQUIRE(skipped.size() == 6);
  auto mentions = [&](const std::string& a, const std::string& b) {
    for (const auto& w : skipped)
      if (contains(w, a) && contains(w, b)) return true;
    return false;
  };
  CHECK(mentions("\"/u/a/no-port\"", "port: is required"));
  CHECK(mentions("\"/u/a/typo\"", "wieght: unknown key"));
  CHECK(mentions("\"/u/a/not-json\"", "not valid JSON"));
  CHECK(mentions("\"/u/a/empty\"", "value is empty"));
  CHECK(mentions("\"/u/a/bad-host\"", "300.1.1.1"));
  CHECK(mentions("\"/u/a/ctl\\u0001\"", "control character"));
}

TEST_CASE("etcd keys layout: a second key claiming an id already used is left out") {
  EtcdSource s = source("etcd://h:2379/u/a/");
  EtcdState st = loaded(s, {{"/u/a/a", R"({"id":"x","host":"10.0.0.1","port":80})"},
                            {"/u/a/b", R"({"id":"x","host":"10.0.0.2","port":80})"},
                            {"/u/a/x", "10.0.0.3:80"}});
  auto out = peers_of(s, st);
  CHECK(ids(out.set) == std::vector<std::string>{"x"});
  CHECK(out.set.find("x")->host == "10.0.0.1");
  REQUIRE(out.skipped.size() == 2);
  CHECK(contains(out.skipped[0], "\"/u/a/b\""));
  CHECK(contains(out.skipped[0], "already used by key \"/u/a/a\""));
  CHECK(contains(out.skipped[1], "\"/u/a/x\""));
}

TEST_CASE("etcd keys layout: events put, replace and delete keys and advance the revision") {
  EtcdSource s = source("etcd://h:2379/u/a/");
  EtcdState st = loaded(s, {{"/u/a/p1", "10.0.0.1:80"}});
  using T = EtcdEvent::Type;
  CHECK(s.apply(st, event_response(T::put, "/u/a/p2", "10.0.0.2:80", 6)).empty());
  CHECK(ids(peers_of(s, st).set) == std::vector<std::string>{"p1", "p2"});
  CHECK(st.revision == 6);

  s.apply(st, event_response(T::put, "/u/a/p1", R"({"host":"10.0.0.1","port":80,"weight":9})", 7));
  CHECK(peers_of(s, st).set.find("p1")->weight == 9);

  s.apply(st, event_response(T::del, "/u/a/p2", "", 8));
  CHECK(ids(peers_of(s, st).set) == std::vector<std::string>{"p1"});
  CHECK(peers_of(s, st).set.source_index() == 8);

  // A valid key turning invalid leaves the set, as a fresh range would leave it out.
  auto why = s.apply(st, event_response(T::put, "/u/a/p1", "oops", 9));
  REQUIRE(why.size() == 1);
  CHECK(contains(why[0], "\"/u/a/p1\""));
  CHECK(peers_of(s, st).set.empty());

  // Keys outside the prefix are ignored (they only move the revision).
  s.apply(st, event_response(T::put, "/u/a-v2/p9", "10.0.0.9:80", 10));
  s.apply(st, event_response(T::put, "/u/a", "10.0.0.9:80", 11));
  CHECK(st.by_key.empty());
  CHECK(st.revision == 11);

  // A progress notification moves the revision, never back.
  EtcdWatchResponse progress;
  progress.revision = 20;
  REQUIRE(progress.is_progress());
  s.apply(st, progress);
  CHECK(st.revision == 20);
  progress.revision = 15;
  s.apply(st, progress);
  CHECK(st.revision == 20);
}

TEST_CASE("etcd document layout: one key holds the set; invalid is an error, absent is empty") {
  EtcdSource s = source("etcd://h:2379/u/api.json?layout=document");
  EtcdState st = loaded(s, {{"/u/api.json", R"({"index":99,"peers":[{"host":"10.0.0.1","port":80},"10.0.0.2:80"]})"},
                            {"/u/api.json.bak", R"(["10.0.0.9:80"])"}});
  auto out = peers_of(s, st);
  CHECK(ids(out.set) == std::vector<std::string>{"10.0.0.1:80", "10.0.0.2:80"});
  CHECK(out.set.source_index() == 5); // the etcd revision, not the document's "index"

  using T = EtcdEvent::Type;
  s.apply(st, event_response(T::put, "/u/api.json", R"({"peers":[{"host":"10.0.0.1","port":0}]})", 6));
  auto bad = s.peers(st);
  REQUIRE_FALSE(bad.ok());
  CHECK(bad.error().code() == Errc::parse_error);
  CHECK(contains(bad.error().message(), "key \"/u/api.json\""));
  CHECK(contains(bad.error().message(), "port"));

  s.apply(st, event_response(T::put, "/u/api.json", R"(["10.0.0.3:80"])", 7));
  CHECK(ids(peers_of(s, st).set) == std::vector<std::string>{"10.0.0.3:80"});
  s.apply(st, event_response(T::put, "/u/api.json", "{", 8));
  REQUIRE_FALSE(s.peers(st).ok());
  s.apply(st, event_response(T::del, "/u/api.json", "", 9));
  CHECK(peers_of(s, st).set.empty());

  EtcdState none = loaded(s, {});
  CHECK(peers_of(s, none).set.empty());
}

TEST_CASE("etcd watch stream: two messages decode alike however the bytes are split") {
  for (std::size_t cut = 0; cut <= two_messages.size(); ++cut) {
    CAPTURE(cut);
    auto got = drain({two_messages.substr(0, cut), two_messages.substr(cut)});
    REQUIRE(got.size() == 2);
    REQUIRE(got[0].ok());
    REQUIRE(got[1].ok());
    CHECK(got[0]->revision == 5);
    REQUIRE(got[0]->events.size() == 2);
    CHECK(got[0]->events[0].type == EtcdEvent::Type::put);
    CHECK(got[0]->events[0].kv.key == "/u/a/p1");
    CHECK(got[0]->events[0].kv.value == "10.0.0.1:80");
    CHECK(got[0]->events[1].kv.mod_revision == 3);
    REQUIRE(got[1]->events.size() == 1);
    CHECK(got[1]->events[0].type == EtcdEvent::Type::del);
    CHECK(got[1]->events[0].kv.key == "/u/a/p1");
    CHECK(got[1]->events[0].kv.value.empty());
    CHECK(got[1]->events[0].kv.mod_revision == 4);
  }
}

TEST_CASE("etcd watch stream: one byte at a time, and objects back to back without newlines") {
  std::vector<std::string> bytes;
  for (char c : two_messages) bytes.emplace_back(1, c);
  auto got = drain(bytes);
  REQUIRE(got.size() == 2);
  CHECK(got[1]->events.size() == 1);

  // Braces and quotes inside strings do not end an object.
  std::string tricky = R"({"result":{"created":true,"cancel_reason":"a}\"{[b"}}{"result":{"canceled":true}})";
  auto two = drain({tricky});
  REQUIRE(two.size() == 2);
  REQUIRE(two[0].ok());
  CHECK(two[0]->created);
  CHECK(two[0]->cancel_reason == "a}\"{[b");
  CHECK(two[1]->canceled);
}

TEST_CASE("etcd watch stream: created, compaction, progress and server errors as etcd sends them") {
  auto got = drain({
      R"({"result":{"header":{"cluster_id":"1","member_id":"2","revision":"5","raft_term":"2"},"created":true}})"
      "\n",
      // A compaction notice carries no header revision (0 is omitted).
      R"({"result":{"header":{"cluster_id":"1","member_id":"2","raft_term":"2"},"canceled":true,"compact_revision":"4"}})"
      "\n",
      R"({"result":{"header":{"cluster_id":"1","member_id":"2","revision":"6","raft_term":"3"}}})"
      "\n",
      R"({"error":{"grpc_code":14,"http_code":503,"message":"transport is closing","http_status":"Service Unavailable"}})",
  });
  REQUIRE(got.size() == 4);
  REQUIRE(got[0].ok());
  CHECK(got[0]->created);
  CHECK_FALSE(got[0]->is_progress());
  REQUIRE(got[1].ok());
  CHECK(got[1]->canceled);
  CHECK(got[1]->compact_revision == 4);
  CHECK(got[1]->revision == 0);
  REQUIRE(got[2].ok());
  CHECK(got[2]->is_progress());
  CHECK(got[2]->revision == 6);
  REQUIRE_FALSE(got[3].ok());
  CHECK(got[3].error().code() == Errc::unavailable);
  CHECK(contains(got[3].error().message(), "transport is closing"));
  CHECK(contains(got[3].error().message(), "gRPC code 14"));
}

TEST_CASE("etcd watch stream: garbage is an error, never an exception, and the stream stays failed") {
  for (const char* bad : {"garbage", "[1,2]", "42", "}", "\x00{}", "{\"result\":5}", "{\"result\":{\"events\":{}}}",
                          "{\"result\":{\"events\":[{\"type\":\"EXPIRE\",\"kv\":{\"key\":\"YQ==\"}}]}}",
                          "{\"result\":{\"events\":[{\"kv\":{\"key\":\"not base64!\"}}]}}",
                          "{\"result\":{\"events\":[{}]}}", "{\"result\":{\"created\":\"yes\"}}",
                          "{\"result\":{\"header\":{\"revision\":\"99999999999999999999\"}}}", "{]", "{\"a\":1]"}) {
    std::string text(bad, bad[0] == '\0' ? 3 : std::char_traits<char>::length(bad));
    INFO("input: " << text);
    EtcdWatchStream stream;
    stream.feed(text);
    stream.feed("\n");
    auto r = stream.next();
    REQUIRE(r.has_value());
    REQUIRE_FALSE(r->ok());
    CHECK(r->error().code() == Errc::parse_error);
    stream.feed(two_messages); // a broken stream cannot be resynced
    auto again = stream.next();
    REQUIRE(again.has_value());
    CHECK_FALSE(again->ok());
  }

  // Random bytes, in random pieces: errors or nothing, never a throw or a hang.
  std::mt19937 rng(12345);
  for (int round = 0; round < 300; ++round) {
    EtcdWatchStream stream(4096);
    std::string junk = two_messages;
    for (int k = 0; k < 8; ++k) junk[rng() % junk.size()] = static_cast<char>(rng() % 256);
    std::size_t at = 0;
    while (at < junk.size()) {
      std::size_t n = 1 + rng() % 40;
      CHECK_NOTHROW(stream.feed(std::string_view(junk).substr(at, n)));
      at += n;
      std::optional<dynup::Result<EtcdWatchResponse>> r;
      int guard = 0;
      CHECK_NOTHROW(while ((r = stream.next()) && r->ok() && ++guard < 100) {});
      if (r && !r->ok()) break;
    }
  }
}

TEST_CASE("etcd watch stream: an object larger than the limit is too_large") {
  EtcdWatchStream stream(100);
  stream.feed("{\"result\":{\"cancel_reason\":\"" + std::string(200, 'x'));
  auto r = stream.next();
  REQUIRE(r.has_value());
  REQUIRE_FALSE(r->ok());
  CHECK(r->error().code() == Errc::too_large);

  EtcdWatchStream whole(100); // complete, but still too big
  whole.feed("{\"result\":{\"cancel_reason\":\"" + std::string(200, 'x') + "\"}}");
  auto w = whole.next();
  REQUIRE(w.has_value());
  CHECK(w->error().code() == Errc::too_large);
}

TEST_CASE("etcd watch stream: many objects in one chunk come out in order") {
  std::string chunk;
  for (int i = 1; i <= 2000; ++i)
    chunk += R"({"result":{"header":{"revision":")" + std::to_string(i) + R"("}}})" + "\n";
  auto got = drain({chunk});
  REQUIRE(got.size() == 2000);
  bool in_order = true;
  for (int i = 0; i < 2000; ++i) in_order = in_order && got[static_cast<std::size_t>(i)]->revision == i + 1;
  CHECK(in_order);
}
