/**
 * `xks-agent audit verify`: streams every segment once, in order, in constant
 * memory (one read buffer and the current line), and checks
 *
 * - each line alone (agent/audit/format.ts parseLine: JSON, canonical bytes, its own hash);
 * - the chain: record numbers consecutive, each `prev` the previous line's hash, across segments;
 * - segments: numbered without gaps, each starting with its own `seg` header, none empty,
 *   none ending without a line end; the first one is segment 1, or the segments before it
 *   were removed by retention as an `ev` record in a later segment says (with the hash the
 *   first remaining one starts from);
 * - checkpoints: each `cp` MAC recomputed with the HSM's audit key (when `mac` is given);
 * - witnesses (`against`): every audit head the proxy logged must be a record of this
 *   log with the same hash; a witnessed head beyond the log's end is a rollback.
 *
 * Records after the last checkpoint are hash-chained but not yet authenticated; the
 * report counts them.
 */
import { timingSafeEqual } from "node:crypto";
import { createReadStream, statSync } from "node:fs";
import { listSegments } from "../audit.ts";
import { checkpointMessage, GENESIS, MAX_LINE_BYTES, parseLine } from "./format.ts";

export interface Witness {
  records: number;
  hash: string;
  /** Where it came from (the proxy log's line number and time), for the report. */
  where: string;
}

export interface VerifyOptions {
  /** HMAC-SHA256 with the audit key (the HSM); without it checkpoints are not checked. */
  mac?: (data: Buffer) => Buffer;
  against?: Witness[];
  /** Called about every 64 MiB and at the end. */
  onProgress?: (bytesDone: number, bytesTotal: number) => void;
  /** Stop collecting problems after this many (the first is the one that matters). */
  maxProblems?: number;
}

export interface VerifyProblem {
  segment: string;
  /** 1-based line in the segment, 0 for the segment as a whole. */
  line: number;
  why: string;
}

export interface VerifyReport {
  ok: boolean;
  problems: VerifyProblem[];
  records: number;
  segments: number;
  bytes: number;
  checkpoints: number;
  /** Whether checkpoint MACs were checked with the HSM. */
  macChecked: boolean;
  /** Records after the last checkpoint (chained, not authenticated). */
  unsealed: number;
  head: { records: number; hash: string };
  witnessesChecked: number;
}

export async function verifyAudit(dir: string, opts: VerifyOptions = {}): Promise<VerifyReport> {
  const segments = listSegments(dir);
  const maxProblems = opts.maxProblems ?? 20;
  const problems: VerifyProblem[] = [];
  const problem = (segment: string, line: number, why: string) => {
    if (problems.length < maxProblems) problems.push({ segment, line, why });
  };
  let total = 0;
  for (const s of segments) {
    try {
      total += statSync(s.path).size;
    } catch {
      /* reported when read */
    }
  }
  const witnesses = new Map<number, Witness[]>();
  for (const w of opts.against ?? []) witnesses.set(w.records, [...(witnesses.get(w.records) ?? []), w]);
  let witnessesChecked = 0;

  let n = 0;
  let prev = GENESIS;
  let lastCp = 0;
  let checkpoints = 0;
  let done = 0;
  let nextProgress = 64 << 20;
  // Retention records seen: the segment range removed and the hash the next segment starts from.
  const removed: Array<{ first: number; last: number; lastRecord: number; lastHash: string }> = [];
  let firstStart: { segment: number; n: number; prev: string } | undefined;
  let expectSegment = segments[0]?.segment ?? 1;

  for (const seg of segments) {
    if (seg.segment !== expectSegment) problem(seg.name, 0, `segment(s) ${expectSegment}–${seg.segment - 1} missing (deleted or renamed)`);
    expectSegment = seg.segment + 1;
    let lineNo = 0;
    let carry: Buffer[] = [];
    let carryLen = 0;
    let tooLong = false;
    const onLine = (raw: Buffer) => {
      lineNo++;
      const line = parseLine(raw);
      if ("why" in line) {
        problem(seg.name, lineNo, line.why);
        return;
      }
      if (lineNo === 1) {
        if (line.t !== "seg") problem(seg.name, 1, "the segment does not start with its header (head cut or lines removed)");
        else if (line.fields.segment !== seg.segment)
          problem(seg.name, 1, `the header names segment ${line.fields.segment}: a segment copied or replayed under another name`);
        if (firstStart === undefined) firstStart = { segment: seg.segment, n: line.n, prev: line.prev };
        else {
          if (line.n !== n + 1) problem(seg.name, 1, `record ${line.n} follows record ${n} (records missing, replayed or reordered)`);
          if (line.prev !== prev) problem(seg.name, 1, "chain broken: the previous hash differs (a segment replaced, replayed or cut)");
        }
      } else {
        if (line.t === "seg") problem(seg.name, lineNo, "a segment header inside a segment");
        if (line.n !== n + 1) problem(seg.name, lineNo, `record ${line.n} follows record ${n} (records missing, swapped or repeated)`);
        if (line.prev !== prev) problem(seg.name, lineNo, "chain broken: the previous hash differs (a record removed, swapped or altered)");
      }
      if (line.t === "cp") {
        checkpoints++;
        lastCp = line.n;
        if (opts.mac) {
          const want = opts.mac(checkpointMessage(line.n, line.prev));
          const got = Buffer.from(String(line.fields.mac), "hex");
          if (got.length !== want.length || !timingSafeEqual(got, want))
            problem(seg.name, lineNo, `checkpoint ${line.n}: MAC does not match (history before it was rewritten)`);
        }
      }
      if (line.t === "ev" && line.fields.event === "retention") {
        try {
          const r = JSON.parse(String(line.fields.detail)) as (typeof removed)[number];
          removed.push(r);
        } catch {
          problem(seg.name, lineNo, "retention record unreadable");
        }
      }
      const ws = witnesses.get(line.n);
      if (ws) {
        for (const w of ws) {
          witnessesChecked++;
          if (w.hash !== line.hash)
            problem(seg.name, lineNo, `record ${line.n} differs from what the proxy saw (${w.where}): the log was rewritten`);
        }
        witnesses.delete(line.n);
      }
      n = line.n;
      prev = line.hash;
    };
    let bytes = 0;
    try {
      for await (const chunk of createReadStream(seg.path, { highWaterMark: 1 << 20 }) as AsyncIterable<Buffer>) {
        bytes += chunk.length;
        let from = 0;
        for (let nl = chunk.indexOf(0x0a, from); nl !== -1; nl = chunk.indexOf(0x0a, from)) {
          const piece = chunk.subarray(from, nl);
          if (tooLong) {
            lineNo++;
            problem(seg.name, lineNo, "not a record (too long)");
          } else if (carryLen > 0) onLine(Buffer.concat([...carry, piece]));
          else onLine(piece);
          carry = [];
          carryLen = 0;
          tooLong = false;
          from = nl + 1;
        }
        if (from < chunk.length && !tooLong) {
          carry.push(Buffer.from(chunk.subarray(from)));
          carryLen += chunk.length - from;
          if (carryLen > MAX_LINE_BYTES) {
            tooLong = true;
            carry = [];
          }
        }
        done += chunk.length;
        if (opts.onProgress && done >= nextProgress) {
          opts.onProgress(done, total);
          nextProgress += 64 << 20;
        }
      }
    } catch (err) {
      problem(seg.name, 0, `cannot read: ${(err as Error).message}`);
      continue;
    }
    if (bytes === 0) problem(seg.name, 0, "the segment is empty (emptied or truncated)");
    else if (carryLen > 0 || tooLong) problem(seg.name, lineNo + 1, "the last line has no line end (a torn write or a cut tail)");
  }
  opts.onProgress?.(done, total);

  if (segments.length === 0) problem("(none)", 0, "no audit segments");
  else if (firstStart) {
    if (firstStart.segment === 1) {
      if (firstStart.n !== 1 || firstStart.prev !== GENESIS)
        problem(segments[0].name, 1, "the first segment does not start the chain (head cut)");
    } else {
      const r = removed.find((x) => x.last === firstStart!.segment - 1);
      if (!r)
        problem(segments[0].name, 0, `segments before ${segments[0].name} are missing and no retention record says they were removed`);
      else if (r.lastHash !== firstStart.prev || r.lastRecord + 1 !== firstStart.n)
        problem(segments[0].name, 1, "the first segment does not continue from where retention says the removed ones ended");
    }
  }
  for (const ws of witnesses.values())
    for (const w of ws) {
      // Before the first remaining record (removed by retention, which is checked above): nothing left to compare.
      if (firstStart && w.records < firstStart.n) continue;
      witnessesChecked++;
      if (w.records > n) problem("(end)", 0, `rolled back: the proxy saw record ${w.records} (${w.where}) but the log ends at record ${n}`);
      else problem("(end)", 0, `the proxy saw record ${w.records} (${w.where}), which is not in the remaining segments`);
    }

  return {
    ok: problems.length === 0,
    problems,
    records: n,
    segments: segments.length,
    bytes: done,
    checkpoints,
    macChecked: opts.mac !== undefined,
    unsealed: n - lastCp,
    head: { records: n, hash: prev },
    witnessesChecked,
  };
}

/**
 * The audit heads in a proxy's log (JSON lines as pino writes them, as
 * journalctl -o cat or a CloudWatch export gives them): lines whose `msg` is
 * "agent audit head", optionally only those of one agent id.
 */
export function witnessesFromProxyLog(text: string, agentId?: string): Witness[] {
  const out: Witness[] = [];
  let lineNo = 0;
  for (const l of text.split("\n")) {
    lineNo++;
    if (!l.includes("agent audit head")) continue;
    let o: Record<string, unknown>;
    try {
      o = JSON.parse(l.slice(l.indexOf("{")));
    } catch {
      continue;
    }
    if (o.msg !== "agent audit head") continue;
    if (agentId !== undefined && o.agentId !== agentId) continue;
    if (typeof o.auditRecords !== "number" || typeof o.auditHash !== "string") continue;
    const time = typeof o.time === "number" ? new Date(o.time).toISOString() : String(o.time ?? "");
    out.push({ records: o.auditRecords, hash: o.auditHash, where: `proxy log line ${lineNo}${time ? `, ${time}` : ""}` });
  }
  return out;
}
