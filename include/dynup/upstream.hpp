// Upstream: what an embedder uses. One upstream = a watcher (its source), a policy, a
// health tracker, optional active checks and a rebuild thread that turns all of them
// into an immutable routing table, published RCU-style to request threads.
//
//   auto up = dynup::Upstream::start(config_json);       // Result<std::unique_ptr<Upstream>>
//   auto sel = (*up)->pick({key, &tried});               // any request thread
//   connect(sel.peer->host, sel.peer->port) ...
//   (*up)->report(sel, {latency, status, connect_failure});
//
// docs/UPSTREAM.md documents the config schema and the status JSON.
#pragma once

#include <dynup/balance/picker.hpp>
#include <dynup/balance/policy.hpp>
#include <dynup/detail/rcu.hpp>
#include <dynup/health/active.hpp>
#include <dynup/health/clock.hpp>
#include <dynup/health/tracker.hpp>
#include <dynup/publisher.hpp>
#include <dynup/result.hpp>
#include <dynup/upstream_config.hpp>
#include <dynup/version.hpp>
#include <dynup/watch/any.hpp>

#include <nlohmann/json.hpp>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

DYNUP_NAMESPACE_BEGIN

namespace detail {

/// One routing table: a set, its picker and its health, built together and immutable.
struct UpstreamTable {
  Snapshot set;
  std::shared_ptr<const Picker> picker;
  HealthTracker::Peers health; ///< parallel to *set
  HealthReport report;         ///< what built the picker, for status()
  std::uint64_t number = 0;    ///< tables built so far, this one included
};

} // namespace detail

/// A picked peer and what report() needs to account for it. Holds its routing table, so
/// it stays valid however long the request takes and whatever is published meanwhile.
/// Move it rather than copy it (a copy costs one atomic increment).
struct UpstreamSelection {
  const Peer* peer = nullptr; ///< host, port, id, meta; null when none could be picked
  Selection pick;             ///< the policy's selection (error says why when none)
  std::shared_ptr<const detail::UpstreamTable> table;
  explicit operator bool() const noexcept { return peer != nullptr; }
};

/// One upstream: a source watched, peers balanced by a policy, health tracked.
///
/// Threads: pick() and report() from any number of request threads: lock-free and
/// allocation-free (one atomic increment and decrement for the table a selection holds;
/// a failure report may take a per-peer mutex). status() from any thread. The watcher,
/// the active checker and the rebuild thread are owned here; nothing is global, so any
/// number of upstreams can live in one process. stop() (or the destructor) ends them.
class Upstream {
public:
  using ErrorCallback = dynup::ErrorCallback;

  /// Starts an upstream from its config. Returns once the first set is read (or the
  /// snapshot is served, or with strong_dependency the first fetch failed: the error).
  /// `clock` drives health timing (ejections, fail_timeout, slow start); a ManualClock
  /// makes tests deterministic — call refresh() after moving it. `on_error` hears every
  /// watcher error (never with a token) on the watcher's thread.
  static Result<std::unique_ptr<Upstream>> start(UpstreamConfig config, const Clock& clock = steady_clock(),
                                                 ErrorCallback on_error = {}) {
    auto policy = make_policy(config.policy, config.policy_options);
    if (!policy) return policy.error().with_context("upstream " + config.name);
    std::unique_ptr<Upstream> up(new Upstream(std::move(config), std::move(policy).value(), clock));
    up->start_checker();
    auto watcher = Watcher::start(
        up->publisher_, up->config_.source, up->config_.watch, [p = up.get()](const Snapshot&) { p->wake(true); },
        std::move(on_error));
    if (!watcher) return watcher.error().with_context("upstream " + up->config_.name);
    up->watcher_ = std::move(watcher).value();
    up->rebuild(); // pick() works as soon as start() returns
    up->thread_ = std::thread([p = up.get()] { p->run(); });
    return up;
  }

  /// Parses the config (parse_upstream_config: errors name the JSON path) and starts.
  static Result<std::unique_ptr<Upstream>> start(const nlohmann::json& config, const Clock& clock = steady_clock(),
                                                 ErrorCallback on_error = {}) {
    auto parsed = parse_upstream_config(config);
    if (!parsed) return parsed.error();
    return start(std::move(parsed).value(), clock, std::move(on_error));
  }

  ~Upstream() { stop(); }
  Upstream(const Upstream&) = delete;
  Upstream& operator=(const Upstream&) = delete;

  /// Picks a peer for one request (or one retry: put the tried ones in ctx.tried). On
  /// success, report() must follow exactly once. noexcept, no allocation, no lock.
  UpstreamSelection pick(const PickContext& ctx = {}) const noexcept {
    const auto& table = tables_.get();
    UpstreamSelection out;
    out.pick = table->picker->pick(ctx);
    if (!out.pick) return out;
    table->picker->on_start(out.pick);
    out.peer = out.pick.peer;
    out.table = table;
    return out;
  }

  /// How the request to `s` ended: feeds the policy (in-flight count, latency) and the
  /// passive health checks. A selection without a peer is ignored. Call once per pick.
  void report(const UpstreamSelection& s, const Outcome& outcome) noexcept {
    if (!s.peer || !s.table) return;
    s.table->picker->on_finish(s.pick, outcome);
    if (s.pick.index < s.table->health.size() && tracker_.report(*s.table->health[s.pick.index], outcome))
      wake(false);
  }

  /// Rebuilds the routing table now, on the calling thread, from the current set and
  /// health. For embedders that drive a ManualClock (tests); the rebuild thread does
  /// this by itself otherwise. Not from a callback.
  void refresh() { rebuild(); }

  /// The upstream as JSON: name, policy, version and index of the set, its age, stale,
  /// the watcher's status, panic, and for each peer its weight, effective weight, state
  /// and reason, in-flight requests and EWMA latency. Allocates; any thread.
  nlohmann::ordered_json status() const {
    using nlohmann::ordered_json;
    auto table = tables_.load();
    WatcherStatus ws = watcher_.status();
    ordered_json j;
    j["name"] = config_.name;
    j["source"] = ws.source;
    j["policy"] = config_.policy;
    j["version"] = table->set->version();
    j["index"] = table->set->source_index();
    if (ws.last_success) {
      auto age = std::chrono::system_clock::now() - *ws.last_success;
      j["age_ms"] = std::chrono::duration_cast<std::chrono::milliseconds>(age).count();
    } else {
      j["age_ms"] = nullptr;
    }
    j["stale"] = ws.stale;
    j["watcher"] = {{"last_error", ws.last_error},
                    {"consecutive_failures", ws.consecutive_failures},
                    {"backoff_ms", ws.current_backoff.count()},
                    {"publish_count", ws.publish_count}};
    j["panic"] = table->report.panic;
    if (table->report.panic) j["panic_reason"] = table->report.panic_reason;
    j["healthy_percent"] = table->report.healthy_percent;
    j["tables_built"] = table->number;
    ordered_json peers = ordered_json::array();
    const PeerSet& set = *table->set;
    for (std::size_t i = 0; i < set.size(); ++i) {
      const Peer& p = set[i];
      const PeerHealthStatus& h = table->report.peers[i];
      ordered_json e;
      e["id"] = p.id;
      e["host"] = p.host;
      e["port"] = p.port;
      e["weight"] = p.weight;
      e["effective_weight"] = h.effective_weight;
      if (p.backup) e["backup"] = true;
      e["state"] = to_string(h.state);
      e["available"] = h.available;
      e["reason"] = h.reason;
      if (const PeerStats* st = table->picker->stats_at(i)) {
        e["in_flight"] = st->in_flight.load(std::memory_order_relaxed);
        double ewma = st->ewma_ns.load(std::memory_order_relaxed);
        e["ewma_ms"] = ewma < 0 ? ordered_json(nullptr) : ordered_json(ewma / 1e6);
      }
      peers.push_back(std::move(e));
    }
    j["peers"] = std::move(peers);
    return j;
  }

  /// Stops the watcher, the active checker and the rebuild thread; picks keep working on
  /// the last table. Idempotent; returns within milliseconds; not from a callback.
  void stop() noexcept {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
    }
    cv_.notify_all();
    watcher_.stop();
    if (checker_) checker_->stop();
    if (thread_.joinable()) thread_.join();
  }

  const UpstreamConfig& config() const noexcept { return config_; }
  const std::string& name() const noexcept { return config_.name; }
  /// The publisher the watcher feeds (to observe versions, or to publish by hand when
  /// the source is yours).
  Publisher& publisher() noexcept { return publisher_; }
  WatcherStatus watcher_status() const { return watcher_.status(); }

private:
  Upstream(UpstreamConfig config, std::unique_ptr<Policy> policy, const Clock& clock)
      : config_(std::move(config)), clock_(clock), policy_(std::move(policy)), tracker_(config_.health, clock),
        tables_(empty_table()) {}

  std::shared_ptr<const detail::UpstreamTable> empty_table() {
    auto t = std::make_shared<detail::UpstreamTable>();
    t->set = publisher_.current();
    t->picker = policy_->build(t->set);
    return t;
  }

  void start_checker() {
    if (config_.health.active.kind == ActiveCheckOptions::Kind::none) return;
    checker_.emplace(config_.health.active, [this](const ProbeResult& r) {
      auto table = tables_.load();
      const Peer* p = table->set->find(r.id);
      if (p == nullptr) return; // left the set since
      auto i = static_cast<std::size_t>(p - &(*table->set)[0]);
      if (i < table->health.size() && tracker_.report_active(*table->health[i], r.ok, r.reason)) wake(false);
    });
  }

  // A new set (from the watcher) or a health change (from a report or a probe).
  void wake(bool new_set) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      (new_set ? set_changed_ : health_changed_) = true;
    }
    cv_.notify_one();
  }

  // Builds and publishes the table for the current set and health. The rebuild thread
  // (or refresh(), or start() before the thread exists): never two at once.
  void rebuild() {
    std::lock_guard<std::mutex> build_lock(build_mu_);
    Snapshot set = publisher_.current();
    auto previous = tables_.load();
    auto t = std::make_shared<detail::UpstreamTable>();
    t->set = set;
    if (previous->set == set && previous->health.size() == set->size()) {
      t->health = previous->health;
    } else {
      t->health = tracker_.attach(*set);
      if (checker_) checker_->set_targets(*set);
    }
    t->report = tracker_.view(*set, t->health);
    t->picker = policy_->build(set, t->report.view);
    t->number = previous->number + 1;
    std::optional<Clock::time_point> next = t->report.next_change;
    tables_.store(std::move(t));
    std::lock_guard<std::mutex> lock(mu_);
    next_change_ = next;
  }

  void run() {
    std::unique_lock<std::mutex> lock(mu_);
    while (!stopping_) {
      auto ready = [&] { return stopping_ || set_changed_ || health_changed_; };
      if (next_change_) {
        // The health clock may not be the steady clock: wait the difference in real time.
        auto in = *next_change_ - clock_.now();
        if (in > Clock::duration::zero()) cv_.wait_for(lock, in, ready);
      } else {
        cv_.wait(lock, ready);
      }
      if (stopping_) break;
      set_changed_ = false;
      health_changed_ = false;
      next_change_.reset();
      lock.unlock();
      rebuild();
      lock.lock();
    }
  }

  const UpstreamConfig config_;
  const Clock& clock_;
  Publisher publisher_;
  std::unique_ptr<Policy> policy_;
  HealthTracker tracker_;
  detail::RcuCell<detail::UpstreamTable> tables_;
  std::optional<ActiveChecker> checker_;
  Watcher watcher_;

  std::mutex build_mu_; // one rebuild at a time
  std::mutex mu_;       // guards the fields below
  std::condition_variable cv_;
  bool stopping_ = false;
  bool set_changed_ = false;
  bool health_changed_ = false;
  std::optional<Clock::time_point> next_change_;
  std::thread thread_;
};

DYNUP_NAMESPACE_END
