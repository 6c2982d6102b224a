/**
 * The answer oracle: what a correct proxy answer looks like, from the XKS
 * spec's rules and the caller's own knowledge (the plaintext it sent, the AAD),
 * never from the proxy's code. Each check returns why an answer is wrong, or
 * undefined when it is right, so tests, the traffic generator and the bench's
 * load generator share it.
 */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { XKS_ERRORS, type XksErrorName } from "../../shared/errors.ts";
import { type Bytes, unb64 } from "./bodies.ts";

export interface Answer {
  status: number;
  text: string;
}

function parse(text: string): Record<string, unknown> | undefined {
  try {
    const v = JSON.parse(text) as unknown;
    return typeof v === "object" && v !== null && !Array.isArray(v) ? (v as Record<string, unknown>) : undefined;
  } catch {
    return undefined;
  }
}

/** The spec error an answer is (its exact compact body and matching status), or undefined. */
export function specErrorOf(a: Answer): XksErrorName | undefined {
  const name = parse(a.text)?.errorName;
  if (typeof name !== "string" || !Object.hasOwn(XKS_ERRORS, name)) return undefined;
  const e = XKS_ERRORS[name as XksErrorName];
  if (e.status !== a.status) return undefined;
  return a.text === JSON.stringify({ errorName: name, errorMessage: e.message }) ? (name as XksErrorName) : undefined;
}

/** The spec's answers when the chain is too busy or its dependency did not answer in time. */
export const BUSY_ERRORS: ReadonlySet<XksErrorName> = new Set(["ThrottlingException", "DependencyTimeoutException"]);

export function assertSpecError(a: Answer, name: XksErrorName, label = ""): void {
  assert.equal(a.status, XKS_ERRORS[name].status, `${label} status: ${a.text}`);
  assert.equal(a.text, JSON.stringify({ errorName: name, errorMessage: XKS_ERRORS[name].message }), `${label} body`);
}

const CANONICAL_B64 = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/;
function field(j: Record<string, unknown>, name: string): Buffer | undefined {
  const v = j[name];
  return typeof v === "string" && CANONICAL_B64.test(v) ? unb64(v) : undefined;
}

export interface EncryptExpectation {
  /** The plaintext sent (or its length). */
  plaintext: Bytes | number;
  aad?: Bytes;
  /** Whether the request asked for the integrity value. */
  integrityValue?: boolean;
}

/**
 * Why an Encrypt answer is wrong: not 200, a ciphertext not as long as the
 * plaintext, an IV of neither 12 nor 16 bytes, a tag not 16 bytes,
 * ciphertext metadata over 20 bytes, an integrity value present when not
 * asked for, absent when asked for, or not SHA-256(AAD || CM || IV || CT || TAG).
 */
export function encryptProblem(a: Answer, x: EncryptExpectation): string | undefined {
  if (a.status !== 200) return `HTTP ${a.status} ${specErrorOf(a) ?? a.text.slice(0, 200)}`;
  const j = parse(a.text);
  if (!j) return "the answer is not a JSON object";
  const ptLen = typeof x.plaintext === "number" ? x.plaintext : Buffer.from(x.plaintext).length;
  const ct = field(j, "ciphertext");
  const iv = field(j, "initializationVector");
  const tag = field(j, "authenticationTag");
  const cm = j.ciphertextMetadata === undefined ? Buffer.alloc(0) : field(j, "ciphertextMetadata");
  if (!ct || ct.length !== ptLen) return `ciphertext is ${ct?.length ?? "missing"} B for ${ptLen} B of plaintext`;
  if (!iv || (iv.length !== 12 && iv.length !== 16)) return `IV is ${iv?.length ?? "missing"} B`;
  if (tag?.length !== 16) return `tag is ${tag?.length ?? "missing"} B`;
  if (!cm || cm.length > 20) return "ciphertextMetadata is not Base64 of at most 20 bytes";
  const cdiv = j.ciphertextDataIntegrityValue;
  if (!x.integrityValue) return cdiv === undefined ? undefined : "an integrity value that was not asked for";
  const want = createHash("sha256")
    .update(Buffer.concat([x.aad === undefined ? Buffer.alloc(0) : Buffer.from(x.aad), cm, iv, ct, tag]))
    .digest("base64");
  return cdiv === want ? undefined : `integrity value ${String(cdiv)} is not SHA-256(AAD||CM||IV||CT||TAG)`;
}

/** Why a Decrypt answer is wrong: not 200, or not exactly the plaintext that was encrypted. */
export function decryptProblem(a: Answer, plaintext: Bytes): string | undefined {
  if (a.status !== 200) return `HTTP ${a.status} ${specErrorOf(a) ?? a.text.slice(0, 200)}`;
  const j = parse(a.text);
  const pt = j ? field(j, "plaintext") : undefined;
  if (!pt) return "no Base64 plaintext in the answer";
  return pt.equals(Buffer.from(plaintext)) ? undefined : "the plaintext differs from what was encrypted";
}

/** What one request came to: a correct answer, one of the spec's errors, or something no correct proxy says. */
export type Verdict = { kind: "ok" } | { kind: "spec-error"; name: XksErrorName } | { kind: "wrong"; why: string };

/** Judges an answer: a 200 must pass `check`; anything else must be a spec error. */
export function verdict<A extends Answer>(a: A, check: (a: A) => string | undefined): Verdict {
  if (a.status === 200) {
    const why = check(a);
    return why === undefined ? { kind: "ok" } : { kind: "wrong", why };
  }
  const name = specErrorOf(a);
  return name ? { kind: "spec-error", name } : { kind: "wrong", why: `not a spec answer: HTTP ${a.status} ${a.text.slice(0, 200)}` };
}
