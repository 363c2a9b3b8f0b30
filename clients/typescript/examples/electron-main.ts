// How a POSPlus-style Electron app's main process uses possync instead of its own SQLite
// writes: list the catalog, sell (exactly once, even when an answer is lost), and refresh
// the till's screen whenever any till of the shop changes something.
//
// Electron is not a dependency of this package: the window is any object with
// `webContents.send`, which is what `BrowserWindow` has. In the app:
//
//   import { app, BrowserWindow, ipcMain } from "electron";
//   import { startTill } from "./possync-till";
//   app.whenReady().then(() => {
//     const window = new BrowserWindow({ webPreferences: { preload } });
//     const till = startTill(window, { baseUrl: "http://127.0.0.1:3031" });
//     ipcMain.handle("sell", (_event, lines, payments) => till.sell(lines, payments));
//     app.on("before-quit", () => till.stop());
//   });
//
// Type-checked in CI: `npm run typecheck-examples`.

import { createPossync, PossyncError, unwrap, type Sale, type Ticket } from "../src/index.js";

/** What the main process needs of a window: Electron's `BrowserWindow` has it. */
interface TillWindow {
  webContents: { send(channel: string, ...args: unknown[]): void };
}

export interface TillOptions {
  /** The node's API on this till (possync.toml `api_port`). */
  baseUrl: string;
  /** The API token, when the API is bound beyond loopback. */
  token?: string;
}

export function startTill(window: TillWindow, options: TillOptions) {
  const possync = createPossync(options);
  const stop = new AbortController();

  async function refreshCatalog(): Promise<void> {
    const products = unwrap(await possync.api.GET("/api/products"));
    window.webContents.send("catalog", products);
  }

  // The screen follows every till: a price changed at the back office, stock sold at the
  // other till. The feed resumes by itself after the node restarts.
  async function follow(): Promise<void> {
    const log = unwrap(await possync.api.GET("/api/changes", { params: { query: { limit: 1000 } } }));
    let after = log.length ? log[log.length - 1].cursor : 0;
    for await (const change of possync.changes({ after, signal: stop.signal })) {
      after = change.cursor;
      if (change.entityType === "product" || change.entityType === "stock") {
        await refreshCatalog();
      } else if (change.entityType === "ticket") {
        window.webContents.send("ticket-changed", change.entityId, change.origin);
      }
    }
  }

  /** A sale from the till's screen; the ticket, or a message for the cashier. */
  async function sell(lines: Sale["lines"], payments: Sale["payments"]): Promise<Ticket | { error: string }> {
    try {
      // The id is chosen here, so a re-send after a lost answer never sells twice.
      return await possync.sell({ id: crypto.randomUUID(), lines, payments });
    } catch (error) {
      if (error instanceof PossyncError) return { error: `${error.code}: ${error.message}` };
      return { error: "the till's sync node does not answer: is possync running?" };
    }
  }

  void refreshCatalog().then(follow).catch((error: unknown) => {
    window.webContents.send("sync-error", String(error));
  });
  return { sell, stop: () => stop.abort() };
}
