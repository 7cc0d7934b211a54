// Many Consul services in one process within a connection budget per agent: past the
// budget, services are watched through the agent's cluster-wide indexes
// (watch/consul_watch.hpp), against the protocol double with a per-client connection cap
// like an agent's limits.http_max_conns_per_client.
#include <dynup/publisher.hpp>
#include <dynup/runtime/runtime.hpp>
#include <dynup/watch/any.hpp>
#include <dynup/watch/consul_watch.hpp>

#include <support/consul_double.hpp>
#include <support/threads.hpp>
#include <support/wait.hpp>

#include <doctest/doctest.h>

#include <dirent.h>

#include <chrono>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace {

using dynup::Publisher;
using dynup_test::ConsulDouble;
using dynup_test::ConsulFault;
using dynup_test::ConsulInstance;
using dynup_test::wait_until;
using namespace std::chrono_literals;

// Two instances: the first on `node`, the second on "node-spare".
std::vector<ConsulInstance> two(int base, const std::string& node = "node-1") {
  std::vector<ConsulInstance> out;
  for (int i = 0; i < 2; ++i) {
    ConsulInstance in;
    in.port = static_cast<std::uint16_t>(base + i);
    in.address = "10.1.0." + std::to_string(1 + i);
    in.node = i == 0 ? node : "node-spare";
    out.push_back(in);
  }
  return out;
}

dynup::AnyWatchOptions fast() {
  dynup::AnyWatchOptions o;
  o.wait = 5s;
  o.backoff_base = 20ms;
  o.backoff_cap = 200ms;
  o.min_interval = 5ms;
  return o;
}


// N services watched in one process, each with its own publisher.
struct Fleet {
  std::shared_ptr<dynup::rt::Runtime> runtime;
  std::vector<std::unique_ptr<Publisher>> publishers;
  std::vector<dynup::Watcher> watchers;

  explicit Fleet(unsigned budget) {
    auto rt = dynup::rt::Runtime::acquire();
    REQUIRE(rt);
    runtime = *rt;
    runtime->service<dynup::ConsulAgents>().configure(budget);
  }
  ~Fleet() {
    for (auto& w : watchers) w.stop();
  }

  void watch(const ConsulDouble& d, const std::string& path, dynup::AnyWatchOptions o = fast()) {
    publishers.push_back(std::make_unique<Publisher>());
    auto w = dynup::Watcher::start(*publishers.back(), d.spec(path), std::move(o));
    REQUIRE_MESSAGE(w, (w ? "" : w.error().message()));
    watchers.push_back(std::move(w).value());
  }

  std::size_t ports(std::size_t i) const {
    auto set = publishers[i]->current();
    return set->size();
  }
  bool has_port(std::size_t i, std::uint16_t port) const {
    auto set = publishers[i]->current();
    for (const auto& p : *set)
      if (p.port == port) return true;
    return false;
  }
};

std::string name(std::size_t i) { return "svc-" + std::to_string(i); }

} // namespace

TEST_CASE("consul shared: 1000 services behind a 200-connection cap all get peers within the budget") {
  ConsulDouble d;
  d.set_max_conns_per_client(200);
  std::map<std::string, std::vector<ConsulInstance>> all;
  for (std::size_t i = 0; i < 1000; ++i) all[name(i)] = two(static_cast<int>(10000 + 2 * i));
  d.set_services(all);

  Fleet fleet(16);
  const std::size_t threads_before = dynup_test::thread_count("consul-double");
  for (std::size_t i = 0; i < 1000; ++i) fleet.watch(d, "/health/" + name(i));
  for (std::size_t i = 0; i < 1000; ++i) REQUIRE_MESSAGE(fleet.ports(i) == 2, name(i));
  CHECK(dynup_test::thread_count("consul-double") == threads_before); // the runtime's threads, whatever N

  // A change to any one of them is published, and only there.
  auto changed = two(50000);
  changed.push_back(changed.back());
  changed.back().port = 50002;
  changed.back().address = "10.1.0.3";
  d.set_service(name(537), changed);
  REQUIRE(wait_until([&] { return fleet.ports(537) == 3; }, 10s));
  CHECK(fleet.has_port(537, 50002));

  // A check failing on one instance of another service takes it out.
  d.set_instance_checks(name(12), name(12) + "-" + std::to_string(10000 + 24), {"critical"});
  REQUIRE(wait_until([&] { return fleet.ports(12) == 1; }, 10s));

  for (std::size_t i : {0u, 1u, 13u, 536u, 538u, 999u}) CHECK(fleet.publishers[i]->version() == 1);
  auto c = d.connections();
  MESSAGE("connections: peak " << c.peak << ", accepted " << c.accepted << ", refused " << c.refused);
  CHECK(c.peak <= 16);
  CHECK(c.refused == 0);
  std::size_t direct = 0, shared = 0;
  for (auto& w : fleet.watchers) (w.status().mode == "direct" ? direct : shared) += 1;
  CHECK(direct == 8); // half the budget
  CHECK(shared == 992);
}

TEST_CASE("consul shared: services past the budget follow registrations, checks and node checks") {
  ConsulDouble d;
  for (std::size_t i = 0; i < 12; ++i) d.set_service(name(i), two(static_cast<int>(20000 + 2 * i), "node-" + std::to_string(i % 3)));
  Fleet fleet(4); // no direct slot: every service is shared
  for (std::size_t i = 0; i < 12; ++i) fleet.watch(d, "/health/" + name(i));
  for (std::size_t i = 0; i < 12; ++i) REQUIRE(fleet.ports(i) == 2);

  // Registration: an instance added.
  auto three = two(20010, "node-2");
  three.push_back(three.back());
  three.back().port = 20099;
  d.set_service(name(5), three);
  REQUIRE(wait_until([&] { return fleet.ports(5) == 3; }, 10s));

  // A node check going critical takes every instance on that node out.
  d.set_node_check("node-1", "critical");
  REQUIRE(wait_until([&] { return fleet.ports(1) == 1 && fleet.ports(4) == 1 && fleet.ports(7) == 1; }, 10s));
  CHECK(fleet.ports(0) == 2);
  d.set_node_check("node-1", "passing");
  REQUIRE(wait_until([&] { return fleet.ports(1) == 2 && fleet.ports(4) == 2; }, 10s));

  // Deregistration of every instance: an empty set is refused by the default guard and
  // the last good set kept, loudly.
  d.set_service(name(9), {});
  REQUIRE(wait_until([&] { return !fleet.watchers[9].status().last_error.empty(); }, 10s));
  CHECK(fleet.ports(9) == 2);
  CHECK(d.connections().peak <= 4);
}

TEST_CASE("consul shared: catalog and KV services past the budget follow their changes") {
  ConsulDouble d;
  d.set_service("cat-a", two(30000));
  d.set_service("cat-b", two(30010));
  d.put_kv("upstreams/api/10.0.0.1:80", "{}");
  d.put_kv("upstreams/web/10.0.0.2:80", "{}");
  Fleet fleet(4);
  fleet.watch(d, "/catalog/cat-a");
  fleet.watch(d, "/catalog/cat-b");
  fleet.watch(d, "/kv/upstreams/api");
  fleet.watch(d, "/kv/upstreams/web");
  REQUIRE(fleet.ports(0) == 2);
  REQUIRE(fleet.ports(2) == 1);

  d.set_service("cat-b", two(30020));
  REQUIRE(wait_until([&] { return fleet.has_port(1, 30020); }, 10s));
  d.put_kv("upstreams/web/10.0.0.3:80", "{}");
  REQUIRE(wait_until([&] { return fleet.ports(3) == 2; }, 10s));
  CHECK(fleet.ports(2) == 1);
  CHECK(d.connections().peak <= 4);
}

TEST_CASE("consul shared: a failing cluster-wide index is reported by every service it watches") {
  ConsulDouble d;
  for (std::size_t i = 0; i < 5; ++i) d.set_service(name(i), two(static_cast<int>(40000 + 2 * i)));
  Fleet fleet(4);
  for (std::size_t i = 0; i < 5; ++i) fleet.watch(d, "/health/" + name(i));
  for (std::size_t i = 0; i < 5; ++i) REQUIRE(fleet.ports(i) == 2);

  // Held queries keep their answer; the requests after the next change fail.
  d.inject(ConsulFault::no_leader);
  d.set_node_check("node-9", "passing"); // a new check: the checks index moves
  bool all_failed = wait_until(
      [&] {
        for (auto& w : fleet.watchers)
          if (w.status().last_error.find("No cluster leader") == std::string::npos &&
              w.status().last_error.find("HTTP 500") == std::string::npos)
            return false;
        return true;
      },
      10s);
  REQUIRE(all_failed);
  for (auto& w : fleet.watchers) CHECK(w.status().stale);
  for (std::size_t i = 0; i < 5; ++i) CHECK(fleet.ports(i) == 2); // the last good sets stay

  d.clear_faults();
  d.set_service(name(3), two(40100));
  REQUIRE(wait_until([&] { return fleet.has_port(3, 40100); }, 10s));
  REQUIRE(wait_until(
      [&] {
        for (auto& w : fleet.watchers)
          if (w.status().stale) return false;
        return true;
      },
      10s));
}

TEST_CASE("consul shared: an index going backwards (a snapshot restore) still converges") {
  ConsulDouble d;
  for (std::size_t i = 0; i < 6; ++i) d.set_service(name(i), two(static_cast<int>(41000 + 2 * i)));
  Fleet fleet(4);
  for (std::size_t i = 0; i < 6; ++i) fleet.watch(d, "/health/" + name(i));
  std::uint64_t before = d.index();
  d.restore_snapshot(before > 3 ? before - 3 : 1);
  d.set_service(name(2), two(41200));
  REQUIRE(wait_until([&] { return fleet.has_port(2, 41200); }, 10s));
}
