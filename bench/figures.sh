#!/usr/bin/env bash
# One command for every figure in docs/PERFORMANCE.md (issue 9): builds what the
# benchmarks need in a Release build folder, runs them with the commands the document
# gives, and rewrites the generated section between `<!-- figures:begin -->` and
# `<!-- figures:end -->` (bench/figures.py): what was measured, dynup's figure, what it is
# compared to, the ratio, and the command. Everything outside the markers is left as it is.
#
#   bench/figures.sh                    # about 18 minutes on 2 CPUs; run it on a quiet machine
#   QUICK=1 OUT=/tmp/perf.md bench/figures.sh
#
# Groups, in order (ONLY selects some; the others keep their rows):
#   publisher  dynup_bench: snapshot() vs an atomic shared_ptr load, build + publish
#   policies   dynup_bench: pick at 10 000 peers per policy, against the targets
#   upstream   dynup_bench: Upstream pick + report vs the bare picker
#   latency    dynup_watch_latency --json: propagation p50/p99 per source
#   lua        bench/lua_compare.sh: resty.dynup vs static, a bare Lua balancer and the
#              article's approach (requests/s, CPU and instructions per request)
#   nginx      bench/nginx_compare.sh: the module vs static (PIN=1), and vs reloads
#   proxy      bench/proxy_compare.sh: dynup-proxy vs straight to its backend
# Environment:
#   QUICK=1    every run shortened (one repetition, about a second of load per mode): a
#              smoke test of about a minute whose section says it is not to be quoted
#   ONLY="g …" the groups to run (default: all)
#   OUT=path   the rewritten document goes there (default: docs/PERFORMANCE.md, in place)
#   BUILD=dir  the build folder (default build/bench), configured Release and built with
#              JOBS (default nproc) jobs; NOBUILD=1 uses it as it is, whatever its type
#   KEEP=1     keeps the results directory (JSON, summaries, logs)
# A failed build or benchmark stops the script with its log's tail; the document is only
# replaced (a temporary file renamed over it) once every group has run.
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK=${QUICK:-0}
ONLY=${ONLY:-}
OUT=${OUT:-docs/PERFORMANCE.md}
DOC=docs/PERFORMANCE.md
BUILD=${BUILD:-build/bench}
NOBUILD=${NOBUILD:-0}
JOBS=${JOBS:-$(nproc)}
all_groups="publisher policies upstream latency lua nginx proxy"

die() {
  echo "figures: $*" >&2
  exit 1
}

groups=${ONLY:-$all_groups}
for g in $groups; do
  case " $all_groups " in *" $g "*) ;; *) die "unknown group '$g' in ONLY (groups: $all_groups)" ;; esac
done
wants() { case " $groups " in *" $1 "*) return 0 ;; *) return 1 ;; esac }
command -v python3 >/dev/null || die "python3 not found: scripts/install-deps.sh installs it"
[ "$(grep -c '^<!-- figures:\(begin\|end\) -->$' "$DOC")" = 2 ] ||
  die "$DOC needs one '<!-- figures:begin -->' and one '<!-- figures:end -->' line"
out_dir=$(dirname "$OUT")
[ -d "$out_dir" ] && [ -w "$out_dir" ] || die "cannot write to $out_dir (OUT=$OUT)"

work=$(mktemp -d /tmp/dynup-figures.XXXXXX)
cleanup() {
  if [ "${KEEP:-0}" = 1 ]; then echo "figures: kept $work" >&2; else rm -rf "$work"; fi
  rm -f "${tmp:-}"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- build ------------------------------------------------------------------------------
bench=$BUILD/bench/dynup_bench
latency=$BUILD/bench/dynup_watch_latency
lib=$BUILD/src/c/libdynup_c.so
proxy=$BUILD/examples/proxy/dynup-proxy
module=$BUILD/examples/nginx/ngx_http_upstream_dynup_module.so # the cache may name another
# What a group needs: the targets to build, and the file that must then exist.
group_needs() {
  case $1 in
    publisher | policies | upstream) need_targets="dynup_bench" need_file=$bench ;;
    latency) need_targets="dynup_watch_latency" need_file=$latency ;;
    lua) need_targets="dynup_c" need_file=$lib ;;
    nginx) need_targets="dynup_c dynup_nginx_module" need_file=$module ;;
    proxy) need_targets="dynup-proxy" need_file=$proxy ;;
  esac
}
targets=()
for g in $groups; do
  group_needs "$g"
  read -ra more <<<"$need_targets"
  targets+=("${more[@]}")
done
read -ra targets <<<"$(printf '%s\n' "${targets[@]}" | sort -u | tr '\n' ' ')"
if [ "$NOBUILD" != 1 ]; then
  fresh=()
  [ -f "$BUILD/CMakeCache.txt" ] || fresh=(-DDYNUP_BUILD_TESTS=OFF)
  echo "figures: building ${targets[*]} in $BUILD (Release, -j$JOBS)"
  cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DDYNUP_BUILD_BENCH=ON -DDYNUP_BUILD_EXAMPLES=ON \
    -DDYNUP_BUILD_C_API=ON "${fresh[@]}" >"$work/configure.log" 2>&1 ||
    die "configuring $BUILD failed: $(tail -n 20 "$work/configure.log")"
  cmake --build "$BUILD" -j "$JOBS" --target "${targets[@]}" >"$work/build.log" 2>&1 ||
    die "building ${targets[*]} failed: $(grep -m 5 -i 'error' "$work/build.log" || tail -n 20 "$work/build.log")"
fi
[ -f "$BUILD/CMakeCache.txt" ] || die "$BUILD is not a CMake build folder"
build_type=$(sed -n 's/^CMAKE_BUILD_TYPE:[A-Z]*=//p' "$BUILD/CMakeCache.txt")
cxx=$(sed -n 's/^CMAKE_CXX_COMPILER:[A-Z]*=//p' "$BUILD/CMakeCache.txt")
cached_module=$(sed -n 's/^DYNUP_NGINX_MODULE_FILE:[A-Z]*=//p' "$BUILD/CMakeCache.txt")
module=${cached_module:-$module}
case $module in "$PWD"/*) module=${module#"$PWD"/} ;; esac
for g in $groups; do
  group_needs "$g"
  [ -e "$need_file" ] || die "$need_file not found (group $g): build it, or drop NOBUILD=1"
done

# --- run --------------------------------------------------------------------------------
load() { cut -d' ' -f1-3 /proc/loadavg; }
{
  echo "date=$(date -u '+%Y-%m-%d %H:%M UTC')"
  cpu=$(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo)
  os=$(. /etc/os-release 2>/dev/null && echo "${PRETTY_NAME:-}")
  echo "machine=$(nproc) CPUs (${cpu:-unknown CPU}), ${os:-unknown OS}, $(uname -m), $("$cxx" --version 2>/dev/null | head -n1 || echo "$cxx")"
  echo "load=$(load)"
  echo "build=${build_type:-no build type} build in $BUILD"
  echo "groups=$groups"
} >"$work/meta"

# Runs one command of a group: `run KEY SHOWN ENV=… command args…`. SHOWN is the command
# as the document gives it; the output goes to KEY.log; a failure ends the script.
run() {
  local key=$1 shown=$2 rc=0
  shift 2
  echo "figures: $key: $shown"
  printf '%s, load %s%s\n%s\n' "$(date -u '+%Y-%m-%d %H:%M UTC')" "$(load)" "$([ "$QUICK" = 1 ] && echo ", QUICK")" \
    "$shown" >"$work/$key.cmd"
  env "$@" >"$work/$key.log" 2>&1 || rc=$?
  [ "$rc" -eq 0 ] || die "$key failed (exit $rc): $shown
$(tail -n 15 "$work/$key.log")
(the document is unchanged)"
}

# Google Benchmark, medians of REPS repetitions (QUICK: one short one), as JSON.
gbench() {
  local key=$1 filter=$2 reps=$3 args
  if [ "$QUICK" = 1 ]; then
    args="--benchmark_filter='$filter' --benchmark_min_time=0.01"
  else
    args="--benchmark_filter='$filter' --benchmark_repetitions=$reps --benchmark_report_aggregates_only=true"
  fi
  run "$key" "$bench $args" bash -c "$bench $args --benchmark_out='$work/$key.json' --benchmark_out_format=json"
}

# A compare script with its environment (QUICK: the second one); its SUMMARY lines go
# to KEY.summary.
compare() {
  local key=$1 vars=$2 script=$4
  [ "$QUICK" = 1 ] && vars=$3
  shift 4
  run "$key" "$vars${vars:+ }$script $*" bash -c "$vars SUMMARY='$work/$key.summary' $script $*"
}

short="DURATION=1 WARMUP=0 REPEAT=1"
wants publisher && gbench publisher '^BM_(SnapshotUnchanged|AtomicSharedPtrLoad)/|^BM_BuildAndPublish/' 5
wants policies && gbench policies '^BM_Pick/[a-z_]+/10000/real_time/threads:1$|^BM_PickWeight1/ring_hash/10000/real_time/threads:1$' 5
wants upstream && gbench upstream '^BM_PickReport' 3
if wants latency; then
  args=""
  [ "$QUICK" = 1 ] && args=" --changes 10 --reps 2"
  run latency "$latency$args --json" bash -c "$latency$args --json >'$work/latency.json'"
fi
if wants lua; then
  # resty.dynup, a bare balancer_by_lua round robin (the least any Lua balancer costs),
  # the article's approach and static, side by side on the issue's setup (two workers
  # sharing the machine with wrk and the backends), with the instructions a request
  # costs. Requests/s move with whichever program the machine's noise slows; CPU and
  # instructions per request are the proxy's own. (Pinning does not help here: on two
  # CPUs wrk and the backends saturate theirs as soon as the proxy does.)
  compare lua 'MODES="static lua_rr dynup article" REPEAT=7 DURATION=8 INSTRUCTIONS=1' \
    "MODES=\"static lua_rr dynup article\" $short INSTRUCTIONS=1 IDURATION=1" bench/lua_compare.sh "$lib"
fi
if wants nginx; then
  # The module against static on a CPU of its own (the document's headline figure), then
  # the three modes side by side unpinned, for what reloads cost.
  pin="PIN=1 "
  [ "$(nproc)" -ge 2 ] || pin=""
  compare nginx-pin "${pin}WORKERS=1 MODES=\"static module\" REPEAT=7 DURATION=8" \
    "${pin}WORKERS=1 MODES=\"static module\" $short" bench/nginx_compare.sh "$module"
  compare nginx 'MODES="static module reload" WORKERS=2 REPEAT=5' \
    "MODES=\"static module reload\" WORKERS=2 $short RELOAD_EVERY=0.3" bench/nginx_compare.sh "$module"
fi
wants proxy && compare proxy "REPEAT=5" "DURATION=1 WARMUP=1 REPEAT=1" bench/proxy_compare.sh "$proxy"

# --- the document -------------------------------------------------------------------------
tmp=$(mktemp "$out_dir/.figures.XXXXXX")
if ! python3 bench/figures.py render "$work" "$DOC" "$tmp"; then
  rm -f "$tmp"
  die "rendering the section failed (the document is unchanged)"
fi
[ ! -e "$OUT" ] || chmod --reference="$OUT" "$tmp" 2>/dev/null || chmod 644 "$tmp"
mv -f "$tmp" "$OUT"
echo "figures: wrote $OUT ($([ "$QUICK" = 1 ] && echo "QUICK run: not figures to quote" || echo "groups: $groups"))"
