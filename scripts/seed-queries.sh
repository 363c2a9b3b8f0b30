#!/usr/bin/env bash
# Runs the seed's four analysis queries, unmodified, with the sqlite3 shell against the
# database of a node that has synced (the demo's first terminal), and checks they answer.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v sqlite3 >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq sqlite3 >/dev/null; }
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cargo run --quiet -p possync -- demo --duration 8 --api-port 0 --data-dir "$dir/demo" >/dev/null
db="$dir/demo/till1/possync.db"
run() { echo "--- $1"; sqlite3 -header -column "$db" "$2"; }
run "Recent conflicts" "SELECT * FROM p2p_conflicts
WHERE created_at >= datetime('now', '-24 hours')
ORDER BY created_at DESC;" | head -8
run "Connection health" "SELECT * FROM v_p2p_connection_health
WHERE last_event >= datetime('now', '-1 hour');"
run "Sync success rate" "SELECT
  status,
  COUNT(*) as count,
  ROUND(COUNT(*) * 100.0 / SUM(COUNT(*)) OVER(), 2) as percentage
FROM p2p_sync_logs
WHERE created_at >= datetime('now', '-24 hours')
GROUP BY status;"
run "Peer performance" "SELECT
  peer_name,
  SUM(messages_sent) as total_messages,
  SUM(bytes_sent) as total_bytes,
  AVG(sync_duration_ms) as avg_sync_time
FROM p2p_connection_metrics
WHERE created_at >= datetime('now', '-24 hours')
GROUP BY peer_name;"
# The demo made changes on every terminal, so the last hour's logs cannot be empty.
count=$(sqlite3 "$db" "SELECT COUNT(*) FROM p2p_sync_logs WHERE created_at >= datetime('now', '-24 hours');")
events=$(sqlite3 "$db" "SELECT COUNT(*) FROM v_p2p_connection_health WHERE last_event >= datetime('now', '-1 hour');")
conflicts=$(sqlite3 "$db" "SELECT COUNT(*) FROM p2p_conflicts WHERE created_at >= datetime('now', '-24 hours');")
echo "sync log rows: $count, connection health rows: $events, conflicts: $conflicts"
[ "$count" -gt 0 ] && [ "$events" -gt 0 ] && [ "$conflicts" -gt 0 ] || { echo "FAIL: the seed's queries returned no rows"; exit 1; }
echo "seed queries: OK"
