// dynup — dynamic upstreams without reloads.
// The one place the version lives; CMake reads it from here.
#pragma once

#define DYNUP_VERSION_MAJOR 0
#define DYNUP_VERSION_MINOR 1
#define DYNUP_VERSION_PATCH 0

#define DYNUP_STRINGIFY_DETAIL(x) #x
#define DYNUP_STRINGIFY(x) DYNUP_STRINGIFY_DETAIL(x)
#define DYNUP_VERSION_STRING                                                   \
  DYNUP_STRINGIFY(DYNUP_VERSION_MAJOR)                                         \
  "." DYNUP_STRINGIFY(DYNUP_VERSION_MINOR) "." DYNUP_STRINGIFY(DYNUP_VERSION_PATCH)

// Everything lives in a versioned inline namespace, so two dynup versions linked
// into one binary produce different symbols instead of silent ODR violations.
#define DYNUP_ABI_CONCAT_DETAIL(a, b, c) v##a##_##b##_##c
#define DYNUP_ABI_CONCAT(a, b, c) DYNUP_ABI_CONCAT_DETAIL(a, b, c)
#define DYNUP_ABI_NAMESPACE                                                    \
  DYNUP_ABI_CONCAT(DYNUP_VERSION_MAJOR, DYNUP_VERSION_MINOR, DYNUP_VERSION_PATCH)

#define DYNUP_NAMESPACE_BEGIN                                                  \
  namespace dynup {                                                            \
  inline namespace DYNUP_ABI_NAMESPACE {
#define DYNUP_NAMESPACE_END                                                    \
  }                                                                            \
  }

namespace dynup {
inline namespace DYNUP_ABI_NAMESPACE {
/// The library version as "major.minor.patch".
inline constexpr const char* version_string = DYNUP_VERSION_STRING;
} // namespace DYNUP_ABI_NAMESPACE
} // namespace dynup
