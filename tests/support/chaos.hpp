// Registry chaos for the load tests (tests/e2e/chaos_test.cpp): a backend that can be
// stopped on its own, and the rounds of faults and membership churn the registry double
// goes through while wrk drives traffic through a proxy.
#pragma once

#include <support/consul_double.hpp>
#include <support/wait.hpp>
#include <support/worker_nginx.hpp>
#include <support/wrk.hpp>

#include <httplib.h>
#include <sys/socket.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

namespace dynup_test {

/// An HTTP server on a free loopback port that answers every GET with its name and
/// counts the requests; stop() takes it away while the test goes on (a backend process
/// being shut down). Thread-safe: requests() and stop() from any thread.
class ChaosBackend {
public:
  explicit ChaosBackend(std::string name) : name_(std::move(name)) {
    server_.new_task_queue = [] { return new httplib::ThreadPool(32); };
    server_.set_tcp_nodelay(true);
    server_.set_keep_alive_max_count(100000);
    server_.set_keep_alive_timeout(2); // bounds how long stop() waits for an idle connection
    server_.Get(".*", [this](const httplib::Request&, httplib::Response& res) {
      requests_.fetch_add(1, std::memory_order_relaxed);
      res.set_content(name_, "text/plain");
    });
    int listener = -1;
    server_.set_socket_options([&listener](socket_t sock) {
      int yes = 1;
      ::setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof yes);
      listener = sock;
    });
    port_ = server_.bind_to_any_port("127.0.0.1");
    if (port_ <= 0) throw std::runtime_error("backend " + name_ + ": cannot bind a loopback port");
    // cpp-httplib listens with a backlog of 5: under load the kernel drops SYNs past it
    // and the client retries a second later, so a request picked before a change would
    // arrive long after it. Linux takes a second listen() as a new backlog.
    if (::listen(listener, 1024) != 0) throw std::runtime_error("backend " + name_ + ": listen failed");
    thread_ = std::thread([this] { server_.listen_after_bind(); });
    // stop() before the loop runs would be lost, and join() would wait forever.
    if (!wait_until([this] { return server_.is_running(); })) {
      thread_.detach();
      throw std::runtime_error("backend " + name_ + ": did not start");
    }
  }
  ~ChaosBackend() { stop(); }
  ChaosBackend(const ChaosBackend&) = delete;
  ChaosBackend& operator=(const ChaosBackend&) = delete;

  std::uint16_t port() const noexcept { return static_cast<std::uint16_t>(port_); }
  const std::string& name() const noexcept { return name_; }
  std::size_t requests() const noexcept { return requests_.load(std::memory_order_relaxed); }

  /// Stops listening and joins the server: connections are refused from then on.
  void stop() {
    if (!thread_.joinable()) return;
    server_.stop();
    thread_.join();
  }

private:
  const std::string name_;
  httplib::Server server_;
  int port_ = -1;
  std::thread thread_;
  std::atomic<std::size_t> requests_{0};
};

/// A peer as the registry double lists it (Service.ID `id` on node "node-1").
struct ChaosMember {
  std::string id;
  std::uint16_t port = 0;
  std::uint32_t weight = 1;
  bool critical = false;
};

/// The id dynup gives a member: "<node>/<Service.ID>" (include/dynup/source/consul.hpp).
inline std::string peer_id_of(const ChaosMember& m) { return "node-1/" + m.id; }

/// The passing members, as a status document should list them.
inline PeerAddresses addresses_of(const std::vector<ChaosMember>& members) {
  PeerAddresses out;
  for (const ChaosMember& m : members)
    if (!m.critical) out.emplace(peer_id_of(m), "127.0.0.1:" + std::to_string(m.port), m.weight);
  return out;
}

/// What the chaos did, for the test's report.
struct ChaosTally {
  std::size_t rounds = 0;
  std::size_t outages = 0;       ///< down() then up()
  std::size_t faults = 0;        ///< inject() calls
  std::size_t index_resets = 0;  ///< restore_snapshot() calls
  std::size_t memberships = 0;   ///< set_service() calls
};

inline std::string describe(const ChaosTally& t) {
  return std::to_string(t.rounds) + " rounds: " + std::to_string(t.outages) + " outages, " +
         std::to_string(t.faults) + " injected faults, " + std::to_string(t.index_resets) + " index resets, " +
         std::to_string(t.memberships) + " membership changes";
}

/// Drives the registry double's service through faults and membership churn. Every
/// member it ever lists is a live backend: the chaos is the registry's, never the
/// backends'. Not thread-safe: one test thread drives it.
class RegistryChaos {
public:
  /// `backends`: the ports of the churned members "b0", "b1", …; `extra`: members listed
  /// in every state until drop_extra().
  RegistryChaos(ConsulDouble& registry, std::string service, std::vector<std::uint16_t> backends,
                std::vector<ChaosMember> extra = {})
      : registry_(registry), service_(std::move(service)), backends_(std::move(backends)), extra_(std::move(extra)) {}

  /// Every backend with weight 1, and the extra members.
  std::vector<ChaosMember> everyone() const {
    std::vector<ChaosMember> out;
    for (std::size_t i = 0; i < backends_.size(); ++i) out.push_back({"b" + std::to_string(i), backends_[i]});
    out.insert(out.end(), extra_.begin(), extra_.end());
    return out;
  }

  /// Lists exactly `members` in the registry.
  void set(const std::vector<ChaosMember>& members) {
    std::vector<ConsulInstance> instances;
    for (const ChaosMember& m : members) {
      ConsulInstance i;
      i.id = m.id;
      i.address = "127.0.0.1";
      i.port = m.port;
      i.weight_passing = static_cast<int>(m.weight);
      i.checks = {m.critical ? "critical" : "passing"};
      instances.push_back(std::move(i));
    }
    registry_.set_service(service_, std::move(instances));
    ++tally_.memberships;
  }

  /// The extra members are left out of every later state (the next set() or round).
  void drop_extra() { extra_.clear(); }

  /// Round k of a 12-round cycle: an outage, each fault the double can inject that a
  /// watcher must survive (500 no leader, garbage, a truncated body, index 0, 429, no
  /// index header, a held then dropped request), an index reset, and membership churn
  /// (backends removed and added back, reweighted, one marked critical).
  void round(std::size_t k) {
    using std::chrono::milliseconds;
    ++tally_.rounds;
    auto fault = [&](ConsulFault f, std::size_t times, milliseconds param = milliseconds(200)) {
      registry_.inject(f, times, param);
      ++tally_.faults;
      registry_.touch_service(service_); // ends the held query: the next one meets the fault
    };
    switch (k % 12) {
    case 0:
      registry_.down();
      ++tally_.outages;
      std::this_thread::sleep_for(milliseconds(150));
      registry_.up();
      set(churned(k));
      break;
    case 1: fault(ConsulFault::no_leader, 3); break;
    case 2: set(churned(k)); break;
    case 3: fault(ConsulFault::garbage_json, 2); break;
    case 4: set(churned(k)); break;
    case 5: fault(ConsulFault::truncated_body, 2); break;
    case 6: {
      // A restore from an older snapshot: the index goes backwards, then moves on.
      const std::uint64_t now = registry_.index();
      registry_.restore_snapshot(now > 60 ? now - 50 : 10);
      ++tally_.index_resets;
      set(churned(k));
      break;
    }
    case 7: fault(ConsulFault::index_zero, 3); break;
    case 8: fault(ConsulFault::rate_limited, 2); break;
    case 9: fault(ConsulFault::missing_index_header, 2); break;
    case 10: fault(ConsulFault::hold_then_drop, 1, milliseconds(300)); break;
    default: set(everyone()); break;
    }
  }

  const ChaosTally& tally() const noexcept { return tally_; }

private:
  // churn_set(k) of the backends (a subset, reweighted), with the first of it marked
  // critical every third state when others remain to serve; then the extras.
  std::vector<ChaosMember> churned(std::size_t k) const {
    std::vector<ChaosMember> out;
    for (const auto& [i, weight] : churn_set(k))
      if (i < backends_.size()) out.push_back({"b" + std::to_string(i), backends_[i], weight});
    if (out.empty()) out.push_back({"b0", backends_.at(0), 1});
    if (k % 3 == 0 && out.size() >= 2) out.front().critical = true;
    out.insert(out.end(), extra_.begin(), extra_.end());
    return out;
  }

  ConsulDouble& registry_;
  const std::string service_;
  const std::vector<std::uint16_t> backends_;
  std::vector<ChaosMember> extra_;
  ChaosTally tally_;
};

} // namespace dynup_test
