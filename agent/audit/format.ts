/**
 * The audit log's line format, shared by the writer (agent/audit.ts) and the
 * verifier (agent/audit/verify.ts).
 *
 * A segment is a file `audit-NNNNNN.log` of JSON lines, each line one record:
 *
 *   {"n":<record number>,"t":<type>,<fields of the type>,"prev":"<hash of the previous line>","hash":"<hash>"}
 *
 * `hash` = SHA-256 of the line's exact bytes before `,"hash":"`; `prev` is the
 * previous line's `hash` (across segments; "0"×64 before the first record).
 * `n` counts records from 1 across all segments. Types:
 *
 * - `seg`  the first line of every segment: `time`, `segment` (its number)
 * - `op`   one key operation: the OperationRecord's fields
 * - `ev`   an event of the log itself: `time`, `event`, `detail`
 * - `cp`   a checkpoint: `time`, `mac` = HMAC-SHA256 (the HSM's audit key) of
 *          checkpointMessage(n, prev), so it authenticates every line before it
 *
 * A line is canonical when its members are unique and in the order: `n`, `t`,
 * the type's known fields in FIELD_ORDER, any further fields sorted by name,
 * `prev`, `hash`; values are strings or numbers; no whitespace outside
 * strings; JSON.stringify's escaping. The verifier parses a line, writes it
 * again canonically and requires the same bytes.
 */
import { createHash } from "node:crypto";

export const GENESIS = "0".repeat(64);
export const SEGMENT_RE = /^audit-(\d{6,})\.log$/;
export const HASH_SUFFIX_BYTES = ',"hash":"'.length + 64 + '"}'.length;
/** The longest line the writer produces is far below this (every recorded field is capped); longer is damage. */
export const MAX_LINE_BYTES = 1 << 20;

export type LineType = "seg" | "op" | "ev" | "cp";

const FIELD_ORDER: Record<LineType, readonly string[]> = {
  seg: ["time", "segment"],
  op: [
    "time",
    "operation",
    "kmsRequestId",
    "kmsOperation",
    "keyId",
    "principal",
    "kmsKeyArn",
    "viaService",
    "sourceVpc",
    "sourceVpce",
    "keyStore",
    "result",
    "latencyMs",
  ],
  ev: ["time", "event", "detail"],
  cp: ["time", "mac"],
};

export type Fields = Record<string, string | number>;

export interface Line {
  n: number;
  t: LineType;
  prev: string;
  hash: string;
  fields: Fields;
}

export function segmentName(segment: number): string {
  return `audit-${String(segment).padStart(6, "0")}.log`;
}

export function sha256hex(data: Buffer | string): string {
  return createHash("sha256").update(data).digest("hex");
}

/** What a checkpoint's MAC covers: the record number and the hash of the line before it. */
export function checkpointMessage(n: number, prev: string): Buffer {
  return Buffer.from(`xks-audit/1 checkpoint\n${n}\n${prev}`, "utf8");
}

function orderedBody(n: number, t: LineType, fields: Fields, prev: string): string {
  const known = FIELD_ORDER[t];
  const o: Record<string, string | number> = { n, t };
  for (const k of known) if (k in fields) o[k] = fields[k];
  for (const k of Object.keys(fields)
    .filter((k) => !known.includes(k) && k !== "n" && k !== "t" && k !== "prev" && k !== "hash")
    .sort())
    o[k] = fields[k];
  o.prev = prev;
  return JSON.stringify(o);
}

/** The canonical line (with its trailing newline) for a record, and its hash. */
export function makeLine(n: number, t: LineType, fields: Fields, prev: string): { bytes: Buffer; hash: string } {
  const body = orderedBody(n, t, fields, prev);
  const prefix = body.slice(0, -1);
  const hash = sha256hex(Buffer.from(prefix, "utf8"));
  return { bytes: Buffer.from(`${prefix},"hash":"${hash}"}\n`, "utf8"), hash };
}

const HEX64 = /^[0-9a-f]{64}$/;

/**
 * Parses one line (its bytes without the newline) and checks it alone: JSON,
 * canonical form, its own hash. The chain (n, prev) is the caller's to check.
 */
export function parseLine(raw: Buffer): Line | { why: string } {
  if (raw.length < HASH_SUFFIX_BYTES + 2) return { why: "not a record (too short)" };
  if (raw.length > MAX_LINE_BYTES) return { why: "not a record (too long)" };
  let o: unknown;
  try {
    o = JSON.parse(raw.toString("utf8"));
  } catch {
    return { why: "not JSON" };
  }
  if (typeof o !== "object" || o === null || Array.isArray(o)) return { why: "not a JSON object" };
  const rec = o as Record<string, unknown>;
  const { n, t, prev, hash } = rec;
  if (typeof n !== "number" || !Number.isSafeInteger(n) || n < 1) return { why: "bad record number" };
  if (t !== "seg" && t !== "op" && t !== "ev" && t !== "cp") return { why: "unknown record type" };
  if (typeof prev !== "string" || !HEX64.test(prev) || typeof hash !== "string" || !HEX64.test(hash)) return { why: "bad prev or hash" };
  const fields: Fields = {};
  for (const [k, v] of Object.entries(rec)) {
    if (k === "n" || k === "t" || k === "prev" || k === "hash") continue;
    if (typeof v !== "string" && typeof v !== "number") return { why: `field ${k} is not a string or number` };
    fields[k] = v;
  }
  if (sha256hex(raw.subarray(0, raw.length - HASH_SUFFIX_BYTES)) !== hash)
    return { why: "hash does not match the line's bytes (record altered)" };
  const again = makeLine(n, t, fields, prev);
  // Exact bytes: duplicate members, reordering, whitespace or other escaping all differ here.
  if (again.bytes.length !== raw.length + 1 || !again.bytes.subarray(0, raw.length).equals(raw))
    return { why: "not canonical (duplicate or reordered members, whitespace or escaping)" };
  return { n, t, prev, hash, fields };
}
