/**
 * Steady signed traffic against the proxy for fault tests: encrypt → decrypt
 * pairs, every answer checked. Each request is signed by AWS's own signer and
 * has a client-side timeout, so a hang is counted, never waited out.
 */
import { randomBytes, randomUUID } from "node:crypto";
import http from "node:http";
import { XKS_ERRORS } from "../../shared/errors.ts";
import { smithySign } from "./sigv4.ts";

export interface Sample {
  start: number; // ms, performance.now()
  end: number;
  kind: "ok" | "spec-error" | "net-error" | "timeout" | "WRONG";
  status?: number;
  detail?: string;
}

export interface TrafficTarget {
  url: string;
  uriPath: string;
  region: string;
  accessKeyId: string;
  secretAccessKey: string;
  key: string;
}

export class Traffic {
  readonly samples: Sample[] = [];
  private running = false;
  private loops: Promise<void>[] = [];
  private readonly agent = new http.Agent({ keepAlive: true, maxSockets: 16 });

  constructor(
    private readonly t: TrafficTarget,
    private readonly opts: { concurrency?: number; timeoutMs?: number; pauseMs?: number } = {},
  ) {}

  start(): void {
    this.running = true;
    for (let i = 0; i < (this.opts.concurrency ?? 4); i++) this.loops.push(this.loop());
  }

  async stop(): Promise<void> {
    this.running = false;
    await Promise.all(this.loops);
    this.agent.destroy();
  }

  private async loop(): Promise<void> {
    while (this.running) {
      await this.pair();
      if (this.opts.pauseMs) await new Promise((r) => setTimeout(r, this.opts.pauseMs));
    }
  }

  /** One encrypt and (if it worked) one decrypt of the result; both recorded. */
  private async pair(): Promise<void> {
    const pt = randomBytes(16 + Math.floor(Math.random() * 200));
    const aad = randomBytes(8);
    const md = (op: string) => ({ awsPrincipalArn: "arn:aws:iam::123456789012:user/fault", kmsKeyArn: "arn:k", kmsOperation: op, kmsRequestId: randomUUID() });
    const enc = await this.request("encrypt", {
      requestMetadata: md("Encrypt"),
      plaintext: pt.toString("base64"),
      additionalAuthenticatedData: aad.toString("base64"),
      encryptionAlgorithm: "AES_GCM",
    });
    if (enc.sample.kind !== "ok") return;
    const e = enc.json as Record<string, string>;
    const b = (s: string) => Buffer.from(s ?? "", "base64");
    if (b(e.ciphertext).length !== pt.length || b(e.initializationVector).length !== 12 || b(e.authenticationTag).length !== 16) {
      enc.sample.kind = "WRONG";
      enc.sample.detail = "malformed encrypt answer";
      return;
    }
    const dec = await this.request("decrypt", {
      requestMetadata: md("Decrypt"),
      ciphertext: e.ciphertext,
      initializationVector: e.initializationVector,
      authenticationTag: e.authenticationTag,
      ciphertextMetadata: e.ciphertextMetadata,
      additionalAuthenticatedData: aad.toString("base64"),
      encryptionAlgorithm: "AES_GCM",
    });
    if (dec.sample.kind === "ok" && !b((dec.json as { plaintext: string }).plaintext).equals(pt)) {
      dec.sample.kind = "WRONG";
      dec.sample.detail = "decrypt returned a different plaintext";
    }
  }

  private async request(op: string, body: unknown): Promise<{ sample: Sample; json?: unknown }> {
    const path = `${this.t.uriPath}/keys/${this.t.key}/${op}`;
    const raw = JSON.stringify(body);
    const headers = await smithySign(this.t.url, { path, headers: { "content-type": "application/json" }, body: raw }, this.t);
    const u = new URL(this.t.url);
    const sample: Sample = { start: performance.now(), end: 0, kind: "timeout" };
    this.samples.push(sample);
    const timeoutMs = this.opts.timeoutMs ?? 2000;
    return new Promise((resolve) => {
      let settled = false;
      const done = (kind: Sample["kind"], extra: Partial<Sample> = {}, json?: unknown) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        Object.assign(sample, { end: performance.now(), kind, ...extra });
        resolve({ sample, json });
      };
      const timer = setTimeout(() => {
        done("timeout", { detail: `no answer within ${timeoutMs} ms` });
        req.destroy();
      }, timeoutMs);
      const req = http.request(
        { host: u.hostname, port: Number(u.port), method: "POST", path, headers: { ...headers, "content-length": String(Buffer.byteLength(raw)) }, agent: this.agent },
        (res) => {
          const chunks: Buffer[] = [];
          res.on("data", (c: Buffer) => chunks.push(c));
          res.on("error", (err) => done("net-error", { detail: err.message }));
          res.on("end", () => {
            const text = Buffer.concat(chunks).toString();
            let json: any;
            try {
              json = JSON.parse(text);
            } catch {
              /* checked below */
            }
            const status = res.statusCode ?? 0;
            if (status === 200 && json) return done("ok", { status }, json);
            const name = json?.errorName as keyof typeof XKS_ERRORS | undefined;
            if (name && XKS_ERRORS[name]?.status === status) return done("spec-error", { status, detail: name });
            done("WRONG", { status, detail: `not a spec answer: ${text.slice(0, 200)}` });
          });
        },
      );
      req.on("error", (err) => done("net-error", { detail: (err as NodeJS.ErrnoException).code ?? err.message }));
      req.end(raw);
    });
  }
}

export interface FaultReport {
  total: number;
  ok: number;
  specErrors: Record<string, number>;
  netErrors: number;
  timeouts: number;
  wrong: Sample[];
  maxMs: number;
  /** ms from `wholeAt` until the first success after which nothing failed (undefined: never recovered). */
  recoveryMs: number | undefined;
}

/** Summarises the samples; `wholeAt` is when the path was whole again (performance.now()). */
export function report(samples: Sample[], wholeAt: number): FaultReport {
  const done = samples.filter((s) => s.end > 0);
  const specErrors: Record<string, number> = {};
  for (const s of done) if (s.kind === "spec-error") specErrors[`${s.status} ${s.detail}`] = (specErrors[`${s.status} ${s.detail}`] ?? 0) + 1;
  // Recovery: the last failure that started after the path was whole; service is back once it ends.
  const failuresAfter = done.filter((s) => s.kind !== "ok" && s.start >= wholeAt);
  const lastFailure = failuresAfter.reduce((m, s) => Math.max(m, s.end), wholeAt);
  const okAfter = done.filter((s) => s.kind === "ok" && s.start >= lastFailure);
  return {
    total: done.length,
    ok: done.filter((s) => s.kind === "ok").length,
    specErrors,
    netErrors: done.filter((s) => s.kind === "net-error").length,
    timeouts: done.filter((s) => s.kind === "timeout").length,
    wrong: done.filter((s) => s.kind === "WRONG"),
    maxMs: Math.round(done.reduce((m, s) => Math.max(m, s.end - s.start), 0)),
    recoveryMs: okAfter.length >= 3 ? Math.max(0, Math.round(Math.min(...okAfter.map((s) => s.end)) - wholeAt)) : undefined,
  };
}
