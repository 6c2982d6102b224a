/**
 * Steady KMS-like traffic for fault tests: loops of Encrypt → Decrypt pairs,
 * every request signed by AWS's own signer, every answer judged by the oracle.
 * A request that gets no answer within `hangMs` is counted as a hang, never
 * waited out.
 */
import { randomBytes } from "node:crypto";
import { sleep } from "../wait.ts";
import { type EncryptAnswer, decryptBody, encryptBody, keyPath } from "./bodies.ts";
import { type Resp, XksClient, type XksEndpoint } from "./client.ts";
import { decryptProblem, encryptProblem, verdict } from "./oracle.ts";

export interface Sample {
  /** performance.now() at send and at answer. */
  start: number;
  end: number;
  kind: "ok" | "spec-error" | "net-error" | "hang" | "wrong";
  /** The spec error's name, the network error, or why the answer is wrong. */
  detail?: string;
}

export class Traffic {
  readonly samples: Sample[] = [];
  private running = false;
  private loops: Promise<void>[] = [];
  private readonly client: XksClient;

  constructor(
    endpoint: XksEndpoint,
    private readonly key: string,
    private readonly opts: { concurrency?: number; hangMs?: number; pauseMs?: number } = {},
  ) {
    this.client = new XksClient(endpoint, 16);
  }

  start(): void {
    this.running = true;
    for (let i = 0; i < (this.opts.concurrency ?? 4); i++) this.loops.push(this.loop());
  }

  async stop(): Promise<void> {
    this.running = false;
    await Promise.all(this.loops);
    this.client.close();
  }

  private async loop(): Promise<void> {
    while (this.running) {
      await this.pair();
      if (this.opts.pauseMs) await sleep(this.opts.pauseMs);
    }
  }

  /** One Encrypt and, if it worked, one Decrypt of its answer; both recorded. */
  private async pair(): Promise<void> {
    const pt = randomBytes(16 + Math.floor(Math.random() * 200));
    const aad = randomBytes(8);
    const enc = await this.request(keyPath(this.key, "encrypt"), encryptBody(pt, { aad }), (a) =>
      encryptProblem(a, { plaintext: pt, aad }),
    );
    if (!enc) return;
    await this.request(keyPath(this.key, "decrypt"), decryptBody(enc.json as EncryptAnswer, { aad }), (a) => decryptProblem(a, pt));
  }

  /** Sends one request and records it; returns the answer when it was a correct 200. */
  private async request(rest: string, body: unknown, check: (a: Resp) => string | undefined): Promise<Resp | undefined> {
    const sample: Sample = { start: performance.now(), end: 0, kind: "hang" };
    this.samples.push(sample);
    let r: Resp;
    try {
      r = await this.client.post(rest, body, { timeoutMs: this.opts.hangMs ?? 10_000 });
    } catch (err) {
      sample.end = performance.now();
      const msg = (err as NodeJS.ErrnoException).code ?? (err as Error).message;
      Object.assign(sample, /no answer within/.test(msg) ? { kind: "hang", detail: msg } : { kind: "net-error", detail: msg });
      return undefined;
    }
    sample.end = performance.now();
    const v = verdict(r, check);
    if (v.kind === "ok") sample.kind = "ok";
    else if (v.kind === "spec-error") Object.assign(sample, { kind: "spec-error", detail: `${r.status} ${v.name}` });
    else Object.assign(sample, { kind: "wrong", detail: v.why });
    return v.kind === "ok" ? r : undefined;
  }
}

export interface FaultReport {
  total: number;
  ok: number;
  /** "503 DependencyTimeoutException" → count. */
  specErrors: Record<string, number>;
  netErrors: number;
  hangs: number;
  wrong: Sample[];
  /** The slowest answer, ms (printed; not a pass/fail figure). */
  maxMs: number;
  /** Successful answers that started before the fault and after the path was whole again. */
  okBefore: number;
  okAfter: number;
  /** ms from the path being whole until the first success after which nothing failed (undefined: never). */
  recoveryMs: number | undefined;
}

/** Summarises the samples; `faultAt` is when the fault began and `wholeAt` when the path was whole again (performance.now()). */
export function faultReport(samples: Sample[], faultAt: number, wholeAt: number): FaultReport {
  const done = samples.filter((s) => s.end > 0);
  const specErrors: Record<string, number> = {};
  for (const s of done) if (s.kind === "spec-error") specErrors[s.detail!] = (specErrors[s.detail!] ?? 0) + 1;
  // Recovery: the last failure that started after the path was whole; service is back once it ends.
  const lastFailure = done.filter((s) => s.kind !== "ok" && s.start >= wholeAt).reduce((m, s) => Math.max(m, s.end), wholeAt);
  const okAfter = done.filter((s) => s.kind === "ok" && s.start >= lastFailure);
  return {
    total: done.length,
    ok: done.filter((s) => s.kind === "ok").length,
    specErrors,
    netErrors: done.filter((s) => s.kind === "net-error").length,
    hangs: samples.filter((s) => s.kind === "hang").length,
    wrong: done.filter((s) => s.kind === "wrong"),
    maxMs: Math.round(done.reduce((m, s) => Math.max(m, s.end - s.start), 0)),
    okBefore: done.filter((s) => s.kind === "ok" && s.end <= faultAt).length,
    okAfter: okAfter.length,
    recoveryMs: okAfter.length > 0 ? Math.max(0, Math.round(Math.min(...okAfter.map((s) => s.end)) - wholeAt)) : undefined,
  };
}
