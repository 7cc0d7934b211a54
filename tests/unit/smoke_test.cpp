#include <dynup/dynup.hpp>
#include <doctest/doctest.h>
TEST_CASE("umbrella header compiles and parses a peer") {
  auto s = dynup::parse_peer_set(R"({"peers":["10.0.0.1:80"]})");
  REQUIRE(s);
  CHECK(s->size() == 1);
}
