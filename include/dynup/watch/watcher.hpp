// BlockingWatcher: the blocking-query loop (Consul's model) over any source that builds
// a request from the last index and decodes a reply into peers plus an index.
#pragma once

#include <dynup/peer_set.hpp>
#include <dynup/publisher.hpp>
#include <dynup/result.hpp>
#include <dynup/version.hpp>
#include <dynup/watch/backoff.hpp>
#include <dynup/watch/core.hpp>
#include <dynup/watch/transport.hpp>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

DYNUP_NAMESPACE_BEGIN

/// A decoded reply: the peers it lists and the index it carries (0 when it had none).
struct Decoded {
  PeerSet set;
  std::uint64_t index = 0;
  /// Entries left out with the reason (an invalid KV value, say); the rest is published.
  std::vector<std::string> skipped;
};

/// What BlockingWatcher needs of a source (see source/consul.hpp):
///
///   std::string describe() const;                  // the spec, never with secrets
///   HttpRequest request(std::uint64_t index, std::chrono::milliseconds wait) const;
///   Result<Decoded> decode(const HttpResponse& response) const;
///
/// `request(0, …)` is a plain read that returns at once; with an index it blocks until
/// the index moves past it or `wait` passes. `decode` turns HTTP errors into Errors.
///
/// The loop follows Consul's blocking-query rules: the first request has no index; an
/// unchanged index is a timeout, not a change; an index that goes backwards resets to 0
/// and refetches; index 0 or none continues from 1 (and the next answer is compared by
/// content, since 1 was never the server's index); a token bucket paces requests;
/// failures back off exponentially with full jitter and keep the last good set; equal
/// content is never republished. Each request must be complete within wait + wait/16
/// (the server's jitter) + `read_margin`, however the server paces its bytes.
template <class Source> class BlockingWatcher {
public:
  /// Slack on top of wait + wait/16 before a blocking read is declared dead.
  static constexpr std::chrono::milliseconds read_margin{5000};
  /// Deadline of the first, non-blocking request (also used after an index reset).
  static constexpr std::chrono::milliseconds plain_read_timeout{10000};

  /// With InitialFetch::wait (the default): fetches once on the calling thread, then
  /// watches on a thread of its own. When that first fetch fails: with
  /// `strong_dependency` the error is returned; otherwise the last-known-good snapshot
  /// (if configured and readable) is published and marked stale, and the thread keeps
  /// retrying with backoff. With InitialFetch::background: publishes the snapshot (if
  /// any, stale) and returns without any I/O; the thread does the first fetch.
  /// strong_dependency with background is Errc::invalid_argument.
  static Result<std::unique_ptr<BlockingWatcher>> start(Publisher& publisher, Source source,
                                                        std::unique_ptr<Transport> transport, WatchOptions options,
                                                        PublishCallback on_publish = {}, ErrorCallback on_error = {}) {
    if (auto ok = check_initial(options, source.describe()); !ok) return ok.error();
    std::unique_ptr<BlockingWatcher> w(new BlockingWatcher(publisher, std::move(source), std::move(transport),
                                                           std::move(options), std::move(on_publish),
                                                           std::move(on_error)));
    if (w->core_.options().initial == InitialFetch::background) {
      w->core_.load_fallback();
      w->thread_ = std::thread([p = w.get()] { p->run(); });
      return w;
    }
    Result<void> first = w->fetch_once();
    if (!first) {
      auto delay = w->core_.first_fetch_failed(first.error(), "first fetch", true);
      if (!delay) return delay.error();
      w->first_delay_ = *delay;
    }
    w->thread_ = std::thread([p = w.get()] { p->run(); });
    return w;
  }

  ~BlockingWatcher() { stop(); }
  BlockingWatcher(const BlockingWatcher&) = delete;
  BlockingWatcher& operator=(const BlockingWatcher&) = delete;

  /// Stops the loop, aborting a blocking query in flight, and joins the thread. Returns
  /// within milliseconds whatever the wait. Idempotent; not from a callback.
  void stop() noexcept {
    core_.request_stop();
    transport_->cancel();
    if (thread_.joinable()) thread_.join();
  }

  WatcherStatus status() const { return core_.status(); }
  const Source& source() const noexcept { return source_; }

private:
  BlockingWatcher(Publisher& publisher, Source source, std::unique_ptr<Transport> transport, WatchOptions options,
                  PublishCallback on_publish, ErrorCallback on_error)
      : source_(std::move(source)), transport_(std::move(transport)),
        core_(publisher, source_.describe(), std::move(options), std::move(on_publish), std::move(on_error)),
        bucket_(core_.options().min_interval, core_.options().burst) {}

  // One request at the current index and everything that follows from its answer.
  // Returns the error when the request or its decoding failed.
  Result<void> fetch_once() {
    // No wait would leave the server's default hold (Consul: 5 minutes) with a read
    // timeout of only the margin: ask for that default explicitly instead.
    auto wait = core_.options().wait.count() > 0 ? core_.options().wait : WatchOptions{}.wait;
    HttpRequest req = source_.request(index_, wait);
    req.read_timeout = index_ == 0 ? plain_read_timeout : wait + wait / 16 + read_margin;
    auto res = transport_->send(req);
    if (!res) return res.error().with_context(source_.describe());
    auto decoded = source_.decode(*res);
    if (!decoded) return decoded.error().with_context(source_.describe());
    for (const auto& why : decoded->skipped) core_.report(Error(Errc::invalid_peer, source_.describe() + ": " + why));

    std::uint64_t got = decoded->index;
    core_.succeeded(got);
    // Only an index the server gave can be unchanged: after a substituted 1, an answer
    // at index 1 may be a change, so it is offered and compared by content.
    bool unchanged = index_from_server_ && got == index_;
    if (!unchanged) core_.offer(std::move(decoded).value().set.with_source_index(got));
    index_from_server_ = got != 0 && got >= index_;
    if (got == 0)
      index_ = 1; // index 0 never blocks: continue from 1
    else if (got < index_)
      index_ = 0; // the index went backwards (a snapshot restore): refetch the full state
    else
      index_ = got;
    return {};
  }

  void run() {
    if (first_delay_.count() > 0 && !core_.sleep_for(first_delay_)) return;
    while (!core_.stop_requested()) {
      if (auto pause = bucket_.take(); pause.count() > 0 && !core_.sleep_for(pause)) break;
      Result<void> r = fetch_once();
      if (core_.stop_requested()) break;
      if (!r) {
        if (!core_.sleep_for(core_.failed(r.error()))) break;
      }
    }
  }

  Source source_;
  std::unique_ptr<Transport> transport_;
  detail::WatcherCore core_;
  TokenBucket bucket_;
  std::uint64_t index_ = 0; // watcher thread only (start() runs before it exists)
  bool index_from_server_ = false; // index_ is the server's, not 0 or a substituted 1
  std::chrono::milliseconds first_delay_{0};
  std::thread thread_;
};

DYNUP_NAMESPACE_END
