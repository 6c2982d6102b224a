/**
 * The owner's record of every key operation: a directory of segments
 * (`audit-NNNNNN.log`, format in agent/audit/format.ts), one hash chain across
 * all of them, authenticated by checkpoints whose MAC only the HSM's audit key
 * can make.
 *
 * - Start reads the newest segment's last 512 KiB at most (and, when that
 *   segment is empty, the one before it): its cost does not depend on how much
 *   history there is. Bytes after the last newline (a torn write) are moved to
 *   `quarantine-<time>.bin` in the directory and an `ev` record says so.
 * - A record is written whole or not at all: a write that fails or comes up
 *   short is cut back to the previous end and append() throws, so the caller
 *   refuses the operation. The next append tries again.
 * - Durability (`fsync`): "checkpoint" (default) starts an fdatasync at
 *   every checkpoint (on the thread pool; it does not hold the answers),
 *   "record" fdatasyncs after every record before its answer leaves. Every
 *   write is a synchronous write(2) before the answer, so a crash of the agent
 *   loses nothing that was acknowledged; with "checkpoint", a power loss may
 *   lose the records of the last `checkpointMs` plus one flush.
 * - Every `checkpointMs` (when records were added) and at close, a `cp` record
 *   is sealed with HMAC-SHA256 on the HSM; `head` is the newest sealed one.
 * - On the same timer the open segment is compared with what is at its path:
 *   deleted or replaced, an `ev` record in a new segment says so and writing
 *   continues there (the agent keeps serving; `audit verify` reports the gap).
 * - Segments rotate by size and by UTC day; retention (`keepDays`,
 *   `keepBytes`) deletes the oldest closed segments after recording, in the
 *   open segment, which ones and the hash the next segment starts from.
 */
import { EventEmitter } from "node:events";
import {
  closeSync,
  fdatasync,
  fdatasyncSync,
  fstatSync,
  ftruncateSync,
  mkdirSync,
  openSync,
  readSync,
  readdirSync,
  rmSync,
  statSync,
  writeFileSync,
  writeSync,
} from "node:fs";
import { join } from "node:path";
import type { Logger } from "../shared/logging.ts";
import { checkpointMessage, type Fields, GENESIS, type LineType, makeLine, parseLine, SEGMENT_RE, segmentName } from "./audit/format.ts";
import type { OperationRecord } from "./server.ts";

/** How much of the newest segment start reads at most. */
export const TAIL_WINDOW_BYTES = 512 * 1024;

export interface AuditSettings {
  dir: string;
  /** Label of the HMAC key (CKK_GENERIC_SECRET, CKM_SHA256_HMAC) on the token. */
  key: string;
  segmentBytes: number;
  checkpointMs: number;
  fsync: "checkpoint" | "record";
  keepDays?: number;
  keepBytes?: number;
}

/** The newest sealed checkpoint: what the health answer carries to the proxy. */
export interface AuditHead {
  records: number;
  hash: string;
  mac: string;
}

export interface AuditDeps {
  /** HMAC-SHA256 with the audit key in the HSM; throws when the HSM cannot do it. */
  seal: (data: Buffer) => Buffer;
  log: Logger;
  now?: () => Date;
}

export class AuditWriteError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = "AuditWriteError";
  }
}

export interface Segment {
  segment: number;
  name: string;
  path: string;
}

/** The segments in `dir`, oldest first (readdir only; no file is opened). */
export function listSegments(dir: string): Segment[] {
  let names: string[];
  try {
    names = readdirSync(dir);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return [];
    throw err;
  }
  const out: Segment[] = [];
  for (const name of names) {
    const m = SEGMENT_RE.exec(name);
    if (m) out.push({ segment: Number(m[1]), name, path: join(dir, name) });
  }
  return out.sort((a, b) => a.segment - b.segment);
}

/** What start-up read, for tests that prove its cost does not grow with the log. */
export interface StartStats {
  filesOpened: number;
  bytesRead: number;
}

interface Tail {
  /** The last whole line's record number and hash, or undefined when the segment holds no valid line. */
  last?: { n: number; hash: string; t: LineType };
  /** Bytes after the last newline. */
  torn: Buffer;
  size: number;
  problem?: string;
}

function readTail(path: string, stats: StartStats): Tail {
  const fd = openSync(path, "r");
  stats.filesOpened++;
  try {
    const size = fstatSync(fd).size;
    const len = Math.min(size, TAIL_WINDOW_BYTES);
    const buf = Buffer.alloc(len);
    let got = 0;
    while (got < len) {
      const r = readSync(fd, buf, got, len - got, size - len + got);
      if (r === 0) break;
      got += r;
    }
    stats.bytesRead += got;
    const end = buf.lastIndexOf(0x0a);
    const torn = end === -1 ? buf : buf.subarray(end + 1);
    if (end === -1) return { torn: Buffer.from(torn), size, problem: size > len ? "no line end in the segment's tail" : undefined };
    const start = buf.lastIndexOf(0x0a, end - 1) + 1;
    if (start === 0 && size > len) return { torn: Buffer.from(torn), size, problem: "the last line is longer than the tail window" };
    const line = parseLine(buf.subarray(start, end));
    if ("why" in line) return { torn: Buffer.from(torn), size, problem: `the last line is damaged: ${line.why}` };
    return { last: { n: line.n, hash: line.hash, t: line.t }, torn: Buffer.from(torn), size };
  } finally {
    closeSync(fd);
  }
}

export class AuditLog extends EventEmitter {
  private fd = -1;
  private ino = 0;
  private dev = 0;
  private size = 0;
  private segment = 0;
  private segmentDay = "";
  private n = 0;
  private prev = GENESIS;
  private sealedN = 0;
  private timer: NodeJS.Timeout | undefined;
  private closed = false;
  private sealProblem: string | undefined;
  private writeProblem: string | undefined;
  private lastHead: AuditHead | undefined;
  private doorCount = 0;
  private doorSample: Fields | undefined;
  readonly startStats: StartStats = { filesOpened: 0, bytesRead: 0 };
  private readonly now: () => Date;

  constructor(
    readonly settings: AuditSettings,
    private readonly deps: AuditDeps,
  ) {
    super();
    this.now = deps.now ?? (() => new Date());
    mkdirSync(settings.dir, { recursive: true, mode: 0o700 });
    this.open();
    this.timer = setInterval(() => this.tick(), settings.checkpointMs);
    this.timer.unref();
  }

  /** The newest sealed checkpoint, or undefined before the first. */
  head(): AuditHead | undefined {
    return this.lastHead;
  }

  /** Why records cannot be written or sealed right now, or undefined. */
  problem(): string | undefined {
    return this.writeProblem ?? this.sealProblem;
  }

  /** Whether the last write failed: operations are refused until a record is written again. */
  refusing(): boolean {
    return this.writeProblem !== undefined;
  }

  /** Records one operation; throws AuditWriteError when it could not be written whole (nothing of it stays). */
  append(rec: OperationRecord): void {
    const fields: Fields = {};
    for (const [k, v] of Object.entries(rec)) if (typeof v === "string" || typeof v === "number") fields[k] = v;
    this.write("op", fields);
  }

  /**
   * A call refused at the door (no or a wrong agent token): not recorded
   * verbatim. Calls are counted, and the next checkpoint records the count
   * with the first call as a sample, every field cut to 128 characters.
   */
  noteUnauthenticated(rec: OperationRecord): void {
    this.doorCount++;
    if (this.doorSample === undefined) {
      const cut = (v: string) => (v.length <= 128 ? v : `${v.slice(0, 128)}…[${v.length} chars]`);
      this.doorSample = {
        time: rec.time,
        operation: rec.operation,
        kmsRequestId: cut(rec.kmsRequestId),
        keyId: cut(rec.keyId),
        principal: cut(rec.principal),
      };
    }
  }

  /** Records an event of the log itself (start, stop, quarantine, lost segment, retention). */
  event(event: string, detail: string): void {
    this.write("ev", { time: this.now().toISOString(), event, detail });
  }

  /** Records the calls refused at the door since the last checkpoint, then seals a checkpoint if records were added. */
  checkpoint(): void {
    if (this.closed) return;
    if (this.doorCount > 0) {
      try {
        this.event("unauthenticated", JSON.stringify({ count: this.doorCount, sample: this.doorSample }));
        this.doorCount = 0;
        this.doorSample = undefined;
      } catch {
        /* writeProblem says why; counted on */
      }
    }
    if (this.n === this.sealedN) return;
    let mac: Buffer;
    try {
      mac = this.deps.seal(checkpointMessage(this.n + 1, this.prev));
    } catch (err) {
      const why = `audit checkpoint not sealed: ${(err as Error).message}`.slice(0, 200);
      if (this.sealProblem !== why) this.deps.log.error({ dir: this.settings.dir }, why);
      this.sealProblem = why;
      return;
    }
    const macHex = mac.toString("hex");
    try {
      this.writeLine("cp", { time: this.now().toISOString(), mac: macHex });
    } catch {
      return; // writeProblem says why; the next tick tries again
    }
    this.sealedN = this.n;
    this.sealProblem = undefined;
    if (this.settings.fsync === "checkpoint") {
      // On libuv's thread pool, so that the disk's flush time never stalls the operations being answered.
      const fd = this.fd;
      fdatasync(fd, (err) => {
        if (err && fd === this.fd && !this.closed) {
          this.writeProblem = `audit fdatasync failed: ${err.message}`;
          this.deps.log.error({ segment: segmentName(this.segment) }, this.writeProblem);
        }
      });
    }
    this.lastHead = { records: this.n, hash: this.prev, mac: macHex };
    this.emit("head", this.lastHead);
  }

  /** Records the stop, seals a last checkpoint and closes the file. Safe to call twice. */
  close(): void {
    if (this.closed) return;
    if (this.timer) clearInterval(this.timer);
    try {
      this.event("stop", "agent stopped");
      this.checkpoint();
      fdatasyncSync(this.fd);
    } catch (err) {
      this.deps.log.error({ dir: this.settings.dir, err: (err as Error).message }, "audit log: the stop could not be recorded");
    }
    this.closed = true;
    if (this.fd >= 0) closeSync(this.fd);
    this.fd = -1;
  }

  /** Test and diagnostics view: record count, last hash, open segment. */
  state(): { records: number; hash: string; segment: number; path: string } {
    return { records: this.n, hash: this.prev, segment: this.segment, path: this.segmentPath(this.segment) };
  }

  private segmentPath(segment: number): string {
    return join(this.settings.dir, segmentName(segment));
  }

  private open(): void {
    const segments = listSegments(this.settings.dir);
    const notes: Array<[string, string]> = [];
    const target: Segment | undefined = segments.at(-1);
    // An empty newest segment (a crash right after it was created) is reused; its chain comes from the one before.
    let from = target;
    let tail: Tail | undefined;
    for (let i = segments.length - 1; i >= 0 && i >= segments.length - 2; i--) {
      from = segments[i];
      tail = readTail(from.path, this.startStats);
      if (tail.size > 0) break;
    }
    let newSegment = target === undefined;
    if (tail && from) {
      if (tail.torn.length > 0) {
        const q = join(this.settings.dir, `quarantine-${this.now().toISOString().replace(/[:.]/g, "-")}-${from.name}.bin`);
        writeFileSync(q, tail.torn, { mode: 0o600, flag: "wx" });
        const fd = openSync(from.path, "r+");
        try {
          ftruncateSync(fd, tail.size - tail.torn.length);
          fdatasyncSync(fd);
        } finally {
          closeSync(fd);
        }
        notes.push(["quarantine", `${tail.torn.length} bytes after the last line end of ${from.name} (a torn write) moved to ${q}`]);
        this.deps.log.warn({ segment: from.name, bytes: tail.torn.length, quarantine: q }, "audit log: torn tail quarantined");
      }
      if (tail.last) {
        this.n = tail.last.n;
        this.prev = tail.last.hash;
        if (tail.last.t === "cp") this.sealedN = this.n;
        if (from !== target && target) notes.push(["empty-segment", `${target.name} was empty at start; reused`]);
      } else if (tail.size - tail.torn.length > 0 || tail.problem) {
        // The newest line cannot be read: the chain cannot be continued from it; a new segment says so.
        notes.push(["chain-restart", `${from.name}: ${tail.problem ?? "no valid last line"}; a new segment starts from the zero hash`]);
        this.deps.log.error({ segment: from.name, problem: tail.problem }, "audit log: the newest segment's tail is damaged");
        newSegment = true;
      }
    }
    if (newSegment || !target) this.startSegment((target?.segment ?? 0) + 1);
    else {
      this.openExisting(target);
      if (this.size === 0) this.writeHeader();
    }
    for (const [ev, detail] of notes) this.event(ev, detail);
    this.event("start", `agent started; continuing at record ${this.n + 1} in ${segmentName(this.segment)}`);
    this.retention();
    this.checkpoint();
  }

  private openExisting(s: Segment): void {
    this.fd = openSync(s.path, "a", 0o600);
    this.startStats.filesOpened++;
    const st = fstatSync(this.fd);
    this.size = st.size;
    this.ino = st.ino;
    this.dev = st.dev;
    this.segment = s.segment;
    // A segment last written on an earlier UTC day is closed by the next record.
    this.segmentDay = (st.size > 0 ? st.mtime : this.now()).toISOString().slice(0, 10);
  }

  private startSegment(segment: number): void {
    if (this.fd >= 0) {
      try {
        fdatasyncSync(this.fd);
      } catch {
        /* the old file may be gone */
      }
      closeSync(this.fd);
    }
    const path = this.segmentPath(segment);
    // The directory too may have been removed while the agent ran.
    mkdirSync(this.settings.dir, { recursive: true, mode: 0o700 });
    this.fd = openSync(path, "wx", 0o600);
    const st = fstatSync(this.fd);
    this.size = 0;
    this.ino = st.ino;
    this.dev = st.dev;
    this.segment = segment;
    this.segmentDay = this.now().toISOString().slice(0, 10);
    // The directory entry itself is made durable too.
    try {
      const dfd = openSync(this.settings.dir, "r");
      fdatasyncSync(dfd);
      closeSync(dfd);
    } catch {
      /* not every platform syncs directories */
    }
    this.writeHeader();
  }

  private writeHeader(): void {
    this.writeLine("seg", { time: this.now().toISOString(), segment: this.segment });
  }

  private write(t: LineType, fields: Fields): void {
    if (this.closed) throw new AuditWriteError("the audit log is closed");
    const day = this.now().toISOString().slice(0, 10);
    if (this.size >= this.settings.segmentBytes || day !== this.segmentDay) this.rotate();
    this.writeLine(t, fields);
  }

  private rotate(): void {
    // The outgoing segment ends with a sealed checkpoint when the HSM can make one.
    this.checkpoint();
    this.startSegment(this.segment + 1);
    this.retention();
  }

  private writeLine(t: LineType, fields: Fields): void {
    const { bytes, hash } = makeLine(this.n + 1, t, fields, this.prev);
    let done = 0;
    try {
      while (done < bytes.length) {
        const w = writeSync(this.fd, bytes, done, bytes.length - done);
        if (w <= 0) throw new Error("short write");
        done += w;
      }
      if (this.settings.fsync === "record") fdatasyncSync(this.fd);
    } catch (err) {
      // Nothing of a record that was not written whole stays in the file.
      let cut = "";
      if (done > 0) {
        try {
          ftruncateSync(this.fd, this.size);
        } catch (e) {
          cut = `; cutting back failed: ${(e as Error).message}`;
        }
      }
      const code = (err as NodeJS.ErrnoException).code;
      const why = `audit record not written (${code ?? (err as Error).message}${done > 0 ? `, ${done} of ${bytes.length} bytes` : ""})${cut}`;
      if (this.writeProblem !== why) {
        this.deps.log.error({ segment: segmentName(this.segment) }, why);
        this.deps.log.flush();
      }
      this.writeProblem = why;
      throw new AuditWriteError(why, { cause: err });
    }
    this.size += bytes.length;
    this.n++;
    this.prev = hash;
    if (this.writeProblem && t === "op") {
      this.deps.log.warn({ segment: segmentName(this.segment) }, "audit records are written again");
      this.writeProblem = undefined;
    }
  }

  /** The timer: notices a deleted or replaced open segment, then seals a checkpoint. */
  private tick(): void {
    if (this.closed) return;
    let why: string | undefined;
    try {
      const st = statSync(this.segmentPath(this.segment));
      if (st.ino !== this.ino || st.dev !== this.dev) why = "replaced";
    } catch (err) {
      why = (err as NodeJS.ErrnoException).code === "ENOENT" ? "deleted" : `unreadable (${(err as Error).message})`;
    }
    if (why !== undefined) {
      const lost = segmentName(this.segment);
      const upTo = this.n;
      this.deps.log.error({ segment: lost, dir: this.settings.dir }, `audit log: the open segment was ${why} while the agent ran`);
      try {
        const newest = listSegments(this.settings.dir).at(-1)?.segment ?? 0;
        this.startSegment(Math.max(newest, this.segment) + 1);
        this.writeProblem = undefined;
        this.event(
          "segment-lost",
          `${lost} was ${why} while open (records up to ${upTo} were in it); continuing in ${segmentName(this.segment)}`,
        );
      } catch (err) {
        this.writeProblem = `audit log: cannot continue after ${lost} was ${why}: ${(err as Error).message}`;
      }
      this.emit("lost", lost);
    }
    this.checkpoint();
  }

  /** Deletes the oldest closed segments past keepDays / keepBytes, after recording what goes. */
  private retention(): void {
    const { keepDays, keepBytes } = this.settings;
    if (keepDays === undefined && keepBytes === undefined) return;
    const closed = listSegments(this.settings.dir).filter((s) => s.segment < this.segment);
    if (closed.length === 0) return;
    const sizes = closed.map((s) => {
      try {
        const st = statSync(s.path);
        return { s, size: st.size, mtime: st.mtimeMs };
      } catch {
        return { s, size: 0, mtime: 0 };
      }
    });
    let total = sizes.reduce((a, b) => a + b.size, this.size);
    const cutoff = keepDays === undefined ? -Infinity : this.now().getTime() - keepDays * 86_400_000;
    const remove: typeof sizes = [];
    for (const x of sizes) {
      if (x.mtime < cutoff || (keepBytes !== undefined && total > keepBytes)) {
        remove.push(x);
        total -= x.size;
      } else break;
    }
    if (remove.length === 0) return;
    const last = remove[remove.length - 1].s;
    const stats: StartStats = { filesOpened: 0, bytesRead: 0 };
    const tail = readTail(last.path, stats);
    const detail = JSON.stringify({
      first: remove[0].s.segment,
      last: last.segment,
      lastRecord: tail.last?.n ?? 0,
      lastHash: tail.last?.hash ?? "",
    });
    this.event("retention", detail);
    for (const x of remove) rmSync(x.s.path, { force: true });
    this.deps.log.info({ removed: remove.map((x) => x.s.name) }, "audit log: old segments removed (retention)");
  }
}
