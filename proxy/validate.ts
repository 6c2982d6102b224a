/**
 * Strict request validation shared by the four operation handlers.
 *
 * Everything here throws XksError("ValidationException") (400) for malformed
 * input and XksError("UnsupportedOperationException") (501) for a value larger
 * than the configured limit (the spec's "parameter exceeds the implementation's
 * max size"). Unknown JSON fields and unknown `kmsOperation` values are accepted
 * (XKS Proxy API spec §1.3 and Appendix B).
 */
import { XksError } from "../shared/errors.ts";
import type { RequestMetadata } from "../shared/proto.ts";
import { MAX_METADATA_CHARS } from "../shared/xks-spec.ts";

export type Json = Record<string, unknown>;

function invalid(detail: string): never {
  throw new XksError("ValidationException", detail);
}

const utf8 = new TextDecoder("utf-8", { fatal: true, ignoreBOM: false });

/**
 * The body must be declared `application/json` (charset, if any, utf-8) and be
 * one JSON object in valid UTF-8.
 */
export function parseJsonBody(body: Buffer, contentType: string | undefined): Json {
  if (contentType === undefined) invalid("missing Content-Type");
  const [type, ...params] = contentType.split(";").map((s) => s.trim().toLowerCase());
  if (type !== "application/json") invalid("Content-Type must be application/json");
  for (const p of params) {
    const [k, v] = p.split("=").map((s) => s.trim().replace(/^"|"$/g, ""));
    if (k === "charset" && v !== "utf-8" && v !== "utf8") invalid("Content-Type charset must be utf-8");
  }
  let text: string;
  try {
    text = utf8.decode(body);
  } catch {
    invalid("body is not valid UTF-8");
  }
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch {
    invalid("body is not valid JSON");
  }
  if (typeof value !== "object" || value === null || Array.isArray(value)) invalid("body must be a JSON object");
  return value as Json;
}

const STRICT_B64_RE = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/;

/**
 * Standard Base64 (RFC 4648 §4) in canonical form only: alphabet A-Za-z0-9+/,
 * length a multiple of 4, exact padding, no whitespace, and zero trailing bits
 * (checked by decoding and re-encoding). Node's Buffer.from(s, "base64") is
 * lenient about all of these; KMS is not.
 */
export function isCanonicalBase64(s: string): boolean {
  if (!STRICT_B64_RE.test(s)) return false;
  return Buffer.from(s, "base64").toString("base64") === s;
}

export interface Base64FieldOptions {
  required: boolean;
  /** Decoded byte lengths allowed (e.g. [12, 16]); a mismatch is a ValidationException. */
  lengths?: readonly number[];
  /** Larger than this (decoded bytes) is an UnsupportedOperationException. */
  maxBytes?: number;
  /** Smallest decoded length accepted (ValidationException below it). */
  minBytes?: number;
}

/** Reads a Base64 field; returns an empty Buffer when optional and absent. */
export function base64Field(o: Json, field: string, opts: Base64FieldOptions): Buffer {
  const v = o[field];
  if (v === undefined) {
    if (opts.required) invalid(`${field} is required`);
    return Buffer.alloc(0);
  }
  if (typeof v !== "string") invalid(`${field} must be a string`);
  if (!isCanonicalBase64(v)) invalid(`${field} is not canonical standard Base64`);
  const bytes = Buffer.from(v, "base64");
  if (opts.minBytes !== undefined && bytes.length < opts.minBytes) invalid(`${field} is too short`);
  if (opts.lengths && !opts.lengths.includes(bytes.length)) invalid(`${field} must be ${opts.lengths.join(" or ")} bytes`);
  if (opts.maxBytes !== undefined && bytes.length > opts.maxBytes) {
    throw new XksError("UnsupportedOperationException", `${field} is ${bytes.length} bytes, above the limit ${opts.maxBytes}`);
  }
  return bytes;
}

/** A required enum-like string field that must equal one value (e.g. encryptionAlgorithm = AES_GCM). */
export function exactString(o: Json, field: string, expected: string, required: boolean): boolean {
  const v = o[field];
  if (v === undefined) {
    if (required) invalid(`${field} is required`);
    return false;
  }
  if (v !== expected) invalid(`${field} must be ${expected}`);
  return true;
}

/** requestMetadata fields per XKS Proxy API spec §1.3, by operation. */
const REQUIRED_METADATA = {
  GetKeyMetadata: ["awsPrincipalArn", "kmsOperation", "kmsRequestId"],
  Encrypt: ["awsPrincipalArn", "kmsKeyArn", "kmsOperation", "kmsRequestId"],
  Decrypt: ["awsPrincipalArn", "kmsKeyArn", "kmsOperation", "kmsRequestId"],
  GetHealthStatus: ["kmsOperation", "kmsRequestId"],
} as const;
const OPTIONAL_METADATA = ["awsPrincipalArn", "kmsKeyArn", "kmsViaService", "awsSourceVpc", "awsSourceVpce"] as const;

/** The wire `requestMetadata` (XKS Proxy API spec §1.3); unknown members are ignored. */
export type WireRequestMetadata = Pick<
  RequestMetadata,
  "awsPrincipalArn" | "kmsKeyArn" | "kmsOperation" | "kmsRequestId" | "kmsViaService" | "awsSourceVpc" | "awsSourceVpce"
>;

/**
 * Validates `requestMetadata` for `operation`: an object whose required members
 * are non-empty strings and whose known optional members, when present, are
 * strings. `kmsOperation` is never checked against a list.
 */
export function parseRequestMetadata(body: Json, operation: keyof typeof REQUIRED_METADATA): WireRequestMetadata {
  const m = body.requestMetadata;
  if (typeof m !== "object" || m === null || Array.isArray(m)) invalid("requestMetadata must be an object");
  const md = m as Json;
  const out: WireRequestMetadata = {
    awsPrincipalArn: "",
    kmsKeyArn: "",
    kmsOperation: "",
    kmsRequestId: "",
    kmsViaService: "",
    awsSourceVpc: "",
    awsSourceVpce: "",
  };
  const required: readonly string[] = REQUIRED_METADATA[operation];
  for (const f of required) {
    const v = md[f];
    if (typeof v !== "string" || v === "") invalid(`requestMetadata.${f} must be a non-empty string`);
  }
  for (const f of [...required, ...OPTIONAL_METADATA] as (keyof WireRequestMetadata)[]) {
    const v = md[f];
    if (v === undefined) continue;
    if (typeof v !== "string") invalid(`requestMetadata.${f} must be a string`);
    // Nothing longer than the spec's longest value (an ARN) is accepted, so nothing longer is logged.
    if (v.length > MAX_METADATA_CHARS) invalid(`requestMetadata.${f} is longer than ${MAX_METADATA_CHARS} characters`);
    out[f] = v;
  }
  return out;
}

/** Best-effort kmsRequestId for the log line, even when validation later fails. */
export function peekRequestId(body: Json): string | undefined {
  const m = body.requestMetadata;
  if (typeof m !== "object" || m === null) return undefined;
  const id = (m as Json).kmsRequestId;
  return typeof id === "string" ? id.slice(0, 128) : undefined;
}
