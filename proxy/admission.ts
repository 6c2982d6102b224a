/**
 * Admission control: every request is answered inside its budget, or refused
 * at once with 429 ThrottlingException: never late.
 *
 * KMS gives up on a call after 250 ms, so an answer after that is worth
 * nothing, and work done for it is taken from requests that could still make
 * it. Measured on a 2-core machine (proxy, agent, sshd and the caller on the
 * same cores) before any of this existed, with a KMS-like caller (open loop,
 * 250 ms timeout, Encrypt 32 B):
 *   - bursts on warm connections: 200 at once all done by 70 ms, 400 by 168 ms
 *     (about 0.42 ms of chain time per request); 800 at once: only 101 in time,
 *     505 × 503 at ~360 ms and 194 successes after 250 ms; the first burst of
 *     200 on a freshly started chain had p50 227 ms (about 1.1 ms a request
 *     while nothing is compiled yet);
 *   - 2× capacity for 30 s: 29 % of requests timed out at the caller, refusals
 *     (503) took 269 ms at p99, and 40 successes came after 250 ms.
 * The queue forms wherever a request waits unseen: in the agent's event loop
 * (its crypto is synchronous) and the HTTP/2 buffers in between, where the
 * proxy can neither see its depth nor take a request back.
 *
 * The mechanism, and why:
 *   1. A budget per request (`requestBudgetMs`) from its arrival. The agent
 *      call's deadline is what is left of it, and the answer is checked against
 *      it just before it is written: no success is ever sent after the budget.
 *   2. Per agent, at most `maxInFlightPerAgent` calls outstanding; the rest
 *      wait here, in a FIFO the proxy can see and empty. The limit only has to
 *      keep the agent busy: Little's law at 1,800 req/s over a 35 ms WAN round
 *      trip needs ~64 in flight, hence the default of 128; on one machine 128
 *      calls are ~55 ms of agent work, still well inside the budget.
 *   3. Predicted completion at arrival: work ahead of the request (in flight +
 *      waiting) × the agent's measured cost per request + its base latency. A
 *      request whose waiting (already spent unseen, see LoopClock, plus
 *      predicted here) passes `queueTargetMs`, or whose prediction passes its
 *      budget, is refused before its body is read or its signature checked:
 *      the CoDel idea that a standing queue only adds delay, applied per
 *      request with a prediction instead of after the fact.
 *      The cost per request is 1 / the agent's capacity, the best throughput
 *      seen over 50 ms spans during which it always had calls outstanding (the
 *      last 30-60 s); until such a span has been seen it is taken as 1 ms, the
 *      cold figure above. A fixed queue-length limit was not used
 *      because the right length is a time (the budget) divided by a cost that
 *      changes by 2.5× between a cold and a warm chain; an adaptive concurrency
 *      limit (Vegas/gradient style) was not used because it converges over many
 *      round trips while a burst is over in one.
 *   4. At dispatch a waiter is checked again (the prediction may have been
 *      optimistic): if what is left of its budget cannot cover the expected
 *      latency, it gets its 429 then, without any agent work.
 * Measured while building it (same machine, KMS-like caller, 3,000 req/s
 * offered for 15 s after a warm-up; the chain serves ~2,200/s):
 *   - taking arrival as the moment the handler first sees a request, most
 *     requests timed out at the caller with few refusals, because they waited
 *     unseen in the kernel while the proxy's loop was busy; taking it as the
 *     moment the loop last stopped being idle: 0 timeouts, goodput 2,235/s,
 *     11,476 × 429 (at 4,320/s offered see MAX_UNSEEN_MS);
 *   - `queueTargetMs` 100 vs 20: goodput 2,235 vs 1,463/s, refusals p99 83 vs
 *     34 ms, warm bursts of 200/400/800 served 200/372/185 vs 84/73/84 in time,
 *     and at 20 ms even half the capacity drew refusals: hence 100;
 *   - again once refusals were cheap (proxy/shed.ts), 1,934/s offered for 30 s, two runs
 *     at 100 and 50, one at 30: goodput 1,603-1,652 / 1,508-1,517 / 1,391 per s, refusals
 *     p99 59-101 / 33-41 / 32 ms, a warm burst of 200 served in time 200 / 114-158 / 64:
 *     still 100. Below ~30 ms refusals get no faster: a request is refused when the
 *     proxy's loop reads it, and under overload a turn of that loop lasts about that long.
 * Refusals are 429 ThrottlingException (spec: "rate too high"), which KMS
 * treats as retryable. Nothing is retried here (no retry amplification) and
 * nothing is left queued once the load drops: waiters leave when refused, when
 * dispatched, or when their client goes away.
 *
 * Optional per-key-store quotas are token buckets (`TokenBucket`), checked
 * after SigV4 so that only a store's own authenticated callers can spend its
 * quota.
 */
import type { AdmissionRefusal } from "./metrics.ts";
import { performance } from "node:perf_hooks";
import { XksError } from "../shared/errors.ts";

/** Monotonic milliseconds. */
export type Clock = () => number;
export const monotonic: Clock = () => performance.now();

/**
 * When a request arrived, as well as this process can tell. The proxy runs on
 * one event loop: a request is seen when the loop reads its socket, and while
 * the loop is busy (a burst, or sustained overload) requests wait unseen in
 * the kernel, and each turn handles every request it read before reading more
 * (0.3-0.4 ms each warm, measured; ~1 ms on a freshly started proxy). Data can
 * only wait unseen while the loop is busy (an idle loop reads it at once). So
 * a request is taken to have arrived when the loop last stopped being idle
 * (from its event-loop utilization), but at most MAX_UNSEEN_MS before it is
 * seen: within a fraction of a millisecond of the truth at low load.
 */
export class LoopClock {
  private inTurn = false;
  /** Event-loop utilization at the end of the last turn. */
  private last = performance.eventLoopUtilization();
  private busySince: number;
  private turnArrival = 0;
  private readonly endTurn = () => {
    this.inTurn = false;
    this.last = performance.eventLoopUtilization();
  };

  constructor(private readonly clock: Clock = monotonic) {
    this.busySince = clock();
  }

  /** The arrival time to give a request seen now. */
  arrival(): number {
    if (!this.inTurn) {
      this.inTurn = true;
      const now = this.clock();
      const since = performance.eventLoopUtilization(this.last);
      // Idle since the last turn (more than a trace): busy only since that idle time ended.
      if (since.idle > IDLE_TRACE_MS) this.busySince = now - since.active;
      this.turnArrival = Math.max(this.busySince, now - MAX_UNSEEN_MS);
      // The check phase follows this turn's I/O callbacks.
      setImmediate(this.endTurn);
    }
    return this.turnArrival;
  }
}

/**
 * The most unseen waiting assumed (ms). Under sustained overload the loop may never be idle,
 * and "since the loop was last idle" grows without bound: every request would look too old
 * (measured: goodput 576/s at 4,320/s offered). Bounding the turns it came through instead
 * (the last two and this one) underestimated it (18,492 of 64,800 timed out at the caller);
 * measured again once refusals were cheap (proxy/shed.ts), at 3,096/s offered: 26,124 caller
 * timeouts, and the chain did not recover when the load fell back to half its capacity (new
 * connections replacing the timed-out ones), where this bound gave 0 timeouts and recovered at
 * once. Assuming up to half the default budget admits only what can still be served in the rest.
 */
const MAX_UNSEEN_MS = 100;
/** Idle time below this between two turns is not a pause (ms). */
const IDLE_TRACE_MS = 0.05;

/** A request's time budget, from its arrival. */
export class Budget {
  constructor(
    /** Arrival, on `clock`. */
    readonly arrivedAt: number,
    readonly budgetMs: number,
    private readonly clock: Clock = monotonic,
    /** When this process first saw the request (its handling started); default: at arrival. */
    readonly seenAt = arrivedAt,
  ) {}
  /** Time spent before this process got to the request (unseen in the kernel, or behind others in its turn). */
  get waitedUnseen(): number {
    return Math.max(0, this.seenAt - this.arrivedAt);
  }
  get deadline(): number {
    return this.arrivedAt + this.budgetMs;
  }
  /** Milliseconds left (negative once past). */
  remaining(): number {
    return this.deadline - this.clock();
  }
  elapsed(): number {
    return this.clock() - this.arrivedAt;
  }
}

/** A 429 from admission, with why as a bounded reason (for metrics). */
export class ThrottledError extends XksError {
  readonly reason: AdmissionRefusal;
  constructor(detail: string, reason: AdmissionRefusal) {
    super("ThrottlingException", detail);
    this.reason = reason;
  }
}

/** A refusal is routine under load: made without a stack trace (capturing one was ~8 % of a refusal's CPU). */
export function throttled(detail: string, reason: AdmissionRefusal): ThrottledError {
  const limit = Error.stackTraceLimit;
  Error.stackTraceLimit = 0;
  try {
    return new ThrottledError(detail, reason);
  } finally {
    Error.stackTraceLimit = limit;
  }
}

export interface GateOptions {
  /** Calls outstanding at the agent at most. */
  maxInFlight: number;
  /** Predicted waiting (before dispatch) allowed, ms. */
  queueTargetMs: number;
  clock?: Clock;
}

/** What LoopClock attributes to a request at low load (reading and parsing it), ms: not waiting. */
const WAIT_NOISE_MS = 1;
/** Cost per request assumed until the agent has been seen busy (ms): the cold chain's figure. */
export const PRIOR_COST_MS = 1;
/**
 * The base latency (smallest call latency) and the capacity (best throughput over a
 * busy span) are kept over the last two windows of this length: they follow a change
 * within one to two windows, and a quiet spell does not make the proxy forget them.
 */
const ESTIMATE_WINDOW_MS = 30_000;
/** Throughput spans: at least this long, and this many answers. */
const RATE_SPAN_MS = 50;
const RATE_SPAN_MIN = 16;

interface Waiter {
  budget: Budget;
  resolve(slot: Slot): void;
  reject(err: Error): void;
  queued: boolean;
}

/** A dispatched call's place; `release` exactly once when its answer (or failure) is in. */
export interface Slot {
  release(ok: boolean): void;
}

/**
 * One agent's admission gate: a concurrency limit, a FIFO of waiters, and the
 * estimates the predictions use (see the module comment).
 */
export class AgentGate {
  private inFlight = 0;
  private readonly queue: Waiter[] = [];
  private head = 0;
  private readonly clock: Clock;
  /** Cost per request at the agent (ms): 1 / its measured capacity. */
  private costMs = PRIOR_COST_MS;
  private baseCur = Number.POSITIVE_INFINITY;
  private basePrev = Number.POSITIVE_INFINITY;
  private rateCur = 0;
  private ratePrev = 0;
  private windowsSince: number;
  private spanStart: number;
  private spanCount = 0;
  private spanBusy = false;
  readonly stats = { admitted: 0, refusedAtArrival: 0, refusedAtDispatch: 0, abandoned: 0 };

  constructor(private readonly o: GateOptions) {
    this.clock = o.clock ?? monotonic;
    this.windowsSince = this.clock();
    this.spanStart = this.windowsSince;
  }

  get waiting(): number {
    return this.queue.length - this.head;
  }
  get outstanding(): number {
    return this.inFlight;
  }
  /** The current estimates (for logs and tests). */
  estimates(): { costMs: number; baseMs: number } {
    return { costMs: this.costMs, baseMs: this.baseMs() };
  }

  private baseMs(): number {
    const b = Math.min(this.baseCur, this.basePrev);
    return Number.isFinite(b) ? b : 0;
  }

  /**
   * Why a request arriving now, with `budget`, would be refused; undefined if
   * it can be admitted.
   */
  refusal(budget: Budget): string | undefined {
    const ahead = this.inFlight + this.waiting;
    // Waiting only starts once all slots are taken; from then on one slot frees per cost.
    const wait = Math.max(0, ahead + 1 - this.o.maxInFlight) * this.costMs;
    const service = this.baseMs() + Math.min(ahead + 1, this.o.maxInFlight) * this.costMs;
    // Time spent unseen or behind others in this turn counts as waiting too (LoopClock),
    // beyond the noise of the estimate; the request's own reading and checking does not.
    const waited = Math.max(0, budget.waitedUnseen - WAIT_NOISE_MS);
    if (waited + wait > this.o.queueTargetMs) {
      return `waited ${waited.toFixed(1)} ms + ${ahead} ahead (~${wait.toFixed(1)} ms): over the ${this.o.queueTargetMs} ms queue target`;
    }
    const left = budget.remaining();
    if (wait + service > left) {
      return `${ahead} ahead: predicted ${(wait + service).toFixed(1)} ms, ${Math.max(0, left).toFixed(1)} ms of budget left`;
    }
    return undefined;
  }

  /**
   * A slot for one agent call, now or when one frees; rejects with 429 when the
   * budget cannot be met, or when `signal` aborts (the client went away).
   */
  acquire(budget: Budget, signal?: AbortSignal): Promise<Slot> {
    const why = this.refusal(budget);
    if (why) {
      this.stats.refusedAtArrival++;
      return Promise.reject(throttled(why, "agent_queue"));
    }
    this.stats.admitted++;
    if (this.inFlight < this.o.maxInFlight && this.waiting === 0) return Promise.resolve(this.take());
    return new Promise<Slot>((resolve, reject) => {
      const w: Waiter = { budget, resolve, reject, queued: true };
      this.queue.push(w);
      signal?.addEventListener(
        "abort",
        () => {
          if (!w.queued) return;
          w.queued = false;
          this.stats.abandoned++;
          reject(throttled("client went away while queued", "client_gone"));
          this.compact();
        },
        { once: true },
      );
    });
  }

  private take(): Slot {
    const started = this.clock();
    if (this.inFlight++ === 0) {
      // A new busy period: the throughput span starts now.
      this.spanStart = started;
      this.spanCount = 0;
      this.spanBusy = true;
    }
    let released = false;
    return {
      release: (ok: boolean) => {
        if (released) return;
        released = true;
        this.inFlight--;
        if (ok) this.sample(started);
        this.dispatch();
      },
    };
  }

  /** Learns from one completed call that started at `started`. */
  private sample(started: number): void {
    const now = this.clock();
    const latency = now - started;
    if (now - this.windowsSince > ESTIMATE_WINDOW_MS) {
      this.basePrev = this.baseCur;
      this.baseCur = Number.POSITIVE_INFINITY;
      this.ratePrev = this.rateCur;
      this.rateCur = 0;
      this.windowsSince = now;
    }
    this.baseCur = Math.min(this.baseCur, latency);
    // Throughput is measured over short spans during which the agent always had work
    // outstanding; the best recent one is its capacity. (Spacing of answers at moderate
    // load is the spacing of arrivals, not the agent's cost, so it is never used alone.)
    this.spanCount++;
    const span = now - this.spanStart;
    if (span >= RATE_SPAN_MS) {
      if (this.spanBusy && this.spanCount >= RATE_SPAN_MIN) this.rateCur = Math.max(this.rateCur, (this.spanCount * 1000) / span);
      this.spanStart = now;
      this.spanCount = 0;
      this.spanBusy = true;
    }
    if (this.inFlight === 0) this.spanBusy = false;
    // A span at moderate load measures the arrival rate, a lower bound of the capacity: the
    // prior stays the ceiling of the cost until a faster span has been seen.
    const rate = Math.max(this.rateCur, this.ratePrev);
    this.costMs = rate > 0 ? Math.min(PRIOR_COST_MS, 1000 / rate) : PRIOR_COST_MS;
  }

  /** Hands freed slots to the waiters that can still make it; refuses the ones that cannot. */
  private dispatch(): void {
    while (this.inFlight < this.o.maxInFlight && this.head < this.queue.length) {
      const w = this.queue[this.head++];
      if (!w.queued) continue;
      w.queued = false;
      const need = this.baseMs() + Math.min(this.inFlight + 1, this.o.maxInFlight) * this.costMs;
      if (w.budget.remaining() < need) {
        this.stats.refusedAtDispatch++;
        w.reject(
          throttled(
            `budget left ${Math.max(0, w.budget.remaining()).toFixed(1)} ms < expected ${need.toFixed(1)} ms at dispatch`,
            "budget_at_dispatch",
          ),
        );
        continue;
      }
      w.resolve(this.take());
    }
    this.compact();
  }

  private compact(): void {
    while (this.head < this.queue.length && !this.queue[this.head].queued) this.head++;
    if (this.head > 1024 && this.head * 2 > this.queue.length) {
      this.queue.splice(0, this.head);
      this.head = 0;
    }
  }
}

export interface QuotaConfig {
  /** Requests per second, sustained. */
  rate: number;
  /** Requests at once, on top of an idle bucket. */
  burst: number;
}

/** A token bucket: `burst` tokens, refilled at `rate` per second; one token per request. */
export class TokenBucket {
  private tokens: number;
  private at: number;

  constructor(
    readonly quota: Readonly<QuotaConfig>,
    private readonly clock: Clock = monotonic,
  ) {
    this.tokens = quota.burst;
    this.at = clock();
  }

  /** Takes one token if there is one. */
  take(): boolean {
    const now = this.clock();
    this.tokens = Math.min(this.quota.burst, this.tokens + ((now - this.at) * this.quota.rate) / 1000);
    this.at = now;
    if (this.tokens < 1) return false;
    this.tokens -= 1;
    return true;
  }
}

/** One token bucket per key store prefix, kept across config reloads unless the store's quota changed. */
export class QuotaSet {
  private readonly buckets = new Map<string, TokenBucket>();

  constructor(private readonly clock: Clock = monotonic) {}

  /** True when the store has no quota or a token was free. */
  take(prefix: string, quota: Readonly<QuotaConfig> | undefined): boolean {
    if (!quota) return true;
    let b = this.buckets.get(prefix);
    if (!b || b.quota.rate !== quota.rate || b.quota.burst !== quota.burst) {
      b = new TokenBucket(quota, this.clock);
      this.buckets.set(prefix, b);
    }
    return b.take();
  }
}
