#!/usr/bin/env bash
# dynup-proxy's throughput and latency next to going straight to its backend, in one run.
#
#   bench/proxy_compare.sh [path/to/dynup-proxy]
#
# One backend: nginx (1 worker, `return 200`, keep-alive) on a free loopback port. Modes,
# interleaved, REPEAT times each, `wrk -t$THREADS -c$CONNECTIONS -d${DURATION}s --latency`
# after a WARMUP-second warm-up:
#   direct   wrk → the backend
#   proxy    wrk → dynup-proxy (file source holding that one backend, round_robin,
#            keep-alive pool to it) → the backend
# Prints one line per repetition and a Markdown table of medians: requests/s, p50 and p99
# latency, and the ratio to direct. Environment (defaults): DURATION=8, WARMUP=2,
# CONNECTIONS=16, THREADS=2, REPEAT=5, PROXY_THREADS=64 (dynup-proxy's "threads": one per
# client connection), NGINX=nginx, WRK=wrk, SUMMARY=file (also writes the table's figures
# there, one `mode metric value` line each: rps, p50_ms, p99_ms, failed; what
# bench/figures.sh reads). The proxy: the argument, else
# build/bench/examples/proxy/dynup-proxy, else build/dev/examples/proxy/dynup-proxy. Use a
# Release build:
#   cmake -S . -B build/bench -DCMAKE_BUILD_TYPE=Release -DDYNUP_BUILD_TESTS=OFF
#   cmake --build build/bench -j2 --target dynup-proxy
# Loopback only; every process it starts is stopped by its PID on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/children.sh

DURATION=${DURATION:-8}
WARMUP=${WARMUP:-2}
CONNECTIONS=${CONNECTIONS:-16}
THREADS=${THREADS:-2}
REPEAT=${REPEAT:-5}
PROXY_THREADS=${PROXY_THREADS:-64}
NGINX=${NGINX:-$(command -v nginx || echo /usr/sbin/nginx)}
WRK=${WRK:-$(command -v wrk || echo /usr/bin/wrk)}

die() { echo "proxy_compare: $*" >&2; exit 1; }
proxy_bin=${1:-}
if [ -z "$proxy_bin" ]; then
  for c in build/bench/examples/proxy/dynup-proxy build/dev/examples/proxy/dynup-proxy; do
    if [ -x "$c" ]; then proxy_bin=$c; break; fi
  done
fi
[ -n "$proxy_bin" ] && [ -x "$proxy_bin" ] || die "dynup-proxy not found: build it (see the header of this script)"
[ -x "$NGINX" ] || die "nginx not found: scripts/install-deps.sh installs it"
[ -x "$WRK" ] || die "wrk not found: scripts/install-deps.sh installs it"
command -v curl >/dev/null || die "curl not found: scripts/install-deps.sh installs it"
for v in DURATION WARMUP CONNECTIONS THREADS PROXY_THREADS; do
  [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer"
done
[[ "$REPEAT" =~ ^[1-9][0-9]*$ ]] || die "REPEAT must be a positive integer"

if [ -n "${SUMMARY:-}" ]; then : >"$SUMMARY" || die "cannot write SUMMARY=$SUMMARY"; fi
work=$(mktemp -d /tmp/dynup-proxy-compare.XXXXXX)
trap stop_children EXIT
trap 'exit 130' INT TERM

wait_200() {
  for _ in $(seq 1 250); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$1" || true)" = 200 ] && return 0
    sleep 0.02
  done
  return 1
}

# The backend nginx on a free port; another process may take it before nginx binds it,
# so a start that finds it taken picks another.
mkdir -p "$work/backend"
backend_up=0
for _ in 1 2 3 4 5; do
  backend_port=$(free_port)
  {
    [ "$(id -u)" -eq 0 ] && echo "user root;"
    echo "worker_processes 1; daemon off; pid $work/backend/nginx.pid; error_log $work/backend/error.log warn;"
    echo "events { worker_connections 4096; }"
    echo "http { access_log off; keepalive_requests 1000000;"
    for t in client_body proxy fastcgi uwsgi scgi; do echo "  ${t}_temp_path $work/backend/$t;"; done
    echo "  server { listen 127.0.0.1:$backend_port; location / { return 200 \"ok\n\"; } } }"
  } >"$work/backend/nginx.conf"
  rm -f "$work/backend/error.log"
  "$NGINX" -p "$work/backend/" -c "$work/backend/nginx.conf" </dev/null >"$work/backend/stdout.log" 2>&1 &
  children+=($!)
  if wait_200 "http://127.0.0.1:$backend_port/"; then
    backend_up=1
    break
  fi
  kill -TERM "${children[-1]}" 2>/dev/null || true
  wait "${children[-1]}" 2>/dev/null || true
  grep -qs "Address already in use" "$work/backend/error.log" "$work/backend/stdout.log" ||
    die "the backend nginx did not start: $(cat "$work/backend/error.log" "$work/backend/stdout.log" 2>/dev/null)"
done
[ "$backend_up" = 1 ] || die "the backend nginx did not start: every port tried was taken"

# dynup-proxy listens on port 0 and says which port it took.
echo "{\"peers\": [{\"id\": \"backend\", \"host\": \"127.0.0.1\", \"port\": $backend_port}]}" >"$work/peers.json"
cat >"$work/proxy.json" <<JSON
{"listen": "127.0.0.1:0", "threads": $PROXY_THREADS, "admin": false,
 "upstreams": [{"name": "bench", "source": "file://$work/peers.json"}]}
JSON
"$proxy_bin" --config "$work/proxy.json" 2>"$work/proxy.log" &
proxy_pid=$!
children+=($proxy_pid)
proxy_port=$(port_from_log "$work/proxy.log" 's/.*proxy listening on port \([0-9]*\) .*/\1/p' "$proxy_pid") ||
  die "dynup-proxy did not start: $(cat "$work/proxy.log")"
wait_200 "http://127.0.0.1:$proxy_port/" || die "dynup-proxy did not start: $(cat "$work/proxy.log")"

# wrk's latency lines are "50%  1.23ms"; in ms.
percentile() {
  awk -v p="$1" '$1 == p { v = $2; if (v ~ /us$/) { sub(/us$/, "", v); v /= 1000 } else if (v ~ /ms$/) { sub(/ms$/, "", v) } else if (v ~ /s$/) { sub(/s$/, "", v); v *= 1000 } print v }' "$2"
}
echo "proxy_compare: $($proxy_bin --version), wrk -t$THREADS -c$CONNECTIONS -d${DURATION}s --latency (warm-up ${WARMUP}s), $REPEAT repetition(s), $(nproc) CPU(s), load $(cut -d' ' -f1-3 /proc/loadavg)"
declare -A rps p50 p99 failed
for ((r = 1; r <= REPEAT; r++)); do
  for mode in direct proxy; do
    port=$backend_port
    [ "$mode" = proxy ] && port=$proxy_port
    url="http://127.0.0.1:$port/"
    "$WRK" -t"$THREADS" -c"$CONNECTIONS" -d"${WARMUP}s" "$url" >/dev/null 2>&1 || true
    out=$work/wrk-$mode-$r.txt
    "$WRK" -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency "$url" >"$out" 2>&1 || die "wrk failed: $(cat "$out")"
    kill -0 "$proxy_pid" 2>/dev/null || die "dynup-proxy died: $(tail -5 "$work/proxy.log")"
    v=$(awk '/^Requests\/sec:/ { print $2 }' "$out")
    bad=$(awk '/Non-2xx or 3xx responses:/ { n += $NF } /Socket errors:/ { gsub(/,/, ""); n += $4 + $6 + $8 + $10 } END { print n + 0 }' "$out")
    rps[$mode]+="$v "
    p50[$mode]+="$(percentile 50% "$out") "
    p99[$mode]+="$(percentile 99% "$out") "
    failed[$mode]=$((${failed[$mode]:-0} + bad))
    printf 'proxy_compare: repetition %d %-7s %10.2f requests/s  p50 %sms  p99 %sms  failed %d\n' "$r" "$mode" "$v" \
      "$(percentile 50% "$out")" "$(percentile 99% "$out")" "$bad"
  done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{ a[NR] = $1 } END { print (NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2) }'; }
d=$(median <<<"${rps[direct]}")
echo
echo "| mode | requests/s per repetition | median | ratio to direct | p50 ms | p99 ms | failed |"
echo "| --- | --- | --- | --- | --- | --- | --- |"
for mode in direct proxy; do
  m=$(median <<<"${rps[$mode]}")
  printf '| %s | %s | %.0f | %.3f | %s | %s | %d |\n' "$mode" "$(echo ${rps[$mode]} | awk '{ for (i = 1; i <= NF; i++) printf "%s%.0f", (i > 1 ? ", " : ""), $i }')" \
    "$m" "$(awk -v a="$m" -v b="$d" 'BEGIN { print a / b }')" "$(median <<<"${p50[$mode]}")" "$(median <<<"${p99[$mode]}")" "${failed[$mode]}"
  [ -z "${SUMMARY:-}" ] || printf '%s rps %s\n%s p50_ms %s\n%s p99_ms %s\n%s failed %d\n' "$mode" "$m" \
    "$mode" "$(median <<<"${p50[$mode]}")" "$mode" "$(median <<<"${p99[$mode]}")" "$mode" "${failed[$mode]}" >>"$SUMMARY"
done
