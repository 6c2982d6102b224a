/**
 * The fuzz test's runner: sends every generated case to the proxy (16 in
 * flight on keep-alive connections, then the raw-socket cases each on a
 * fresh connection), judges each answer against the model, scans every log
 * line and the audit file for secrets, samples memory, and returns what it
 * saw. The test file asserts one property of the run per test.
 */
import { Agent as HttpAgent, request as httpRequest } from "node:http";
import { connect } from "node:net";
import { join } from "node:path";
import { setFlagsFromString } from "node:v8";
import { runInNewContext } from "node:vm";
import { auditText } from "../../../testbed/audit.ts";
import { CREDS } from "../../../testbed/configs.ts";
import type { ProxyFixture, TestAgent } from "../../../testbed/in-process.ts";
import { AUTHORIZATION_MARKERS, findLeaks } from "../../../testbed/logs.ts";
import { until } from "../../../testbed/wait.ts";
import { decryptBody, type EncryptAnswer, encryptBody } from "../../../testbed/xks/bodies.ts";
import { type Resp, retryBusy, signedPost } from "../../../testbed/xks/client.ts";
import {
  AAD_B64,
  AAD_MARKER,
  AUTHZ_MARKER,
  COUNT,
  type FuzzCase,
  finalize,
  generate,
  ONLY,
  PT_B64,
  PT_MARKER,
  RAW_COUNT,
  type RawCase,
  rawCase,
  requestMetadata,
  Rng,
  SEED,
  WEIGHTS,
  useRealCiphertext,
  draftWarmUp,
} from "./generator.ts";
import { type Answer, API, checkAnswer, matches, type Outcome } from "./model.ts";

// A full GC before each memory sample, so that RSS growth means retained memory, not garbage not yet collected.
setFlagsFromString("--expose-gc");
const gc = runInNewContext("gc") as () => void;

const IN_FLIGHT = 16;
/** A case without an answer after this long hangs (the proxy's own deadlines are far shorter). */
const HANG_MS = 30_000;

export interface MemorySample {
  rss: number;
  heapUsed: number;
}

export interface FuzzRun {
  seedLine: string;
  planned: number;
  sent: number;
  rawPlanned: number;
  rawSent: number;
  /** Answers that are not what the model allows, or break an invariant (at most 200 kept). */
  failures: string[];
  /** 500s from malformed input (a 500 is never the model's answer to a bad request). */
  fiveHundreds: string[];
  /** Secrets found in a log line or the audit file ("where contains the what"). */
  leaks: string[];
  byCategory: Map<string, number>;
  bySigning: Map<string, number>;
  byOutcome: Map<string, number>;
  /** The proxy's per-request completion lines. */
  completions: number;
  /** After a full GC: before the cases, after a fifth of them (steady state), after all; and the peak RSS seen. */
  memory: { before: MemorySample; steady: MemorySample; after: MemorySample; afterReleased: MemorySample; rssPeak: number };
  /** A signed round trip on a fresh connection after the run. */
  finalEncrypt: Resp;
  finalDecrypt: Resp;
  /** Connections the proxy still held once the client let go (awaited until 0, with a cap). */
  connectionsLeft: number;
  summary: string[];
}

const mem = (): MemorySample => {
  gc();
  const m = process.memoryUsage();
  return { rss: m.rss, heapUsed: m.heapUsed };
};

/** Runs every case against `fx` (the proxy) in front of `agent` (the real agent on SoftHSM). */
export async function runFuzz(fx: ProxyFixture, agent: TestAgent): Promise<FuzzRun> {
  /** A valid, signed Encrypt of the plaintext marker under the AAD marker (retried like KMS on a busy answer). */
  const encryptMarker = (n: number) =>
    retryBusy(() =>
      signedPost(
        fx.url,
        `${API}/keys/foo/encrypt`,
        encryptBody(PT_MARKER, { aad: AAD_MARKER, metadata: requestMetadata("Encrypt", n, new Rng(-n)) }),
        CREDS.a,
      ),
    );
  const e0 = await encryptMarker(-1);
  if (e0.status !== 200) throw new Error(`the real ciphertext for Decrypt cases: ${e0.text}`);
  const real = e0.json as EncryptAnswer;
  useRealCiphertext(real);
  const seedLine = `fuzz seed ${SEED} (0x${SEED.toString(16)}); reproduce with XKS_FUZZ_SEED=${SEED} [XKS_FUZZ_ONLY=<case indexes>]`;
  console.log(`# ${seedLine}`);
  const host = new URL(fx.url).host;
  const port = fx.proxy.port;
  const httpAgent = new HttpAgent({ keepAlive: true, maxSockets: IN_FLIGHT, maxFreeSockets: IN_FLIGHT });
  const failures: string[] = [];
  const fail = (s: string) => {
    if (failures.length < 200) failures.push(s);
    else failures[199] = `... and more (${s})`;
  };
  const byCategory = new Map<string, number>();
  const byOutcome = new Map<string, number>();
  const bySigning = new Map<string, number>();
  const count = (m: Map<string, number>, k: string) => m.set(k, (m.get(k) ?? 0) + 1);
  const fiveHundreds: string[] = [];
  const signatures = new Set<string>();
  const latencies: number[] = [];
  let sent = 0;
  let steady: MemorySample | undefined;

  // Nothing secret may reach a log line: proxy (incl. grpc-js), agent, and the agent's audit file.
  // Captured lines are scanned and dropped every 1,000 cases, so that memory stays about the proxy.
  const secrets = {
    "plaintext marker": PT_MARKER,
    "plaintext marker (Base64)": PT_B64.slice(0, 16),
    "AAD marker": AAD_MARKER,
    "AAD marker (Base64)": AAD_B64.slice(0, 16),
    ciphertext: real.ciphertext,
    tag: real.authenticationTag,
    "secret a": CREDS.a.secretAccessKey,
    "secret b": CREDS.b.secretAccessKey,
    "secret other": CREDS.other.secretAccessKey,
    "agent token": agent.token,
    PIN: agent.softhsm.pin,
    "SO PIN": agent.softhsm.soPin,
    "Authorization garbage": AUTHZ_MARKER,
    ...AUTHORIZATION_MARKERS,
  };
  const leaks: string[] = [];
  const scanLog = (where: string, text: string) => {
    for (const label of findLeaks(text, secrets)) if (leaks.length < 50) leaks.push(`${where} contains the ${label}`);
    for (const hex of text.match(/[0-9a-f]{64}/g) ?? [])
      if (signatures.has(hex) && leaks.length < 50) leaks.push(`${where} contains a request signature`);
  };
  const logCount = { proxy: 0, agent: 0, completions: 0 };
  const drainLogs = () => {
    const p = fx.logs.lines.splice(0);
    const a = agent.logs.lines.splice(0);
    logCount.proxy += p.length;
    logCount.agent += a.length;
    logCount.completions += p.filter((l) => l.includes('"msg":"request"')).length;
    scanLog("proxy log", p.join("\n"));
    scanLog("agent log", a.join("\n"));
  };

  // Warm up (JIT, sockets, agent session), then the baseline.
  for (let k = 0; k < 100; k++) await sendCase(httpAgent, port, await finalize(-1, draftWarmUp(), host));
  const before = mem();
  let rssPeak = before.rss;
  const sampler = setInterval(() => (rssPeak = Math.max(rssPeak, process.memoryUsage().rss)), 100);
  const t0 = performance.now();

  const indexes = [...Array(COUNT).keys()].filter((i) => !ONLY || ONLY.has(i));
  let next = 0;
  const worker = async () => {
    while (next < indexes.length) {
      const i = indexes[next++];
      const c = await finalize(i, generate(i), host);
      if (c.signature) signatures.add(c.signature);
      count(byCategory, c.cat);
      count(bySigning, c.sign === "ok" || c.sign === "rawpath" ? "signed" : c.sign === "none" ? "unsigned" : "badly signed");
      const a = await sendCase(httpAgent, port, c);
      sent++;
      if (sent % 1000 === 0 && !ONLY) drainLogs();
      // Steady state: allocator arenas and JIT have grown to what this traffic needs.
      if (sent === Math.floor(indexes.length / 5) && !steady) steady = mem();
      if (ONLY) {
        // Reproduction mode: show the whole exchange and the proxy's own account of it.
        console.log(
          `# case ${i}: ${c.method} ${c.path.slice(0, 300)}\n#   headers ${JSON.stringify(c.headers).slice(0, 4000)}\n#   body ${Buffer.concat(c.chunks).toString("utf8").slice(0, 600)}`,
        );
        console.log(`#   answer ${a.status} ${a.text.slice(0, 300)}\n#   proxy log: ${fx.logs.lines.at(-1)?.slice(0, 600)}`);
      }
      latencies.push(a.ms);
      judge(`#${i} [${c.cat}] ${c.what} — ${c.method} ${c.path.slice(0, 120)}`, c.method, a, c.expect);
    }
  };
  const judge = (label: string, method: string, a: Answer, expect: Set<Outcome>) => {
    let outcome: Outcome;
    try {
      outcome = checkAnswer(method, a);
    } catch (e) {
      fail(`${label}: ${(e as Error).message}; got ${a.status} ${a.text.slice(0, 200)}`);
      return;
    }
    count(byOutcome, outcome);
    if (a.status === 500) fiveHundreds.push(label);
    if (!matches(outcome, expect)) fail(`${label}: expected ${[...expect].join(" | ")}, got ${outcome} ${a.text.slice(0, 160)}`);
  };
  await Promise.all(Array.from({ length: IN_FLIGHT }, worker));
  const httpMs = performance.now() - t0;

  // Raw-socket protocol abuse, 16 at a time, each on its own connection.
  const t1 = performance.now();
  let rawSent = 0;
  const rawIdx = [...Array(RAW_COUNT).keys()].filter((j) => !ONLY || ONLY.has(COUNT + j));
  let nextRaw = 0;
  const rawWorker = async () => {
    while (nextRaw < rawIdx.length) {
      const c = rawCase(rawIdx[nextRaw++], host);
      count(byCategory, "raw");
      const a = await sendRaw(port, c);
      rawSent++;
      judge(`#${c.i} [raw] ${c.what}`, c.bytes.subarray(0, 5).toString() === "HEAD " ? "HEAD" : "POST", a, c.expect);
    }
  };
  await Promise.all(Array.from({ length: IN_FLIGHT }, rawWorker));
  const rawMs = performance.now() - t1;

  // The proxy is still up: a signed round trip works on a fresh connection.
  // (Retried like KMS on a busy answer: the question is whether the proxy is up, not how busy the machine is.)
  const finalEncrypt = await encryptMarker(-2);
  const fe = (finalEncrypt.json ?? {}) as EncryptAnswer;
  const decryptMd = requestMetadata("Decrypt", -3, new Rng(3));
  const finalDecrypt = await retryBusy(() =>
    signedPost(fx.url, `${API}/keys/foo/decrypt`, decryptBody(fe, { aad: AAD_MARKER, metadata: decryptMd }), CREDS.b),
  );

  // No connection left behind once the client lets go.
  httpAgent.destroy();
  const connections = () => new Promise<number>((r) => fx.proxy.server.getConnections((_err, n) => r(n)));
  await until(async () => (await connections()) === 0, "the proxy to close every connection").catch(() => undefined);
  const connectionsLeft = await connections();

  clearInterval(sampler);
  const after = mem();

  // The rest of the captured lines, and the agent's audit file (on disk).
  drainLogs();
  const audit = auditText(join(agent.dir, "state", "audit"));
  scanLog("agent audit log", audit);
  signatures.clear();
  const afterReleased = mem();
  latencies.sort((x, y) => x - y);
  const q = (p: number) => latencies[Math.min(latencies.length - 1, Math.floor(latencies.length * p))]?.toFixed(1);
  const mib = (n: number) => `${(n / 2 ** 20).toFixed(1)} MiB`;
  const fmt = (m: Map<string, number>) =>
    [...m]
      .sort()
      .map(([k, n]) => `${k}=${n}`)
      .join(" ");
  const st = steady ?? after;
  const summary = [
    seedLine,
    `http cases: ${sent} in ${(httpMs / 1000).toFixed(1)} s (${IN_FLIGHT} in flight, keep-alive); latency p50 ${q(0.5)} ms p99 ${q(0.99)} ms max ${q(1)} ms`,
    `raw-socket cases: ${rawSent} in ${(rawMs / 1000).toFixed(1)} s`,
    `by category: ${fmt(byCategory)}`,
    `signing: ${fmt(bySigning)}`,
    `by outcome: ${fmt(byOutcome)}`,
    `rss (after a full GC) before ${mib(before.rss)}, after ${mib(after.rss)}, growth ${mib(after.rss - before.rss)}; peak during the run ${mib(rssPeak)}; steady state (after ${Math.floor(indexes.length / 5)} cases) ${mib(st.rss)}`,
    `heap used (full GC, the run's own captures released) before ${mib(before.heapUsed)}, after ${mib(afterReleased.heapUsed)}`,
    `log lines: proxy ${logCount.proxy} (${logCount.completions} request completions), agent ${logCount.agent}, audit ${audit.split("\n").length - 1}; leaks found: ${leaks.length}`,
  ];
  for (const l of summary) console.log(`# ${l}`);
  if (failures.length) {
    // Grouped, so that one systematic problem reads as one line.
    const kinds = new Map<string, number>();
    for (const f of failures)
      count(
        kinds,
        f
          .replace(/^#\d+ /, "")
          .replace(/ — .*?: /, ": ")
          .replace(/got .*/, "")
          .slice(0, 160),
      );
    console.log(`# failures by kind:\n${[...kinds].map(([k, n]) => `#   ${n} × ${k}`).join("\n")}`);
  }
  return {
    seedLine,
    planned: indexes.length,
    sent,
    rawPlanned: rawIdx.length,
    rawSent,
    failures,
    fiveHundreds,
    leaks,
    byCategory,
    bySigning,
    byOutcome,
    completions: logCount.completions,
    memory: { before, steady: st, after, afterReleased, rssPeak },
    finalEncrypt,
    finalDecrypt,
    connectionsLeft,
    summary,
  };
}

/** The categories the generator draws from, with their weights. */
export const CATEGORIES = WEIGHTS.map(([c]) => c);

export function sendCase(agent: HttpAgent, port: number, c: FuzzCase): Promise<Answer> {
  const t0 = performance.now();
  return new Promise((resolve) => {
    let settled = false;
    const done = (a: Omit<Answer, "ms">) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      resolve({ ...a, ms: performance.now() - t0 });
    };
    let req: ReturnType<typeof httpRequest>;
    try {
      req = httpRequest(
        {
          host: "127.0.0.1",
          port,
          method: c.method,
          path: c.path,
          headers: c.headers as unknown as Record<string, string>,
          agent,
          setHost: false,
        },
        (res) => {
          const chunks: Buffer[] = [];
          res.on("data", (d: Buffer) => chunks.push(d));
          res.on("end", () => done({ status: res.statusCode ?? 0, headers: res.headers, text: Buffer.concat(chunks).toString("utf8") }));
          res.on("error", (e) => done({ status: 0, headers: {}, text: "", error: `response: ${e.message}` }));
          res.on("aborted", () => done({ status: 0, headers: {}, text: "", error: "response aborted" }));
        },
      );
    } catch (e) {
      done({ status: 0, headers: {}, text: "", error: `client refused the request: ${(e as Error).message}` });
      return;
    }
    const timer = setTimeout(() => {
      done({ status: 0, headers: {}, text: "", error: `no answer within ${HANG_MS} ms` });
      req.destroy();
    }, HANG_MS);
    req.on("error", (e) => done({ status: 0, headers: {}, text: "", error: `request: ${(e as NodeJS.ErrnoException).code ?? e.message}` }));
    for (const ch of c.chunks) req.write(ch);
    req.end();
  });
}

/** One raw exchange on a fresh connection: parses the first HTTP response (status, headers, Content-Length body). */
export function sendRaw(port: number, c: RawCase): Promise<Answer & { closed: boolean }> {
  const t0 = performance.now();
  return new Promise((resolve) => {
    const s = connect(port, "127.0.0.1");
    let buf = Buffer.alloc(0);
    let settled = false;
    const finish = (a: Omit<Answer, "ms">, closed: boolean) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      s.destroy();
      resolve({ ...a, ms: performance.now() - t0, closed });
    };
    const tryParse = (closed: boolean) => {
      // Skip interim 1xx answers (e.g. "100 Continue" for an Expect that contains 100-continue).
      while (/^HTTP\/1\.[01] 1\d\d /.test(buf.subarray(0, 16).toString("latin1")) && buf.indexOf("\r\n\r\n") >= 0)
        buf = buf.subarray(buf.indexOf("\r\n\r\n") + 4);
      const end = buf.indexOf("\r\n\r\n");
      if (end < 0) {
        if (closed)
          finish(
            {
              status: 0,
              headers: {},
              text: buf.toString("latin1"),
              error: buf.length ? "incomplete response" : "closed without an answer",
            },
            true,
          );
        return;
      }
      const head = buf.subarray(0, end).toString("latin1").split("\r\n");
      const m = /^HTTP\/1\.[01] (\d{3}) /.exec(head[0]);
      const headers: Record<string, string> = {};
      for (const l of head.slice(1)) {
        const k = l.indexOf(":");
        headers[l.slice(0, k).toLowerCase()] = l.slice(k + 1).trim();
      }
      if (!m) return finish({ status: 0, headers, text: buf.toString("latin1"), error: "not an HTTP response" }, closed);
      if (!c.head && headers["content-length"] === undefined && /chunked/i.test(headers["transfer-encoding"] ?? "")) {
        // Minimal chunked decoding (only Node's own answers use it).
        let at = end + 4;
        let text = "";
        for (;;) {
          const nl = buf.indexOf("\r\n", at);
          if (nl < 0) break;
          const size = parseInt(buf.subarray(at, nl).toString("latin1"), 16);
          if (Number.isNaN(size) || buf.length < nl + 2 + size + 2) break;
          if (size === 0) return finish({ status: Number(m[1]), headers, text }, closed);
          text += buf.subarray(nl + 2, nl + 2 + size).toString("utf8");
          at = nl + 2 + size + 2;
        }
        if (closed) finish({ status: Number(m[1]), headers, text, error: "truncated chunked body" }, true);
        return;
      }
      const len = c.head ? 0 : Number(headers["content-length"] ?? (closed ? buf.length - end - 4 : NaN));
      if (Number.isNaN(len) || buf.length - end - 4 < len) {
        if (closed) finish({ status: Number(m[1]), headers, text: buf.subarray(end + 4).toString("utf8"), error: "truncated body" }, true);
        return;
      }
      finish({ status: Number(m[1]), headers, text: buf.subarray(end + 4, end + 4 + len).toString("utf8") }, closed);
    };
    const timer = setTimeout(() => finish({ status: 0, headers: {}, text: "", error: `no answer within ${HANG_MS} ms` }, false), HANG_MS);
    s.on("data", (d: Buffer) => {
      buf = Buffer.concat([buf, d]);
      tryParse(false);
    });
    s.on("end", () => tryParse(true));
    s.on("close", () => tryParse(true));
    s.on("error", () => tryParse(true));
    s.write(c.bytes);
    if (c.end) s.end();
  });
}
