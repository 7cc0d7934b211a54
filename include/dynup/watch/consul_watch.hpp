// Watching Consul services on the process runtime, within a connection budget per agent.
//
// A Consul agent refuses more than limits.http_max_conns_per_client connections from one
// client address (200 by default; HTTP 429 beyond), and a blocking query holds its
// connection for up to `wait`. So each agent address gets a budget of connections per
// process (DYNUP_CONSUL_CONNECTIONS, 16 by default, ConsulAgents::configure):
//
// - direct: while there is room (half the budget, and 4 connections left for the rest),
//   a service runs its own blocking query, exactly as Consul's docs describe (DESIGN.md,
//   rules 1-14);
// - shared: past that, the service blocks on nothing itself. The agent's triggers,
//   blocking queries on cluster-wide indexes, return when anything of a kind changes:
//   /v1/catalog/services (registrations), /v1/health/state/any filtered to the shared
//   services' names (checks; the per-service check digest says which services changed)
//   and /v1/kv/<common folder>?keys (KV). A service a trigger names is re-read with a
//   plain GET, on the connections left over; equal content is not republished.
//
// Connections per agent: direct services + at most 3 triggers + the rest for plain reads,
// never above the budget (the HTTP client queues beyond it).
#pragma once

#include <dynup/result.hpp>
#include <dynup/runtime/http.hpp>
#include <dynup/runtime/runtime.hpp>
#include <dynup/source/consul.hpp>
#include <dynup/source/consul_cluster.hpp>
#include <dynup/version.hpp>
#include <dynup/watch/backoff.hpp>
#include <dynup/watch/core.hpp>
#include <dynup/watch/registry_watcher.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <utility>
#include <vector>

#ifndef DYNUP_CONSUL_CONNECTIONS
// Connections one process keeps to one Consul agent address, whatever the number of
// services it watches there. nginx with 8 workers stays at 128, under the agent's 200.
#define DYNUP_CONSUL_CONNECTIONS 16
#endif

DYNUP_NAMESPACE_BEGIN
namespace detail {

/// Slack on top of wait + wait/16 before a blocking read is declared dead.
inline constexpr std::chrono::milliseconds consul_read_margin{5000};
/// Deadline of a plain (non-blocking) read.
inline constexpr std::chrono::milliseconds consul_plain_timeout{10000};

/// The agent's view of one watched service.
class ConsulMember {
public:
  virtual ~ConsulMember() = default;
  virtual const ConsulSource& source() const noexcept = 0;
  /// A trigger says the service may have changed: read it again. `urgent`: the trigger
  /// named this service (its checks changed), so its read goes before the others.
  virtual void wake(bool urgent) = 0;
  /// The trigger this service relies on failed: changes may go unseen until it recovers.
  virtual void trigger_failed(const Error& e) = 0;
  /// A connection is free for the read this service asked for (ConsulAgent::want_read).
  virtual void read_granted() = 0;
};

/// One agent address: which services block on their own, and the triggers that watch
/// the rest. Loop thread only.
class ConsulAgent {
public:
  ConsulAgent(rt::Loop& loop, rt::HttpClient& http, rt::HttpEndpoint endpoint, unsigned budget)
      : loop_(loop), http_(http), endpoint_(std::move(endpoint)), budget_(std::max(budget, 4u)) {}

  ~ConsulAgent() {
    for (auto& [key, g] : groups_) {
      (void)key;
      for (auto* t : {&g->services, &g->checks, &g->kv}) halt(*t);
    }
  }
  ConsulAgent(const ConsulAgent&) = delete;
  ConsulAgent& operator=(const ConsulAgent&) = delete;

  /// Registers `m`; true when it gets a connection of its own (direct), false when the
  /// agent's triggers watch it (shared).
  bool join(ConsulMember* m) {
    if (direct_ < direct_limit()) {
      ++direct_;
      direct_members_.insert(m);
      return true;
    }
    Group& g = group(m->source());
    switch (m->source().mode()) {
    case ConsulSource::Mode::health:
      g.health.insert(m);
      reconfigure(g, g.checks);
      break;
    case ConsulSource::Mode::catalog: g.catalog.insert(m); break;
    case ConsulSource::Mode::kv:
      g.kv_members.insert(m);
      reconfigure(g, g.kv);
      break;
    }
    if (!g.model) g.model = m;
    ensure(g, g.services);
    ensure(g, g.checks);
    ensure(g, g.kv);
    return false;
  }

  void leave(ConsulMember* m) {
    if (direct_members_.erase(m) != 0) {
      --direct_;
      return;
    }
    for (auto& [key, g] : groups_) {
      (void)key;
      if (g->health.erase(m) + g->catalog.erase(m) + g->kv_members.erase(m) == 0) continue;
      if (g->model == m) g->model = any_member(*g);
      reconfigure(*g, g->checks);
      reconfigure(*g, g->kv);
      for (auto* t : {&g->services, &g->checks, &g->kv})
        if (!wanted(*g, *t)) halt(*t);
      return;
    }
  }

  /// Shared services read on the connections the direct services and the triggers
  /// leave over (at least one); a read past them waits its turn, in order.
  /// An urgent read (the trigger named the service) goes first.
  void want_read(ConsulMember* m, bool urgent) {
    if (urgent)
      read_queue_.push_front(m);
    else
      read_queue_.push_back(m);
    pump();
  }
  /// `m`, already waiting for a read, goes to the front.
  void hurry_read(ConsulMember* m) {
    auto it = std::find(read_queue_.begin(), read_queue_.end(), m);
    if (it == read_queue_.end() || it == read_queue_.begin()) return;
    read_queue_.erase(it);
    read_queue_.push_front(m);
  }
  /// The granted read ended (answered, failed or aborted).
  void read_done() {
    if (reads_ > 0) --reads_;
    pump();
  }
  /// `m` no longer waits for a read.
  void forget_read(ConsulMember* m) {
    read_queue_.erase(std::remove(read_queue_.begin(), read_queue_.end(), m), read_queue_.end());
  }

  unsigned budget() const noexcept { return budget_; }
  unsigned direct() const noexcept { return direct_; }
  /// Services watched through triggers.
  std::size_t shared() const noexcept {
    std::size_t n = 0;
    for (const auto& [key, g] : groups_) {
      (void)key;
      n += g->health.size() + g->catalog.size() + g->kv_members.size();
    }
    return n;
  }
  /// Half the budget at most: the shared services' reads need connections too.
  unsigned direct_limit() const noexcept { return std::min(budget_ - reserve, budget_ / 2); }

  /// Connections the triggers need at most: one per kind.
  static constexpr unsigned reserve = 4;

private:
  struct Trigger {
    explicit Trigger(consul_cluster::Trigger k) : kind(k) {}
    consul_cluster::Trigger kind;
    std::string arg;              // the filter (checks) or the folder (kv) in use
    bool running = false;
    bool answered = false;        // an answer since it (re)started: the next one compares
    bool failing = false;
    std::uint64_t index = 0;
    bool index_from_server = false;
    rt::CallId call = 0;
    rt::TimerId timer = 0;
    Backoff backoff{std::chrono::milliseconds(100), std::chrono::milliseconds(30000)};
    TokenBucket bucket{std::chrono::milliseconds(50), 2};
    std::map<std::string, std::uint64_t> digests;
  };

  struct Group {
    std::set<ConsulMember*> health, catalog, kv_members;
    ConsulMember* model = nullptr; // whose dc, consistency and token the triggers use
    Trigger services{consul_cluster::Trigger::services};
    Trigger checks{consul_cluster::Trigger::checks};
    Trigger kv{consul_cluster::Trigger::kv};
  };

  unsigned read_slots() const {
    unsigned triggers = 0;
    for (const auto& [key, g] : groups_) {
      (void)key;
      triggers += unsigned(g->services.running) + unsigned(g->checks.running) + unsigned(g->kv.running);
    }
    unsigned used = direct_ + triggers;
    return used + 1 > budget_ ? 1u : budget_ - used;
  }

  void pump() {
    while (reads_ < read_slots() && !read_queue_.empty()) {
      ConsulMember* m = read_queue_.front();
      read_queue_.pop_front();
      ++reads_;
      m->read_granted();
    }
  }

  static ConsulMember* any_member(const Group& g) {
    for (const auto* set : {&g.health, &g.catalog, &g.kv_members})
      if (!set->empty()) return *set->begin();
    return nullptr;
  }

  // Services share triggers when they ask with the same dc, consistency and token.
  Group& group(const ConsulSource& s) {
    auto& slot = groups_[s.scope_params() + '\n' + s.token()];
    if (!slot) slot = std::make_unique<Group>();
    return *slot;
  }

  static bool wanted(const Group& g, const Trigger& t) {
    switch (t.kind) {
    case consul_cluster::Trigger::services: return !g.health.empty() || !g.catalog.empty();
    case consul_cluster::Trigger::checks: return !g.health.empty();
    case consul_cluster::Trigger::kv: return !g.kv_members.empty();
    }
    return false;
  }

  std::string wanted_arg(const Group& g, const Trigger& t) const {
    if (t.kind == consul_cluster::Trigger::checks) {
      std::set<std::string> names;
      for (auto* m : g.health) names.insert(m->source().name());
      return consul_cluster::checks_filter(std::vector<std::string>(names.begin(), names.end()));
    }
    if (t.kind == consul_cluster::Trigger::kv) {
      // The longest common folder of every KV service's folder.
      std::string common;
      bool first = true;
      for (auto* m : g.kv_members) {
        std::string f = m->source().folder();
        if (first) {
          common = f;
          first = false;
          continue;
        }
        std::size_t n = 0;
        while (n < common.size() && n < f.size() && common[n] == f[n]) ++n;
        common.resize(n);
      }
      auto slash = common.rfind('/');
      common.resize(slash == std::string::npos ? 0 : slash + 1);
      return common;
    }
    return {};
  }

  void ensure(Group& g, Trigger& t) {
    if (t.running || !wanted(g, t)) return;
    t.running = true;
    t.answered = false;
    t.arg = wanted_arg(g, t);
    issue(g, t);
  }

  // The members changed what the trigger asks for. A KV folder that widened must be
  // asked again (changes outside the old folder would not end the held query): soon,
  // coalesced, so a thousand services joining restart it once. A new checks filter is
  // used from the held query's answer on (see answered()): the checks index is
  // cluster-wide, so that query returns on any change, the new services' included.
  void reconfigure(Group& g, Trigger& t) {
    if (!t.running || t.kind != consul_cluster::Trigger::kv || t.timer != 0) return;
    t.timer = loop_.after(std::chrono::milliseconds(20), [this, &g, &t] {
      t.timer = 0;
      std::string arg = wanted_arg(g, t);
      if (arg == t.arg || !t.running) return;
      t.arg = std::move(arg);
      t.index = 0; // the new folder's index is its own: read it plainly
      t.index_from_server = false;
      t.answered = false;
      if (t.call != 0) {
        http_.cancel(t.call);
        t.call = 0;
        issue(g, t);
      }
    });
  }

  void halt(Trigger& t) {
    if (t.call != 0) http_.cancel(t.call);
    loop_.cancel(t.timer);
    t.call = 0;
    t.timer = 0;
    t.running = false;
    t.index = 0;
    t.index_from_server = false;
    t.digests.clear();
  }

  void issue(Group& g, Trigger& t) {
    if (!g.model) return;
    const std::chrono::milliseconds wait = std::chrono::minutes(5);
    HttpRequest req = consul_cluster::trigger_request(t.kind, g.model->source(), t.arg, t.index, wait);
    req.read_timeout = t.index == 0 ? consul_plain_timeout : wait + wait / 16 + consul_read_margin;
    t.call = http_.send(endpoint_, req, [this, &g, &t](Result<HttpResponse> res) {
      t.call = 0;
      answered(g, t, std::move(res));
    });
  }

  void next(Group& g, Trigger& t, std::chrono::milliseconds delay) {
    auto pause = std::max(delay, t.bucket.take());
    auto go = [this, &g, &t] {
      t.timer = 0;
      if (t.running) issue(g, t);
    };
    if (pause.count() <= 0)
      go();
    else
      t.timer = loop_.after(pause, go);
  }

  void members_of(Group& g, const Trigger& t, std::vector<ConsulMember*>& out) {
    auto add = [&](const std::set<ConsulMember*>& s) { out.insert(out.end(), s.begin(), s.end()); };
    if (t.kind == consul_cluster::Trigger::services) {
      add(g.health);
      add(g.catalog);
    } else if (t.kind == consul_cluster::Trigger::checks) {
      add(g.health);
    } else {
      add(g.kv_members);
    }
  }

  void answered(Group& g, Trigger& t, Result<HttpResponse> res) {
    Result<consul_cluster::TriggerAnswer> a =
        res ? consul_cluster::decode_trigger(t.kind, *res, g.model ? g.model->source().token() : std::string())
            : Result<consul_cluster::TriggerAnswer>(res.error());
    std::vector<ConsulMember*> members;
    members_of(g, t, members);
    if (!a) {
      t.failing = true;
      Error e = a.error().with_context("consul://" + endpoint_.host + ":" + std::to_string(endpoint_.port) +
                                       " (shared watch of " + std::to_string(members.size()) + " services)");
      for (auto* m : members) m->trigger_failed(e);
      next(g, t, t.backoff.next());
      return;
    }
    t.backoff.reset();
    const std::uint64_t got = a->index;
    const bool unchanged = t.index_from_server && got == t.index && !t.failing;
    const bool everyone = !t.answered || t.failing || got < t.index;
    t.failing = false;
    t.answered = true;
    if (!unchanged) {
      if (everyone || t.kind != consul_cluster::Trigger::checks) {
        for (auto* m : members) m->wake(false);
      } else {
        // Only services whose checks changed, or all when a node check changed.
        std::set<std::string> changed;
        bool node_changed = false;
        auto differs = [&](const std::string& name, std::uint64_t d) {
          auto it = t.digests.find(name);
          return it == t.digests.end() || it->second != d;
        };
        auto mark = [&](const std::string& name) {
          if (name.empty())
            node_changed = true;
          else
            changed.insert(name);
        };
        for (const auto& [name, d] : a->digests)
          if (differs(name, d)) mark(name);
        for (const auto& [name, d] : t.digests)
          if (a->digests.count(name) == 0) mark(name);
        for (auto* m : members)
          if (changed.count(m->source().name()) != 0)
            m->wake(true);
          else if (node_changed)
            m->wake(false);
      }
    }
    if (t.kind == consul_cluster::Trigger::checks) {
      t.digests = std::move(a->digests);
      std::string arg = wanted_arg(g, t);
      if (arg != t.arg) {
        // Services joined or left while the query was held: ask again with their names
        // from the same index, so a change the held answer reported for a service not
        // yet in its filter is seen (its digest is new, so it is woken).
        t.arg = std::move(arg);
        next(g, t, std::chrono::milliseconds(0));
        return;
      }
    }
    t.index_from_server = got != 0 && got >= t.index;
    if (got == 0)
      t.index = 1;
    else if (got < t.index)
      t.index = 0;
    else
      t.index = got;
    next(g, t, std::chrono::milliseconds(0));
  }

  rt::Loop& loop_;
  rt::HttpClient& http_;
  const rt::HttpEndpoint endpoint_;
  const unsigned budget_;
  unsigned direct_ = 0;
  std::set<ConsulMember*> direct_members_;
  std::map<std::string, std::unique_ptr<Group>> groups_;
  std::deque<ConsulMember*> read_queue_;
  unsigned reads_ = 0; ///< granted reads in flight
};

} // namespace detail

/// Every Consul agent a process watches, with its connection budget: a runtime service.
/// Loop thread only, but configure() and stats(), which are thread-safe.
class ConsulAgents {
public:
  explicit ConsulAgents(rt::Runtime& runtime) : runtime_(runtime), http_(runtime.service<rt::HttpClient>()) {}

  /// Connections per agent address for agents first used after this call (at least 4).
  void configure(unsigned budget) {
    std::lock_guard<std::mutex> lock(mu_);
    budget_ = std::max(budget, 4u);
  }
  unsigned budget() const {
    std::lock_guard<std::mutex> lock(mu_);
    return budget_;
  }

  /// The agent at `endpoint`, made on first use. Loop thread.
  detail::ConsulAgent& at(const rt::HttpEndpoint& endpoint) {
    auto& slot = agents_[endpoint.key()];
    if (!slot) slot = std::make_unique<detail::ConsulAgent>(runtime_.loop(), http_, endpoint, budget());
    return *slot;
  }

private:
  rt::Runtime& runtime_;
  rt::HttpClient& http_;
  mutable std::mutex mu_;
  unsigned budget_ = DYNUP_CONSUL_CONNECTIONS;
  std::map<std::string, std::unique_ptr<detail::ConsulAgent>> agents_; // loop thread
};

namespace detail {

/// One Consul service (health, catalog or KV), as a RegistryWatcher driver: direct (its
/// own blocking query) or shared (re-read when the agent's triggers name it), as the
/// agent decides when the first round starts.
class ConsulDriver final : public Driver, public ConsulMember {
public:
  /// `tap`, for tests: sees every request before it is sent, on the loop thread.
  ConsulDriver(std::shared_ptr<rt::Runtime> runtime, ConsulSource source, RequestTap tap = {})
      : runtime_(std::move(runtime)), source_(std::move(source)), tap_(std::move(tap)),
        endpoint_{source_.host(), source_.port(), false} {}

  std::string describe() const override { return source_.describe(); }
  const ConsulSource& source() const noexcept override { return source_; }

  /// "direct", "shared", or "" before the first round.
  const char* mode() const noexcept { return !joined_ ? "" : direct_ ? "direct" : "shared"; }

  void begin(WatcherCore& core, End end) override {
    core_ = &core;
    if (!joined_) {
      http_ = &runtime_->service<rt::HttpClient>();
      agent_ = &runtime_->service<ConsulAgents>().at(endpoint_);
      direct_ = agent_->join(this);
      joined_ = true;
      core.set_mode(direct_ ? "direct" : "shared");
    }
    if (direct_) {
      blocking_round(std::move(end));
    } else if (!read_once_ || dirty_) {
      read(std::move(end));
    } else {
      waiting_ = std::move(end);
    }
  }

  void abort() noexcept override {
    if (call_ != 0) http_->cancel(call_);
    call_ = 0;
    waiting_ = nullptr;
    if (joined_ && agent_) {
      if (read_end_) agent_->forget_read(this);
      if (reading_) agent_->read_done();
      agent_->leave(this);
    }
    read_end_ = nullptr;
    reading_ = false;
    joined_ = false;
  }

  void read_granted() override {
    End end = std::move(read_end_);
    read_end_ = nullptr;
    reading_ = true;
    HttpRequest req = source_.request(0, wait());
    req.read_timeout = consul_plain_timeout;
    if (tap_) tap_(req);
    call_ = http_->send(endpoint_, req, [this, end = std::move(end)](Result<HttpResponse> res) {
      call_ = 0;
      reading_ = false;
      agent_->read_done();
      auto decoded = decode(res);
      if (!decoded) return end(RoundEnd::failed(decoded.error()));
      read_once_ = true;
      std::uint64_t got = decoded->index;
      core_->succeeded(got);
      core_->offer(std::move(decoded).value().set.with_source_index(got));
      end(RoundEnd::again());
    });
  }

  void wake(bool urgent) override {
    if (read_end_) {
      // A read not yet sent will see this change: it only moves up when urgent.
      if (urgent) agent_->hurry_read(this);
      return;
    }
    if (waiting_) {
      End end = std::move(waiting_);
      waiting_ = nullptr;
      read(std::move(end), urgent);
    } else {
      dirty_ = true;
    }
  }

  void trigger_failed(const Error& e) override {
    dirty_ = true;
    if (waiting_) {
      End end = std::move(waiting_);
      waiting_ = nullptr;
      end(RoundEnd::failed(e));
    }
  }

private:
  std::chrono::milliseconds wait() const {
    return core_->options().wait.count() > 0 ? core_->options().wait : WatchOptions{}.wait;
  }

  // Direct: one request at the current index, following every blocking-query rule.
  void blocking_round(End end) {
    const auto w = wait();
    HttpRequest req = source_.request(index_, w);
    req.read_timeout = index_ == 0 ? consul_plain_timeout : w + w / 16 + consul_read_margin;
    if (tap_) tap_(req);
    call_ = http_->send(endpoint_, req, [this, end = std::move(end)](Result<HttpResponse> res) {
      call_ = 0;
      auto decoded = decode(res);
      if (!decoded) return end(RoundEnd::failed(decoded.error()));
      std::uint64_t got = decoded->index;
      core_->succeeded(got);
      // Only an index the server gave can be unchanged: after a substituted 1, an answer
      // at index 1 may be a change, so it is offered and compared by content.
      bool unchanged = index_from_server_ && got == index_;
      if (!unchanged) core_->offer(std::move(decoded).value().set.with_source_index(got));
      index_from_server_ = got != 0 && got >= index_;
      if (got == 0)
        index_ = 1; // index 0 never blocks: continue from 1
      else if (got < index_)
        index_ = 0; // the index went backwards (a snapshot restore): refetch the full state
      else
        index_ = got;
      end(RoundEnd::again());
    });
  }

  // Shared: a plain read of the whole state, when the agent grants a connection; the
  // publisher drops an unchanged set.
  void read(End end, bool urgent = false) {
    dirty_ = false;
    read_end_ = std::move(end);
    agent_->want_read(this, urgent);
  }

  Result<Decoded> decode(const Result<HttpResponse>& res) {
    if (!res) return res.error().with_context(source_.describe());
    auto decoded = source_.decode(*res);
    if (!decoded) return decoded.error().with_context(source_.describe());
    for (const auto& why : decoded->skipped) core_->report(Error(Errc::invalid_peer, source_.describe() + ": " + why));
    return decoded;
  }

  std::shared_ptr<rt::Runtime> runtime_;
  ConsulSource source_;
  RequestTap tap_;
  rt::HttpEndpoint endpoint_;
  WatcherCore* core_ = nullptr;
  rt::HttpClient* http_ = nullptr; // the runtime's, from the first round on
  ConsulAgent* agent_ = nullptr;
  bool joined_ = false;
  bool direct_ = false;
  bool read_once_ = false;
  bool dirty_ = false;
  End waiting_;
  End read_end_;        // a read asked for, not yet granted
  bool reading_ = false; // a granted read in flight
  rt::CallId call_ = 0;
  std::uint64_t index_ = 0;
  bool index_from_server_ = false;
};

} // namespace detail
DYNUP_NAMESPACE_END
