/**
 * Reading the audit log for people: `audit tail`, `audit search`, `audit
 * export`. Every segment is streamed line by line (one read buffer and the
 * current line in memory); lines are passed on as their exact bytes.
 */
import { createReadStream } from "node:fs";
import { listSegments } from "../audit.ts";
import { MAX_LINE_BYTES } from "./format.ts";

/** The lines of one file, without their newlines (a last line without one too). */
export async function* fileLines(path: string): AsyncGenerator<Buffer> {
  let carry: Buffer[] = [];
  let carryLen = 0;
  for await (const chunk of createReadStream(path, { highWaterMark: 1 << 20 }) as AsyncIterable<Buffer>) {
    let from = 0;
    for (let nl = chunk.indexOf(0x0a, from); nl !== -1; nl = chunk.indexOf(0x0a, from)) {
      const piece = chunk.subarray(from, nl);
      yield carryLen > 0 ? Buffer.concat([...carry, piece]) : piece;
      carry = [];
      carryLen = 0;
      from = nl + 1;
    }
    if (from < chunk.length) {
      carryLen += chunk.length - from;
      // A line longer than any record is damage: it is passed on cut.
      if (carryLen <= MAX_LINE_BYTES) carry.push(Buffer.from(chunk.subarray(from)));
    }
  }
  if (carryLen > 0) yield Buffer.concat(carry);
}

export interface AuditFilter {
  requestId?: string;
  principal?: string;
  key?: string;
  result?: string;
  operation?: string;
  /** ISO 8601 times, inclusive. */
  since?: string;
  until?: string;
}

/** Whether a record line matches; lines that are not JSON match nothing. */
export function matches(raw: Buffer, f: AuditFilter): boolean {
  let o: Record<string, unknown>;
  try {
    o = JSON.parse(raw.toString("utf8"));
  } catch {
    return false;
  }
  const has = (field: string, want: string | undefined) => want === undefined || o[field] === want;
  if (!has("kmsRequestId", f.requestId) || !has("principal", f.principal) || !has("keyId", f.key) || !has("result", f.result)) return false;
  if (!has("operation", f.operation)) return false;
  const anyFilter = f.requestId ?? f.principal ?? f.key ?? f.result ?? f.operation;
  if (anyFilter !== undefined && o.t !== "op") return false;
  const time = typeof o.time === "string" ? o.time : undefined;
  if (f.since !== undefined && (time === undefined || time < f.since)) return false;
  if (f.until !== undefined && (time === undefined || time > f.until)) return false;
  return true;
}

/** Every line of every segment, oldest first, that matches `f`. */
export async function* searchAudit(dir: string, f: AuditFilter = {}): AsyncGenerator<Buffer> {
  for (const s of listSegments(dir)) for await (const line of fileLines(s.path)) if (matches(line, f)) yield line;
}

/** The last `count` lines, reading segments from the newest back only as far as needed. */
export async function tailAudit(dir: string, count: number): Promise<Buffer[]> {
  const segments = listSegments(dir);
  let out: Buffer[] = [];
  for (let i = segments.length - 1; i >= 0 && out.length < count; i--) {
    const ring: Buffer[] = [];
    for await (const line of fileLines(segments[i].path)) {
      ring.push(Buffer.from(line));
      if (ring.length > count - out.length) ring.shift();
    }
    out = [...ring, ...out];
  }
  return out;
}
