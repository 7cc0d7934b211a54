#include <dynup/result.hpp>

#include <doctest/doctest.h>

#include <memory>
#include <string>
#include <utility>

using dynup::bad_result_access;
using dynup::Errc;
using dynup::Error;
using dynup::Result;

TEST_CASE("a Result holding a value is ok and yields the value") {
  Result<int> r = 42;
  CHECK(r.ok());
  CHECK(static_cast<bool>(r));
  CHECK(r.value() == 42);
  CHECK(*r == 42);
}

TEST_CASE("a Result holding an error is not ok and exposes code and message") {
  Result<int> r = Error(Errc::parse_error, "bad input");
  CHECK_FALSE(r.ok());
  CHECK_FALSE(static_cast<bool>(r));
  CHECK(r.error().code() == Errc::parse_error);
  CHECK(r.error().message() == "bad input");
}

TEST_CASE("value() on an error throws bad_result_access carrying the message") {
  Result<std::string> r = Error(Errc::not_found, "no such key");
  CHECK_THROWS_AS(r.value(), bad_result_access);
  CHECK_THROWS_WITH(r.value(), doctest::Contains("no such key"));
  const Result<std::string>& cr = r;
  CHECK_THROWS_AS(cr.value(), bad_result_access);
  CHECK_THROWS_AS(std::move(r).value(), bad_result_access);
  Result<std::string> r2 = Error(Errc::not_found, "x");
  CHECK_THROWS_AS(r2->size(), bad_result_access);
  CHECK_THROWS_AS(*r2, bad_result_access);
}

TEST_CASE("bad_result_access is a logic_error") {
  Result<int> r = Error(Errc::corrupt, "checksum");
  CHECK_THROWS_AS(r.value(), std::logic_error);
}

TEST_CASE("value_or returns the value when ok and the fallback on error") {
  Result<int> good = 7;
  Result<int> bad = Error(Errc::invalid_argument, "nope");
  CHECK(good.value_or(99) == 7);
  CHECK(bad.value_or(99) == 99);
  Result<std::string> s = Error(Errc::invalid_argument, "nope");
  CHECK(s.value_or("fallback") == "fallback");
  Result<std::string> t = std::string("real");
  CHECK(t.value_or("fallback") == "real");
}

TEST_CASE("operator-> reaches members of the held value") {
  Result<std::string> r = std::string("hello");
  CHECK(r->size() == 5);
  r->append("!");
  CHECK(r.value() == "hello!");
}

TEST_CASE("an rvalue Result moves its value out") {
  Result<std::unique_ptr<int>> r = std::make_unique<int>(5);
  std::unique_ptr<int> p = std::move(r).value();
  REQUIRE(p != nullptr);
  CHECK(*p == 5);
}

TEST_CASE("an rvalue Result moves its error out") {
  Result<int> r = Error(Errc::io_error, "disk full");
  Error e = std::move(r).error();
  CHECK(e.code() == Errc::io_error);
  CHECK(e.message() == "disk full");
}

TEST_CASE("with_context prefixes the message and keeps the code") {
  Error e(Errc::parse_error, "line 3: bad token");
  Error c = e.with_context("peers.json");
  CHECK(c.code() == Errc::parse_error);
  CHECK(c.message() == "peers.json: line 3: bad token");
  CHECK(e.message() == "line 3: bad token");
}

TEST_CASE("errors compare equal only when code and message both match") {
  CHECK(Error(Errc::corrupt, "a") == Error(Errc::corrupt, "a"));
  CHECK_FALSE(Error(Errc::corrupt, "a") == Error(Errc::corrupt, "b"));
  CHECK_FALSE(Error(Errc::corrupt, "a") == Error(Errc::io_error, "a"));
}

TEST_CASE("Result<void> default-constructs ok and value() does not throw") {
  Result<void> r;
  CHECK(r.ok());
  CHECK(static_cast<bool>(r));
  CHECK_NOTHROW(r.value());
}

TEST_CASE("Result<void> holding an error is not ok and value() throws") {
  Result<void> r = Error(Errc::rejected, "empty set");
  CHECK_FALSE(r.ok());
  CHECK_FALSE(static_cast<bool>(r));
  CHECK(r.error().code() == Errc::rejected);
  CHECK(r.error().message() == "empty set");
  CHECK_THROWS_AS(r.value(), bad_result_access);
  CHECK_THROWS_WITH(r.value(), doctest::Contains("empty set"));
}

TEST_CASE("every error code has a distinct stable name") {
  CHECK(std::string(dynup::to_string(Errc::invalid_argument)) == "invalid_argument");
  CHECK(std::string(dynup::to_string(Errc::invalid_peer)) == "invalid_peer");
  CHECK(std::string(dynup::to_string(Errc::parse_error)) == "parse_error");
  CHECK(std::string(dynup::to_string(Errc::io_error)) == "io_error");
  CHECK(std::string(dynup::to_string(Errc::not_found)) == "not_found");
  CHECK(std::string(dynup::to_string(Errc::corrupt)) == "corrupt");
  CHECK(std::string(dynup::to_string(Errc::unsupported)) == "unsupported");
  CHECK(std::string(dynup::to_string(Errc::unavailable)) == "unavailable");
  CHECK(std::string(dynup::to_string(Errc::rejected)) == "rejected");
  CHECK(std::string(dynup::to_string(Errc::too_large)) == "too_large");
}
