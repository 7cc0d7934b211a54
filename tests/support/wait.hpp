// Waiting for asynchronous effects in tests: poll a condition until a deadline, so a
// test never relies on a fixed sleep being "long enough".
#pragma once

#include <chrono>
#include <thread>

namespace dynup_test {

/// Polls `pred` every few milliseconds; true as soon as it holds, false at the deadline.
template <class Pred>
bool wait_until(Pred pred, std::chrono::milliseconds timeout = std::chrono::milliseconds(5000)) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    if (pred()) return true;
    if (std::chrono::steady_clock::now() >= deadline) return pred();
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
}

/// Checks that `pred` holds throughout `window`: the only way to observe "nothing
/// happens". Returns false as soon as it stops holding.
template <class Pred> bool stays_true_for(Pred pred, std::chrono::milliseconds window) {
  auto deadline = std::chrono::steady_clock::now() + window;
  while (std::chrono::steady_clock::now() < deadline) {
    if (!pred()) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return pred();
}

} // namespace dynup_test
