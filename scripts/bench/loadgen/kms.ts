/**
 * A caller shaped like KMS, for the overload and burst figures:
 *  - kmsLoad: OPEN loop through phases of fixed rates; a new connection
 *    whenever no idle one is free (KMS's fleet is many callers); every request
 *    given up after `timeoutMs` (KMS waits 250 ms); goodput = correct answers
 *    inside that time. Per phase: outcomes, latency of successes and of
 *    refusals (429/503), and p99 per 100 ms slot (to see recovery).
 *  - burst: `size` requests signed beforehand and sent at once, on warm
 *    keep-alive connections (opened by as many /ping requests first) or on
 *    new ones (`cold`); no client timeout, so that late answers are seen and
 *    counted rather than cut off.
 * Latencies (and the 250 ms timeout) count from the moment the request has a
 * connected socket to go out on: KMS's clock starts when it sends, and the
 * time this one process needs to open hundreds of connections at once is its
 * own (KMS is many hosts). How late the generator sent is reported beside them.
 */
import http from "node:http";
import { setImmediate as yieldToLoop } from "node:timers/promises";
import { summarize, type LatencySummary } from "../stats.ts";
import type { BurstSpec, Case, KmsLoadSpec } from "./protocol.ts";
import type { SignedRequest, XksRequests } from "./requests.ts";
import { SignedPool } from "./runners.ts";

type Outcome = "ok" | "wrong" | "refused" | "timeout" | "transport";

interface One {
  outcome: Outcome;
  status: number;
  /** errorName of a refusal. */
  name?: string;
  /** ms from send to the complete answer (or to the give-up). */
  ms: number;
  sentAt: number;
}

export interface OutcomeSummary {
  sent: number;
  ok: number;
  wrong: number;
  /** 429/503 answers by errorName. */
  refused: Record<string, number>;
  /** No complete answer within the client timeout. */
  timeouts: number;
  transport: number;
  /** Successes slower than `lateMs` (only visible without a client timeout). */
  lateOk: number;
  /** Refusals slower than `lateMs`. */
  lateRefused: number;
  okLatency: LatencySummary;
  refusedLatency: LatencySummary;
  /** Every request that got any answer. */
  allLatency: LatencySummary;
}

export interface PhaseResult extends OutcomeSummary {
  rate: number;
  durationS: number;
  /** Correct answers within the timeout per second of the phase. */
  goodput: number;
  /** p99 of answered requests per 100 ms slot of the phase (send time), ms; a timeout counts as the timeout. */
  p99BySlot: number[];
  /** p99 of the requests sent in the phase's first second, and after it (timeouts count as the timeout), ms. */
  p99FirstSecond: number;
  p99AfterFirstSecond: number;
  /** How late the generator sent, worst, ms. */
  maxSendLagMs: number;
}

export interface KmsLoadResult {
  phases: PhaseResult[];
  lateSigned: number;
  generatorLoopDelayMaxMs: number;
}

export interface BurstResult extends OutcomeSummary {
  size: number;
  cold: boolean;
  /** From the first send to the last answer, ms. */
  spanMs: number;
}

function post(
  agent: http.Agent,
  url: URL,
  req: SignedRequest,
  timeoutMs: number,
  onSent: (at: number) => void,
): Promise<{ status: number; body: Buffer }> {
  return new Promise((resolve, reject) => {
    let timer: NodeJS.Timeout | undefined;
    const r = http.request(
      { host: url.hostname, port: Number(url.port), method: "POST", path: req.path, headers: req.headers, agent },
      (res) => {
        const chunks: Buffer[] = [];
        res.on("data", (c: Buffer) => chunks.push(c));
        res.on("end", () => {
          clearTimeout(timer);
          resolve({ status: res.statusCode ?? 0, body: chunks.length === 1 ? chunks[0] : Buffer.concat(chunks) });
        });
        res.on("error", reject);
      },
    );
    r.on("socket", (socket) => {
      const sent = () => {
        onSent(performance.now());
        timer = setTimeout(() => r.destroy(new Error("timeout")), timeoutMs);
      };
      if ((socket as import("node:net").Socket).connecting) socket.once("connect", sent);
      else sent();
    });
    r.on("error", (err) => {
      clearTimeout(timer);
      reject(err);
    });
    r.end(req.body);
  });
}

async function one(reqs: XksRequests, agent: http.Agent, url: URL, req: SignedRequest, timeoutMs: number): Promise<One> {
  let sentAt = performance.now();
  try {
    const ans = await post(agent, url, req, timeoutMs, (at) => (sentAt = at));
    const ms = performance.now() - sentAt;
    if (ans.status === 429 || ans.status === 503) {
      let name = String(ans.status);
      try {
        name = JSON.parse(ans.body.toString("utf8")).errorName ?? name;
      } catch {
        /* not JSON: keep the status */
      }
      return { outcome: "refused", status: ans.status, name, ms, sentAt };
    }
    const problem = reqs.check(req.case, ans);
    return { outcome: problem ? "wrong" : "ok", status: ans.status, ms, sentAt };
  } catch (err) {
    const ms = performance.now() - sentAt;
    return { outcome: (err as Error).message === "timeout" ? "timeout" : "transport", status: 0, ms, sentAt };
  }
}

function summarizeOutcomes(list: One[], lateMs: number): OutcomeSummary {
  const s: OutcomeSummary = {
    sent: list.length,
    ok: 0,
    wrong: 0,
    refused: {},
    timeouts: 0,
    transport: 0,
    lateOk: 0,
    lateRefused: 0,
    okLatency: summarize([]),
    refusedLatency: summarize([]),
    allLatency: summarize([]),
  };
  const ok: number[] = [];
  const refused: number[] = [];
  const all: number[] = [];
  for (const o of list) {
    if (o.outcome === "ok") {
      if (o.ms > lateMs) s.lateOk++;
      else s.ok++;
      ok.push(o.ms);
      all.push(o.ms);
    } else if (o.outcome === "refused") {
      s.refused[o.name!] = (s.refused[o.name!] ?? 0) + 1;
      if (o.ms > lateMs) s.lateRefused++;
      refused.push(o.ms);
      all.push(o.ms);
    } else if (o.outcome === "wrong") {
      s.wrong++;
      all.push(o.ms);
    } else if (o.outcome === "timeout") s.timeouts++;
    else s.transport++;
  }
  s.okLatency = summarize(ok);
  s.refusedLatency = summarize(refused);
  s.allLatency = summarize(all);
  return s;
}

const newAgent = (sockets: number) => new http.Agent({ keepAlive: true, maxSockets: sockets, maxFreeSockets: sockets });

export async function kmsLoad(spec: KmsLoadSpec, reqs: XksRequests, baseUrl: string, onStarted: () => void): Promise<KmsLoadResult> {
  const url = new URL(baseUrl);
  const c: Case = spec.case;
  // The schedule: every phase's sends, back to back.
  const times: number[] = [];
  const phaseOf: number[] = [];
  let at = 0;
  spec.phases.forEach((p, k) => {
    const n = Math.round(p.rate * p.durationS);
    for (let i = 0; i < n; i++) {
      times.push(at + (i * 1000) / p.rate);
      phaseOf.push(k);
    }
    at += p.durationS * 1000;
  });
  const total = times.length;
  reqs.tag = spec.tag ?? "kms";
  const pool = new SignedPool(reqs, () => c, total, total);
  await pool.fill(total);
  const agent = newAgent(spec.sockets);
  // Warm the connections KMS would already have open at the normal rate.
  await Promise.all(Array.from({ length: Math.min(spec.sockets, 64) }, () => ping(agent, url)));
  const results: Array<One | undefined> = new Array(total);
  const lag = new Float64Array(total);
  let maxLoopDelay = 0;
  let lastTick = performance.now();
  const loopTimer = setInterval(() => {
    const now = performance.now();
    maxLoopDelay = Math.max(maxLoopDelay, now - lastTick - 10);
    lastTick = now;
  }, 10);
  const t0 = performance.now() + 5;
  onStarted();
  await new Promise<void>((resolve) => {
    let done = 0;
    let next = 0;
    const fire = async (i: number) => {
      const req = await pool.take(i);
      lag[i] = performance.now() - (t0 + times[i]);
      results[i] = await one(reqs, agent, url, req, spec.timeoutMs);
      if (++done === total) resolve();
    };
    const tick = () => {
      const now = performance.now();
      while (next < total && t0 + times[next] <= now) void fire(next++);
      if (next < total) setTimeout(tick, Math.max(0, t0 + times[next] - performance.now()));
    };
    setTimeout(tick, Math.max(0, t0 - performance.now()));
  });
  clearInterval(loopTimer);
  agent.destroy();
  const phases: PhaseResult[] = spec.phases.map((p, k) => {
    const idx: number[] = [];
    for (let i = 0; i < total; i++) if (phaseOf[i] === k) idx.push(i);
    const list = idx.map((i) => results[i]!);
    const s = summarizeOutcomes(list, spec.timeoutMs);
    const start = idx.length ? t0 + times[idx[0]] : t0;
    const slots: number[][] = Array.from({ length: Math.ceil(p.durationS * 10) }, () => []);
    for (const o of list) {
      if (o.outcome === "transport") continue;
      const slot = Math.min(slots.length - 1, Math.max(0, Math.floor((o.sentAt - start) / 100)));
      slots[slot].push(o.outcome === "timeout" ? spec.timeoutMs : o.ms);
    }
    return {
      ...s,
      rate: p.rate,
      durationS: p.durationS,
      goodput: s.ok / p.durationS,
      p99BySlot: slots.map((v) => summarize(v).p99),
      p99FirstSecond: summarize(slots.slice(0, 10).flat()).p99,
      p99AfterFirstSecond: summarize(slots.slice(10).flat()).p99,
      maxSendLagMs: idx.reduce((m, i) => Math.max(m, lag[i]), 0),
    };
  });
  return { phases, lateSigned: pool.lateSigned, generatorLoopDelayMaxMs: maxLoopDelay };
}

function ping(agent: http.Agent, url: URL): Promise<void> {
  return new Promise((resolve) => {
    const r = http.request({ host: url.hostname, port: Number(url.port), method: "GET", path: "/ping", agent }, (res) => {
      res.resume();
      res.on("end", () => resolve());
    });
    r.on("error", () => resolve());
    r.end();
  });
}

export async function burst(spec: BurstSpec, reqs: XksRequests, baseUrl: string, onStarted: () => void): Promise<BurstResult> {
  const url = new URL(baseUrl);
  reqs.tag = spec.tag ?? "burst";
  const signed: SignedRequest[] = [];
  for (let i = 0; i < spec.size; i++) signed.push(await reqs.sign(spec.case));
  const agent = newAgent(spec.size);
  if (!spec.cold) {
    // One warm keep-alive connection per request of the burst.
    await Promise.all(signed.map(() => ping(agent, url)));
    await new Promise((r) => setTimeout(r, 300));
  }
  await yieldToLoop();
  onStarted();
  const t0 = performance.now();
  const list = await Promise.all(signed.map((req) => one(reqs, agent, url, req, spec.timeoutMs)));
  const spanMs = performance.now() - t0;
  agent.destroy();
  return { ...summarizeOutcomes(list, spec.lateMs), size: spec.size, cold: spec.cold, spanMs };
}
