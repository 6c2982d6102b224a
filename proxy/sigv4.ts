/**
 * AWS Signature Version 4 verification for XKS requests (XKS Proxy API spec
 * Appendix A "Authentication"), written on node:crypto over the RAW body bytes.
 *
 *   Authorization: AWS4-HMAC-SHA256 Credential=<AKID>/<yyyymmdd>/<region>/kms-xks-proxy/aws4_request,
 *                  SignedHeaders=<h1;h2;…>, Signature=<64 hex>
 *
 * Rules enforced here (any failure -> 401 AuthenticationFailedException):
 *  - exactly one Authorization header, algorithm AWS4-HMAC-SHA256, each of
 *    Credential / SignedHeaders / Signature exactly once;
 *  - credential scope checked field by field: access key id known for THIS key
 *    store (several live credentials allowed, for rotation), date = the day of
 *    X-Amz-Date, the configured region, service `kms-xks-proxy`, `aws4_request`;
 *  - SignedHeaders lowercase, sorted, unique, present in the request, and
 *    including `host` and `x-amz-date` (KMS signs `host;x-amz-date`, curl also
 *    signs `content-type`; whatever is listed is verified);
 *  - X-Amz-Date within ±5 minutes of now;
 *  - the payload hash is ALWAYS computed from the body bytes. An incoming
 *    `x-amz-content-sha256` is never used for the hash; if it is signed and
 *    differs from the real hash, the request is rejected;
 *  - canonical URI = the path exactly as sent (XKS paths are [A-Za-z0-9/_.-]);
 *    canonical query = the sorted, RFC 3986-encoded query ("" when none);
 *  - constant-time signature comparison.
 *
 * The `detail` of the thrown XksError says which rule failed, for the log only.
 */
import type { SigV4FailureReason } from "./metrics.ts";
import { createHash, createHmac, timingSafeEqual } from "node:crypto";
import { XksError } from "../shared/errors.ts";
import type { Credential } from "./config.ts";

export const XKS_SIGV4_SERVICE = "kms-xks-proxy";
export const MAX_CLOCK_SKEW_MS = 5 * 60 * 1000;
const ALGORITHM = "AWS4-HMAC-SHA256";

/** The parts of an HTTP request the signature covers. */
export interface SignedRequest {
  method: string;
  /** The path exactly as sent, without the query string. */
  path: string;
  /** The raw query string without "?" ("" when none). */
  query: string;
  /** Node's `req.rawHeaders`: [name, value, name, value, …] in arrival order. */
  rawHeaders: readonly string[];
  body: Buffer;
}

export interface VerifyOptions {
  region: string;
  /** The credentials accepted for this key store (≥1; two during rotation). */
  credentials: readonly Credential[];
  /** Current time in ms since the epoch. */
  now: number;
  service?: string;
  maxSkewMs?: number;
}

export interface VerifiedSignature {
  accessKeyId: string;
}

/** A SigV4 refusal, with the rule that failed as a bounded reason (for metrics). */
export class SigV4Error extends XksError {
  readonly reason: SigV4FailureReason;
  constructor(detail: string, reason: SigV4FailureReason) {
    super("AuthenticationFailedException", `sigv4: ${detail}`);
    this.reason = reason;
  }
}

function fail(detail: string, reason: SigV4FailureReason = "malformed"): never {
  throw new SigV4Error(detail, reason);
}

export function sha256Hex(data: Buffer | string): string {
  return createHash("sha256").update(data).digest("hex");
}

function hmac(key: Buffer | string, data: string): Buffer {
  return createHmac("sha256", key).update(data, "utf8").digest();
}

/** kSigning = HMAC(HMAC(HMAC(HMAC("AWS4"+secret, date), region), service), "aws4_request") */
export function signingKey(secret: string, date: string, region: string, service: string): Buffer {
  return hmac(hmac(hmac(hmac(`AWS4${secret}`, date), region), service), "aws4_request");
}

/**
 * Signing keys change once a day per credential: keep the ones in use (per
 * credential object, so nothing keyed by secret text) instead of four HMACs per request.
 */
const signingKeys = new WeakMap<object, Map<string, Buffer>>();
const UNKNOWN_CREDENTIAL = {};
function cachedSigningKey(credential: Credential | undefined, date: string, region: string, service: string): Buffer {
  const owner = credential ?? UNKNOWN_CREDENTIAL;
  let keys = signingKeys.get(owner);
  if (!keys) {
    keys = new Map();
    signingKeys.set(owner, keys);
  }
  const id = `${date}/${region}/${service}`;
  let key = keys.get(id);
  if (!key) {
    if (keys.size >= 8) keys.clear();
    key = signingKey(credential?.secretAccessKey ?? DUMMY_SECRET, date, region, service);
    keys.set(id, key);
  }
  return key;
}

/** RFC 3986 encoding as SigV4 wants it: unreserved characters kept, everything else %XX (uppercase). */
function uriEncode(s: string): string {
  return encodeURIComponent(s).replace(/[!'()*]/g, (ch) => `%${ch.charCodeAt(0).toString(16).toUpperCase()}`);
}

/** CanonicalQueryString: each name and value decoded then re-encoded, sorted by name then value. */
export function canonicalQuery(query: string): string {
  if (query === "") return "";
  const pairs: [string, string][] = [];
  for (const part of query.split("&")) {
    if (part === "") continue;
    const eq = part.indexOf("=");
    const k = eq < 0 ? part : part.slice(0, eq);
    const v = eq < 0 ? "" : part.slice(eq + 1);
    let dk: string;
    let dv: string;
    try {
      dk = decodeURIComponent(k);
      dv = decodeURIComponent(v);
    } catch {
      fail("malformed query string");
    }
    pairs.push([uriEncode(dk), uriEncode(dv)]);
  }
  pairs.sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : a[1] < b[1] ? -1 : a[1] > b[1] ? 1 : 0));
  return pairs.map(([k, v]) => `${k}=${v}`).join("&");
}

/** Header values by lowercase name, in arrival order (duplicates kept). */
function headerMap(rawHeaders: readonly string[]): Map<string, string[]> {
  const m = new Map<string, string[]>();
  for (let i = 0; i + 1 < rawHeaders.length; i += 2) {
    const name = rawHeaders[i].toLowerCase();
    const list = m.get(name);
    if (list) list.push(rawHeaders[i + 1]);
    else m.set(name, [rawHeaders[i + 1]]);
  }
  return m;
}

interface ParsedAuthorization {
  accessKeyId: string;
  date: string;
  region: string;
  service: string;
  terminator: string;
  signedHeaders: string[];
  signature: string;
}

function parseAuthorization(value: string): ParsedAuthorization {
  if (!value.startsWith(`${ALGORITHM} `)) fail("unsupported algorithm");
  const fields = new Map<string, string>();
  for (const part of value.slice(ALGORITHM.length + 1).split(",")) {
    const p = part.trim();
    const eq = p.indexOf("=");
    if (eq <= 0) fail("malformed Authorization header");
    const k = p.slice(0, eq);
    if (fields.has(k)) fail(`duplicate ${k} in Authorization header`);
    fields.set(k, p.slice(eq + 1));
  }
  const credential = fields.get("Credential");
  const signed = fields.get("SignedHeaders");
  const signature = fields.get("Signature");
  if (credential === undefined || signed === undefined || signature === undefined || fields.size !== 3) {
    fail("Authorization header must have exactly Credential, SignedHeaders and Signature");
  }
  const scope = credential.split("/");
  if (scope.length !== 5) fail("malformed credential scope");
  const [accessKeyId, date, region, service, terminator] = scope;
  if (!/^[0-9a-f]{64}$/.test(signature)) fail("malformed signature");
  const signedHeaders = signed.split(";");
  for (let i = 0; i < signedHeaders.length; i++) {
    const h = signedHeaders[i];
    if (!/^[a-z0-9!#$%&'*+.^_`|~-]+$/.test(h)) fail("malformed SignedHeaders");
    if (i > 0 && signedHeaders[i - 1] >= h) fail("SignedHeaders must be sorted and unique");
  }
  return { accessKeyId, date, region, service, terminator, signedHeaders, signature };
}

/** Parses X-Amz-Date (yyyymmddTHHMMSSZ, UTC) to ms since the epoch. */
function parseAmzDate(s: string): number {
  const m = /^(\d{4})(\d{2})(\d{2})T(\d{2})(\d{2})(\d{2})Z$/.exec(s);
  if (!m) fail("malformed X-Amz-Date");
  const [y, mo, d, h, mi, se] = m.slice(1).map(Number);
  const t = Date.UTC(y, mo - 1, d, h, mi, se);
  const back = new Date(t);
  if (back.getUTCFullYear() !== y || back.getUTCMonth() !== mo - 1 || back.getUTCDate() !== d || h > 23 || mi > 59 || se > 59) {
    fail("invalid X-Amz-Date");
  }
  return t;
}

/** A secret for unknown access key ids, so that every failure path does the same HMAC work. */
const DUMMY_SECRET = "0000000000000000000000000000000000000000000";

/**
 * Verifies the request's SigV4 signature. Returns the access key id that
 * signed it; throws XksError("AuthenticationFailedException") otherwise.
 */
export function verifySigV4(req: SignedRequest, opts: VerifyOptions): VerifiedSignature {
  const service = opts.service ?? XKS_SIGV4_SERVICE;
  const maxSkew = opts.maxSkewMs ?? MAX_CLOCK_SKEW_MS;
  const headers = headerMap(req.rawHeaders);

  const authValues = headers.get("authorization");
  if (!authValues) fail("missing Authorization header", "missing_authorization");
  if (authValues.length !== 1) fail("more than one Authorization header");
  const auth = parseAuthorization(authValues[0]);

  // Scope, field by field.
  const credential = opts.credentials.find((c) => c.accessKeyId === auth.accessKeyId);
  const dateValues = headers.get("x-amz-date");
  if (dateValues?.length !== 1) fail("X-Amz-Date header missing or repeated");
  const amzDate = dateValues[0].trim();
  const signedAt = parseAmzDate(amzDate);
  if (auth.date !== amzDate.slice(0, 8)) fail("credential scope date differs from X-Amz-Date", "wrong_scope");
  if (auth.region !== opts.region) fail(`wrong region in credential scope (${auth.region.slice(0, 32)})`, "wrong_scope");
  if (auth.service !== service) fail(`wrong service in credential scope (${auth.service.slice(0, 32)})`, "wrong_scope");
  if (auth.terminator !== "aws4_request") fail("wrong credential scope terminator", "wrong_scope");
  if (Math.abs(opts.now - signedAt) > maxSkew) fail("X-Amz-Date is more than 5 minutes from now", "clock_skew");
  if (!auth.signedHeaders.includes("host") || !auth.signedHeaders.includes("x-amz-date")) {
    fail("SignedHeaders must include host and x-amz-date");
  }

  // Payload hash: always from the bytes received.
  const payloadHash = sha256Hex(req.body);
  let canonicalHeaders = "";
  for (const name of auth.signedHeaders) {
    const values = headers.get(name);
    if (!values) fail(`signed header ${name} is missing`);
    const v = values.map((x) => x.trim().replace(/\s+/g, " ")).join(",");
    if (name === "x-amz-content-sha256" && v.toLowerCase() !== payloadHash)
      fail("x-amz-content-sha256 differs from the body", "body_hash_mismatch");
    canonicalHeaders += `${name}:${v}\n`;
  }
  const canonicalRequest = [
    req.method.toUpperCase(),
    req.path,
    canonicalQuery(req.query),
    canonicalHeaders,
    auth.signedHeaders.join(";"),
    payloadHash,
  ].join("\n");
  const scope = `${auth.date}/${auth.region}/${service}/aws4_request`;
  const stringToSign = `${ALGORITHM}\n${amzDate}\n${scope}\n${sha256Hex(canonicalRequest)}`;
  const key = cachedSigningKey(credential, auth.date, auth.region, service);
  const expected = hmac(key, stringToSign);
  const given = Buffer.from(auth.signature, "hex");
  const match = timingSafeEqual(expected, given);
  if (!credential) fail(`unknown access key id ${auth.accessKeyId.slice(0, 32)}`, "unknown_access_key");
  if (!match) fail("signature mismatch", "signature_mismatch");
  return { accessKeyId: credential.accessKeyId };
}
