/**
 * Requests signed the way KMS signs them, by signers independent of the
 * proxy's verifier: AWS's own `@smithy/signature-v4` (applyChecksum off, as
 * KMS sends no x-amz-content-sha256) here, and real `curl --aws-sigv4` in
 * client.ts.
 */
import { createHash, createHmac, type Hash, type Hmac } from "node:crypto";
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
  /** Sign the path exactly as given (no URI re-encoding), as a client that sends raw bytes would. */
  rawPath?: boolean;
}

export interface PlainRequest {
  method?: string;
  /** Path (and query) as sent. */
  path: string;
  headers?: Record<string, string>;
  body?: string | Buffer;
}

/** The XKS SigV4 service name. */
export const XKS_SERVICE = "kms-xks-proxy";

const signers = new Map<string, SignatureV4>();
/** One signer per credential, region, service and path mode (smithy caches derived keys inside). */
export function signerFor(o: SignOptions): SignatureV4 {
  const region = o.region ?? "us-east-1";
  const service = o.service ?? XKS_SERVICE;
  const k = `${o.accessKeyId}\n${o.secretAccessKey}\n${region}\n${service}\n${o.rawPath === true}`;
  let s = signers.get(k);
  if (!s) {
    s = new SignatureV4({
      credentials: { accessKeyId: o.accessKeyId, secretAccessKey: o.secretAccessKey },
      region,
      service,
      sha256: Sha256,
      applyChecksum: false,
      uriEscapePath: o.rawPath !== true,
    });
    signers.set(k, s);
  }
  return s;
}

/** Signs a request with smithy; returns every header to send (host, x-amz-date, authorization and the request's own). */
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
  const signed = await signerFor(o).sign(hr, { signingDate: o.date ?? new Date() });
  return { ...(signed.headers as Record<string, string>) };
}
