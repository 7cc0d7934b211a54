// HealthTracker: one health state machine per peer id, merging registry health, active
// probe results and passive reports (nginx max_fails, Envoy outlier ejection) into the
// HealthView that policies build from, with panic threshold and slow start applied.
// It owns no thread: request threads report, the prober reports, and one "rebuild"
// thread calls attach() and view() and sleeps until the report's next_change.
#pragma once

#include <dynup/peer_stats.hpp>
#include <dynup/health/clock.hpp>
#include <dynup/health/options.hpp>
#include <dynup/health/options_json.hpp>
#include <dynup/health/view.hpp>
#include <dynup/peer_set.hpp>
#include <dynup/version.hpp>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

DYNUP_NAMESPACE_BEGIN

/// A peer's own health, before the panic threshold applies.
enum class PeerState : std::uint8_t {
  healthy,   ///< nothing to report
  warning,   ///< routed, but something is counting against it (or it is ramping up)
  unhealthy, ///< not routed unless panic routes every peer
};

constexpr const char* to_string(PeerState s) noexcept {
  switch (s) {
  case PeerState::healthy: return "healthy";
  case PeerState::warning: return "warning";
  case PeerState::unhealthy: return "unhealthy";
  }
  return "unknown";
}

class HealthTracker;

/// One peer's health state machine. Made by HealthTracker::attach and opaque to everyone
/// else: hand it back to report / report_active from any thread. Kept alive by the
/// shared_ptr, so a request that outlives its peer's removal may still report to it
/// (the report is ignored). Its first cache line is the peer's PeerStats, whose
/// health_pending word is the one field a successful report reads: a policy given that
/// PeerStats (HealthTracker::stats_of) touches one line per pick + report, not two.
class alignas(64) PeerHealth {
  struct Private {
    explicit Private() = default;
  };

public:
  PeerHealth(Private, std::string id) : id_(std::move(id)) {}
  PeerHealth(const PeerHealth&) = delete;
  PeerHealth& operator=(const PeerHealth&) = delete;

  /// The peer id this state belongs to. Immutable.
  const std::string& id() const noexcept { return id_; }

private:
  friend class HealthTracker;
  using time_point = Clock::time_point;
  enum class Cause : std::uint8_t { none, consecutive_5xx, gateway };

  // stats_.health_pending: non-zero while a failure counter is non-zero, the one field
  // report()'s success path reads, without the lock. Written under mu_.
  PeerStats stats_;
  std::mutex mu_;
  const std::string id_;

  // Everything below is guarded by mu_.
  bool detached_ = false;           ///< the id left the set; reports are ignored
  bool became_unavailable_ = false; ///< a report made it unavailable since the last view()

  // nginx's passive state is fails and checked (in stats_, read by picks) and accessed:
  // the time of the last failure. A success clears fails once the peer was let
  // through after fail_timeout since that failure (accessed < checked).
  std::int64_t accessed_ns_ = 0;

  unsigned c5xx_ = 0; ///< consecutive 5xx (connect failures and no response included)
  unsigned cgw_ = 0;  ///< consecutive gateway failures
  bool ejected_ = false;
  time_point ejected_until_{};
  Clock::duration ejection_length_{};
  time_point last_ejection_end_{};
  unsigned times_ejected_ = 0;
  Cause eject_cause_ = Cause::none;
  unsigned eject_run_ = 0;
  bool refused_ = false; ///< an ejection was due but max_ejection_percent refused it
  Cause refused_cause_ = Cause::none;
  unsigned refused_run_ = 0;
  std::size_t refused_limit_ = 0;

  bool active_healthy_ = true; ///< new peers start healthy for active checks
  unsigned active_ok_ = 0;     ///< consecutive successful probes
  unsigned active_fail_ = 0;   ///< consecutive failed probes
  std::string active_reason_;  ///< the last failed probe's reason

  // The rebuild thread's own fields (attach and view only).
  std::optional<time_point> ramp_start_; ///< slow start in progress since then
  bool last_unavailable_ = false;        ///< what the last view() decided (report() reads it under mu_)
};

/// One peer's line of a HealthReport.
struct PeerHealthStatus {
  PeerState state = PeerState::healthy; ///< its own health; unhealthy ⇔ not routed unless in panic
  /// What decided the state, e.g. "registry: critical", "active: 3 consecutive failures
  /// (connection refused)", "slow start: 40% of weight"; parts joined by "; ". "healthy"
  /// when there is nothing to say.
  std::string reason = "healthy";
  bool available = true;              ///< routed: the HealthView's verdict, after panic
  std::uint32_t effective_weight = 0; ///< the HealthView's weight; 0 when not routed
  unsigned passive_failures = 0;      ///< counted since the last success that cleared them
  unsigned consecutive_5xx = 0;
  unsigned consecutive_gateway_failures = 0;
  unsigned times_ejected = 0; ///< the ejection multiplier, after decay
  bool ejected = false;
  unsigned active_failures = 0;  ///< consecutive failed probes
  unsigned active_successes = 0; ///< consecutive successful probes
  /// While active checks hold the peer unhealthy, why ("3 consecutive failures
  /// (connection refused)"); empty otherwise.
  std::string active_down;
};

/// The meta key a leader process sets (with PeerHealthStatus::active_down) on the peers
/// its active checks failed, in the sets it shares with followers, whose peers carry
/// Health::critical: followers then show the leader's reason.
inline constexpr const char* shared_active_key = "dynup.active_down";

/// What HealthTracker::view decided, parallel to the set it was given.
struct HealthReport {
  HealthView view;                     ///< for Policy::build
  std::vector<PeerHealthStatus> peers; ///< same order as the set
  bool panic = false;
  /// Available share of the weight the panic threshold looks at, 0..100.
  double healthy_percent = 100;
  /// Why panic is active, e.g. "panic: 33% of primary weight available, below 50%;
  /// routing to every primary peer"; empty when it is not.
  std::string panic_reason;
  /// The earliest time a time-based transition happens (an ejection or down period
  /// ending, the next slow-start step worth a rebuild): call view() again then. Reports
  /// that return true also warrant a call. Empty when nothing is scheduled.
  std::optional<Clock::time_point> next_change;
};

namespace detail {

/// "250 ms", "9.2 s", "30 s".
inline std::string health_duration(Clock::duration d) {
  auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(d).count();
  if (ms < 0) ms = 0;
  if (ms < 1000) return std::to_string(ms) + " ms";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f", static_cast<double>(ms) / 1000.0);
  std::string s = buf;
  if (s.size() > 2 && s.compare(s.size() - 2, 2, ".0") == 0) s.resize(s.size() - 2);
  return s + " s";
}

inline std::string plural(unsigned n, const char* one, const char* many) {
  return std::to_string(n) + " " + (n == 1 ? one : many);
}

} // namespace detail

/// The health state machines of one upstream.
///
/// Threads: attach() and view() belong to one rebuild thread (never concurrent with each
/// other). report() and report_active() may be called from any number of threads at
/// once, concurrently with attach() and view(). report()'s success path, when no failure
/// is being counted, is one relaxed atomic load: no lock, no allocation, no clock read.
/// Its failure paths lock the peer's mutex and read the clock; an ejection that is due
/// also takes the tracker's ejection lock. They never allocate.
///
/// State is keyed by peer id: a peer that stays across attach() keeps its counters,
/// ejections and ramp; an id that leaves is forgotten, and comes back fresh.
class HealthTracker {
public:
  using time_point = Clock::time_point;
  using Peers = std::vector<std::shared_ptr<PeerHealth>>;

  /// `clock` must outlive the tracker. Options are taken as they are: validate them with
  /// health_options_from_json first when they come from a user.
  explicit HealthTracker(HealthOptions options, const Clock& clock = steady_clock())
      : options_(std::move(options)), clock_(clock) {
    for (int s : options_.passive.fail_statuses)
      if (s >= 0 && s < static_cast<int>(fail_status_bits_.size() * 64))
        fail_status_bits_[static_cast<std::size_t>(s) / 64] |= std::uint64_t{1} << (s % 64);
  }

  HealthTracker(const HealthTracker&) = delete;
  HealthTracker& operator=(const HealthTracker&) = delete;

  const HealthOptions& options() const noexcept { return options_; }

  /// State for each peer of `set`, in set order: the existing state for ids seen before,
  /// fresh state for new ids (healthy; ramping from now when slow start is on, except
  /// in the first non-empty set attached: a starting proxy's peers are not new). Ids no
  /// longer present are forgotten; reports to their old state are ignored. Rebuild
  /// thread only. O(n), allocates.
  Peers attach(const PeerSet& set) {
    ++round_;
    const time_point now = clock_.now();
    const bool ramp = !first_ && options_.slow_start.window.count() > 0;
    Peers out;
    out.reserve(set.size());
    for (const Peer& p : set) {
      auto it = by_id_.find(p.id);
      if (it == by_id_.end()) {
        auto h = std::make_shared<PeerHealth>(PeerHealth::Private{}, p.id);
        if (ramp) h->ramp_start_ = now;
        it = by_id_.emplace(p.id, Entry{std::move(h), 0}).first;
      }
      it->second.seen = round_;
      out.push_back(it->second.health);
    }
    if (by_id_.size() != set.size()) {
      for (auto it = by_id_.begin(); it != by_id_.end();) {
        if (it->second.seen == round_) {
          ++it;
          continue;
        }
        detach(*it->second.health);
        it = by_id_.erase(it);
      }
    }
    {
      // Before the new size is visible: a report that sees it finds the room reserved,
      // so ejecting never allocates.
      std::lock_guard<std::mutex> lock(eject_mu_);
      ejection_ends_.reserve(ejection_limit(set.size()));
    }
    set_size_.store(set.size(), std::memory_order_release);
    single_.store(set.size() == 1, std::memory_order_relaxed);
    if (!set.empty()) first_ = false;
    return out;
  }

  /// Ids currently tracked.
  std::size_t size() const noexcept { return by_id_.size(); }
  /// Outlier ejections since construction. Any thread; one relaxed load.
  std::uint64_t ejections_total() const noexcept { return ejections_total_.load(std::memory_order_relaxed); }
  /// Peers ejected now. Any thread; takes the ejection lock.
  std::size_t ejected() const {
    const time_point now = clock_.now();
    std::lock_guard<std::mutex> lock(eject_mu_);
    return static_cast<std::size_t>(
        std::count_if(ejection_ends_.begin(), ejection_ends_.end(), [&](time_point end) { return end > now; }));
  }

  /// A passive report: how one request to the peer ended. `status` is the HTTP status,
  /// 0 when no response came (timeout, reset). Returns true when the peer's routing
  /// state changed (it went down, came back, or was ejected): wake the rebuild thread.
  /// Any thread.
  ///
  /// max_fails counts as nginx does: each failure counts and marks the peer checked; a
  /// peer with max_fails failures is skipped while fail_timeout has not passed since
  /// then; after it, the next pick lets one request through (on_pick marks it checked)
  /// and only a success after that clears the count. A set of one peer never goes down.
  bool report(PeerHealth& h, int status, bool connect_failure,
              TryVerdict verdict = TryVerdict::by_status) noexcept {
    const Verdict v = classify(status, connect_failure, verdict);
    if (!v.passive_fail && !v.is_5xx && h.stats_.health_pending.load(std::memory_order_relaxed) == 0)
      return false;
    return report_slow(h, v.passive_fail, v.is_5xx, v.gateway);
  }

  /// Whether passive health counts this outcome as a failure (max_fails on, and no
  /// reply, a connect failure or a fail status). Any thread; no lock.
  bool passive_failure(int status, bool connect_failure, TryVerdict verdict = TryVerdict::by_status) const noexcept {
    return classify(status, connect_failure, verdict).passive_fail;
  }

  /// True when report() of this outcome would do nothing: a success for a peer with no
  /// failure counter to reset. `stats` must be the peer's own (stats_of), which lets a
  /// caller that already holds it skip finding the PeerHealth. Any thread.
  bool quiet(const PeerStats& stats, int status, bool connect_failure,
             TryVerdict verdict = TryVerdict::by_status) const noexcept {
    const Verdict v = classify(status, connect_failure, verdict);
    return !v.passive_fail && !v.is_5xx && stats.health_pending.load(std::memory_order_relaxed) == 0;
  }

  /// The PeerStats inside the state of `id` (attached in the last attach()), sharing its
  /// lifetime; null for an id not tracked. Give it to a Policy (Policy::share_stats) so a
  /// pick and its report touch one line per peer. Rebuild thread only.
  std::shared_ptr<PeerStats> stats_of(const std::string& id) const {
    auto it = by_id_.find(id);
    if (it == by_id_.end()) return nullptr;
    return std::shared_ptr<PeerStats>(it->second.health, &it->second.health->stats_);
  }
  /// The PeerStats inside `h`.
  static const PeerStats& stats_of(const PeerHealth& h) noexcept { return h.stats_; }

  /// A pick chose the peer whose stats (stats_of) are `st`: like nginx, a pick made
  /// fail_timeout or more after the peer was last checked checks it again, so that the
  /// request's success clears the failures and its failure takes the peer down for
  /// another fail_timeout. One relaxed load when the peer has no failure counted.
  /// noexcept, no lock, no allocation; any thread.
  void on_pick(PeerStats& st) const noexcept {
    if (st.fails.load(std::memory_order_relaxed) == 0) return;
    const std::int64_t now = ns(clock_.now());
    if (now - st.checked_ns.load(std::memory_order_relaxed) >= fail_timeout_ns())
      st.checked_ns.store(now, std::memory_order_relaxed);
  }

  /// Same, from anything with `status`, `connect_failure` and `verdict` members
  /// (dynup::Outcome).
  template <class O>
  auto report(PeerHealth& h, const O& outcome) noexcept
      -> decltype(static_cast<int>(outcome.status), static_cast<bool>(outcome.connect_failure),
                  static_cast<TryVerdict>(outcome.verdict), bool()) {
    return report(h, static_cast<int>(outcome.status), static_cast<bool>(outcome.connect_failure), outcome.verdict);
  }

  /// An active probe's result; `reason` says why a probe failed ("connection refused",
  /// "status 503", "timeout") and is shown while the failures last. Applies
  /// unhealthy_threshold / healthy_threshold; returns true when the peer turned unhealthy
  /// or healthy again. Any thread (the prober's). Locks the peer; allocates to keep the
  /// reason of a failure.
  bool report_active(PeerHealth& h, bool ok, std::string_view reason) {
    std::lock_guard<std::mutex> lock(h.mu_);
    if (h.detached_) return false;
    if (ok) {
      h.active_fail_ = 0;
      if (h.active_ok_ < UINT_MAX) ++h.active_ok_;
      if (!h.active_healthy_ && h.active_ok_ >= options_.active.healthy_threshold) {
        h.active_healthy_ = true;
        return true;
      }
      return false;
    }
    h.active_ok_ = 0;
    if (h.active_fail_ < UINT_MAX) ++h.active_fail_;
    h.active_reason_.assign(reason.data(), reason.size());
    if (h.active_healthy_ && h.active_fail_ >= options_.active.unhealthy_threshold) {
      h.active_healthy_ = false;
      h.became_unavailable_ = true;
      return true;
    }
    return false;
  }

  /// Merges registry health, active and passive state into one condition per peer of
  /// `set` (`health` from attach(set), parallel to it), applies slow start and the panic
  /// threshold, and explains each decision. Ends ejections whose time is up. Rebuild
  /// thread only. O(n), allocates (the reasons).
  HealthReport view(const PeerSet& set, const Peers& health) {
    const time_point now = clock_.now();
    HealthReport rep;
    const std::size_t n = set.size();
    rep.view.peers.resize(n);
    rep.peers.resize(n);
    auto soonest = [&](time_point t) {
      if (!rep.next_change || t < *rep.next_change) rep.next_change = t;
    };
    for (std::size_t i = 0; i < n; ++i) {
      const Peer& p = set[i];
      PeerHealthStatus& st = rep.peers[i];
      PeerCondition& cond = rep.view.peers[i];
      std::string reason;
      PeerState state = PeerState::healthy;
      auto add = [&](PeerState s, const std::string& text) {
        if (s > state) state = s;
        if (!reason.empty()) reason += "; ";
        reason += text;
      };
      if (p.health == Health::critical) {
        // A set shared by a leader process marks the peers its active checks failed.
        auto marked = p.meta.find(shared_active_key);
        add(PeerState::unhealthy, marked != p.meta.end() ? "active (leader process): " + marked->second
                                                         : std::string("registry: critical"));
      }
      else if (p.health != Health::passing)
        add(PeerState::warning, std::string("registry: ") + to_string(p.health));

      std::uint32_t weight = p.weight;
      PeerHealth* h = i < health.size() ? health[i].get() : nullptr;
      if (h != nullptr) {
        std::lock_guard<std::mutex> lock(h->mu_);
        expire_ejection(*h, now);
        describe_active(*h, st, add);
        const bool down_otherwise = state == PeerState::unhealthy || h->ejected_;
        describe_passive(*h, now, st, add, soonest);
        describe_outlier(*h, now, st, add, soonest);
        const bool available = state != PeerState::unhealthy;
        cond.gated = !available && !down_otherwise && passive_down(*h, ns(now));
        const bool recovered = available && (h->last_unavailable_ || h->became_unavailable_);
        h->became_unavailable_ = false;
        h->last_unavailable_ = !available;
        weight = slow_start(*h, p.weight, available, recovered, now, add, soonest);
      }
      st.state = state;
      st.reason = reason.empty() ? "healthy" : std::move(reason);
      cond.available = state != PeerState::unhealthy;
      cond.weight = std::max<std::uint32_t>(1, weight);
    }
    apply_panic(set, rep);
    if (options_.passive.max_fails > 0 && !rep.panic && !single_.load(std::memory_order_relaxed))
      rep.view.gate = {options_.passive.max_fails, fail_timeout_ns(), &clock_};
    for (std::size_t i = 0; i < n; ++i) {
      rep.peers[i].available = rep.view.peers[i].available;
      rep.peers[i].effective_weight = rep.view.peers[i].available ? rep.view.peers[i].weight : 0;
    }
    return rep;
  }

private:
  using Cause = PeerHealth::Cause;

  struct Entry {
    std::shared_ptr<PeerHealth> health;
    std::uint64_t seen;
  };

  struct Verdict {
    bool passive_fail; ///< counts toward max_fails
    bool is_5xx;       ///< counts toward consecutive_5xx
    bool gateway;      ///< counts toward consecutive_gateway_failure
  };
  Verdict classify(int status, bool connect_failure, TryVerdict verdict) const noexcept {
    const bool no_reply = connect_failure || status == 0;
    const bool failed = verdict == TryVerdict::by_status ? no_reply || is_fail_status(status)
                                                         : verdict == TryVerdict::failure;
    return {options_.passive.max_fails > 0 && failed,
            options_.outlier.enabled && (no_reply || (status >= 500 && status <= 599)),
            no_reply || status == 502 || status == 503 || status == 504};
  }

  bool is_fail_status(int status) const noexcept {
    if (status < 0 || status >= static_cast<int>(fail_status_bits_.size() * 64)) return false;
    return (fail_status_bits_[static_cast<std::size_t>(status) / 64] >> (status % 64)) & 1u;
  }

  static std::int64_t ns(time_point t) noexcept {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(t.time_since_epoch()).count();
  }
  std::int64_t fail_timeout_ns() const noexcept {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(options_.passive.fail_timeout).count();
  }
  // nginx's test for a peer taken out by max_fails. Under h.mu_, or racy but harmless.
  bool passive_down(const PeerHealth& h, std::int64_t now) const noexcept {
    const PassiveOptions& o = options_.passive;
    return o.max_fails > 0 && !single_.load(std::memory_order_relaxed) &&
           h.stats_.fails.load(std::memory_order_relaxed) >= o.max_fails &&
           now - h.stats_.checked_ns.load(std::memory_order_relaxed) < fail_timeout_ns();
  }

  static void update_pending(PeerHealth& h) noexcept {
    std::uint32_t bits = (h.stats_.fails.load(std::memory_order_relaxed) ? 1u : 0u) |
                         ((h.c5xx_ || h.cgw_ || h.refused_) ? 2u : 0u);
    h.stats_.health_pending.store(bits, std::memory_order_relaxed);
  }

  // The locked part of report(): a failure, or a success that resets counters.
  bool report_slow(PeerHealth& h, bool passive_fail, bool is_5xx, bool gateway) noexcept {
    const time_point now = clock_.now();
    std::lock_guard<std::mutex> lock(h.mu_);
    if (h.detached_) return false;
    bool changed = false;
    const std::int64_t now_ns = ns(now);
    PeerStats& st = h.stats_;
    const unsigned fails = st.fails.load(std::memory_order_relaxed);
    if (passive_fail && !single_.load(std::memory_order_relaxed)) {
      st.fails.store(fails < UINT_MAX ? fails + 1 : fails, std::memory_order_relaxed);
      h.accessed_ns_ = now_ns;
      st.checked_ns.store(now_ns, std::memory_order_relaxed);
      // A change when the last view routed to it and no report since took it out (a
      // pick after fail_timeout made passive_down true already, to hold other picks
      // off while this one tried).
      if (!h.last_unavailable_ && !h.became_unavailable_ && passive_down(h, now_ns)) {
        h.became_unavailable_ = true;
        changed = true;
      }
    } else if (!passive_fail && fails > 0 && h.accessed_ns_ < st.checked_ns.load(std::memory_order_relaxed)) {
      st.fails.store(0, std::memory_order_relaxed);
      changed = fails >= options_.passive.max_fails; // it was held out, or would be
    }
    if (options_.outlier.enabled) {
      expire_ejection(h, now);
      if (!is_5xx) {
        h.c5xx_ = h.cgw_ = 0;
        h.refused_ = false;
      } else if (!h.ejected_) { // failures of requests already in flight do not count twice
        if (h.c5xx_ < UINT_MAX) ++h.c5xx_;
        if (!gateway)
          h.cgw_ = 0;
        else if (h.cgw_ < UINT_MAX)
          ++h.cgw_;
        changed = consider_ejection(h, now) || changed;
      }
    }
    update_pending(h);
    return changed;
  }

  // Ejects `h` if a consecutive-failure threshold is reached and max_ejection_percent
  // allows; records a refusal otherwise. Under h.mu_.
  bool consider_ejection(PeerHealth& h, time_point now) noexcept {
    const OutlierOptions& o = options_.outlier;
    Cause cause = Cause::none;
    unsigned run = 0;
    if (o.consecutive_gateway_failure > 0 && h.cgw_ >= o.consecutive_gateway_failure) {
      cause = Cause::gateway;
      run = h.cgw_;
    } else if (o.consecutive_5xx > 0 && h.c5xx_ >= o.consecutive_5xx) {
      cause = Cause::consecutive_5xx;
      run = h.c5xx_;
    }
    if (cause == Cause::none) return false;
    // Envoy's backoff decay: each base_ejection_time spent un-ejected takes one off the
    // multiplier, so an old bad spell does not lengthen today's ejection.
    unsigned times = h.times_ejected_;
    if (times > 0 && now > h.last_ejection_end_) {
      auto quiet = static_cast<std::uint64_t>((now - h.last_ejection_end_) / o.base_ejection_time);
      times = quiet >= times ? 0 : times - static_cast<unsigned>(quiet);
    }
    if (times < UINT_MAX) ++times;
    const auto base = std::chrono::duration_cast<Clock::duration>(o.base_ejection_time);
    const auto cap = std::chrono::duration_cast<Clock::duration>(o.max_ejection_time);
    const std::uint64_t steps_to_cap = base.count() > 0 ? static_cast<std::uint64_t>(cap / base) + 1 : 1;
    const Clock::duration length = times >= steps_to_cap ? cap : std::min(cap, base * times);
    {
      // Ejections are counted by their end times, so one that ended makes room at once,
      // whether or not anyone has looked at that peer since.
      const std::size_t limit = ejection_limit(set_size_.load(std::memory_order_acquire));
      std::lock_guard<std::mutex> lock(eject_mu_);
      ejection_ends_.erase(std::remove_if(ejection_ends_.begin(), ejection_ends_.end(),
                                          [&](time_point end) { return end <= now; }),
                           ejection_ends_.end());
      if (ejection_ends_.size() >= limit) {
        h.refused_ = true;
        h.refused_cause_ = cause;
        h.refused_run_ = run;
        h.refused_limit_ = limit;
        return false;
      }
      ejection_ends_.push_back(now + length);
    }
    h.times_ejected_ = times;
    h.ejection_length_ = length;
    h.ejected_ = true;
    ejections_total_.fetch_add(1, std::memory_order_relaxed);
    h.ejected_until_ = now + h.ejection_length_;
    h.eject_cause_ = cause;
    h.eject_run_ = run;
    h.c5xx_ = h.cgw_ = 0;
    h.refused_ = false;
    h.became_unavailable_ = true;
    return true;
  }

  // At most max(1, floor(n × max_ejection_percent / 100)) peers ejected at once.
  std::size_t ejection_limit(std::size_t n) const noexcept {
    const double share = std::floor(static_cast<double>(n) * options_.outlier.max_ejection_percent / 100.0 + 1e-9);
    return std::max<std::size_t>(1, static_cast<std::size_t>(share));
  }

  // Ends an ejection whose time is up (its slot in ejection_ends_ is already free by
  // time). Under h.mu_.
  static void expire_ejection(PeerHealth& h, time_point now) noexcept {
    if (!h.ejected_ || now < h.ejected_until_) return;
    h.ejected_ = false;
    h.last_ejection_end_ = h.ejected_until_;
  }

  // The id left the set: free its ejection slot and ignore later reports. Lock order:
  // the peer's mutex, then eject_mu_ (as in consider_ejection).
  void detach(PeerHealth& h) {
    std::lock_guard<std::mutex> lock(h.mu_);
    h.detached_ = true;
    if (!h.ejected_) return;
    h.ejected_ = false;
    std::lock_guard<std::mutex> ejections(eject_mu_);
    auto it = std::find(ejection_ends_.begin(), ejection_ends_.end(), h.ejected_until_);
    if (it != ejection_ends_.end()) ejection_ends_.erase(it);
  }

  template <class Add> void describe_active(const PeerHealth& h, PeerHealthStatus& st, Add& add) const {
    st.active_failures = h.active_fail_;
    st.active_successes = h.active_ok_;
    const std::string& why = h.active_reason_;
    const std::string failures = detail::plural(h.active_fail_, "consecutive failure", "consecutive failures");
    if (!h.active_healthy_ && h.active_ok_ == 0) {
      st.active_down = failures + (why.empty() ? "" : " (" + why + ")");
      add(PeerState::unhealthy, "active: " + st.active_down);
    } else if (!h.active_healthy_) {
      st.active_down = "recovering, " + std::to_string(h.active_ok_) + " of " +
                       std::to_string(options_.active.healthy_threshold) + " consecutive successes" +
                       (why.empty() ? "" : " (last failure: " + why + ")");
      add(PeerState::unhealthy, "active: " + st.active_down);
    }
    else if (h.active_fail_ > 0)
      add(PeerState::warning, "active: " + failures + (why.empty() ? "" : " (" + why + ")") + ", unhealthy at " +
                                  std::to_string(options_.active.unhealthy_threshold));
  }

  template <class Add, class Soonest>
  void describe_passive(const PeerHealth& h, time_point now, PeerHealthStatus& st, Add& add, Soonest& soonest) const {
    const PassiveOptions& o = options_.passive;
    const unsigned fails = h.stats_.fails.load(std::memory_order_relaxed);
    st.passive_failures = fails;
    if (fails == 0 || o.max_fails == 0) return;
    const std::string count = "passive: " + detail::plural(fails, "failure", "failures") + " (max_fails " +
                              std::to_string(o.max_fails) + ", fail_timeout " +
                              detail::health_duration(o.fail_timeout) + ")";
    const time_point until = time_point(std::chrono::duration_cast<Clock::duration>(
                                 std::chrono::nanoseconds(h.stats_.checked_ns.load(std::memory_order_relaxed)))) +
                             std::chrono::duration_cast<Clock::duration>(o.fail_timeout);
    if (passive_down(h, ns(now))) {
      add(PeerState::unhealthy, count + "; down for " + detail::health_duration(until - now) + " more");
      soonest(until);
    } else if (single_.load(std::memory_order_relaxed)) {
      add(PeerState::warning, count + "; the only peer is never taken down");
    } else if (fails >= o.max_fails) {
      add(PeerState::warning, count + "; fail_timeout has passed: the next request tries it");
    } else {
      add(PeerState::warning, count + "; a success after fail_timeout clears them");
    }
  }

  static std::string cause_text(Cause c, unsigned run) {
    return c == Cause::gateway ? detail::plural(run, "consecutive gateway failure", "consecutive gateway failures")
                               : std::to_string(run) + " consecutive 5xx";
  }

  template <class Add, class Soonest>
  void describe_outlier(const PeerHealth& h, time_point now, PeerHealthStatus& st, Add& add, Soonest& soonest) const {
    st.consecutive_5xx = h.c5xx_;
    st.consecutive_gateway_failures = h.cgw_;
    st.times_ejected = h.times_ejected_;
    st.ejected = h.ejected_;
    if (h.ejected_) {
      add(PeerState::unhealthy, "outlier: ejected for " + detail::health_duration(h.ejection_length_) + " after " +
                                    cause_text(h.eject_cause_, h.eject_run_) + " (ejection " +
                                    std::to_string(h.times_ejected_) + "); " +
                                    detail::health_duration(h.ejected_until_ - now) + " more");
      soonest(h.ejected_until_);
    } else if (h.refused_) {
      add(PeerState::warning, "outlier: " + cause_text(h.refused_cause_, h.refused_run_) +
                                  ", not ejected: max_ejection_percent reached (" +
                                  std::to_string(h.refused_limit_) + " of " +
                                  std::to_string(set_size_.load(std::memory_order_relaxed)) + " peers ejected)");
    } else if (h.c5xx_ > 0) {
      std::string text = "outlier: " + std::to_string(h.c5xx_) + " consecutive 5xx";
      if (h.cgw_ > 0) text += " (" + std::to_string(h.cgw_) + " gateway)";
      add(PeerState::warning, text);
    }
  }

  // The slow-start weight (Envoy: weight × max(min_weight_percent, time_factor^(1 /
  // aggression))). The ramp restarts when the peer recovers and ends after the window.
  template <class Add, class Soonest>
  std::uint32_t slow_start(PeerHealth& h, std::uint32_t weight, bool available, bool recovered, time_point now,
                           Add& add, Soonest& soonest) const {
    const SlowStartOptions& o = options_.slow_start;
    if (o.window.count() <= 0) return weight;
    if (!available) {
      h.ramp_start_.reset();
      return weight;
    }
    if (recovered) h.ramp_start_ = now;
    if (!h.ramp_start_) return weight;
    const Clock::duration window = o.window;
    const Clock::duration elapsed = now - *h.ramp_start_;
    if (elapsed >= window) {
      h.ramp_start_.reset();
      return weight;
    }
    const double floor_share = o.min_weight_percent / 100.0;
    const double time_factor =
        std::max(std::chrono::duration<double>(elapsed).count(), 0.001) / std::chrono::duration<double>(window).count();
    const double factor = std::min(1.0, std::max(floor_share, std::pow(time_factor, 1.0 / o.aggression)));
    const auto effective = static_cast<std::uint32_t>(
        std::clamp(std::llround(weight * factor), 1LL, static_cast<long long>(weight)));
    add(PeerState::warning, "slow start: " + std::to_string(std::llround(factor * 100)) + "% of weight");
    // Wake every 5% of the window (at least 1 s apart), not before the ramp leaves its floor.
    const Clock::duration step = std::max<Clock::duration>(window / 20, std::chrono::seconds(1));
    Clock::duration next = step * (elapsed / step + 1);
    const auto floor_end = std::chrono::duration_cast<Clock::duration>(
        std::chrono::duration<double>(std::chrono::duration<double>(window).count() * std::pow(floor_share, o.aggression)));
    if (next < floor_end) next = floor_end;
    soonest(*h.ramp_start_ + std::min(next, window));
    return effective;
  }

  // Panic is judged on the tier that takes traffic: primaries while any is available,
  // backups (nginx `backup`) once none is; the share is of configured weight.
  void apply_panic(const PeerSet& set, HealthReport& rep) const {
    const PanicOptions& o = options_.panic;
    std::uint64_t total[2] = {0, 0}, up[2] = {0, 0};
    for (std::size_t i = 0; i < set.size(); ++i) {
      int t = set[i].backup ? 1 : 0;
      total[t] += set[i].weight;
      if (rep.view.peers[i].available) up[t] += set[i].weight;
    }
    if (set.empty()) return;
    const int tier = total[0] == 0 || (up[0] == 0 && up[1] > 0) ? 1 : 0;
    rep.healthy_percent = 100.0 * static_cast<double>(up[tier]) / static_cast<double>(total[tier]);
    if (o.threshold_percent <= 0 || rep.healthy_percent >= o.threshold_percent) return;
    rep.panic = true;
    const char* tier_name = tier == 0 ? "primary" : "backup";
    rep.panic_reason = "panic: " + std::to_string(std::llround(std::floor(rep.healthy_percent))) + "% of " +
                       tier_name + " weight available, below " + detail::HealthJsonReader::fmt(o.threshold_percent) +
                       "%; ";
    if (o.mode == PanicOptions::Mode::fail) {
      rep.panic_reason += "routing to no peer";
      for (auto& c : rep.view.peers) c.available = false;
      return;
    }
    rep.panic_reason += std::string("routing to every ") + tier_name + " peer";
    for (std::size_t i = 0; i < set.size(); ++i) {
      if ((set[i].backup ? 1 : 0) != tier) continue;
      rep.view.peers[i] = {true, set[i].weight};
    }
  }

  const HealthOptions options_;
  const Clock& clock_;
  std::array<std::uint64_t, 10> fail_status_bits_{}; ///< statuses 0..639
  std::atomic<std::size_t> set_size_{0};
  std::atomic<bool> single_{false}; ///< the set has one peer: nginx never takes it down
  mutable std::mutex eject_mu_;
  std::atomic<std::uint64_t> ejections_total_{0};
  std::vector<time_point> ejection_ends_; ///< end of each ejection in force (or ended, not yet purged)
  std::unordered_map<std::string, Entry> by_id_;
  std::uint64_t round_ = 0;
  bool first_ = true;
};

DYNUP_NAMESPACE_END
