/** The owner's dashboard: a real agent on SoftHSM, a real WebSocket client. */
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, statSync } from "node:fs";
import { join, dirname } from "node:path";
import WebSocket from "ws";
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
    ws.on("unexpected-response", (_req, res) => reject(new Error(`HTTP ${res.statusCode}`)));
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
    c.call("Encrypt", { metadata: sampleMetadata("Encrypt"), keyId: t.keys.default, plaintext: marker }),
    (e: CallError) => e.reason === "INVALID_STATE",
  );
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
  await assert.rejects(open(feedUrl, { Origin: "http://evil.example" }), /401/);
});
