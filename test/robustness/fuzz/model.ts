/**
 * The fuzz test's model of the proxy: what a correct proxy answers to a
 * request, worked out from the XKS spec and the configuration the test gives
 * the proxy, never from the proxy's code. The pipeline it models: route →
 * method → body cap → content encoding → SigV4 → validation → allow-list →
 * agent; and the invariants every answer keeps (a spec status, compact JSON
 * naming a spec error with its own status, no HTML, no stack trace).
 */
import { XKS_ERRORS, type XksErrorName } from "../../../shared/errors.ts";
import { API, CREDS, OTHER_PREFIX, PREFIX } from "../../../testbed/configs.ts";
import type { Creds } from "../../../testbed/xks/sign.ts";

export { API };
/** limits.maxBodyBytes (default). */
export const CAP = 65_536;
/** limits.maxPlaintextBytes / maxCiphertextBytes (default). */
export const MAX_PT = 8192;
/** limits.maxAadBytes (default). */
export const MAX_AAD = 16_384;
/** Node's default maxHeaderSize. */
export const MAX_HEADER_BYTES = 16_384;
/** Node parses at most this many request headers (proxy/main.ts MAX_HEADERS_COUNT); later ones are not seen at all. */
export const MAX_HEADERS_COUNT = 100;

export const NOT_IN_HSM = "allowed-but-absent";
/** The keys of the main store's allow-list: the test key set, and one the HSM does not have. */
export const KEYS = { foo: "foo", encOnly: "enc-only", decOnly: "dec-only", noUsage: "no-usage", absent: NOT_IN_HSM };
export const STORES: Record<string, { creds: Creds[]; keys: string[] }> = {
  [PREFIX]: { creds: [CREDS.a, CREDS.b], keys: Object.values(KEYS) },
  [OTHER_PREFIX]: { creds: [CREDS.other], keys: ["foo"] },
};

export type Op = "Encrypt" | "Decrypt" | "GetKeyMetadata" | "GetHealthStatus";
export const OP_SEGMENT: Record<Exclude<Op, "GetHealthStatus">, string> = {
  Encrypt: "encrypt",
  Decrypt: "decrypt",
  GetKeyMetadata: "metadata",
};
export const opPath = (prefix: string, op: Op, key = "foo") =>
  op === "GetHealthStatus" ? `${prefix}/kms/xks/v1/health` : `${prefix}/kms/xks/v1/keys/${key}/${OP_SEGMENT[op]}`;

/** An outcome: "400:ValidationException", "405", "200", ... */
export type Outcome = string;
export const E = (name: XksErrorName): Outcome => `${XKS_ERRORS[name].status}:${name}`;
export const V400 = E("ValidationException");
export const A401 = E("AuthenticationFailedException");
export const P404 = E("InvalidUriPathException");
export const K404 = E("KeyNotFoundException");
export const U501 = E("UnsupportedOperationException");
export const D503 = E("DependencyTimeoutException");
export const T429 = E("ThrottlingException");
/** The spec's answers when the chain is busy: both are retried by KMS. */
export const BUSY_OUTCOMES = [D503, T429];
export const M405 = "405";
export const METHOD_NOT_ALLOWED_TEXT = JSON.stringify({ errorMessage: "Only POST is allowed on this URI." });
export const SPEC_STATUSES = new Set([400, 401, 403, 404, 405, 429, 500, 501, 503]);

/** Reference model of the route table (independent of proxy/routes.ts). */
export function resolveRoute(target: string): { prefix: string; op: Op; key?: string } | undefined {
  const q = target.indexOf("?");
  const path = q < 0 ? target : target.slice(0, q);
  for (const prefix of Object.keys(STORES)) {
    const base = `${prefix}/kms/xks/v1/`;
    if (!path.startsWith(base)) continue;
    const rest = path.slice(base.length);
    if (rest === "health") return { prefix, op: "GetHealthStatus" };
    const m = /^keys\/([^/]+)\/(metadata|encrypt|decrypt)$/.exec(rest);
    if (m)
      return {
        prefix,
        op: ({ metadata: "GetKeyMetadata", encrypt: "Encrypt", decrypt: "Decrypt" } as const)[m[2] as "metadata"],
        key: m[1],
      };
  }
  return undefined;
}

/** What the generator knows about a request once it is signed and encoded. */
export interface RequestFacts {
  target: string;
  method: string;
  bodyBytes: number;
  /** Content-Encoding values among the headers Node parses. */
  contentEncodings: string[];
  /** Signed correctly, with a credential of the store its path names. */
  signedByItsStore: boolean;
  /** What validation, the allow-list and the agent answer once the request is past SigV4. */
  bodyOutcome: Outcome[];
  /** An outcome decided elsewhere (e.g. by Node's header parser), instead of the pipeline's. */
  override?: Outcome[];
  /** The whole request may be valid (e.g. duplicate keys whose last value is valid). */
  mayPass?: boolean;
  /** Node's HTTP parser may refuse the request target outright (→ 400 whatever the signature). */
  parserMayRefuse?: boolean;
  /** A valid-looking request on a key the HSM does not have (its 404 comes from the agent). */
  agentCase?: boolean;
}

/** The answers a correct proxy may give: the reference pipeline, first failing step wins. */
export function expectedOutcomes(f: RequestFacts): Set<Outcome> {
  const route = resolveRoute(f.target);
  let expect: Outcome[];
  if (f.override) expect = f.override;
  else if (!route) expect = [P404];
  else if (f.method !== "POST") expect = [M405];
  else if (f.bodyBytes > CAP) expect = [U501];
  else if (f.contentEncodings.length > 1 || f.contentEncodings.some((v) => v !== "identity")) expect = [V400];
  else if (!f.signedByItsStore) expect = [A401];
  else expect = f.bodyOutcome;
  if (f.mayPass) expect = [...expect, "200"];
  if (f.parserMayRefuse) expect = [...expect, V400];
  // A request that gets as far as the agent may find the chain busy (a full queue, or the agent
  // deadline passing while a loaded machine stalls): the spec's busy answers are then right.
  const reachesAgent =
    expect.some((o) => o === "200" || o === E("InvalidCiphertextException") || o === E("InvalidKeyUsageException")) ||
    (f.agentCase === true && expect.includes(K404));
  if (reachesAgent) expect = [...expect, ...BUSY_OUTCOMES];
  // Admission control sits right after routing and the method check, before the body or the signature:
  // any POST of a key operation may be refused there with 429 while the machine is busy.
  if (!f.override && route && route.op !== "GetHealthStatus" && f.method === "POST") expect = [...expect, T429];
  return new Set(expect);
}

/** What the real agent may answer to a VALID request on key foo. */
export function agentOutcomes(op: Op): Outcome[] {
  return op === "Decrypt" ? [E("InvalidCiphertextException")] : [];
}

/** What the transport saw: an HTTP answer, or an error (no answer, a broken one). */
export interface Answer {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  text: string;
  error?: string;
  ms: number;
}

/** Generic invariants for every answer; returns the outcome key or throws a description. */
export function checkAnswer(method: string, a: Answer): Outcome {
  if (a.error) throw new Error(a.error);
  if (a.status === 200) return "200";
  if (!SPEC_STATUSES.has(a.status)) throw new Error(`status ${a.status} is not one of the spec's`);
  if (/<html|<!doctype|<pre|<body/i.test(a.text)) throw new Error("HTML body");
  if (/\n\s+at |Error:|node:internal|\.ts:\d+|\.js:\d+/.test(a.text)) throw new Error("stack trace in the body");
  if (method === "HEAD") {
    if (a.text !== "") throw new Error("HEAD answer with a body");
    return a.status === 405 ? M405 : `${a.status}:*`;
  }
  const ct = String(a.headers["content-type"] ?? "");
  if (!/^application\/json(;|$)/.test(ct)) throw new Error(`content-type ${JSON.stringify(ct)}`);
  if (a.text.includes("\n") || a.text.includes("\r")) throw new Error("body is not one line");
  let j: unknown;
  try {
    j = JSON.parse(a.text);
  } catch {
    throw new Error("body is not JSON");
  }
  if (JSON.stringify(j) !== a.text) throw new Error("body is not compact JSON");
  if (typeof j !== "object" || j === null || Array.isArray(j)) throw new Error("body is not a JSON object");
  if (a.status === 405) {
    if (a.text !== METHOD_NOT_ALLOWED_TEXT) throw new Error("405 without the proxy's fixed body");
    if (a.headers.allow !== "POST") throw new Error("405 without Allow: POST");
    return M405;
  }
  const o = j as Record<string, unknown>;
  const keys = Object.keys(o);
  if (!keys.includes("errorName") || keys.some((k) => k !== "errorName" && k !== "errorMessage"))
    throw new Error(`body members ${keys.join(",")}`);
  const name = o.errorName;
  if (typeof name !== "string" || !Object.hasOwn(XKS_ERRORS, name))
    throw new Error(`errorName ${JSON.stringify(name)} is not in the spec's list`);
  if (o.errorMessage !== undefined) {
    const msg = o.errorMessage;
    if (typeof msg !== "string" || !/^[\x20-\x7e]*$/.test(msg) || msg.length >= 512)
      throw new Error("errorMessage is not printable ASCII < 512 chars");
  }
  if (XKS_ERRORS[name as XksErrorName].status !== a.status)
    throw new Error(`${name} answered with ${a.status}, XKS_ERRORS says ${XKS_ERRORS[name as XksErrorName].status}`);
  return `${a.status}:${name}`;
}

export function matches(outcome: Outcome, expect: Set<Outcome>): boolean {
  if (expect.has(outcome)) return true;
  if (outcome.endsWith(":*")) return [...expect].some((e) => e.startsWith(outcome.slice(0, 4)));
  return false;
}
