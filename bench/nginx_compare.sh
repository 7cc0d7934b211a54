#!/usr/bin/env bash
# Requests/s through one nginx with different ways of choosing the upstream peer,
# measured side by side in one run (issues 6 and 7):
#
#   static   a plain `upstream` block listing the peers (nginx's round robin)
#   module   the native module (examples/nginx): `dynup file://… policy=round_robin`
#   reload   the static upstream, its config rewritten and nginx reloaded (SIGHUP to the
#            master) every RELOAD_EVERY seconds while wrk runs: odd reloads drop the last
#            peer, even ones add it back (with PEERS=1: its weight goes 1 ↔ 2). What
#            reloading costs: failed requests and p99 next to the other modes'
#   dynup    balancer_by_lua + resty.dynup (examples/lua) on a file source, round_robin:
#            balance() in balancer_by_lua and report() in log_by_lua, the module kept in
#            a global made in init_by_lua, as its README recommends
#   article  the approach of the article in seed/: the peer list stored once as a JSON
#            string in a lua_shared_dict (init_by_lua), then on EVERY request
#            balancer_by_lua does shared_dict:get + cjson.decode of the whole list +
#            math.random choice
#   lua_rr   a reference, not a way to run an upstream: the least any balancer_by_lua
#            costs, a round robin over a Lua table of the peers and set_current_peer
#
# The proxy configs are the same but for the upstream block (and, for dynup, its
# init_worker_by_lua and log_by_lua): WORKERS workers, `reuseport`, keepalive 32 to the
# backends, HTTP/1.1 upstream with the Connection header cleared, access log off. Every
# mode loads the same modules: the Lua ones if a Lua mode (dynup, article, lua_rr) is in
# MODES, dynup's if module is, so static and the others run the same nginx.
# The 3 backends are a separate nginx (own prefix, own workers) answering `return 200`
# with a 2-byte body on 3 loopback ports, so they never share a worker with the proxy.
#
# Each measurement starts a fresh proxy, warms it up (WARMUP seconds of the same load),
# then runs `wrk -t$THREADS -c$CONNECTIONS -d$DURATION --latency`. Modes are interleaved
# (static, module, reload, static, …) REPEAT times to spread the machine's noise evenly.
# Prints, per mode, requests/s per repetition, their median and its ratio to static's,
# the median of wrk's p99 latency, the proxy's CPU time (user + system, master and
# workers, exited ones included) per request with its ratio to static's: CPU per request
# moves far less than requests/s when other processes load the machine; and the failed
# requests (wrk's non-2xx/3xx responses and socket errors). Exits non-zero if any mode
# but reload failed a request: reload's failures are its measurement. Builds nothing.
#
# Usage:
#   bench/nginx_compare.sh [path/to/libdynup_c.so] [path/to/ngx_http_upstream_dynup_module.so]
# in either order (a file named *_module.so is the module). The library (for dynup): the
# argument, else $DYNUP_C_LIB, else build/bench/src/c/libdynup_c.so, else the newest
# build/*/src/c/libdynup_c.so. The module (for module): the argument, else
# $DYNUP_NGINX_MODULE, else build/bench/nginx-module/ngx_http_upstream_dynup_module.so,
# else the newest build/*/examples/nginx/ngx_http_upstream_dynup_module.so. Use Release
# builds (the module runs the library it was built against), e.g.
#   cmake -S . -B build/bench -DCMAKE_BUILD_TYPE=Release -DDYNUP_BUILD_TESTS=OFF -DDYNUP_BUILD_EXAMPLES=OFF
#   cmake --build build/bench -j2 --target dynup_c
#   examples/nginx/build.sh build/bench/nginx-module include build/bench/src/c   # needs nginx-dev
# Environment (defaults): MODES="static module reload", WORKERS=2 (the proxy's),
# DURATION=10 (seconds), WARMUP=2, CONNECTIONS=32, THREADS=2, REPEAT=3, RELOAD_EVERY=1
# (seconds), PEERS=3 (the upstream's peers, peer i on backend i mod 3: the article
# decodes them all on every request), BACKEND_WORKERS=1, NGINX=nginx, WRK=wrk,
# NGINX_MODULES (nginx -V's --modules-path), DYNUP_LUA_DIR (the directory holding
# resty/dynup.lua: examples/lua/lib), KEEP_DIR=1 keeps the work directory (configs,
# logs, wrk outputs), SUMMARY=file also writes the figures there, one `mode metric value`
# line each (metrics rps, p99_ms, cpu_us, failed, requests: the table's medians and sums;
# instructions with INSTRUCTIONS=1): what bench/figures.sh reads.
# PIN=1 (2+ CPUs, WORKERS=1): the proxy's worker on CPU 0 (worker_cpu_affinity), the
# backends and wrk on CPU 1 (worker_cpu_affinity, taskset), so that the proxy's CPU is
# its own and the modes are compared on the CPU they use rather than through the noise
# of three programs sharing two CPUs. Requests/s still depend on which CPU saturates
# first: on 2 CPUs wrk and the backends can need as much CPU as the proxy, and then the
# modes' requests/s converge. The proxy's CPU per request is its own either way.
# INSTRUCTIONS=1 (needs valgrind) adds a pass that counts, under callgrind, the
# user-space instructions one request costs a single-process proxy in each mode but
# reload (IDURATION=5 seconds of wrk -t1 -c4): a figure the machine's load does not move.
# REPEAT=0 INSTRUCTIONS=1 runs that pass alone.
# Needs nginx, wrk and curl; the Lua modes need libnginx-mod-http-lua and lua-resty-core
# (article: lua-cjson too), module needs the module (nginx-dev to build it). Loopback
# only; every nginx it starts is stopped by PID on exit. With the defaults a run takes
# about 2 minutes.
set -euo pipefail

DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
CONNECTIONS=${CONNECTIONS:-32}
THREADS=${THREADS:-2}
REPEAT=${REPEAT:-3}
MODES=${MODES:-static module reload}
WORKERS=${WORKERS:-2}
RELOAD_EVERY=${RELOAD_EVERY:-1}
BACKEND_WORKERS=${BACKEND_WORKERS:-1}
PEERS=${PEERS:-3}
INSTRUCTIONS=${INSTRUCTIONS:-0}
IDURATION=${IDURATION:-5}
NGINX=${NGINX:-$(command -v nginx || echo /usr/sbin/nginx)}
WRK=${WRK:-$(command -v wrk || echo /usr/bin/wrk)}

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
lua_dir=${DYNUP_LUA_DIR:-$root/examples/lua/lib} # holds resty/dynup.lua

die() {
  echo "nginx_compare: $*" >&2
  exit 1
}

wants() { # is mode $1 in MODES?
  case " $MODES " in *" $1 "*) return 0 ;; *) return 1 ;; esac
}

# --- what it needs ---------------------------------------------------------------------
lib=${DYNUP_C_LIB:-}
module=${DYNUP_NGINX_MODULE:-}
for a in "$@"; do
  case $(basename "$a") in
    *_module.so) module=$a ;;
    *) lib=$a ;;
  esac
done
for mode in $MODES; do
  case $mode in static | module | reload | dynup | article | lua_rr) ;; *) die "unknown mode $mode" ;; esac
done
[[ "$PEERS" =~ ^[1-9][0-9]*$ ]] || die "PEERS must be a positive integer"
[[ "$WORKERS" =~ ^[1-9][0-9]*$ ]] || die "WORKERS must be a positive integer"
PIN=${PIN:-0}
if [ "$PIN" = 1 ]; then
  [ "$WORKERS" = 1 ] || die "PIN=1 needs WORKERS=1 (one CPU for the proxy, one for wrk and the backends)"
  [ "$(nproc)" -ge 2 ] || die "PIN=1 needs 2 CPUs"
  command -v taskset >/dev/null || die "PIN=1 needs taskset (util-linux)"
fi
[[ "$RELOAD_EVERY" =~ ^[0-9]*\.?[0-9]+$ ]] && awk -v r="$RELOAD_EVERY" 'BEGIN { exit !(r >= 0.1) }' ||
  die "RELOAD_EVERY must be a number of seconds, at least 0.1"
[ -x "$NGINX" ] || die "nginx not found (\$NGINX=$NGINX): scripts/install-deps.sh installs it"
[ -x "$WRK" ] || die "wrk not found (\$WRK=$WRK): scripts/install-deps.sh installs it"
command -v curl >/dev/null || die "curl not found: apt-get install curl"

if wants dynup; then
  if [ -z "$lib" ]; then
    if [ -f "$root/build/bench/src/c/libdynup_c.so" ]; then
      lib=$root/build/bench/src/c/libdynup_c.so
    else
      lib=$(ls -t "$root"/build/*/src/c/libdynup_c.so 2>/dev/null | head -n1 || true)
    fi
  fi
  [ -n "$lib" ] && [ -f "$lib" ] || die "libdynup_c.so not found: pass its path (a Release build of target dynup_c)"
  lib=$(cd "$(dirname "$lib")" && pwd)/$(basename "$lib")
fi
if wants module; then
  if [ -z "$module" ]; then
    if [ -f "$root/build/bench/nginx-module/ngx_http_upstream_dynup_module.so" ]; then
      module=$root/build/bench/nginx-module/ngx_http_upstream_dynup_module.so
    else
      module=$(ls -t "$root"/build/*/examples/nginx/ngx_http_upstream_dynup_module.so 2>/dev/null | head -n1 || true)
    fi
  fi
  [ -n "$module" ] && [ -f "$module" ] ||
    die "ngx_http_upstream_dynup_module.so not found: pass its path (examples/nginx/build.sh builds it)"
  module=$(cd "$(dirname "$module")" && pwd)/$(basename "$module")
fi

lua=0 # the Lua modules are loaded in every mode if a Lua mode is measured
if wants dynup || wants article || wants lua_rr; then lua=1; fi
modules=${NGINX_MODULES:-$("$NGINX" -V 2>&1 | sed -n 's/.*--modules-path=\([^ ]*\).*/\1/p')}
modules=${modules:-/usr/lib/nginx/modules}
resty_core=""
cjson_dir=""
if [ "$lua" = 1 ]; then
  for m in ndk_http_module.so ngx_http_lua_module.so; do
    [ -f "$modules/$m" ] || die "$modules/$m missing: install libnginx-mod-http-lua (or set NGINX_MODULES)"
  done
  for d in /usr/share/lua/5.1 /usr/local/share/lua/5.1 /usr/local/openresty/lualib; do
    if [ -f "$d/resty/core.lua" ]; then resty_core=$d; break; fi
  done
  [ -n "$resty_core" ] || die "lua-resty-core not found: install lua-resty-core"
  for d in /usr/lib/x86_64-linux-gnu/lua/5.1 /usr/lib/aarch64-linux-gnu/lua/5.1 /usr/local/lib/lua/5.1 \
    /usr/lib/lua/5.1 /usr/local/openresty/lualib; do
    if [ -f "$d/cjson.so" ]; then cjson_dir=$d; break; fi
  done
  [ -f "$lua_dir/resty/dynup.lua" ] || die "$lua_dir/resty/dynup.lua not found (\$DYNUP_LUA_DIR)"
fi
if [ "$INSTRUCTIONS" = 1 ]; then
  command -v valgrind >/dev/null && command -v callgrind_control >/dev/null ||
    die "INSTRUCTIONS=1 needs valgrind (apt-get install valgrind)"
fi
if wants article; then
  [ -n "$cjson_dir" ] || die "cjson.so not found (the article's mode needs it): apt-get install lua-cjson"
fi

if [ -n "${SUMMARY:-}" ]; then : >"$SUMMARY" || die "cannot write SUMMARY=$SUMMARY"; fi
work=$(mktemp -d /tmp/dynup-nginx-compare.XXXXXX)
# module's shared.dir: a tmpfs, as dynup's default /dev/shm (/tmp may be a disk, whose
# writeback of the mapped region would be measured too); a directory of this run's.
shm_dir=$work
if wants module && [ -d /dev/shm ] && [ -w /dev/shm ]; then shm_dir=$(mktemp -d /dev/shm/dynup-nginx-compare.XXXXXX); fi
pids=() # masters we started, stopped on exit
wrk_pid=""
reloader_pid=""

# wrk in the background and waited for, so that a signal stops the run at once.
run_wrk() {
  local out=$1
  shift
  if [ "$PIN" = 1 ]; then
    taskset -c 1 "$WRK" "$@" >"$out" 2>&1 &
  else
    "$WRK" "$@" >"$out" 2>&1 &
  fi
  wrk_pid=$!
  local rc=0
  wait "$wrk_pid" || rc=$?
  wrk_pid=""
  return "$rc"
}

# Running, as opposed to gone or exited and not yet reaped (a zombie: kill -0 works on it).
running() {
  local state
  state=$(awk '{ print $3 }' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "$state" != Z ]
}

# SIGTERM to the master (our child), SIGKILL after 3 s, then reaped and forgotten (its
# PID may be reused from then on); its workers too (children by PID) if they outlive it.
# Never by name.
stop_nginx() {
  local pid=$1 kids i k rest=()
  if running "$pid"; then
    kids=$(ps -o pid= --ppid "$pid" 2>/dev/null || true)
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 300); do
      running "$pid" || break
      sleep 0.01
    done
    if running "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
    for k in $kids; do
      if [ -r "/proc/$k/cmdline" ] &&
        [ "$( (tr -d '\0' <"/proc/$k/cmdline") 2>/dev/null | cut -c1-21)" = "nginx: worker process" ]; then
        kill -KILL "$k" 2>/dev/null || true
      fi
    done
  fi
  wait "$pid" 2>/dev/null || true
  for k in "${pids[@]}"; do [ "$k" = "$pid" ] || rest+=("$k"); done
  pids=("${rest[@]}")
}

cleanup() {
  local p
  if [ -n "$wrk_pid" ]; then kill -TERM "$wrk_pid" 2>/dev/null || true; fi
  if [ -n "$reloader_pid" ]; then kill -TERM "$reloader_pid" 2>/dev/null || true; fi
  for p in "${pids[@]}"; do stop_nginx "$p"; done
  if [ "${KEEP_DIR:-0}" = 1 ]; then
    echo "nginx_compare: kept $work$([ "$shm_dir" = "$work" ] || echo " and $shm_dir")" >&2
  else
    rm -rf "$work" "$shm_dir"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# free_port: a loopback port nothing listens on now (nginx retries its start if one is
# taken since).
. "$root/scripts/children.sh"

# Starts nginx on prefix $1 (nginx.conf in it) in the foreground as our child; echoes the
# master PID once `curl $2` answers 200, or fails.
start_nginx() {
  local prefix=$1 url=$2 pid i
  "${launcher[@]}" "$NGINX" -p "$prefix/" -c "$prefix/nginx.conf" -e "$prefix/error.log" -g "$nginx_globals" \
    </dev/null >>"$prefix/stdout.log" 2>&1 &
  pid=$!
  pids+=("$pid")
  for i in $(seq 1 $((${#launcher[@]} > 0 ? 3000 : 500))); do
    if ! running "$pid"; then return 1; fi
    if [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$url" || true)" = 200 ]; then
      started_pid=$pid
      return 0
    fi
    sleep 0.02
  done
  return 1
}

user_line=""
[ "$(id -u)" -eq 0 ] && user_line="user root;" # workers of a root master would run as nobody
launcher=()              # what runs nginx: nothing, or valgrind for the instruction counts
nginx_globals="daemon off;"
proxy_workers=$WORKERS

# --- backends: one nginx, 3 ports -----------------------------------------------------------
backend_ports=()
bdir=$work/backends
mkdir -p "$bdir"
for _ in 1 2 3 4 5; do
  backend_ports=("$(free_port)" "$(free_port)" "$(free_port)")
  [ "${backend_ports[0]}" != "${backend_ports[1]}" ] && [ "${backend_ports[1]}" != "${backend_ports[2]}" ] &&
    [ "${backend_ports[0]}" != "${backend_ports[2]}" ] || continue
  {
    echo "$user_line"
    echo "worker_processes $BACKEND_WORKERS;"
    [ "$PIN" = 1 ] && echo "worker_cpu_affinity $(for ((w = 0; w < BACKEND_WORKERS; w++)); do printf '10 '; done);"
    echo "pid $bdir/nginx.pid;"
    echo "error_log $bdir/error.log warn;"
    echo "events { worker_connections 4096; }"
    echo "http {"
    echo "  access_log off;"
    echo "  keepalive_requests 1000000;"
    echo "  default_type text/plain;"
    for t in client_body proxy fastcgi uwsgi scgi; do echo "  ${t}_temp_path $bdir/$t;"; done
    for i in 0 1 2; do
      echo "  server { listen 127.0.0.1:${backend_ports[$i]} reuseport; location / { return 200 \"$i\n\"; } }"
    done
    echo "}"
  } >"$bdir/nginx.conf"
  started_pid=""
  if start_nginx "$bdir" "http://127.0.0.1:${backend_ports[2]}/"; then break; fi
  [ -n "${pids[*]}" ] && stop_nginx "${pids[-1]}"
  grep -q "Address already in use" "$bdir/error.log" "$bdir/stdout.log" 2>/dev/null ||
    die "backend nginx did not start: $(cat "$bdir/error.log" "$bdir/stdout.log" 2>/dev/null)"
  rm -f "$bdir/error.log"
done
[ -n "$started_pid" ] || die "backend nginx did not start"
backend_pid=$started_pid

# The upstream's PEERS peers, in every mode: peer i is backend i mod 3 (ids b0, b1, …).
peer_ports=()
for ((i = 0; i < PEERS; i++)); do peer_ports+=("${backend_ports[$((i % 3))]}"); done
peers_json="{\"peers\":["
article_json="["
for ((i = 0; i < PEERS; i++)); do
  sep=$([ "$i" -gt 0 ] && echo "," || true)
  peers_json+="$sep{\"id\":\"b$i\",\"host\":\"127.0.0.1\",\"port\":${peer_ports[$i]}}"
  article_json+="$sep{\"ip\":\"127.0.0.1\",\"port\":${peer_ports[$i]}}"
done
peers_json+="]}"
article_json+="]"

# --- the proxy under test -------------------------------------------------------------------
# Everything but the upstream block is the same in every mode. $4, for reload: which of
# the two configs it alternates between (0: the static one).
proxy_config() {
  local mode=$1 dir=$2 port=$3 variant=${4:-0} i
  if [ "$lua" = 1 ]; then
    echo "load_module $modules/ndk_http_module.so;"
    echo "load_module $modules/ngx_http_lua_module.so;"
  fi
  [ -n "$module" ] && echo "load_module $module;"
  echo "$user_line"
  echo "worker_processes $proxy_workers;"
  [ "$PIN" = 1 ] && echo "worker_cpu_affinity 01;"
  echo "pid $dir/nginx.pid;"
  echo "error_log $dir/error.log warn;"
  echo "events { worker_connections 4096; }"
  echo "http {"
  echo "  access_log off;"
  echo "  keepalive_requests 1000000;"
  echo "  default_type text/plain;"
  for t in client_body proxy fastcgi uwsgi scgi; do echo "  ${t}_temp_path $dir/$t;"; done
  if [ "$lua" = 1 ]; then
    echo "  lua_package_path \"$lua_dir/?.lua;$resty_core/?.lua;;\";"
    [ -n "$cjson_dir" ] && echo "  lua_package_cpath \"$cjson_dir/?.so;;\";"
  fi
  case $mode in
    static | reload)
      # reload's variant 1: a peer gone from the registry (with one peer: its weight changed).
      echo "  upstream backend {"
      for ((i = 0; i < PEERS; i++)); do
        if [ "$variant" = 1 ] && [ "$PEERS" -gt 1 ] && [ "$i" = $((PEERS - 1)) ]; then continue; fi
        echo "    server 127.0.0.1:${peer_ports[$i]}$([ "$variant" = 1 ] && [ "$PEERS" = 1 ] && echo " weight=2" || true);"
      done
      echo "    keepalive 32;"
      echo "  }"
      ;;
    module)
      echo "  upstream backend {"
      echo "    dynup file://$dir/peers.json policy=round_robin shared.dir=$shm_dir;"
      echo "    keepalive 32;"
      echo "  }"
      ;;
    dynup)
      echo "  init_by_lua_block { dynup = require \"resty.dynup\" }"
      echo "  init_worker_by_lua_block {"
      echo "    local up, err = dynup.new({name = \"backend\", source = \"file://$dir/peers.json\","
      echo "                                                policy = \"round_robin\"}, {lib = \"$lib\"})"
      echo "    if not up then ngx.log(ngx.ERR, \"dynup: \", err) end"
      echo "  }"
      echo "  upstream backend {"
      echo "    server 0.0.0.1;"
      echo "    balancer_by_lua_block { dynup.get(\"backend\"):balance() }"
      echo "    keepalive 32;"
      echo "  }"
      ;;
    article)
      # The article's upstreams.lua, inlined: update_upstreams stores cjson.encode of the
      # list in the shared dict once (no Consul here); get_upstreams decodes it per request.
      echo "  lua_shared_dict upstream_list 10m;"
      echo "  init_by_lua_block {"
      echo "    local cjson = require \"cjson\""
      echo "    local f = assert(io.open(\"$dir/article.json\"))"
      echo "    local list = cjson.decode(f:read(\"*a\"))"
      echo "    f:close()"
      echo "    ngx.shared.upstream_list:set(\"backend\", cjson.encode(list))"
      echo "  }"
      echo "  upstream backend {"
      echo "    server 0.0.0.1;"
      echo "    balancer_by_lua_block {"
      echo "      local balancer = require \"ngx.balancer\""
      echo "      local cjson = require \"cjson\""
      echo "      local tmp_upstreams = cjson.decode(ngx.shared.upstream_list:get(\"backend\"))"
      echo "      local ip_port = tmp_upstreams[math.random(1, table.getn(tmp_upstreams))]"
      echo "      balancer.set_current_peer(ip_port.ip, ip_port.port)"
      echo "    }"
      echo "    keepalive 32;"
      echo "  }"
      ;;
    lua_rr)
      # Not a way to run an upstream: the least any balancer_by_lua costs (the phase
      # handler and set_current_peer), a round robin over a Lua table of the 3 peers.
      echo "  init_worker_by_lua_block {"
      echo "    LUA_RR_PEERS, LUA_RR_NEXT = {$(printf '{"127.0.0.1", %s}, ' "${peer_ports[@]}")}, 0"
      echo "  }"
      echo "  upstream backend {"
      echo "    server 0.0.0.1;"
      echo "    balancer_by_lua_block {"
      echo "      LUA_RR_NEXT = LUA_RR_NEXT % #LUA_RR_PEERS + 1"
      echo "      local p = LUA_RR_PEERS[LUA_RR_NEXT]"
      echo "      require(\"ngx.balancer\").set_current_peer(p[1], p[2])"
      echo "    }"
      echo "    keepalive 32;"
      echo "  }"
      ;;
    *) die "unknown mode $mode" ;;
  esac
  echo "  server {"
  echo "    listen 127.0.0.1:$port reuseport;"
  echo "    location / {"
  echo "      proxy_pass http://backend;"
  echo "      proxy_http_version 1.1;"
  echo "      proxy_set_header Connection \"\";"
  [ "$mode" = dynup ] && echo "      log_by_lua_block { dynup.get(\"backend\"):report() }"
  echo "    }"
  echo "  }"
  echo "}"
}

# Starts the proxy for $1 in a new directory; sets proxy_pid, proxy_port, proxy_dir.
start_proxy() {
  local mode=$1 n=$2
  proxy_dir=$work/$mode.$n
  mkdir -p "$proxy_dir"
  printf '%s\n' "$peers_json" >"$proxy_dir/peers.json"
  printf '%s\n' "$article_json" >"$proxy_dir/article.json"
  for _ in 1 2 3 4 5; do
    proxy_port=$(free_port)
    proxy_config "$mode" "$proxy_dir" "$proxy_port" >"$proxy_dir/nginx.conf"
    started_pid=""
    if start_nginx "$proxy_dir" "http://127.0.0.1:$proxy_port/"; then
      proxy_pid=$started_pid
      return 0
    fi
    stop_nginx "${pids[-1]}"
    grep -q "Address already in use" "$proxy_dir/error.log" "$proxy_dir/stdout.log" 2>/dev/null || break
    rm -f "$proxy_dir/error.log"
  done
  die "proxy ($mode) did not start: $(cat "$proxy_dir/error.log" "$proxy_dir/stdout.log" 2>/dev/null)"
}

# wrk's latency ("1.23ms", "950.00us", "1.01s") in ms.
to_ms() {
  awk -v v="$1" 'BEGIN {
    n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
    if (u == "us") n /= 1000; else if (u == "s") n *= 1000; else if (u == "m") n *= 60000
    printf "%.3f", n }'
}

median() { # of the numbers given as arguments
  printf '%s\n' "$@" | sort -g | awk '{ a[NR] = $1 } END {
    if (NR == 0) { print "nan"; exit }
    if (NR % 2) printf "%.2f", a[(NR + 1) / 2]; else printf "%.2f", (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}

# CPU time (user + system, in clock ticks) the proxy has used so far: its master and
# workers, and the workers that exited and were reaped (the master's cutime, cstime: a
# reload replaces them all). Divided by the requests of a run, what one request costs the
# proxy, whatever else the machine was doing (throughput alone moves with the load of
# other processes). A worker reaped between the two reads is missed: rare, and small.
clk_tck=$(getconf CLK_TCK)
proxy_ticks() {
  local master=$1 t w
  t=$(awk '{ print $14 + $15 + $16 + $17 }' "/proc/$master/stat")
  for w in $(ps -o pid= --ppid "$master"); do
    t=$((t + $(awk '{ print $14 + $15 }' "/proc/$w/stat" 2>/dev/null || echo 0)))
  done
  echo "$t"
}

# reload's changes, in the background while wrk runs: every RELOAD_EVERY seconds the
# config alternates between the static one and the one without the last peer, written
# beside nginx.conf and renamed over it, and the master gets SIGHUP. At most
# DURATION / RELOAD_EVERY of them; each is a line in $proxy_dir/reloads.
reloader() {
  local max i
  max=$(awk -v d="$DURATION" -v r="$RELOAD_EVERY" 'BEGIN { printf "%d", d / r }')
  for ((i = 1; i <= max; i++)); do
    sleep "$RELOAD_EVERY"
    proxy_config reload "$proxy_dir" "$proxy_port" $((i % 2)) >"$proxy_dir/nginx.conf.next"
    mv -f "$proxy_dir/nginx.conf.next" "$proxy_dir/nginx.conf"
    kill -HUP "$proxy_pid" || return 0
    echo "$i" >>"$proxy_dir/reloads"
  done
}

declare -A rps p99 errors requests cpu
echo "nginx_compare: nginx $("$NGINX" -v 2>&1 | sed 's/.*nginx\///'), $proxy_workers proxy worker(s)," \
  "$BACKEND_WORKERS backend worker(s), wrk -t$THREADS -c$CONNECTIONS -d${DURATION}s --latency" \
  "(warm-up ${WARMUP}s), $REPEAT repetition(s), $PEERS peer(s), $(nproc) CPU(s), load average $(cut -d' ' -f1-3 /proc/loadavg)"
[ -n "$lib" ] && echo "nginx_compare: library $lib"
[ -n "$module" ] && echo "nginx_compare: module $module"
wants reload && echo "nginx_compare: reload every ${RELOAD_EVERY}s"
echo "nginx_compare: backends on 127.0.0.1:${backend_ports[*]} (nginx PID $backend_pid)"

for rep in $(seq 1 "$REPEAT"); do
  for mode in $MODES; do
    start_proxy "$mode" "$rep"
    url="http://127.0.0.1:$proxy_port/"
    if [ "$WARMUP" != 0 ]; then
      run_wrk "$proxy_dir/warmup.txt" -t"$THREADS" -c"$CONNECTIONS" -d"${WARMUP}s" "$url" || true
    fi
    out=$proxy_dir/wrk.txt
    workers0=$(ps -o pid= --ppid "$proxy_pid" | sort)
    cpu0=$(proxy_ticks "$proxy_pid")
    if [ "$mode" = reload ]; then
      : >"$proxy_dir/reloads"
      reloader &
      reloader_pid=$!
    fi
    wrk_rc=0
    run_wrk "$out" -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency "$url" || wrk_rc=$?
    reloads=""
    if [ -n "$reloader_pid" ]; then
      kill -TERM "$reloader_pid" 2>/dev/null || true
      wait "$reloader_pid" 2>/dev/null || true
      reloader_pid=""
      reloads=$(wc -l <"$proxy_dir/reloads")
      # Each reload replaces the workers: if none was replaced, none took effect.
      if [ "$reloads" -gt 0 ] && [ -z "$(comm -13 <(echo "$workers0") <(ps -o pid= --ppid "$proxy_pid" | sort))" ]; then
        sleep 1 # the last one may still be starting its workers
        [ -n "$(comm -13 <(echo "$workers0") <(ps -o pid= --ppid "$proxy_pid" | sort))" ] ||
          die "reload: $reloads SIGHUP(s) sent, no new worker: $(grep -v '\[notice\]' "$proxy_dir/error.log" | tail -n5)"
      fi
    fi
    # reload's failures are its measurement; any other mode's wrk must succeed.
    [ "$wrk_rc" -eq 0 ] || [ "$mode" = reload ] || die "wrk failed ($mode, repetition $rep): $(cat "$out")"
    cpu1=$(proxy_ticks "$proxy_pid")
    n=$(awk '/ requests in / { print $1 }' "$out")
    us=$(awk -v t=$((cpu1 - cpu0)) -v hz="$clk_tck" -v n="${n:-0}" 'BEGIN { if (n > 0) printf "%.2f", t * 1e6 / hz / n; else print "nan" }')
    cpu[$mode]+="$us "
    r=$(awk '/^Requests\/sec:/ { print $2 }' "$out")
    l=$(awk '$1 == "99%" { print $2 }' "$out")
    non2xx=$(awk '/Non-2xx or 3xx responses:/ { print $NF }' "$out")
    sock=$(awk '/Socket errors:/ { gsub(/,/, ""); print $4 + $6 + $8 + $10 }' "$out")
    sock_detail=$(awk '/Socket errors:/ { gsub(/,/, ""); printf "; connect %d, read %d, write %d, timeout %d", $4, $6, $8, $10 }' "$out")
    [ -n "$r" ] || die "no Requests/sec in wrk's output ($mode, repetition $rep): $(cat "$out")"
    rps[$mode]+="$r "
    p99[$mode]+="$(to_ms "${l:-0}") "
    errors[$mode]=$((${errors[$mode]:-0} + ${non2xx:-0} + ${sock:-0}))
    requests[$mode]=$((${requests[$mode]:-0} + ${n:-0}))
    printf 'nginx_compare: repetition %d %-8s %10.2f requests/s  p99 %-8s proxy CPU %s us/request  (proxy PID %s, %d failed of %d: non-2xx/3xx %d%s%s)\n' \
      "$rep" "$mode" "$r" "${l:-?}" "$us" "$proxy_pid" "$((${non2xx:-0} + ${sock:-0}))" "${n:-0}" "${non2xx:-0}" "$sock_detail" \
      "${reloads:+; $reloads reloads}"
    if [ -s "$proxy_dir/error.log" ] && grep -q '\[error\]\|\[alert\]\|\[emerg\]' "$proxy_dir/error.log"; then
      echo "nginx_compare: $mode logged errors:" >&2
      grep '\[error\]\|\[alert\]\|\[emerg\]' "$proxy_dir/error.log" | head -n5 >&2
    fi
    stop_nginx "$proxy_pid"
  done
done

# --- the table ------------------------------------------------------------------------------
first_mode=${MODES%% *}
if [ "$REPEAT" -gt 0 ]; then
  base=$(median ${rps[static]:-${rps[$first_mode]}})
  cpu_base=$(median ${cpu[static]:-${cpu[$first_mode]}})
  echo
  printf '| mode | requests/s per repetition | median | ratio to static | p99 latency (median, ms) | proxy CPU µs/request (median) | ratio to static | failed requests |\n'
  printf '| --- | --- | --- | --- | --- | --- | --- | --- |\n'
  for mode in $MODES; do
    m=$(median ${rps[$mode]})
    ratio=$(awk -v a="$m" -v b="$base" 'BEGIN { printf "%.3f", a / b }')
    c=$(median ${cpu[$mode]})
    cratio=$(awk -v a="$c" -v b="$cpu_base" 'BEGIN { printf "%.3f", a / b }')
    list=$(printf '%s' "${rps[$mode]}" | awk '{ for (i = 1; i <= NF; i++) printf "%s%.0f", (i > 1 ? ", " : ""), $i }')
    printf '| %s | %s | %.0f | %s | %s | %s | %s | %d of %d |\n' "$mode" "$list" "$m" "$ratio" "$(median ${p99[$mode]})" "$c" "$cratio" \
      "${errors[$mode]}" "${requests[$mode]}"
    [ -z "${SUMMARY:-}" ] || printf '%s rps %s\n%s p99_ms %s\n%s cpu_us %s\n%s failed %d\n%s requests %d\n' \
      "$mode" "$m" "$mode" "$(median ${p99[$mode]})" "$mode" "$c" "$mode" "${errors[$mode]}" "$mode" "${requests[$mode]}" >>"$SUMMARY"
  done
fi

# --- instructions per request (INSTRUCTIONS=1) ------------------------------------------------
# The machine's noise moves requests/s and CPU time; the instructions a request costs do
# not. Each mode runs once more as a single nginx process (master_process off, 1 worker)
# under callgrind: warmed up, counters zeroed, `wrk -t1 -c4 -d${IDURATION}s`, counters
# dumped. User-space instructions only (nginx, LuaJIT, the modules, libdynup_c, libc),
# of the whole process (dynup's own threads included); the kernel's share (the sockets)
# is the same in every mode and is not counted. Not reload: one process has no workers
# to replace.
if [ "$INSTRUCTIONS" = 1 ]; then
  nginx_globals="daemon off; master_process off;"
  proxy_workers=1
  declare -A ir
  imodes=$(printf '%s\n' $MODES | grep -vx reload | tr '\n' ' ' || true)
  for mode in $imodes; do
    dir=$work/$mode.callgrind
    launcher=(valgrind --tool=callgrind --dump-instr=no "--callgrind-out-file=$dir/callgrind.out")
    start_proxy "$mode" callgrind
    url="http://127.0.0.1:$proxy_port/"
    run_wrk "$proxy_dir/warmup.txt" -t1 -c4 -d2s "$url" || true
    callgrind_control -z "$proxy_pid" >/dev/null 2>&1
    run_wrk "$proxy_dir/wrk.txt" -t1 -c4 -d"${IDURATION}s" "$url" || die "wrk failed ($mode, callgrind)"
    callgrind_control -d "$proxy_pid" >/dev/null 2>&1
    n=$(awk '/ requests in / { print $1 }' "$proxy_dir/wrk.txt")
    bad=$(awk '/Non-2xx or 3xx responses:/ { s += $NF } /Socket errors:/ { gsub(/,/, ""); s += $4 + $6 + $8 + $10 } END { print s + 0 }' \
      "$proxy_dir/wrk.txt")
    dump=""
    for i in $(seq 1 100); do
      dump=$(ls "$dir"/callgrind.out.* 2>/dev/null | head -n1 || true)
      [ -n "$dump" ] && grep -q "^summary:" "$dump" && break
      sleep 0.1
    done
    total=$(awk '/^summary:/ { print $2; exit }' "$dump")
    ir[$mode]=$(awk -v t="$total" -v n="$n" 'BEGIN { printf "%.0f", t / n }')
    printf 'nginx_compare: %-8s %s instructions/request (%s requests under callgrind, errors %d)\n' "$mode" "${ir[$mode]}" "$n" "$bad"
    errors[$mode]=$((${errors[$mode]:-0} + bad))
    stop_nginx "$proxy_pid"
  done
  ir_base=${ir[static]:-${ir[${imodes%% *}]:-}}
  echo
  printf '| mode | user-space instructions per request (1 process, callgrind) | ratio to static |\n'
  printf '| --- | --- | --- |\n'
  for mode in $imodes; do
    printf '| %s | %s | %s |\n' "$mode" "${ir[$mode]}" "$(awk -v a="${ir[$mode]}" -v b="$ir_base" 'BEGIN { printf "%.3f", a / b }')"
    [ -z "${SUMMARY:-}" ] || echo "$mode instructions ${ir[$mode]}" >>"$SUMMARY"
  done
fi

total_errors=0
for mode in $MODES; do
  [ "$mode" = reload ] || total_errors=$((total_errors + ${errors[$mode]:-0}))
done
[ "$total_errors" -eq 0 ] || die "$total_errors non-2xx/3xx responses or socket errors: the figures are not comparable"
