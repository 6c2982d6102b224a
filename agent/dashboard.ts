/**
 * The owner's live dashboard: a page on a loopback port and a WebSocket feed
 * of what KMS is doing (every operation record, never payloads), the tunnels'
 * states (with the reason and next attempt while down), the HSM's login state
 * (why logins are stopped, if they are) and the owner's switches (and why the
 * agent is paused when its controls file is damaged), with the pause switch and per-key disable
 * as controls.
 *
 * Access needs the dashboard token (random per start, written to
 * <state>/dashboard-url with mode 0600, never logged): a web page in the
 * owner's browser cannot drive the switches without it, and a WebSocket from
 * another origin is refused.
 */
import { randomBytes } from "node:crypto";
import { writeFileSync } from "node:fs";
import { createServer, type IncomingMessage, type Server } from "node:http";
import { dirname, join } from "node:path";
import { WebSocketServer, type WebSocket } from "ws";
import type { Logger } from "../shared/logging.ts";
import { EXTERNAL_KEY_ID_RE } from "../shared/xks-spec.ts";
import type { Controls } from "./controls.ts";
import type { Hsm } from "./hsm/hsm.ts";
import type { OperationRecord } from "./server.ts";
import type { TunnelSet } from "./tunnel.ts";
import { tokenChecker } from "./server.ts";
import type { EventEmitter } from "node:events";

const RECENT = 200;

export interface DashboardDeps {
  host: string;
  port: number;
  stateFile: string;
  controls: Controls;
  tunnels: TunnelSet;
  /** Why HSM logins are stopped, and "login" events when that changes. */
  hsm: Pick<Hsm, "loginStopped" | "on" | "off">;
  events: EventEmitter;
  log: Logger;
}

export interface Dashboard {
  url: string;
  token: string;
  close(): Promise<void>;
}

type ClientMessage = { type: "setPaused"; paused: boolean } | { type: "setKeyDisabled"; key: string; disabled: boolean };

export async function startDashboard(d: DashboardDeps): Promise<Dashboard> {
  const token = randomBytes(24).toString("base64url");
  const tokenMatches = tokenChecker(token);
  const recent: OperationRecord[] = [];
  const tokenOf = (req: IncomingMessage) => new URL(req.url ?? "/", "http://x").searchParams.get("token") ?? "";

  const server: Server = createServer((req, res) => {
    const path = new URL(req.url ?? "/", "http://x").pathname;
    if (req.method !== "GET" || path !== "/") {
      res.writeHead(404).end();
      return;
    }
    if (!tokenMatches(tokenOf(req))) {
      res.writeHead(401, { "content-type": "text/plain" }).end("open the URL in the agent's state/dashboard-url file\n");
      return;
    }
    res.writeHead(200, {
      "content-type": "text/html; charset=utf-8",
      "content-security-policy": "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'",
      "cache-control": "no-store",
      "referrer-policy": "no-referrer",
    });
    res.end(PAGE);
  });

  const wss = new WebSocketServer({ noServer: true, maxPayload: 4096 });
  server.on("upgrade", (req, socket, head) => {
    const host = req.headers.host ?? "";
    const origin = req.headers.origin;
    const path = new URL(req.url ?? "/", "http://x").pathname;
    if (path !== "/feed" || !tokenMatches(tokenOf(req)) || (origin !== undefined && origin !== `http://${host}`)) {
      socket.end("HTTP/1.1 401 Unauthorized\r\nConnection: close\r\n\r\n");
      return;
    }
    wss.handleUpgrade(req, socket, head, (ws) => wss.emit("connection", ws, req));
  });

  const send = (ws: WebSocket, msg: unknown) => {
    if (ws.readyState === ws.OPEN) ws.send(JSON.stringify(msg));
  };
  const broadcast = (msg: unknown) => {
    const text = JSON.stringify(msg);
    for (const ws of wss.clients) if (ws.readyState === ws.OPEN) ws.send(text);
  };

  wss.on("connection", (ws: WebSocket) => {
    send(ws, {
      type: "snapshot",
      controls: d.controls.snapshot(),
      tunnels: d.tunnels.states(),
      hsm: { loginStopped: d.hsm.loginStopped() ?? null },
      recent,
    });
    ws.on("message", (data) => {
      let msg: ClientMessage;
      try {
        msg = JSON.parse(String(data)) as ClientMessage;
      } catch {
        return;
      }
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
    });
  });

  const onOperation = (rec: OperationRecord) => {
    recent.push(rec);
    if (recent.length > RECENT) recent.shift();
    if (wss.clients.size > 0) broadcast({ type: "operation", rec });
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

  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(d.port, d.host, () => resolve());
  });
  const addr = server.address();
  const port = typeof addr === "object" && addr ? addr.port : d.port;
  const url = `http://${d.host}:${port}/?token=${token}`;
  writeFileSync(join(dirname(d.stateFile), "dashboard-url"), `${url}\n`, { mode: 0o600 });
  d.log.info({ address: `${d.host}:${port}`, urlFile: join(dirname(d.stateFile), "dashboard-url") }, "dashboard listening");

  return {
    url,
    token,
    close: async () => {
      d.events.off("operation", onOperation);
      d.controls.off("change", onControls);
      d.hsm.off("login", onLogin);
      for (const t of tunnelListeners) t.off("state", onTunnel);
      for (const ws of wss.clients) ws.terminate();
      wss.close();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

const PAGE = `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>xks-agent</title>
<style>
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em} .bad{color:#b00} .ok{color:#070}
table{border-collapse:collapse;width:100%} td,th{border-bottom:1px solid #ddd;padding:3px 6px;text-align:left;font-size:12px}
button{font-size:1em;padding:.4em 1em} #state{font-weight:bold}
</style></head><body>
<h1>xks-agent: what KMS is doing with your keys</h1>
<p>KMS access: <span id="state">…</span> <button id="toggle">…</button></p>
<p id="damaged" class="bad"></p>
<p>HSM: <span id="hsm">…</span></p>
<p>Tunnels: <span id="tunnels">…</span></p>
<p>Disabled keys: <span id="disabled">none</span></p>
<table><thead><tr><th>time</th><th>operation</th><th>KMS operation</th><th>key</th><th>principal</th><th>via</th><th>result</th><th>ms</th><th>request id</th></tr></thead><tbody id="ops"></tbody></table>
<script>
const q = new URLSearchParams(location.search);
const ws = new WebSocket("ws://" + location.host + "/feed?token=" + encodeURIComponent(q.get("token") || ""));
let paused = false;
const $ = (id) => document.getElementById(id);
function cell(tr, text, cls) { const td = document.createElement("td"); td.textContent = text; if (cls) td.className = cls; tr.appendChild(td); }
function addOp(r) {
  const tr = document.createElement("tr");
  cell(tr, r.time.slice(11, 23)); cell(tr, r.operation); cell(tr, r.kmsOperation); cell(tr, r.keyId); cell(tr, r.principal);
  cell(tr, r.viaService); cell(tr, r.result, r.result === "OK" ? "ok" : "bad"); cell(tr, String(r.latencyMs)); cell(tr, r.kmsRequestId);
  $("ops").prepend(tr); while ($("ops").children.length > 200) $("ops").lastChild.remove();
}
function controls(c) {
  paused = c.paused;
  $("state").textContent = paused ? "PAUSED (KMS is refused)" : "allowed"; $("state").className = paused ? "bad" : "ok";
  $("toggle").textContent = paused ? "Resume" : "Pause KMS now";
  $("disabled").textContent = c.disabledKeys.length ? c.disabledKeys.join(", ") : "none";
  $("damaged").textContent = c.problem ? c.problem + " (the agent stays paused until it is rewritten: xks-agent resume)" : "";
}
function hsm(h) { $("hsm").textContent = h.loginStopped ? "logins stopped: " + h.loginStopped : "ok"; $("hsm").className = h.loginStopped ? "bad" : "ok"; }
function tunnels(t) { $("tunnels").textContent = t.length ? t.map((x) => x.name + ": " + x.state + " since " + x.since + (x.lastError ? " (" + x.lastError + ")" : "") + (x.state === "down" && x.nextAttemptAt ? ", next attempt at " + x.nextAttemptAt : "")).join("; ") : "none configured"; }
$("toggle").onclick = () => ws.send(JSON.stringify({ type: "setPaused", paused: !paused }));
ws.onmessage = (ev) => {
  const m = JSON.parse(ev.data);
  if (m.type === "snapshot") { controls(m.controls); tunnels(m.tunnels); hsm(m.hsm); m.recent.forEach(addOp); }
  if (m.type === "hsm") hsm(m.hsm);
  if (m.type === "operation") addOp(m.rec);
  if (m.type === "controls") controls(m.controls);
  if (m.type === "tunnels") tunnels(m.tunnels);
};
ws.onclose = () => { $("state").textContent = "disconnected from the agent"; $("state").className = "bad"; };
</script></body></html>
`;
