// Power-of-d-choices sampling shared by least_request and ewma: draw a few candidates
// uniformly at random, keep the least loaded by the policy's own order.
#pragma once

#include <dynup/balance/picker.hpp>
#include <dynup/detail/random.hpp>
#include <dynup/version.hpp>

#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

#ifndef DYNUP_P2C_REDRAWS
// Draws beyond choice_count a pick may spend on tried or repeated candidates before it
// compares the whole tier instead.
#define DYNUP_P2C_REDRAWS 8
#endif

DYNUP_NAMESPACE_BEGIN
namespace detail {

/// Largest choice_count: candidates live in a stack array of this size.
inline constexpr std::size_t max_choice_count = 16;
inline constexpr std::uint32_t no_choice = std::numeric_limits<std::uint32_t>::max();

/// The preferred of up to `choices` (1..max_choice_count) distinct members of `members`,
/// drawn uniformly at random, skipping those `skip(m)` rejects; `better(a, b)` (on
/// TierMember) is true when a is strictly preferred. Ties keep the earlier draw, so they are broken at random.
/// A tier of at most `choices` members (or of 4 when choices > 1) is compared whole, from a random start (ties
/// random again); so is any tier where the bounded draws found nothing usable. Returns
/// the member's set index, or no_choice. noexcept, no allocation; O(choices) when few
/// members are skipped, O(n) at worst.
template <class Skip, class Better>
std::uint32_t p2c_choose(const std::vector<TierMember>& members, std::size_t choices, Skip&& skip,
                         Better&& better) noexcept {
  const std::size_t n = members.size();
  if (n == 0) return no_choice;
  if (choices < 1) choices = 1;
  if (choices > max_choice_count) choices = max_choice_count;

  auto compare_all = [&]() noexcept {
    auto start = static_cast<std::size_t>(thread_random_below(n));
    const TierMember* best = nullptr;
    for (std::size_t k = 0, at = start; k < n; ++k, at = at + 1 == n ? 0 : at + 1) {
      const TierMember& m = members[at];
      if (skip(m)) continue;
      if (best == nullptr || better(m, *best)) best = &m;
    }
    return best ? best->index : no_choice;
  };
  // Tiny tiers: comparing every member is cheaper than drawing distinct candidates.
  if (n <= choices || (choices > 1 && n <= 4)) return compare_all();

  const TierMember* drawn[max_choice_count];
  std::size_t got = 0;
  for (std::size_t draws = 0; got < choices && draws < choices + DYNUP_P2C_REDRAWS; ++draws) {
    const TierMember* m = &members[static_cast<std::size_t>(thread_random_below(n))];
    bool repeat = false;
    for (std::size_t j = 0; j < got; ++j) repeat = repeat || drawn[j] == m;
    if (repeat || skip(*m)) continue;
    drawn[got++] = m;
  }
  if (got == 0) return compare_all();
  const TierMember* best = drawn[0];
  for (std::size_t j = 1; j < got; ++j)
    if (better(*drawn[j], *best)) best = drawn[j];
  return best->index;
}

} // namespace detail
DYNUP_NAMESPACE_END
