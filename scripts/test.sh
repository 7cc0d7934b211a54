#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls this):
#   1. installs missing Debian packages,
#   2. builds everything with -Wall -Wextra -Werror and runs every CTest test
#      (unit, end-to-end, packaging, benchmark smoke run),
#   3. rebuilds the unit tests and the C ABI test under ASan+UBSan and under TSan and
#      runs them,
#   4. builds the libFuzzer targets with clang and runs each for $DYNUP_FUZZ_SECONDS
#      (default 15) on a copy of its corpus (docs/FUZZING.md).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

scripts/install-deps.sh

jobs=$(nproc)
started=$(date +%s)
stage() { printf '\n==> %s (%ds)\n' "$*" $(( $(date +%s) - started )); }

build="$root/build/test"
stage "build (RelWithDebInfo, -Werror) in $build"
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DDYNUP_WERROR=ON >/dev/null
cmake --build "$build" -j "$jobs"
stage "ctest: every test"
ctest --test-dir "$build" --output-on-failure -j "$jobs"

export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
export TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1
for san in address,undefined thread; do
  dir="$root/build/test-${san//,/-}"
  stage "unit and C ABI tests under -fsanitize=$san in $dir"
  cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=Debug -DDYNUP_SANITIZE="$san" -DDYNUP_WERROR=ON \
    -DDYNUP_BUILD_EXAMPLES=OFF -DDYNUP_BUILD_BENCH=OFF -DDYNUP_PACKAGE_TESTS=OFF >/dev/null
  cmake --build "$dir" -j "$jobs" --target dynup_unit_tests dynup_c_api_test
  ctest --test-dir "$dir" -L 'unit|capi' --output-on-failure
done

fuzz="$root/build/test-fuzz"
fuzz_seconds=${DYNUP_FUZZ_SECONDS:-15}
stage "fuzz targets (clang, libFuzzer), ${fuzz_seconds}s each, in $fuzz"
CC=clang CXX=clang++ cmake -S . -B "$fuzz" -DDYNUP_BUILD_FUZZ=ON \
  -DDYNUP_FUZZ_SECONDS="$fuzz_seconds" -DDYNUP_WERROR=ON -DDYNUP_BUILD_TESTS=OFF -DDYNUP_BUILD_EXAMPLES=OFF \
  -DDYNUP_BUILD_BENCH=OFF -DDYNUP_BUILD_C_API=OFF -DDYNUP_INSTALL=OFF >/dev/null
cmake --build "$fuzz" -j "$jobs"
ctest --test-dir "$fuzz" -L fuzz --output-on-failure -j "$jobs"
stage "all tests passed"
