#!/usr/bin/env bash
# The demo: dynup-watch on a file source (the embedded default) while this script
# changes the file live: an edit in place, an atomic rename over it, a broken file
# (the last good set is kept), the fix, and a delete-then-recreate. Each published
# version appears as one JSON line; errors appear on stderr. The script checks that
# every change it made was published and exits non-zero otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

scripts/install-deps.sh

build="$root/build/demo"
echo "==> building dynup-watch in $build"
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DDYNUP_BUILD_TESTS=OFF -DDYNUP_BUILD_BENCH=OFF >/dev/null
cmake --build "$build" -j "$(nproc)" --target dynup-watch >/dev/null

work=$(mktemp -d /tmp/dynup-demo.XXXXXX)
peers="$work/peers.json"
out="$work/stdout.jsonl"
err="$work/stderr.log"
watch_pid=""
cleanup() {
  if [ -n "$watch_pid" ] && kill -0 "$watch_pid" 2>/dev/null; then
    kill -TERM "$watch_pid" 2>/dev/null || true
    wait "$watch_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

cat >"$peers" <<'JSON'
{"peers": [
  {"id": "api-1", "host": "127.0.0.1", "port": 9001, "weight": 5, "zone": "a"},
  {"id": "api-2", "host": "127.0.0.1", "port": 9002, "weight": 1, "zone": "b"}
]}
JSON

# Shows each new stdout/stderr line of dynup-watch, waiting until `want` versions exist.
shown_out=0
shown_err=0
show_until() {
  local want=$1 deadline=$((SECONDS + 10))
  while :; do
    local have
    have=$(wc -l <"$out")
    if [ "$have" -ge "$want" ] || [ $SECONDS -ge $deadline ]; then break; fi
    sleep 0.05
  done
  sleep 0.1 # let a stderr line that belongs to this step arrive
  tail -n +$((shown_out + 1)) "$out" | sed 's/^/   stdout: /'
  tail -n +$((shown_err + 1)) "$err" | sed 's/^/   stderr: /'
  shown_out=$(wc -l <"$out")
  shown_err=$(wc -l <"$err")
  if [ "$shown_out" -lt "$want" ]; then
    echo "demo: expected $want published versions, saw $shown_out" >&2
    exit 1
  fi
}
step() { printf '\n==> %s\n' "$*"; }

step "start: dynup-watch file://$peers"
"$build/examples/watch/dynup-watch" "file://$peers" >"$out" 2>"$err" &
watch_pid=$!
show_until 1

step "edit in place: api-2 goes to weight 3 and a third peer joins"
cat >"$peers" <<'JSON'
{"peers": [
  {"id": "api-1", "host": "127.0.0.1", "port": 9001, "weight": 5, "zone": "a"},
  {"id": "api-2", "host": "127.0.0.1", "port": 9002, "weight": 3, "zone": "b"},
  {"id": "api-3", "host": "::1", "port": 9003, "zone": "b", "tags": ["canary"]}
]}
JSON
show_until 2

step "atomic replace (write a temp file, rename over): api-1 leaves"
cat >"$work/peers.json.new" <<'JSON'
{"peers": [
  {"id": "api-2", "host": "127.0.0.1", "port": 9002, "weight": 3, "zone": "b"},
  {"id": "api-3", "host": "::1", "port": 9003, "zone": "b", "tags": ["canary"]}
]}
JSON
mv "$work/peers.json.new" "$peers"
show_until 3

step "a broken edit: a misspelt key and port 0 (the last good set stays published)"
cat >"$peers" <<'JSON'
{"peers": [{"id": "api-2", "host": "127.0.0.1", "port": 0, "wieght": 3}]}
JSON
show_until 3

step "the fix"
cat >"$peers" <<'JSON'
{"peers": ["127.0.0.1:9002", "127.0.0.1:9004"]}
JSON
show_until 4

step "delete, then recreate"
rm "$peers"
sleep 0.3
show_until 4
echo '{"peers": ["127.0.0.1:9005"]}' >"$peers"
show_until 5

kill -TERM "$watch_pid"
wait "$watch_pid"
watch_pid=""
printf '\n==> done: 5 versions published, 2 bad states reported and survived; dynup-watch exited cleanly\n'
