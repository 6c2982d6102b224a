/**
 * Abusive clients against a REAL proxy on 127.0.0.1:0 in front of the REAL
 * agent on SoftHSM (testbed/in-process.ts): slowloris (a request head a byte
 * at a time), request bodies at a byte a second, ~2,000 idle connections that
 * never send a byte (sized to `ulimit -n`), idle keep-alive connections, and
 * more connections than `http.maxConnections`.
 * While each attack runs, a well-behaved client makes signed (smithy) encrypt →
 * decrypt round trips on its one keep-alive connection: every answer must be
 * correct or one of the spec's busy answers (503/429, which KMS retries), none
 * may hang, and round trips must get through (their p50/p99 and the
 * event-loop delay are reported, not asserted: they are figures of the
 * machine). The proxy must close every abusive connection by itself: the
 * test proxy uses short `http` timeouts (config field, proxy/config.ts) so
 * that this takes seconds, not the production 10/15/65 s, whose defaults are
 * checked separately. The 2,000 idle connections are held by
 * a worker thread (attackers are not the proxy's event loop's work); the proxy,
 * the agent and the good client share this one, as the agent is in-process.
 * Every loop is bounded in count and time.
 */
import assert from "node:assert/strict";
import { readFileSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { Agent as HttpAgent } from "node:http";
import { connect, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { monitorEventLoopDelay } from "node:perf_hooks";
import { Worker } from "node:worker_threads";
import { ConfigError } from "../../shared/config.ts";
import { MAX_HEADERS_COUNT } from "../../proxy/main.ts";
import { parseProxyConfig } from "../../proxy/config.ts";
import { API, CREDS, PREFIX } from "../../testbed/configs.ts";
import { TEST_IDENTITIES, writeIdentity, writePins } from "../../testbed/identities.ts";
import { type ProxyFixture, startProxy, startTestAgent, type TestAgent } from "../../testbed/in-process.ts";
import { GENEROUS_MS, sleep, until } from "../../testbed/wait.ts";
import { decryptBody, encryptBody } from "../../testbed/xks/bodies.ts";
import { BUSY_ERRORS, decryptProblem, encryptProblem, verdict } from "../../testbed/xks/oracle.ts";
import { type Resp, signedPost } from "../../testbed/xks/client.ts";

/**
 * Short server timeouts for the test proxy (production defaults: 10 s / 15 s / 65 s).
 * keepAliveTimeout 2 s: Node's client agent reuses a socket only for the advertised
 * "Keep-Alive: timeout=N" minus 1 s, so N = 1 would make the good client reconnect every time.
 */
const HTTP = { headersTimeoutMs: 1000, requestTimeoutMs: 2000, keepAliveTimeoutMs: 2000, maxConnections: 4096 };
/** Node closes an idle keep-alive socket 1 s after the advertised keepAliveTimeout (Node's HTTP_SERVER_KEEP_ALIVE_TIMEOUT_BUFFER). */
const KEEP_ALIVE_BUFFER_MS = 1000;
/** A good request without an answer after this long hangs (the proxy's agent deadline is 200 ms). */
const HANG_MS = 10_000;
const WANTED_IDLE = 2000;

const MiB = (n: number) => `${(n / 2 ** 20).toFixed(1)} MiB`;

function quantile(sorted: number[], p: number): number {
  return sorted.length ? sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * p))] : NaN;
}

/** The soft RLIMIT_NOFILE of this process (Linux), or undefined. */
function openFilesLimit(): number | undefined {
  try {
    const line = readFileSync("/proc/self/limits", "utf8")
      .split("\n")
      .find((l) => l.startsWith("Max open files"));
    const soft = line?.split(/\s{2,}/)[1];
    return soft === undefined || soft === "unlimited" ? undefined : Number(soft);
  } catch {
    return undefined;
  }
}

/**
 * The well-behaved client: signed (smithy) Encrypt → Decrypt round trips, one at
 * a time, on ONE keep-alive connection. A round trip is good when both answers
 * are correct; a busy answer (503/429) ends it early and is counted; anything
 * else (a wrong answer, a hang, a refused connection) is a failure.
 */
class GoodClient {
  private readonly agent = new HttpAgent({ keepAlive: true, maxSockets: 1, maxFreeSockets: 1 });
  latencies: number[] = [];
  failures: string[] = [];
  roundTrips = 0;
  good = 0;
  busy = 0;
  /** Distinct TCP connections used in the current phase. */
  private sockets = new Set<Socket>();
  private running = false;
  private loop?: Promise<void>;

  constructor(private readonly url: string) {}

  private post(path: string, body: object): Promise<Resp> {
    return signedPost(this.url, path, body, CREDS.a, { agent: this.agent, timeoutMs: HANG_MS, onSocket: (sock) => this.sockets.add(sock) });
  }

  /** One round trip; failures are recorded, never thrown. */
  async roundTrip(): Promise<void> {
    const n = this.roundTrips++;
    const pt = Buffer.from(`good client round trip ${n}`);
    const judge = (op: string, a: { status: number; text: string; ms: number }, check: (x: typeof a) => string | undefined): boolean => {
      this.latencies.push(a.ms);
      const v = verdict(a, check);
      if (v.kind === "ok") return true;
      if (v.kind === "spec-error" && BUSY_ERRORS.has(v.name)) this.busy++;
      else throw new Error(`${op}: ${v.kind === "wrong" ? v.why : v.name}`);
      return false;
    };
    try {
      const e = await this.post(`${API}/keys/foo/encrypt`, encryptBody(pt));
      if (!judge("encrypt", e, (a) => encryptProblem(a, { plaintext: pt }))) return;
      const d = await this.post(`${API}/keys/foo/decrypt`, decryptBody(e.json));
      if (judge("decrypt", d, (a) => decryptProblem(a, pt))) this.good++;
    } catch (err) {
      if (this.failures.length < 20) this.failures.push(`round trip ${n}: ${(err as Error).message}`);
    }
  }

  start(): void {
    this.running = true;
    this.latencies = [];
    this.failures = [];
    this.roundTrips = 0;
    this.good = 0;
    this.busy = 0;
    this.sockets = new Set();
    this.loop = (async () => {
      // Bounded: at most 100,000 round trips (a phase lasts seconds).
      for (let k = 0; this.running && k < 100_000; k++) await this.roundTrip();
    })();
  }

  /** Stops the loop; returns this phase's statistics. */
  async stop(): Promise<{
    roundTrips: number;
    good: number;
    busy: number;
    requests: number;
    connections: number;
    p50: number;
    p99: number;
    max: number;
    failures: string[];
  }> {
    this.running = false;
    await this.loop;
    const l = [...this.latencies].sort((a, b) => a - b);
    return {
      roundTrips: this.roundTrips,
      good: this.good,
      busy: this.busy,
      requests: l.length,
      connections: this.sockets.size,
      p50: quantile(l, 0.5),
      p99: quantile(l, 0.99),
      max: l.at(-1) ?? NaN,
      failures: this.failures,
    };
  }

  destroy(): void {
    this.agent.destroy();
  }
}

/** One abusive connection: when it was opened and when (if) the proxy closed it, and what it said. */
interface Abuser {
  socket: Socket;
  openedAt: number;
  closedAt?: number;
  received: string;
  /** We closed it ourselves (end of phase). */
  ours: boolean;
  connected: boolean;
}

function openAbuser(port: number, onConnect?: (a: Abuser) => void): Abuser {
  const socket = connect(port, "127.0.0.1");
  const a: Abuser = { socket, openedAt: performance.now(), received: "", ours: false, connected: false };
  socket.setNoDelay(true);
  socket.on("connect", () => {
    a.connected = true;
    a.openedAt = performance.now();
    onConnect?.(a);
  });
  socket.on("data", (d: Buffer) => {
    if (a.received.length < 1000) a.received += d.toString("latin1");
  });
  socket.on("error", () => {});
  socket.on("close", () => {
    a.closedAt ??= performance.now();
  });
  return a;
}

/** Every abuser was closed by the proxy (not by us), with at most an XKS JSON 400 said. */
function assertClosedByProxy(name: string, abusers: Abuser[], answer: RegExp): { maxMs: number; p50Ms: number; answered: number } {
  const open = abusers.filter((a) => a.closedAt === undefined || a.ours);
  assert.equal(
    open.length,
    0,
    `${name}: ${open.length} of ${abusers.length} connections were not closed by the proxy ` +
      `(${open.filter((a) => !a.connected).length} never connected; first: ${JSON.stringify(open.slice(0, 3).map((a) => ({ connected: a.connected, received: a.received.slice(0, 80), local: a.socket.localPort })))})`,
  );
  const lifetimes = abusers.map((a) => a.closedAt! - a.openedAt).sort((x, y) => x - y);
  const maxMs = lifetimes.at(-1)!;
  for (const a of abusers) {
    assert.ok(a.received === "" || answer.test(a.received), `${name}: unexpected answer ${JSON.stringify(a.received.slice(0, 300))}`);
    assert.ok(!/<html|<pre|stack/i.test(a.received), `${name}: HTML or a stack trace`);
  }
  return { maxMs, p50Ms: quantile(lifetimes, 0.5), answered: abusers.filter((a) => a.received !== "").length };
}

/**
 * Idle connections (connect, never send a byte) held by a worker thread. Lifetimes
 * are measured there (connect → close by the peer), on the worker's own clock.
 */
const IDLE_WORKER = `
const { parentPort } = require("node:worker_threads");
const net = require("node:net");
const socks = [];
let closed = 0;
parentPort.on("message", (m) => {
  if (m.cmd === "open") {
    let connected = 0;
    for (let k = 0; k < m.n; k++) {
      const s = { sock: net.connect(m.port, "127.0.0.1"), at: performance.now(), closedAt: undefined, ours: false, received: "" };
      s.sock.on("connect", () => {
        s.at = performance.now();
        if (++connected === m.n) parentPort.postMessage({ ev: "opened" });
      });
      s.sock.on("data", (d) => { if (s.received.length < 400) s.received += d.toString("latin1"); });
      s.sock.on("error", () => {});
      s.sock.on("close", () => {
        if (s.closedAt === undefined) {
          s.closedAt = performance.now();
          closed++;
          parentPort.postMessage({ ev: "closed", closed });
        }
      });
      socks.push(s);
    }
  } else if (m.cmd === "finish") {
    for (const s of socks) if (s.closedAt === undefined) { s.ours = true; s.closedAt = performance.now(); s.sock.destroy(); }
    const answers = [...new Set(socks.map((s) => s.received))];
    parentPort.postMessage({ ev: "result", lifetimes: socks.map((s) => s.closedAt - s.at), ours: socks.filter((s) => s.ours).length, answers });
  }
});
`;

class IdleAttackers {
  private readonly worker = new Worker(IDLE_WORKER, { eval: true });
  closed = 0;
  private waiters: Array<{ ev: string; resolve: (m: any) => void }> = [];

  constructor() {
    this.worker.on("message", (m: { ev: string; closed?: number }) => {
      if (m.ev === "closed") this.closed = m.closed!;
      const i = this.waiters.findIndex((w) => w.ev === m.ev);
      if (i >= 0) this.waiters.splice(i, 1)[0].resolve(m);
    });
  }

  private next(ev: string, ms: number): Promise<any> {
    return new Promise((resolve, reject) => {
      const w = { ev, resolve };
      this.waiters.push(w);
      setTimeout(() => {
        const i = this.waiters.indexOf(w);
        if (i >= 0) {
          this.waiters.splice(i, 1);
          reject(new Error(`worker: no "${ev}" within ${ms} ms`));
        }
      }, ms).unref();
    });
  }

  /** Opens n connections; resolves once all are connected. */
  async open(port: number, n: number): Promise<void> {
    const p = this.next("opened", 10_000);
    this.worker.postMessage({ cmd: "open", port, n });
    await p;
  }

  /** Destroys whatever is still open (counted as not closed by the proxy) and reports. */
  async finish(): Promise<{ lifetimes: number[]; ours: number; answers: string[] }> {
    const p = this.next("result", 10_000);
    this.worker.postMessage({ cmd: "finish" });
    return p;
  }

  async stop(): Promise<void> {
    await this.worker.terminate();
  }
}

/** Node's answer to a timed-out / refused request head, as the proxy shapes it: 400 XKS JSON, then close. */
const TIMEOUT_ANSWER =
  /^HTTP\/1\.1 400 Bad Request\r\nContent-Type: application\/json\r\nContent-Length: \d+\r\nConnection: close\r\n\r\n\{"errorName":"ValidationException","errorMessage":"[\x20-\x7e]+"\}$/;

describe("robustness: slow, idle and too many clients (real proxy, real agent)", () => {
  let agent: TestAgent;
  let fx: ProxyFixture;
  let good: GoodClient;
  const report: string[] = [];
  const note = (s: string) => {
    report.push(s);
    console.log(`# ${s}`);
  };
  const connections = () => new Promise<number>((r) => fx.proxy.server.getConnections((_e, n) => r(n)));

  before(async () => {
    agent = await startTestAgent();
    fx = await startProxy({ agents: [{ id: "mac-1", target: agent.target, token: agent.token }], extra: { http: HTTP } });
    await until(() => fx.proxy.agents.healthSnapshot()[0].state === "ACTIVE", "the agent ACTIVE");
    good = new GoodClient(fx.url);
    // Warm up the good client's connection, the JIT and the agent's session.
    for (let k = 0; k < 20; k++) await good.roundTrip();
    assert.deepEqual(good.failures, []);
  });
  after(async () => {
    good?.destroy();
    await fx?.close();
    await agent?.destroy();
    if (report.length) console.log(`# summary\n# ${report.join("\n# ")}`);
  });

  /** Runs `attack` while the good client makes round trips; checks every answer was correct or busy, none hung, and round trips got through. */
  async function underAttack<T>(
    name: string,
    attack: () => Promise<T>,
    target: { client: GoodClient; connections: () => Promise<number> } = { client: good, connections },
  ): Promise<T> {
    const good = target.client;
    const loop = monitorEventLoopDelay({ resolution: 10 });
    loop.enable();
    good.start();
    const t0 = performance.now();
    let result: T;
    try {
      result = await attack();
    } finally {
      // At least 2 s of good traffic per phase.
      const left = 2000 - (performance.now() - t0);
      if (left > 0) await sleep(left);
    }
    const s = await good.stop();
    loop.disable();
    note(
      `${name}: good client ${s.roundTrips} round trips (${s.good} good, ${s.busy} busy answers; ${s.requests} requests on ${s.connections} keep-alive connection${s.connections === 1 ? "" : "s"}), ` +
        `p50 ${s.p50.toFixed(1)} ms, p99 ${s.p99.toFixed(1)} ms, max ${s.max.toFixed(1)} ms; event-loop delay p99 ${(loop.percentile(99) / 1e6).toFixed(0)} ms, max ${(loop.max / 1e6).toFixed(0)} ms`,
    );
    assert.deepEqual(s.failures, [], `${name}: the well-behaved client failed`);
    assert.ok(s.good >= 1, `${name}: no round trip got through (${s.roundTrips} tried, ${s.busy} busy answers)`);
    // Only the good client's keep-alive connection may remain.
    await until(async () => (await target.connections()) <= 1, `${name}: the abusive connections to be gone`);
    return result;
  }

  it("slowloris: 200 connections sending the request head a byte at a time are closed after headersTimeout", async () => {
    const N = 200;
    const head = `POST ${API}/keys/foo/encrypt HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nX-Slow: ${"s".repeat(4000)}`;
    const r = await underAttack("slowloris", async () => {
      const abusers: Abuser[] = [];
      const next = new Map<Abuser, { at: number; pos: number }>();
      for (let k = 0; k < N; k++) {
        abusers.push(openAbuser(fx.proxy.port, (a) => next.set(a, { at: performance.now(), pos: 0 })));
      }
      // One shared ticker writes the next byte of each head every 100–300 ms, until the proxy has closed them all.
      const end = performance.now() + GENEROUS_MS;
      let tick = 0;
      while (performance.now() < end && abusers.some((a) => a.closedAt === undefined) && tick++ < 10_000) {
        const now = performance.now();
        for (const [a, s] of next) {
          if (a.closedAt !== undefined || now < s.at || s.pos >= head.length) continue;
          a.socket.write(head[s.pos++]);
          s.at = now + 100 + ((s.pos * 37 + abusers.indexOf(a)) % 200);
        }
        await sleep(20);
      }
      for (const a of abusers.filter((x) => x.closedAt === undefined)) {
        a.ours = true;
        a.socket.destroy();
      }
      const sent = [...next.values()].reduce((s, x) => s + x.pos, 0);
      return { abusers, sent };
    });
    const { maxMs, p50Ms, answered } = assertClosedByProxy("slowloris", r.abusers, TIMEOUT_ANSWER);
    note(
      `slowloris: ${N} connections, ${r.sent} bytes trickled, all closed by the proxy (${answered} with the 400 XKS JSON first); lifetime p50 ${p50Ms.toFixed(0)} ms, max ${maxMs.toFixed(0)} ms (headersTimeout ${HTTP.headersTimeoutMs} ms)`,
    );
  });

  it("a body sent one byte per second is cut off after requestTimeout (Content-Length and chunked)", async () => {
    const N = 20;
    const r = await underAttack("slow body", async () => {
      const abusers: Abuser[] = [];
      for (let k = 0; k < N; k++) {
        const chunked = k % 2 === 1;
        abusers.push(
          openAbuser(fx.proxy.port, (a) =>
            a.socket.write(
              `POST ${API}/keys/foo/encrypt HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n${chunked ? "Transfer-Encoding: chunked" : "Content-Length: 400"}\r\n\r\n`,
            ),
          ),
        );
      }
      const body = JSON.stringify(encryptBody("x")).padEnd(400, " ");
      const end = performance.now() + GENEROUS_MS;
      let pos = 0;
      // One byte per second per connection, bounded in count and time.
      while (performance.now() < end && abusers.some((a) => a.closedAt === undefined) && pos < body.length) {
        await sleep(1000);
        for (const [k, a] of abusers.entries()) {
          if (a.closedAt !== undefined) continue;
          a.socket.write(k % 2 === 1 ? `1\r\n${body[pos]}\r\n` : body[pos]);
        }
        pos++;
      }
      for (const a of abusers.filter((x) => x.closedAt === undefined)) {
        a.ours = true;
        a.socket.destroy();
      }
      return { abusers, bytes: pos };
    });
    const { maxMs, p50Ms, answered } = assertClosedByProxy("slow body", r.abusers, TIMEOUT_ANSWER);
    note(
      `slow body: ${N} connections (half chunked), ${r.bytes} body bytes each at 1 byte/s, all closed by the proxy (${answered} with the 400 XKS JSON first); lifetime p50 ${p50Ms.toFixed(0)} ms, max ${maxMs.toFixed(0)} ms (requestTimeout ${HTTP.requestTimeoutMs} ms)`,
    );
    // The aborted requests reached the app and were logged, without an error-level line or a crash.
    const aborted = fx.logs.requests().filter((l) => l.operation === "Encrypt" && l.status !== 200);
    assert.ok(aborted.length >= N, `${aborted.length} completion lines for the cut-off requests`);
    assert.ok(
      aborted.every((l) => l.level !== "error" && l.level !== "fatal"),
      "no error-level line for a client that was too slow",
    );
  });

  it("~2,000 idle connections (never a byte) are closed after headersTimeout; the proxy keeps serving", async () => {
    const limit = openFilesLimit();
    // Both ends live in this process: two descriptors per connection, plus headroom.
    const N = limit === undefined ? WANTED_IDLE : Math.max(100, Math.min(WANTED_IDLE, Math.floor((limit - 500) / 2)));
    if (N < WANTED_IDLE) note(`idle: RLIMIT_NOFILE soft limit ${limit}: sized down to ${N} connections`);
    // Its own proxy. While the connections are opened, its header and request timeouts are
    // lifted (Node reads them from the server at every sweep), so that all of them are open
    // at once however long opening takes; then they are put back and the sweep must close them.
    const H = { ...HTTP, headersTimeoutMs: 4000, requestTimeoutMs: 4000 };
    const ifx = await startProxy({ agents: [{ id: "mac-1", target: agent.target, token: agent.token }], extra: { http: H } });
    const server = ifx.proxy.server;
    const client = new GoodClient(ifx.url);
    const connections = () => new Promise<number>((r) => ifx.proxy.server.getConnections((_e, n) => r(n)));
    // The attackers' side of the sockets runs on its own thread (attackers are not the proxy's
    // event loop's work); the proxy, the agent and the good client stay on this one.
    const attackers = new IdleAttackers();
    try {
      await until(() => ifx.proxy.agents.healthSnapshot()[0].state === "ACTIVE", "the agent ACTIVE");
      await client.roundTrip();
      const rssBefore = process.memoryUsage().rss;
      let peakConnections = 0;
      let rssPeak = rssBefore;
      const r = await underAttack(
        "idle connections",
        async () => {
          // Opened in batches of 100, each once the proxy has accepted the previous one: a burst
          // beyond the kernel's listen backlog (511) would leave connections in SYN-RECV, unseen
          // by the proxy (and so not its to close) until a SYN-ACK retransmit, seconds later.
          server.headersTimeout = server.requestTimeout = 10 * GENEROUS_MS;
          let opened = 0;
          for (let k = 0; k < N; k += 100) {
            const n = Math.min(100, N - k);
            await attackers.open(ifx.proxy.port, n);
            opened += n;
            await until(async () => (await connections()) >= opened + 1, `the proxy to accept ${opened} idle connections`, undefined, 5);
          }
          peakConnections = await connections();
          server.headersTimeout = H.headersTimeoutMs;
          server.requestTimeout = H.requestTimeoutMs;
          const end = performance.now() + GENEROUS_MS;
          for (let k = 0; k < 10_000 && performance.now() < end && attackers.closed < N; k++) {
            peakConnections = Math.max(peakConnections, await connections());
            rssPeak = Math.max(rssPeak, process.memoryUsage().rss);
            await sleep(50);
          }
          return attackers.finish();
        },
        { client, connections },
      );
      assert.equal(r.lifetimes.length, N, "every connection reported");
      assert.equal(r.ours, 0, `${r.ours} of ${N} idle connections were not closed by the proxy`);
      const lifetimes = [...r.lifetimes].sort((x, y) => x - y);
      const maxMs = lifetimes.at(-1)!;
      // A connection that never sent a byte asked nothing: it is closed without an answer.
      assert.deepEqual(r.answers, [""], "idle connections are closed silently");
      note(
        `idle: ${N} connections (RLIMIT_NOFILE ${limit ?? "?"}), at most ${peakConnections} open at once on the server, all closed by the proxy; ` +
          `lifetime p50 ${quantile(lifetimes, 0.5).toFixed(0)} ms, max ${maxMs.toFixed(0)} ms (timeouts lifted while opening, then headersTimeout ${H.headersTimeoutMs} ms); rss ${MiB(rssBefore)} → peak ${MiB(rssPeak)}`,
      );
      assert.ok(peakConnections >= N + 1, `only ${peakConnections} connections were open at once for ${N} idle ones and the good client`);
    } finally {
      await attackers.stop();
      client.destroy();
      await ifx.close();
    }
  });

  it("idle keep-alive connections are closed after keepAliveTimeout", async () => {
    const N = 50;
    const r = await underAttack("idle keep-alive", async () => {
      const abusers: Abuser[] = [];
      const answered = new Map<Abuser, number>();
      for (let k = 0; k < N; k++) {
        const a = openAbuser(fx.proxy.port, (x) => x.socket.write("GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"));
        a.socket.on("data", () => {
          if (!answered.has(a)) answered.set(a, performance.now());
        });
        abusers.push(a);
      }
      const end = performance.now() + GENEROUS_MS;
      for (let k = 0; k < 10_000 && performance.now() < end && abusers.some((a) => a.closedAt === undefined); k++) await sleep(50);
      for (const a of abusers.filter((x) => x.closedAt === undefined)) {
        a.ours = true;
        a.socket.destroy();
      }
      return { abusers, answered };
    });
    for (const a of r.abusers) {
      assert.match(
        a.received,
        new RegExp(`^HTTP/1\\.1 200 OK\r\n[\\s\\S]*Keep-Alive: timeout=${HTTP.keepAliveTimeoutMs / 1000}\r\n[\\s\\S]*pong from xks-proxy`),
        "the request was answered, keep-alive",
      );
      assert.ok(r.answered.has(a));
    }
    // Idle time counted from the answer: keepAliveTimeout (+ Node's 1 s buffer). The lower bound
    // is halved: the client may see the answer late on a busy machine, which shortens what it measures.
    const idle = r.abusers.map((a) => (a.closedAt ?? Infinity) - r.answered.get(a)!).sort((x, y) => x - y);
    assert.ok(
      r.abusers.every((a) => a.closedAt !== undefined && !a.ours),
      "all closed by the proxy",
    );
    assert.ok(idle[0] >= HTTP.keepAliveTimeoutMs / 2, `closed after ${idle[0].toFixed(0)} ms idle, long before keepAliveTimeout`);
    note(
      `idle keep-alive: ${N} connections closed after ${idle[0].toFixed(0)}–${idle.at(-1)!.toFixed(0)} ms idle (keepAliveTimeout ${HTTP.keepAliveTimeoutMs} ms + Node's ${KEEP_ALIVE_BUFFER_MS} ms buffer)`,
    );
  });

  it("past http.maxConnections new connections are dropped at accept; an established client keeps working", async () => {
    const cap = 32;
    const capped = await startProxy({
      agents: [{ id: "mac-1", target: agent.target, token: agent.token }],
      extra: { http: { ...HTTP, maxConnections: cap } },
    });
    const server = capped.proxy.server;
    const client = new GoodClient(capped.url);
    const capConnections = () => new Promise<number>((r) => capped.proxy.server.getConnections((_e, n) => r(n)));
    try {
      await until(() => capped.proxy.agents.healthSnapshot()[0].state === "ACTIVE", "the agent ACTIVE");
      await client.roundTrip(); // establishes the keep-alive connection (1 of `cap`)
      client.start();
      // While the cap is tested, idle connections do not time out (Node reads the timeouts from the
      // server at every sweep): whatever closes now was dropped at accept.
      server.headersTimeout = server.requestTimeout = 10 * GENEROUS_MS;
      const abusers: Abuser[] = [];
      for (let k = 0; k < 3 * cap; k++) abusers.push(openAbuser(capped.proxy.port));
      const held = cap - 1;
      await until(
        () => abusers.filter((a) => a.closedAt !== undefined).length >= abusers.length - held,
        "the excess connections to be dropped",
      );
      const open = await capConnections();
      const dropped = abusers.filter((a) => a.closedAt !== undefined).length;
      assert.equal(open, cap, `${open} connections open with maxConnections ${cap}`);
      assert.equal(dropped, abusers.length - held, "every connection past the cap was dropped, the others held");
      // The held ones then time out like any idle connection; then new clients get in again.
      server.headersTimeout = HTTP.headersTimeoutMs;
      server.requestTimeout = HTTP.requestTimeoutMs;
      await until(() => abusers.every((a) => a.closedAt !== undefined), "the held connections to time out");
      const s = await client.stop();
      assert.deepEqual(s.failures, [], "the established client was never refused");
      assert.ok(s.good >= 1, "the established client got through");
      assert.equal(s.connections, 1, "the established client kept its one connection");
      const fresh = new GoodClient(capped.url);
      await until(async () => {
        await fresh.roundTrip();
        return fresh.good > 0;
      }, "a new client to get a round trip through");
      fresh.destroy();
      assert.deepEqual(fresh.failures, [], "a new client gets in once the idle ones are gone");
      note(
        `maxConnections ${cap}: ${3 * cap} idle connections → ${open} open at most, ${dropped} dropped at accept; established client ${s.roundTrips} round trips, p99 ${s.p99.toFixed(1)} ms, no failure`,
      );
    } finally {
      client.destroy();
      await capped.close();
    }
  });

  it("production defaults: headersTimeout 10 s, requestTimeout 15 s, keepAliveTimeout 65 s (> ALB 60 s), 4096 connections, 100 headers", async () => {
    const dflt = await startProxy({ agents: [{ id: "mac-1", target: agent.target, token: agent.token }] });
    try {
      const s = dflt.proxy.server;
      assert.deepEqual(dflt.config.http, {
        headersTimeoutMs: 10_000,
        requestTimeoutMs: 15_000,
        keepAliveTimeoutMs: 65_000,
        maxConnections: 4096,
      });
      assert.equal(s.headersTimeout, 10_000);
      assert.equal(s.requestTimeout, 15_000);
      assert.equal(s.keepAliveTimeout, 65_000);
      assert.ok(s.keepAliveTimeout > 60_000, "must outlive the ALB's 60 s idle timeout");
      assert.equal(s.maxConnections, 4096);
      assert.equal(s.maxHeadersCount, MAX_HEADERS_COUNT);
      assert.equal(MAX_HEADERS_COUNT, 100);
      // The advertised keep-alive matches.
      const r = await fetch(`${dflt.url}/ping`);
      assert.equal(r.headers.get("keep-alive"), "timeout=65");
      await r.text();
    } finally {
      await dflt.close();
    }
  });

  it("config: the http block is validated (ranges, requestTimeout >= headersTimeout, unknown fields)", () => {
    const dir = mkdtempSync(join(tmpdir(), "xks-slow-cfg-"));
    try {
      writeFileSync(join(dir, "token"), "0123456789abcdef0123", { mode: 0o600 });
      writeFileSync(join(dir, "a.secret"), CREDS.a.secretAccessKey, { mode: 0o600 });
      const base = {
        region: "us-east-1",
        identity: writeIdentity(dir, "proxy-identity", TEST_IDENTITIES.proxy),
        agents: [
          {
            id: "mac-1",
            target: "unix:///run/xks/agent.sock",
            token: { file: "token" },
            identities: writePins(dir, "agent", [TEST_IDENTITIES.agent]),
          },
        ],
        keyStores: [
          {
            uriPathPrefix: PREFIX,
            credentials: [{ accessKeyId: CREDS.a.accessKeyId, secretAccessKey: { file: "a.secret" } }],
            keys: ["foo"],
          },
        ],
      };
      const file = join(dir, "proxy.json");
      const ok = parseProxyConfig({ ...base, http: { headersTimeoutMs: 500, requestTimeoutMs: 500 } }, file, {});
      assert.deepEqual(ok.http, { headersTimeoutMs: 500, requestTimeoutMs: 500, keepAliveTimeoutMs: 65_000, maxConnections: 4096 });
      const bad = {
        ...base,
        http: { headersTimeoutMs: 20_000, requestTimeoutMs: 5_000, keepAliveTimeoutMs: 50, maxConnections: 1.5, typo: 1 },
      };
      const err = (() => {
        try {
          parseProxyConfig(bad, file, {});
        } catch (e) {
          return e;
        }
        return undefined;
      })();
      assert.ok(err instanceof ConfigError, "ConfigError");
      for (const f of [
        "http.requestTimeoutMs: must be >= http.headersTimeoutMs",
        "http.keepAliveTimeoutMs: must be >= 100",
        "http.maxConnections: must be an integer",
        "http.typo: unknown field",
      ]) {
        assert.ok(
          err.problems.some((p) => p.startsWith(f)),
          `expected "${f}" in\n${err.message}`,
        );
      }
      assert.throws(() => parseProxyConfig({ ...base, http: "fast" }, file, {}), /http: must be an object/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
