#!/usr/bin/env node
// The possync dashboard in Debian's Chromium (driven by playwright-core, which downloads no
// browser), against a live node: normally terminal A of the two-terminal cluster that
// scripts/browser-test.sh starts, or the mock server (tests/dashboard/mock_server.py) while
// developing. Prints one line per check and `N passed, N failed`; the exit code is the result.
//
// Environment:
//   DASHBOARD_URL   the node's API base, e.g. http://127.0.0.1:3031 (required; 127.0.0.1 only)
//   PEER_ID         the peer whose card must show (default: the first card)
//   SELL_URLS       comma-separated API bases where the test sells in the background, so that
//                   the counters move (default: none; the mock's counters rise on their own)
//   SELL_PRODUCT_ID the product those sales sell (required with SELL_URLS)
//   CONFLICT_ID     the open conflict to resolve (default: the first open one listed)
//   CHECK_RECORD    "1": after the resolve, the record on the node carries the remote values
//   SCREENSHOT_DIR  where dashboard.png (1280x800) and dashboard-small.png (800x480) go
//                   (default: a temporary directory; the conflict's detail, open and
//                   resolved, always goes to a temporary directory)
//   CHART_SECONDS   how long the charts gather data before the screenshots (default 30)
//   CHROMIUM        the browser (default /usr/bin/chromium)
//   HQ_URL          a chain's head office API base: its dashboard must show the Stores
//                   section (one row per store, the stock lookup); without it that check is
//                   skipped, saying so

import { chromium } from "playwright-core";
import { mkdtempSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const LOCAL = /^http:\/\/127\.0\.0\.1:\d+(\/|$)/;
const base = (process.env.DASHBOARD_URL || "").replace(/\/+$/, "");
if (!LOCAL.test(base + "/")) {
  console.error("DASHBOARD_URL must be http://127.0.0.1:PORT (this test talks to nothing else)");
  process.exit(2);
}
const sellUrls = (process.env.SELL_URLS || "").split(",").map((u) => u.trim().replace(/\/+$/, "")).filter(Boolean);
for (const url of sellUrls) {
  if (!LOCAL.test(url + "/")) {
    console.error(`SELL_URLS: ${url} is not http://127.0.0.1:PORT`);
    process.exit(2);
  }
}
// A chain's head office (e.g. `possync demo --chain --api-port P`): its Stores section.
const hqBase = (process.env.HQ_URL || "").replace(/\/+$/, "");
if (hqBase && !LOCAL.test(hqBase + "/")) {
  console.error("HQ_URL must be http://127.0.0.1:PORT (this test talks to nothing else)");
  process.exit(2);
}
const sellProduct = process.env.SELL_PRODUCT_ID || "";
if (sellUrls.length && !sellProduct) {
  console.error("SELL_URLS needs SELL_PRODUCT_ID");
  process.exit(2);
}
const screenshotDir = process.env.SCREENSHOT_DIR || mkdtempSync(join(tmpdir(), "possync-shots-"));
// The conflict's detail before and after the resolve: for a person looking into a failure.
const extraShotDir = mkdtempSync(join(tmpdir(), "possync-conflict-shots-"));
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";

const started = Date.now();
const elapsed = () => `  [${((Date.now() - started) / 1000).toFixed(1)} s]`;
let passed = 0;
let failed = 0;
function check(ok, what, detail) {
  if (ok) {
    passed += 1;
    console.log(`  ok    ${what}${elapsed()}`);
  } else {
    failed += 1;
    console.log(`  FAIL  ${what}${detail ? ` (${detail})` : ""}${elapsed()}`);
  }
  return ok;
}

async function api(method, url, body) {
  if (!LOCAL.test(url)) throw new Error(`refusing to call ${url}`);
  const response = await fetch(url, {
    method,
    headers: body === undefined ? {} : { "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = text;
  }
  if (!response.ok) throw new Error(`${method} ${url}: ${response.status} ${text.slice(0, 200)}`);
  return data;
}

async function waitFor(what, fn, timeoutMs, everyMs = 250) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      last = await fn();
      if (last) return last;
    } catch (error) {
      last = error;
    }
    if (Date.now() > deadline) return null;
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

// Background sales: one small ticket at a time, round robin over SELL_URLS, until stopped.
const seller = { running: false, sold: 0, errors: [], done: null };
function startSelling() {
  if (!sellUrls.length) return;
  seller.running = true;
  seller.done = (async () => {
    let i = 0;
    while (seller.running) {
      const url = sellUrls[i++ % sellUrls.length];
      try {
        await api("POST", `${url}/api/tickets`, {
          lines: [{ productId: sellProduct, quantity: 1 }],
          payments: [{ method: "cash", amount: 1.5 }],
        });
        seller.sold += 1;
      } catch (error) {
        if (seller.errors.length < 5) seller.errors.push(String(error.message || error));
      }
      // A rate that swells and ebbs (every 20 s), so that the charts show a shape.
      const wave = 0.5 + 0.5 * Math.sin(((Date.now() - started) / 20000) * 2 * Math.PI);
      await new Promise((r) => setTimeout(r, 80 + 600 * wave));
    }
  })();
}
async function stopSelling() {
  seller.running = false;
  if (seller.done) await seller.done;
}

async function counter(page, peerId, field) {
  const value = await page.getAttribute(`[data-peer-id="${peerId}"] [data-field="${field}"]`, "data-value").catch(() => null);
  return value === null || value === "" ? null : Number(value);
}

function parse(snapshot) {
  if (typeof snapshot !== "string") return snapshot && typeof snapshot === "object" ? snapshot : null;
  try {
    const value = JSON.parse(snapshot);
    return value && typeof value === "object" && !Array.isArray(value) ? value : null;
  } catch {
    return null;
  }
}

// Equal as JSON, or as numbers when both are numeric ("2.40" and 2.4 are the same price).
function same(a, b) {
  if (JSON.stringify(a) === JSON.stringify(b)) return true;
  const numeric = (v) => (typeof v === "number" || (typeof v === "string" && v.trim() !== "")) && Number.isFinite(Number(v));
  return numeric(a) && numeric(b) && Number(a) === Number(b);
}

function shown(value) {
  return typeof value === "string" ? value : JSON.stringify(value);
}

const userDataDir = mkdtempSync(join(tmpdir(), "possync-chromium-"));
const pageErrors = [];
const blocked = [];
let context;

async function newPage(width, height) {
  const page = await context.newPage();
  await page.setViewportSize({ width, height });
  page.on("pageerror", (error) => pageErrors.push(`pageerror: ${error.message}`));
  page.on("console", (message) => {
    if (message.type() === "error") pageErrors.push(`console: ${message.text()}`);
  });
  return page;
}

async function main() {
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath,
    headless: true,
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
    viewport: { width: 1280, height: 800 },
  });
  // The page must reach nothing but the node: every other request is refused and reported.
  await context.route("**/*", (route) => {
    const url = route.request().url();
    if (url.startsWith(base + "/") || (hqBase && url.startsWith(hqBase + "/"))) return route.continue();
    blocked.push(url);
    return route.abort();
  });
  for (const stale of context.pages()) await stale.close();

  const status = await api("GET", `${base}/api/status`);
  console.log(`dashboard of ${status.posName} (${status.posId}) at ${base}/`);

  const page = await newPage(1280, 800);
  await page.goto(`${base}/`);
  const live = await page.waitForSelector('#live-badge[data-live="live"]', { timeout: 15000 }).catch(() => null);
  check(live !== null, "live badge turns Live (the event stream delivers stats)",
    `badge is ${await page.getAttribute("#live-badge", "data-live").catch(() => "?")}`);
  check((await page.innerText("#pos-name")) === status.posName, `header shows the terminal's name "${status.posName}"`);

  // The peer's card and its counters, rising while the till sells.
  const peerId = process.env.PEER_ID || (await page.getAttribute("#peer-cards [data-peer-id]", "data-peer-id").catch(() => null));
  const card = peerId
    ? await page.waitForSelector(`[data-peer-id="${peerId}"]`, { timeout: 15000 }).catch(() => null)
    : null;
  check(card !== null, `peer card [data-peer-id="${peerId}"] appears`);
  const online = await waitFor("online", async () =>
    (await page.getAttribute(`[data-peer-id="${peerId}"]`, "data-online")) === "true", 15000);
  check(online, "the peer is shown Online");
  const fields = ["messagesSent", "messagesReceived", "bytesSent", "bytesReceived", "reconnectAttempts", "lastPing", "lastPong"];
  const missing = [];
  for (const field of fields) {
    if (!(await page.$(`[data-peer-id="${peerId}"] [data-field="${field}"]`))) missing.push(field);
  }
  check(missing.length === 0, "the card has every counter field", `missing ${missing.join(", ")}`);

  // The till-sized page opens now too, so that its charts gather the same data.
  const small = await newPage(800, 480);
  await small.goto(`${base}/`);

  startSelling();
  const chartsFrom = Date.now();
  const sentBefore = await counter(page, peerId, "messagesSent");
  const receivedBefore = await counter(page, peerId, "messagesReceived");
  const bytesBefore = await counter(page, peerId, "bytesSent");
  const rose = await waitFor("rise", async () => {
    const sent = await counter(page, peerId, "messagesSent");
    const received = await counter(page, peerId, "messagesReceived");
    const bytes = await counter(page, peerId, "bytesSent");
    return sent > sentBefore && bytes > bytesBefore && (sellUrls.length < 2 || received > receivedBefore)
      ? { sent, received, bytes }
      : null;
  }, 20000);
  check(sentBefore !== null && rose !== null && rose.sent > sentBefore,
    `messagesSent rises live (${sentBefore} -> ${rose ? rose.sent : await counter(page, peerId, "messagesSent")})`,
    seller.errors.join("; "));
  if (sellUrls.length >= 2) {
    check(rose !== null && rose.received > receivedBefore,
      `messagesReceived rises live (${receivedBefore} -> ${rose ? rose.received : await counter(page, peerId, "messagesReceived")})`);
  }
  check(bytesBefore !== null && rose !== null && rose.bytes > bytesBefore,
    `bytesSent rises live (${bytesBefore} -> ${rose ? rose.bytes : await counter(page, peerId, "bytesSent")})`);
  // The card's counters agree with the API (they may have moved on by one event since).
  // (Retried: a connection replaced in between starts its counters again from 0.)
  let shownSent = null;
  let apiConnection = null;
  const agrees = await waitFor("agreement", async () => {
    shownSent = await counter(page, peerId, "messagesSent");
    const apiStats = await api("GET", `${base}/api/stats`);
    apiConnection = (apiStats.connections || []).find((c) => c.peerId === peerId) || null;
    return apiConnection && shownSent > 0 && shownSent <= apiConnection.messagesSent && apiConnection.messagesSent - shownSent <= 20;
  }, 5000, 500);
  check(agrees, `the card's messagesSent (${shownSent}) is the node's (${apiConnection ? apiConnection.messagesSent : "no connection"}) or just behind it`);

  // Let the rate charts gather some traffic, then the screenshots.
  const chartMs = 1000 * Number(process.env.CHART_SECONDS || 30);
  await page.waitForTimeout(Math.max(0, chartsFrom + chartMs - Date.now()));
  check((await page.$("#chart-messages svg path.series.out")) !== null, "messages/s chart has a line");
  check((await page.$("#chart-bandwidth svg path.series.out")) !== null, "bandwidth chart has a line");
  const tiles = await page.$$eval("[data-kpi]", (kpis) =>
    kpis.map((k) => `${k.getAttribute("data-kpi")}=${k.querySelector(".kpi-value").getAttribute("data-value")}`));
  const health = (await api("GET", `${base}/api/dashboard`)).health || {};
  console.log(`  info  health tiles ${tiles.join(" ")}; /api/dashboard now ${JSON.stringify(health)}`);
  await page.evaluate(() => window.scrollTo(0, 0));
  await page.screenshot({ path: join(screenshotDir, "dashboard.png") });
  check(statSync(join(screenshotDir, "dashboard.png")).size > 0, `screenshot ${join(screenshotDir, "dashboard.png")}`);

  const smallLive = await small.$('#live-badge[data-live="live"]');
  const smallCard = await small.$(`[data-peer-id="${peerId}"]`);
  check(smallLive !== null && smallCard !== null, "at 800x480 the page is live and shows the peer's card");
  const width = await small.evaluate(() => document.documentElement.scrollWidth);
  check(width <= 800, `no horizontal scroll at 800x480 (scrollWidth ${width})`);
  await small.evaluate(() => window.scrollTo(0, 0));
  await small.screenshot({ path: join(screenshotDir, "dashboard-small.png") });
  check(statSync(join(screenshotDir, "dashboard-small.png")).size > 0, `screenshot ${join(screenshotDir, "dashboard-small.png")}`);
  await small.close();
  await stopSelling();
  if (sellUrls.length) check(seller.sold > 0, `background sales went through (${seller.sold} tickets)`, seller.errors.join("; "));

  // The provoked conflict: listed, its two versions side by side, resolved from the page.
  const conflicts = await api("GET", `${base}/api/conflicts?limit=50`);
  const wanted = process.env.CONFLICT_ID
    ? conflicts.find((c) => String(c.id) === process.env.CONFLICT_ID)
    : conflicts.find((c) => c.resolvedBy === null);
  if (!check(wanted !== undefined, `the API lists an open conflict${process.env.CONFLICT_ID ? ` (id ${process.env.CONFLICT_ID})` : ""}`)) {
    return;
  }
  const id = String(wanted.id);
  const row = await page.waitForSelector(`tr[data-conflict-id="${id}"]`, { timeout: 10000 }).catch(() => null);
  check(row !== null, `conflict ${id} is in the history (tr[data-conflict-id="${id}"])`);
  if (!row) return;
  check((await row.getAttribute("data-open")) === "true", "it is marked open", await row.innerText());
  await row.scrollIntoViewIfNeeded();
  await row.click();
  const detail = await page.waitForSelector(`.conflict-detail[data-detail-for="${id}"]`, { timeout: 5000 }).catch(() => null);
  check(detail !== null, "clicking it opens its detail");
  check((await page.getAttribute(`tr[data-conflict-id="${id}"]`, "aria-expanded")) === "true", "the row says it is expanded");
  if (detail) {
    const heads = await detail.$$eval("table.diff thead th", (ths) => ths.map((th) => th.textContent));
    check(heads.some((h) => h.startsWith("Local")) && heads.some((h) => h.startsWith("Remote")),
      `the detail has Local and Remote columns side by side (${heads.join(" | ")})`);
    const local = parse(wanted.localData) || {};
    const remote = parse(wanted.remoteData) || {};
    const differing = Object.keys(local).filter((k) => k in remote && JSON.stringify(local[k]) !== JSON.stringify(remote[k]));
    const highlighted = await detail.$$eval('tr[data-differs="true"]', (trs) => trs.map((tr) => tr.getAttribute("data-key")));
    const differingFields = differing.filter((k) => k !== "updatedAt");
    check(differingFields.length > 0 && differingFields.every((k) => highlighted.includes(k)),
      `fields that differ are highlighted (${highlighted.join(", ")}; API: ${differing.join(", ")})`);
    for (const key of differingFields) {
      const cells = await detail.$$eval(`tr[data-key="${key}"] td`, (tds) => tds.map((td) => td.textContent));
      check(cells[0] === shown(local[key]) && cells[1] === shown(remote[key]),
        `${key}: local ${shown(local[key])} and remote ${shown(remote[key])} shown side by side`, JSON.stringify(cells));
    }
    await detail.scrollIntoViewIfNeeded();
    await page.screenshot({ path: join(extraShotDir, "conflict-open.png") });
  }

  const resolveButton = await page.$(`[data-detail-for="${id}"] [data-action="resolve-remote"]`);
  check(resolveButton !== null, "an open conflict offers Take remote");
  if (!resolveButton) return;
  await resolveButton.click();
  const closed = await page.waitForSelector(`tr[data-conflict-id="${id}"][data-open="false"]`, { timeout: 10000 }).catch(() => null);
  check(closed !== null, "after Take remote the row is marked resolved");
  if (closed) {
    const text = await closed.innerText();
    check(text.includes("Resolved · dashboard"), "the row says Resolved · dashboard", text);
  }
  const message = await page.innerText(`.conflict-detail[data-detail-for="${id}"]`).catch(() => "");
  check(message.includes("remote version was taken"), "the detail confirms the remote version was taken");
  const after = await api("GET", `${base}/api/conflicts?limit=50`);
  const resolved = after.find((c) => String(c.id) === id);
  check(resolved && resolved.resolvedBy === "dashboard",
    `the API shows conflict ${id} resolved by "dashboard"`, resolved ? `resolvedBy ${JSON.stringify(resolved.resolvedBy)}` : "not listed");
  if (resolved) {
    const final = parse(resolved.finalData) || {};
    const remote = parse(wanted.remoteData) || {};
    const keys = Object.keys(remote).filter((k) => k !== "id" && k !== "updatedAt");
    check(keys.length > 0 && keys.every((k) => same(final[k], remote[k])),
      `its finalData is the remote version (${keys.map((k) => `${k}=${shown(final[k])}`).join(", ")})`);
  }
  if (process.env.CHECK_RECORD === "1" && wanted.entityType === "product") {
    const local = parse(wanted.localData) || {};
    const remote = parse(wanted.remoteData) || {};
    const keys = Object.keys(remote).filter((k) => k in local && k !== "updatedAt" && !same(local[k], remote[k]));
    let product = null;
    const record = await waitFor("record", async () => {
      product = await api("GET", `${base}/api/products/${wanted.entityId}`);
      return keys.every((k) => same(product[k], remote[k])) ? product : null;
    }, 5000);
    check(keys.length > 0 && record !== null,
      `the product on the node now carries the remote ${keys.map((k) => `${k} ${shown(remote[k])}`).join(", ")}`,
      product ? keys.map((k) => `${k} is ${shown(product[k])}`).join(", ") : "");
  }
  await page.screenshot({ path: join(extraShotDir, "conflict-resolved.png") });
  await page.close();
}

// The Stores section: hidden on a shop's till, shown on a head office with its stores.
async function checkHeadOffice() {
  const shop = await newPage(1280, 800);
  await shop.goto(`${base}/`);
  await shop.waitForSelector("#pos-name", { timeout: 10000 });
  await new Promise((r) => setTimeout(r, 2000));
  check(await shop.isHidden("#chain"), "a shop till's dashboard has no Stores section");
  await shop.close();
  if (!hqBase) {
    console.log("  SKIP  the head office's Stores section (no HQ_URL: no nats-server for the chain demo)");
    return;
  }
  const stores = await api("GET", `${hqBase}/api/chain/stores`);
  const page = await newPage(1280, 800);
  await page.goto(`${hqBase}/`);
  const section = await page.waitForSelector("#chain:not([hidden])", { timeout: 15000 }).catch(() => null);
  check(section !== null, "the head office's dashboard shows its Stores section");
  const rows = await waitFor("store rows", async () => {
    const count = await page.locator("#chain-stores-body tr[data-store-id]").count();
    return count >= stores.length && count > 0 ? count : null;
  }, 15000);
  check(rows !== null, `one row per store (${stores.map((store) => store.storeId).join(", ")})`, `${rows} rows`);
  const busiest = stores.reduce((a, b) => (b.tickets > a.tickets ? b : a), stores[0]);
  const shownTickets = Number(
    (await page.innerText(`#chain-stores-body tr[data-store-id="${busiest.storeId}"] [data-field="tickets"]`).catch(() => ""))
      .replace(/[^0-9]/g, "")
  );
  check(busiest.tickets > 0 && shownTickets >= busiest.tickets,
    `store ${busiest.storeId}'s row shows its tickets (${busiest.tickets} or more, sales go on)`, `shows ${shownTickets}`);
  const reporting = stores.find((store) => store.uplink);
  const uplinkShown = reporting
    ? await page.innerText(`#chain-stores-body tr[data-store-id="${reporting.storeId}"] [data-field="uplink"]`).catch(() => "")
    : "";
  check(reporting !== undefined && /^(online|offline since)/.test(uplinkShown),
    `store ${reporting ? reporting.storeId : "?"}'s row shows its uplink (its tills report)`, `shows "${uplinkShown}"`);
  const conflictsShown = reporting
    ? await page.innerText(`#chain-stores-body tr[data-store-id="${reporting.storeId}"] [data-field="conflicts"]`).catch(() => "")
    : "";
  check(/^[0-9,]+ in 24 h/.test(conflictsShown),
    `store ${reporting ? reporting.storeId : "?"}'s row shows its conflicts summary`, `shows "${conflictsShown}"`);
  // Sales per store per day: 7 day rows; today's cell of the busiest store shows its total.
  const dayRows = await page.locator("#chain-sales-body tr[data-day]").count();
  const today = new Date().toISOString().slice(0, 10);
  const todays = (busiest.salesPerDay || []).find((day) => day.day === today);
  const todayCell = await page
    .innerText(`#chain-sales-body tr[data-day="${today}"] td[data-store-id="${busiest.storeId}"]`)
    .catch(() => "");
  check(dayRows === 7 && todays !== undefined && /^[0-9.]+ \([0-9,]+\)$/.test(todayCell.trim()),
    `sales per store per day: 7 days, today's sales of ${busiest.storeId}`, `${dayRows} rows, today "${todayCell}"`);
  const products = await api("GET", `${hqBase}/api/products`);
  const list = Array.isArray(products) ? products : products.items || products.data || [];
  const productId = list.length ? list[0].id : "";
  await page.fill("#chain-stock-product", productId);
  await page.click('#chain-stock-form button[type="submit"]');
  const table = await page.waitForSelector("#chain-stock-table:not([hidden])", { timeout: 10000 }).catch(() => null);
  const stock = await api("GET", `${hqBase}/api/chain/stock?productId=${encodeURIComponent(productId)}`);
  const stockRows = await page.locator("#chain-stock-body tr[data-store-id]").count();
  check(table !== null && stockRows === stock.stores.length && (await page.innerText("#chain-stock-total")).trim() !== "—",
    `the stock of ${productId} per store (${stock.stores.length}) and for the chain`, `${stockRows} rows`);
  await page.screenshot({ path: join(extraShotDir, "head-office.png") });
  await page.close();
}

try {
  await main();
  await checkHeadOffice();
} catch (error) {
  check(false, "the test ran to its end", error.stack || String(error));
} finally {
  await stopSelling().catch(() => {});
  if (context) await context.close().catch(() => {});
  rmSync(userDataDir, { recursive: true, force: true });
}
check(pageErrors.length === 0, "no errors in the page", pageErrors.slice(0, 5).join("; "));
check(blocked.length === 0, "the page requested nothing but the node", blocked.slice(0, 5).join(", "));
console.log(`screenshots in ${screenshotDir} (the conflict's detail in ${extraShotDir}); ${((Date.now() - started) / 1000).toFixed(1)} s`);
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed === 0 && passed > 0 ? 0 : 1);
