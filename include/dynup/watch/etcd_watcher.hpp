// EtcdWatcher: keeps a Publisher in step with an etcd v3 prefix (or one key) through
// the JSON gateway: range, publish, then one streaming watch applied event by event.
#pragma once

#include <dynup/peer_set.hpp>
#include <dynup/publisher.hpp>
#include <dynup/result.hpp>
#include <dynup/source/etcd.hpp>
#include <dynup/version.hpp>
#include <dynup/watch/backoff.hpp>
#include <dynup/watch/core.hpp>
#include <dynup/watch/transport.hpp>

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

DYNUP_NAMESPACE_BEGIN

/// Watches one EtcdSource on a thread of its own and publishes every change.
///
/// The loop: range the watched keys (linearizable) and publish them; open a watch from
/// the range's revision + 1 and apply each response's events to a local copy,
/// publishing after each response (a transaction's events arrive, and are published,
/// together). On `compact_revision` (etcd compacted the revision the watch had to
/// start from) it ranges again, replaces the local copy, and watches from the new
/// revision + 1. On a broken stream, a refused or cancelled watch, or an HTTP error, it
/// backs off (exponential, full jitter, WatcherCore) and starts over with a range. A
/// stream that was quiet for `WatchOptions::wait` is reopened from the last revision
/// seen, without a range and without counting as a failure.
///
/// Quiet watches: the watch asks for progress notifications, which etcd sends every
/// --experimental-watch-progress-notify-interval (10 minutes by default) and which
/// advance the revision a reopened watch starts from. The stream's read timeout is
/// `wait` + stream_margin, and so is the longest it may go without a complete message:
/// a server that goes silent, or trickles bytes that never finish a message, is dropped
/// and redialled, which is how a dead connection is noticed. With a server interval
/// below `wait` the stream stays open for good. A range request must be complete within
/// range_read_timeout however its bytes are paced.
///
/// Guards, the last-known-good snapshot and strong_dependency behave exactly as in
/// BlockingWatcher. Invalid keys are left out and reported to the error callback; an
/// invalid document (layout=document) is reported and keeps the published set.
/// Threads: callbacks run on the watcher's thread (or on the caller's during start());
/// status() is safe from any thread.
class EtcdWatcher {
public:
  /// Deadline of a whole range request.
  static constexpr std::chrono::milliseconds range_read_timeout{10000};
  /// Slack on top of `wait` before a silent watch stream is declared dead.
  static constexpr std::chrono::milliseconds stream_margin{1000};

  /// Ranges once on the calling thread, then watches on a thread of its own. When that
  /// first range fails (etcd unreachable, an error reply, an invalid document): with
  /// `strong_dependency` the error is returned; otherwise the last-known-good snapshot
  /// (if configured and readable) is published, marked stale, and the thread retries
  /// with backoff. A null `transport` means an HttplibTransport to the source's host.
  /// With InitialFetch::background nothing is ranged here: the snapshot (if any) is
  /// published, stale, and the thread does the first range; strong_dependency with
  /// background is Errc::invalid_argument.
  static Result<std::unique_ptr<EtcdWatcher>> start(Publisher& publisher, EtcdSource source,
                                                    std::unique_ptr<Transport> transport, WatchOptions options,
                                                    PublishCallback on_publish = {}, ErrorCallback on_error = {}) {
    if (auto ok = check_initial(options, source.describe()); !ok) return ok.error();
    if (!transport) transport = std::make_unique<HttplibTransport>(source.host(), source.port());
    std::unique_ptr<EtcdWatcher> w(new EtcdWatcher(publisher, std::move(source), std::move(transport),
                                                   std::move(options), std::move(on_publish), std::move(on_error)));
    if (w->core_.options().initial == InitialFetch::background) {
      w->core_.load_fallback();
      w->thread_ = std::thread([p = w.get()] { p->run(); });
      return w;
    }
    Result<void> first = w->range();
    if (first) first = w->publish({});
    if (!first) {
      // When etcd answered (only the data was bad), watch for the fix right away.
      auto delay = w->core_.first_fetch_failed(first.error(), "first range", w->need_range_);
      if (!delay) return delay.error();
      w->first_delay_ = *delay;
    }
    w->thread_ = std::thread([p = w.get()] { p->run(); });
    return w;
  }

  ~EtcdWatcher() { stop(); }
  EtcdWatcher(const EtcdWatcher&) = delete;
  EtcdWatcher& operator=(const EtcdWatcher&) = delete;

  /// Stops the loop, closing a watch stream or a request in flight, and joins the
  /// thread. Returns within milliseconds. Idempotent; not from a callback.
  void stop() noexcept {
    core_.request_stop();
    transport_->cancel();
    if (thread_.joinable()) thread_.join();
  }

  WatcherStatus status() const { return core_.status(); }
  const EtcdSource& source() const noexcept { return source_; }

private:
  EtcdWatcher(Publisher& publisher, EtcdSource source, std::unique_ptr<Transport> transport, WatchOptions options,
              PublishCallback on_publish, ErrorCallback on_error)
      : source_(std::move(source)), transport_(std::move(transport)),
        core_(publisher, source_.describe(), std::move(options), std::move(on_publish), std::move(on_error)),
        bucket_(core_.options().min_interval, core_.options().burst) {}

  enum class StreamEnd {
    stopped,   // stop() was called
    compacted, // the start revision is gone: range again, at once
    quiet,     // nothing for `wait`: reopen from the same revision, at once
    failed,    // back off, then range again
  };

  static HttpRequest post(const EtcdRequest& r, std::chrono::milliseconds read_timeout) {
    HttpRequest req;
    req.method = "POST";
    req.target = r.target;
    req.body = r.body;
    req.content_type = "application/json";
    req.read_timeout = read_timeout;
    return req;
  }

  // Reads every watched key into state_. On success the next step is a watch.
  Result<void> range() {
    auto res = transport_->send(post(source_.range_request(), range_read_timeout));
    if (!res) return res.error().with_context(source_.describe());
    auto range = EtcdSource::decode_range(res->status, res->body);
    if (!range) return range.error().with_context(source_.describe());
    report_skipped(source_.load(state_, *range));
    need_range_ = false;
    core_.succeeded(static_cast<std::uint64_t>(state_.revision));
    return {};
  }

  // Offers the set state_ describes. An invalid document is returned, not published.
  Result<void> publish(std::vector<std::string> skipped) {
    report_skipped(skipped);
    auto built = source_.peers(state_);
    if (!built) return built.error();
    report_skipped(built->skipped);
    core_.offer(std::move(built->set));
    return {};
  }

  void report_skipped(const std::vector<std::string>& skipped) {
    for (const auto& why : skipped) core_.report(Error(Errc::invalid_peer, source_.describe() + ": " + why));
  }

  // One watch stream, from state_.revision + 1 until it ends. `why` is set for `failed`.
  StreamEnd watch(Error& why) {
    using clock = std::chrono::steady_clock;
    // 0 or less means the default, as for every watcher (WatchOptions::wait).
    const auto wait = core_.options().wait.count() > 0 ? core_.options().wait : WatchOptions{}.wait;
    EtcdWatchStream stream;
    bool created = false;
    std::optional<StreamEnd> end;
    auto last_message = clock::now();
    auto res = transport_->stream(
        post(source_.watch_request(state_.revision + 1), wait + stream_margin), [&](std::string_view bytes) {
          if (core_.stop_requested()) return false;
          stream.feed(bytes);
          while (auto next = stream.next()) {
            last_message = clock::now();
            if (!*next) {
              why = next->error().with_context(source_.describe());
              end = StreamEnd::failed;
              return false;
            }
            const EtcdWatchResponse& r = **next;
            if (r.compact_revision > 0) {
              end = StreamEnd::compacted;
              return false;
            }
            if (r.canceled) {
              why = Error(Errc::unavailable, source_.describe() + ": etcd cancelled the watch" +
                                                 (r.cancel_reason.empty() ? "" : ": " + r.cancel_reason));
              end = StreamEnd::failed;
              return false;
            }
            if (r.created) created = true;
            if (r.events.empty() && !r.is_progress()) {
              if (r.created) core_.succeeded(static_cast<std::uint64_t>(state_.revision));
              continue;
            }
            auto skipped = source_.apply(state_, r);
            core_.succeeded(static_cast<std::uint64_t>(state_.revision));
            if (r.events.empty()) continue; // progress: nothing changed here
            if (auto published = publish(std::move(skipped)); !published) core_.report(published.error());
          }
          if (clock::now() - last_message >= wait + stream_margin) {
            why = Error(Errc::timeout, source_.describe() + ": watch: bytes arrive but no complete message within " +
                                           std::to_string((wait + stream_margin).count()) + " ms");
            end = StreamEnd::failed;
            return false;
          }
          return true;
        });
    if (core_.stop_requested()) return StreamEnd::stopped;
    if (end) return *end;
    if (!res) {
      // A read timeout and a dropped connection look alike; only the silence tells.
      if (created && clock::now() - last_message >= wait) return StreamEnd::quiet;
      why = res.error().with_context(source_.describe() + ": watch");
      return StreamEnd::failed;
    }
    if (res->status != 200)
      why = Error(Errc::unavailable,
                  source_.describe() + ": etcd answered HTTP " + std::to_string(res->status) + " to /v3/watch");
    else
      why = Error(Errc::unavailable, source_.describe() + ": etcd closed the watch stream");
    return StreamEnd::failed;
  }

  void run() {
    if (first_delay_.count() > 0 && !core_.sleep_for(first_delay_)) return;
    while (!core_.stop_requested()) {
      if (auto pause = bucket_.take(); pause.count() > 0 && !core_.sleep_for(pause)) break;
      if (need_range_) {
        Result<void> r = range();
        if (core_.stop_requested()) break;
        if (!r) {
          if (!core_.sleep_for(core_.failed(r.error()))) break;
          continue;
        }
        if (auto published = publish({}); !published) core_.report(published.error());
        continue;
      }
      Error why(Errc::unavailable, "");
      switch (watch(why)) {
      case StreamEnd::stopped: return;
      case StreamEnd::quiet: break;
      case StreamEnd::compacted: need_range_ = true; break;
      case StreamEnd::failed:
        need_range_ = true;
        if (!core_.sleep_for(core_.failed(why))) return;
        break;
      }
    }
  }

  EtcdSource source_;
  std::unique_ptr<Transport> transport_;
  detail::WatcherCore core_;
  TokenBucket bucket_;
  EtcdState state_;        // watcher thread only (start() runs before it exists)
  bool need_range_ = true; // likewise
  std::chrono::milliseconds first_delay_{0};
  std::thread thread_;
};

DYNUP_NAMESPACE_END
