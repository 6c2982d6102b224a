/**
 * The agent's queue of key operations: work is done only for callers still
 * waiting, and only as much is accepted as can be done in their time.
 *
 * The agent's crypto is synchronous (pkcs11js sync calls on the event loop),
 * so without this queue the backlog sits where nothing can see or bound it:
 * in the HTTP/2 socket buffers and in grpc-js's per-call callbacks, each
 * running its HSM work as soon as it is reached, for a caller whose deadline
 * may be long gone, and a health call waits behind all of it. Here a call's
 * handler only checks and enqueues (cheap); the queue is drained in slices of
 * `sliceMs`, and between slices the event loop reads its sockets again, so
 * that cancellations (the proxy's RST_STREAM, grpc-js's own deadline timer)
 * are seen before the work they cancel, and health calls, which do not enter
 * the queue, are answered within a slice.
 *
 * Bounded in two ways, each answered at once with reason THROTTLING (gRPC
 * RESOURCE_EXHAUSTED; the proxy answers 429 ThrottlingException):
 *   - at most `maxQueued` operations waiting;
 *   - a call whose deadline would pass before its turn (operations ahead ×
 *     the measured cost of one) is refused when it arrives, not when it expires.
 * Before each operation's HSM work: a cancelled call, or one past its deadline,
 * is dropped without touching the HSM.
 */

/** One queued operation. */
export interface Job {
  /** Absolute deadline in ms since the epoch (Infinity: none). */
  deadline: number;
  /** True once the caller has gone (cancelled, or grpc-js ended it at its deadline). */
  cancelled(): boolean;
  /** Does the work and answers. */
  run(): void;
  /** Answers without HSM work: the caller is gone or out of time. */
  drop(why: "CANCELLED" | "DEADLINE_EXCEEDED"): void;
}

export interface WorkQueueOptions {
  /** Operations waiting at most. */
  maxQueued: number;
  /** Work per turn of the event loop, ms. */
  sliceMs?: number;
  now?: () => number;
}

/** Cost of one operation assumed before any was measured (ms): a warm SoftHSM encrypt with its integrity check is ~0.1. */
const PRIOR_COST_MS = 0.5;
const ALPHA = 0.05;

export class WorkQueue {
  private readonly jobs: Job[] = [];
  private head = 0;
  private scheduled = false;
  private costMs = PRIOR_COST_MS;
  private readonly now: () => number;
  private readonly sliceMs: number;
  readonly stats = { run: 0, dropped: 0, refused: 0 };

  constructor(private readonly o: WorkQueueOptions) {
    this.now = o.now ?? Date.now;
    this.sliceMs = o.sliceMs ?? 2;
  }

  get length(): number {
    return this.jobs.length - this.head;
  }

  /** Why a job with this deadline is refused now (undefined: accepted and queued). */
  submit(job: Job): string | undefined {
    const queued = this.length;
    if (queued >= this.o.maxQueued) {
      this.stats.refused++;
      return `queue full (${queued} waiting)`;
    }
    const wait = (queued + 1) * this.costMs;
    const left = job.deadline - this.now();
    if (wait > left) {
      this.stats.refused++;
      return `${queued} waiting (~${wait.toFixed(1)} ms), ${Math.max(0, left).toFixed(1)} ms left before the deadline`;
    }
    this.jobs.push(job);
    this.schedule();
    return undefined;
  }

  private schedule(): void {
    if (this.scheduled) return;
    this.scheduled = true;
    // After the poll phase: whatever else arrived meanwhile (cancellations, health calls) is handled first.
    setImmediate(() => this.drain());
  }

  private drain(): void {
    this.scheduled = false;
    const start = performance.now();
    while (this.head < this.jobs.length) {
      const job = this.jobs[this.head];
      this.jobs[this.head++] = undefined as unknown as Job;
      if (job.cancelled()) {
        this.stats.dropped++;
        job.drop("CANCELLED");
      } else if (this.now() >= job.deadline) {
        this.stats.dropped++;
        job.drop("DEADLINE_EXCEEDED");
      } else {
        const t0 = performance.now();
        job.run();
        this.stats.run++;
        this.costMs = (1 - ALPHA) * this.costMs + ALPHA * (performance.now() - t0);
      }
      if (performance.now() - start >= this.sliceMs) break;
    }
    if (this.head === this.jobs.length) {
      this.jobs.length = 0;
      this.head = 0;
    } else {
      if (this.head > 1024) {
        this.jobs.splice(0, this.head);
        this.head = 0;
      }
      this.schedule();
    }
  }
}
