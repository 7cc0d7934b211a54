# Sourced by scripts/demo.sh, bench/proxy_compare.sh and bench/nginx_compare.sh: the
# processes a script starts, stopped by PID on exit, and loopback ports for them. The
# sourcing script sets $work (a temporary directory, removed on exit) before calling
# stop_children.

children=() # PIDs of the processes this script started

# SIGTERM to every child, then reap them; removes $work.
stop_children() {
  local p
  for p in "${children[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${children[@]}"; do wait "$p" 2>/dev/null || true; done
  [ -n "${work:-}" ] && rm -rf "$work"
}

# A loopback port nothing listens on now; exits the script when none is found. It is taken
# below the kernel's ephemeral range (net.ipv4.ip_local_port_range), where no outgoing
# connection's local port can hold it; another process may still take it before the
# caller binds it, so a caller that can should listen on port 0 instead (port_from_log).
free_port() {
  local p low
  low=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
  [[ "$low" =~ ^[0-9]+$ ]] && [ "$low" -gt 12000 ] || low=60000 # a layout this does not expect
  for _ in $(seq 1 200); do
    p=$((10000 + RANDOM % (low - 10000)))
    if ! ss -Htln "sport = :$p" 2>/dev/null | grep -q .; then
      echo "$p"
      return 0
    fi
  done
  echo "no free loopback port found" >&2
  exit 1
}

# The port a process started with port 0 says it took: the first match of the sed
# expression $2 (printing the number) in its log $1, waited for up to 10 s while PID $3
# runs. Fails when the process exits or says nothing in time.
port_from_log() {
  local file=$1 expr=$2 pid=$3 p
  for _ in $(seq 1 500); do
    p=$(sed -n "$expr" "$file" 2>/dev/null | head -n 1)
    if [ -n "$p" ]; then
      echo "$p"
      return 0
    fi
    kill -0 "$pid" 2>/dev/null || return 1
    sleep 0.02
  done
  return 1
}
