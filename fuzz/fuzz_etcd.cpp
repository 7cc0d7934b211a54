// The etcd v3 gateway decoders: watch messages, range replies, and the watch stream split
// into objects, each applied to the local state as EtcdWatcher does.
//
// Input: one selector byte, then (by selector % 4)
//   0  one watch message (decode_etcd_watch_message), applied to a keys and a document state
//   1  a range reply body (decode_range; status from selector bits 2-3), loaded into both
//   2  a byte stream for JsonObjectSplitter; the next byte picks chunk sizes and selector
//      bits 2-4 the object size limit
//   3  a watch stream (EtcdWatchStream), fed in chunks, every response applied to a state
//
// Properties: nothing throws; a layout=keys state always yields a set (a bad key costs
// only itself) that is valid and round-trips through the peer format, with the state's
// revision as its index; the splitter returns the same objects and errors whatever the
// chunking, and every object is the input's own bytes in order with only whitespace
// between them.
#include "fuzz_common.hpp"

#include <dynup/detail/json_stream.hpp>
#include <dynup/source/etcd.hpp>

#include <nlohmann/json.hpp>

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace {

using dynup::EtcdSource;
using dynup::EtcdState;

const EtcdSource& keys_source() {
  static const EtcdSource s = EtcdSource::from_spec("etcd://127.0.0.1:2379/u/a/").value();
  return s;
}
const EtcdSource& document_source() {
  static const EtcdSource s = EtcdSource::from_spec("etcd://127.0.0.1:2379/u/api.json?layout=document").value();
  return s;
}

// What a state publishes, checked; layout=keys must always publish.
void check_state(const EtcdSource& source, const EtcdState& state) {
  auto peers = source.peers(state);
  if (source.layout() == dynup::EtcdLayout::keys)
    DYNUP_FUZZ_CHECK(peers, "layout=keys state did not publish: " + peers.error().message());
  if (!peers) {
    DYNUP_FUZZ_CHECK(state.document_error.has_value(), peers.error().message());
    return;
  }
  DYNUP_FUZZ_CHECK(peers->set.source_index() == static_cast<std::uint64_t>(state.revision),
                   std::to_string(peers->set.source_index()));
  dynup_fuzz::check_published_set(peers->set);
}

void watch_message(std::string_view text) {
  auto r = dynup::decode_etcd_watch_message(text);
  if (!r) {
    auto code = r.error().code();
    DYNUP_FUZZ_CHECK(code == dynup::Errc::parse_error || code == dynup::Errc::unavailable, r.error().message());
    return;
  }
  auto doc = nlohmann::json::parse(text, nullptr, false);
  DYNUP_FUZZ_CHECK(!doc.is_discarded() && doc.is_object(), "decoded a message that is not a JSON object");
  for (const EtcdSource* s : {&keys_source(), &document_source()}) {
    EtcdState state;
    state.revision = 1;
    s->apply(state, *r);
    DYNUP_FUZZ_CHECK(state.revision >= 1, "revision went backwards");
    check_state(*s, state);
  }
}

void range(int status, std::string_view body) {
  auto r = EtcdSource::decode_range(status, body);
  if (!r) return;
  DYNUP_FUZZ_CHECK(status == 200 && r->revision > 0, std::to_string(r->revision));
  for (const EtcdSource* s : {&keys_source(), &document_source()}) {
    EtcdState state;
    s->load(state, *r);
    DYNUP_FUZZ_CHECK(state.revision == r->revision, "load kept another revision");
    check_state(*s, state);
  }
}

// One result of the splitter: an object's text, or an error as "code: message".
using Piece = std::pair<bool, std::string>;

struct Split {
  std::vector<Piece> pieces;
  std::size_t pending = 0;
};

Split split(std::string_view in, std::size_t max, const std::vector<std::size_t>& chunks) {
  dynup::detail::JsonObjectSplitter splitter(max);
  Split out;
  std::size_t at = 0, i = 0;
  while (at < in.size()) {
    std::size_t n = chunks.empty() ? in.size() : chunks[i++ % chunks.size()];
    splitter.feed(in.substr(at, n));
    at += n;
    while (auto r = splitter.next()) {
      if (!*r) {
        out.pieces.emplace_back(false, std::string(dynup::to_string(r->error().code())) + ": " + r->error().message());
        DYNUP_FUZZ_CHECK(splitter.failed(), "an error without failed()");
        return out;
      }
      out.pieces.emplace_back(true, std::move(*r).value());
    }
  }
  out.pending = splitter.pending();
  return out;
}

void stream_split(std::string_view in) {
  if (in.empty()) return;
  const auto selector = static_cast<unsigned char>(in.front());
  in.remove_prefix(1);
  // Limits small enough that the fuzzer reaches them, and the default.
  static constexpr std::size_t limits[] = {1, 2, 7, 16, 64, 300, 4096, DYNUP_ETCD_MAX_MESSAGE_BYTES};
  const std::size_t max = limits[(selector >> 2) & 7u];
  const unsigned step = in.empty() ? 1u : static_cast<unsigned char>(in.front()) | 1u;
  std::vector<std::size_t> chunks;
  for (unsigned i = 0; i < 16; ++i) chunks.push_back(1 + (step * (i + 1)) % 23);

  Split whole = split(in, max, {});
  Split chunked = split(in, max, chunks);
  Split bytes = split(in, max, {1});
  auto show = [&] {
    std::string s;
    for (const auto& [ok, text] : whole.pieces) s += (ok ? "object " : "error ") + text + "\n";
    return s;
  };
  DYNUP_FUZZ_CHECK(whole.pieces == chunked.pieces && whole.pieces == bytes.pieces, show());
  DYNUP_FUZZ_CHECK(whole.pending == chunked.pending && whole.pending == bytes.pending, show());

  std::size_t pos = 0;
  for (const auto& [ok, object] : whole.pieces) {
    if (!ok) break;
    while (pos < in.size() && (in[pos] == ' ' || in[pos] == '\t' || in[pos] == '\r' || in[pos] == '\n')) ++pos;
    DYNUP_FUZZ_CHECK(in.substr(pos, object.size()) == object, "object is not the input's next bytes: " + object);
    DYNUP_FUZZ_CHECK(object.size() >= 2 && object.front() == '{', object);
    DYNUP_FUZZ_CHECK(object.size() <= max, "object over the limit: " + object);
    pos += object.size();
  }
}

void watch_stream(std::string_view in) {
  dynup::EtcdWatchStream stream;
  EtcdState state;
  state.revision = 1;
  const EtcdSource& s = keys_source();
  std::size_t at = 0, i = 0;
  while (at < in.size()) {
    std::size_t n = 1 + (i++ * 7) % 61;
    stream.feed(in.substr(at, n));
    at += n;
    while (auto r = stream.next()) {
      if (!*r) return;
      s.apply(state, **r);
      check_state(s, state);
    }
  }
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto input = dynup_fuzz::split_selector(data, size);
  if (!input) return 0;
  const unsigned char selector = input->selector;
  std::string_view in = input->rest;
  static constexpr int statuses[] = {200, 200, 404, 500};
  switch (selector % 4) {
  case 0: watch_message(in); break;
  case 1: range(statuses[(selector >> 2) & 3u], in); break;
  case 2: stream_split(dynup_fuzz::text_of(data, size)); break;
  default: watch_stream(in); break;
  }
  return 0;
}
