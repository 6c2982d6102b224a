/**
 * The HTTP client that talks to the proxy like KMS: every request signed by
 * an independent signer (smithy or real curl), connections kept alive as
 * behind KMS's load balancer when asked, and a retry of the spec's "busy"
 * answers where a caller needs success.
 */
import { spawn } from "node:child_process";
import { readFileSync } from "node:fs";
import { Agent, request as httpRequest } from "node:http";
import { Agent as HttpsAgent, request as httpsRequest } from "node:https";
import type { Socket } from "node:net";
import { GENEROUS_MS, sleep, until } from "../wait.ts";
import { healthBody } from "./bodies.ts";
import { smithySign, type Creds, type PlainRequest, type SignOptions } from "./sign.ts";

export interface Resp {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  text: string;
  json: any;
  /** From the first byte sent to the last byte received. */
  ms: number;
}

function parse(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}

/**
 * A client's TLS towards an https:// proxy, as PEM files: the CA it trusts
 * and, for mutual TLS, its certificate and key.
 */
export interface ClientTls {
  caFile: string;
  certFile?: string;
  keyFile?: string;
}

const tlsCache = new WeakMap<ClientTls, { ca: Buffer; cert?: Buffer; key?: Buffer }>();
/** Node's options for `t` (files read once per object). */
export function nodeTlsOptions(t: ClientTls): { ca: Buffer; cert?: Buffer; key?: Buffer } {
  let o = tlsCache.get(t);
  if (!o) {
    o = {
      ca: readFileSync(t.caFile),
      ...(t.certFile ? { cert: readFileSync(t.certFile) } : {}),
      ...(t.keyFile ? { key: readFileSync(t.keyFile) } : {}),
    };
    tlsCache.set(t, o);
  }
  return o;
}

/** curl's options for `t`. */
export function curlTlsArgs(t: ClientTls | undefined): string[] {
  if (!t) return [];
  return ["--cacert", t.caFile, ...(t.certFile ? ["--cert", t.certFile] : []), ...(t.keyFile ? ["--key", t.keyFile] : [])];
}

export interface SendOptions {
  /** For an https:// URL: the CA to trust and the client certificate, if any. */
  tls?: ClientTls;
  /** A keep-alive agent to reuse connections; default: a new connection per request. */
  agent?: Agent | HttpsAgent | false;
  /** Give up (reject) after this long without a complete answer: a hang, not a slow answer. */
  timeoutMs?: number;
  /** Told which connection carries the request (e.g. to count the connections a client used). */
  onSocket?: (socket: Socket) => void;
}

/** Sends exactly the given headers and body (no signing). Rejects on a network error or after `timeoutMs`. */
export function send(baseUrl: string, req: PlainRequest, o: SendOptions = {}): Promise<Resp> {
  const u = new URL(baseUrl);
  const t0 = performance.now();
  const timeoutMs = o.timeoutMs ?? GENEROUS_MS;
  return new Promise((resolve, reject) => {
    const https = u.protocol === "https:";
    const options = {
      host: u.hostname,
      port: Number(u.port),
      method: req.method ?? "POST",
      path: req.path,
      headers: req.headers ?? {},
      agent: o.agent ?? false,
      ...(https && o.tls ? nodeTlsOptions(o.tls) : {}),
    };
    const onResponse = (res: import("node:http").IncomingMessage) => {
      const chunks: Buffer[] = [];
      res.on("data", (c: Buffer) => chunks.push(c));
      res.on("error", reject);
      res.on("end", () => {
        clearTimeout(timer);
        const text = Buffer.concat(chunks).toString("utf8");
        resolve({ status: res.statusCode ?? 0, headers: res.headers, text, json: parse(text), ms: performance.now() - t0 });
      });
    };
    const r = https
      ? httpsRequest(options as import("node:https").RequestOptions, onResponse)
      : httpRequest(options as import("node:http").RequestOptions, onResponse);
    const timer = setTimeout(() => r.destroy(new Error(`no answer within ${timeoutMs} ms`)), timeoutMs);
    if (o.onSocket) r.on("socket", (s) => o.onSocket?.(s as Socket));
    r.on("error", (err) => {
      clearTimeout(timer);
      reject(err);
    });
    if (req.body !== undefined) r.write(req.body);
    r.end();
  });
}

export interface PostOptions extends SendOptions {
  /** Headers added before signing (default content-type: application/json). */
  headers?: Record<string, string>;
  /** Change headers/body after signing (tampering tests). */
  after?: (h: Record<string, string>, body: string | Buffer) => { headers: Record<string, string>; body: string | Buffer };
  method?: string;
  sign?: Partial<SignOptions>;
}

/** Signs now (smithy); the returned function sends, so a burst can be signed first and sent at once. */
export async function presignPost(
  baseUrl: string,
  path: string,
  body: unknown,
  creds: Creds,
  o: PostOptions = {},
): Promise<() => Promise<Resp>> {
  const raw = typeof body === "string" || Buffer.isBuffer(body) ? body : JSON.stringify(body);
  const headers = { "content-type": "application/json", ...(o.headers ?? {}) };
  const method = o.method ?? "POST";
  let h = await smithySign(baseUrl, { method, path, headers, body: raw }, { ...creds, ...o.sign });
  let b: string | Buffer = raw;
  if (o.after) ({ headers: h, body: b } = o.after(h, raw));
  return () => send(baseUrl, { method, path, headers: { ...h, "content-length": String(Buffer.byteLength(b)) }, body: b }, o);
}

/** Signs with smithy and sends. `body` objects are JSON.stringify'd. */
export async function signedPost(baseUrl: string, path: string, body: unknown, creds: Creds, o: PostOptions = {}): Promise<Resp> {
  return (await presignPost(baseUrl, path, body, creds, o))();
}

/**
 * POSTs with the real curl and its own SigV4 implementation (signs
 * `content-type;host;x-amz-date`). The secret goes on curl's command line:
 * test credentials only.
 */
export async function curlPost(
  baseUrl: string,
  path: string,
  body: string,
  creds: Creds,
  o: { region?: string; contentType?: string | null; method?: string; tls?: ClientTls } = {},
): Promise<Resp> {
  const args = [
    "--aws-sigv4",
    `aws:amz:${o.region ?? "us-east-1"}:kms-xks-proxy`,
    "--user",
    `${creds.accessKeyId}:${creds.secretAccessKey}`,
    "--data-binary",
    "@-",
    "--write-out",
    "\n%{http_code}",
    ...curlTlsArgs(o.tls),
  ];
  if (o.contentType !== null) args.push("-H", `Content-Type: ${o.contentType ?? "application/json"}`);
  if (o.method) args.push("-X", o.method);
  args.push(`${baseUrl}${path}`);
  const t0 = performance.now();
  const r = await runCurl(args, body);
  if (r.code !== 0) throw new Error(`curl exited ${r.code}: ${r.stderr}`);
  const nl = r.stdout.lastIndexOf("\n");
  const text = r.stdout.slice(0, nl);
  return { status: Number(r.stdout.slice(nl + 1)), headers: {}, text, json: parse(text), ms: performance.now() - t0 };
}

/**
 * The real curl in a child process (never blocking this one, where a proxy under test
 * may run): quiet but for errors, no proxy, GENEROUS_MS at most; `stdin` is its input (none: empty).
 * Resolves with its exit code and output whatever the code.
 */
export function runCurl(args: string[], stdin?: string): Promise<{ code: number | null; stdout: string; stderr: string }> {
  const all = ["--silent", "--show-error", "--noproxy", "*", "--max-time", String(GENEROUS_MS / 1000), ...args];
  return new Promise((resolve, reject) => {
    const p = spawn("curl", all, { stdio: ["pipe", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    p.stdout.on("data", (c: Buffer) => (stdout += c.toString("utf8")));
    p.stderr.on("data", (c: Buffer) => (stderr += c.toString("utf8")));
    p.on("error", reject);
    p.on("close", (code) => resolve({ code, stdout, stderr }));
    p.stdin.end(stdin ?? "");
  });
}

/** Where a KMS external key store reaches the proxy, and its credential. */
export interface XksEndpoint {
  url: string;
  /** `[/<prefix>]/kms/xks/v1` */
  uriPath: string;
  region: string;
  accessKeyId: string;
  secretAccessKey: string;
  /** For an https:// url: the CA to trust and, for mutual TLS, the client certificate. */
  tls?: ClientTls;
}

/** The answers that mean "the chain is busy or its dependency did not answer in time; try again". */
export const RETRYABLE_STATUSES = new Set([429, 503]);

/**
 * Sends (`send` signs afresh each time) and, on the spec's busy answers (429
 * ThrottlingException, 503 DependencyTimeoutException), tries again with
 * jittered exponential backoff, as KMS does: for a caller that needs the
 * operation to succeed under load. Returns the last answer.
 */
export async function retryBusy(send: () => Promise<Resp>, attempts = 10): Promise<Resp> {
  for (let i = 1; ; i++) {
    const r = await send();
    if (!RETRYABLE_STATUSES.has(r.status) || i >= attempts) return r;
    await sleep(Math.min(2000, 50 * 2 ** i) * (0.5 + Math.random()));
  }
}

/**
 * One key store's client, as KMS would be: SigV4 with the store's
 * credential, keep-alive connections (as behind KMS's load balancer).
 */
export class XksClient {
  readonly agent: Agent | HttpsAgent;
  private readonly creds: Creds;

  constructor(
    readonly endpoint: XksEndpoint,
    sockets = 256,
  ) {
    this.creds = { accessKeyId: endpoint.accessKeyId, secretAccessKey: endpoint.secretAccessKey };
    const keepAlive = { keepAlive: true, keepAliveMsecs: 1000, maxSockets: sockets };
    this.agent = endpoint.url.startsWith("https:") ? new HttpsAgent(keepAlive) : new Agent(keepAlive);
  }

  private opts(o: PostOptions): PostOptions {
    return { agent: this.agent, tls: this.endpoint.tls, ...o, sign: { region: this.endpoint.region, ...o.sign } };
  }

  /** Signs (smithy) and POSTs to `<uriPath>/<rest>`. */
  post(rest: string, body: unknown, o: PostOptions = {}): Promise<Resp> {
    return signedPost(this.endpoint.url, `${this.endpoint.uriPath}/${rest}`, body, this.creds, this.opts(o));
  }

  /** Signs now, sends when the returned function is called. */
  presign(rest: string, body: unknown, o: PostOptions = {}): Promise<() => Promise<Resp>> {
    return presignPost(this.endpoint.url, `${this.endpoint.uriPath}/${rest}`, body, this.creds, this.opts(o));
  }

  /** POSTs with real curl and its own SigV4. */
  curl(rest: string, body: unknown): Promise<Resp> {
    return curlPost(
      this.endpoint.url,
      `${this.endpoint.uriPath}/${rest}`,
      typeof body === "string" ? body : JSON.stringify(body),
      this.creds,
      { region: this.endpoint.region, tls: this.endpoint.tls },
    );
  }

  /** POSTs, retrying the spec's busy answers like KMS ({@link retryBusy}). */
  postRetrying(rest: string, body: unknown, attempts = 10): Promise<Resp> {
    return retryBusy(() => this.post(rest, body), attempts);
  }

  /**
   * Resolves once GetHealthStatus reports the first agent ACTIVE (asked every 100 ms); `check`
   * runs before each ask and may throw (a daemon exited). Past `capMs` it throws, naming `what`
   * and the last answer.
   */
  async untilActive(what: string, o: { capMs?: number; check?: () => void } = {}): Promise<void> {
    let last = "";
    try {
      await until(
        async () => {
          o.check?.();
          const r = await this.post("health", healthBody()).catch((err: Error) => ({ status: 0, text: err.message, json: undefined }));
          last = r.text;
          return r.status === 200 && r.json?.ekmFleetDetails?.[0]?.healthStatus === "ACTIVE";
        },
        what,
        o.capMs,
        100,
      );
    } catch (err) {
      throw new Error(`${(err as Error).message} (last answer: ${last})`);
    }
  }

  close(): void {
    this.agent.destroy();
  }
}
