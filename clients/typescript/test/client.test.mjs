// The client against a real possync node: `possync init` into a temporary directory, then
// `possync run` with discovery off, the API on a free port of 127.0.0.1. The binary:
// $POSSYNC_BIN, else ../../target/debug/possync. Run with `npm test` after `npm run build`.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

import { createPossync, PossyncError, unwrap } from "../dist/index.js";

const here = dirname(fileURLToPath(import.meta.url));
const BIN = process.env.POSSYNC_BIN || resolve(here, "../../../target/debug/possync");
const SECRET = "ts-client-test-secret-4b8e1f0a93c7";

function freePort() {
  return new Promise((ok, fail) => {
    const server = createServer();
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => ok(port));
    });
    server.on("error", fail);
  });
}

const sleep = (ms) => new Promise((ok) => setTimeout(ok, ms));

/** One terminal: its directory, its API port, its process. */
class Till {
  constructor() {
    this.dir = mkdtempSync(join(tmpdir(), "possync-ts-"));
    this.data = join(this.dir, "till");
  }

  async init() {
    this.apiPort = await freePort();
    execFileSync(BIN, ["init", "--data-dir", this.data, "--name", "TS till", "--secret", SECRET,
      "--port", "0", "--api-port", String(this.apiPort)], { stdio: "pipe" });
    this.baseUrl = `http://127.0.0.1:${this.apiPort}`;
  }

  async start() {
    this.process = spawn(BIN, ["run", "--no-discovery", "--port", "0", "--api-port", String(this.apiPort),
      "--data-dir", this.data], { env: { ...process.env, POSSYNC_LOG: "warn" }, stdio: ["ignore", "ignore", "pipe"] });
    this.exited = new Promise((ok) => this.process.on("exit", ok));
    const deadline = Date.now() + 30_000;
    for (;;) {
      try {
        const response = await fetch(`${this.baseUrl}/api/status`);
        if (response.ok) return;
      } catch {
        // not listening yet
      }
      assert.ok(Date.now() < deadline, "the node did not answer in 30 s");
      await sleep(100);
    }
  }

  async stop() {
    if (!this.process || this.process.exitCode !== null) return;
    this.process.kill("SIGTERM");
    await this.exited;
  }

  remove() {
    rmSync(this.dir, { recursive: true, force: true });
  }
}

const till = new Till();
let possync;
let categoryId;

before(async () => {
  await till.init();
  await till.start();
  possync = createPossync({ baseUrl: till.baseUrl });
  const category = unwrap(await possync.api.POST("/api/categories", { body: { name: "Drinks" } }));
  categoryId = category.id;
});

after(async () => {
  await till.stop();
  till.remove();
});

test("typed create, read, update and list of a product", async () => {
  const created = unwrap(await possync.api.POST("/api/products", {
    body: { id: "ts-tea", sku: "TS-TEA", name: "Green tea", price: 2.5, categoryId },
  }));
  assert.equal(created.id, "ts-tea");
  const read = unwrap(await possync.api.GET("/api/products/{id}", { params: { path: { id: "ts-tea" } } }));
  assert.equal(read.name, "Green tea");
  const updated = unwrap(await possync.api.PATCH("/api/products/{id}", {
    params: { path: { id: "ts-tea" } }, body: { price: 2.75 },
  }));
  assert.equal(Number(updated.price), 2.75);
  const list = unwrap(await possync.api.GET("/api/products"));
  assert.ok(list.some((product) => product.id === "ts-tea"), "the list has the product");
});

test("an error answer is a PossyncError with the node's code and the HTTP status", async () => {
  const missing = await possync.api.GET("/api/products/{id}", { params: { path: { id: "no-such-product" } } });
  assert.throws(() => unwrap(missing), (error) => {
    assert.ok(error instanceof PossyncError);
    assert.equal(error.status, 404);
    assert.equal(error.code, "not_found");
    return true;
  });
  const bad = await possync.api.POST("/api/products", { body: { sku: "", name: "", price: -1 } });
  assert.throws(() => unwrap(bad), (error) => error instanceof PossyncError && error.status >= 400 && error.status < 500);
});

test("a sale sent again under its id is recorded once; another sale under that id is refused", async () => {
  unwrap(await possync.api.POST("/api/products", {
    body: { id: "ts-coffee", sku: "TS-COF", name: "Coffee", price: 2, categoryId },
  }));
  const sale = {
    id: "ts-sale-0001",
    lines: [{ productId: "ts-coffee", quantity: 2 }],
    payments: [{ method: "cash", amount: 4 }],
  };
  const first = await possync.sell(sale);
  const again = await possync.sell(sale);
  assert.equal(again.id, first.id);
  assert.deepEqual(again, first, "the stored ticket, as first answered");
  const tickets = unwrap(await possync.api.GET("/api/tickets"));
  assert.equal(tickets.filter((ticket) => ticket.id === "ts-sale-0001").length, 1);
  const coffee = unwrap(await possync.api.GET("/api/products/{id}", { params: { path: { id: "ts-coffee" } } }));
  assert.equal(Number(coffee.stock), -2, "sold once: stock moved once");
  await assert.rejects(
    possync.sell({ ...sale, lines: [{ productId: "ts-coffee", quantity: 3 }], payments: [{ method: "cash", amount: 6 }] }),
    (error) => error instanceof PossyncError && error.status === 409 && error.code === "already_exists",
  );
});

test("a sale whose answer is lost is sent again and recorded once", async () => {
  // A fetch that delivers the first sale to the node but loses its answer.
  let lost = 0;
  const lossy = async (input, init) => {
    const response = await fetch(input, init);
    const url = typeof input === "string" ? input : input.url;
    if (url.endsWith("/api/tickets") && lost === 0) {
      lost += 1;
      throw new TypeError("fetch failed (answer lost)");
    }
    return response;
  };
  const client = createPossync({ baseUrl: till.baseUrl, fetch: lossy });
  const ticket = await client.sell({
    lines: [{ productId: "ts-coffee", quantity: 1 }],
    payments: [{ method: "card", amount: 2 }],
  }, { retryDelayMs: 10 });
  assert.equal(lost, 1);
  const tickets = unwrap(await possync.api.GET("/api/tickets"));
  assert.equal(tickets.filter((row) => row.id === ticket.id).length, 1);
});

test("the change feed yields new changes and resumes after the node restarts, nothing missed or twice", async () => {
  const page = unwrap(await possync.api.GET("/api/changes", { params: { query: { limit: 1000 } } }));
  const start = page.length ? page[page.length - 1].cursor : 0;
  const controller = new AbortController();
  const seen = [];
  const feed = (async () => {
    for await (const change of possync.changes({ after: start, signal: controller.signal, reconnectDelayMs: 200 })) {
      seen.push(change);
      if (seen.some((c) => c.entityId === "ts-after-restart")) controller.abort();
    }
  })();
  unwrap(await possync.api.POST("/api/products", {
    body: { id: "ts-before-restart", sku: "TS-B", name: "Before", price: 1, categoryId },
  }));
  const deadline = Date.now() + 15_000;
  while (!seen.some((c) => c.entityId === "ts-before-restart")) {
    assert.ok(Date.now() < deadline, "the change made while listening arrived");
    await sleep(50);
  }
  // The node goes away and comes back: the iterator reconnects from its cursor.
  await till.stop();
  await till.start();
  unwrap(await possync.api.POST("/api/products", {
    body: { id: "ts-after-restart", sku: "TS-A", name: "After", price: 1, categoryId },
  }));
  const timer = setTimeout(() => controller.abort(), 20_000);
  await feed;
  clearTimeout(timer);
  const ids = seen.map((c) => c.entityId);
  assert.ok(ids.includes("ts-after-restart"), `the change after the restart arrived: ${ids}`);
  const cursors = seen.map((c) => c.cursor);
  assert.deepEqual(cursors, [...cursors].sort((a, b) => a - b), "in commit order");
  assert.equal(new Set(cursors).size, cursors.length, "none twice");
  const all = unwrap(await possync.api.GET("/api/changes", { params: { query: { after: start, limit: 1000 } } }));
  assert.deepEqual(cursors, all.map((c) => c.cursor), "nothing missed: the feed is the log");
});
