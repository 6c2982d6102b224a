/**
 * The owner's live dashboard: a page on a loopback port and a WebSocket feed
 * of what KMS is doing (every KMS operation record, never payloads; the
 * proxies' background health refreshes as a separate indicator), per-key
 * counters, the tunnels' states (with the reason and next attempt while down),
 * the HSM's state (why logins are stopped, if they are, and the last deep
 * health answer) and the owner's switches (and why the agent is paused when
 * its controls file is damaged), with the pause switch and per-key disable as
 * controls.
 *
 * Access needs all three of:
 *   - a loopback connection (the listener is on a loopback address);
 *   - a Host header naming the dashboard (127.0.0.1, localhost or [::1] and its
 *     port), so a page on a DNS name rebound to 127.0.0.1 gets 403;
 *   - the dashboard token: kept in <state>/dashboard-token (0600; made at the
 *     first start and reused, so the URL survives restarts; deleting the file
 *     makes a new one), written as a URL to <state>/dashboard-url (0600) and
 *     printed by `xks-agent dashboard`, never logged.
 * A WebSocket whose Origin is not the dashboard's own is refused, so a page
 * from another origin in the owner's browser gets nothing.
 *
 * Messages from the browser are untrusted input: anything that is not one of
 * the two switch messages below is ignored, and a frame over 4 KiB closes that
 * connection only.
 */
import { createHash, randomBytes } from "node:crypto";
import { existsSync, mkdirSync, readFileSync, renameSync, writeFileSync } from "node:fs";
import { createServer, type IncomingMessage, type Server } from "node:http";
import { dirname, join } from "node:path";
import { WebSocketServer, type WebSocket } from "ws";
import { secretFileProblem } from "../shared/config.ts";
import type { Logger } from "../shared/logging.ts";
import { EXTERNAL_KEY_ID_RE } from "../shared/xks-spec.ts";
import type { Controls } from "./controls.ts";
import type { Hsm } from "./hsm/hsm.ts";
import type { OperationRecord } from "./server.ts";
import type { TunnelSet } from "./tunnel.ts";
import { tokenChecker } from "./server.ts";
import type { EventEmitter } from "node:events";

/** KMS operations kept for a page that connects. */
const RECENT = 200;
/** A browser that reads slower than operations arrive is dropped once this much is queued for it. */
const MAX_BUFFERED_BYTES = 8 << 20;
/** The largest message accepted from a browser (the switch messages are under 200 bytes). */
const MAX_CLIENT_MESSAGE_BYTES = 4096;
const TOKEN_RE = /^[A-Za-z0-9_-]{32}$/;

export interface DashboardDeps {
  host: string;
  port: number;
  stateFile: string;
  controls: Controls;
  tunnels: TunnelSet;
  /** Why HSM logins are stopped, and "login" events when that changes. */
  hsm: Pick<Hsm, "loginStopped" | "on" | "off">;
  events: EventEmitter;
  /** The key labels KMS may use (the agent's allow-list): each gets counters and a switch. Others share one counter. */
  keys?: readonly string[];
  /** The audit log's head and problem, read when the page is opened and with each health refresh. */
  audit?: () => { head?: { records: number; hash: string }; problem?: string };
  log: Logger;
}

export interface Dashboard {
  url: string;
  token: string;
  close(): Promise<void>;
}

/** A row of the operations table: the record, and why it was refused when the owner's switches refused it. */
export type DashboardRow = OperationRecord & { why?: string };

/** Per-key counters since the agent started. */
export interface KeyCounters {
  key: string;
  /** Calls by operation (GetKeyMetadata, Encrypt, Decrypt). */
  calls: Record<string, number>;
  ok: number;
  denied: number;
  errors: number;
  /** ISO time of the last call, and its result. */
  lastUse?: string;
  lastResult?: string;
}

/** The background health refreshes the proxies send (operation GetHealthStatus). */
export interface HealthIndicator {
  checks: number;
  last?: { time: string; result: string; state: string; detail: string; latencyMs: number };
  /** The audit log's newest sealed checkpoint (record count and hash), and why it cannot write or seal, if so. */
  audit?: { records?: number; hash?: string; problem?: string };
}

/**
 * Results that are a refusal (the owner's switches, the allow-list, the key's
 * attributes, a caller without the token); every other result except OK is
 * an error.
 */
export const DENIALS: ReadonlySet<string> = new Set([
  "INVALID_STATE",
  "ACCESS_DENIED",
  "KEY_NOT_FOUND",
  "INVALID_KEY_USAGE",
  "UNAUTHENTICATED",
]);

const bracketed = (host: string) => (host.includes(":") ? `[${host}]` : host);

const tokenFileOf = (stateFile: string) => join(dirname(stateFile), "dashboard-token");
const urlFileOf = (stateFile: string) => join(dirname(stateFile), "dashboard-url");

/**
 * The dashboard token kept in <state>/dashboard-token: reused when the file is
 * private (0600, ours) and holds a token; otherwise a new token replaces it,
 * and `replaced` says why (never the token).
 */
export function dashboardToken(stateFile: string): { token: string; replaced?: string } {
  const file = tokenFileOf(stateFile);
  let replaced: string | undefined;
  if (existsSync(file)) {
    const problem = secretFileProblem(file);
    if (problem === undefined) {
      const text = readFileSync(file, "utf8").trim();
      if (TOKEN_RE.test(text)) return { token: text };
      replaced = `${file} did not hold a dashboard token`;
    } else replaced = problem;
  }
  const token = randomBytes(24).toString("base64url");
  mkdirSync(dirname(file), { recursive: true, mode: 0o700 });
  const tmp = `${file}.tmp`;
  writeFileSync(tmp, `${token}\n`, { mode: 0o600 });
  renameSync(tmp, file);
  return { token, ...(replaced !== undefined ? { replaced } : {}) };
}

/**
 * The authenticated URL for the owner (`xks-agent dashboard`): from the
 * configured address and the kept token, or, for port 0 (a free port chosen
 * at start), the URL the running agent wrote.
 */
export function dashboardUrl(cfg: { host: string; port: number }, stateFile: string): string {
  if (cfg.port === 0) {
    const file = urlFileOf(stateFile);
    if (!existsSync(file)) throw new Error(`dashboard.port is 0 and ${file} does not exist: start the agent first`);
    return readFileSync(file, "utf8").trim();
  }
  return `http://${bracketed(cfg.host)}:${cfg.port}/?token=${dashboardToken(stateFile).token}`;
}

type Json = Record<string, unknown>;
const isObject = (v: unknown): v is Json => typeof v === "object" && v !== null && !Array.isArray(v);

export async function startDashboard(d: DashboardDeps): Promise<Dashboard> {
  const kept = dashboardToken(d.stateFile);
  if (kept.replaced)
    d.log.warn({ why: kept.replaced, file: tokenFileOf(d.stateFile) }, "dashboard token replaced: the old URL no longer works");
  const token = kept.token;
  const tokenMatches = tokenChecker(token);
  const recent: DashboardRow[] = [];
  const health: HealthIndicator = { checks: 0 };
  const auditNow = (): HealthIndicator["audit"] => {
    const a = d.audit?.();
    return a ? { records: a.head?.records, hash: a.head?.hash, problem: a.problem } : undefined;
  };
  const counters = new Map<string, KeyCounters>((d.keys ?? []).map((key) => [key, { key, calls: {}, ok: 0, denied: 0, errors: 0 }]));
  const other: KeyCounters = { key: "", calls: {}, ok: 0, denied: 0, errors: 0 };
  const tokenOf = (req: IncomingMessage) => new URL(req.url ?? "/", "http://x").searchParams.get("token") ?? "";
  let allowedHosts = new Set<string>();
  const hostOk = (req: IncomingMessage) => allowedHosts.has((req.headers.host ?? "").toLowerCase());

  const server: Server = createServer((req, res) => {
    if (!hostOk(req)) {
      res.writeHead(403, { "content-type": "text/plain" }).end("this dashboard answers only to its loopback address\n");
      return;
    }
    const path = new URL(req.url ?? "/", "http://x").pathname;
    if (req.method !== "GET" || path !== "/") {
      res.writeHead(404).end();
      return;
    }
    if (!tokenMatches(tokenOf(req))) {
      res.writeHead(401, { "content-type": "text/plain" }).end("open the URL that `xks-agent dashboard --config FILE` prints\n");
      return;
    }
    res.writeHead(200, {
      "content-type": "text/html; charset=utf-8",
      "content-security-policy": CSP,
      "x-frame-options": "DENY",
      "x-content-type-options": "nosniff",
      "cache-control": "no-store",
      "referrer-policy": "no-referrer",
    });
    res.end(PAGE);
  });

  const wss = new WebSocketServer({ noServer: true, maxPayload: MAX_CLIENT_MESSAGE_BYTES });
  server.on("upgrade", (req, socket, head) => {
    const origin = req.headers.origin;
    const path = new URL(req.url ?? "/", "http://x").pathname;
    if (!hostOk(req) || (origin !== undefined && origin !== `http://${req.headers.host}`)) {
      socket.end("HTTP/1.1 403 Forbidden\r\nConnection: close\r\n\r\n");
      return;
    }
    if (path !== "/feed" || !tokenMatches(tokenOf(req))) {
      socket.end("HTTP/1.1 401 Unauthorized\r\nConnection: close\r\n\r\n");
      return;
    }
    wss.handleUpgrade(req, socket, head, (ws) => wss.emit("connection", ws, req));
  });

  const sendText = (ws: WebSocket, text: string) => {
    if (ws.readyState !== ws.OPEN) return;
    if (ws.bufferedAmount > MAX_BUFFERED_BYTES) {
      ws.terminate();
      return;
    }
    ws.send(text);
  };
  const broadcast = (msg: unknown) => {
    if (wss.clients.size === 0) return;
    const text = JSON.stringify(msg);
    for (const ws of wss.clients) sendText(ws, text);
  };
  const keyList = () => [...counters.values(), ...(other.lastUse !== undefined ? [other] : [])];

  /** Applies one message from a browser; anything else is ignored. */
  const handle = (data: unknown) => {
    let msg: unknown;
    try {
      msg = JSON.parse(String(data));
    } catch {
      return;
    }
    if (!isObject(msg)) return;
    if (msg.type === "setPaused" && typeof msg.paused === "boolean") {
      d.log.warn({ paused: msg.paused, via: "dashboard" }, "owner switch");
      d.controls.setPaused(msg.paused);
    } else if (
      msg.type === "setKeyDisabled" &&
      typeof msg.key === "string" &&
      EXTERNAL_KEY_ID_RE.test(msg.key) &&
      typeof msg.disabled === "boolean"
    ) {
      d.log.warn({ key: msg.key, disabled: msg.disabled, via: "dashboard" }, "owner switch");
      d.controls.setKeyDisabled(msg.key, msg.disabled);
    }
  };

  wss.on("connection", (ws: WebSocket) => {
    // ws closes the connection itself on a bad frame (1009 for one over maxPayload, 1002 for a protocol error) and
    // then emits "error": a listener keeps that from becoming an uncaught exception.
    ws.on("error", () => {});
    sendText(
      ws,
      JSON.stringify({
        type: "snapshot",
        controls: d.controls.snapshot(),
        tunnels: d.tunnels.states(),
        hsm: { loginStopped: d.hsm.loginStopped() ?? null },
        health: { ...health, audit: auditNow() },
        keys: keyList(),
        recent,
      }),
    );
    ws.on("message", (data, isBinary) => {
      if (isBinary) return;
      try {
        handle(data);
      } catch (err) {
        d.log.error({ err: (err as Error).message, via: "dashboard" }, "owner switch failed");
      }
    });
  });

  /**
   * Why the owner refused this record: the policy rule, or the switch (judged when it is recorded, the same tick
   * as the refusal); in log-only mode, the rule that would have denied it.
   */
  const whyRefused = (rec: OperationRecord): string | undefined => {
    if (rec.result === "ACCESS_DENIED" && rec.policyRule) return `policy rule ${rec.policyRule}`;
    if (rec.wouldDeny) return `log-only: policy rule ${rec.wouldDeny} would deny`;
    if (rec.result !== "INVALID_STATE") return undefined;
    if (d.controls.paused) return d.controls.problem ? "paused: the controls file is damaged" : "paused by the owner";
    if (d.controls.isKeyDisabled(rec.keyId)) return "key disabled by the owner";
    return undefined;
  };
  const count = (rec: OperationRecord) => {
    const c = counters.get(rec.keyId) ?? other;
    c.calls[rec.operation] = (c.calls[rec.operation] ?? 0) + 1;
    if (rec.result === "OK") c.ok++;
    else if (DENIALS.has(rec.result)) c.denied++;
    else c.errors++;
    c.lastUse = rec.time;
    c.lastResult = rec.result;
    return c;
  };
  const onOperation = (rec: OperationRecord) => {
    if (rec.operation === "GetHealthStatus") {
      health.checks++;
      health.last = {
        time: rec.time,
        result: rec.result,
        state: rec.health?.state ?? "",
        detail: rec.health?.detail ?? "",
        latencyMs: rec.latencyMs,
      };
      health.audit = auditNow();
      broadcast({ type: "health", health });
      return;
    }
    const why = whyRefused(rec);
    const row: DashboardRow = why === undefined ? rec : { ...rec, why };
    recent.push(row);
    if (recent.length > RECENT) recent.shift();
    const c = count(rec);
    broadcast({ type: "operation", rec: row, key: c });
  };
  const onControls = (state: unknown) => broadcast({ type: "controls", controls: state });
  const onTunnel = () => broadcast({ type: "tunnels", tunnels: d.tunnels.states() });
  const onLogin = (why: string | undefined) => broadcast({ type: "hsm", hsm: { loginStopped: why ?? null } });
  d.events.on("operation", onOperation);
  d.controls.on("change", onControls);
  d.hsm.on("login", onLogin);
  const tunnelListeners = d.tunnels.list().map((t) => {
    t.on("state", onTunnel);
    return t;
  });
  const unlisten = () => {
    d.events.off("operation", onOperation);
    d.controls.off("change", onControls);
    d.hsm.off("login", onLogin);
    for (const t of tunnelListeners) t.off("state", onTunnel);
  };

  try {
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen(d.port, d.host, () => resolve());
    });
  } catch (err) {
    unlisten();
    throw err;
  }
  const addr = server.address();
  const port = typeof addr === "object" && addr ? addr.port : d.port;
  allowedHosts = new Set([`${bracketed(d.host)}:${port}`, `127.0.0.1:${port}`, `localhost:${port}`, `[::1]:${port}`]);
  const url = `http://${bracketed(d.host)}:${port}/?token=${token}`;
  writeFileSync(urlFileOf(d.stateFile), `${url}\n`, { mode: 0o600 });
  d.log.info({ address: `${bracketed(d.host)}:${port}`, urlFile: urlFileOf(d.stateFile) }, "dashboard listening");

  return {
    url,
    token,
    close: async () => {
      unlisten();
      for (const ws of wss.clients) ws.terminate();
      wss.close();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

const STYLE = `
body{font:14px system-ui,sans-serif;margin:1.2em;color:#222;background:#fafafa}
h1{font-size:1.25em;margin:0 0 .4em} h2{font-size:1em;margin:1em 0 .3em}
header{display:flex;gap:1.5em;align-items:baseline;flex-wrap:wrap}
.bad{color:#b00;font-weight:bold} .ok{color:#070} .warn{color:#a60;font-weight:bold} .muted{color:#777}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(22em,1fr));gap:.8em}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.6em .8em}
table{border-collapse:collapse;width:100%;background:#fff} td,th{border-bottom:1px solid #e4e4e4;padding:3px 6px;text-align:left;font-size:12px;vertical-align:top}
td{white-space:nowrap} td.wrap{white-space:normal;overflow-wrap:anywhere;min-width:8em} th{background:#f0f0f0}
tr.op-denied td{background:#fff4e0} tr.op-error td{background:#ffe8e8}
button{font-size:1em;padding:.3em .9em;cursor:pointer} #pause{font-weight:bold}
canvas{background:#fff;border:1px solid #ddd;border-radius:6px;width:100%;height:120px}
`;

const SCRIPT = `
"use strict";
const $ = (id) => document.getElementById(id);
const token = new URLSearchParams(location.search).get("token") || "";
const ws = new WebSocket("ws://" + location.host + "/feed?token=" + encodeURIComponent(token));
const MAX_ROWS = 200, CHART = 120;
let paused = false, disabled = new Set(), keys = new Map(), keysChanged = false, latencies = [], pending = [], flushTimer = 0;
const pad = (n, w) => String(n).padStart(w || 2, "0");
function localTime(iso) {
  const t = new Date(iso);
  if (isNaN(t)) return String(iso);
  return t.getFullYear() + "-" + pad(t.getMonth() + 1) + "-" + pad(t.getDate()) + " " + pad(t.getHours()) + ":" + pad(t.getMinutes()) + ":" + pad(t.getSeconds()) + "." + pad(t.getMilliseconds(), 3);
}
function el(tag, text, cls) { const e = document.createElement(tag); if (text !== undefined) e.textContent = String(text); if (cls) e.className = cls; return e; }
function cell(tr, text, cls) { const td = el("td", text === undefined || text === null ? "" : text, cls); tr.appendChild(td); return td; }
const DENIALS = new Set(${JSON.stringify([...DENIALS])});
const kind = (result) => result === "OK" ? "ok" : DENIALS.has(result) ? "denied" : "error";
function send(msg) { if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(msg)); }

function clock() { $("clock").textContent = localTime(new Date().toISOString()).slice(0, 19) + " (" + Intl.DateTimeFormat().resolvedOptions().timeZone + ")"; }
clock(); setInterval(clock, 1000);

function controls(c) {
  paused = !!c.paused;
  disabled = new Set(c.disabledKeys || []);
  $("state").textContent = paused ? "PAUSED: KMS is refused" : "allowed";
  $("state").className = paused ? "bad" : "ok";
  $("pause").textContent = paused ? "Resume" : "Pause KMS now";
  $("damaged").textContent = c.problem ? c.problem + " (the agent stays paused until it is rewritten: xks-agent resume)" : "";
  renderKeys();
}
function hsm(h) { $("hsm").textContent = h.loginStopped ? "logins stopped: " + h.loginStopped : "logins allowed"; $("hsm").className = h.loginStopped ? "bad" : "ok"; }
function health(h) {
  const l = h.last;
  if (!l) { $("health").textContent = "no health check yet"; $("health").className = "muted"; return; }
  const good = l.result === "OK" && l.state === "ACTIVE";
  $("health").textContent = (l.state || l.result) + (l.detail ? " (" + l.detail + ")" : "") + " at " + localTime(l.time) + ", " + l.latencyMs + " ms; " + h.checks + " checks since start";
  $("health").className = good ? "ok" : "bad";
  const a = h.audit;
  if (a) {
    $("audit").textContent = a.problem ? "PROBLEM: " + a.problem : a.records === undefined ? "no checkpoint sealed yet" : a.records + " records, head " + String(a.hash).slice(0, 16) + "… (sealed in the HSM)";
    $("audit").className = a.problem ? "bad" : "ok";
  }
}
function tunnels(list) {
  const body = $("tunnels"); body.replaceChildren();
  if (!list.length) { const tr = el("tr"); cell(tr, "none configured", "muted"); body.appendChild(tr); return; }
  for (const t of list) {
    const tr = el("tr");
    cell(tr, t.name); cell(tr, t.state, t.state === "up" ? "ok" : "bad"); cell(tr, localTime(t.since));
    cell(tr, t.lastError || "", "wrap " + (t.state === "up" ? "muted" : "bad"));
    cell(tr, t.state === "down" && t.nextAttemptAt ? localTime(t.nextAttemptAt) : "");
    cell(tr, t.connects);
    body.appendChild(tr);
  }
}
function renderKeys() {
  const body = $("keys"); body.replaceChildren();
  for (const k of keys.values()) {
    const tr = el("tr");
    const off = disabled.has(k.key);
    if (k.key) tr.dataset.key = k.key;
    cell(tr, k.key || "(other key ids)");
    cell(tr, k.key ? (off ? "DISABLED" : "enabled") : "", off ? "bad" : "ok");
    cell(tr, k.calls.Encrypt || 0); cell(tr, k.calls.Decrypt || 0); cell(tr, k.calls.GetKeyMetadata || 0);
    cell(tr, k.ok); cell(tr, k.denied, k.denied ? "warn" : ""); cell(tr, k.errors, k.errors ? "bad" : "");
    cell(tr, k.lastUse ? localTime(k.lastUse) + " " + k.lastResult : "never", k.lastResult && k.lastResult !== "OK" ? "warn" : "");
    const td = cell(tr, "");
    if (k.key) {
      const b = el("button", off ? "Enable" : "Disable");
      b.className = "toggle-key";
      b.onclick = () => send({ type: "setKeyDisabled", key: k.key, disabled: !off });
      td.appendChild(b);
    }
    body.appendChild(tr);
  }
}
function addRow(r) {
  const tr = el("tr");
  tr.className = "op-" + kind(r.result);
  tr.dataset.requestId = r.kmsRequestId;
  cell(tr, localTime(r.time)); cell(tr, r.operation); cell(tr, r.kmsOperation); cell(tr, r.keyId, "wrap"); cell(tr, r.principal, "wrap");
  cell(tr, r.kmsKeyArn, "wrap"); cell(tr, r.viaService);
  cell(tr, r.result + (r.why ? " (" + r.why + ")" : ""), kind(r.result) === "ok" ? "ok" : "wrap bad");
  cell(tr, r.latencyMs); cell(tr, r.kmsRequestId);
  $("ops").prepend(tr);
  latencies.push({ ms: Number(r.latencyMs) || 0, kind: kind(r.result) });
  if (latencies.length > CHART) latencies.shift();
}
function flush() {
  flushTimer = 0;
  if (keysChanged) { keysChanged = false; renderKeys(); }
  for (const r of pending.splice(0)) addRow(r);
  const ops = $("ops");
  while (ops.children.length > MAX_ROWS) ops.lastChild.remove();
  chart();
}
/** Rows and counters are drawn in batches, so a burst of operations costs one redraw. */
function queueRow(r) {
  pending.push(r);
  if (pending.length > MAX_ROWS) pending.shift();
  if (!flushTimer) flushTimer = setTimeout(flush, 50);
}
function chart() {
  const c = $("chart"), w = c.clientWidth || 600, h = c.clientHeight || 120, dpr = window.devicePixelRatio || 1;
  c.width = w * dpr; c.height = h * dpr;
  const g = c.getContext("2d"); g.scale(dpr, dpr); g.clearRect(0, 0, w, h);
  const max = Math.max(1, ...latencies.map((p) => p.ms));
  g.fillStyle = "#777"; g.font = "11px system-ui,sans-serif";
  g.fillText("latency of the last " + latencies.length + " KMS operations (ms, at the agent), max " + max.toFixed(1), 6, 12);
  const step = (w - 12) / Math.max(1, CHART - 1), y = (ms) => h - 4 - (ms / max) * (h - 22);
  g.strokeStyle = "#36c"; g.lineWidth = 1.5; g.beginPath();
  latencies.forEach((p, i) => { const x = 6 + i * step; if (i) g.lineTo(x, y(p.ms)); else g.moveTo(x, y(p.ms)); });
  g.stroke();
  latencies.forEach((p, i) => { if (p.kind === "ok") return; g.fillStyle = p.kind === "denied" ? "#d80" : "#c00"; g.beginPath(); g.arc(6 + i * step, y(p.ms), 3, 0, 7); g.fill(); });
}
$("pause").onclick = () => send({ type: "setPaused", paused: !paused });
ws.onopen = () => { $("conn").textContent = "connected"; $("conn").className = "ok"; };
ws.onmessage = (ev) => {
  const m = JSON.parse(ev.data);
  if (m.type === "snapshot") {
    keys = new Map(m.keys.map((k) => [k.key, k]));
    controls(m.controls); tunnels(m.tunnels); hsm(m.hsm); health(m.health);
    m.recent.forEach(queueRow);
  } else if (m.type === "operation") { keys.set(m.key.key, m.key); keysChanged = true; queueRow(m.rec); }
  else if (m.type === "health") health(m.health);
  else if (m.type === "hsm") hsm(m.hsm);
  else if (m.type === "controls") controls(m.controls);
  else if (m.type === "tunnels") tunnels(m.tunnels);
};
ws.onclose = () => { $("conn").textContent = "disconnected from the agent (reload to reconnect)"; $("conn").className = "bad"; };
`;

const BODY = `
<header><h1>xks-agent: what KMS is doing with your keys</h1><span id="clock"></span><span id="conn" class="muted">connecting…</span></header>
<div class="card"><b>KMS access:</b> <span id="state">…</span> <button id="pause">…</button> <span id="damaged" class="bad"></span></div>
<div class="grid">
<div class="card"><h2>HSM</h2><div>PIN: <span id="hsm">…</span></div><div>Deep health: <span id="health">…</span></div><div>Audit log: <span id="audit">…</span></div></div>
<div class="card"><h2>Tunnels</h2><table><thead><tr><th>proxy</th><th>state</th><th>since</th><th>last error</th><th>next attempt</th><th>connects</th></tr></thead><tbody id="tunnels"></tbody></table></div>
</div>
<h2>Keys</h2>
<table><thead><tr><th>key</th><th>status</th><th>Encrypt</th><th>Decrypt</th><th>Metadata</th><th>ok</th><th>denied</th><th>errors</th><th>last use</th><th></th></tr></thead><tbody id="keys"></tbody></table>
<h2>Latency</h2><canvas id="chart"></canvas>
<h2>KMS operations <span class="muted">(newest first; denials orange, errors red)</span></h2>
<table><thead><tr><th>local time</th><th>operation</th><th>KMS operation</th><th>key</th><th>principal</th><th>KMS key ARN</th><th>via</th><th>result</th><th>ms</th><th>request id</th></tr></thead><tbody id="ops"></tbody></table>
`;

const sha256 = (s: string) => `'sha256-${createHash("sha256").update(s).digest("base64")}'`;

/** Only this page's own script and style run; nothing may frame it. */
const CSP = `default-src 'none'; script-src ${sha256(SCRIPT)}; style-src ${sha256(STYLE)}; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'`;

const PAGE = `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>xks-agent</title>
<style>${STYLE}</style></head><body>${BODY}<script>${SCRIPT}</script></body></html>
`;
