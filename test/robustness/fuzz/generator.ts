/**
 * The fuzz test's generator: >= 10,000 bad requests, case i a pure function of
 * the seed and i (whatever the concurrency), most of them signed by the
 * independent signer (@smithy/signature-v4) so that they get past SigV4 into
 * validation, some unsigned or badly signed, and a few hundred raw-socket
 * protocol abuses. Each case carries the outcomes the model (model.ts) allows.
 *
 *   XKS_FUZZ_SEED=<n>    another seed (the seed is printed)
 *   XKS_FUZZ_COUNT=<n>   number of HTTP-client cases (default 10,400)
 *   XKS_FUZZ_ONLY=<i,j>  only these case indexes (to reproduce a failure)
 */
import { HttpRequest } from "@smithy/protocol-http";
import { CREDS, OTHER_PREFIX, PREFIX } from "../../../testbed/configs.ts";
import { b64, type EncryptAnswer } from "../../../testbed/xks/bodies.ts";
import { type Creds, signerFor } from "../../../testbed/xks/sign.ts";
import {
  A401,
  API,
  CAP,
  E,
  K404,
  KEYS,
  M405,
  MAX_AAD,
  MAX_HEADER_BYTES,
  MAX_HEADERS_COUNT,
  MAX_PT,
  OP_SEGMENT,
  type Op,
  type Outcome,
  opPath,
  P404,
  STORES,
  U501,
  V400,
  agentOutcomes,
  expectedOutcomes,
  resolveRoute,
} from "./model.ts";

export const SEED = (process.env.XKS_FUZZ_SEED ? Number(process.env.XKS_FUZZ_SEED) : 0x5eed_2026) >>> 0;
/** HTTP-client cases (raw-socket cases come on top). */
export const COUNT = Math.max(10_000, Number(process.env.XKS_FUZZ_COUNT ?? 10_400));
export const RAW_COUNT = 400;
/** Run only these case indexes (to reproduce a failure). */
export const ONLY = process.env.XKS_FUZZ_ONLY ? new Set(process.env.XKS_FUZZ_ONLY.split(",").map(Number)) : undefined;

// Recognisable markers: none of them may ever show up in a log line.
export const PT_MARKER = "XKSFUZZ-PLAINTEXT-MARKER-7f3a";
export const AAD_MARKER = "XKSFUZZ-AAD-MARKER-91c2e";
export const AUTHZ_MARKER = "XKSFUZZ-AUTHZ-GARBAGE";
export const PT_B64 = b64(PT_MARKER);
export const AAD_B64 = b64(AAD_MARKER);

// ---------------------------------------------------------------- seeded PRNG (mulberry32)

function mix32(x: number): number {
  x = Math.imul(x ^ (x >>> 16), 0x7feb352d);
  x = Math.imul(x ^ (x >>> 15), 0x846ca68b);
  return (x ^ (x >>> 16)) >>> 0;
}

export class Rng {
  private a: number;
  constructor(seed: number) {
    this.a = seed >>> 0;
  }
  /** [0, 1) */
  next(): number {
    this.a = (this.a + 0x6d2b79f5) | 0;
    let t = this.a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }
  /** integer in [lo, hi] */
  int(lo: number, hi: number): number {
    return lo + Math.floor(this.next() * (hi - lo + 1));
  }
  pick<T>(a: readonly T[]): T {
    return a[Math.floor(this.next() * a.length)];
  }
  chance(p: number): boolean {
    return this.next() < p;
  }
  bytes(n: number): Buffer {
    const b = Buffer.alloc(n);
    for (let i = 0; i < n; i++) b[i] = Math.floor(this.next() * 256);
    return b;
  }
  str(n: number, alphabet: string): string {
    let s = "";
    for (let i = 0; i < n; i++) s += alphabet[Math.floor(this.next() * alphabet.length)];
    return s;
  }
}
/** Case i's own generator: a pure function of (SEED, i). */
const caseRng = (i: number) => new Rng(mix32(SEED ^ mix32(i + 0x9e3779b9)));

/** Percent-encodes the UTF-8 bytes of `s` outside [A-Za-z0-9-._~] (lone surrogates become U+FFFD). */
const pctEncode = (s: string) =>
  [...Buffer.from(s, "utf8")]
    .map((b) =>
      /[A-Za-z0-9\-._~]/.test(String.fromCharCode(b)) ? String.fromCharCode(b) : `%${b.toString(16).toUpperCase().padStart(2, "0")}`,
    )
    .join("");

const ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
const PRINTABLE = Array.from({ length: 95 }, (_, k) => String.fromCharCode(32 + k)).join("");
const TOKEN_CHARS = `${ALNUM}!#$%&'*+-.^_\`|~`;

// ---------------------------------------------------------------- JSON text builder (dup keys, raw literals)

class Raw {
  constructor(readonly text: string) {}
}
/** An object written with exactly these members, in order (duplicates allowed). */
class Members {
  constructor(readonly entries: [string, unknown][]) {}
}
function ser(v: unknown): string {
  if (v instanceof Raw) return v.text;
  if (v instanceof Members) return `{${v.entries.map(([k, x]) => `${JSON.stringify(k)}:${ser(x)}`).join(",")}}`;
  if (Array.isArray(v)) return `[${v.map(ser).join(",")}]`;
  if (v !== null && typeof v === "object") {
    return `{${Object.entries(v)
      .filter(([, x]) => x !== undefined)
      .map(([k, x]) => `${JSON.stringify(k)}:${ser(x)}`)
      .join(",")}}`;
  }
  return JSON.stringify(v);
}

/** Indexes of the structural characters { } : , and of the quotes, outside string contents. */
function structuralPositions(text: string): number[] {
  const out: number[] = [];
  let inString = false;
  for (let k = 0; k < text.length; k++) {
    const ch = text[k];
    if (inString) {
      if (ch === "\\") k++;
      else if (ch === '"') {
        inString = false;
        out.push(k);
      }
    } else if (ch === '"') {
      inString = true;
      out.push(k);
    } else if ("{}:,".includes(ch)) out.push(k);
  }
  return out;
}

// ---------------------------------------------------------------- the operations and their fields

type FieldKind = "object" | "md" | "b64" | "enum";
interface Field {
  name: string;
  kind: FieldKind;
  required: boolean;
  /** For enum fields: the only accepted value. */
  value?: string;
}
const MD_REQUIRED: Record<Op, string[]> = {
  GetKeyMetadata: ["awsPrincipalArn", "kmsOperation", "kmsRequestId"],
  Encrypt: ["awsPrincipalArn", "kmsKeyArn", "kmsOperation", "kmsRequestId"],
  Decrypt: ["awsPrincipalArn", "kmsKeyArn", "kmsOperation", "kmsRequestId"],
  GetHealthStatus: ["kmsOperation", "kmsRequestId"],
};
const MD_ALL = ["awsPrincipalArn", "kmsKeyArn", "kmsOperation", "kmsRequestId", "kmsViaService", "awsSourceVpc", "awsSourceVpce"];
function fieldsOf(op: Op): Field[] {
  const f: Field[] = [{ name: "requestMetadata", kind: "object", required: true }];
  for (const m of MD_ALL) f.push({ name: `requestMetadata.${m}`, kind: "md", required: MD_REQUIRED[op].includes(m) });
  if (op === "Encrypt") {
    f.push(
      { name: "plaintext", kind: "b64", required: true },
      { name: "encryptionAlgorithm", kind: "enum", required: true, value: "AES_GCM" },
      { name: "additionalAuthenticatedData", kind: "b64", required: false },
      { name: "ciphertextDataIntegrityValueAlgorithm", kind: "enum", required: false, value: "SHA_256" },
    );
  }
  if (op === "Decrypt") {
    f.push(
      { name: "ciphertext", kind: "b64", required: true },
      { name: "encryptionAlgorithm", kind: "enum", required: true, value: "AES_GCM" },
      { name: "initializationVector", kind: "b64", required: true },
      { name: "authenticationTag", kind: "b64", required: true },
      { name: "additionalAuthenticatedData", kind: "b64", required: false },
      { name: "ciphertextMetadata", kind: "b64", required: false },
    );
  }
  return f;
}

/** A real ciphertext of PT_MARKER under AAD_MARKER, the base of Decrypt cases: set by the runner before any case is made. */
let REAL: EncryptAnswer;
export function useRealCiphertext(e: EncryptAnswer): void {
  REAL = e;
}

type Body = Record<string, unknown>;
export function requestMetadata(op: Op, i: number, rng: Rng): Record<string, unknown> {
  const id = `fuzz-${SEED}-${i}`;
  if (op === "GetHealthStatus") return { kmsRequestId: id, kmsOperation: rng.pick(["KmsHealthCheck", "ConnectCustomKeyStore"]) };
  const m: Record<string, unknown> = {
    awsPrincipalArn: "arn:aws:iam::123456789012:user/Fuzz",
    kmsKeyArn: "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab",
    kmsOperation: { Encrypt: "Encrypt", Decrypt: "Decrypt", GetKeyMetadata: "CreateKey" }[op],
    kmsRequestId: id,
  };
  if (rng.chance(0.3)) m.kmsViaService = "ebs";
  if (op === "GetKeyMetadata" && rng.chance(0.5)) delete m.kmsKeyArn;
  return m;
}
/** A VALID body for `op` (the fuzz then breaks it). */
function validBody(op: Op, i: number, rng: Rng): Body {
  const requestMetadata_ = requestMetadata(op, i, rng);
  switch (op) {
    case "Encrypt":
      return {
        requestMetadata: requestMetadata_,
        plaintext: PT_B64,
        encryptionAlgorithm: "AES_GCM",
        ...(rng.chance(0.6) ? { additionalAuthenticatedData: AAD_B64 } : {}),
        ...(rng.chance(0.3) ? { ciphertextDataIntegrityValueAlgorithm: "SHA_256" } : {}),
      };
    case "Decrypt":
      return {
        requestMetadata: requestMetadata_,
        ciphertext: REAL.ciphertext,
        encryptionAlgorithm: "AES_GCM",
        initializationVector: REAL.initializationVector,
        authenticationTag: REAL.authenticationTag,
        additionalAuthenticatedData: AAD_B64,
        ...(REAL.ciphertextMetadata ? { ciphertextMetadata: REAL.ciphertextMetadata } : {}),
      };
    default:
      return { requestMetadata: requestMetadata_ };
  }
}
function getField(body: Body, name: string): unknown {
  const [a, b] = name.split(".");
  if (b === undefined) return body[a];
  const o = body[a];
  return o && typeof o === "object" ? (o as Body)[b] : undefined;
}
function setField(body: Body, name: string, v: unknown): void {
  const [a, b] = name.split(".");
  if (b === undefined) {
    if (v === undefined) delete body[a];
    else body[a] = v;
    return;
  }
  const o = { ...(body[a] as Body) };
  if (v === undefined) delete o[b];
  else o[b] = v;
  body[a] = o;
}

/** Independent check of "canonical standard Base64" (RFC 4648 §4, padded, no whitespace, zero trailing bits). */
function canonicalB64(s: string): boolean {
  return s.length % 4 === 0 && /^[A-Za-z0-9+/]*={0,2}$/.test(s) && Buffer.from(s, "base64").toString("base64") === s;
}

export type Category =
  | "json-malformed"
  | "wrong-type"
  | "missing-field"
  | "base64"
  | "oversized"
  | "dup-keys"
  | "deep-nesting"
  | "unicode"
  | "headers"
  | "content-type"
  | "bad-path"
  | "bad-method"
  | "over-cap"
  | "bad-auth"
  | "agent"
  | "raw";
export const WEIGHTS: [Category, number][] = [
  ["json-malformed", 8],
  ["wrong-type", 13],
  ["missing-field", 6],
  ["base64", 11],
  ["oversized", 8],
  ["dup-keys", 4],
  ["deep-nesting", 3],
  ["unicode", 4],
  ["headers", 8],
  ["content-type", 5],
  ["bad-path", 9],
  ["bad-method", 6],
  ["over-cap", 3],
  ["bad-auth", 8],
  ["agent", 4],
];
const WEIGHT_SUM = WEIGHTS.reduce((s, [, w]) => s + w, 0);
function pickCategory(rng: Rng): Category {
  let x = rng.next() * WEIGHT_SUM;
  for (const [c, w] of WEIGHTS) {
    x -= w;
    if (x < 0) return c;
  }
  return WEIGHTS[0][0];
}

export type SignMode =
  | "ok"
  | "rawpath"
  | "none"
  | "wrong-secret"
  | "other-store"
  | "wrong-region"
  | "wrong-service"
  | "stale"
  | "future"
  | "body-tampered"
  | "path-tampered"
  | "host-tampered"
  | "garbage"
  | "sig-upper"
  | "sig-flip"
  | "no-signature"
  | "no-host-signed"
  | "extra-field"
  | "no-date"
  | "bad-date"
  | "dup-date"
  | "dup-auth"
  | "bearer"
  | "akid-lower";
const BAD_SIGNS: SignMode[] = [
  "wrong-secret",
  "other-store",
  "wrong-region",
  "wrong-service",
  "stale",
  "future",
  "body-tampered",
  "path-tampered",
  "host-tampered",
  "garbage",
  "sig-upper",
  "sig-flip",
  "no-signature",
  "no-host-signed",
  "extra-field",
  "no-date",
  "bad-date",
  "dup-date",
  "dup-auth",
  "bearer",
  "akid-lower",
];

/** What the fuzz generator decides; finalize() signs it and computes the expected outcome. */
interface Draft {
  cat: Category;
  what: string;
  method: string;
  path: string;
  op: Op;
  body: Buffer;
  contentType: string | null;
  sign: SignMode;
  /** Signed along (before signing). */
  signedHeaders: [string, string][];
  /** Added after signing (never signed). */
  extraHeaders: [string, string][];
  /** Chunked transfer encoding instead of Content-Length. */
  chunked: boolean;
  /** Outcome once past route/method/cap/SigV4 (validation, allow-list, agent). */
  bodyOutcome: Outcome[];
  /** The whole request may be valid (e.g. duplicate keys whose last value is valid). */
  mayPass?: boolean;
  /** Overrides the computed expectation (e.g. header overflow is decided by Node's parser). */
  outcome?: Outcome[];
  /** Node's HTTP parser may refuse the request target outright (→ 400 whatever the signature). */
  parserMayRefuse?: boolean;
}

export interface FuzzCase {
  i: number;
  cat: Category;
  what: string;
  method: string;
  path: string;
  headers: string[];
  chunks: Buffer[];
  expect: Set<Outcome>;
  signature?: string;
  sign: SignMode;
}

// ---------------------------------------------------------------- signing

/** Signs with @smithy/signature-v4; returns the headers it would send, in a stable order. */
async function smithyHeaders(
  hostHeader: string,
  method: string,
  target: string,
  headers: [string, string][],
  body: Buffer,
  o: { creds: Creds; region?: string; service?: string; date?: Date; rawPath?: boolean },
): Promise<[string, string][]> {
  const q = target.indexOf("?");
  const path = q < 0 ? target : target.slice(0, q);
  const query: Record<string, string | string[]> = {};
  if (q >= 0) {
    for (const [k, v] of new URLSearchParams(target.slice(q + 1))) {
      const had = query[k];
      query[k] = had === undefined ? v : [...(Array.isArray(had) ? had : [had]), v];
    }
  }
  const hdrs: Record<string, string> = { host: hostHeader };
  for (const [k, v] of headers) hdrs[k] = v;
  const hr = new HttpRequest({ method, protocol: "http:", hostname: "127.0.0.1", path, query, headers: hdrs, body });
  const s = signerFor({ ...o.creds, region: o.region ?? "us-east-1", service: o.service ?? "kms-xks-proxy", rawPath: o.rawPath ?? false });
  const signed = await s.sign(hr, { signingDate: o.date ?? new Date() });
  const h = signed.headers as Record<string, string>;
  const order = ["host", "x-amz-date", "authorization"];
  const out: [string, string][] = order.filter((k) => h[k] !== undefined).map((k) => [k, h[k]]);
  for (const [k, v] of Object.entries(h)) if (!order.includes(k)) out.push([k, v]);
  return out;
}

const setHeader = (h: [string, string][], name: string, v: string | undefined): [string, string][] => {
  const out = h.filter(([k]) => k.toLowerCase() !== name);
  if (v !== undefined) out.push([name, v]);
  return out;
};
const getHeader = (h: [string, string][], name: string) => h.find(([k]) => k.toLowerCase() === name)?.[1];

export async function finalize(i: number, d: Draft, host: string): Promise<FuzzCase> {
  const rng = new Rng(mix32(SEED ^ mix32(i ^ 0xabcdef)));
  const route = resolveRoute(d.path);
  const storeCreds = route ? STORES[route.prefix].creds[0] : CREDS.a;
  const pre: [string, string][] = [];
  if (d.contentType !== null) pre.push(["content-type", d.contentType]);
  pre.push(...d.signedHeaders);
  let headers: [string, string][];
  let body = d.body;
  let authOk = false;
  const now = new Date();
  const sign = (o: Partial<Parameters<typeof smithyHeaders>[5]> = {}, path = d.path, h = pre, b = body) =>
    smithyHeaders(host, d.method, path, h, b, { creds: storeCreds, rawPath: true, ...o });
  switch (d.sign) {
    case "ok":
      headers = await sign({ rawPath: false });
      // smithy normalises "." / ".." / "//" and URI-encodes anything outside the unreserved set:
      // the path it signs is then not the path sent (→ 401), unless the path is plain.
      authOk = /^[A-Za-z0-9\-._~/]*$/.test(d.path.split("?")[0]) && !/(^|\/)\.\.?(\/|$)|\/\//.test(d.path.split("?")[0]);
      break;
    case "rawpath":
      headers = await sign();
      authOk = true;
      break;
    case "none":
      headers = [["host", host], ...pre];
      break;
    case "wrong-secret":
      headers = await sign({ creds: { accessKeyId: storeCreds.accessKeyId, secretAccessKey: CREDS.b.secretAccessKey.replace(/.$/, "Q") } });
      break;
    case "other-store":
      headers = await sign({ creds: route?.prefix === OTHER_PREFIX ? CREDS.a : CREDS.other });
      break;
    case "wrong-region":
      headers = await sign({ region: rng.pick(["us-west-2", "eu-west-1", "", "US-EAST-1", "us-east-1 "]) });
      break;
    case "wrong-service":
      headers = await sign({ service: rng.pick(["kms", "execute-api", "kms-xks", "KMS-XKS-PROXY", "s3"]) });
      break;
    case "stale":
      headers = await sign({ date: new Date(now.getTime() - rng.int(301, 86_400) * 1000) });
      break;
    case "future":
      headers = await sign({ date: new Date(now.getTime() + rng.int(301, 86_400) * 1000) });
      break;
    case "body-tampered": {
      headers = await sign();
      const b = Buffer.from(body);
      if (b.length === 0) body = Buffer.from(" ");
      else {
        b[rng.int(0, b.length - 1)] ^= 1 << rng.int(0, 6);
        body = b;
      }
      break;
    }
    case "path-tampered": {
      const other = d.path.includes("/encrypt") ? d.path.replace("/encrypt", "/decrypt") : `${d.path}x`;
      headers = await sign({}, other);
      break;
    }
    case "host-tampered":
      headers = setHeader(await sign(), "host", rng.pick(["127.0.0.1", "localhost:1", "evil.example", `${host}.`]));
      break;
    case "garbage":
      headers = setHeader(
        await sign(),
        "authorization",
        `${rng.pick(["AWS4-HMAC-SHA256 ", "", "Digest ", "AWS "])}${AUTHZ_MARKER}${rng.str(rng.int(0, 300), PRINTABLE)}`.trim() ||
          AUTHZ_MARKER,
      );
      break;
    case "sig-upper":
    case "sig-flip":
    case "no-signature":
    case "no-host-signed":
    case "extra-field":
    case "akid-lower": {
      headers = await sign();
      let a = getHeader(headers, "authorization")!;
      if (d.sign === "sig-upper")
        a = a.replace(/Signature=([0-9a-f]{64})/, (_m, s: string) => `Signature=${s.toUpperCase().replace(/^[0-9]/, "A")}`);
      if (d.sign === "sig-flip")
        a = a.replace(/Signature=([0-9a-f]{64})/, (_m, s: string) => `Signature=${s.slice(0, 63)}${s[63] === "0" ? "1" : "0"}`);
      if (d.sign === "no-signature") a = a.replace(/, ?Signature=[0-9a-f]{64}/, "");
      if (d.sign === "no-host-signed") a = a.replace(/SignedHeaders=[^,]*/, "SignedHeaders=x-amz-date");
      if (d.sign === "extra-field") a = `${a}, Foo=bar`;
      if (d.sign === "akid-lower") a = a.replace(/Credential=([A-Z2-7]+)/, (_m, k: string) => `Credential=${k.toLowerCase()}`);
      headers = setHeader(headers, "authorization", a);
      break;
    }
    case "no-date":
      headers = setHeader(await sign(), "x-amz-date", undefined);
      break;
    case "bad-date":
      headers = setHeader(
        await sign(),
        "x-amz-date",
        rng.pick(["2024-01-01T00:00:00Z", "yesterday", "", "20240101", "99999999T999999Z", "20260231T000000Z"]),
      );
      break;
    case "dup-date":
      headers = await sign();
      headers.push(["X-Amz-Date", getHeader(headers, "x-amz-date")!]);
      break;
    case "dup-auth":
      headers = await sign();
      headers.push(["Authorization", getHeader(headers, "authorization")!]);
      break;
    case "bearer":
      headers = setHeader(await sign(), "authorization", rng.pick([`Bearer ${AUTHZ_MARKER}`, `Basic ${b64(`${AUTHZ_MARKER}:x`)}`]));
      break;
  }
  headers.push(...d.extraHeaders);
  const chunks: Buffer[] = [];
  if (d.chunked) {
    headers.push(["transfer-encoding", "chunked"]);
    const n = body.length === 0 ? 0 : rng.int(1, Math.min(8, body.length));
    let at = 0;
    for (let k = 0; k < n; k++) {
      const end = k === n - 1 ? body.length : at + Math.floor(body.length / n);
      chunks.push(body.subarray(at, end));
      at = end;
    }
  } else {
    // Content-Length early, so that maxHeadersCount truncation never hides it.
    headers.splice(Math.min(3, headers.length), 0, ["content-length", String(body.length)]);
    if (body.length > 0) chunks.push(body);
  }

  const expect = expectedOutcomes({
    target: d.path,
    method: d.method,
    bodyBytes: body.length,
    // Node parses at most MAX_HEADERS_COUNT headers; later ones are not seen at all.
    contentEncodings: headers
      .slice(0, MAX_HEADERS_COUNT)
      .filter(([k]) => k.toLowerCase() === "content-encoding")
      .map(([, v]) => v.trim().toLowerCase()),
    signedByItsStore: authOk && route !== undefined && (route.prefix === OTHER_PREFIX) === (storeCreds === CREDS.other),
    bodyOutcome: d.bodyOutcome,
    override: d.outcome,
    mayPass: d.mayPass,
    parserMayRefuse: d.parserMayRefuse,
    agentCase: d.cat === "agent",
  });
  const flat: string[] = [];
  for (const [k, v] of headers) flat.push(k, v);
  const sig = /Signature=([0-9a-f]{64})/.exec(getHeader(headers, "authorization") ?? "")?.[1];
  return { i, cat: d.cat, what: d.what, method: d.method, path: d.path, headers: flat, chunks, expect, signature: sig, sign: d.sign };
}

// ---------------------------------------------------------------- the generator

const WRONG_VALUES: [string, unknown][] = [
  ["0", 0],
  ["-1", -1],
  ["1.5", 1.5],
  ["1e308", 1e308],
  ["-1e308", -1e308],
  ["2^53+1", new Raw("9007199254740993")],
  ["1e999", new Raw("1e999")],
  ["-1e999", new Raw("-1e999")],
  ["-0", new Raw("-0")],
  ["huge int", new Raw("9".repeat(400))],
  ["true", true],
  ["false", false],
  ["null", null],
  ["[]", []],
  ["[str]", ["AES_GCM"]],
  ["[[]]", [[]]],
  ["{}", {}],
  ["{a:1}", { a: 1 }],
  ["[1,2]", [1, 2]],
  ["nested", { requestMetadata: {} }],
];
const NAN_STRINGS = [
  "NaN",
  "-NaN",
  "Infinity",
  "-Infinity",
  "undefined",
  "null",
  "-0",
  "0x1F",
  "1e999",
  "-1",
  "",
  " ",
  "true",
  "AES-GCM",
  "aes_gcm",
  "SHA256",
  "sha_256",
];

/** A non-canonical Base64 variant of `good` (checked independently), with a label. */
function badBase64(rng: Rng, good: string): [string, string] {
  for (let tries = 0; tries < 20; tries++) {
    const v = rng.int(0, 13);
    let s: string;
    let label: string;
    switch (v) {
      case 0:
        s = good.replace(/=+$/, "");
        label = "unpadded";
        if (s === good) s = `${good}=`;
        break;
      case 1:
        s = `${good}=`;
        label = "extra padding";
        break;
      case 2: {
        const at = rng.int(0, good.length);
        s = `${good.slice(0, at)}${rng.pick([" ", "\n", "\t", "\r", "\r\n", "\u00a0", "\u2028"])}${good.slice(at)}`;
        label = "whitespace";
        break;
      }
      case 3: {
        // URL-safe alphabet: bytes that encode to + and /.
        const raw = Buffer.concat([Buffer.from([0xfb, 0xff, 0xbf]), rng.bytes(rng.int(0, 20))]);
        s = raw.toString("base64url");
        label = "url-safe";
        break;
      }
      case 4: {
        const core = good.replace(/=+$/, "");
        const pad = good.length - core.length;
        if (pad === 0) {
          s = `${good.slice(0, -1)}=`;
          label = "padding replaces data";
          break;
        }
        // Non-zero trailing bits: bump the last data character within its group.
        const last = core[core.length - 1];
        const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        const j = alphabet.indexOf(last);
        s = `${core.slice(0, -1)}${alphabet[(j + 1) % 64]}${"=".repeat(pad)}`;
        label = "non-zero trailing bits";
        break;
      }
      case 5:
        s = `${good}${good}`;
        label = "padding in the middle";
        if (!good.includes("=")) s = `${good.slice(0, 2)}==${good.slice(2)}`;
        break;
      case 6:
        s = `${good.slice(0, -1)}${rng.pick(["*", "%", "é", "-", "_", ".", "~", "\u0000", "€"])}`;
        label = "foreign character";
        break;
      case 7:
        s = good.slice(0, rng.int(1, Math.max(1, good.length - 1)));
        label = "truncated";
        break;
      case 8:
        s = `data:application/octet-stream;base64,${good}`;
        label = "data URI";
        break;
      case 9:
        s = Buffer.from(good, "base64").toString("hex");
        label = "hex instead";
        break;
      case 10:
        s = `===${good}`;
        label = "leading padding";
        break;
      case 11:
        s = `${good}\n`;
        label = "trailing newline";
        break;
      case 12:
        s = good.toLowerCase() === good ? `${good}A` : good.toLowerCase();
        label = "lower-cased";
        break;
      default:
        s = rng.pick(NAN_STRINGS);
        label = "NaN-like string";
    }
    if (!canonicalB64(s)) return [s, label];
  }
  return [`${good}==`, "double padding"];
}

function draft(
  cat: Category,
  what: string,
  op: Op,
  body: Body | string | Buffer,
  bodyOutcome: Outcome[],
  over: Partial<Draft> = {},
): Draft {
  const text = Buffer.isBuffer(body) ? body : Buffer.from(typeof body === "string" ? body : ser(body));
  return {
    cat,
    what,
    op,
    method: "POST",
    path: opPath(PREFIX, op),
    body: text,
    contentType: "application/json",
    sign: "ok",
    signedHeaders: [],
    extraHeaders: [],
    chunked: false,
    bodyOutcome,
    ...over,
  };
}

/** A signed Encrypt with an empty JSON object, for warming up (400 ValidationException). */
export function draftWarmUp(): Draft {
  return draft("missing-field", "warm-up", "Encrypt", "{}", [V400]);
}

/** Signed-ness for body categories: mostly correctly signed, some not. */
function bodySign(rng: Rng): SignMode {
  const x = rng.next();
  if (x < 0.9) return "ok";
  if (x < 0.95) return "none";
  return rng.pick(BAD_SIGNS);
}

const OPS: Op[] = ["Encrypt", "Decrypt", "GetKeyMetadata", "GetHealthStatus"];
const CONTENT_TYPES_BAD = [
  "text/plain",
  "application/x-www-form-urlencoded",
  "multipart/form-data; boundary=x",
  "application/jsonx",
  "application/json; charset=latin1",
  "application/json; charset=utf-16",
  "application/json;charset=iso-8859-1",
  "json",
  "",
  " ",
  "*/*",
  "application/*",
  "application/json, text/plain",
  "application/json\tx",
  "application/problem+json",
  "application/vnd.api+json",
  "application/x-amz-json-1.1",
  "text/json",
  "application/octet-stream",
  "text/html",
  "application/xml",
  "application/json; charset=",
  'application/json; charset="latin1"',
  ";",
  "application/ json",
];
const RANDOM_HEADER_NAMES = [
  "accept",
  "accept-encoding",
  "accept-language",
  "cookie",
  "user-agent",
  "referer",
  "x-forwarded-for",
  "x-forwarded-proto",
  "x-real-ip",
  "via",
  "forwarded",
  "origin",
  "cache-control",
  "pragma",
  "dnt",
  "expect",
  "upgrade",
  "x-amz-content-sha256",
  "x-amz-security-token",
  "x-authorization",
  "x-amzn-trace-id",
  "x-http-method-override",
  "x-original-url",
  "x-rewrite-url",
  "if-none-match",
  "range",
  "te",
  "content-encoding",
  "content-language",
];

export function generate(i: number): Draft {
  const rng = caseRng(i);
  const cat = pickCategory(rng);
  const op = rng.pick(OPS);
  const body = validBody(op, i, rng);
  const fields = fieldsOf(op);
  switch (cat) {
    case "json-malformed": {
      const text = ser(body);
      const v = rng.int(0, 7);
      if (v === 0) {
        const at = rng.int(0, text.length - 1);
        return draft(cat, `truncated at ${at}/${text.length}`, op, text.slice(0, at), [V400], { sign: bodySign(rng) });
      }
      if (v === 1) {
        const positions = structuralPositions(text);
        const at = rng.pick(positions);
        return draft(cat, `structural ${JSON.stringify(text[at])} removed at ${at}`, op, text.slice(0, at) + text.slice(at + 1), [V400], {
          sign: bodySign(rng),
        });
      }
      if (v === 2) {
        const junk = rng.pick(["}", "x", "{}", ",", "]", "//c", "/* c */", "\u0000", "null", '"', '{"a":1}']);
        return draft(cat, `trailing ${JSON.stringify(junk)}`, op, text + junk, [V400], { sign: bodySign(rng) });
      }
      if (v === 3) {
        const alt = rng.pick([
          text.replace(/"/g, "'"),
          text.replace(/}$/, ",}"),
          `{requestMetadata:${ser(body.requestMetadata)}}`,
          text.replace(/:/, ': NaN,"x":'),
          text.replace(/^\{/, '{"c": undefined, '),
          text.replace(/"([^"]*)"/, "`$1`"),
          `\u0000${text}`,
          text.replace(/,/, ",,"),
        ]);
        return draft(cat, "JSON5/JS-isms", op, alt, [V400], { sign: bodySign(rng) });
      }
      if (v === 4) {
        const root = rng.pick(["[]", '"str"', "1", "null", "true", "[{}]", `[${text}]`, '"{}"', "  ", "\n"]);
        return draft(cat, `root ${JSON.stringify(root.slice(0, 20))}`, op, root, [V400], { sign: bodySign(rng) });
      }
      if (v === 5) {
        // Invalid UTF-8 inside a string value.
        const b = Buffer.from(text);
        const at = text.indexOf("fuzz-");
        const bad = rng.pick([[0xff], [0xc3], [0xed, 0xa0, 0x80], [0xf8, 0x88, 0x80, 0x80, 0x80], [0xc0, 0xaf], [0xe2, 0x82]]);
        return draft(
          cat,
          `invalid UTF-8 ${bad.map((x) => x.toString(16)).join(" ")}`,
          op,
          Buffer.concat([b.subarray(0, at), Buffer.from(bad), b.subarray(at)]),
          [V400],
          { sign: bodySign(rng) },
        );
      }
      if (v === 6) {
        const ctl = String.fromCharCode(rng.int(0, 31));
        return draft(cat, `raw control char ${ctl.charCodeAt(0)} in a string`, op, text.replace("fuzz-", `fuzz-${ctl}`), [V400], {
          sign: bodySign(rng),
        });
      }
      return draft(cat, "empty body", op, "", [V400], { sign: bodySign(rng) });
    }

    case "wrong-type": {
      const f = rng.pick(fields);
      let label: string;
      let v: unknown;
      if ((f.kind === "enum" || f.kind === "b64") && rng.chance(0.35)) {
        const s = rng.pick(NAN_STRINGS.filter((x) => x !== f.value && !(f.kind === "b64" && canonicalB64(x))));
        [label, v] = [`string ${JSON.stringify(s)}`, s];
      } else {
        [label, v] = rng.pick(WRONG_VALUES.filter(([l]) => !(f.kind === "object" && (l === "{}" || l === "{a:1}" || l === "nested"))));
      }
      setField(body, f.name, v);
      return draft(cat, `${f.name} = ${label}`, op, body, [V400], { sign: bodySign(rng) });
    }

    case "missing-field": {
      const req = fields.filter((f) => f.required);
      const f = rng.pick(req);
      const empty = f.kind !== "object" && rng.chance(0.35);
      setField(body, f.name, empty ? "" : undefined);
      if (f.kind === "object" && rng.chance(0.3)) body.requestMetadata = {};
      return draft(cat, `${f.name} ${empty ? "empty" : "missing"}`, op, body, [V400], { sign: bodySign(rng) });
    }

    case "base64": {
      const o: Op = rng.pick(["Encrypt", "Decrypt"]);
      const bd = validBody(o, i, rng);
      const b64f = fieldsOf(o).filter((f) => f.kind === "b64");
      const f = rng.pick(b64f);
      const good = (getField(bd, f.name) as string | undefined) ?? AAD_B64;
      const [s, label] = badBase64(rng, good);
      setField(bd, f.name, s);
      return draft(cat, `${f.name}: ${label} ${JSON.stringify(s.slice(0, 40))}`, o, bd, [V400], { sign: bodySign(rng) });
    }

    case "oversized": {
      const v = rng.int(0, 6);
      const marker = (n: number) => Buffer.alloc(n, PT_MARKER);
      if (v === 0) {
        const n = rng.chance(0.5) ? MAX_PT + rng.int(1, 64) : rng.int(MAX_PT + 1, 60_000);
        const bd = validBody("Encrypt", i, rng);
        bd.plaintext = b64(marker(n));
        return draft(cat, `plaintext ${n} bytes`, "Encrypt", bd, [U501], { sign: bodySign(rng) });
      }
      if (v === 1) {
        const n = rng.chance(0.5) ? MAX_AAD + rng.int(1, 64) : rng.int(MAX_AAD + 1, 45_000);
        const o: Op = rng.pick(["Encrypt", "Decrypt"]);
        const bd = validBody(o, i, rng);
        bd.additionalAuthenticatedData = b64(Buffer.alloc(n, AAD_MARKER));
        return draft(cat, `AAD ${n} bytes (${o})`, o, bd, [U501], { sign: bodySign(rng) });
      }
      if (v === 2) {
        const n = rng.chance(0.5) ? MAX_PT + rng.int(1, 64) : rng.int(MAX_PT + 1, 45_000);
        const bd = validBody("Decrypt", i, rng);
        bd.ciphertext = b64(rng.bytes(n));
        return draft(cat, `ciphertext ${n} bytes`, "Decrypt", bd, [U501], { sign: bodySign(rng) });
      }
      if (v === 3) {
        const n = rng.chance(0.6) ? 21 : rng.int(22, 2000);
        const bd = validBody("Decrypt", i, rng);
        bd.ciphertextMetadata = b64(rng.bytes(n));
        return draft(cat, `ciphertextMetadata ${n} bytes`, "Decrypt", bd, [V400], { sign: bodySign(rng) });
      }
      if (v === 4) {
        const n = rng.pick([0, 1, 8, 11, 13, 15, 17, 24, 32, 64, 4096]);
        const bd = validBody("Decrypt", i, rng);
        bd.initializationVector = b64(rng.bytes(n));
        return draft(cat, `IV ${n} bytes`, "Decrypt", bd, [V400], { sign: bodySign(rng) });
      }
      if (v === 5) {
        const n = rng.pick([0, 1, 8, 12, 15, 17, 24, 32, 4096]);
        const bd = validBody("Decrypt", i, rng);
        bd.authenticationTag = b64(rng.bytes(n));
        return draft(cat, `tag ${n} bytes`, "Decrypt", bd, [V400], { sign: bodySign(rng) });
      }
      // An empty plaintext / ciphertext (below the minimum).
      const o: Op = rng.pick(["Encrypt", "Decrypt"]);
      const bd = validBody(o, i, rng);
      setField(bd, o === "Encrypt" ? "plaintext" : "ciphertext", "");
      return draft(cat, `empty ${o === "Encrypt" ? "plaintext" : "ciphertext"}`, o, bd, [V400], { sign: bodySign(rng) });
    }

    case "dup-keys": {
      const f = rng.pick(fields.filter((x) => !x.name.includes(".")));
      const good = body[f.name] ?? (f.kind === "enum" ? f.value : f.kind === "b64" ? AAD_B64 : {});
      const bad = f.kind === "object" ? rng.pick([{}, [], "x", null]) : rng.pick([5, null, [], {}, "!!", "AES_CBC"]);
      const lastGood = rng.chance(0.2);
      const entries: [string, unknown][] = Object.entries(body).filter(([k]) => k !== f.name);
      const at = rng.int(0, entries.length);
      entries.splice(at, 0, [f.name, lastGood ? bad : good]);
      entries.push([f.name, lastGood ? good : bad]);
      // Last value wins in JSON.parse: a valid last value makes a valid request (accepted or rejected, never a 500).
      return draft(
        cat,
        `duplicate "${f.name}" (last ${lastGood ? "valid" : "invalid"})`,
        op,
        ser(new Members(entries)),
        lastGood ? [V400, ...agentOutcomes(op)] : [V400],
        {
          sign: bodySign(rng),
          mayPass: lastGood,
        },
      );
    }

    case "deep-nesting": {
      const depth = rng.chance(0.5) ? rng.int(10, 2000) : rng.int(2000, 40_000);
      const arr = () => new Raw(`${"[".repeat(depth)}${"]".repeat(depth)}`);
      const obj = () => new Raw(`${'{"a":'.repeat(depth)}1${"}".repeat(depth)}`);
      const v = rng.int(0, 4);
      let text: string;
      let where: string;
      if (v === 0) {
        const f = rng.pick(fields.filter((x) => x.kind !== "object"));
        setField(body, f.name, rng.chance(0.5) ? arr() : obj());
        [text, where] = [ser(body), f.name];
      } else if (v === 1) {
        body.requestMetadata = rng.chance(0.5) ? arr() : obj();
        [text, where] = [ser(body), "requestMetadata"];
      } else if (v === 2) {
        [text, where] = [rng.chance(0.5) ? arr().text : obj().text, "root"];
      } else if (v === 3) {
        // Deep unknown member (ignored), but a required field is missing.
        const f = rng.pick(fields.filter((x) => x.required && x.kind !== "object"));
        setField(body, f.name, undefined);
        body.someFutureField = obj();
        [text, where] = [ser(body), `unknown member (and ${f.name} missing)`];
      } else {
        [text, where] = [`${"[".repeat(depth)}`, "unterminated"];
      }
      return draft(cat, `depth ${depth} at ${where}`, op, text, [V400], { sign: bodySign(rng) });
    }

    case "unicode": {
      const v = rng.int(0, 3);
      const uni = rng.pick(["✓", "ü", "💥", "\u202e", "e\u0301", "ﬁ", "\u0000", "\ud800", "\udfff", "日本語", "\uffff", "Ω≈ç√"]);
      if (v === 0) {
        // Percent-encoded unicode key id: routed, signed over the raw path, not in the allow-list.
        const key = pctEncode(`k${uni}${rng.str(rng.int(0, 8), ALNUM)}`);
        const o: Op = rng.pick(["Encrypt", "Decrypt", "GetKeyMetadata"]);
        return draft(cat, `key id ${key}`, o, validBody(o, i, rng), [K404], {
          path: opPath(PREFIX, o, key),
          sign: rng.chance(0.85) ? "rawpath" : "none",
        });
      }
      if (v === 1) {
        // Raw UTF-8 bytes in the request target (written as a latin1 "binary" string): Node's parser refuses them, or the key is unknown.
        const key = Buffer.from(`k${uni}`, "utf8").toString("latin1");
        if (/[^\u0021-\u00ff]/.test(key))
          return draft(cat, "key id with NUL (encoded)", "Encrypt", validBody("Encrypt", i, rng), [K404], {
            path: opPath(PREFIX, "Encrypt", "k%00"),
            sign: "rawpath",
          });
        return draft(cat, `raw UTF-8 key id ${JSON.stringify(uni)}`, "Encrypt", validBody("Encrypt", i, rng), [K404], {
          path: opPath(PREFIX, "Encrypt", key),
          sign: "rawpath",
          parserMayRefuse: true,
        });
      }
      // Unicode in metadata strings / Base64 fields, plus one real defect.
      const mdField = rng.pick(["awsPrincipalArn", "kmsRequestId", "kmsOperation", "kmsViaService"]);
      setField(body, `requestMetadata.${mdField}`, `${uni}${rng.str(3, ALNUM)}${uni}`);
      if (v === 2) {
        const f = rng.pick(fields.filter((x) => x.kind === "b64" || x.kind === "enum"));
        if (f) {
          setField(body, f.name, `${getField(body, f.name) ?? "QUJD"}${uni}`);
          return draft(cat, `unicode in md.${mdField} and ${f.name}`, op, body, [V400], { sign: bodySign(rng) });
        }
      }
      const req = rng.pick(fields.filter((x) => x.required && x.kind !== "object" && x.name !== `requestMetadata.${mdField}`));
      setField(body, req.name, undefined);
      return draft(cat, `unicode in md.${mdField}, ${req.name} missing`, op, body, [V400], { sign: bodySign(rng) });
    }

    case "headers": {
      // A body defect, so that the answer is an error whatever the headers do.
      const f = rng.pick(fields.filter((x) => x.required));
      setField(body, f.name, rng.pick([5, null, []]));
      const v = rng.int(0, 6);
      const extra: [string, string][] = [];
      const value = () => rng.str(rng.int(0, 60), PRINTABLE).trim() + (rng.chance(0.1) ? Buffer.from("ü", "utf8").toString("latin1") : "");
      if (v <= 2) {
        const n = v === 2 ? rng.int(101, 140) : rng.int(1, 30);
        for (let k = 0; k < n; k++) {
          const name = rng.chance(0.5) ? rng.pick(RANDOM_HEADER_NAMES) : `x-${rng.str(rng.int(1, 20), TOKEN_CHARS)}`;
          let val = value();
          if (name === "content-encoding") val = rng.pick(["identity", "gzip", "deflate", "br", "x-foo", "gzip, identity"]);
          if (name === "te") val = "trailers";
          extra.push([name, val]);
        }
        return draft(cat, `${n} random headers (+ ${f.name} wrong type)`, op, body, [V400], { sign: bodySign(rng), extraHeaders: extra });
      }
      if (v === 3) {
        // Duplicates of headers that SigV4 covers (or of the Authorization itself) → 401.
        const which = rng.pick(["authorization", "x-amz-date", "host", "content-type"]);
        return draft(cat, `duplicated ${which}`, op, body, [A401], dupHeader(which));
      }
      if (v === 4) {
        // Duplicated Content-Length / conflicting framing: Node's parser refuses → 400.
        return draft(cat, "duplicated content-length", op, body, [V400], {
          sign: bodySign(rng),
          outcome: [V400],
          extraHeaders: [["Content-Length", String(ser(body).length)]],
        });
      }
      if (v === 5) {
        // A head over Node's 16 KiB limit → 400 (HPE_HEADER_OVERFLOW), as XKS JSON.
        const n = rng.int(MAX_HEADER_BYTES + 4096, 40_000);
        return draft(cat, `${n}-byte header value`, op, body, [V400], {
          sign: bodySign(rng),
          outcome: [V400],
          extraHeaders: [[`x-${rng.str(8, ALNUM)}`, "h".repeat(n)]],
        });
      }
      // Signed odd headers (covered by the signature, so allowed), with the body defect.
      const signed: [string, string][] = [];
      for (let k = 0, n = rng.int(1, 10); k < n; k++)
        signed.push([`x-amz-meta-${rng.str(rng.int(1, 12), ALNUM).toLowerCase()}`, rng.str(rng.int(0, 200), PRINTABLE).trim()]);
      return draft(cat, `${signed.length} signed x-amz-meta headers (+ ${f.name} wrong type)`, op, body, [V400], {
        sign: "ok",
        signedHeaders: signed,
      });
    }

    case "content-type": {
      const v = rng.next();
      if (v < 0.1) return draft(cat, "no content-type", op, body, [V400], { contentType: null, sign: rng.chance(0.9) ? "ok" : "none" });
      const ct = v < 0.8 ? rng.pick(CONTENT_TYPES_BAD) : `${rng.str(rng.int(1, 12), TOKEN_CHARS)}/${rng.str(rng.int(1, 12), TOKEN_CHARS)}`;
      if (ct.trim().toLowerCase() === "application/json") return draft(cat, "content-type case", op, "[]", [V400], { contentType: ct });
      return draft(cat, `content-type ${JSON.stringify(ct)}`, op, body, [V400], { contentType: ct, sign: rng.chance(0.9) ? "ok" : "none" });
    }

    case "bad-path":
      return badPath(i, rng, op, body);

    case "bad-method": {
      const method = rng.pick(["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "PROPFIND"]);
      const goodRoute = rng.chance(0.75);
      const path = goodRoute
        ? opPath(rng.pick([PREFIX, OTHER_PREFIX]), op)
        : rng.pick(["/", "/kms/xks/v1/health", `${PREFIX}/kms/xks/v1`, `${API}/keys/foo`, `/${rng.str(10, ALNUM)}`]);
      const withBody = method !== "HEAD" && method !== "TRACE" && rng.chance(0.5);
      return draft(cat, `${method} ${goodRoute ? "API URI" : "other path"}`, op, withBody ? ser(body) : "", [M405], {
        method,
        path,
        sign: rng.pick(["ok", "none", "rawpath", "garbage"] as SignMode[]),
        contentType: withBody ? "application/json" : null,
      });
    }

    case "over-cap": {
      const n = rng.int(CAP + 1, rng.chance(0.7) ? CAP + 4096 : 200_000);
      const pad = "A".repeat(Math.max(0, n - ser(body).length));
      const text = ser({ ...body, pad }).slice(0, n);
      const goodRoute = rng.chance(0.85);
      const chunked = rng.chance(0.35);
      return draft(cat, `${text.length}-byte body${chunked ? " (chunked)" : ""}${goodRoute ? "" : " on a bad path"}`, op, text, [U501], {
        chunked,
        sign: rng.pick(["ok", "ok", "none", "garbage"] as SignMode[]),
        path: goodRoute ? opPath(PREFIX, op) : `/nope/${rng.str(6, ALNUM)}`,
      });
    }

    case "bad-auth": {
      const sign = rng.chance(0.3) ? "none" : rng.pick(BAD_SIGNS);
      const prefix = rng.chance(0.85) ? PREFIX : OTHER_PREFIX;
      return draft(cat, `auth: ${sign}${prefix === OTHER_PREFIX ? " (second store)" : ""}`, op, body, [A401], {
        sign,
        path: opPath(prefix, op),
      });
    }

    case "agent":
      return agentCase(i, rng);
    default:
      throw new Error(`no generator for ${cat}`);
  }
}

function dupHeader(which: string): Partial<Draft> {
  // The duplicate is added after signing by finalize() ("dup-auth" / "dup-date"), or here for host / content-type.
  if (which === "authorization") return { sign: "dup-auth" };
  if (which === "x-amz-date") return { sign: "dup-date" };
  if (which === "host") return { extraHeaders: [["Host", "127.0.0.1"]] };
  return { extraHeaders: [["Content-Type", "application/json"]] };
}

function badPath(i: number, rng: Rng, op: Op, body: Body): Draft {
  const cat: Category = "bad-path";
  const sign: SignMode = rng.pick(["rawpath", "rawpath", "rawpath", "ok", "none"]);
  const seg = OP_SEGMENT[op as "Encrypt"] ?? "encrypt";
  const o: Op = op === "GetHealthStatus" ? "Encrypt" : op;
  const b = op === "GetHealthStatus" ? validBody("Encrypt", i, rng) : body;
  const v = rng.int(0, 10);
  // Each alternative: [label, path, outcome when signed and past SigV4]
  const alternatives: Array<[string, string, Outcome[]]> = [];
  switch (v) {
    case 0: {
      const prefix = rng.pick([
        "",
        "/example",
        "/example/uri/path/prefi",
        `${PREFIX}x`,
        PREFIX.toUpperCase(),
        `${PREFIX}/`,
        `/${PREFIX}`,
        `${PREFIX}//`,
        `/${rng.str(rng.int(1, 30), ALNUM)}`,
        `/${rng.str(rng.int(1, 10), ALNUM)}/${rng.str(rng.int(1, 10), ALNUM)}`,
        "/tenant-two",
        "/tenant-two/xks/",
      ]);
      alternatives.push([`unknown prefix ${JSON.stringify(prefix)}`, `${prefix}/kms/xks/v1/keys/foo/${seg}`, [P404]]);
      break;
    }
    case 1:
      alternatives.push([
        "bad API path",
        rng.pick([
          `${API}/keys/foo/${seg.toUpperCase()}`,
          `${API}/keys/foo/${seg}/`,
          `${API}/keys//${seg}`,
          `${API}/keys/foo/bar/${seg}`,
          `${PREFIX}/kms/xks/v2/keys/foo/${seg}`,
          `${PREFIX}/kms/xks/v1/key/foo/${seg}`,
          `${API}/keys/foo`,
          `${API}/keys/foo/sign`,
          `${API}/health/`,
          `${API}/Health`,
          `${API}/`,
          `${API}`,
          `${PREFIX}/kms/xks`,
          "/",
          "/ping/../kms/xks/v1/health",
          `${API}/keys/foo/${seg}#frag`,
          `${API}/keys/foo/${seg};x`,
          "*",
        ]),
        [P404],
      ]);
      break;
    case 2:
      // Dot segments: the raw path is routed as sent (no normalisation).
      alternatives.push([
        "dot segments",
        rng.pick([
          `${API}/../v1/keys/foo/${seg}`,
          `${PREFIX}/./kms/xks/v1/keys/foo/${seg}`,
          `${PREFIX}/../${PREFIX.slice(1)}/kms/xks/v1/health`,
          `/../..${API}/health`,
        ]),
        [P404],
      ]);
      break;
    case 3:
      alternatives.push(["dot-segment key id", `${API}/keys/${rng.pick(["..", ".", "...", "..%2f"])}/${seg}`, [K404]]);
      break;
    case 4: {
      const p = rng.pick([
        [`/${PREFIX.slice(1).replace(/\//g, "%2F")}/kms/xks/v1/keys/foo/${seg}`, P404],
        [`${PREFIX}%2Fkms%2Fxks%2Fv1%2Fkeys%2Ffoo%2F${seg}`, P404],
        [`${API}/keys/foo%2F..%2Fbar/${seg}`, K404],
        [`${API}/keys/foo%2F${seg}/${seg}`, K404],
        [`${API}/keys/%66%6f%6f/${seg}`, K404],
        [`${API}/keys/foo%00/${seg}`, K404],
        [`${API}/keys/foo%252F/${seg}`, K404],
        [`${PREFIX}/kms/xks/v1/keys%2Ffoo/${seg}`, P404],
        [`${API}%2Fhealth`, P404],
        [`${PREFIX}/%6bms/xks/v1/health`, P404],
      ] as const);
      alternatives.push(["encoded", p[0], [p[1]]]);
      break;
    }
    case 5: {
      const n = rng.chance(0.8) ? rng.int(300, 12_000) : rng.int(MAX_HEADER_BYTES + 1000, 30_000);
      const path = `/${"p".repeat(n)}/kms/xks/v1/keys/foo/${seg}`;
      return draft(cat, `${n}-char prefix`, o, b, [P404], { path, sign, outcome: n > MAX_HEADER_BYTES ? [V400] : undefined });
    }
    case 6: {
      const n = rng.int(129, 8000);
      // Longer than the spec's 128 characters: invalid input, never cut to 128 and looked up.
      alternatives.push([`${n}-char key id`, `${API}/keys/${rng.str(n, `${ALNUM}-_.`)}/${seg}`, [V400]]);
      break;
    }
    case 7: {
      // Characters outside [A-Za-z0-9-_.] in the key id; Node's parser may refuse some of them.
      const ch = rng.pick([..."!$&'()*+,;=:@~", ...'"<>\\^`{|}', "%20", "%0A", "%FF", "%E2%80%AE"]);
      return draft(cat, `key id with ${JSON.stringify(ch)}`, o, b, [K404], {
        path: `${API}/keys/fo${ch}o/${seg}`,
        sign,
        parserMayRefuse: true,
      });
    }
    case 8: {
      // A query string on a real route + a body defect (the answer is the defect's).
      const q = rng.pick(["a=1", "x", "a=1&a=2", "Action=Encrypt", "%20=%20", "=", "&&", "a=%E2%9C%93"]);
      setField(b, "requestMetadata", rng.pick([5, null, []]));
      alternatives.push([`query ?${q} (+ requestMetadata wrong type)`, `${API}/keys/foo/${seg}?${q}`, [V400]]);
      break;
    }
    case 9:
      // An undecodable query: SigV4's canonical query cannot be built → 401 whatever the signature.
      alternatives.push(["malformed query", `${API}/keys/foo/${seg}?${rng.pick(["%zz", "a=%", "%E2%9C", "a=%GG"])}`, [A401]]);
      break;
    default:
      alternatives.push([
        "key not in the allow-list",
        `${API}/keys/${rng.pick(["xks-health", "FOO", "foo ", "bar", `k-${rng.str(12, ALNUM)}`]).replace(" ", "%20")}/${seg}`,
        [K404],
      ]);
  }
  const [label, path, outcome] = alternatives[0];
  return draft(cat, label, o, b, outcome, { path, sign });
}

/** Valid-looking requests that reach the REAL agent on SoftHSM and fail there. */
function agentCase(i: number, rng: Rng): Draft {
  const cat: Category = "agent";
  const v = rng.int(0, 5);
  const IC = E("InvalidCiphertextException");
  const IKU = E("InvalidKeyUsageException");
  if (v <= 1) {
    const bd = validBody("Decrypt", i, rng);
    bd.ciphertext = b64(rng.bytes(rng.int(1, 4300)));
    bd.initializationVector = b64(rng.bytes(rng.pick([12, 16])));
    bd.authenticationTag = b64(rng.bytes(16));
    if (rng.chance(0.5)) bd.ciphertextMetadata = b64(rng.bytes(rng.int(0, 20)));
    else delete bd.ciphertextMetadata;
    if (rng.chance(0.5)) bd.additionalAuthenticatedData = b64(rng.bytes(rng.int(0, 512)));
    return draft(cat, "random ciphertext", "Decrypt", bd, [IC]);
  }
  if (v === 2) {
    const bd = validBody("Decrypt", i, rng);
    const f = rng.pick([
      "ciphertext",
      "initializationVector",
      "authenticationTag",
      "additionalAuthenticatedData",
      ...(REAL.ciphertextMetadata ? ["ciphertextMetadata"] : []),
    ]);
    const buf = Buffer.from(bd[f] as string, "base64");
    buf[rng.int(0, buf.length - 1)] ^= 1 << rng.int(0, 7);
    bd[f] = buf.toString("base64");
    return draft(cat, `tampered ${f}`, "Decrypt", bd, [IC]);
  }
  if (v === 3) {
    const key = rng.pick([KEYS.decOnly, KEYS.noUsage]);
    return draft(cat, `encrypt with ${key}`, "Encrypt", validBody("Encrypt", i, rng), [IKU], { path: opPath(PREFIX, "Encrypt", key) });
  }
  if (v === 4) {
    const bd = validBody("Encrypt", i, rng);
    bd.ciphertextDataIntegrityValueAlgorithm = "SHA_256";
    return draft(cat, "encrypt-only key with CDIV", "Encrypt", bd, [IKU], { path: opPath(PREFIX, "Encrypt", KEYS.encOnly) });
  }
  const o: Op = rng.pick(["Encrypt", "Decrypt", "GetKeyMetadata"]);
  return draft(cat, `${o} on a key absent from the HSM`, o, validBody(o, i, rng), o === "Decrypt" ? [K404, IC] : [K404], {
    path: opPath(PREFIX, o, KEYS.absent),
  });
}

// ---------------------------------------------------------------- raw-socket protocol abuse

export interface RawCase {
  i: number;
  what: string;
  bytes: Buffer;
  expect: Set<Outcome>;
  /** Half-close after writing (an incomplete request then ends in EOF). */
  end: boolean;
  head?: boolean;
}

export function rawCase(j: number, hostHeader: string): RawCase {
  const i = COUNT + j;
  const rng = caseRng(i);
  const p = opPath(PREFIX, "GetHealthStatus");
  const L = (s: string) => Buffer.from(s, "latin1");
  const mk = (what: string, s: string | Buffer, expect: Outcome[], end = false): RawCase => ({
    i,
    what,
    bytes: Buffer.isBuffer(s) ? s : L(s),
    expect: new Set(expect),
    end,
  });
  const v = rng.int(0, 27);
  const H = `Host: ${hostHeader}\r\n`;
  switch (v) {
    case 0:
      return mk("garbage line", "THIS IS NOT HTTP\r\n\r\n", [V400]);
    case 1:
      return mk("random bytes", Buffer.concat([Buffer.from([rng.int(0, 31)]), rng.bytes(rng.int(1, 500)), L("\r\n\r\n")]), [V400], true);
    case 2:
      return mk("lower-case method", `post ${p} HTTP/1.1\r\n${H}\r\n`, [V400]);
    case 3:
      return mk("unknown method", `${rng.pick(["FOO", "GETT", "P0ST", "XKS"])} ${p} HTTP/1.1\r\n${H}\r\n`, [V400]);
    case 4:
      return mk("CONNECT", `CONNECT 127.0.0.1:${rng.int(1, 65535)} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n`, [P404]);
    case 5:
      return mk("HTTP/2 preface", "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", [V400]);
    case 6:
      return mk("no Host (HTTP/1.1), API URI", `POST ${p} HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}`, [
        A401,
      ]);
    case 7:
      return mk("no Host (HTTP/1.1), other path", `POST /x HTTP/1.1\r\nContent-Length: 0\r\n\r\n`, [P404]);
    case 8:
      return mk("HTTP/1.0 without Host", `POST ${p} HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}`, [A401]);
    case 9:
      return mk("header without colon", `POST ${p} HTTP/1.1\r\n${H}NoColonHere\r\n\r\n`, [V400]);
    case 10:
      return mk("space in header name", `POST ${p} HTTP/1.1\r\n${H}Bad Header: x\r\n\r\n`, [V400]);
    case 11:
      return mk("obs-fold", `POST ${p} HTTP/1.1\r\n${H}X-A: a\r\n  folded\r\nContent-Length: 0\r\n\r\n`, [V400, A401]);
    case 12:
      return mk("bare LF", `POST ${p} HTTP/1.1\n${H.replace("\r", "")}Content-Length: 0\n\n`, [V400, A401]);
    case 13:
      return mk("NUL in a header value", `POST ${p} HTTP/1.1\r\n${H}X-A: a\u0000b\r\nContent-Length: 0\r\n\r\n`, [V400]);
    case 14:
      return mk(
        "Transfer-Encoding + Content-Length",
        `POST ${p} HTTP/1.1\r\n${H}Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n2\r\n{}\r\n0\r\n\r\n`,
        [V400],
      );
    case 15:
      return mk(
        "bad chunk size",
        `POST ${p} HTTP/1.1\r\n${H}Transfer-Encoding: chunked\r\n\r\n${rng.pick(["zz", "-1", "0x2", "fffffffffffffffffff"])}\r\n{}\r\n0\r\n\r\n`,
        [V400],
      );
    case 16:
      return mk(
        "Transfer-Encoding gzip",
        `POST ${p} HTTP/1.1\r\n${H}Transfer-Encoding: ${rng.pick(["gzip", "chunked, gzip", "identity", "chunked;x", "xchunked"])}\r\n\r\n{}`,
        [V400],
        true,
      );
    case 17:
      return mk("conflicting Content-Length", `POST ${p} HTTP/1.1\r\n${H}Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}x`, [V400]);
    case 18:
      return mk(
        "bad Content-Length",
        `POST ${p} HTTP/1.1\r\n${H}Content-Length: ${rng.pick(["-1", "abc", "+5", "1 2", "0x10", "99999999999999999999999", "2,2"])}\r\n\r\n{}`,
        [V400],
      );
    case 19: {
      const onApi = rng.chance(0.8);
      return mk(
        `declared 10 MB, 1 KiB sent${onApi ? "" : " (bad path)"}`,
        `POST ${onApi ? p : "/nope"} HTTP/1.1\r\n${H}Content-Type: application/json\r\nContent-Length: 10000000\r\n\r\n${"{".repeat(1024)}`,
        [onApi ? U501 : P404],
      );
    }
    case 20:
      return mk("head over 16 KiB", `POST ${p} HTTP/1.1\r\n${H}X-Big: ${"b".repeat(rng.int(17_000, 40_000))}\r\n\r\n`, [V400]);
    case 21:
      return mk(
        "raw UTF-8 in the target",
        Buffer.concat([
          L(`POST ${API}/keys/`),
          Buffer.from(rng.pick(["✓", "ü", "💥", "日本"])),
          L(`/encrypt HTTP/1.1\r\n${H}Content-Length: 0\r\n\r\n`),
        ]),
        [V400],
      );
    case 22:
      return mk(
        "Expect: (not 100-continue)",
        `POST ${p} HTTP/1.1\r\n${H}Expect: ${rng.pick(["foo", "200-ok", "100-continue-please"])}\r\nContent-Length: 2\r\n\r\n{}`,
        [A401],
      );
    case 23:
      return mk("absolute-form target", `POST http://${hostHeader}${p} HTTP/1.1\r\n${H}Content-Length: 0\r\n\r\n`, [P404]);
    case 24:
      return mk("asterisk-form OPTIONS", `OPTIONS * HTTP/1.1\r\n${H}\r\n`, [P404]);
    case 25:
      return mk(
        "websocket upgrade on an API URI",
        `GET ${p} HTTP/1.1\r\n${H}Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n`,
        [M405],
      );
    case 26:
      return mk(
        "bad HTTP version",
        `POST ${p} ${rng.pick(["HTTP/1.2", "HTTP/3.0", "HTTP/1", "HTTPS/1.1", "http/1.1", "HTTP/11"])}\r\n${H}Content-Length: 0\r\n\r\n`,
        [V400, A401],
      );
    // Node's parser tolerates doubled spaces: then it is an unsigned request on an API URI.
    default:
      return mk("spaces in the request line", `POST  ${p}  HTTP/1.1\r\n${H}\r\n`, [V400, A401]);
  }
}
