# Sourced by scripts/demo.sh and bench/proxy_compare.sh: the processes a script starts,
# stopped by PID on exit, and loopback ports for them. The sourcing script sets $work
# (a temporary directory, removed on exit) before calling stop_children.

children=() # PIDs of the processes this script started

# SIGTERM to every child, then reap them; removes $work.
stop_children() {
  local p
  for p in "${children[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${children[@]}"; do wait "$p" 2>/dev/null || true; done
  [ -n "${work:-}" ] && rm -rf "$work"
}

# A loopback port nothing listens on now; exits the script when none is found.
free_port() {
  local p
  for _ in $(seq 1 200); do
    p=$((20000 + RANDOM % 40000))
    if ! ss -Htln "sport = :$p" 2>/dev/null | grep -q .; then
      echo "$p"
      return 0
    fi
  done
  echo "no free loopback port found" >&2
  exit 1
}
