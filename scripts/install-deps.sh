#!/usr/bin/env bash
# Installs the Debian 12 packages dynup needs to build, test, benchmark and run its
# demo. Installs only what is missing; safe to run again. Needs root (or sudo).
set -euo pipefail

packages=(
  g++ cmake make pkg-config git ca-certificates
  nlohmann-json3-dev libcpp-httplib-dev # dependencies of the library
  libcurl4-openssl-dev                  # the runtime's non-blocking HTTP client (libcurl multi; docs/HTTP.md)
  doctest-dev libbenchmark-dev          # tests and benchmarks
  nginx                                 # real nginx 1.22: the policies are checked against it
  nginx-dev                             # nginx's configure tree and headers: the native module builds against them
  etcd-server                           # real etcd 3.4: the etcd source is tested against it
  libnginx-mod-http-lua lua-resty-core  # OpenResty's lua module for nginx 1.22: the Lua binding's e2e test
  luajit2                               # OpenResty's LuaJIT (not `luajit`, which conflicts): the Lua tests
  wrk                                   # HTTP load generator for the load tests
  curl                                  # the demo and bench scripts talk to admin and status endpoints
  lua-cjson                             # the article's approach in bench/lua_compare.sh decodes with cjson
  valgrind                              # the nginx module's leak check (e2e) and the instruction counts in bench/
  clang libclang-rt-dev                 # libFuzzer targets (fuzz/); the runtimes are only a Recommends of clang
  python3                               # bench/figures.py: the generated figures table in docs/PERFORMANCE.md
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "install-deps: need root to install: ${missing[*]}" >&2; exit 1; }
  sudo="sudo"
fi
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# Packaged services (nginx, etcd) must not start on install: tests start their own servers
# on free loopback ports. policy-rc.d exit 101 is Debian's "do not start" answer.
policy=/usr/sbin/policy-rc.d
made_policy=""
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
  $sudo chmod +x "$policy"
  made_policy=1
fi
trap '[ -n "$made_policy" ] && $sudo rm -f "$policy"' EXIT
# A fresh machine may have no package lists yet: update once if the install fails.
if ! $sudo apt-get install -y --no-install-recommends "${missing[@]}"; then
  $sudo apt-get update
  $sudo apt-get install -y --no-install-recommends "${missing[@]}"
fi
