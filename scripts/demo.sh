#!/usr/bin/env bash
# The demo: three local backends behind dynup-proxy, whose upstream is a peer file (the
# embedded default source). The script sends traffic and draws who answered, then edits
# the file — a backend leaves, a weight changes, a broken edit, the backend returns — and
# traffic follows each edit with no restart. Then it keeps sending traffic every two
# seconds until Ctrl-C, so you can edit the file yourself.
#
#   scripts/demo.sh              the demo, until Ctrl-C
#   scripts/demo.sh --bounded    the scripted part only, then exit (0: every step went
#                                as shown; for scripts and CI)
#
# Loopback only; every process it starts is stopped by its PID on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
. scripts/children.sh

bounded=0
for a in "$@"; do
  case $a in
    --bounded) bounded=1 ;;
    -h | --help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "demo: unknown argument $a (try --help)" >&2; exit 2 ;;
  esac
done

scripts/install-deps.sh

build=${DYNUP_DEMO_BUILD:-$root/build/demo}
if [ -z "${DYNUP_DEMO_BUILD:-}" ]; then
  echo "==> building dynup-proxy and dynup-demo in $build (the first time takes a few minutes)"
  cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DDYNUP_BUILD_TESTS=OFF -DDYNUP_BUILD_BENCH=OFF >/dev/null
  cmake --build "$build" -j "$(nproc)" --target dynup-proxy dynup-demo >/dev/null
fi
proxy_bin=$build/examples/proxy/dynup-proxy
demo_bin=$build/examples/proxy/dynup-demo

work=$(mktemp -d /tmp/dynup-demo.XXXXXX)
peers=$work/peers.json
trap stop_children EXIT
trap 'echo; echo "==> stopping"; exit 0' INT TERM

bold=""
plain=""
if [ -t 1 ]; then bold=$'\e[1m'; plain=$'\e[0m'; fi
step() { printf '\n%s==> %s%s\n' "$bold" "$*" "$plain"; }
fail() { echo "demo: $*" >&2; exit 1; }

# Every listener takes a free port itself (port 0) and says which: nothing can take a
# port between choosing and binding it.
ports=()
for i in 1 2 3; do
  "$demo_bin" backend --port 0 --name "backend-$i" >"$work/backend-$i.log" 2>&1 &
  children+=($!)
  port=$(port_from_log "$work/backend-$i.log" 's/^listening on port \([0-9]*\)$/\1/p' "${children[-1]}") ||
    fail "backend-$i did not start: $(cat "$work/backend-$i.log")"
  ports+=("$port")
done

# Writes the peer file the way a deploy tool should: a temporary file renamed over it.
write_peers() {
  printf '%s\n' "$1" >"$peers.tmp"
  mv "$peers.tmp" "$peers"
}
peer() { printf '{"id": "backend-%s", "host": "127.0.0.1", "port": %s, "weight": %s}' "$1" "${ports[$(($1 - 1))]}" "$2"; }

write_peers "{\"peers\": [$(peer 1 1), $(peer 2 1), $(peer 3 1)]}"
cat >"$work/proxy.json" <<JSON
{
  "listen": "127.0.0.1:0",
  "admin": {"listen": "127.0.0.1:0"},
  "upstreams": [{"name": "demo", "source": "file://$peers", "policy": "round_robin"}]
}
JSON

"$proxy_bin" --config "$work/proxy.json" 2>"$work/proxy.log" &
children+=($!)
started=$(port_from_log "$work/proxy.log" \
  's/.*proxy listening on port \([0-9]*\) .*, admin on port \([0-9]*\) .*/\1 \2/p' "${children[-1]}") ||
  fail "dynup-proxy did not start: $(cat "$work/proxy.log")"
read -r proxy_port admin_port <<<"$started"
step "three backends on ports ${ports[*]}; dynup-proxy on $proxy_port with a file source"
echo "   peer file: $peers"
for _ in $(seq 1 100); do
  curl -fs "http://127.0.0.1:$admin_port/healthz" >/dev/null 2>&1 && break
  sleep 0.05
done
curl -fs "http://127.0.0.1:$admin_port/healthz" >/dev/null || fail "dynup-proxy did not start: $(cat "$work/proxy.log")"
proxy_pid=${children[-1]}

version() { curl -fs "http://127.0.0.1:$admin_port/upstreams/demo" | sed -n 's/^  "version": \([0-9]*\),$/\1/p'; }
# Waits until the upstream serves a version above $1 (the file watcher reads a change
# within milliseconds); prints how long it took.
wait_version_above() {
  local start=$(($(date +%s%N) / 1000000)) v
  for _ in $(seq 1 200); do
    v=$(version)
    if [ -n "$v" ] && [ "$v" -gt "$1" ]; then
      echo "   dynup-proxy serves version $v, $(($(date +%s%N) / 1000000 - start)) ms after the edit (same process, PID $proxy_pid)"
      return 0
    fi
    sleep 0.01
  done
  fail "the edit was not served within 2 s"
}
traffic() { "$demo_bin" hit "http://127.0.0.1:$proxy_port/" "$@"; }

step "300 requests, weights 1:1:1"
traffic 300 --only backend-1,backend-2,backend-3

step "edit: backend-3 leaves the file"
v=$(version)
write_peers "{\"peers\": [$(peer 1 1), $(peer 2 1)]}"
wait_version_above "$v"
traffic 300 --only backend-1,backend-2

step "edit: backend-1 weight 3"
v=$(version)
write_peers "{\"peers\": [$(peer 1 3), $(peer 2 1)]}"
wait_version_above "$v"
traffic 300 --only backend-1,backend-2

step "a broken edit (port 0, a misspelt key): the last good set keeps serving"
v=$(version)
printf '{"peers": [{"id": "backend-1", "host": "127.0.0.1", "port": 0, "wieght": 3}]}\n' >"$peers"
sleep 0.3
[ "$(version)" = "$v" ] || fail "a broken file changed the version"
grep -o 'upstream demo: .*' "$work/proxy.log" | tail -1 | sed 's/^/   proxy log: /'
traffic 300 --only backend-1,backend-2

step "edit: backend-3 comes back with weight 2"
write_peers "{\"peers\": [$(peer 1 1), $(peer 2 1), $(peer 3 2)]}"
wait_version_above "$v"
traffic 300 --only backend-1,backend-2,backend-3

step "what the admin API says (GET /upstreams/demo, GET /metrics)"
curl -fs "http://127.0.0.1:$admin_port/upstreams/demo" |
  sed -n 's/^      "\(id\|effective_weight\|reason\)": \(.*\)$/\1=\2/p' | paste -d' ' - - - | sed 's/,$//; s/^/   /'
curl -fs "http://127.0.0.1:$admin_port/metrics" | grep -E '^dynup_(picks_total|upstream_version|responses_total.*2xx)' | sed 's/^/   /'

if [ "$bounded" = 1 ]; then
  kill -TERM "$proxy_pid"
  wait "$proxy_pid" || fail "dynup-proxy did not exit cleanly on SIGTERM"
  step "done: every edit was served without a restart, and dynup-proxy drained and exited on SIGTERM"
  exit 0
fi

step "your turn: edit $peers (weights, ports ${ports[*]}); Ctrl-C to stop"
while :; do
  sleep 2
  printf '\n   %s, version %s\n' "$(date +%T)" "$(version)"
  traffic 100 || true
done
