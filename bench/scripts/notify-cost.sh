#!/usr/bin/env bash
# What NOTIFY on every producer commit costs: pgbench runs the business transaction (insert an
# order + outbox.enqueue + commit) with and without `outbox.notify = 'on'`, alternating runs so
# drift on a noisy machine hits both sides alike. Prints tx/s and the ratio per client count.
#   bench/scripts/notify-cost.sh [seconds-per-run] [rounds]
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${1:-10}
rounds=${2:-2}
base=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}
db=bench_notify
root=${base%/*}
psql "$base" -qc "drop database if exists $db" -c "create database $db"
url="$root/$db"
DATABASE_URL=$url cargo run -q -p outbox-relay -- migrate >/dev/null
psql "$url" -qc "create table bench_orders (id bigserial primary key, amount int not null, created_at timestamptz not null default now())"
tmp=$(mktemp -d)
cat >"$tmp/plain.sql" <<'SQL'
BEGIN;
INSERT INTO bench_orders (amount) VALUES (42);
SELECT outbox.enqueue('', 'bench', '\x7b7d'::bytea, ordering_key => NULL);
COMMIT;
SQL
cat >"$tmp/notify.sql" <<'SQL'
BEGIN;
SET LOCAL outbox.notify = 'on';
INSERT INTO bench_orders (amount) VALUES (42);
SELECT outbox.enqueue('', 'bench', '\x7b7d'::bytea, ordering_key => NULL);
COMMIT;
SQL
run() { pgbench -n -c "$1" -j 2 -T "$secs" -f "$2" "$url" 2>/dev/null | awk '/^tps/ {print $3}'; }
printf '%-8s %12s %12s %8s\n' clients plain_tps notify_tps ratio
for c in 8 32; do
  p=0; n=0
  for _ in $(seq "$rounds"); do
    a=$(run "$c" "$tmp/plain.sql"); b=$(run "$c" "$tmp/notify.sql")
    p=$(echo "$p + $a" | bc -l); n=$(echo "$n + $b" | bc -l)
    psql "$url" -qc "truncate outbox.messages, bench_orders" >/dev/null
  done
  printf '%-8s %12.0f %12.0f %8.2f\n' "$c" "$(echo "$p/$rounds" | bc -l)" "$(echo "$n/$rounds" | bc -l)" "$(echo "$n/$p" | bc -l)"
done
psql "$base" -qc "drop database $db"
