#!/usr/bin/env python3
"""A fake possync node API for developing the dashboard without the Rust node.

Serves the dashboard assets exactly where the node serves them (``/``,
``/dashboard/app.js``, ``/dashboard/style.css``) and fake data for every endpoint
the page reads (see docs/DASHBOARD.md):

    GET  /api/status
    GET  /api/stats
    GET  /api/conflicts?limit=&offset=
    POST /api/conflicts/{id}/resolve    {"choice": "local"|"remote", "resolvedBy": "..."}
    GET  /api/dashboard
    GET  /api/events                    Server-Sent Events: `stats` every second, `conflict`

Counters rise on their own; a new conflict is recorded every ``--conflict-every``
seconds (every third one is an open ``manual`` conflict).

Python 3 standard library only. Binds 127.0.0.1 only.

    python3 tests/dashboard/mock_server.py --port 8931
    python3 tests/dashboard/mock_server.py --empty          # a brand-new node: no data yet
    python3 tests/dashboard/mock_server.py --sse-max-seconds 10   # drop the stream to see "reconnecting"
    python3 tests/dashboard/mock_server.py --backfill       # charts already full (for screenshots)
"""

import argparse
import copy
import json
import os
import queue
import random
import re
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ASSETS = os.path.join(ROOT, "crates", "possync-node", "assets", "dashboard")

# Where the node serves each asset. The Rust side embeds the same three files.
ROUTES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/dashboard/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/dashboard/style.css": ("style.css", "text/css; charset=utf-8"),
}

# The headers the node should send with the page (see docs/DASHBOARD.md).
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def iso_ms(dt):
    """RFC 3339 UTC with milliseconds, as the API's entity timestamps."""
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def sql_time(dt):
    """`YYYY-MM-DD HH:MM:SS` UTC, as the log tables store created_at."""
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def utcnow():
    return datetime.now(timezone.utc)


class World:
    """The fake node's state, shared by every request thread under one lock."""

    def __init__(self, empty, seed):
        self.lock = threading.Lock()
        self.rng = random.Random(seed)
        self.empty = empty
        self.pos_id = "0193a0f2-6c1e-7c3a-9d5e-2b8f41c7a001"
        self.pos_name = "Till 1 (front)"
        self.enabled = True
        self.subscribers = []  # one queue.Queue per open SSE stream
        self.next_conflict_id = 1
        now = utcnow()
        self.peers = [
            {"id": "0193a0f2-7d20-7b11-8a3c-5f0e9b2d1102", "name": "Till 2 (bar)", "address": "192.168.1.22:3030",
             "online": True, "lastSeen": iso_ms(now), "rate": 6.0},
            {"id": "0193a0f2-8e31-7f02-b4d1-0c6a7e3f2203", "name": "Till 3 (terrace)", "address": "192.168.1.23:3030",
             "online": True, "lastSeen": iso_ms(now), "rate": 2.5},
            {"id": "0193a0f2-9f42-7a93-a1e7-3d9c6b4a3304", "name": "Back office", "address": "192.168.1.10:3030",
             "online": False, "lastSeen": iso_ms(now - timedelta(minutes=47)), "rate": 0.0},
        ]
        self.connections = {}
        for peer in self.peers:
            if empty:
                peer["online"] = False
                peer["lastSeen"] = None
                continue
            if peer["online"]:
                self.connections[peer["id"]] = {
                    "peerId": peer["id"], "peerName": peer["name"],
                    "messagesSent": self.rng.randint(800, 4000), "messagesReceived": self.rng.randint(800, 4000),
                    "bytesSent": 0, "bytesReceived": 0,
                    "lastPing": iso_ms(now), "lastPong": iso_ms(now),
                    "reconnectAttempts": 0 if peer["rate"] > 3 else 2,
                }
                conn = self.connections[peer["id"]]
                conn["bytesSent"] = conn["messagesSent"] * 470
                conn["bytesReceived"] = conn["messagesReceived"] * 455
        self.conflicts = [] if empty else self._initial_conflicts(now)
        self.history = []  # past `stats` events, replayed to new streams with --backfill
        self.last_event = None  # the latest `stats` event, sent first to a new stream

    def simulate_past(self, seconds):
        """Runs the counters through the last `seconds` seconds, keeping one event per second."""
        start = time.time() - seconds
        for i in range(int(seconds)):
            t = start + i
            self.tick(1.0, t)
            self.history.append({"now": int(t * 1000), "status": self.status(), "stats": self.stats()})

    # ---- conflicts -------------------------------------------------------------

    def _product(self, pid, sku, name, price, stock, updated_at, **extra):
        record = {"id": pid, "sku": sku, "barcode": "84" + sku[-4:].replace("-", "0") + "1234567"[: 7],
                  "name": name, "description": None, "categoryId": "0193a0f2-aaaa-7000-8000-00000000c0ff",
                  "price": price, "cost": "3.10", "discountRate": "0", "stock": stock, "minStock": "5",
                  "maxStock": "60", "unit": "pcs", "isActive": True, "imageUrl": None,
                  "createdAt": "2026-09-01T08:00:00.000Z", "updatedAt": updated_at}
        record.update(extra)
        return record

    def _make_conflict(self, created, peer, kind, strategy, rng):
        pid = "0193a1%02x-%04x-7%03x-8%03x-%012x" % (rng.randint(0, 255), rng.randint(0, 0xFFFF), rng.randint(0, 0xFFF),
                                                   rng.randint(0, 0xFFF), rng.randint(0, 0xFFFFFFFFFFFF))
        names = [("COF-0250", "Coffee beans 250 g"), ("CRO-0001", "Butter croissant"), ("TEA-0100", "Green tea 100 g"),
                 ("JUI-0330", "Orange juice 33 cl"), ("SAN-0010", "Ham & cheese sandwich"), ("MUF-0002", "Blueberry muffin")]
        sku, name = rng.choice(names)
        local_at = created - timedelta(seconds=rng.randint(5, 50), milliseconds=rng.randint(0, 999))
        remote_at = created - timedelta(seconds=rng.randint(5, 50), milliseconds=rng.randint(0, 999))
        local = self._product(pid, sku, name, "7.90", "24", iso_ms(local_at))
        entity_type = "product"
        if kind == "update_conflict":
            remote = {"id": pid, "price": rng.choice(["8.20", "7.50", "8.40"]), "updatedAt": iso_ms(remote_at)}
            contested = "price"
            if rng.random() < 0.5:
                remote["name"] = name + " (new)"
                contested = "name, price"
            what = f"concurrent edit of {contested}"
        elif kind == "field_merge":
            remote = {"id": pid, "minStock": "8", "updatedAt": iso_ms(remote_at)}
            local["price"] = "8.10"
            what = None
        else:  # delete_conflict
            remote = {"id": pid, "deleted": True, "updatedAt": iso_ms(remote_at)}
            what = "remote delete against a local edit"
        if kind == "update_conflict" and rng.random() < 0.3:
            entity_type = "customer"
            local = {"id": pid, "name": "Marta Pérez", "email": "marta@example.org", "phone": "+34 600 111 222",
                     "notes": "Prefers oat milk", "createdAt": "2026-08-14T10:00:00.000Z", "updatedAt": iso_ms(local_at)}
            remote = {"id": pid, "phone": "+34 600 999 000", "notes": "Prefers oat milk; allergic to nuts",
                      "updatedAt": iso_ms(remote_at)}
            what = "concurrent edit of notes, phone"
        remote_newer = remote_at > local_at
        final = copy.deepcopy(local)
        open_ = strategy == "manual" and kind != "field_merge"
        if kind == "field_merge":
            final.update({k: v for k, v in remote.items() if k != "updatedAt"})
            final["updatedAt"] = iso_ms(max(local_at, remote_at))
            winner = "kept the newer version of each field"
        elif strategy == "manual":
            winner = "kept the local version; open for manual resolution"
        else:
            take_remote = strategy == "remote_wins" or (strategy == "last_write_wins" and remote_newer)
            if take_remote:
                if remote.get("deleted"):
                    final = {"id": pid, "deleted": True, "updatedAt": remote["updatedAt"]}
                else:
                    final.update(remote)
                winner = f"{strategy} took the remote version"
            else:
                winner = f"{strategy} kept the local version"
        if what is None:
            notes = (f"Concurrent edits of different fields (local {iso_ms(local_at)}, {peer['id']} "
                     f"{iso_ms(remote_at)}); both kept.")
        else:
            notes = f"{what} (local {iso_ms(local_at)}, {peer['id']} {iso_ms(remote_at)}): {winner}."
        conflict = {
            "id": self.next_conflict_id,
            "peerId": peer["id"], "peerName": peer["name"],
            "entityType": entity_type, "entityId": pid,
            "conflictType": kind,
            "localData": json.dumps(local), "remoteData": json.dumps(remote),
            "localUpdatedAt": iso_ms(local_at), "remoteUpdatedAt": iso_ms(remote_at),
            "resolutionStrategy": strategy,
            "finalData": json.dumps(final),
            "resolvedBy": None if open_ else "system",
            "resolvedAt": None if open_ else sql_time(created),
            "notes": notes,
            "createdAt": sql_time(created),
        }
        self.next_conflict_id += 1
        return conflict

    def _initial_conflicts(self, now):
        rng = random.Random(7)
        rows = []
        plan = [
            (240, 0, "update_conflict", "manual"),
            (520, 1, "update_conflict", "manual"),
            (900, 0, "update_conflict", "last_write_wins"),
            (1900, 1, "field_merge", "last_write_wins"),
            (3600, 0, "delete_conflict", "last_write_wins"),
            (5400, 2, "update_conflict", "last_write_wins"),
            (9000, 0, "update_conflict", "last_write_wins"),
            (20000, 1, "update_conflict", "remote_wins"),
            (40000, 2, "field_merge", "last_write_wins"),
            (70000, 0, "update_conflict", "last_write_wins"),
            (90000, 1, "delete_conflict", "local_wins"),
            (150000, 0, "update_conflict", "last_write_wins"),
        ]
        for age, peer_index, kind, strategy in reversed(plan):
            rows.append(self._make_conflict(now - timedelta(seconds=age), self.peers[peer_index], kind, strategy, rng))
        rows.reverse()  # newest first
        return rows

    def new_conflict(self):
        with self.lock:
            online = [p for p in self.peers if p["online"]] or self.peers
            strategy = "manual" if self.next_conflict_id % 3 == 0 else "last_write_wins"
            row = self._make_conflict(utcnow(), self.rng.choice(online), "update_conflict", strategy, self.rng)
            self.conflicts.insert(0, row)
            return copy.deepcopy(row)

    def resolve(self, conflict_id, body):
        """Returns (http_status, json_body)."""
        choice = body.get("choice") if isinstance(body, dict) else None
        resolved_by = body.get("resolvedBy") if isinstance(body, dict) else None
        if choice not in ("local", "remote"):
            return 400, error("invalid_request", "choice must be \"local\" or \"remote\"")
        if not isinstance(resolved_by, str) or not resolved_by.strip():
            return 400, error("invalid_request", "resolvedBy must be a non-empty string")
        with self.lock:
            row = next((c for c in self.conflicts if c["id"] == conflict_id), None)
            if row is None:
                return 404, error("not_found", f"conflict {conflict_id} does not exist")
            if row["resolvedBy"] is not None:
                return 409, error("already_resolved", f"conflict {conflict_id} was already resolved by {row['resolvedBy']}")
            local = json.loads(row["localData"])
            if choice == "local":
                final = local
            else:
                final = dict(local)
                final.update(json.loads(row["remoteData"]))
                if final.get("deleted"):
                    final = {"id": final["id"], "deleted": True, "updatedAt": final.get("updatedAt")}
            row["finalData"] = json.dumps(final)
            row["resolvedBy"] = resolved_by
            row["resolvedAt"] = sql_time(utcnow())
            side = "kept the local version" if choice == "local" else "took the remote version"
            row["notes"] = row["notes"] + f" Resolved by {resolved_by}: {side}."
            return 200, copy.deepcopy(row)

    # ---- live counters ---------------------------------------------------------

    def tick(self, dt, t=None):
        with self.lock:
            t = time.time() if t is None else t
            for peer in self.peers:
                conn = self.connections.get(peer["id"])
                if conn is None:
                    continue
                # Traffic in waves so the charts have something to show.
                wave = 1.0 + 0.8 * abs(((t / 40.0) % 2.0) - 1.0) + (3.0 if int(t / 90) % 4 == 0 else 0.0)
                out_msgs = max(0, int(self.rng.gauss(peer["rate"] * wave * dt, 1.0)))
                in_msgs = max(0, int(self.rng.gauss(peer["rate"] * wave * 0.9 * dt, 1.0)))
                conn["messagesSent"] += out_msgs
                conn["messagesReceived"] += in_msgs
                conn["bytesSent"] += out_msgs * self.rng.randint(380, 560)
                conn["bytesReceived"] += in_msgs * self.rng.randint(380, 560)
                now = datetime.fromtimestamp(t, timezone.utc)
                if int(t) % 5 == 0:
                    conn["lastPing"] = iso_ms(now)
                    conn["lastPong"] = iso_ms(now + timedelta(milliseconds=3))
                peer["lastSeen"] = iso_ms(now)

    def status(self):
        with self.lock:
            peers = [{k: p[k] for k in ("id", "name", "address", "online", "lastSeen")} for p in self.peers]
            return {
                "serverRunning": self.enabled,
                "connectedPeers": sum(1 for p in peers if p["online"]),
                "totalPeers": len(peers),
                "enabled": self.enabled,
                "posId": self.pos_id,
                "posName": self.pos_name,
                "peers": peers,
            }

    def stats(self):
        with self.lock:
            conns = [dict(c) for c in self.connections.values()]
            return {
                "connections": conns,
                "totalMessagesSent": sum(c["messagesSent"] for c in conns),
                "totalMessagesReceived": sum(c["messagesReceived"] for c in conns),
                "totalBytesSent": sum(c["bytesSent"] for c in conns),
                "totalBytesReceived": sum(c["bytesReceived"] for c in conns),
            }

    def dashboard(self):
        if self.empty:
            today = utcnow().date()
            return {
                "health": {"uptimePercent": None, "avgReconnectMs": None, "syncSuccessRate": None,
                           "conflictsPerHour": None},
                "history": {"daily": [{"day": (today - timedelta(days=13 - i)).isoformat(), "changes": 0,
                                       "conflicts": 0, "errors": 0} for i in range(14)],
                            "peers": []},
                "alerts": [],
            }
        rng = random.Random(11)
        today = utcnow().date()
        daily = []
        for i in range(14):
            day = today - timedelta(days=13 - i)
            weekend = day.weekday() >= 5
            changes = int(rng.gauss(5200 if weekend else 3400, 500))
            if i == 13:
                changes = int(changes * min(1.0, (utcnow().hour + 1) / 24))
            conflicts = max(0, int(rng.gauss(changes / 600, 2)))
            errors = max(0, int(rng.gauss(3, 2))) + (14 if i == 9 else 0)
            daily.append({"day": day.isoformat(), "changes": changes, "conflicts": conflicts, "errors": errors})
        with self.lock:
            open_conflicts = sum(1 for c in self.conflicts if c["resolvedBy"] is None)
        alerts = [
            {"level": "critical",
             "message": "Sync errors from Till 3 (terrace) are above normal: 14.1% of 85 changes in the last hour "
                        "failed (7-day share 0.6%)."},
            {"level": "warning",
             "message": "Sync with Till 2 (bar) is slower than usual: 612 ms average in the last hour, "
                        "2.6x the 7-day median of 236 ms."},
        ]
        if open_conflicts:
            alerts.append({"level": "warning",
                           "message": f"{open_conflicts} conflict(s) wait for a manual decision."})
        return {
            "health": {"uptimePercent": 97.84, "avgReconnectMs": 6420, "syncSuccessRate": 99.61,
                       "conflictsPerHour": 2.75},
            "history": {
                "daily": daily,
                "peers": [
                    {"peerId": self.peers[0]["id"], "peerName": self.peers[0]["name"], "reliability": 98,
                     "uptimePercent": 99.7, "failures": 1},
                    {"peerId": self.peers[1]["id"], "peerName": self.peers[1]["name"], "reliability": 84,
                     "uptimePercent": 93.2, "failures": 6},
                    {"peerId": self.peers[2]["id"], "peerName": self.peers[2]["name"], "reliability": 61,
                     "uptimePercent": 58.4, "failures": 17},
                ],
            },
            "alerts": alerts,
        }

    # ---- SSE fan-out -----------------------------------------------------------

    def subscribe(self):
        q = queue.Queue(maxsize=100)
        with self.lock:
            self.subscribers.append(q)
        return q

    def unsubscribe(self, q):
        with self.lock:
            if q in self.subscribers:
                self.subscribers.remove(q)

    def publish(self, event, data):
        with self.lock:
            subscribers = list(self.subscribers)
        for q in subscribers:
            try:
                q.put_nowait((event, data))
            except queue.Full:
                pass  # a stalled client misses events; it never blocks the others


def error(code, message):
    return {"error": {"code": code, "message": message}}


class Handler(BaseHTTPRequestHandler):
    server_version = "possync-mock/1"
    world = None  # set in main()
    options = None

    def log_message(self, fmt, *args):
        if self.options.verbose:
            super().log_message(fmt, *args)

    def send_json(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        url = urlparse(self.path)
        path = url.path
        if path in ROUTES:
            name, content_type = ROUTES[path]
            with open(os.path.join(ASSETS, name), "rb") as f:
                data = f.read()
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Content-Security-Policy", CSP)
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            self.wfile.write(data)
            return
        if self.options.latency:
            time.sleep(self.options.latency)
        if path == "/api/status":
            return self.send_json(200, self.world.status())
        if path == "/api/stats":
            return self.send_json(200, self.world.stats())
        if path == "/api/dashboard":
            return self.send_json(200, self.world.dashboard())
        if path == "/api/conflicts":
            query = parse_qs(url.query)
            try:
                limit = int(query.get("limit", ["50"])[0])
                offset = int(query.get("offset", ["0"])[0])
            except ValueError:
                return self.send_json(400, error("invalid_request", "limit and offset must be integers"))
            if not (1 <= limit <= 500) or offset < 0:
                return self.send_json(400, error("invalid_request", "limit must be 1..500 and offset >= 0"))
            with self.world.lock:
                rows = copy.deepcopy(self.world.conflicts[offset:offset + limit])
            return self.send_json(200, rows)
        if path == "/api/events":
            return self.stream_events()
        return self.send_json(404, error("not_found", f"no route for GET {path}"))

    def do_POST(self):
        path = urlparse(self.path).path
        match = re.fullmatch(r"/api/conflicts/(\d+)/resolve", path)
        if not match:
            return self.send_json(404, error("not_found", f"no route for POST {path}"))
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw or b"null")
        except ValueError:
            return self.send_json(400, error("invalid_json", "the body is not valid JSON"))
        if self.options.latency:
            time.sleep(self.options.latency)
        status, answer = self.world.resolve(int(match.group(1)), body)
        self.send_json(status, answer)

    def stream_events(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Accel-Buffering", "no")
        self.end_headers()
        q = self.world.subscribe()
        started = time.time()
        try:
            self.wfile.write(b"retry: 2000\n\n")
            if self.options.backfill:
                for past in self.world.history:
                    self.write_event("stats", past)
            first = self.stats_event()
            self.write_event("stats", first)
            last_now = first["now"]
            while True:
                if self.options.sse_max_seconds and time.time() - started > self.options.sse_max_seconds:
                    return  # drop the stream: the page must show "reconnecting" and recover
                try:
                    event, data = q.get(timeout=15)
                except queue.Empty:
                    self.wfile.write(b": keep-alive\n\n")
                    self.wfile.flush()
                    continue
                if event == "stats":
                    if data["now"] <= last_now:
                        continue  # published before the first event of this stream
                    last_now = data["now"]
                self.write_event(event, data)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            pass
        finally:
            self.world.unsubscribe(q)
            self.close_connection = True

    def stats_event(self):
        # The counters change once a second, at the tick: stamp them with the tick's time.
        return self.world.last_event or {"now": int(time.time() * 1000), "status": self.world.status(),
                                         "stats": self.world.stats()}

    def write_event(self, event, data):
        payload = json.dumps(data, separators=(",", ":"))
        self.wfile.write(f"event: {event}\ndata: {payload}\n\n".encode())
        self.wfile.flush()


def ticker(world, options, stop):
    last = time.time()
    next_conflict = time.time() + options.conflict_every
    while not stop.wait(1.0 - (time.time() % 1.0)):
        now = time.time()
        world.tick(now - last)
        last = now
        world.last_event = {"now": int(now * 1000), "status": world.status(), "stats": world.stats()}
        world.publish("stats", world.last_event)
        if options.conflict_every and now >= next_conflict and not world.empty:
            next_conflict = now + options.conflict_every
            world.publish("conflict", world.new_conflict())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8931, help="port on 127.0.0.1 (default 8931)")
    parser.add_argument("--empty", action="store_true", help="a node with no peers and no history yet")
    parser.add_argument("--conflict-every", type=float, default=25.0,
                        help="seconds between new conflicts (0: never; default 25)")
    parser.add_argument("--sse-max-seconds", type=float, default=0,
                        help="close each event stream after this many seconds (0: never)")
    parser.add_argument("--latency", type=float, default=0, help="seconds of delay on every API answer")
    parser.add_argument("--backfill", action="store_true",
                        help="replay 5 minutes of past `stats` events to each new stream (for screenshots)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--verbose", action="store_true", help="log every request")
    options = parser.parse_args()

    world = World(options.empty, options.seed)
    if options.backfill and not options.empty:
        world.simulate_past(300)
    Handler.world = world
    Handler.options = options
    server = ThreadingHTTPServer(("127.0.0.1", options.port), Handler)
    server.daemon_threads = True
    stop = threading.Event()
    threading.Thread(target=ticker, args=(world, options, stop), daemon=True).start()
    print(f"possync dashboard mock on http://127.0.0.1:{server.server_address[1]}/", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        server.server_close()


if __name__ == "__main__":
    main()
