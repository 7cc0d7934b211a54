#include <dynup/runtime/resolver.hpp>

#include <support/wait.hpp>

#include <support/threads.hpp>

#include <doctest/doctest.h>

#include <arpa/inet.h>
#include <dirent.h>
#include <netinet/in.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

using namespace std::chrono_literals;
using dynup::rt::Resolved;
using dynup::rt::Resolver;
using dynup::rt::Runtime;
using dynup_test::stays_true_for;
using dynup_test::wait_until;

namespace {


std::uint16_t port_of(const Resolved& r) {
  if (r.addr.ss_family == AF_INET) return ntohs(reinterpret_cast<const sockaddr_in*>(&r.addr)->sin_port);
  return ntohs(reinterpret_cast<const sockaddr_in6*>(&r.addr)->sin6_port);
}

} // namespace

TEST_CASE("resolver: a name's answer comes back on the loop's thread, with the port") {
  auto rt = Runtime::acquire().value();
  std::mutex mu;
  std::optional<Resolved> got;
  bool on_loop = false;
  rt->service<Resolver>().resolve("localhost", 8080, [&](Resolved r) {
    std::lock_guard<std::mutex> lock(mu);
    on_loop = rt->loop().in_loop();
    got = std::move(r);
  });
  REQUIRE(wait_until([&] {
    std::lock_guard<std::mutex> lock(mu);
    return got.has_value();
  }));
  std::lock_guard<std::mutex> lock(mu);
  CHECK(on_loop);
  REQUIRE(got->ok());
  CHECK((got->addr.ss_family == AF_INET || got->addr.ss_family == AF_INET6));
  CHECK(port_of(*got) == 8080);
}

TEST_CASE("resolver: an unresolvable name gives the resolver's reason") {
  auto rt = Runtime::acquire().value();
  std::mutex mu;
  std::optional<Resolved> got;
  rt->service<Resolver>().resolve("nonexistent.invalid", 80, [&](Resolved r) {
    std::lock_guard<std::mutex> lock(mu);
    got = std::move(r);
  });
  REQUIRE(wait_until([&] {
    std::lock_guard<std::mutex> lock(mu);
    return got.has_value();
  }));
  std::lock_guard<std::mutex> lock(mu);
  CHECK_FALSE(got->ok());
  CHECK_FALSE(got->error.empty());
}

TEST_CASE("resolver: no thread before the first lookup, at most DYNUP_RESOLVER_THREADS after many") {
  auto rt = Runtime::acquire().value();
  const std::size_t before = dynup_test::thread_count();
  Resolver& resolver = rt->service<Resolver>();
  CHECK(dynup_test::thread_count() == before);
  std::atomic<int> answered{0};
  for (int i = 0; i < 50; ++i) resolver.resolve("localhost", 80, [&](Resolved) { ++answered; });
  CHECK(dynup_test::thread_count() <= before + DYNUP_RESOLVER_THREADS);
  REQUIRE(wait_until([&] { return answered == 50; }));
  CHECK(dynup_test::thread_count() <= before + DYNUP_RESOLVER_THREADS);
}

TEST_CASE("resolver: once the runtime has ended, queued lookups are never answered") {
  std::atomic<int> answered{0};
  {
    auto rt = Runtime::acquire().value();
    if (rt.use_count() != 1) {
      MESSAGE("skipped: another holder keeps the runtime alive");
      return;
    }
    for (int i = 0; i < 200; ++i) rt->service<Resolver>().resolve("localhost", 80, [&](Resolved) { ++answered; });
  } // the last holder: the runtime ends here, with lookups still queued
  const int seen = answered;
  CHECK(seen <= 200);
  CHECK(stays_true_for([&] { return answered == seen; }, 200ms));
}
