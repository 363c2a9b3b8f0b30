#!/usr/bin/env python3
"""Drives the dashboard in a real headless Chromium against the mock server.

Checks what a person would: the header, live-rising peer counters, the rate charts,
the conflict table, a conflict's side-by-side detail, resolving an open conflict
through the buttons, the "reconnecting" badge when the event stream drops, and the
"—" of a node with no data yet. Saves screenshots (never committed) on the way.

Needs the `playwright` Python package and a Chromium (Debian: `apt-get install
chromium`); no browser download: it uses the system Chromium. Skips (exit 0) when
either is missing, unless --require is given.

    python3 tests/dashboard/browser_check.py [--out /tmp/dashboard-shots] [--require]
"""

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MOCK = os.path.join(HERE, "mock_server.py")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Mock:
    """The mock server in a child process, on a free 127.0.0.1 port."""

    def __init__(self, *flags):
        self.port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, MOCK, "--port", str(self.port), *flags],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        line = self.process.stdout.readline()
        if "http://127.0.0.1" not in line:
            self.stop()
            raise RuntimeError(f"mock server did not start: {line!r}")
        self.url = f"http://127.0.0.1:{self.port}/"

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def chromium_path():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def check(condition, what):
    if not condition:
        raise AssertionError(what)
    print(f"  ok  {what}")


def counter(page, peer_id, field):
    value = page.get_attribute(f'[data-peer-id="{peer_id}"] [data-field="{field}"]', "data-value")
    return int(value) if value else None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/dashboard-shots", help="where screenshots go")
    parser.add_argument("--require", action="store_true", help="fail instead of skipping without a browser")
    options = parser.parse_args()

    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("skip: the playwright Python package is not installed")
        return 1 if options.require else 0
    browser_path = chromium_path()
    if not browser_path:
        print("skip: no chromium on PATH")
        return 1 if options.require else 0
    os.makedirs(options.out, exist_ok=True)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox", "--disable-gpu"])
        errors = []

        def new_page(width, height):
            page = browser.new_page(viewport={"width": width, "height": height})
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            # The page must never reach beyond its own origin.
            page.route("**/*", lambda route: route.continue_()
                       if route.request.url.startswith("http://127.0.0.1:") else route.abort())
            return page

        print("live node (mock with 5 minutes of history)")
        with Mock("--backfill", "--conflict-every", "6") as mock:
            page = new_page(1280, 800)
            page.goto(mock.url)
            page.wait_for_selector('#live-badge[data-live="live"]', timeout=10000)
            check(page.inner_text("#pos-name") == "Till 1 (front)", "header shows posName")
            check("2 of 3 peers connected" in page.inner_text("#peers-badge"), "header shows connected peers")
            check(page.inner_text("#p2p-badge") == "P2P enabled", "header shows P2P enabled")
            check(len(page.query_selector_all("#peer-cards [data-peer-id]")) == 3, "one card per peer")
            peer = page.get_attribute("#peer-cards [data-peer-id]", "data-peer-id")
            before = counter(page, peer, "messagesSent")
            page.wait_for_timeout(2500)
            after = counter(page, peer, "messagesSent")
            check(before is not None and after > before, f"messagesSent rises live ({before} -> {after})")
            for field in ("messagesReceived", "bytesSent", "bytesReceived", "reconnectAttempts", "lastPing", "lastPong"):
                check(page.query_selector(f'[data-peer-id="{peer}"] [data-field="{field}"]') is not None,
                      f"peer card has data-field={field}")
            check(page.query_selector("#chart-messages svg path.series.out") is not None, "messages/s chart drawn")
            check(page.query_selector("#chart-bandwidth svg path.series.in") is not None, "bandwidth chart drawn")
            check(page.inner_text('[data-kpi="uptimePercent"] .kpi-value') == "97.8%", "uptime KPI")
            check(len(page.query_selector_all("#alerts-list li[data-level]")) >= 2, "alerts listed")
            check(len(page.query_selector_all("#chart-daily rect.bar")) == 14, "14 daily bars")
            page.screenshot(path=os.path.join(options.out, "dashboard-1280x800.png"))
            page.screenshot(path=os.path.join(options.out, "dashboard-1280-full.png"), full_page=True)

            rows = page.query_selector_all("tr[data-conflict-id]")
            check(len(rows) >= 12, f"conflict rows listed ({len(rows)})")
            open_row = page.query_selector('tr[data-conflict-id][data-open="true"]')
            check(open_row is not None, "an open conflict is listed")
            conflict_id = open_row.get_attribute("data-conflict-id")
            open_row.click()
            page.wait_for_selector('[data-action="resolve-remote"]')
            check(len(page.query_selector_all(".diff tr.differs")) >= 1, "differing fields highlighted")
            check(page.query_selector('[data-action="resolve-local"]') is not None, "Keep local button")
            page.query_selector(f'tr[data-conflict-id="{conflict_id}"]').scroll_into_view_if_needed()
            page.screenshot(path=os.path.join(options.out, "conflict-open.png"))
            page.click('[data-action="resolve-remote"]')
            page.wait_for_selector(f'tr[data-conflict-id="{conflict_id}"][data-open="false"]', timeout=5000)
            check("Resolved · dashboard" in page.inner_text(f'tr[data-conflict-id="{conflict_id}"]'),
                  "resolved by the dashboard")
            check("remote version was taken" in page.inner_text(".conflict-detail"), "resolution confirmed in detail")
            page.screenshot(path=os.path.join(options.out, "conflict-resolved.png"))

            count = len(page.query_selector_all("tr[data-conflict-id]"))
            deadline = time.time() + 12
            while len(page.query_selector_all("tr[data-conflict-id]")) <= count and time.time() < deadline:
                page.wait_for_timeout(250)
            check(len(page.query_selector_all("tr[data-conflict-id]")) > count, "a `conflict` event adds a row live")

            small = new_page(800, 480)
            small.goto(mock.url)
            small.wait_for_selector('#live-badge[data-live="live"]', timeout=10000)
            small.wait_for_timeout(1500)
            width = small.evaluate("document.documentElement.scrollWidth")
            check(width <= 800, f"no horizontal scroll at 800x480 (scrollWidth {width})")
            small.screenshot(path=os.path.join(options.out, "dashboard-800x480.png"))
            small.screenshot(path=os.path.join(options.out, "dashboard-800-full.png"), full_page=True)
            small.click('tr[data-conflict-id]')
            small.wait_for_selector(".conflict-detail")
            small.query_selector(".conflict-detail").scroll_into_view_if_needed()
            small.screenshot(path=os.path.join(options.out, "conflict-800x480.png"))
            page.close()
            small.close()

        print("event stream that drops")
        with Mock("--sse-max-seconds", "2", "--conflict-every", "0") as mock:
            page = new_page(1280, 800)
            page.goto(mock.url)
            page.wait_for_selector('#live-badge[data-live="live"]', timeout=10000)
            page.wait_for_selector('#live-badge[data-live="reconnecting"]', timeout=10000)
            check("Reconnecting" in page.inner_text("#live-badge"), "badge says reconnecting while disconnected")
            page.wait_for_selector('#live-badge[data-live="live"]', timeout=10000)
            check(True, "badge is live again after the reconnect")
            page.close()

        print("new node without data")
        with Mock("--empty") as mock:
            page = new_page(1280, 800)
            page.goto(mock.url)
            page.wait_for_selector('#live-badge[data-live="live"]', timeout=10000)
            page.wait_for_timeout(1000)
            check(page.inner_text('[data-kpi="avgReconnectMs"] .kpi-value') == "—", "null KPI shows —")
            check("No conflicts" in page.inner_text("#conflicts-body"), "empty conflict list explained")
            page.screenshot(path=os.path.join(options.out, "dashboard-empty.png"), full_page=True)
            page.close()

        browser.close()
        check(not errors, f"no page errors ({errors[:3]})")
    print(f"screenshots in {options.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
