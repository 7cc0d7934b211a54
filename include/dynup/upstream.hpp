// Upstream: what an embedder uses. One upstream = a watcher (its source), a policy, a
// health tracker, optional active checks and rebuilds (on the process runtime's worker)
// that turn all of them into an immutable routing table, published RCU-style to request
// threads.
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
#include <dynup/detail/lease.hpp>
#include <dynup/detail/rcu.hpp>
#include <dynup/shared_member.hpp>
#include <dynup/detail/task_gate.hpp>
#include <dynup/health/active.hpp>
#include <dynup/health/clock.hpp>
#include <dynup/health/tracker.hpp>
#include <dynup/publisher.hpp>
#include <dynup/result.hpp>
#include <dynup/runtime/runtime.hpp>
#include <dynup/upstream_config.hpp>
#include <dynup/version.hpp>
#include <dynup/watch/any.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

DYNUP_NAMESPACE_BEGIN

namespace detail {

/// One routing table: a set, its picker and its health, built together and immutable
/// (but for the lease count of the selections that still point into it).
struct UpstreamTable {
  Snapshot set;
  std::shared_ptr<const Picker> picker;
  HealthTracker::Peers health; ///< parallel to *set
  HealthReport report;         ///< what built the picker, for status()
  std::uint64_t number = 0;    ///< tables built so far, this one included
  bool shared_stats = false;   ///< the picker's PeerStats are the ones inside `health`
  mutable LeaseCount leases;   ///< selections not yet reported or cancelled
};

} // namespace detail

/// A picked peer and what report() needs to account for it. It leases its routing
/// table, so `peer` stays valid however long the request takes and whatever is
/// published meanwhile, until report() or cancel() ends the selection (the destructor
/// cancels). Move-only; every selection must end before its Upstream is destroyed.
class UpstreamSelection {
public:
  const Peer* peer = nullptr; ///< host, port, id, meta; null when none could be picked
  Selection pick;             ///< the policy's selection (error says why when none)

  UpstreamSelection() = default;
  UpstreamSelection(UpstreamSelection&& o) noexcept { take(o); }
  UpstreamSelection& operator=(UpstreamSelection&& o) noexcept {
    if (this != &o) {
      cancel();
      take(o);
    }
    return *this;
  }
  UpstreamSelection(const UpstreamSelection&) = delete;
  UpstreamSelection& operator=(const UpstreamSelection&) = delete;
  ~UpstreamSelection() { cancel(); }

  explicit operator bool() const noexcept { return peer != nullptr; }

  /// Ends the selection without a report: the request was never sent. Undoes the
  /// in-flight count; no latency sample, no health report. Idempotent.
  void cancel() noexcept {
    if (!table_) return;
    table_->picker->on_cancel(pick);
    end();
  }

  /// The leased table; null once the selection ended.
  const detail::UpstreamTable* table() const noexcept { return table_; }

private:
  friend class Upstream;
  void take(UpstreamSelection& o) noexcept {
    peer = o.peer;
    pick = o.pick;
    table_ = o.table_;
    o.table_ = nullptr;
    o.peer = nullptr;
  }
  void end() noexcept {
    table_->leases.release();
    table_ = nullptr;
    peer = nullptr;
  }
  const detail::UpstreamTable* table_ = nullptr;
};

/// One upstream: a source watched, peers balanced by a policy, health tracked.
///
/// Threads: pick() and report() from any number of request threads. While the routing
/// table is unchanged a pick is one atomic load and the policy's own work: no lock, no
/// allocation, nothing shared written (a selection's lease on its table is a count in
/// the thread's own cache line). The first pick of a thread after a new table takes the
/// table cell's mutex once to copy its pointer, and a thread's very first pick on an
/// upstream allocates its cache slot. A failure report may take a per-peer mutex, and
/// one that changes a peer's health posts a rebuild (a mutex and an allocation). In a
/// shared follower, the one pick that first sees a new region version posts a read of
/// it to the loop (a mutex and an allocation, once per version).
/// status() from any thread. The watcher and the active checker are owned here. Rebuilds
/// and health due times run on the process's runtime (rt::Runtime: one worker and one
/// loop thread for every upstream), never two of one upstream at once, so any number of
/// upstreams costs no thread of their own. stop() (or the destructor) ends them all.
class Upstream {
public:
  using ErrorCallback = dynup::ErrorCallback;

  /// Starts an upstream from its config. Returns once the first set is read (or the
  /// snapshot is served, or with strong_dependency the first fetch failed: the error).
  /// `clock` drives health timing (ejections, fail_timeout, slow start); a ManualClock
  /// makes tests deterministic — call refresh() after moving it (a due time is also
  /// waited for in real time: the difference between the due time and the clock's now).
  /// `on_error` hears every watcher error (never with a token) on the watcher's thread,
  /// and a shared upstream's errors on the runtime's threads. Errors also: Errc::io_error
  /// when the process runtime cannot start (no thread or descriptor left).
  static Result<std::unique_ptr<Upstream>> start(UpstreamConfig config, const Clock& clock = steady_clock(),
                                                 ErrorCallback on_error = {}) {
    auto policy = make_policy(config.policy, config.policy_options);
    if (!policy) return policy.error().with_context("upstream " + config.name);
    auto runtime = rt::Runtime::acquire();
    if (!runtime) return runtime.error().with_context("upstream " + config.name);
    std::unique_ptr<Upstream> up(
        new Upstream(std::move(config), std::move(policy).value(), clock, std::move(runtime).value()));
    up->on_error_ = std::move(on_error);
    if (up->config_.shared.enabled) {
      // One process of the host leads (watches, probes, writes the region); the others
      // follow the region. start() leads when nobody does.
      Upstream* p = up.get();
      detail::SharedMember::Hooks hooks;
      hooks.lead = [p] { return p->lead(); };
      hooks.adopt = [p](PeerSet set) {
        p->publisher_.publish(std::move(set));
        p->wake(true);
      };
      hooks.on_error = [p](const Error& e) {
        if (p->on_error_) p->on_error_(e);
      };
      hooks.leader_state = [p] { return p->watcher_status().to_json(); };
      auto member = detail::SharedMember::open(up->config_.shared, std::move(hooks), up->rt_);
      if (!member) return member.error().with_context("upstream " + up->config_.name);
      up->shared_ = std::move(member).value();
      up->shared_->start();
      std::lock_guard<std::mutex> lock(up->roles_mu_);
      // As without sharing: a first fetch that failed under strong_dependency fails
      // start(), unless another process had a set to share.
      if (up->lead_error_ && up->publisher_.version() == 0) return *up->lead_error_;
    } else if (!up->lead()) {
      std::lock_guard<std::mutex> lock(up->roles_mu_);
      return *up->lead_error_;
    }
    up->rebuild(); // pick() works as soon as start() returns
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

  /// Picks a peer for one request (or one retry: put the tried ones in ctx.tried). A
  /// selection with a peer must end: report() once the request ends, or cancel() (or
  /// its destructor) when it is never sent. noexcept; no lock and no allocation while
  /// the table is unchanged (see the class comment for a thread's first pick of a new
  /// table, which locks once, and of an upstream, which allocates once).
  UpstreamSelection pick(const PickContext& ctx = {}) const noexcept {
    if (shared_) shared_->notice(); // a follower: one load of the shared version
    UpstreamSelection out;
    // This thread's cache holds `table` until its next get(): the lease is taken while
    // that reference keeps the table reachable (see sweep()).
    const auto& table = tables_.get();
    out.pick = table->picker->pick(ctx);
    if (!out.pick && out.pick.error == PickError::all_unavailable && panic_all_ && !ctx.ignore_gate) {
      // The passive gate holds out every peer before a rebuild could judge panic:
      // panic routes to them all, as the rebuilt table will.
      PickContext all = ctx;
      all.ignore_gate = true;
      out.pick = table->picker->pick(all);
    }
    if (!out.pick) return out;
    if (table->shared_stats) tracker_.on_pick(*out.pick.stats);
    table->leases.acquire();
    table->picker->on_start(out.pick);
    out.peer = out.pick.peer;
    out.table_ = table.get();
    return out;
  }

  /// How many peers the current set holds, available or not. Reads this thread's cached
  /// routing table: no lock, no allocation but for the thread's first call.
  std::size_t peer_count() const noexcept { return tables_.get()->set->size(); }

  /// Whether report() uses Outcome::latency (only the ewma policy does; passive health
  /// and outlier detection count statuses and connect failures). An embedder may skip
  /// measuring the latency when false.
  bool uses_latency() const noexcept { return policy_->uses_latency(); }

  /// How the request to `s` ended: feeds the policy (in-flight count, latency) and the
  /// passive health checks, and ends the selection (its peer becomes null). A selection
  /// without a peer is ignored.
  void report(UpstreamSelection& s, const Outcome& outcome) noexcept {
    const detail::UpstreamTable* t = s.table_;
    if (!t) return;
    t->picker->on_finish(s.pick, outcome);
    if (tracker_.passive_failure(outcome.status, outcome.connect_failure, outcome.verdict)) t->picker->on_failed(s.pick);
    // A success on a peer with nothing to reset reads only the line on_finish wrote.
    const bool quiet = t->shared_stats && s.pick.stats && tracker_.quiet(*s.pick.stats, outcome.status, outcome.connect_failure, outcome.verdict);
    if (!quiet && s.pick.index < t->health.size() && tracker_.report(*t->health[s.pick.index], outcome))
      wake(false);
    s.end();
  }
  void report(UpstreamSelection&& s, const Outcome& outcome) noexcept { report(s, outcome); }

  /// Replaces the set of a push:// upstream (an admin API's `PUT …/peers`): the guards
  /// apply, an accepted set is served from the next pick (the routing table is rebuilt
  /// before this returns) and saved to snapshot_path when one is configured. Errors:
  /// Errc::unsupported when the source is not push:// (its watcher would overwrite the
  /// push), Errc::rejected when a guard refuses it; either way nothing changes. Any
  /// thread but a callback's.
  Result<PushResult> push(PeerSet set) {
    Result<PushResult> r = Error(Errc::unsupported, "");
    {
      std::lock_guard<std::mutex> lock(roles_mu_);
      PushWatcher* pusher = watcher_.pusher();
      if (!pusher)
        return Error(Errc::unsupported, "upstream " + config_.name + ": its source is " +
                                            detail::redact_spec_text(config_.source) +
                                            ", which would overwrite a pushed set; only push:// upstreams take pushes");
      r = pusher->push(std::move(set));
    }
    if (r && r->changed) rebuild(/*only_new_set=*/true); // the rebuild task, posted too, may have built it
    if (!r) return r.error().with_context("upstream " + config_.name);
    return r;
  }

  /// Outlier ejections since start (every ejection, not the peers ejected now).
  std::uint64_t ejections_total() const noexcept { return tracker_.ejections_total(); }

  /// Rebuilds the routing table now, on the calling thread, from the current set and
  /// health. For embedders that drive a ManualClock (tests); the runtime's worker does
  /// this by itself otherwise. Not from a callback.
  void refresh() { rebuild(); }

  /// The upstream as JSON: name, policy, version and index of the set, its age, stale,
  /// the watcher's status, panic, and for each peer its weight, effective weight, state
  /// and reason, in-flight requests and EWMA latency. Allocates; any thread.
  nlohmann::ordered_json status() const {
    using nlohmann::ordered_json;
    auto table = tables_.load();
    WatcherStatus ws = watcher_status();
    ordered_json shared = shared_ ? shared_->status() : ordered_json();
    ordered_json j;
    j["name"] = config_.name;
    // A follower process has no watcher: its source is the config's, token redacted.
    j["source"] = ws.source.empty() ? detail::redact_spec_text(config_.source) : ws.source;
    j["policy"] = config_.policy;
    j["version"] = table->set->version();
    j["index"] = table->set->source_index();
    using std::chrono::milliseconds;
    const auto now_ms = std::chrono::duration_cast<milliseconds>(std::chrono::system_clock::now().time_since_epoch());
    // ready: a set was loaded (from the source or the snapshot); stale: it may be older
    // than the source's. A set never loaded is never reported fresh.
    if (shared_ && shared["role"] == "follower") {
      // A follower's set is as fresh as its leader's, whose watcher says how fresh. With
      // no leader alive nobody refreshes the set: stale.
      const ordered_json& lw = shared["leader_watcher"];
      const bool known = lw.is_object() && lw.contains("last_success_ms") && lw["last_success_ms"].is_number();
      j["age_ms"] = known ? ordered_json(now_ms.count() - lw["last_success_ms"].get<std::int64_t>()) : ordered_json(nullptr);
      const bool ready = publisher_.version() > 0 || (lw.is_object() && lw.value("ready", false));
      j["ready"] = ready;
      j["stale"] = !ready || (lw.is_object() && lw.contains("stale") ? lw["stale"].get<bool>() : true);
      if (!ready) j["not_ready_reason"] = "no leading process has published a set yet";
      // The leader's watcher speaks for the set a follower serves.
      auto field = [&](const char* k, ordered_json otherwise) { return lw.is_object() && lw.contains(k) ? lw[k] : otherwise; };
      j["watcher"] = {{"last_error", field("last_error", lw.is_object() ? "" : "no leading process")},
                      {"consecutive_failures", field("consecutive_failures", 0)},
                      {"backoff_ms", field("backoff_ms", 0)},
                      {"publish_count", field("publish_count", 0)},
                      {"mode", field("mode", "")},
                      {"mode_error", field("mode_error", "")}};
    } else {
      j["age_ms"] = ws.last_success ? ordered_json((now_ms - std::chrono::duration_cast<milliseconds>(
                                                                 ws.last_success->time_since_epoch()))
                                                       .count())
                                    : ordered_json(nullptr);
      j["ready"] = ws.ready;
      j["stale"] = ws.stale || !ws.ready;
      if (!ws.ready) j["not_ready_reason"] = ws.last_error.empty() ? "no set loaded yet" : ws.last_error;
      j["watcher"] = {{"last_error", ws.last_error},
                      {"consecutive_failures", ws.consecutive_failures},
                      {"backoff_ms", ws.current_backoff.count()},
                      {"publish_count", ws.publish_count},
                      {"mode", ws.mode},
                      {"mode_error", ws.mode_error}};
    }
    j["panic"] = table->report.panic;
    if (table->report.panic) j["panic_reason"] = table->report.panic_reason;
    j["healthy_percent"] = table->report.healthy_percent;
    j["ejections_total"] = tracker_.ejections_total();
    j["tables_built"] = table->number;
    {
      std::lock_guard<std::mutex> build_lock(build_mu_);
      j["retained_tables"] = retired_.size(); // replaced, still leased by selections
    }
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
    if (shared_) j["shared"] = std::move(shared);
    return j;
  }

  /// Stops the watcher, the active checker, the shared member and the rebuilds; picks
  /// keep working on the last table. Once it returns no task or timer of this upstream
  /// runs any more, so the Upstream may be destroyed. Waits for a rebuild (or a shared
  /// lead) under way on the runtime's threads: milliseconds, or a lead's first fetch.
  /// Idempotent. Not from the watcher's or the checker's callbacks (their stop() joins
  /// the thread that runs them); from a rebuild or shared-member callback on the
  /// runtime's threads it does not wait for that callback itself.
  void stop() noexcept {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true; // wake() posts nothing more
      cancel_timer_locked(due_timer_);
      cancel_timer_locked(sweep_timer_);
    }
    // A rebuild under way ends first: it may write the shared region, which only the
    // lock holder may. Later tasks and timers do nothing.
    gate_->close();
    if (shared_) shared_->stop(); // no new lead or adopt; the lock is released for another process
    {
      std::lock_guard<std::mutex> lock(roles_mu_);
      watcher_.stop();
      if (checker_) checker_->stop();
    }
  }

  const UpstreamConfig& config() const noexcept { return config_; }
  const std::string& name() const noexcept { return config_.name; }
  /// The publisher the watcher feeds (to observe versions, or to publish by hand when
  /// the source is yours).
  Publisher& publisher() noexcept { return publisher_; }
  /// The watcher's status; a follower process of a shared upstream has no watcher (an
  /// empty status: see status()["shared"]).
  WatcherStatus watcher_status() const {
    std::lock_guard<std::mutex> lock(roles_mu_);
    return watcher_.status();
  }

private:
  Upstream(UpstreamConfig config, std::unique_ptr<Policy> policy, const Clock& clock,
           std::shared_ptr<rt::Runtime> runtime)
      : rt_(std::move(runtime)), config_(std::move(config)), clock_(clock), policy_(std::move(policy)),
        tracker_(config_.health, clock),
        panic_all_(config_.health.panic.threshold_percent > 0 && config_.health.panic.mode == PanicOptions::Mode::all),
        tables_(empty_table()) {
    // The policy's per-peer stats are the ones inside the health state: a pick and its
    // report touch one line per peer.
    policy_->share_stats([this](const Peer& p) { return tracker_.stats_of(p.id); });
  }

  std::shared_ptr<const detail::UpstreamTable> empty_table() {
    auto t = std::make_shared<detail::UpstreamTable>();
    t->set = publisher_.current();
    t->picker = policy_->build(t->set);
    return t;
  }

  // Starts watching the source and probing the peers: always without sharing, and in
  // the leading process with it. false (the error in lead_error_ and on_error_): the
  // watcher could not start. start()'s caller, or the runtime's worker when a shared
  // follower takes over (never the loop: Watcher::start may wait on a first fetch);
  // never inside a rebuild; once at a time.
  bool lead() {
    std::unique_ptr<ActiveChecker> checker;
    if (config_.health.active.kind != ActiveCheckOptions::Kind::none) {
      // Its eventfd or thread may fail (EMFILE, EAGAIN): an error to report, never an
      // exception escaping the runtime's task that calls lead() in shared mode.
      try {
        checker = std::make_unique<ActiveChecker>(config_.health.active, [this](const ProbeResult& r) {
          auto table = tables_.load();
          const Peer* p = table->set->find(r.id);
          if (p == nullptr) return; // left the set since
          auto i = static_cast<std::size_t>(p - &(*table->set)[0]);
          if (i < table->health.size() && tracker_.report_active(*table->health[i], r.ok, r.reason)) wake(false);
        });
      } catch (const std::exception& e) {
        Error err(Errc::io_error, "upstream " + config_.name + ": active checks could not start: " + e.what());
        {
          std::lock_guard<std::mutex> lock(roles_mu_);
          lead_error_ = err;
        }
        if (shared_ && on_error_) on_error_(err);
        return false;
      }
    }
    {
      std::lock_guard<std::mutex> lock(roles_mu_);
      checker_ = std::move(checker);
    }
    auto watcher = Watcher::start(
        publisher_, config_.source, config_.watch, [this](const Snapshot&) { wake(true); }, on_error_);
    if (!watcher) {
      Error e = watcher.error().with_context("upstream " + config_.name);
      std::unique_ptr<ActiveChecker> unused;
      {
        std::lock_guard<std::mutex> lock(roles_mu_);
        unused = std::move(checker_);
        lead_error_ = e;
      }
      unused.reset(); // stopped outside roles_mu_, which the loop takes (leader_state)
      if (shared_ && on_error_) on_error_(e); // start() returns it otherwise
      return false;
    }
    std::lock_guard<std::mutex> lock(roles_mu_);
    lead_error_.reset();
    watcher_ = std::move(watcher).value();
    if (checker_) checker_->set_targets(*publisher_.current());
    wake(true); // a leader writes the region on its next rebuild
    return true;
  }

  // What a leader shares: its set, with the peers its active checks failed marked
  // critical (and why), so followers route around them too.
  static PeerSet shared_view(const PeerSet& set, const HealthReport& report) {
    bool any = false;
    for (const auto& st : report.peers) any = any || !st.active_down.empty();
    if (!any) return set;
    std::vector<Peer> peers = set.peers();
    for (std::size_t i = 0; i < peers.size() && i < report.peers.size(); ++i) {
      if (report.peers[i].active_down.empty()) continue;
      peers[i].health = Health::critical;
      peers[i].meta[shared_active_key] = report.peers[i].active_down;
    }
    auto made = PeerSet::make(std::move(peers), set.source_index());
    return made ? std::move(made).value() : set;
  }

  // A new set (from the watcher) or a health change (from a report or a probe): flags
  // it and posts one rebuild, unless one is queued already (it will see the flag).
  void wake(bool new_set) noexcept {
    std::lock_guard<std::mutex> lock(mu_);
    (new_set ? set_changed_ : health_changed_) = true;
    schedule_locked();
  }

  // Posts work() to the runtime's worker unless it is queued or the upstream stops.
  // Without memory the flags stay set for the next wake-up, timer or refresh().
  void schedule_locked() noexcept {
    if (queued_ || stopping_) return;
    try {
      rt_->worker().post([gate = gate_, this] { gate->enter([this] { work(); }); });
      queued_ = true;
    } catch (...) {
    }
  }

  // The worker's task: one rebuild for every change flagged since it was posted, then a
  // sweep of the replaced tables (re-armed every sweep_period while some remain).
  void work() {
    bool build;
    bool only_new_set;
    {
      std::lock_guard<std::mutex> lock(mu_);
      queued_ = false;
      if (stopping_) return;
      build = set_changed_ || health_changed_ || due_;
      only_new_set = !health_changed_ && !due_;
      set_changed_ = false;
      health_changed_ = false;
      if (build && !only_new_set) {
        due_ = false;
        next_change_.reset(); // a skipped rebuild keeps the pending change
      }
    }
    if (build) rebuild(only_new_set);
    if (sweep()) {
      std::lock_guard<std::mutex> lock(mu_);
      arm_sweep_locked();
    }
  }

  // Builds and publishes the table for the current set and health. The runtime's worker
  // (or refresh(), or push(), or start()): never two at once (build_mu_).
  // With `only_new_set`, nothing is built when the table already holds the current set
  // (a push is built by push() and by the rebuild task its publish posted: once is enough).
  void rebuild(bool only_new_set = false) {
    std::lock_guard<std::mutex> build_lock(build_mu_);
    Snapshot set = publisher_.current();
    auto previous = tables_.load();
    if (only_new_set && previous->set == set) return;
    auto t = std::make_shared<detail::UpstreamTable>();
    t->set = set;
    if (previous->set == set && previous->health.size() == set->size()) {
      t->health = previous->health;
    } else {
      t->health = tracker_.attach(*set);
      std::lock_guard<std::mutex> lock(roles_mu_);
      if (checker_) checker_->set_targets(*set);
    }
    t->report = tracker_.view(*set, t->health);
    t->picker = policy_->build(set, t->report.view);
    t->shared_stats = !set->empty();
    for (std::size_t i = 0; i < set->size() && t->shared_stats; ++i)
      t->shared_stats = i < t->health.size() && t->picker->stats_at(i) == &HealthTracker::stats_of(*t->health[i]);
    t->number = previous->number + 1;
    std::optional<Clock::time_point> next = t->report.next_change;
    if (shared_ && shared_->leader()) shared_->publish(shared_view(*set, t->report));
    tables_.store(std::move(t));
    // Selections may still point into the previous table: keep it until they end.
    retired_.push_back(std::move(previous));
    const bool retiring = sweep_locked();
    std::lock_guard<std::mutex> lock(mu_);
    next_change_ = next;
    arm_due_locked();
    if (retiring) arm_sweep_locked();
  }

  // Keeps one loop timer at next_change_ (slow start steps, fail_timeout and ejection
  // ends), re-armed only when next_change_ moved. Under mu_.
  void arm_due_locked() noexcept {
    if (stopping_) return;
    if (next_change_ == armed_for_ && (due_timer_ != 0 || !next_change_)) return;
    cancel_timer_locked(due_timer_);
    armed_for_.reset();
    if (!next_change_) return;
    // The health clock may not be the steady clock: wait the difference in real time.
    const auto in = std::max(*next_change_ - clock_.now(), Clock::duration::zero());
    const std::uint64_t generation = ++due_generation_;
    try {
      due_timer_ = rt_->loop().after(in, [gate = gate_, this, generation] {
        gate->enter([&] {
          std::lock_guard<std::mutex> lock(mu_);
          if (generation != due_generation_) return; // re-armed since (cancel raced)
          due_timer_ = 0;
          armed_for_.reset();
          due_ = true;
          schedule_locked();
        });
      });
      armed_for_ = next_change_;
    } catch (...) {
      // Without memory for a timer the change waits for the next rebuild.
    }
  }

  // While replaced tables remain, a sweep every sweep_period frees the unleased ones.
  void arm_sweep_locked() noexcept {
    if (stopping_ || sweep_timer_ != 0) return;
    try {
      sweep_timer_ = rt_->loop().after(sweep_period, [gate = gate_, this] {
        gate->enter([&] {
          std::lock_guard<std::mutex> lock(mu_);
          sweep_timer_ = 0;
          schedule_locked(); // work() sweeps
        });
      });
    } catch (...) {
    }
  }

  // Cancels a loop timer; one that runs at this moment finds its generation or the
  // gate closed. Under mu_.
  void cancel_timer_locked(rt::TimerId& id) noexcept {
    if (id != 0) rt_->loop().cancel(id);
    id = 0;
  }

  // Frees the replaced tables no selection leases any more; true when some remain.
  //
  // A lease is taken only through a thread's RcuCell cache, on the table that cache
  // holds, and a replaced table enters no cache again. So once use_count() is 1 (only
  // retired_ holds it), no lease can be taken any more, and every thread that took one
  // released its cached reference after counting it: that reference count decrement is
  // a release, the acquire fence below pairs with it, and idle() sees every lease
  // taken. (libstdc++'s use_count() is a relaxed atomic load.) A lease returned but not
  // yet visible only postpones the free to the next sweep.
  bool sweep() {
    std::lock_guard<std::mutex> build_lock(build_mu_);
    return sweep_locked();
  }
  bool sweep_locked() {
    auto unused = [](const std::shared_ptr<const detail::UpstreamTable>& t) {
      if (t.use_count() != 1) return false;
#if !defined(__SANITIZE_THREAD__)
      // (GCC's ThreadSanitizer rejects fences; x86's load ordering gives the same.)
      std::atomic_thread_fence(std::memory_order_acquire);
#endif
      return t->leases.idle();
    };
    retired_.erase(std::remove_if(retired_.begin(), retired_.end(), unused), retired_.end());
    return !retired_.empty();
  }

  static constexpr std::chrono::milliseconds sweep_period{250};

  // Declared first: destroyed last, after everything that may post to it.
  std::shared_ptr<rt::Runtime> rt_;
  const UpstreamConfig config_;
  const Clock& clock_;
  Publisher publisher_;
  std::unique_ptr<Policy> policy_;
  HealthTracker tracker_;
  const bool panic_all_; ///< panic routes to every peer (mode all, threshold > 0)
  detail::RcuCell<detail::UpstreamTable> tables_;
  ErrorCallback on_error_;
  std::unique_ptr<detail::SharedMember> shared_; // set in start(), then read-only
  // Guards the three below: lead() runs late in a follower. The loop takes it (a shared
  // leader's leader_state hook), so nothing done under it may wait on the loop.
  mutable std::mutex roles_mu_;
  std::unique_ptr<ActiveChecker> checker_;
  Watcher watcher_;
  std::optional<Error> lead_error_;

  mutable std::mutex build_mu_; // one rebuild at a time; guards retired_
  std::vector<std::shared_ptr<const detail::UpstreamTable>> retired_;

  // What the runtime's tasks and timers of this upstream may touch: stop() closes it.
  std::shared_ptr<detail::TaskGate> gate_ = std::make_shared<detail::TaskGate>();
  std::mutex mu_; // guards the fields below
  bool stopping_ = false;
  bool set_changed_ = false;
  bool health_changed_ = false;
  bool due_ = false;    ///< the due timer fired: next_change_ has come
  bool queued_ = false; ///< a work() task waits in the worker's queue
  std::optional<Clock::time_point> next_change_;
  std::optional<Clock::time_point> armed_for_; ///< the next_change_ due_timer_ waits for
  rt::TimerId due_timer_ = 0;
  std::uint64_t due_generation_ = 0;
  rt::TimerId sweep_timer_ = 0;
};

DYNUP_NAMESPACE_END
