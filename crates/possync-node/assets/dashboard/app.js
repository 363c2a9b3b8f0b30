// possync dashboard. Plain JavaScript, no framework, no build step, no network access
// beyond this node's own API (same origin). The node embeds this file with include_str!.
//
// Data contract: docs/DASHBOARD.md. In short:
//   GET  /api/status, /api/stats, /api/conflicts?limit&offset, /api/dashboard
//   POST /api/conflicts/{id}/resolve  {"choice": "local"|"remote", "resolvedBy": "dashboard"}
//   GET  /api/events  (Server-Sent Events: `stats` every second, `conflict` on each new conflict)
//
// Stable selectors for browser tests: peer cards `[data-peer-id]` with counters
// `[data-field="messagesSent"]` etc. (raw value in `data-value`), conflict rows
// `[data-conflict-id]`, buttons `[data-action="resolve-local"]` / `[data-action="resolve-remote"]`.

(function () {
  "use strict";

  // ---- configuration ---------------------------------------------------------

  var RATE_WINDOW_MS = 5 * 60 * 1000; // the live charts show the last five minutes
  var GAP_MS = 5000; // successive `stats` events further apart than this break the line
  var STALE_MS = 5000; // no `stats` event for this long while "connected": show it
  var REFRESH_MS = 30000; // conflicts and dashboard are refetched this often
  var CONFLICT_PAGE = 50;
  var LATE_PONG_MS = 40000; // heartbeat 30 s + 10 s grace (SPEC 4): a pong older than this is late
  var RESOLVER = "dashboard";

  // An optional access token, for a node bound beyond 127.0.0.1 (SPEC 6): `/?token=...`.
  var TOKEN = new URLSearchParams(window.location.search).get("token");

  // ---- state -------------------------------------------------------------------

  var state = {
    status: null,
    stats: null,
    serverOffsetMs: 0, // server clock minus browser clock, from the `now` of `stats` events
    lastStatsAt: 0, // browser time of the last `stats` event
    previous: null, // {t, counters: Map(peerId -> counters)} of the last `stats` event
    samples: [], // {t, msgOut, msgIn, bytesOut, bytesIn} or {t, gap: true}
    peerRates: new Map(), // peerId -> {msgOut, msgIn}
    conflicts: [],
    conflictsComplete: false, // the server has no older rows than those loaded
    conflictsShown: 15, // rows drawn; "Show older" draws more, then fetches more
    expandedFields: new Set(), // conflict ids whose unchanged fields are shown
    selectedConflictId: null,
    freshConflictIds: new Set(),
    actionMessages: new Map(), // conflictId -> {state, text}
    dashboard: null,
    live: "connecting", // connecting | live | reconnecting | stalled | unsupported
    source: null,
    hadConnection: false,
  };

  var charts = new Map(); // element id -> function that redraws it at the current width

  // Read-only handle for debugging and browser tests (not an API).
  window.possyncDashboard = { state: state };

  // ---- small helpers -----------------------------------------------------------

  function $(selector, root) {
    return (root || document).querySelector(selector);
  }

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    if (attrs) {
      Object.keys(attrs).forEach(function (key) {
        var value = attrs[key];
        if (value === null || value === undefined || value === false) return;
        if (key === "text") node.textContent = value;
        else if (key === "className") node.className = value;
        else node.setAttribute(key, value === true ? "" : String(value));
      });
    }
    (children || []).forEach(function (child) {
      if (child === null || child === undefined || child === false) return;
      node.appendChild(typeof child === "string" ? document.createTextNode(child) : child);
    });
    return node;
  }

  function esc(text) {
    return String(text).replace(/[&<>"']/g, function (c) {
      return { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c];
    });
  }

  function isNum(value) {
    return typeof value === "number" && isFinite(value);
  }

  var intFormat = new Intl.NumberFormat(undefined, { maximumFractionDigits: 0 });

  function fmtInt(value) {
    return isNum(value) ? intFormat.format(value) : "—";
  }

  function fmtDecimal(value, digits) {
    return isNum(value)
      ? value.toLocaleString(undefined, { minimumFractionDigits: digits, maximumFractionDigits: digits })
      : "—";
  }

  function fmtPercent(value) {
    return isNum(value) ? fmtDecimal(value, 1) + "%" : "—";
  }

  var BYTE_UNITS = ["B", "KB", "MB", "GB", "TB"];

  function fmtBytes(value) {
    if (!isNum(value)) return "—";
    var unit = 0;
    var scaled = Math.abs(value);
    while (scaled >= 1024 && unit < BYTE_UNITS.length - 1) {
      scaled /= 1024;
      unit += 1;
    }
    var sign = value < 0 ? "-" : "";
    if (unit === 0) return sign + Math.round(scaled) + " B";
    return sign + fmtDecimal(scaled, scaled < 10 ? 1 : 0) + " " + BYTE_UNITS[unit];
  }

  function fmtRate(value) {
    if (!isNum(value)) return "—";
    if (value === 0) return "0";
    if (value < 10) return fmtDecimal(value, 1);
    return fmtInt(value);
  }

  function fmtDuration(ms) {
    if (!isNum(ms)) return "—";
    if (ms < 1000) return Math.round(ms) + " ms";
    if (ms < 60000) return fmtDecimal(ms / 1000, 1) + " s";
    var seconds = Math.round(ms / 1000);
    if (seconds < 3600) return Math.floor(seconds / 60) + " min " + (seconds % 60) + " s";
    var minutes = Math.round(seconds / 60);
    return Math.floor(minutes / 60) + " h " + String(minutes % 60).padStart(2, "0") + " min";
  }

  // Timestamps come as RFC 3339 (`2026-11-25T10:05:00.123Z`) or, for rows "as the tables
  // hold them", as SQLite's `2026-11-25 10:05:00` in UTC. Returns epoch ms or null.
  function parseTime(value) {
    if (isNum(value)) return value;
    if (typeof value !== "string" || value === "") return null;
    var text = value.trim();
    if (/^\d{4}-\d{2}-\d{2} \d{2}:\d{2}(:\d{2}(\.\d+)?)?$/.test(text)) text = text.replace(" ", "T") + "Z";
    var ms = Date.parse(text);
    return isNaN(ms) ? null : ms;
  }

  function serverNow() {
    return Date.now() + state.serverOffsetMs;
  }

  function fmtAge(ms) {
    if (ms === null) return "—";
    var age = Math.max(0, serverNow() - ms);
    if (age < 2000) return "just now";
    if (age < 60000) return Math.floor(age / 1000) + " s ago";
    if (age < 3600000) return Math.floor(age / 60000) + " min ago";
    if (age < 86400000) return Math.floor(age / 3600000) + " h ago";
    return Math.floor(age / 86400000) + " d ago";
  }

  function fmtWhen(ms) {
    if (ms === null) return "—";
    var date = new Date(ms);
    var today = new Date();
    var time = date.toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit" });
    if (date.toDateString() === today.toDateString()) return time;
    return date.toLocaleDateString(undefined, { day: "numeric", month: "short" }) + " " + time;
  }

  function fmtFullTime(ms) {
    if (ms === null) return "—";
    var date = new Date(ms);
    var options = { month: "short", day: "numeric" };
    if (date.getFullYear() !== new Date().getFullYear()) options.year = "numeric";
    return (
      date.toLocaleDateString(undefined, options) + " " +
      date.toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit" })
    );
  }

  function fmtDay(day) {
    // `day` is a UTC calendar day, `YYYY-MM-DD`.
    var ms = Date.parse(day + "T00:00:00Z");
    if (isNaN(ms)) return String(day);
    return new Date(ms).toLocaleDateString(undefined, { day: "numeric", month: "short", timeZone: "UTC" });
  }

  function humanize(snake) {
    if (typeof snake !== "string" || snake === "") return "—";
    var text = snake.replace(/_/g, " ");
    return text.charAt(0).toUpperCase() + text.slice(1);
  }

  function shortId(id) {
    var text = String(id == null ? "" : id);
    return text.length > 13 ? "…" + text.slice(-8) : text;
  }

  function parseSnapshot(text) {
    if (text === null || text === undefined || text === "") return { ok: true, value: null };
    if (typeof text === "object") return { ok: true, value: text };
    try {
      return { ok: true, value: JSON.parse(text) };
    } catch (err) {
      return { ok: false, raw: String(text) };
    }
  }

  function sameJson(a, b) {
    return JSON.stringify(a) === JSON.stringify(b);
  }

  function reducedMotion() {
    return window.matchMedia && window.matchMedia("(prefers-reduced-motion: reduce)").matches;
  }

  // ---- API ---------------------------------------------------------------------

  function apiUrl(path) {
    if (!TOKEN) return path;
    return path + (path.indexOf("?") >= 0 ? "&" : "?") + "token=" + encodeURIComponent(TOKEN);
  }

  function request(method, path, body) {
    var headers = { Accept: "application/json" };
    if (TOKEN) headers.Authorization = "Bearer " + TOKEN;
    // The node refuses POST/PUT/PATCH/DELETE without this type, body or not (CSRF guard).
    if (body !== undefined || method !== "GET") headers["Content-Type"] = "application/json";
    return fetch(apiUrl(path), {
      method: method,
      headers: headers,
      cache: "no-store",
      body: body === undefined ? undefined : JSON.stringify(body),
    }).then(function (response) {
      return response.text().then(function (text) {
        var data = null;
        try {
          data = text ? JSON.parse(text) : null;
        } catch (err) {
          data = null;
        }
        if (!response.ok) {
          var error = new Error(
            data && data.error && data.error.message ? data.error.message : "HTTP " + response.status
          );
          error.code = data && data.error ? data.error.code : null;
          error.status = response.status;
          throw error;
        }
        return data;
      });
    });
  }

  function showSectionError(name, error) {
    var node = $('[data-error-for="' + name + '"]');
    if (!node) return;
    if (!error) {
      node.hidden = true;
      node.textContent = "";
      return;
    }
    node.hidden = false;
    node.textContent = "Could not load " + name + ": " + error.message;
  }

  // ---- header ------------------------------------------------------------------

  function renderHeader() {
    var status = state.status;
    if (status) {
      var name = status.posName || "Unnamed terminal";
      $("#pos-name").textContent = name;
      document.title = name + " · possync";
      $("#pos-id").textContent = status.posId || "—";
      $("#pos-id").title = status.posId || "";

      var p2p = $("#p2p-badge");
      if (!status.enabled) {
        p2p.dataset.state = "warn";
        p2p.textContent = "P2P disabled";
      } else if (status.serverRunning === false) {
        p2p.dataset.state = "bad";
        p2p.textContent = "P2P enabled · server stopped";
      } else {
        p2p.dataset.state = "ok";
        p2p.textContent = "P2P enabled";
      }

      var peers = $("#peers-badge");
      var connected = isNum(status.connectedPeers) ? status.connectedPeers : 0;
      var total = isNum(status.totalPeers) ? status.totalPeers : 0;
      peers.textContent = connected + " of " + total + " peer" + (total === 1 ? "" : "s") + " connected";
      peers.dataset.state = total === 0 ? "unknown" : connected === total ? "ok" : connected === 0 ? "bad" : "warn";

      var notice = $("#notice");
      if (!status.enabled) {
        notice.hidden = false;
        notice.textContent =
          "P2P sync is disabled on this terminal: it keeps selling, but shares nothing with the other terminals until sync is enabled again.";
      } else {
        notice.hidden = true;
      }
    }
    renderLiveBadge();
  }

  function renderLiveBadge() {
    var badge = $("#live-badge");
    var text = {
      connecting: "Connecting…",
      live: "Live",
      reconnecting: "Reconnecting…",
      stalled: "No updates for " + Math.round((Date.now() - state.lastStatsAt) / 1000) + " s",
      unsupported: "Polling",
    }[state.live];
    var look = { connecting: "unknown", live: "ok", reconnecting: "warn", stalled: "warn", unsupported: "warn" }[
      state.live
    ];
    badge.dataset.state = look;
    badge.setAttribute("data-live", state.live);
    var label = $(".badge-text", badge);
    if (label.textContent !== text) label.textContent = text;
  }

  function renderAlertsBadge() {
    var badge = $("#alerts-badge");
    var alerts = (state.dashboard && state.dashboard.alerts) || [];
    if (alerts.length === 0) {
      badge.hidden = true;
      return;
    }
    var critical = alerts.some(function (a) { return a.level === "critical"; });
    badge.hidden = false;
    badge.dataset.state = critical ? "bad" : "warn";
    badge.textContent = alerts.length + " alert" + (alerts.length === 1 ? "" : "s");
  }

  // ---- live counters and rates -------------------------------------------------

  var COUNTER_KEYS = ["messagesSent", "messagesReceived", "bytesSent", "bytesReceived"];

  // Counters belong to a connection. The rate of one event is the sum, over the
  // connections present in both this event and the previous one, of the counter
  // increase divided by the elapsed server time. A counter that went down was reset
  // (a new connection) and counts from zero; a connection seen for the first time
  // only sets its baseline, so a long-lived counter never shows up as a spike.
  function addStatsSample(now, stats) {
    var counters = new Map();
    (stats.connections || []).forEach(function (c) {
      counters.set(c.peerId, c);
    });
    var previous = state.previous;
    if (previous && now <= previous.t) return; // a repeated or reordered event
    state.previous = { t: now, counters: counters };
    if (!previous) return;
    var elapsed = now - previous.t;
    if (elapsed > GAP_MS) {
      state.samples.push({ t: previous.t + 1, gap: true });
      state.peerRates.clear();
      return;
    }
    var seconds = elapsed / 1000;
    var total = { messagesSent: 0, messagesReceived: 0, bytesSent: 0, bytesReceived: 0 };
    state.peerRates.clear();
    counters.forEach(function (current, peerId) {
      var before = previous.counters.get(peerId);
      if (!before) return;
      var delta = {};
      COUNTER_KEYS.forEach(function (key) {
        var now = isNum(current[key]) ? current[key] : 0;
        var was = isNum(before[key]) ? before[key] : 0;
        delta[key] = now >= was ? now - was : now;
        total[key] += delta[key];
      });
      state.peerRates.set(peerId, {
        msgOut: delta.messagesSent / seconds,
        msgIn: delta.messagesReceived / seconds,
      });
    });
    state.samples.push({
      t: now,
      msgOut: total.messagesSent / seconds,
      msgIn: total.messagesReceived / seconds,
      bytesOut: total.bytesSent / seconds,
      bytesIn: total.bytesReceived / seconds,
    });
    var oldest = now - RATE_WINDOW_MS - 2000;
    while (state.samples.length && state.samples[0].t < oldest) state.samples.shift();
  }

  // Counters rise smoothly to their new value; `data-value` always holds the exact one.
  function setCounter(node, value, format) {
    var target = isNum(value) ? value : null;
    node.dataset.value = target === null ? "" : String(target);
    if (target === null) {
      node.textContent = "—";
      node._shown = null;
      return;
    }
    var from = isNum(node._shown) ? node._shown : null;
    if (from === null || from > target || reducedMotion() || document.hidden) {
      node._shown = target;
      node.textContent = format(target);
      return;
    }
    if (from === target) return;
    var started = performance.now();
    var duration = 700;
    var token = (node._tween || 0) + 1;
    node._tween = token;
    function step(time) {
      if (node._tween !== token) return;
      var progress = Math.min(1, (time - started) / duration);
      var eased = 1 - Math.pow(1 - progress, 3);
      var shown = progress >= 1 ? target : Math.round(from + (target - from) * eased);
      node._shown = shown;
      node.textContent = format(shown);
      if (progress < 1) window.requestAnimationFrame(step);
    }
    window.requestAnimationFrame(step);
  }

  function peerList() {
    var peers = [];
    var seen = new Set();
    var connections = new Map();
    ((state.stats && state.stats.connections) || []).forEach(function (c) {
      connections.set(c.peerId, c);
    });
    ((state.status && state.status.peers) || []).forEach(function (p) {
      seen.add(p.id);
      peers.push({
        id: p.id,
        name: p.name || (connections.get(p.id) || {}).peerName || shortId(p.id),
        address: p.address,
        online: !!p.online,
        lastSeen: p.lastSeen,
        connection: connections.get(p.id) || null,
      });
    });
    connections.forEach(function (c, id) {
      if (seen.has(id)) return;
      peers.push({ id: id, name: c.peerName || shortId(id), address: null, online: true, lastSeen: null, connection: c });
    });
    return peers;
  }

  function buildPeerCard(peer) {
    function counter(label, field, arrow) {
      return el("div", null, [
        el("dt", { text: label }),
        el("dd", { "data-field": field, "data-value": "" }, ["—"]),
      ]);
    }
    return el("article", { className: "card peer-card", "data-peer-id": peer.id }, [
      el("div", { className: "peer-head" }, [
        el("h3", { className: "peer-name", "data-field": "name" }),
        el("span", { className: "state", "data-field": "online" }),
      ]),
      el("p", { className: "peer-sub", "data-field": "sub" }),
      el("p", { className: "peer-sub counters-note", text: "Counters of this connection (reset on reconnect)", title: "They start at 0 at each reconnect; totals over time are in p2p_connection_metrics" }),
      el("dl", { className: "counters" }, [
        counter("Messages sent", "messagesSent"),
        counter("Messages received", "messagesReceived"),
        counter("Bytes sent", "bytesSent"),
        counter("Bytes received", "bytesReceived"),
      ]),
      el("div", { className: "peer-foot" }, [
        el("span", null, ["Ping ", el("b", { "data-field": "lastPing" }, ["—"])]),
        el("span", null, ["Pong ", el("b", { "data-field": "lastPong" }, ["—"])]),
        el("span", null, ["Reconnects ", el("b", { "data-field": "reconnectAttempts", "data-value": "" }, ["—"])]),
      ]),
    ]);
  }

  function renderPeers() {
    var host = $("#peer-cards");
    var peers = peerList();
    $("#peers-empty").hidden = peers.length > 0;
    var existing = new Map();
    host.querySelectorAll("[data-peer-id]").forEach(function (card) {
      existing.set(card.getAttribute("data-peer-id"), card);
    });
    var wanted = new Set();
    peers.forEach(function (peer, index) {
      wanted.add(peer.id);
      var card = existing.get(peer.id);
      if (!card) card = buildPeerCard(peer);
      // Keep the order of /api/status; move a card only when it is out of place.
      var at = host.querySelectorAll("[data-peer-id]")[index];
      if (at !== card) host.insertBefore(card, at || null);
      updatePeerCard(card, peer);
    });
    existing.forEach(function (card, id) {
      if (!wanted.has(id)) card.remove();
    });
    renderPeerAges();
  }

  function updatePeerCard(card, peer) {
    var c = peer.connection;
    card.dataset.online = peer.online ? "true" : "false";
    var name = $('[data-field="name"]', card);
    if (name.textContent !== peer.name) name.textContent = peer.name;
    name.title = peer.name + " · " + peer.id;
    var badge = $('[data-field="online"]', card);
    var behind = peer.online && isNum(peer.behind) && peer.behind > 0 ? peer.behind : 0;
    badge.dataset.state = peer.online ? (behind > 0 ? "catching-up" : "online") : "offline";
    badge.textContent = peer.online ? (behind > 0 ? "Catching up · " + fmtInt(behind) + " behind" : "Online") : "Offline";

    card._peer = peer;
    setCounter($('[data-field="messagesSent"]', card), c ? c.messagesSent : null, fmtInt);
    setCounter($('[data-field="messagesReceived"]', card), c ? c.messagesReceived : null, fmtInt);
    setCounter($('[data-field="bytesSent"]', card), c ? c.bytesSent : null, fmtBytes);
    setCounter($('[data-field="bytesReceived"]', card), c ? c.bytesReceived : null, fmtBytes);
    var attempts = $('[data-field="reconnectAttempts"]', card);
    attempts.dataset.value = c && isNum(c.reconnectAttempts) ? String(c.reconnectAttempts) : "";
    attempts.textContent = c ? fmtInt(c.reconnectAttempts) : "—";
  }

  // Ages move every second even between events.
  function renderPeerAges() {
    document.querySelectorAll("#peer-cards [data-peer-id]").forEach(function (card) {
      var peer = card._peer;
      if (!peer) return;
      var c = peer.connection;
      var sub = $('[data-field="sub"]', card);
      var parts = [];
      if (peer.online) {
        var rate = state.peerRates.get(peer.id);
        if (rate) parts.push("↑ " + fmtRate(rate.msgOut) + " ↓ " + fmtRate(rate.msgIn) + " msg/s");
        if (isNum(peer.throttled) && peer.throttled > 0) parts.push("throttled: " + fmtInt(peer.throttled) + " changes late");
        if (peer.address) parts.push(peer.address);
      } else {
        parts.push(peer.lastSeen ? "Last seen " + fmtAge(parseTime(peer.lastSeen)) : "Never connected");
        if (peer.address) parts.push(peer.address);
      }
      var subText = parts.join(" · ");
      if (sub.textContent !== subText) sub.textContent = subText;

      var ping = parseTime(c && c.lastPing);
      var pong = parseTime(c && c.lastPong);
      var pingNode = $('[data-field="lastPing"]', card);
      var pongNode = $('[data-field="lastPong"]', card);
      pingNode.dataset.value = c && c.lastPing ? c.lastPing : "";
      pongNode.dataset.value = c && c.lastPong ? c.lastPong : "";
      pingNode.textContent = fmtAge(ping);
      var late = peer.online && pong !== null && serverNow() - pong > LATE_PONG_MS;
      pongNode.textContent = fmtAge(pong) + (late ? " (late)" : "");
      pongNode.classList.toggle("late", late);
    });
  }

  function renderTotals() {
    var stats = state.stats;
    if (!stats) return;
    $("#totals-line").textContent =
      "Totals: " + fmtInt(stats.totalMessagesSent) + " messages sent (" + fmtBytes(stats.totalBytesSent) + "), " +
      fmtInt(stats.totalMessagesReceived) + " received (" + fmtBytes(stats.totalBytesReceived) + ")";
  }

  function legendItem(swatchClass, label, value) {
    return (
      '<span class="legend-item"><span class="swatch ' + swatchClass + '" aria-hidden="true"></span>' +
      esc(label) + (value === undefined ? "" : " <b>" + esc(value) + "</b>") + "</span>"
    );
  }

  function renderRateCharts() {
    var samples = state.samples;
    var last = null;
    for (var i = samples.length - 1; i >= 0; i--) {
      if (!samples[i].gap) {
        last = samples[i];
        break;
      }
    }
    $("#legend-messages").innerHTML =
      legendItem("out", "Sent", last ? fmtRate(last.msgOut) + "/s" : "—") +
      legendItem("in", "Received", last ? fmtRate(last.msgIn) + "/s" : "—");
    $("#legend-bandwidth").innerHTML =
      legendItem("out", "Out", last ? fmtBytes(last.bytesOut) + "/s" : "—") +
      legendItem("in", "In", last ? fmtBytes(last.bytesIn) + "/s" : "—");
    drawChart("chart-messages", function (width) {
      return rateChartSvg(width, "msgOut", "msgIn", fmtRate, "messages per second", 0);
    });
    drawChart("chart-bandwidth", function (width) {
      return rateChartSvg(width, "bytesOut", "bytesIn", function (v) { return fmtBytes(v) + "/s"; }, "bytes per second", 1024);
    });
  }

  function rateChartSvg(width, outKey, inKey, format, what, bytes) {
    var end = state.previous ? state.previous.t : serverNow();
    var start = end - RATE_WINDOW_MS;
    function series(key) {
      return state.samples.map(function (s) {
        return [s.t, s.gap ? null : s[key]];
      });
    }
    var ticks = [];
    for (var m = 5; m >= 0; m--) ticks.push({ x: end - m * 60000, label: m === 0 ? "now" : "−" + m + " min" });
    return lineChartSvg({
      width: width,
      height: 150,
      xMin: start,
      xMax: end,
      xTicks: ticks,
      yFormat: format,
      bytes: !!bytes,
      minMax: bytes || 1,
      label: "Last five minutes, " + what + ": sent and received",
      emptyText: state.samples.length < 2 ? "Collecting data…" : null,
      series: [
        { cls: "out", points: series(outKey), area: true },
        { cls: "in", points: series(inKey) },
      ],
    });
  }

  // ---- SVG charts (no library) ----------------------------------------------

  function niceCeil(value) {
    if (!(value > 0)) return 1;
    var power = Math.pow(10, Math.floor(Math.log10(value)));
    var steps = [1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10];
    for (var i = 0; i < steps.length; i++) {
      if (steps[i] * power >= value) return steps[i] * power;
    }
    return 10 * power;
  }

  function niceCeilBytes(value) {
    var scale = 1;
    while (value / scale >= 1024) scale *= 1024;
    var scaled = niceCeil(value / scale);
    return scaled > 1000 ? 1024 * scale : scaled * scale;
  }

  function yAxis(max, top, plotHeight, left, right, format) {
    var parts = [];
    for (var i = 0; i <= 2; i++) {
      var value = (max * i) / 2;
      var y = top + plotHeight - (plotHeight * i) / 2;
      parts.push(
        '<line class="' + (i === 0 ? "axis-line" : "grid-line") + '" x1="' + left + '" x2="' + right +
        '" y1="' + y.toFixed(1) + '" y2="' + y.toFixed(1) + '"/>'
      );
      parts.push(
        '<text x="' + (left - 6) + '" y="' + (y + 3.5).toFixed(1) + '" text-anchor="end">' + esc(format(value)) + "</text>"
      );
    }
    return parts.join("");
  }

  function lineChartSvg(o) {
    var margin = { left: 62, right: 8, top: 8, bottom: 20 };
    var plotW = Math.max(10, o.width - margin.left - margin.right);
    var plotH = o.height - margin.top - margin.bottom;
    var max = 0;
    o.series.forEach(function (s) {
      s.points.forEach(function (p) {
        if (isNum(p[1]) && p[1] > max) max = p[1];
      });
    });
    max = (o.bytes ? niceCeilBytes : niceCeil)(Math.max(max, o.minMax || 1));
    function x(v) {
      return margin.left + ((v - o.xMin) / (o.xMax - o.xMin || 1)) * plotW;
    }
    function y(v) {
      return margin.top + plotH - (v / max) * plotH;
    }
    var out = [];
    out.push(
      '<svg xmlns="http://www.w3.org/2000/svg" width="' + o.width + '" height="' + o.height +
      '" viewBox="0 0 ' + o.width + " " + o.height + '" role="img" aria-label="' + esc(o.label) + '">'
    );
    out.push(yAxis(max, margin.top, plotH, margin.left, margin.left + plotW, o.yFormat));
    var lastLabelRight = -Infinity;
    o.xTicks.forEach(function (t, i) {
      var px = x(t.x);
      var anchor = i === o.xTicks.length - 1 ? "end" : i === 0 && o.xTicks.length > 1 && px <= margin.left + 1 ? "start" : "middle";
      var approx = t.label.length * 6;
      var leftEdge = anchor === "start" ? px : anchor === "end" ? px - approx : px - approx / 2;
      if (leftEdge < lastLabelRight + 6 && i !== o.xTicks.length - 1) return;
      lastLabelRight = leftEdge + approx;
      out.push('<text x="' + px.toFixed(1) + '" y="' + (o.height - 5) + '" text-anchor="' + anchor + '">' + esc(t.label) + "</text>");
    });
    o.series.forEach(function (s) {
      var d = "";
      var segments = [];
      var current = [];
      s.points.forEach(function (p) {
        if (p[0] < o.xMin - 1000) return;
        if (!isNum(p[1])) {
          if (current.length) segments.push(current);
          current = [];
          return;
        }
        current.push([x(Math.max(p[0], o.xMin)), y(p[1])]);
      });
      if (current.length) segments.push(current);
      segments.forEach(function (seg) {
        d += "M" + seg.map(function (pt) { return pt[0].toFixed(1) + "," + pt[1].toFixed(1); }).join("L");
        if (s.area && seg.length > 1) {
          var base = (margin.top + plotH).toFixed(1);
          out.push(
            '<path class="area ' + s.cls + '" d="M' + seg[0][0].toFixed(1) + "," + base + "L" +
            seg.map(function (pt) { return pt[0].toFixed(1) + "," + pt[1].toFixed(1); }).join("L") +
            "L" + seg[seg.length - 1][0].toFixed(1) + "," + base + 'Z"/>'
          );
        }
        if (s.dots) {
          seg.forEach(function (pt, i) {
            out.push('<circle class="dot ' + s.cls + '" cx="' + pt[0].toFixed(1) + '" cy="' + pt[1].toFixed(1) + '" r="2.5">' +
              (s.titles ? "<title>" + esc(s.titles[i]) + "</title>" : "") + "</circle>");
          });
        }
      });
      if (d) out.push('<path class="series ' + s.cls + '" d="' + d + '"/>');
    });
    if (o.emptyText) {
      out.push('<text class="no-data" x="' + (margin.left + plotW / 2) + '" y="' + (margin.top + plotH / 2) + '" text-anchor="middle">' + esc(o.emptyText) + "</text>");
    }
    out.push("</svg>");
    return out.join("");
  }

  function barChartSvg(o) {
    var margin = { left: 52, right: 8, top: 8, bottom: 20 };
    var plotW = Math.max(10, o.width - margin.left - margin.right);
    var plotH = o.height - margin.top - margin.bottom;
    var max = 0;
    o.bars.forEach(function (b) {
      if (isNum(b.value) && b.value > max) max = b.value;
    });
    max = niceCeil(Math.max(max, 1));
    var n = Math.max(1, o.bars.length);
    var slot = plotW / n;
    var barW = Math.max(2, Math.min(36, slot * 0.68));
    var labelEvery = Math.max(1, Math.ceil(44 / slot));
    var out = [];
    out.push(
      '<svg xmlns="http://www.w3.org/2000/svg" width="' + o.width + '" height="' + o.height +
      '" viewBox="0 0 ' + o.width + " " + o.height + '" role="img" aria-label="' + esc(o.label) + '">'
    );
    out.push(yAxis(max, margin.top, plotH, margin.left, margin.left + plotW, o.yFormat));
    o.bars.forEach(function (b, i) {
      var cx = margin.left + slot * i + slot / 2;
      var value = isNum(b.value) ? b.value : 0;
      var h = (value / max) * plotH;
      out.push(
        '<rect class="bar' + (b.cls ? " " + b.cls : "") + '" x="' + (cx - barW / 2).toFixed(1) + '" y="' +
        (margin.top + plotH - h).toFixed(1) + '" width="' + barW.toFixed(1) + '" height="' + Math.max(0, h).toFixed(1) +
        '" rx="2"><title>' + esc(b.title) + "</title></rect>"
      );
      if ((n - 1 - i) % labelEvery === 0) {
        out.push('<text x="' + cx.toFixed(1) + '" y="' + (o.height - 5) + '" text-anchor="middle">' + esc(b.label) + "</text>");
      }
    });
    if (o.emptyText) {
      out.push('<text class="no-data" x="' + (margin.left + plotW / 2) + '" y="' + (margin.top + plotH / 2) + '" text-anchor="middle">' + esc(o.emptyText) + "</text>");
    }
    out.push("</svg>");
    return out.join("");
  }

  // Charts are drawn at the real pixel width of their box (crisp text, no scaling)
  // and redrawn when the box is resized.
  function drawChart(id, render) {
    charts.set(id, render);
    var node = document.getElementById(id);
    if (!node) return;
    var width = Math.floor(node.clientWidth);
    if (width <= 0) return;
    node.innerHTML = render(width);
    node._drawnWidth = width;
  }

  if (window.ResizeObserver) {
    var resizeObserver = new ResizeObserver(function (entries) {
      entries.forEach(function (entry) {
        var node = entry.target;
        var render = charts.get(node.id);
        if (render && Math.floor(node.clientWidth) !== node._drawnWidth) drawChart(node.id, render);
      });
    });
    ["chart-messages", "chart-bandwidth", "chart-daily", "chart-trend"].forEach(function (id) {
      var node = document.getElementById(id);
      if (node) resizeObserver.observe(node);
    });
  }

  // ---- health and history ------------------------------------------------------

  // Display thresholds only; the numbers themselves come from the node.
  var KPI = {
    uptimePercent: {
      format: fmtPercent,
      level: function (v) { return v >= 99 ? ["ok", "Good"] : v >= 95 ? ["warn", "Fair"] : ["bad", "Poor"]; },
    },
    avgReconnectMs: {
      format: fmtDuration,
      level: function (v) { return v <= 10000 ? ["ok", "Quick"] : v <= 60000 ? ["warn", "Slow"] : ["bad", "Very slow"]; },
    },
    syncSuccessRate: {
      format: fmtPercent,
      level: function (v) { return v >= 99 ? ["ok", "Good"] : v >= 95 ? ["warn", "Fair"] : ["bad", "Poor"]; },
    },
    conflictsPerHour: {
      format: function (v) { return fmtDecimal(v, v > 0 && v < 0.1 ? 2 : v < 10 ? 1 : 0); },
      level: function (v) { return v <= 5 ? ["ok", "Low"] : v <= 20 ? ["warn", "Moderate"] : ["bad", "High"]; },
    },
  };

  function reliabilityLevel(score) {
    return score >= 90 ? ["ok", "Good"] : score >= 75 ? ["warn", "Fair"] : ["bad", "Poor"];
  }

  function renderHealth() {
    var health = (state.dashboard && state.dashboard.health) || {};
    Object.keys(KPI).forEach(function (key) {
      var card = $('[data-kpi="' + key + '"]');
      var value = health[key];
      var valueNode = $(".kpi-value", card);
      valueNode.textContent = KPI[key].format(value);
      valueNode.dataset.value = isNum(value) ? String(value) : "";
      var levelNode = $(".level", card);
      if (isNum(value)) {
        var level = KPI[key].level(value);
        levelNode.dataset.level = level[0];
        levelNode.textContent = level[1];
      } else {
        levelNode.dataset.level = "none";
        levelNode.textContent = "No data yet";
      }
    });
  }

  function renderHistory() {
    var history = (state.dashboard && state.dashboard.history) || {};
    var daily = Array.isArray(history.daily) ? history.daily : [];
    var totalChanges = 0;
    var totalConflicts = 0;
    var totalErrors = 0;
    daily.forEach(function (d) {
      totalChanges += isNum(d.changes) ? d.changes : 0;
      totalConflicts += isNum(d.conflicts) ? d.conflicts : 0;
      totalErrors += isNum(d.errors) ? d.errors : 0;
    });
    var hasDaily = daily.length > 0 && totalChanges + totalConflicts + totalErrors > 0;
    $("#legend-daily").innerHTML = legendItem("bar", "Changes", hasDaily ? fmtInt(totalChanges) + " in " + daily.length + " days" : "—");
    $("#legend-trend").innerHTML =
      legendItem("conflicts", "Conflicts", hasDaily ? fmtInt(totalConflicts) : "—") +
      legendItem("errors", "Errors", hasDaily ? fmtInt(totalErrors) : "—");

    drawChart("chart-daily", function (width) {
      return barChartSvg({
        width: width,
        height: 150,
        label: "Incoming changes per day over the last " + daily.length + " days",
        yFormat: fmtCompact,
        emptyText: hasDaily ? null : "No data yet",
        bars: daily.map(function (d, i) {
          return {
            label: fmtDay(d.day),
            value: d.changes,
            cls: i === daily.length - 1 ? "today" : "",
            title: fmtDay(d.day) + (i === daily.length - 1 ? " (so far)" : "") + ": " + fmtInt(d.changes) + " changes, " +
              fmtInt(d.conflicts) + " conflicts, " + fmtInt(d.errors) + " errors",
          };
        }),
      });
    });
    drawChart("chart-trend", function (width) {
      var xs = daily.map(function (d, i) { return i; });
      var ticks = daily.map(function (d, i) { return { x: i, label: fmtDay(d.day) }; });
      // Show about one label per 60 px, always the last one.
      var every = Math.max(1, Math.ceil((daily.length * 60) / Math.max(1, width - 70)));
      ticks = ticks.filter(function (t, i) { return (daily.length - 1 - i) % every === 0; });
      return lineChartSvg({
        width: width,
        height: 150,
        xMin: -0.3,
        xMax: Math.max(1, daily.length - 1) + 0.3,
        xTicks: ticks,
        yFormat: fmtCompact,
        label: "Conflicts and errors per day over the last " + daily.length + " days",
        emptyText: hasDaily ? null : "No data yet",
        series: !hasDaily ? [] : [
          {
            cls: "conflicts", dots: true,
            points: xs.map(function (i) { return [i, daily[i].conflicts]; }),
            titles: daily.map(function (d) { return fmtDay(d.day) + ": " + fmtInt(d.conflicts) + " conflicts"; }),
          },
          {
            cls: "errors", dots: true,
            points: xs.map(function (i) { return [i, daily[i].errors]; }),
            titles: daily.map(function (d) { return fmtDay(d.day) + ": " + fmtInt(d.errors) + " errors"; }),
          },
        ],
      });
    });

    var list = $("#reliability-list");
    list.textContent = "";
    var peers = Array.isArray(history.peers) ? history.peers.slice() : [];
    if (peers.length === 0) {
      list.appendChild(el("li", { className: "empty", text: "No data yet." }));
    }
    // Least reliable first: that is where attention is needed.
    peers.sort(function (a, b) {
      var ra = isNum(a.reliability) ? a.reliability : 101;
      var rb = isNum(b.reliability) ? b.reliability : 101;
      return ra - rb || String(a.peerName).localeCompare(String(b.peerName));
    });
    peers.forEach(function (p) {
      var score = isNum(p.reliability) ? Math.max(0, Math.min(100, p.reliability)) : null;
      var level = score === null ? ["none", "No data"] : reliabilityLevel(score);
      var bar = el("span", { "data-level": level[0] });
      bar.style.width = (score === null ? 0 : score) + "%";
      list.appendChild(
        el("li", { "data-peer-id": p.peerId, "data-reliability": score === null ? "" : score }, [
          el("span", { className: "rel-name", text: p.peerName || shortId(p.peerId), title: p.peerId }),
          el("span", { className: "rel-score", text: (score === null ? "—" : fmtInt(score)) + " · " + level[1] }),
          el("span", { className: "rel-bar", "aria-hidden": "true" }, [bar]),
          el("span", {
            className: "rel-sub",
            text: "Uptime " + fmtPercent(p.uptimePercent) + " · " + fmtInt(p.failures) + " failure" + (p.failures === 1 ? "" : "s"),
          }),
        ])
      );
    });

    var rejectedList = $("#rejected-list");
    rejectedList.textContent = "";
    var rejected = Array.isArray(state.dashboard && state.dashboard.rejected) ? state.dashboard.rejected : [];
    if (!state.dashboard) {
      rejectedList.appendChild(el("li", { className: "empty", text: "No data yet." }));
    } else if (rejected.length === 0) {
      rejectedList.appendChild(el("li", { className: "all-clear", text: "None: every connection proved the shop secret." }));
    }
    rejected.forEach(function (r) {
      rejectedList.appendChild(
        el("li", { "data-address": r.address }, [
          el("span", { className: "rel-name", text: r.address }),
          el("span", { className: "rel-score", text: fmtInt(r.attempts) + " attempt" + (r.attempts === 1 ? "" : "s") }),
          el("span", { className: "rel-sub", text: (r.reason || "") + " · last " + (r.lastSeen || "—") + " UTC" }),
        ])
      );
    });

    var alertsList = $("#alerts-list");
    alertsList.textContent = "";
    var alerts = Array.isArray(state.dashboard && state.dashboard.alerts) ? state.dashboard.alerts.slice() : [];
    alerts.sort(function (a, b) {
      return (a.level === "critical" ? 0 : 1) - (b.level === "critical" ? 0 : 1);
    });
    if (!state.dashboard) {
      alertsList.appendChild(el("li", { className: "empty", text: "No data yet." }));
    } else if (alerts.length === 0) {
      var health = state.dashboard.health || {};
      var anyData = Object.keys(KPI).some(function (k) { return isNum(health[k]); });
      alertsList.appendChild(
        anyData
          ? el("li", { className: "all-clear", text: "No alerts: sync speed and error rate are within their usual range." })
          : el("li", { className: "empty", text: "No alerts (not enough history yet to compare with)." })
      );
    }
    alerts.forEach(function (a) {
      var level = a.level === "critical" ? "critical" : "warning";
      alertsList.appendChild(
        el("li", { "data-level": level }, [
          el("span", { className: "level-label", text: level === "critical" ? "Critical" : "Warning" }),
          el("span", { text: a.message || "" }),
        ])
      );
    });
    renderAlertsBadge();
  }

  function fmtCompact(value) {
    if (!isNum(value)) return "—";
    if (value >= 1e6) return fmtDecimal(value / 1e6, value >= 1e7 ? 0 : 1) + "M";
    if (value >= 1e4) return fmtDecimal(value / 1e3, 0) + "k";
    if (value >= 1e3) return fmtDecimal(value / 1e3, 1) + "k";
    return fmtDecimal(value, value % 1 === 0 ? 0 : 1);
  }

  // ---- conflicts ---------------------------------------------------------------

  function recordName(conflict) {
    var names = [conflict.localData, conflict.remoteData, conflict.finalData].map(function (text) {
      var parsed = parseSnapshot(text);
      var v = parsed.ok && parsed.value && typeof parsed.value === "object" ? parsed.value : {};
      return v.name || v.ticketNumber || v.sku || null;
    });
    return names[0] || names[1] || names[2] || shortId(conflict.entityId);
  }

  function isOpen(conflict) {
    return conflict.resolvedBy === null || conflict.resolvedBy === undefined;
  }

  function renderConflicts() {
    var body = $("#conflicts-body");
    body.textContent = "";
    var conflicts = state.conflicts;
    var open = conflicts.filter(isOpen).length;
    var count = $("#open-conflicts-count");
    count.hidden = open === 0;
    count.textContent = String(open);
    count.title = open + " open conflict" + (open === 1 ? "" : "s");
    $("#conflicts-sub").textContent =
      (open ? open + " waiting for a decision · " : "") + "Newest first. Select one to compare the two versions.";

    if (conflicts.length === 0) {
      body.appendChild(el("tr", { className: "empty-row" }, [el("td", { colspan: "6", text: "No conflicts recorded. Edits made on two terminals at once will appear here." })]));
    }
    conflicts.slice(0, state.conflictsShown).forEach(function (c) {
      var selected = state.selectedConflictId === c.id;
      var created = parseTime(c.createdAt);
      var row = el(
        "tr",
        {
          className: "conflict-row" + (state.freshConflictIds.has(c.id) ? " fresh" : ""),
          "data-conflict-id": c.id,
          "data-open": isOpen(c) ? "true" : "false",
          tabindex: "0",
          "aria-expanded": selected ? "true" : "false",
          "aria-label": "Conflict " + c.id + " on " + (c.entityType || "record") + " " + recordName(c),
        },
        [
          el("td", { className: "when", title: fmtFullTime(created) }, [el("span", { className: "chevron", "aria-hidden": "true", text: "›" }), " ", fmtWhen(created)]),
          el("td", { text: c.peerName || shortId(c.peerId), title: c.peerId || "" }),
          el("td", null, [
            el("div", { className: "record-name", text: recordName(c), title: c.entityId }),
            el("div", { className: "record-type", text: humanize(c.entityType) }),
          ]),
          el("td", { className: "col-type", text: humanize(c.conflictType) }),
          el("td", { className: "col-strategy", text: humanize(c.resolutionStrategy) }),
          el("td", null, [
            isOpen(c)
              ? el("span", { className: "tag", "data-state": "open", text: "Open · decide" })
              : el("span", { className: "tag", "data-state": "resolved", text: "Resolved · " + c.resolvedBy }),
          ]),
        ]
      );
      body.appendChild(row);
      if (selected) body.appendChild(conflictDetailRow(c));
    });
    $("#conflicts-more").hidden = conflicts.length <= state.conflictsShown && state.conflictsComplete;
  }

  function valueCell(value, present) {
    if (!present) return el("td", null, [el("span", { className: "absent", text: "not in this version" })]);
    if (value === null) return el("td", null, [el("span", { className: "null", text: "empty" })]);
    var text = typeof value === "string" ? value : JSON.stringify(value);
    return el("td", { text: text });
  }

  function conflictDetailRow(c) {
    var local = parseSnapshot(c.localData);
    var remote = parseSnapshot(c.remoteData);
    var final = parseSnapshot(c.finalData);
    var peerName = c.peerName || shortId(c.peerId);

    function meta(label, value) {
      return el("div", null, [el("dt", { text: label }), el("dd", { text: value })]);
    }

    var children = [];
    children.push(
      el("dl", { className: "detail-meta" }, [
        meta("Record", humanize(c.entityType) + " " + c.entityId),
        meta("Conflict", humanize(c.conflictType)),
        meta("Strategy", humanize(c.resolutionStrategy)),
        meta("Local edit", fmtFullTime(parseTime(c.localUpdatedAt))),
        meta("Remote edit (" + peerName + ")", fmtFullTime(parseTime(c.remoteUpdatedAt))),
        meta("Recorded", fmtFullTime(parseTime(c.createdAt))),
        meta("Resolved by", isOpen(c) ? "Nobody yet" : c.resolvedBy + (c.resolvedAt ? " · " + fmtFullTime(parseTime(c.resolvedAt)) : "")),
      ])
    );
    if (c.notes) children.push(el("p", { className: "detail-notes" }, [el("b", { text: "Notes: " }), c.notes]));

    var message = state.actionMessages.get(c.id);
    var pending = !!message && message.state === "pending";
    if (isOpen(c)) {
      children.push(
        el("div", { className: "decision" }, [
          el("p", { text: "Waiting for a decision. This terminal keeps its local version until someone chooses." }),
          el("button", { type: "button", className: "button", "data-action": "resolve-local", "data-conflict": c.id, disabled: pending, text: "Keep local" }),
          el("button", { type: "button", className: "button primary", "data-action": "resolve-remote", "data-conflict": c.id, disabled: pending, text: "Take remote" }),
          el("p", { className: "action-message", role: "status", "data-state": message ? message.state : null, text: message ? message.text : "" }),
        ])
      );
    } else if (message) {
      children.push(el("p", { className: "action-message", role: "status", "data-state": message.state, text: message.text }));
    }

    if (local.ok && remote.ok && final.ok && isObject(local.value, true) && isObject(remote.value, true) && isObject(final.value, true)) {
      children.push(diffTable(c.id, local.value || {}, remote.value || {}, final.value || {}, local.value === null, remote.value === null, final.value === null, peerName));
      children.push(
        el("p", {
          className: "diff-legend",
          text: "≠ marks a field both versions carry with different values. A remote change carries only the fields it edited; \"not in this version\" means the field was not part of it.",
        })
      );
    } else {
      children.push(rawSnapshots(c, peerName));
    }

    var detail = el("div", { className: "conflict-detail", "data-detail-for": c.id }, children);
    return el("tr", { className: "detail-row", "data-detail-for": c.id }, [el("td", { colspan: "6" }, [detail])]);
  }

  function isObject(value, allowNull) {
    return (allowNull && value === null) || (value !== null && typeof value === "object" && !Array.isArray(value));
  }

  // One row per field: local, remote and final side by side. Fields that differ, or that
  // only one side carries, or that the outcome changed, come first; the unchanged rest
  // of the record is behind a toggle.
  function diffTable(conflictId, local, remote, final, localMissing, remoteMissing, finalMissing, peerName) {
    var has = Object.prototype.hasOwnProperty;
    var keys = [];
    var seen = new Set();
    [local, remote, final].forEach(function (obj) {
      Object.keys(obj).forEach(function (k) {
        if (!seen.has(k)) {
          seen.add(k);
          keys.push(k);
        }
      });
    });
    var fields = keys.map(function (k, order) {
      var inLocal = has.call(local, k);
      var inRemote = has.call(remote, k);
      var inFinal = has.call(final, k);
      var differs = inLocal && inRemote && !sameJson(local[k], remote[k]);
      var changed = inLocal !== inFinal || (inLocal && inFinal && !sameJson(local[k], final[k]));
      var rank = k === "id" ? 0 : differs ? 1 : changed || (inRemote && !inLocal) ? 2 : k === "updatedAt" ? 3 : 4;
      return { key: k, order: order, inLocal: inLocal, inRemote: inRemote, inFinal: inFinal, differs: differs, rank: rank };
    });
    fields.sort(function (a, b) { return a.rank - b.rank || a.order - b.order; });

    function row(f) {
      var finalCell = valueCell(final[f.key], f.inFinal);
      if (f.differs && f.inFinal) {
        var source = sameJson(final[f.key], local[f.key]) ? "local" : sameJson(final[f.key], remote[f.key]) ? "remote" : "merged";
        finalCell.appendChild(el("span", { className: "source", text: source }));
      }
      return el("tr", { className: f.differs ? "differs" : null, "data-key": f.key, "data-differs": f.differs ? "true" : "false" }, [
        el("th", { scope: "row", text: f.key }),
        valueCell(local[f.key], f.inLocal),
        valueCell(remote[f.key], f.inRemote),
        finalCell,
      ]);
    }

    var main = fields.filter(function (f) { return f.rank <= 3; });
    var rest = fields.filter(function (f) { return f.rank > 3; });
    var showRest = state.expandedFields.has(conflictId) || main.length <= 1;
    var bodies = [el("tbody", null, main.map(row))];
    if (rest.length) bodies.push(el("tbody", { className: "other-fields", hidden: !showRest }, rest.map(row)));

    var children = [
      el("table", { className: "diff" }, [
        el("colgroup", null, [el("col", { className: "field-col" }), el("col"), el("col"), el("col")]),
        el("thead", null, [
          el("tr", null, [
            el("th", { scope: "col", text: "Field" }),
            el("th", { scope: "col", text: "Local (this terminal)" + (localMissing ? " · none" : "") }),
            el("th", { scope: "col", text: "Remote (" + peerName + ")" + (remoteMissing ? " · none" : "") }),
            el("th", { scope: "col", text: "Final" + (finalMissing ? " · none" : "") }),
          ]),
        ]),
      ].concat(bodies)),
    ];
    if (rest.length && main.length > 1) {
      children.push(
        el("button", {
          type: "button",
          className: "button quiet small",
          "data-action": "toggle-fields",
          "data-conflict": conflictId,
          "aria-expanded": showRest ? "true" : "false",
          text: showRest ? "Hide the " + rest.length + " unchanged fields" : "Show the " + rest.length + " unchanged fields",
        })
      );
    }
    return el("div", { className: "diff-wrap" }, children);
  }

  function rawSnapshots(c, peerName) {
    function block(label, text) {
      return el("div", null, [el("dt", { text: label }), el("dd", null, [el("pre", { className: "raw-json", text: text == null ? "empty" : String(text) })])]);
    }
    return el("dl", { className: "detail-meta" }, [
      block("Local (this terminal)", c.localData),
      block("Remote (" + peerName + ")", c.remoteData),
      block("Final", c.finalData),
    ]);
  }

  function upsertConflict(row, fresh) {
    if (!row || row.id === undefined) return;
    var index = state.conflicts.findIndex(function (c) { return c.id === row.id; });
    if (index >= 0) state.conflicts[index] = row;
    else state.conflicts.unshift(row);
    if (fresh) {
      state.freshConflictIds.add(row.id);
      window.setTimeout(function () {
        state.freshConflictIds.delete(row.id);
      }, 3500);
    }
  }

  function loadConflicts(more) {
    var offset = more ? state.conflicts.length : 0;
    // A refresh fetches as many rows as are shown, so "show older" is not undone.
    var limit = more ? CONFLICT_PAGE : Math.min(500, Math.max(CONFLICT_PAGE, state.conflicts.length));
    return request("GET", "/api/conflicts?limit=" + limit + "&offset=" + offset)
      .then(function (rows) {
        rows = Array.isArray(rows) ? rows : [];
        if (more) {
          var known = new Set(state.conflicts.map(function (c) { return c.id; }));
          rows.forEach(function (r) {
            if (!known.has(r.id)) state.conflicts.push(r);
          });
        } else {
          state.conflicts = rows;
        }
        state.conflictsComplete = rows.length < limit;
        showSectionError("conflicts", null);
        renderConflicts();
      })
      .catch(function (error) {
        showSectionError("conflicts", error);
        if (!more && state.conflicts.length === 0) renderConflicts();
      });
  }

  function resolveConflict(id, choice, buttons) {
    var current = state.actionMessages.get(id);
    if (current && current.state === "pending") return;
    buttons.forEach(function (b) { b.disabled = true; });
    state.actionMessages.set(id, { state: "pending", text: "Saving…" });
    var status = buttons[0] && buttons[0].parentNode.querySelector(".action-message");
    if (status) {
      status.dataset.state = "pending";
      status.textContent = "Saving…";
    }
    return request("POST", "/api/conflicts/" + encodeURIComponent(id) + "/resolve", { choice: choice, resolvedBy: RESOLVER })
      .then(function (row) {
        state.actionMessages.set(id, {
          state: "ok",
          text: choice === "local" ? "Resolved: the local version is kept." : "Resolved: the remote version was taken.",
        });
        if (row && row.id !== undefined) upsertConflict(row, false);
        renderConflicts();
        loadConflicts(false);
        loadDashboard();
      })
      .catch(function (error) {
        state.actionMessages.set(id, { state: "error", text: "Not resolved: " + error.message });
        renderConflicts();
        if (error.status === 409 || error.status === 404) loadConflicts(false);
      });
  }

  function toggleConflict(id) {
    state.selectedConflictId = state.selectedConflictId === id ? null : id;
    renderConflicts();
    var row = document.querySelector('tr[data-conflict-id="' + cssEscape(String(id)) + '"]');
    if (row) {
      row.focus({ preventScroll: true });
      if (state.selectedConflictId !== null && row.scrollIntoView) row.scrollIntoView({ block: "nearest" });
    }
  }

  function cssEscape(text) {
    return window.CSS && CSS.escape ? CSS.escape(text) : text.replace(/["\\]/g, "\\$&");
  }

  function conflictById(rawId) {
    return state.conflicts.find(function (c) { return String(c.id) === rawId; });
  }

  $("#conflicts-body").addEventListener("click", function (event) {
    var button = event.target.closest("[data-action]");
    if (button) {
      var action = button.getAttribute("data-action");
      var conflict = conflictById(button.getAttribute("data-conflict"));
      if (conflict && action === "toggle-fields") {
        if (state.expandedFields.has(conflict.id)) state.expandedFields.delete(conflict.id);
        else state.expandedFields.add(conflict.id);
        renderConflicts();
        return;
      }
      if (conflict && (action === "resolve-local" || action === "resolve-remote")) {
        var buttons = Array.prototype.slice.call(button.parentNode.querySelectorAll("[data-action]"));
        resolveConflict(conflict.id, action === "resolve-local" ? "local" : "remote", buttons);
      }
      return;
    }
    if (event.target.closest(".detail-row")) return;
    var row = event.target.closest("tr[data-conflict-id]");
    if (!row) return;
    var picked = conflictById(row.getAttribute("data-conflict-id"));
    if (picked) toggleConflict(picked.id);
  });

  $("#conflicts-body").addEventListener("keydown", function (event) {
    if (event.key !== "Enter" && event.key !== " ") return;
    var row = event.target.closest("tr[data-conflict-id]");
    if (!row || event.target !== row) return;
    event.preventDefault();
    var picked = conflictById(row.getAttribute("data-conflict-id"));
    if (picked) toggleConflict(picked.id);
  });

  $("#conflicts-more").addEventListener("click", function () {
    state.conflictsShown += 25;
    if (state.conflicts.length < state.conflictsShown && !state.conflictsComplete) loadConflicts(true);
    else renderConflicts();
  });

  // ---- loading and live updates ------------------------------------------------

  function loadDashboard() {
    return request("GET", "/api/dashboard")
      .then(function (data) {
        state.dashboard = data || {};
        showSectionError("dashboard", null);
        renderHealth();
        renderHistory();
      })
      .catch(function (error) {
        showSectionError("dashboard", error);
      });
  }

  // ---- head office: the chain's stores -----------------------------------------

  // Days of sales per store shown (and asked for).
  var SALES_DAYS = 7;

  // Shown only on a head office; the answer of /api/chain/status decides, once.
  function loadChain() {
    if (state.chainRole === "other") return Promise.resolve();
    var first = state.chainRole === undefined;
    var roleCheck = first ? request("GET", "/api/chain/status") : Promise.resolve(null);
    return roleCheck
      .then(function (status) {
        if (first) {
          state.chainRole = status && status.role && status.role.hq ? "hq" : "other";
          if (state.chainRole !== "hq") return;
          $("#chain").hidden = false;
          $("#chain-nav").hidden = false;
          if (status.role.hq.chain) $("#chain-sub").textContent = "Chain " + status.role.hq.chain + ": every store as this head office sees it";
        }
        return request("GET", "/api/chain/stores?days=" + SALES_DAYS).then(function (stores) {
          state.chainStores = stores || [];
          showSectionError("stores", null);
          renderChainStores();
          renderChainSales();
        });
      })
      .catch(function (error) {
        if (state.chainRole === "hq") showSectionError("stores", error);
      });
  }

  function renderChainStores() {
    var body = $("#chain-stores-body");
    var stores = state.chainStores || [];
    body.textContent = "";
    if (!stores.length) {
      body.appendChild(el("tr", { className: "empty-row" }, [el("td", { colspan: 9, text: "No store has sent anything yet." })]));
      return;
    }
    var today = new Date(serverNow()).toISOString().slice(0, 10);
    stores.forEach(function (store) {
      var todays = (store.salesPerDay || []).filter(function (day) { return day.day === today; })[0];
      var last = isNum(store.lastReceivedUnix) ? store.lastReceivedUnix * 1000 : null;
      var lastText = fmtAge(last) + (store.alert ? " · silent" : "");
      // What the store's tills report every few seconds: online, or offline since when; and
      // how many changes they still hold for the backbone.
      var uplink = store.uplink;
      var uplinkText = "no report";
      if (uplink) {
        uplinkText = uplink.online ? "online" : "offline since " + fmtAge(Date.parse(uplink.offlineSince));
        if (uplink.lagChanges > 0) {
          uplinkText += " · " + fmtInt(uplink.lagChanges) + " to upload";
          if (isNum(uplink.lagSeconds)) uplinkText += ", " + fmtDuration(uplink.lagSeconds * 1000) + " behind";
        }
      }
      // The store's conflicts summary, as its tills report it.
      var conflicts = uplink && uplink.conflicts;
      var conflictsText = conflicts ? fmtInt(conflicts.lastDay) + " in 24 h" + (conflicts.open ? " · " + fmtInt(conflicts.open) + " open" : "") : "—";
      body.appendChild(
        el("tr", { "data-store-id": store.storeId, "data-alert": store.alert ? "true" : "false" }, [
          el("th", { scope: "row", text: store.storeId }),
          el("td", { "data-field": "terminals", text: fmtInt((store.terminals || []).length) }),
          el("td", { "data-field": "lastReceived", className: store.alert ? "late" : null, text: lastText }),
          el("td", { "data-field": "uplink", className: uplink && !uplink.online ? "late" : null, text: uplinkText }),
          el("td", { "data-field": "conflicts", className: conflicts && conflicts.open ? "late" : null, text: conflictsText }),
          el("td", { "data-field": "changes", text: fmtInt(store.changesReceived) }),
          el("td", { "data-field": "ticketsToday", text: fmtInt(todays ? todays.tickets : 0) }),
          el("td", { "data-field": "salesToday", text: todays ? todays.total : "0" }),
          el("td", { "data-field": "tickets", text: fmtInt(store.tickets) }),
        ])
      );
    });
  }

  // Sales per store per UTC day, the last 7 days (today last): one row per day, one
  // column per store, each cell "total (tickets)".

  function renderChainSales() {
    var stores = state.chainStores || [];
    var head = $("#chain-sales-head");
    var body = $("#chain-sales-body");
    head.textContent = "";
    body.textContent = "";
    head.appendChild(el("th", { scope: "col", text: "Day (UTC)" }));
    stores.forEach(function (store) {
      head.appendChild(el("th", { scope: "col", text: store.storeId }));
    });
    var now = serverNow();
    for (var back = SALES_DAYS - 1; back >= 0; back--) {
      var day = new Date(now - back * 86400000).toISOString().slice(0, 10);
      var cells = [el("th", { scope: "row", text: day })];
      stores.forEach(function (store) {
        var sold = (store.salesPerDay || []).filter(function (entry) { return entry.day === day; })[0];
        cells.push(el("td", {
          "data-store-id": store.storeId,
          text: sold ? sold.total + " (" + fmtInt(sold.tickets) + ")" : "—",
        }));
      });
      body.appendChild(el("tr", { "data-day": day }, cells));
    }
    $("#chain-sales").hidden = stores.length === 0;
  }

  function loadChainStock(productId) {
    return request("GET", "/api/chain/stock?productId=" + encodeURIComponent(productId))
      .then(function (stock) {
        var body = $("#chain-stock-body");
        body.textContent = "";
        (stock.stores || []).forEach(function (row) {
          body.appendChild(el("tr", { "data-store-id": row.storeId }, [
            el("th", { scope: "row", text: row.storeId }),
            el("td", { "data-field": "stock", text: row.stock }),
          ]));
        });
        $("#chain-stock-total").textContent = stock.total;
        $("#chain-stock-table").hidden = false;
        showSectionError("stores", null);
      })
      .catch(function (error) {
        showSectionError("stores", error);
      });
  }

  $("#chain-stock-form").addEventListener("submit", function (event) {
    event.preventDefault();
    var productId = $("#chain-stock-product").value.trim();
    if (productId) loadChainStock(productId);
  });

  function loadStatusAndStats() {
    return Promise.all([request("GET", "/api/status"), request("GET", "/api/stats")])
      .then(function (answers) {
        applyLive(answers[0], answers[1], null);
      })
      .catch(function () {
        // The event stream will bring the same data; the badge already says we are not live.
      });
  }

  function applyLive(status, stats, now) {
    if (status) state.status = status;
    if (stats) {
      state.stats = stats;
      if (now !== null) addStatsSample(now, stats);
    }
    renderHeader();
    renderPeers();
    renderTotals();
    renderRateCharts();
    $("#updated-at").textContent = "Updated " + new Date().toLocaleTimeString();
  }

  function refreshSlow() {
    loadConflicts(false);
    loadDashboard();
    loadChain();
  }

  function connectEvents() {
    if (!window.EventSource) {
      // Very old browsers: poll instead of streaming.
      state.live = "unsupported";
      renderLiveBadge();
      window.setInterval(loadStatusAndStats, 2000);
      return;
    }
    var source = new EventSource(apiUrl("/api/events"));
    state.source = source;

    source.addEventListener("open", function () {
      var wasDown = state.live === "reconnecting" || state.hadConnection;
      state.live = "live";
      state.lastStatsAt = Date.now();
      renderLiveBadge();
      if (wasDown) refreshSlow(); // catch up on what happened while we were away
      state.hadConnection = true;
    });

    source.addEventListener("error", function () {
      state.live = state.hadConnection ? "reconnecting" : "connecting";
      renderLiveBadge();
      if (source.readyState === EventSource.CLOSED) {
        // The browser gave up (e.g. an HTTP error): try again ourselves.
        source.close();
        state.live = "reconnecting";
        renderLiveBadge();
        window.setTimeout(connectEvents, 5000);
      }
    });

    source.addEventListener("stats", function (event) {
      var data;
      try {
        data = JSON.parse(event.data);
      } catch (err) {
        return;
      }
      var now = isNum(data.now) ? data.now : Date.now() + state.serverOffsetMs;
      if (isNum(data.now)) state.serverOffsetMs = data.now - Date.now();
      state.lastStatsAt = Date.now();
      if (state.live !== "live") {
        state.live = "live";
        renderLiveBadge();
      }
      applyLive(data.status || null, data.stats || null, now);
    });

    source.addEventListener("conflict", function (event) {
      var row;
      try {
        row = JSON.parse(event.data);
      } catch (err) {
        return;
      }
      upsertConflict(row, true);
      renderConflicts();
    });
  }

  // Once a second: ages, and whether the stream went quiet.
  window.setInterval(function () {
    if (state.live === "live" && Date.now() - state.lastStatsAt > STALE_MS) state.live = "stalled";
    renderLiveBadge();
    renderPeerAges();
  }, 1000);

  window.setInterval(refreshSlow, REFRESH_MS);
  // A head office's store table moves faster than conflicts: every 5 s.
  window.setInterval(function () {
    if (state.chainRole === "hq") loadChain();
  }, 5000);

  document.addEventListener("visibilitychange", function () {
    if (!document.hidden) refreshSlow();
  });

  renderHeader();
  renderRateCharts();
  renderHealth();
  renderHistory();
  loadStatusAndStats();
  refreshSlow();
  connectEvents();
})();
