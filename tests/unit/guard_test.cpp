#include <dynup/watch/guard.hpp>

#include <support/text.hpp>

#include <doctest/doctest.h>

#include <cmath>
#include <string>
#include <vector>

using dynup::check_guards;
using dynup::Errc;
using dynup::Guards;
using dynup::Peer;
using dynup::PeerSet;

namespace {

using dynup_test::contains;
// A set of peers 10.0.0.<first>..10.0.0.<first+n-1> on port 80.
PeerSet range(int first, int n) {
  std::vector<Peer> peers;
  for (int i = first; i < first + n; ++i) {
    Peer p;
    p.host = "10.0.0." + std::to_string(i);
    p.port = 80;
    peers.push_back(p);
  }
  auto r = PeerSet::make(std::move(peers));
  REQUIRE(r);
  return std::move(r).value();
}

} // namespace

TEST_CASE("default guards refuse an empty set and say why") {
  auto r = check_guards(Guards{}, range(1, 3), PeerSet());
  REQUIRE_FALSE(r);
  CHECK(r.error().code() == Errc::rejected);
  CHECK(contains(r.error().message(), "empty peer set"));
  CHECK(contains(r.error().message(), "allow_empty"));
  CHECK(contains(r.error().message(), "keeping the 3 current peers"));
}

TEST_CASE("default guards refuse an empty set even before the first publish") {
  auto r = check_guards(Guards{}, PeerSet(), PeerSet());
  REQUIRE_FALSE(r);
  CHECK(r.error().code() == Errc::rejected);
}

TEST_CASE("allow_empty lets an empty set through") {
  Guards g;
  g.allow_empty = true;
  CHECK(check_guards(g, range(1, 3), PeerSet()).ok());
  CHECK(check_guards(g, PeerSet(), PeerSet()).ok());
}

TEST_CASE("default guards accept any non-empty update, even replacing every peer") {
  CHECK(check_guards(Guards{}, PeerSet(), range(1, 1)).ok());
  CHECK(check_guards(Guards{}, range(1, 10), range(100, 1)).ok());
}

TEST_CASE("min_peers refuses a smaller set and accepts exactly the minimum") {
  Guards g;
  g.min_peers = 3;
  auto r = check_guards(g, range(1, 5), range(1, 2));
  REQUIRE_FALSE(r);
  CHECK(r.error().code() == Errc::rejected);
  CHECK(contains(r.error().message(), "set of 2 peers"));
  CHECK(contains(r.error().message(), "min_peers 3"));
  CHECK(check_guards(g, range(1, 5), range(1, 3)).ok());
  CHECK(check_guards(g, PeerSet(), range(1, 4)).ok());
}

TEST_CASE("min_peers refuses an empty set even when allow_empty is on") {
  Guards g;
  g.allow_empty = true;
  g.min_peers = 1;
  auto r = check_guards(g, range(1, 2), PeerSet());
  REQUIRE_FALSE(r);
  CHECK(contains(r.error().message(), "min_peers 1"));
}

TEST_CASE("max_removed_share allows removing exactly the limit") {
  Guards g;
  g.max_removed_share = 0.25;
  // 4 current peers, next drops one of them: share 0.25.
  CHECK(check_guards(g, range(1, 4), range(2, 3)).ok());
  g.max_removed_share = 0.3;
  // 10 current, 3 removed: 3/10 computes to exactly the double 0.3.
  CHECK(check_guards(g, range(1, 10), range(4, 7)).ok());
}

TEST_CASE("max_removed_share refuses removing more than the limit and says how many") {
  Guards g;
  g.max_removed_share = 0.25;
  auto r = check_guards(g, range(1, 4), range(3, 2));
  REQUIRE_FALSE(r);
  CHECK(r.error().code() == Errc::rejected);
  CHECK(contains(r.error().message(), "removes 2 of 4 peers"));
  CHECK(contains(r.error().message(), "max_removed_share"));
}

TEST_CASE("max_removed_share counts only removed ids, not additions") {
  Guards g;
  g.max_removed_share = 0.5;
  // 2 of 4 removed and 10 added: share is 0.5, allowed.
  CHECK(check_guards(g, range(1, 4), range(3, 12)).ok());
  // 3 of 4 removed, even though the next set is bigger.
  CHECK_FALSE(check_guards(g, range(1, 4), range(4, 12)).ok());
}

TEST_CASE("max_removed_share does not apply before the first publish") {
  Guards g;
  g.max_removed_share = 0.0;
  CHECK(check_guards(g, PeerSet(), range(1, 3)).ok());
}

TEST_CASE("max_removed_share of 0 refuses any removal but allows changes and additions") {
  Guards g;
  g.max_removed_share = 0.0;
  CHECK_FALSE(check_guards(g, range(1, 3), range(1, 2)).ok());
  CHECK(check_guards(g, range(1, 3), range(1, 5)).ok());
  CHECK(check_guards(g, range(1, 3), range(1, 3)).ok());
}

TEST_CASE("max_removed_share refuses emptying an upstream even with allow_empty") {
  Guards g;
  g.allow_empty = true;
  g.max_removed_share = 0.5;
  auto r = check_guards(g, range(1, 2), PeerSet());
  REQUIRE_FALSE(r);
  CHECK(contains(r.error().message(), "removes 2 of 2 peers"));
}

TEST_CASE("a max_removed_share outside [0, 1] or NaN is a configuration error, not a silent pass") {
  for (double bad : {-0.1, 1.5, std::nan("")}) {
    dynup::Guards g;
    g.max_removed_share = bad;
    auto r = check_guards(g, range(1, 3), range(1, 3));
    REQUIRE_FALSE(r.ok());
    CHECK(r.error().code() == dynup::Errc::invalid_argument);
    CHECK(r.error().message().find("max_removed_share must be in [0, 1]") != std::string::npos);
  }
}
