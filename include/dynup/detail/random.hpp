// Per-thread pseudo-random numbers for P2C samples, random picks and jitter: seeded
// per thread so processes and threads never march in step; no locks, no allocation.
#pragma once

#include <dynup/version.hpp>

#include <chrono>
#include <cstdint>
#include <functional>
#include <random>
#include <thread>

DYNUP_NAMESPACE_BEGIN
namespace detail {

/// 128-bit unsigned arithmetic (a GCC/Clang extension) for exact products of 64-bit values.
__extension__ using uint128 = unsigned __int128;

/// SplitMix64 step: a fast generator with good statistical quality for load balancing
/// (not for anything security-related).
inline std::uint64_t splitmix64(std::uint64_t& state) noexcept {
  std::uint64_t z = (state += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

inline std::uint64_t thread_seed() noexcept {
  std::uint64_t s = static_cast<std::uint64_t>(
      std::chrono::steady_clock::now().time_since_epoch().count());
  s ^= static_cast<std::uint64_t>(std::hash<std::thread::id>()(std::this_thread::get_id())) << 1;
  try {
    std::random_device rd;
    s ^= (static_cast<std::uint64_t>(rd()) << 32) ^ rd();
  } catch (...) {
    // No entropy device: time and thread id still differ between threads and processes.
  }
  return s;
}

/// A uniformly distributed 64-bit value from this thread's generator. Wait-free.
inline std::uint64_t thread_random() noexcept {
  static thread_local std::uint64_t state = thread_seed();
  return splitmix64(state);
}

/// A uniform value in [0, n) for n > 0 (Lemire's multiply-shift; the bias is below
/// n / 2^64, far under anything a balancer can observe).
inline std::uint64_t thread_random_below(std::uint64_t n) noexcept {
  return static_cast<std::uint64_t>((static_cast<uint128>(thread_random()) * n) >> 64);
}

} // namespace detail
DYNUP_NAMESPACE_END
