/**
 * The two ways the generator drives the chain:
 *  - openLoop: requests leave on a fixed schedule whatever the answers do, and
 *    each latency is measured from the request's SCHEDULED time, so a stall
 *    anywhere (including in this generator) shows up as latency instead of
 *    silently lowering the offered rate;
 *  - sequential: one caller, one request at a time.
 * Every answer is checked (requests.ts).
 */
import { monitorEventLoopDelay } from "node:perf_hooks";
import { setImmediate as yieldToLoop } from "node:timers/promises";
import { summarize } from "../stats.ts";
import type { HttpClient } from "./http.ts";
import type { Case, ErrorSample, JobResult, OpenLoopSpec, SequentialSpec } from "./protocol.ts";
import { encryptAnswer, type Ciphertext, type SignedRequest, type XksRequests } from "./requests.ts";

/** Signs ahead of the schedule: everything up to `presignS` before the start, then keeps `aheadS` signed in the background. */
export class SignedPool {
  private readonly slots: Array<SignedRequest | undefined> = [];
  private signed = 0;
  private taken = 0;
  private refilling = false;
  lateSigned = 0;

  constructor(
    private readonly reqs: XksRequests,
    private readonly caseOf: (i: number) => Case,
    private readonly total: number,
    private readonly aheadCount: number,
  ) {}

  async fill(upTo: number): Promise<void> {
    const end = Math.min(this.total, upTo);
    while (this.signed < end) {
      const i = this.signed++;
      this.slots[i] = await this.reqs.sign(this.caseOf(i));
    }
  }

  /** Request i (each is used once); signs on the spot if the background signer fell behind. */
  async take(i: number): Promise<SignedRequest> {
    this.taken = Math.max(this.taken, i + 1);
    if (!this.refilling && this.signed < this.total && this.signed - this.taken < this.aheadCount / 2) void this.refill();
    const r = this.slots[i];
    if (r) {
      this.slots[i] = undefined;
      return r;
    }
    this.lateSigned++;
    return this.reqs.sign(this.caseOf(i));
  }

  private async refill(): Promise<void> {
    this.refilling = true;
    try {
      while (this.signed < this.total && this.signed - this.taken < this.aheadCount) {
        await this.fill(this.signed + 200);
        await yieldToLoop();
      }
    } finally {
      this.refilling = false;
    }
  }
}

class ErrorTally {
  count = 0;
  readonly kinds: Record<string, ErrorSample> = {};
  add(kind: string, example = kind): void {
    this.count++;
    this.kinds[kind] ??= { count: 0, example };
    this.kinds[kind].count++;
  }
}

export async function openLoop(spec: OpenLoopSpec, reqs: XksRequests, http: HttpClient, onStarted: () => void): Promise<JobResult> {
  const total = Math.max(1, Math.round(spec.rate * spec.durationS));
  const caseOf = (i: number) => spec.cases[i % spec.cases.length];
  await reqs.prepare(spec.cases, http);
  reqs.tag = spec.tag ?? "run";
  // Runs up to a minute are signed in full beforehand (no signing while measuring); longer ones
  // (the soak) keep 10-20 s signed ahead, so the generator's heap, and its GC pauses, stay small.
  const long = spec.durationS > 60;
  const pool = new SignedPool(reqs, caseOf, total, Math.round(spec.rate * (long ? 20 : 60)));
  await pool.fill(long ? Math.round(spec.rate * 20) : total);
  const loopDelay = monitorEventLoopDelay({ resolution: 5 });

  const latency = new Float64Array(total);
  const service = new Float64Array(total);
  const errors = new ErrorTally();
  const sampleEvery = spec.sampleDecrypts > 0 ? Math.max(1, Math.floor(total / spec.sampleDecrypts)) : 0;
  const samples = new Map<number, Ciphertext[]>();
  const interval = 1000 / spec.rate;
  let completed = 0;
  let maxLag = 0;
  let lastDone = 0;

  // An overloaded chain builds a queue that could take minutes to drain: requests still
  // unanswered this long after the schedule ends are cut off and counted as errors.
  const graceMs = Math.max(5, 0.2 * spec.durationS) * 1000;
  const answered = new Uint8Array(total);
  let cutOff = false;
  let cutOffTimer: NodeJS.Timeout | undefined;
  const t0 = performance.now() + 5;
  onStarted();
  loopDelay.enable();
  await new Promise<void>((resolve) => {
    const fire = async (i: number, scheduled: number) => {
      const req = await pool.take(i);
      if (cutOff) return;
      const sent = performance.now();
      maxLag = Math.max(maxLag, sent - scheduled);
      try {
        const ans = await http.post(req);
        if (cutOff) return;
        const problem = reqs.check(req.case, ans);
        if (problem) errors.add(problem, ans.body.toString("utf8").slice(0, 200));
        else if (sampleEvery && req.case.op === "Encrypt" && i % sampleEvery === 0) {
          const list = samples.get(req.case.size) ?? [];
          list.push(encryptAnswer(ans));
          samples.set(req.case.size, list);
        }
      } catch (err) {
        if (cutOff) return;
        errors.add((err as Error).message === "timeout" ? "timeout (10 s)" : `transport: ${(err as Error).message}`);
      }
      const now = performance.now();
      answered[i] = 1;
      latency[i] = now - scheduled;
      service[i] = now - sent;
      lastDone = now;
      if (++completed === total) {
        clearTimeout(cutOffTimer);
        resolve();
      }
    };
    const cutOffLeftovers = () => {
      cutOff = true;
      const now = performance.now();
      for (let i = 0; i < total; i++) {
        if (answered[i]) continue;
        latency[i] = now - (t0 + i * interval); // a lower bound: it had not been answered yet
        service[i] = NaN;
        errors.add(`no answer ${Math.round(graceMs / 1000)} s after the schedule ended`);
      }
      http.abortAll();
      lastDone = now;
      resolve();
    };
    let next = 0;
    const tick = () => {
      const now = performance.now();
      while (next < total && t0 + next * interval <= now) {
        void fire(next, t0 + next * interval);
        next++;
      }
      if (next < total) setTimeout(tick, Math.max(0, t0 + next * interval - performance.now()));
      else cutOffTimer = setTimeout(cutOffLeftovers, graceMs);
    };
    setTimeout(tick, Math.max(0, t0 - performance.now()));
  });
  const elapsedS = (lastDone - t0) / 1000;
  loopDelay.disable();

  let checked = 0;
  let failed = 0;
  for (const [size, list] of samples) {
    checked += list.length;
    failed += await reqs.decryptBack(size, list, http);
  }
  if (failed > 0) for (let k = 0; k < failed; k++) errors.add("sampled Encrypt answer did not decrypt back");
  return {
    sent: total,
    completed,
    errors: errors.count,
    errorKinds: errors.kinds,
    latency: summarize(latency),
    serviceLatency: summarize(service.filter((v) => !Number.isNaN(v))),
    maxSendLagMs: maxLag,
    generatorLoopDelayMs: { p99: loopDelay.percentile(99) / 1e6, max: loopDelay.max / 1e6 },
    lateSigned: pool.lateSigned,
    elapsedS,
    achievedRate: completed / elapsedS,
    sampled: sampleEvery ? { checked, failed } : undefined,
  };
}

export async function sequential(spec: SequentialSpec, reqs: XksRequests, http: HttpClient, onStarted: () => void): Promise<JobResult> {
  await reqs.prepare([spec.case], http);
  const errors = new ErrorTally();
  const lat: number[] = [];
  const windows: Array<[string, string]> = [];
  let started = 0;
  for (let i = 0; i < spec.warmup + spec.count; i++) {
    reqs.tag = i < spec.warmup ? "warmup" : (spec.tag ?? "run");
    if (i === spec.warmup) {
      onStarted();
      started = performance.now();
    }
    const req = await reqs.sign(spec.case); // signing is not part of the measured time
    const t0 = process.hrtime.bigint();
    let problem: string | undefined;
    try {
      problem = reqs.check(req.case, await http.post(req));
    } catch (err) {
      problem = `transport: ${(err as Error).message}`;
    }
    const t1 = process.hrtime.bigint();
    if (i >= spec.warmup) {
      lat.push(Number(t1 - t0) / 1e6);
      if (problem) errors.add(problem);
      if (spec.windows) windows.push([t0.toString(), t1.toString()]);
    }
    if (spec.gapMs > 0) await new Promise((r) => setTimeout(r, spec.gapMs));
  }
  const elapsedS = (performance.now() - started) / 1000;
  return {
    completed: lat.length,
    errors: errors.count,
    errorKinds: errors.kinds,
    latency: summarize(lat),
    elapsedS,
    achievedRate: lat.length / elapsedS,
    windows: spec.windows ? windows : undefined,
  };
}
