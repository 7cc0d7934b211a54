// Counting this thread's heap allocations, to test "does not allocate" promises. The
// binary-wide replacement operator new/delete that feed the count live in
// unit/policy_contract_test.cpp (one definition per binary: include this header, never
// define another operator new in tests/unit).
#pragma once

#include <cstddef>

namespace dynup_test {

/// Counts global operator new calls (every form) made by this thread while it is alive.
/// Not nestable; one per thread at a time.
class AllocationCount {
public:
  AllocationCount();
  ~AllocationCount();
  AllocationCount(const AllocationCount&) = delete;
  AllocationCount& operator=(const AllocationCount&) = delete;
  /// Allocations so far.
  std::size_t value() const;
};

} // namespace dynup_test
