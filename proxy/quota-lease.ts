/**
 * Per-key-store quotas across the workers of a multi-process proxy
 * (proxy/cluster.ts): one token bucket per store for the whole proxy, owned by
 * the primary (`QuotaLeaser`), which leases small batches of tokens to the
 * workers (`LeasedQuotas`) on request.
 *
 * A worker spends a token of its current lease without asking anyone. With
 * none left it asks the primary for a batch (requests arriving meanwhile wait
 * for the same answer) and closes its previous lease in the same message; a
 * request is refused (429) only when the primary's bucket had no token for it.
 * One worker alone can therefore take the whole rate; a batch is at most
 * LEASE_SPAN_MS of the rate, and at most burst / (2 × workers).
 *
 * The bound: over any window of t seconds, the requests admitted by all
 * workers together are at most burst + rate × t. Tokens are created only by
 * the primary's refill, at `rate`, and only while
 *     tokens in the bucket + tokens in open leases <= burst        (I)
 * A lease is open from its grant until the worker closes it (returning its
 * unspent tokens to the bucket, which keeps I) or it expires. A worker stops
 * spending a lease LEASE_TTL_MS after it *sent* the request, the primary
 * counts it open until LEASE_TTL_MS after it *granted* it, which is later, so
 * every token a worker may still spend is counted in I (spent tokens of an
 * open lease are counted too, which only lowers the refill's cap). At the
 * start of a window at most `burst` tokens are in the bucket or spendable
 * (I), and during it at most rate × t are created: so at most burst + rate × t
 * are spent in it. test/unit/quota-lease.test.ts checks this over random
 * traffic from several workers; test/e2e/proxy-workers.test.ts through real
 * workers.
 */
import { type Clock, monotonic, type QuotaConfig } from "./admission.ts";

/** A worker stops spending a lease this long after it asked (ms). */
export const LEASE_TTL_MS = 1000;
/** A batch is at most this much of the rate (ms). */
export const LEASE_SPAN_MS = 20;
/** A worker that gets no answer from its primary within this refuses the requests waiting (ms). */
export const LEASE_ANSWER_TIMEOUT_MS = 100;

/** Worker → primary: close lease `close` (if any) returning `unspent`, and ask for `want` tokens (0: only close). */
export interface LeaseAsk {
  t: "quota";
  id: number;
  prefix: string;
  quota: QuotaConfig;
  want: number;
  close?: number;
  unspent?: number;
}
/** Primary → worker: the answer to ask `id`; `lease` names the lease (when `granted` > 0). */
export interface LeaseGrant {
  t: "quota-grant";
  id: number;
  granted: number;
  lease: number;
}

/** How many tokens a worker asks for at once. */
export function leaseSize(q: QuotaConfig, workers: number): number {
  return Math.max(1, Math.min(Math.ceil((q.rate * LEASE_SPAN_MS) / 1000), Math.floor(q.burst / (2 * workers))));
}

interface StoreBucket {
  quota: QuotaConfig;
  tokens: number;
  at: number;
  /** Open leases: id → [tokens granted, counted until]. */
  open: Map<number, { n: number; until: number; owner: number }>;
}

/** The primary's buckets: one per key store, for every worker together. */
export class QuotaLeaser {
  private readonly stores = new Map<string, StoreBucket>();
  private nextLease = 1;

  constructor(private readonly clock: Clock = monotonic) {}

  private bucket(prefix: string, quota: QuotaConfig): StoreBucket {
    let b = this.stores.get(prefix);
    if (!b || b.quota.rate !== quota.rate || b.quota.burst !== quota.burst) {
      b = { quota: { rate: quota.rate, burst: quota.burst }, tokens: quota.burst, at: this.clock(), open: new Map() };
      this.stores.set(prefix, b);
    }
    return b;
  }

  /** Refills within invariant I: bucket + open leases <= burst. */
  private refill(b: StoreBucket): number {
    const now = this.clock();
    let leased = 0;
    for (const [id, l] of b.open) {
      if (l.until <= now) b.open.delete(id);
      else leased += l.n;
    }
    const cap = Math.max(0, b.quota.burst - leased);
    b.tokens = Math.max(Math.min(b.tokens, cap), Math.min(cap, b.tokens + ((now - b.at) * b.quota.rate) / 1000));
    b.at = now;
    return now;
  }

  /** Handles one ask from worker `owner`. */
  ask(owner: number, a: LeaseAsk): LeaseGrant {
    const b = this.bucket(a.prefix, a.quota);
    if (a.close !== undefined) {
      const l = b.open.get(a.close);
      if (l && l.owner === owner) {
        b.open.delete(a.close);
        b.tokens += Math.max(0, Math.min(l.n, a.unspent ?? 0));
      }
    }
    const now = this.refill(b);
    const granted = Math.max(0, Math.min(Math.floor(a.want), Math.floor(b.tokens)));
    if (granted === 0) return { t: "quota-grant", id: a.id, granted: 0, lease: 0 };
    b.tokens -= granted;
    const lease = this.nextLease++;
    b.open.set(lease, { n: granted, until: now + LEASE_TTL_MS, owner });
    return { t: "quota-grant", id: a.id, granted, lease };
  }
}

interface Waiter {
  resolve(ok: boolean): void;
}

interface LocalLease {
  quota: QuotaConfig;
  lease: number;
  left: number;
  until: number;
  /** The ask in flight, and the requests waiting for it. */
  asking?: { id: number; waiters: Waiter[]; timer: NodeJS.Timeout };
}

/** A worker's side: the same `take` as QuotaSet, spending leases from the primary. */
export class LeasedQuotas {
  private readonly stores = new Map<string, LocalLease>();
  private nextAsk = 1;
  private readonly asks = new Map<number, { prefix: string; sentAt: number }>();

  constructor(
    private readonly send: (a: LeaseAsk) => void,
    private readonly workers: number,
    private readonly clock: Clock = monotonic,
  ) {}

  /** True (or a promise of it) when the store has no quota or a token was had for this request. */
  take(prefix: string, quota: Readonly<QuotaConfig> | undefined): boolean | Promise<boolean> {
    if (!quota) return true;
    let s = this.stores.get(prefix);
    if (!s || s.quota.rate !== quota.rate || s.quota.burst !== quota.burst) {
      s = { quota: { rate: quota.rate, burst: quota.burst }, lease: 0, left: 0, until: 0 };
      this.stores.set(prefix, s);
    }
    if (s.left > 0 && this.clock() < s.until) {
      s.left--;
      return true;
    }
    return new Promise<boolean>((resolve) => {
      const st = s;
      if (st.asking) {
        st.asking.waiters.push({ resolve });
        return;
      }
      const id = this.nextAsk++;
      const close = st.lease !== 0 ? st.lease : undefined;
      const unspent = st.left;
      st.lease = 0;
      st.left = 0;
      const timer = setTimeout(() => this.answered({ t: "quota-grant", id, granted: 0, lease: 0 }), LEASE_ANSWER_TIMEOUT_MS);
      st.asking = { id, waiters: [{ resolve }], timer };
      this.asks.set(id, { prefix, sentAt: this.clock() });
      this.send({
        t: "quota",
        id,
        prefix,
        quota: st.quota,
        want: leaseSize(st.quota, this.workers),
        ...(close !== undefined ? { close, unspent } : {}),
      });
    });
  }

  /** The primary's answer to an ask: the waiting requests take its tokens in order; the rest become the lease. */
  answered(g: LeaseGrant): void {
    const ask = this.asks.get(g.id);
    if (!ask) return;
    this.asks.delete(g.id);
    const s = this.stores.get(ask.prefix);
    if (!s?.asking || s.asking.id !== g.id) return;
    const { waiters, timer } = s.asking;
    clearTimeout(timer);
    s.asking = undefined;
    let left = g.granted;
    for (const w of waiters) {
      if (left > 0) {
        left--;
        w.resolve(true);
      } else w.resolve(false);
    }
    if (g.granted > 0) {
      s.lease = g.lease;
      s.left = left;
      // Counted from the ask, so it ends before the primary stops counting the lease.
      s.until = ask.sentAt + LEASE_TTL_MS;
    }
  }
}
