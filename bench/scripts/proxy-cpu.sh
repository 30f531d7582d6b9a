#!/usr/bin/env bash
# CPU per proxied request, user space and kernel apart, for the gateway with its smallest config
# and for nginx `proxy_pass` (keep-alive upstream, 2 workers), both in front of the same static
# nginx upstream, with wrk (one thread, 16 connections) as the load. Rounds alternate.
#
#     cargo build --release -p gateway && bench/scripts/proxy-cpu.sh [ROUNDS] [SECONDS]
#
# GATEWAY_BIN names another gateway binary (to compare two builds).
#
# Needs nginx and wrk (Debian packages, installed when missing) and the machine's PostgreSQL
# (the gateway's config names a database; a scratch one is made and dropped). Prints, per round
# and proxy: req/s, then user and system CPU microseconds per request of the proxy's processes
# (from /proc/PID/task/*/stat), so the two proxies' costs can be compared whatever the
# machine's speed that minute.
set -euo pipefail
rounds=${1:-3}
secs=${2:-6}
root=$(cd "$(dirname "$0")/../.." && pwd)
gateway=${GATEWAY_BIN:-$root/target/release/gateway}
[ -x "$gateway" ] || { echo "build it first: cargo build --release -p gateway" >&2; exit 2; }
for bin in nginx wrk; do
  command -v "$bin" >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y "$bin" >/dev/null
done
dir=$(mktemp -d /tmp/proxy-cpu.XXXXXX)
db=proxy_cpu_$$
mkdir -p "$dir/logs"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
up=$(free_port); ng=$(free_port); gw=$(free_port)
cleanup() {
  [ -f "$dir/up.pid" ] && kill "$(cat "$dir/up.pid")" 2>/dev/null || true
  [ -f "$dir/ng.pid" ] && kill "$(cat "$dir/ng.pid")" 2>/dev/null || true
  [ -n "${gpid:-}" ] && kill "$gpid" 2>/dev/null && wait "$gpid" 2>/dev/null || true
  psql -h 127.0.0.1 -U postgres -d postgres -qc "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true
  rm -rf "$dir"
}
trap cleanup EXIT
cat >"$dir/up.conf" <<EOF
worker_processes 1; daemon on; pid $dir/up.pid; error_log $dir/logs/up.log;
events { worker_connections 1024; }
http { access_log off; server { listen 127.0.0.1:$up; location / { return 200 "ok"; } } }
EOF
cat >"$dir/ng.conf" <<EOF
worker_processes 2; daemon on; pid $dir/ng.pid; error_log $dir/logs/ng.log;
events { worker_connections 1024; }
http {
  access_log off;
  upstream u { server 127.0.0.1:$up; keepalive 64; }
  server { listen 127.0.0.1:$ng; location / {
    proxy_pass http://u; proxy_http_version 1.1; proxy_set_header Connection ""; } }
}
EOF
cat >"$dir/gw.toml" <<EOF
listen = "127.0.0.1:$gw"
database_url = "postgres://postgres@127.0.0.1:5432/$db"

[[routes]]
prefix = "/plain"
upstream = "http://127.0.0.1:$up"
EOF
psql -h 127.0.0.1 -U postgres -d postgres -qc "CREATE DATABASE $db" >/dev/null
nginx -p "$dir" -c "$dir/up.conf"
nginx -p "$dir" -c "$dir/ng.conf"
"$gateway" migrate --config "$dir/gw.toml" >/dev/null 2>&1
"$gateway" --config "$dir/gw.toml" >"$dir/logs/gw.log" 2>&1 &
gpid=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$gw/plain/x" >/dev/null && break; sleep 0.1; done
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$ng/x" >/dev/null && break; sleep 0.1; done

tick=$(getconf CLK_TCK)
# user and system ticks of every thread of the given processes
ticks() { cat $(for p in "$@"; do echo /proc/"$p"/task/*/stat; done) | awk '{u+=$14; s+=$15} END {print u, s}'; }
measure() { # name url pids...
  local name=$1 url=$2; shift 2
  read -r u0 s0 < <(ticks "$@")
  local out; out=$(wrk -t1 -c16 -d"${secs}s" "$url")
  read -r u1 s1 < <(ticks "$@")
  local n rps
  n=$(awk '/requests in/{print $1}' <<<"$out")
  rps=$(awk '/Requests\/sec/{print $2}' <<<"$out")
  awk -v name="$name" -v rps="$rps" -v n="$n" -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v hz="$tick" \
    'BEGIN { printf "%-8s %9.0f req/s  user %5.1f us/req  system %5.1f us/req\n", name, rps, u*1e6/hz/n, s*1e6/hz/n }'
}
workers=$(pgrep -P "$(cat "$dir/ng.pid")" | tr '\n' ' ')
for r in $(seq "$rounds"); do
  echo "round $r"
  # shellcheck disable=SC2086
  measure gateway "http://127.0.0.1:$gw/plain/x" "$gpid"
  # shellcheck disable=SC2086
  measure nginx "http://127.0.0.1:$ng/x" $workers
done
