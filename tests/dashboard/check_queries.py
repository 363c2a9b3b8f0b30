#!/usr/bin/env python3
"""Runs every SQL block of docs/DASHBOARD.md against the node's real schema.

The schema is read from the migration strings in crates/possync-store/src/schema.rs, so a
column renamed there breaks this check. A fixture with hand-computed answers is inserted
(the clock is fixed: :now = 2026-11-25 12:00:00) and each query's result is compared with
them. Python 3 standard library only.

    python3 tests/dashboard/check_queries.py
"""

import os
import re
import sqlite3
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOC = os.path.join(ROOT, "docs", "DASHBOARD.md")
SCHEMA = os.path.join(ROOT, "crates", "possync-store", "src", "schema.rs")

NOW = "2026-11-25 12:00:00"
SINCE_24H = "2026-11-24 12:00:00"
SINCE_7D = "2026-11-18 12:00:00"


def load_queries():
    text = open(DOC, encoding="utf-8").read()
    queries = {}
    for block in re.findall(r"```sql\n(.*?)```", text, re.S):
        match = re.match(r"-- name: (\w+)\n", block)
        if match:
            queries[match.group(1)] = block
    return queries


def open_db():
    source = open(SCHEMA, encoding="utf-8").read()
    scripts = re.findall(r'const \w+: &str = r#"(.*?)"#;', source, re.S)
    if not scripts:
        sys.exit(f"no migration found in {SCHEMA}")
    db = sqlite3.connect(":memory:")
    for script in scripts:
        db.executescript(script)
    return db


def fixture(db):
    def metric(peer, name, event, at, duration=None):
        db.execute(
            "INSERT INTO p2p_connection_metrics (peer_id, peer_name, event_type, sync_duration_ms, created_at) "
            "VALUES (?, ?, ?, ?, ?)", (peer, name, event, duration, at))

    def log(peer, name, status, at, n=1):
        for _ in range(n):
            db.execute(
                "INSERT INTO p2p_sync_logs (peer_id, peer_name, message_type, message_action, entity_type, "
                "entity_id, status, created_at) VALUES (?, ?, 'product', 'update', 'product', 'p1', ?, ?)",
                (peer, name, status, at))

    def conflict(at):
        db.execute(
            "INSERT INTO p2p_conflicts (peer_id, peer_name, entity_type, entity_id, conflict_type, "
            "resolution_strategy, resolved_by, created_at) VALUES ('A', 'Till A', 'product', 'p1', "
            "'update_conflict', 'last_write_wins', 'system', ?)", (at,))

    # Peer A: up since before the window; one outage of 600 s made of a heartbeat timeout
    # then a disconnect (one outage, not two).
    metric("A", "Till A", "connected", "2026-11-24 10:00:00")
    metric("A", "Till A", "heartbeat_timeout", "2026-11-25 06:00:00")
    metric("A", "Till A", "disconnected", "2026-11-25 06:00:05")
    metric("A", "Till A", "reconnected", "2026-11-25 06:10:00")
    # Peer B: first seen inside the window (at midnight), one 30 s outage.
    metric("B", "Till B", "connected", "2026-11-25 00:00:00")
    metric("B", "Till B", "disconnected", "2026-11-25 09:00:00")
    metric("B", "Till B", "connected", "2026-11-25 09:00:30")
    # Peer C: down since before the window and silent: left out of the 24 h uptime.
    metric("C", "Till C", "connected", "2026-11-19 08:00:00")
    metric("C", "Till C", "disconnected", "2026-11-20 00:00:00")
    # Peer D: up at 11:00, timed out at 11:30, still down: an ongoing outage.
    metric("D", "Till D", "connected", "2026-11-25 11:00:00")
    metric("D", "Till D", "heartbeat_timeout", "2026-11-25 11:30:00")

    # Sync sessions. A: baseline of 20 syncs 100..290 ms (median 195), last hour 3 at
    # 480/500/520 ms (mean 500): slower than usual (2.6x), a warning. B: normal.
    for i in range(20):
        metric("A", "Till A", "sync_completed", f"2026-11-2{2 + i % 3} 0{i % 10}:00:00", 100 + 10 * i)
    for ms in (480, 500, 520):
        metric("A", "Till A", "sync_completed", "2026-11-25 11:30:00", ms)
    for i in range(12):
        metric("B", "Till B", "sync_completed", f"2026-11-23 1{i % 10}:00:00", 200)
    metric("B", "Till B", "sync_completed", "2026-11-25 11:20:00", 210)
    metric("B", "Till B", "sync_completed", "2026-11-25 11:21:00", 220)
    metric("B", "Till B", "sync_completed", "2026-11-25 11:22:00", 200)
    metric("B", "Till B", "sync_failed", "2026-11-24 20:00:00")

    # Sync logs in the 24 h window: 100 rows, 90 success, 4 conflict, 3 skipped, 3 error.
    log("A", "Till A", "success", "2026-11-25 08:00:00", 60)
    log("A", "Till A", "conflict", "2026-11-25 08:00:00", 4)
    log("A", "Till A", "skipped", "2026-11-25 08:00:00", 3)
    log("B", "Till B", "success", "2026-11-25 11:30:00", 15)  # last hour: 15 ok + 3 errors = 16.7 %
    log("B", "Till B", "error", "2026-11-25 11:30:00", 3)
    log("B", "Till B", "success", "2026-11-24 13:00:00", 15)
    # Outside the 24 h window (baseline of B: 100 rows, 1 error = 1 %).
    log("B", "Till B", "success", "2026-11-21 10:00:00", 84)
    log("B", "Till B", "error", "2026-11-21 10:00:00", 1)
    log("A", "Till A", "error", "2026-11-10 10:00:00", 5)  # older than 14 days

    # Conflicts: 6 in the 24 h window, 1 the day before it, 1 older than 14 days.
    for at in ("2026-11-25 01:00:00", "2026-11-25 02:00:00", "2026-11-25 11:59:59",
               "2026-11-24 12:00:00", "2026-11-24 18:00:00", "2026-11-24 23:00:00"):
        conflict(at)
    conflict("2026-11-23 09:00:00")
    conflict("2026-11-01 09:00:00")


def close(a, b, tolerance=1e-6):
    return a is not None and abs(a - b) <= tolerance


def main():
    queries = load_queries()
    expected = {"uptime_by_peer", "avg_reconnect", "sync_success_rate", "conflicts_per_hour", "daily_volume",
                "peer_reliability", "alert_slow_sync", "alert_sync_errors"}
    missing = expected - set(queries)
    if missing:
        sys.exit(f"queries missing from {DOC}: {sorted(missing)}")
    db = open_db()
    empty = open_db()
    fixture(db)
    failures = []

    def check(condition, what):
        print(("  ok  " if condition else "FAIL  ") + what)
        if not condition:
            failures.append(what)

    def run(name, since=SINCE_24H, database=None):
        cursor = (database or db).execute(queries[name], {"now": NOW, "since": since})
        columns = [c[0] for c in cursor.description]
        return [dict(zip(columns, row)) for row in cursor.fetchall()]

    rows = {r["peer_id"]: r for r in run("uptime_by_peer")}
    check(sorted(rows) == ["A", "B", "D"], f"uptime peers are A, B, D (C down all along) -> {sorted(rows)}")
    check(close(rows["A"]["connected_seconds"], 85800, 0.01) and close(rows["A"]["observed_seconds"], 86400, 0.01),
          f"A connected 85800 of 86400 s -> {rows['A']['connected_seconds']:.2f}/{rows['A']['observed_seconds']:.2f}")
    check(close(rows["B"]["connected_seconds"], 43170, 0.01) and close(rows["B"]["observed_seconds"], 43200, 0.01),
          "B connected 43170 of 43200 s (observed from its first event)")
    check(close(rows["D"]["connected_seconds"], 1800, 0.01) and close(rows["D"]["observed_seconds"], 3600, 0.01),
          "D connected 1800 of 3600 s")
    overall = 100 * sum(r["connected_seconds"] for r in rows.values()) / sum(r["observed_seconds"] for r in rows.values())
    check(close(overall, 100 * 130770 / 133200, 1e-4), f"uptimePercent = 98.18 -> {overall:.2f}")
    check(rows["A"]["peer_name"] == "Till A", "uptime carries the peer name")

    r = run("avg_reconnect")[0]
    check(r["avg_reconnect_ms"] == 315000, f"avgReconnectMs = mean(600 s, 30 s) = 315000 -> {r['avg_reconnect_ms']}")
    check(r["ended_outages"] == 2 and r["ongoing_outages"] == 1, "2 ended outages, 1 ongoing")

    r = run("sync_success_rate")[0]
    check(r["sync_success_rate"] == 97.0 and r["changes"] == 100 and r["errors"] == 3,
          f"syncSuccessRate = 97.00 over 100 changes -> {r}")

    r = run("conflicts_per_hour")[0]
    check(r["conflicts_per_hour"] == 0.25, f"conflictsPerHour = 6 / 24 = 0.25 -> {r['conflicts_per_hour']}")

    days = run("daily_volume")
    check(len(days) == 14 and days[0]["day"] == "2026-11-12" and days[-1]["day"] == "2026-11-25",
          "daily: 14 days, 2026-11-12 .. 2026-11-25")
    by_day = {d["day"]: d for d in days}
    # Skipped rows without a reason count as changes (a NULL reason once dropped them).
    check(by_day["2026-11-25"] == {"day": "2026-11-25", "changes": 85, "duplicates": 0, "conflicts": 3, "errors": 3},
          f"2026-11-25: 85 changes, 3 conflicts, 3 errors -> {by_day['2026-11-25']}")
    check(by_day["2026-11-21"]["changes"] == 85 and by_day["2026-11-21"]["errors"] == 1, "2026-11-21: 85 changes")
    check(by_day["2026-11-15"] == {"day": "2026-11-15", "changes": 0, "duplicates": 0, "conflicts": 0, "errors": 0},
          "a day without rows is present with zeros")

    peers = {p["peer_id"]: p for p in run("peer_reliability", since=SINCE_7D)}
    check(sorted(peers) == ["A", "B", "C", "D"], f"reliability peers -> {sorted(peers)}")
    # B over 7 days: uptime 100*(43170)/(43200) = 99.93; sync 100*(15+15+84)/(15+3+15+84+1)
    # = 96.61; sync_failed 1 of 16 sessions = 6.25 % -> (0.5*99.93 + 0.3*96.61 + 0.2*93.75) = 97.7 -> 98
    u_b = 100 * 43170 / 43200
    s_b = 100 * 114 / 118
    expected_b = round(0.5 * u_b + 0.3 * s_b + 0.2 * (100 - 100 / 16))
    check(peers["B"]["reliability"] == expected_b, f"B reliability {expected_b} -> {peers['B']['reliability']}")
    check(peers["B"]["failures"] == 1, "B failures = 1 sync_failed")
    # C: in the 7-day window it was up 2026-11-19 08:00 .. 11-20 00:00 (16 h) of
    # observed 11-19 08:00 .. now (6 d 4 h = 148 h); no logs, no sync sessions: uptime only.
    expected_c = round(100 * 16 / 148)
    check(peers["C"]["reliability"] == expected_c and close(peers["C"]["uptime_percent"], round(100 * 16 / 148, 2)),
          f"C reliability from uptime alone = {expected_c} -> {peers['C']['reliability']}")
    # D: uptime 50 %, no logs, no sync sessions -> 50; failures 1 heartbeat_timeout.
    check(peers["D"]["reliability"] == 50 and peers["D"]["failures"] == 1, f"D reliability 50 -> {peers['D']}")
    order = [p["peer_id"] for p in run("peer_reliability", since=SINCE_7D)]
    check(order[0] == "C", f"least reliable first -> {order}")

    slow = run("alert_slow_sync")
    check([(a["peer_id"], a["level"]) for a in slow] == [("A", "warning")], f"slow sync alert for A only -> {slow}")
    if slow:
        check(slow[0]["recent_mean_ms"] == 500 and slow[0]["baseline_median_ms"] == 195 and slow[0]["ratio"] == 2.6,
              "A: 500 ms vs median 195 ms, 2.6x")

    errors = run("alert_sync_errors")
    check([(a["peer_id"], a["level"]) for a in errors] == [("B", "warning")], f"error alert for B only -> {errors}")
    if errors:
        check(errors[0]["recent_share_percent"] == 16.7 and errors[0]["baseline_share_percent"] == 1.0,
              f"B: 16.7 % vs 1.0 % -> {errors[0]}")

    # A database without rows: every indicator is null or empty, nothing fails.
    check(run("uptime_by_peer", database=empty) == [], "empty: no uptime rows")
    check(run("avg_reconnect", database=empty)[0]["avg_reconnect_ms"] is None, "empty: avgReconnectMs null")
    check(run("sync_success_rate", database=empty)[0]["sync_success_rate"] is None, "empty: syncSuccessRate null")
    check(run("conflicts_per_hour", database=empty)[0]["conflicts_per_hour"] is None, "empty: conflictsPerHour null")
    check(len(run("daily_volume", database=empty)) == 14, "empty: still 14 days")
    check(run("peer_reliability", since=SINCE_7D, database=empty) == [], "empty: no peers")
    check(run("alert_slow_sync", database=empty) == [] and run("alert_sync_errors", database=empty) == [],
          "empty: no alerts")

    if failures:
        print(f"\n{len(failures)} check(s) failed")
        return 1
    print("\nall dashboard queries give the expected answers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
