/**
 * Independent SigV4 signers for proxy tests, and tiny HTTP clients:
 *  - `@smithy/signature-v4` (the AWS SDK's signer) with applyChecksum:false and
 *    node:crypto SHA-256 (a Hash class), as KMS would sign: `host;x-amz-date`
 *    plus whatever other headers the request carries;
 *  - real `curl --aws-sigv4 "aws:amz:<region>:kms-xks-proxy"` (curl 7.75+),
 *    which signs `content-type;host;x-amz-date`.
 * Loopback only.
 */
import { spawn } from "node:child_process";
import { createHash, createHmac, type Hash, type Hmac } from "node:crypto";
import { request as httpRequest, type Agent } from "node:http";
import { HttpRequest } from "@smithy/protocol-http";
import { SignatureV4 } from "@smithy/signature-v4";

type SourceData = string | ArrayBuffer | ArrayBufferView;

function toBuffer(d: SourceData): Buffer {
  if (typeof d === "string") return Buffer.from(d, "utf8");
  if (ArrayBuffer.isView(d)) return Buffer.from(d.buffer, d.byteOffset, d.byteLength);
  return Buffer.from(d);
}

/** SHA-256 / HMAC-SHA-256 in smithy's Checksum shape, on node:crypto. */
export class Sha256 {
  private readonly secret?: SourceData;
  private h: Hash | Hmac;
  constructor(secret?: SourceData) {
    this.secret = secret;
    this.h = this.fresh();
  }
  private fresh(): Hash | Hmac {
    return this.secret !== undefined ? createHmac("sha256", toBuffer(this.secret)) : createHash("sha256");
  }
  update(data: SourceData): void {
    this.h.update(toBuffer(data));
  }
  async digest(): Promise<Uint8Array> {
    return new Uint8Array(this.h.digest());
  }
  reset(): void {
    this.h = this.fresh();
  }
}

export interface Creds {
  accessKeyId: string;
  secretAccessKey: string;
}

export interface SignOptions extends Creds {
  region?: string;
  service?: string;
  date?: Date;
}

export interface PlainRequest {
  method?: string;
  /** Path (and query) as sent. */
  path: string;
  headers?: Record<string, string>;
  body?: string | Buffer;
}

export interface Resp {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  text: string;
  json: any;
  ms: number;
}

/** Signs a request with smithy; returns all headers to send (incl. host, x-amz-date, authorization). */
export async function smithySign(baseUrl: string, req: PlainRequest, o: SignOptions): Promise<Record<string, string>> {
  const u = new URL(baseUrl);
  const [path, query] = req.path.split("?") as [string, string | undefined];
  const q: Record<string, string> = {};
  if (query) for (const [k, v] of new URLSearchParams(query)) q[k] = v;
  const hr = new HttpRequest({
    method: req.method ?? "POST",
    protocol: u.protocol,
    hostname: u.hostname,
    port: Number(u.port),
    path,
    query: q,
    headers: { host: u.host, ...(req.headers ?? {}) },
    body: req.body ?? "",
  });
  const signer = new SignatureV4({
    credentials: { accessKeyId: o.accessKeyId, secretAccessKey: o.secretAccessKey },
    region: o.region ?? "us-east-1",
    service: o.service ?? "kms-xks-proxy",
    sha256: Sha256,
    applyChecksum: false,
  });
  const signed = await signer.sign(hr, { signingDate: o.date ?? new Date() });
  return { ...(signed.headers as Record<string, string>) };
}

/** Sends exactly the given headers and body (no signing). */
export function send(baseUrl: string, req: PlainRequest, agent: Agent | false = false): Promise<Resp> {
  const u = new URL(baseUrl);
  const t0 = performance.now();
  return new Promise((resolve, reject) => {
    const r = httpRequest(
      { host: u.hostname, port: Number(u.port), method: req.method ?? "POST", path: req.path, headers: req.headers ?? {}, agent },
      (res) => {
        const chunks: Buffer[] = [];
        res.on("data", (c: Buffer) => chunks.push(c));
        res.on("end", () => {
          const text = Buffer.concat(chunks).toString("utf8");
          let json: unknown;
          try {
            json = JSON.parse(text);
          } catch {
            json = undefined;
          }
          resolve({ status: res.statusCode ?? 0, headers: res.headers, text, json, ms: performance.now() - t0 });
        });
      },
    );
    r.on("error", reject);
    if (req.body !== undefined) r.write(req.body);
    r.end();
  });
}

export interface PostOptions {
  /** Headers added before signing (default content-type: application/json). */
  headers?: Record<string, string>;
  /** Change headers/body after signing (tampering tests). */
  after?: (h: Record<string, string>, body: string | Buffer) => { headers: Record<string, string>; body: string | Buffer };
  method?: string;
  sign?: Partial<SignOptions>;
  /** A keep-alive agent to reuse connections (as KMS's load balancer does); default: a new connection per request. */
  agent?: Agent;
}

/** Signs with smithy and sends. `body` objects are JSON.stringify'd. */
export async function signedPost(baseUrl: string, path: string, body: unknown, creds: Creds, opts: PostOptions = {}): Promise<Resp> {
  return (await presignPost(baseUrl, path, body, creds, opts))();
}

/** Signs now; the returned function sends (so a burst of requests can be signed first and sent at once). */
export async function presignPost(baseUrl: string, path: string, body: unknown, creds: Creds, opts: PostOptions = {}): Promise<() => Promise<Resp>> {
  const raw = typeof body === "string" || Buffer.isBuffer(body) ? body : JSON.stringify(body);
  const headers = { "content-type": "application/json", ...(opts.headers ?? {}) };
  const method = opts.method ?? "POST";
  let h = await smithySign(baseUrl, { method, path, headers, body: raw }, { ...creds, ...opts.sign });
  let b: string | Buffer = raw;
  if (opts.after) ({ headers: h, body: b } = opts.after(h, raw));
  return () => send(baseUrl, { method, path, headers: { ...h, "content-length": String(Buffer.byteLength(b)) }, body: b }, opts.agent ?? false);
}

/**
 * POSTs with the real curl and its own SigV4 implementation. The secret goes
 * on curl's command line: test credentials only.
 */
export function curlPost(
  baseUrl: string,
  path: string,
  body: string,
  creds: Creds,
  opts: { region?: string; contentType?: string | null; method?: string } = {},
): Promise<Resp> {
  const args = [
    "--silent",
    "--show-error",
    "--noproxy", "*",
    "--max-time", "10",
    "--aws-sigv4", `aws:amz:${opts.region ?? "us-east-1"}:kms-xks-proxy`,
    "--user", `${creds.accessKeyId}:${creds.secretAccessKey}`,
    "--data-binary", "@-",
    "--write-out", "\n%{http_code}",
  ];
  if (opts.contentType !== null) args.push("-H", `Content-Type: ${opts.contentType ?? "application/json"}`);
  if (opts.method) args.push("-X", opts.method);
  args.push(`${baseUrl}${path}`);
  const t0 = performance.now();
  return new Promise((resolve, reject) => {
    const p = spawn("curl", args, { stdio: ["pipe", "pipe", "pipe"] });
    let out = "";
    let err = "";
    p.stdout.on("data", (c: Buffer) => (out += c.toString("utf8")));
    p.stderr.on("data", (c: Buffer) => (err += c.toString("utf8")));
    p.on("error", reject);
    p.on("close", (code) => {
      if (code !== 0) {
        reject(new Error(`curl exited ${code}: ${err}`));
        return;
      }
      const nl = out.lastIndexOf("\n");
      const text = out.slice(0, nl);
      let json: unknown;
      try {
        json = JSON.parse(text);
      } catch {
        json = undefined;
      }
      resolve({ status: Number(out.slice(nl + 1)), headers: {}, text, json, ms: performance.now() - t0 });
    });
    p.stdin.end(body);
  });
}
