// Watching etcd v3 prefixes (or keys) through the JSON gateway on the process runtime,
// with one watch stream per etcd address whatever the number of sources: the stream
// covers the common prefix of every source's keys, and each source applies the events
// under its own keys. Each source ranges on its own (a short request), so a source
// joining late or recovering from compaction does not disturb the others.
#pragma once

#include <dynup/peer_set.hpp>
#include <dynup/result.hpp>
#include <dynup/runtime/http.hpp>
#include <dynup/runtime/runtime.hpp>
#include <dynup/source/etcd.hpp>
#include <dynup/version.hpp>
#include <dynup/watch/core.hpp>
#include <dynup/watch/registry_watcher.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

DYNUP_NAMESPACE_BEGIN
namespace detail {

/// Slack on top of `wait` before a silent watch stream is declared dead.
inline constexpr std::chrono::milliseconds etcd_stream_margin{1000};
/// Deadline of a whole range request.
inline constexpr std::chrono::milliseconds etcd_range_timeout{10000};

/// The shared stream's view of one source.
class EtcdMember {
public:
  virtual ~EtcdMember() = default;
  virtual const EtcdSource& source() const noexcept = 0;
  /// One response of the stream (events for any key, or progress).
  virtual void on_response(const EtcdWatchResponse& r) = 0;
  /// The stream is open: etcd confirmed the watch.
  virtual void on_open() = 0;
  /// The stream ended: every source ranges again. `why` is empty for a compaction
  /// (routine, not an error).
  virtual void on_lost(const std::optional<Error>& why) = 0;
};

/// One etcd address: the one watch stream its sources share. Loop thread only.
///
/// Protocol: a source joins (and from then on hears every response), ranges at revision
/// R, and calls ranged(R). No stream: one opens from R + 1. A stream that opened from S:
/// it covers the source when R + 1 >= S; otherwise (the range is older than the stream)
/// the source ranges again. A source applies only events after its R. The stream's
/// range is the longest common prefix of every source's keys; a source outside it
/// reopens the stream, wider, from the last revision seen. A compaction, a cancel, an
/// error or a broken stream ends it for everyone: every source ranges again (which also
/// notices an etcd whose revisions restarted), and the first range reopens it. A stream
/// quiet for `wait` + margin is reopened from the last revision seen.
class EtcdHub {
public:
  EtcdHub(rt::HttpClient& http, rt::HttpEndpoint endpoint) : http_(http), endpoint_(std::move(endpoint)) {}
  ~EtcdHub() { close(); }
  EtcdHub(const EtcdHub&) = delete;
  EtcdHub& operator=(const EtcdHub&) = delete;

  void join(EtcdMember* m, std::chrono::milliseconds wait) {
    members_.insert(m);
    wait_ = std::max(wait_, wait);
    if (open_ && !covers(m->source())) reopen(seen_ + 1);
  }

  void leave(EtcdMember* m) {
    members_.erase(m);
    if (members_.empty()) close();
  }

  /// A source ranged at `revision`: true when the stream covers every later revision.
  bool ranged(std::int64_t revision) {
    if (!open_) {
      reopen(revision + 1);
      return true;
    }
    return revision + 1 >= start_;
  }

  /// For tests: sees each stream request before it is sent.
  void tap(RequestTap t) { tap_ = std::move(t); }
  /// Streams opened since the start.
  std::uint64_t streams_opened() const noexcept { return opened_; }
  bool open() const noexcept { return open_; }
  /// A stream is open and etcd confirmed its watch.
  bool streaming() const noexcept { return open_ && created_; }

private:
  // The longest common prefix of every source's keys: the stream's range.
  std::string common_prefix() const {
    std::string common;
    bool first = true;
    for (auto* m : members_) {
      const std::string& k = m->source().key();
      if (first) {
        common = k;
        first = false;
        continue;
      }
      std::size_t n = 0;
      while (n < common.size() && n < k.size() && common[n] == k[n]) ++n;
      common.resize(n);
    }
    return common;
  }

  bool covers(const EtcdSource& s) const { return s.key().compare(0, key_.size(), key_) == 0; }

  void close() {
    if (call_ != 0) http_.cancel(call_);
    call_ = 0;
    open_ = false;
  }

  void reopen(std::int64_t from) {
    close();
    if (members_.empty()) return;
    open_ = true;
    start_ = from;
    seen_ = from - 1;
    key_ = common_prefix();
    issue();
  }

  void issue() {
    const auto w = wait_.count() > 0 ? wait_ : std::chrono::milliseconds(std::chrono::minutes(5));
    EtcdRequest r = EtcdSource::watch_range_request(key_, key_.empty() ? std::string() : etcd_prefix_end(key_),
                                                    seen_ + 1);
    HttpRequest req;
    req.method = "POST";
    req.target = r.target;
    req.body = r.body;
    req.content_type = "application/json";
    req.read_timeout = w + etcd_stream_margin;
    if (tap_) tap_(req);
    ++opened_;
    parser_ = EtcdWatchStream();
    created_ = false;
    ended_.reset();
    last_message_ = std::chrono::steady_clock::now();
    call_ = http_.stream(
        endpoint_, req, [this, w](std::string_view bytes) { return on_bytes(bytes, w); },
        [this, w](Result<HttpResponse> res) {
          call_ = 0;
          finished(std::move(res), w);
        });
  }

  // Every member hears every response; a member may leave from its callback.
  template <class F> void each(F f) {
    std::vector<EtcdMember*> copy(members_.begin(), members_.end());
    for (auto* m : copy)
      if (members_.count(m) != 0) f(m);
  }

  bool on_bytes(std::string_view bytes, std::chrono::milliseconds w) {
    using clock = std::chrono::steady_clock;
    parser_.feed(bytes);
    while (auto next = parser_.next()) {
      last_message_ = clock::now();
      if (!*next) {
        ended_ = next->error().with_context(where());
        return false;
      }
      const EtcdWatchResponse& r = **next;
      if (r.compact_revision > 0) {
        ended_ = std::optional<Error>(); // a compaction: routine, no error
        return false;
      }
      if (r.canceled) {
        ended_ = Error(Errc::unavailable,
                       where() + ": etcd cancelled the watch" + (r.cancel_reason.empty() ? "" : ": " + r.cancel_reason));
        return false;
      }
      for (const auto& ev : r.events) seen_ = std::max(seen_, ev.kv.mod_revision);
      if (r.is_progress()) seen_ = std::max(seen_, r.revision);
      if (r.created) {
        created_ = true;
        each([](EtcdMember* m) { m->on_open(); });
        continue;
      }
      each([&](EtcdMember* m) { m->on_response(r); });
    }
    if (clock::now() - last_message_ >= w + etcd_stream_margin) {
      ended_ = Error(Errc::timeout, where() + ": watch: bytes arrive but no complete message within " +
                                        std::to_string((w + etcd_stream_margin).count()) + " ms");
      return false;
    }
    return true;
  }

  void finished(Result<HttpResponse> res, std::chrono::milliseconds w) {
    std::optional<Error> why;
    bool quiet = false;
    if (ended_) {
      why = *ended_;
    } else if (!res) {
      // A read timeout and a dropped connection look alike; only the silence tells.
      if (created_ && std::chrono::steady_clock::now() - last_message_ >= w)
        quiet = true;
      else
        why = res.error().with_context(where() + ": watch");
    } else if (res->status != 200) {
      why = Error(Errc::unavailable, where() + ": etcd answered HTTP " + std::to_string(res->status) + " to /v3/watch");
    } else {
      why = Error(Errc::unavailable, where() + ": etcd closed the watch stream");
    }
    ended_.reset();
    if (quiet) {
      issue(); // from the last revision seen, nobody ranges
      return;
    }
    open_ = false;
    const std::optional<Error> lost = why; // none: a compaction
    each([&](EtcdMember* m) { m->on_lost(lost); });
  }

  std::string where() const {
    return "etcd://" + endpoint_.host + ":" + std::to_string(endpoint_.port) + " (shared watch of " +
           std::to_string(members_.size()) + " sources)";
  }

  rt::HttpClient& http_;
  const rt::HttpEndpoint endpoint_;
  std::set<EtcdMember*> members_;
  std::chrono::milliseconds wait_{0};
  bool open_ = false;
  std::int64_t start_ = 0; ///< the revision the open stream started from
  std::int64_t seen_ = 0;  ///< every revision up to here was delivered
  std::string key_;        ///< the stream's prefix
  rt::CallId call_ = 0;
  EtcdWatchStream parser_;
  bool created_ = false;
  std::optional<std::optional<Error>> ended_; // set: the stream was ended by what it said
  std::chrono::steady_clock::time_point last_message_{};
  RequestTap tap_;
  std::uint64_t opened_ = 0;
};

} // namespace detail

/// The etcd hubs of a process, one per address: a runtime service, loop thread only.
class EtcdHubs {
public:
  explicit EtcdHubs(rt::Runtime& runtime) : http_(runtime.service<rt::HttpClient>()) {}

  detail::EtcdHub& at(const rt::HttpEndpoint& endpoint) {
    auto& slot = hubs_[endpoint.key()];
    if (!slot) slot = std::make_unique<detail::EtcdHub>(http_, endpoint);
    return *slot;
  }

private:
  rt::HttpClient& http_;
  std::map<std::string, std::unique_ptr<detail::EtcdHub>> hubs_;
};

namespace detail {

/// One etcd source as a RegistryWatcher driver, on its address's shared stream.
///
/// Rounds: a range of the watched keys (linearizable), published, then a round that
/// lasts as long as the shared stream: each response's events under this source's keys
/// are applied to a local copy and published (a transaction's events together). When
/// the stream ends the source ranges again: at once after a compaction, after a backoff
/// after a failure (the round fails with its reason). An invalid document
/// (layout=document) is reported and keeps the published set; invalid keys are left out
/// and reported. A range must be complete within etcd_range_timeout.
class EtcdDriver final : public Driver, public EtcdMember {
public:
  /// `tap`, for tests: sees every range request before it is sent, on the loop thread.
  EtcdDriver(std::shared_ptr<rt::Runtime> runtime, EtcdSource source, RequestTap tap = {})
      : runtime_(std::move(runtime)), source_(std::move(source)), endpoint_{source_.host(), source_.port(), false},
        tap_(std::move(tap)) {}

  std::string describe() const override { return source_.describe(); }
  const char* first_round() const override { return "first range"; }
  const EtcdSource& source() const noexcept override { return source_; }

  /// The hub this source shares (valid after the first round began; loop thread).
  EtcdHub* hub() noexcept { return hub_; }

  void begin(WatcherCore& core, End end) override {
    core_ = &core;
    if (!hub_) {
      http_ = &runtime_->service<rt::HttpClient>();
      hub_ = &runtime_->service<EtcdHubs>().at(endpoint_);
      const auto w = core.options().wait.count() > 0 ? core.options().wait : WatchOptions{}.wait;
      hub_->join(this, w);
      core.set_mode("shared stream");
    }
    if (need_range_)
      range(std::move(end));
    else
      waiting_ = std::move(end);
  }

  void abort() noexcept override {
    if (call_ != 0) http_->cancel(call_);
    call_ = 0;
    waiting_ = nullptr;
    if (hub_) hub_->leave(this);
    hub_ = nullptr;
  }

  void on_response(const EtcdWatchResponse& r) override {
    if (!live_) {
      if (ranging_) buffered_.push_back(r);
      return;
    }
    take(r);
  }

  void on_open() override {
    if (live_) core_->succeeded(static_cast<std::uint64_t>(state_.revision));
  }

  void on_lost(const std::optional<Error>& why) override {
    need_range_ = true;
    live_ = false;
    buffered_.clear();
    if (!waiting_) return; // a range in flight: the hub reopens from its answer
    End end = std::move(waiting_);
    waiting_ = nullptr;
    end(why ? RoundEnd::failed(why->with_context(source_.describe())) : RoundEnd::again());
  }

private:
  void report_skipped(const std::vector<std::string>& skipped) {
    for (const auto& why : skipped) core_->report(Error(Errc::invalid_peer, source_.describe() + ": " + why));
  }

  // Offers the set state_ describes. An invalid document is returned, not published.
  Result<void> publish(std::vector<std::string> skipped) {
    report_skipped(skipped);
    auto built = source_.peers(state_);
    if (!built) return built.error();
    report_skipped(built->skipped);
    core_->offer(std::move(built->set));
    return {};
  }

  // Applies what of `r` is newer than the state and under this source's keys.
  void take(const EtcdWatchResponse& r) {
    bool mine = false;
    for (const auto& ev : r.events)
      if (ev.kv.mod_revision > state_.revision && source_.covers(ev.kv.key)) mine = true;
    if (!mine) {
      // Others' keys, or progress: every change up to here is applied.
      std::int64_t rev = r.revision;
      for (const auto& ev : r.events) rev = std::max(rev, ev.kv.mod_revision);
      if (rev > state_.revision) {
        state_.revision = rev;
        core_->succeeded(static_cast<std::uint64_t>(state_.revision));
      }
      return;
    }
    EtcdWatchResponse newer = r;
    newer.events.erase(std::remove_if(newer.events.begin(), newer.events.end(),
                                      [&](const EtcdEvent& ev) { return ev.kv.mod_revision <= state_.revision; }),
                       newer.events.end());
    auto skipped = source_.apply(state_, newer);
    core_->succeeded(static_cast<std::uint64_t>(state_.revision));
    if (auto published = publish(std::move(skipped)); !published) core_->report(published.error());
  }

  void range(End end) {
    HttpRequest req;
    EtcdRequest r = source_.range_request();
    req.method = "POST";
    req.target = r.target;
    req.body = r.body;
    req.content_type = "application/json";
    req.read_timeout = etcd_range_timeout;
    if (tap_) tap_(req);
    ranging_ = true;
    buffered_.clear();
    call_ = http_->send(endpoint_, req, [this, end = std::move(end)](Result<HttpResponse> res) {
      call_ = 0;
      ranging_ = false;
      if (!res) return fail(end, res.error().with_context(source_.describe()));
      auto decoded = EtcdSource::decode_range(res->status, res->body);
      if (!decoded) return fail(end, decoded.error().with_context(source_.describe()));
      report_skipped(source_.load(state_, *decoded));
      if (!hub_->ranged(state_.revision)) {
        buffered_.clear();
        return end(RoundEnd::again()); // older than the open stream: range again
      }
      need_range_ = false;
      live_ = true;
      core_->succeeded(static_cast<std::uint64_t>(state_.revision));
      // etcd answered: a bad document is retried without backing off.
      Result<void> published = publish({});
      for (const auto& b : std::exchange(buffered_, {})) take(b);
      if (!published) return end(RoundEnd::failed(published.error(), false));
      end(RoundEnd::again());
    });
  }

  void fail(const End& end, Error e) {
    buffered_.clear();
    end(RoundEnd::failed(std::move(e)));
  }

  std::shared_ptr<rt::Runtime> runtime_;
  EtcdSource source_;
  rt::HttpEndpoint endpoint_;
  RequestTap tap_;
  WatcherCore* core_ = nullptr;
  rt::HttpClient* http_ = nullptr; // the runtime's, from the first round on
  EtcdHub* hub_ = nullptr;
  EtcdState state_;
  bool need_range_ = true;
  bool ranging_ = false;
  bool live_ = false;
  std::vector<EtcdWatchResponse> buffered_; // responses heard while ranging
  End waiting_;
  rt::CallId call_ = 0;
};

} // namespace detail
DYNUP_NAMESPACE_END
