/** The owner's dashboard: a real agent on SoftHSM, a real WebSocket client. */
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { chmodSync, readFileSync, statSync } from "node:fs";
import { get as httpGet } from "node:http";
import { join, dirname } from "node:path";
import WebSocket from "ws";
import { main as cliMain } from "../../agent/cli.ts";
import { dashboardToken, dashboardUrl } from "../../agent/dashboard.ts";
import { agentClient, type AgentTestClient, type CallError } from "../../testbed/grpc-client.ts";
import { startTestAgent, type TestAgent } from "../../testbed/in-process.ts";
import { GENEROUS_MS } from "../../testbed/wait.ts";
import { agentMetadata as sampleMetadata } from "../../testbed/xks/metadata.ts";

let t: TestAgent;
let c: AgentTestClient;

before(async () => {
  t = await startTestAgent({ extra: { dashboard: { port: 0 } } });
  c = agentClient(t.target, t.token);
});
after(async () => {
  c?.close();
  await t?.destroy();
});

function open(
  url: string,
  headers: Record<string, string> = {},
): Promise<{ ws: WebSocket; messages: any[]; next(type: string, pred?: (m: any) => boolean): Promise<any> }> {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, { headers });
    const messages: any[] = [];
    const waiters: Array<() => void> = [];
    ws.on("message", (d) => {
      messages.push(JSON.parse(String(d)));
      for (const w of waiters.splice(0)) w();
    });
    ws.on("open", () =>
      resolve({
        ws,
        messages,
        next: (type, pred = () => true) =>
          new Promise((res, rej) => {
            const timer = setTimeout(() => rej(new Error(`no ${type} message within ${GENEROUS_MS} ms`)), GENEROUS_MS);
            const check = () => {
              const m = messages.find((x) => x.type === type && pred(x));
              if (m) {
                clearTimeout(timer);
                res(m);
              } else waiters.push(check);
            };
            check();
          }),
      }),
    );
    ws.on("error", reject);
    ws.on("unexpected-response", (_req, res) => {
      res.resume();
      reject(new Error(`HTTP ${res.statusCode}`));
    });
  });
}

test("the dashboard URL (with its token) is written to a private file, not logged", () => {
  const d = t.agent.dashboard!;
  const file = join(dirname(t.config.stateFile), "dashboard-url");
  assert.equal(readFileSync(file, "utf8").trim(), d.url);
  assert.equal(statSync(file).mode & 0o077, 0);
  assert.ok(!t.logs.text().includes(d.token));
});

test("the page needs the token", async () => {
  const d = t.agent.dashboard!;
  assert.equal((await fetch(d.url)).status, 200);
  assert.match(await (await fetch(d.url)).text(), /what KMS is doing/);
  assert.equal((await fetch(d.url.replace(/token=.*/, "token=wrong"))).status, 401);
  assert.equal((await fetch(d.url.replace(/\?token=.*/, ""))).status, 401);
});

test("the feed shows each operation (no payloads) and the pause switch cuts KMS off", async () => {
  const d = t.agent.dashboard!;
  const feed = open(d.url.replace("http://", "ws://").replace("/?", "/feed?"));
  const f = await feed;
  const snap = await f.next("snapshot");
  assert.equal(snap.controls.paused, false);
  const marker = Buffer.from("DASHBOARD-PLAINTEXT-MARKER");
  await c.call("Encrypt", {
    metadata: { ...sampleMetadata("GenerateDataKey"), kmsRequestId: "dash-1" },
    keyId: t.keys.default,
    plaintext: marker,
  });
  const op = await f.next("operation", (m) => m.rec.kmsRequestId === "dash-1");
  assert.equal(op.rec.operation, "Encrypt");
  assert.equal(op.rec.kmsOperation, "GenerateDataKey");
  assert.equal(op.rec.keyId, t.keys.default);
  assert.equal(op.rec.result, "OK");
  assert.ok(!JSON.stringify(f.messages).includes(marker.toString()) && !JSON.stringify(f.messages).includes(marker.toString("base64")));

  f.ws.send(JSON.stringify({ type: "setPaused", paused: true }));
  await f.next("controls", (m) => m.controls.paused === true);
  await assert.rejects(
    c.call("Encrypt", {
      metadata: { ...sampleMetadata("Encrypt"), kmsRequestId: "dash-paused" },
      keyId: t.keys.default,
      plaintext: marker,
    }),
    (e: CallError) => e.reason === "INVALID_STATE",
  );
  // The row says it was refused, and why.
  const refused = await f.next("operation", (m) => m.rec.kmsRequestId === "dash-paused");
  assert.equal(refused.rec.result, "INVALID_STATE");
  assert.equal(refused.rec.why, "paused by the owner");
  assert.equal(refused.key.key, t.keys.default);
  assert.ok(refused.key.denied >= 1);
  // A health check during the pause answers UNAVAILABLE: the indicator says so (it is not a row).
  await c.call("GetHealthStatus", { kmsRequestId: "dash-health", kmsOperation: "KmsHealthCheck" });
  const h = await f.next("health", (m) => m.health.last?.state === "UNAVAILABLE");
  assert.match(h.health.last.detail, /paused/);
  f.ws.send(JSON.stringify({ type: "setPaused", paused: false }));
  await f.next("controls", (m) => m.controls.paused === false);
  const ok = await c.call("Encrypt", { metadata: sampleMetadata("Encrypt"), keyId: t.keys.default, plaintext: marker });
  assert.equal(ok.ciphertext.length, marker.length);
  f.ws.close();
});

test("a WebSocket without the token, or from another origin, is refused", async () => {
  const d = t.agent.dashboard!;
  const feedUrl = d.url.replace("http://", "ws://").replace("/?", "/feed?");
  await assert.rejects(open(feedUrl.replace(/token=.*/, "token=nope")), /401/);
  await assert.rejects(open(feedUrl, { Origin: "http://evil.example" }), /403/);
});

test("a wrong Host header gets 403, page and WebSocket (a DNS name rebound to 127.0.0.1)", async () => {
  const d = t.agent.dashboard!;
  const u = new URL(d.url);
  const get = (host: string) =>
    new Promise<number>((resolve, reject) => {
      const r = httpGet({ host: u.hostname, port: u.port, path: `${u.pathname}${u.search}`, headers: { host } }, (res) => {
        res.resume();
        resolve(res.statusCode ?? 0);
      });
      r.on("error", reject);
    });
  assert.equal(await get(u.host), 200);
  assert.equal(await get(`localhost:${u.port}`), 200);
  assert.equal(await get(`rebound.example:${u.port}`), 403);
  assert.equal(await get("127.0.0.1"), 403);
  const feedUrl = d.url.replace("http://", "ws://").replace("/?", "/feed?");
  const rebound = `rebound.example:${u.port}`;
  await assert.rejects(open(feedUrl, { Host: rebound, Origin: `http://${rebound}` }), /403/);
  await assert.rejects(open(feedUrl, { Host: rebound }), /403/);
});

test("health refreshes are an indicator, not operation rows", async () => {
  const d = t.agent.dashboard!;
  const f = await open(d.url.replace("http://", "ws://").replace("/?", "/feed?"));
  await f.next("snapshot");
  await c.call("GetHealthStatus", { kmsRequestId: "dash-health-2", kmsOperation: "KmsHealthCheck" });
  const h = await f.next("health", (m) => m.health.last?.state === "ACTIVE");
  assert.ok(h.health.checks >= 1);
  const g = await open(d.url.replace("http://", "ws://").replace("/?", "/feed?"));
  const snap = await g.next("snapshot");
  assert.ok(snap.recent.length > 0);
  assert.ok(snap.recent.every((r: { operation: string }) => r.operation !== "GetHealthStatus"));
  assert.equal(snap.health.checks, h.health.checks);
  assert.deepEqual(
    snap.keys.map((k: { key: string }) => k.key),
    [...new Set(t.config.keyStores.flatMap((s) => s.keys))].sort(),
  );
  f.ws.close();
  g.ws.close();
});

test("no message from the browser crashes the agent or changes a switch", async () => {
  const d = t.agent.dashboard!;
  const feedUrl = d.url.replace("http://", "ws://").replace("/?", "/feed?");
  const f = await open(feedUrl);
  const before = (await f.next("snapshot")).controls;
  const junk: Array<string | Buffer> = [
    "null",
    "42",
    '"setPaused"',
    "[]",
    "[1,2]",
    "{}",
    "true",
    "not json {",
    "",
    '{"type":"setPaused"}',
    '{"type":"setPaused","paused":"true"}',
    '{"type":"setPaused","paused":null}',
    '{"type":"setKeyDisabled","key":null,"disabled":true}',
    '{"type":"setKeyDisabled","key":"../../etc/passwd","disabled":true}',
    '{"type":"setKeyDisabled","key":{"toString":1},"disabled":true}',
    '{"type":"unknown","paused":true}',
    '{"type":{"x":1}}',
    '{"__proto__":{"type":"setPaused","paused":true}}',
    Buffer.from('{"type":"setPaused","paused":true}'), // binary frame: ignored
  ];
  for (const m of junk) f.ws.send(m);
  // The connection still answers: a valid switch round-trips (then is undone).
  f.ws.send(JSON.stringify({ type: "setKeyDisabled", key: "junk-probe", disabled: true }));
  await f.next("controls", (m) => m.controls.disabledKeys.includes("junk-probe"));
  f.ws.send(JSON.stringify({ type: "setKeyDisabled", key: "junk-probe", disabled: false }));
  const after = await f.next("controls", (m) => !m.controls.disabledKeys.includes("junk-probe"));
  assert.deepEqual(after.controls, before);

  // A frame over the 4 KiB limit closes that connection only.
  const closed = new Promise<number>((resolve) => f.ws.once("close", (code) => resolve(code)));
  f.ws.send(JSON.stringify({ type: "setPaused", paused: true, pad: "x".repeat(1 << 20) }));
  assert.equal(await closed, 1009);
  const g = await open(feedUrl);
  assert.deepEqual((await g.next("snapshot")).controls, before);
  const ok = await c.call("GetKeyMetadata", { metadata: sampleMetadata("DescribeKey"), keyId: t.keys.default });
  assert.equal(ok.keyStatus, "ENABLED");
  g.ws.close();
});

test("the token survives a restart, `xks-agent dashboard` prints the URL, a token file others may read is replaced", async () => {
  const first = t.agent.dashboard!.token;
  const file = join(dirname(t.config.stateFile), "dashboard-token");
  assert.equal(statSync(file).mode & 0o077, 0);
  await t.restart();
  c.close();
  c = agentClient(t.target, t.token);
  const d = t.agent.dashboard!;
  assert.equal(d.token, first);
  assert.equal((await fetch(d.url)).status, 200);

  const printed: string[] = [];
  const log = console.log;
  console.log = (...a: unknown[]) => printed.push(a.join(" "));
  try {
    assert.equal(await cliMain(["dashboard", "--config", t.configFile]), 0);
  } finally {
    console.log = log;
  }
  assert.deepEqual(printed, [d.url]);
  assert.deepEqual(dashboardUrl({ host: "::1", port: 7420 }, t.config.stateFile), `http://[::1]:7420/?token=${first}`);

  // A readable token file is not trusted: the next start makes a new token (and says why, without the token).
  chmodSync(file, 0o644);
  const again = dashboardToken(t.config.stateFile);
  assert.notEqual(again.token, first);
  assert.match(again.replaced ?? "", /mode 0644/);
  assert.equal(statSync(file).mode & 0o777, 0o600);
  assert.ok(!t.logs.text().includes(first) && !t.logs.text().includes(again.token));
});
