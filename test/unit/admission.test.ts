/**
 * Admission control, by its decisions on a fake clock (proxy/admission.ts,
 * agent/admission.ts): no wall-clock figures, no machine speed involved.
 */
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, it } from "node:test";
import { WorkQueue } from "../../agent/admission.ts";
import { AgentGate, Budget, PRIOR_COST_MS, QuotaSet, type Slot, TokenBucket } from "../../proxy/admission.ts";
import { parseProxyConfig } from "../../proxy/config.ts";
import { XksError } from "../../shared/errors.ts";
import { TEST_IDENTITIES, writeIdentity, writePins } from "../../testbed/identities.ts";

function fakeClock(start = 1000) {
  let t = start;
  return { now: () => t, advance: (ms: number) => (t += ms) };
}

const isThrottling = (err: unknown) => err instanceof XksError && err.errorName === "ThrottlingException";

describe("token bucket quotas", () => {
  it("a bucket gives its burst at once, then one token per 1/rate seconds", () => {
    const c = fakeClock();
    const b = new TokenBucket({ rate: 10, burst: 3 }, c.now);
    assert.deepEqual([b.take(), b.take(), b.take(), b.take()], [true, true, true, false]);
    c.advance(99);
    assert.equal(b.take(), false, "not yet a whole token after 99 ms at 10/s");
    c.advance(1);
    assert.equal(b.take(), true);
    assert.equal(b.take(), false);
    c.advance(10_000);
    assert.deepEqual([b.take(), b.take(), b.take(), b.take()], [true, true, true, false], "never more than the burst");
  });

  it("each key store has its own bucket; a store without a quota is never refused", () => {
    const c = fakeClock();
    const q = new QuotaSet(c.now);
    const quota = { rate: 1, burst: 2 };
    assert.deepEqual([q.take("/a", quota), q.take("/a", quota), q.take("/a", quota)], [true, true, false]);
    assert.equal(q.take("/b", quota), true, "store /b is not starved by /a");
    for (let i = 0; i < 100; i++) assert.equal(q.take("/free", undefined), true);
    assert.equal(q.take("/a", { rate: 1, burst: 5 }), true, "a changed quota starts a new bucket");
  });
});

describe("the proxy's per-agent gate", () => {
  it("calls beyond the concurrency limit wait in order and get the freed slots", async () => {
    const c = fakeClock();
    const gate = new AgentGate({ maxInFlight: 2, queueTargetMs: 50, clock: c.now });
    const budget = () => new Budget(c.now(), 200, c.now);
    const a = await gate.acquire(budget());
    const b = await gate.acquire(budget());
    const order: string[] = [];
    const track = (name: string) => (s: Slot) => {
      order.push(name);
      return s;
    };
    const w1 = gate.acquire(budget()).then(track("w1"));
    const w2 = gate.acquire(budget()).then(track("w2"));
    assert.equal(gate.outstanding, 2);
    assert.equal(gate.waiting, 2);
    c.advance(1);
    a.release(true);
    b.release(true);
    const [s1, s2] = await Promise.all([w1, w2]);
    assert.deepEqual(order, ["w1", "w2"]);
    assert.equal(gate.waiting, 0);
    s1.release(true);
    s2.release(true);
    assert.equal(gate.outstanding, 0);
  });

  it("a request whose predicted wait passes the queue target is refused at once (429), before it takes a place", async () => {
    const c = fakeClock();
    const gate = new AgentGate({ maxInFlight: 1, queueTargetMs: 0, clock: c.now });
    const held = await gate.acquire(new Budget(c.now(), 200, c.now));
    assert.match(gate.refusal(new Budget(c.now(), 200, c.now)) ?? "", /over the 0 ms queue target/);
    await assert.rejects(gate.acquire(new Budget(c.now(), 200, c.now)), isThrottling);
    assert.equal(gate.waiting, 0, "nothing queued for a refused request");
    assert.equal(gate.stats.refusedAtArrival, 1);
    held.release(true);
    assert.equal(gate.refusal(new Budget(c.now(), 200, c.now)), undefined, "free again once the slot is back");
  });

  it("a request whose budget is already spent is refused at once, even with a free slot", async () => {
    const c = fakeClock();
    const gate = new AgentGate({ maxInFlight: 8, queueTargetMs: 100, clock: c.now });
    const budget = new Budget(c.now(), 50, c.now);
    c.advance(50);
    await assert.rejects(gate.acquire(budget), isThrottling);
  });

  it("a waiter whose budget cannot cover the expected latency when its turn comes is refused then, without a slot", async () => {
    const c = fakeClock();
    const gate = new AgentGate({ maxInFlight: 1, queueTargetMs: 200, clock: c.now });
    const first = await gate.acquire(new Budget(c.now(), 200, c.now));
    const waiter = gate.acquire(new Budget(c.now(), 200, c.now));
    c.advance(150); // the first call takes 150 ms: the gate learns a base latency of 150 ms
    first.release(true);
    await assert.rejects(waiter, isThrottling);
    assert.equal(gate.stats.refusedAtDispatch, 1);
    assert.equal(gate.outstanding, 0, "the refused waiter never held a slot");
  });

  it("a waiter whose client went away leaves the queue", async () => {
    const c = fakeClock();
    const gate = new AgentGate({ maxInFlight: 1, queueTargetMs: 200, clock: c.now });
    const held = await gate.acquire(new Budget(c.now(), 200, c.now));
    const ac = new AbortController();
    const waiter = gate.acquire(new Budget(c.now(), 200, c.now), ac.signal);
    assert.equal(gate.waiting, 1);
    ac.abort();
    await assert.rejects(waiter, isThrottling);
    assert.equal(gate.waiting, 0);
    held.release(true);
    assert.equal(gate.outstanding, 0, "the slot was not handed to the gone waiter");
  });

  it("learns the agent's cost per request from its throughput while it is busy, not from idle gaps or moderate load", async () => {
    const c = fakeClock();
    const gate = new AgentGate({ maxInFlight: 512, queueTargetMs: 100, clock: c.now });
    assert.equal(gate.estimates().costMs, PRIOR_COST_MS);
    // An idle agent answering one call now and then teaches nothing about its cost.
    for (let i = 0; i < 5; i++) {
      const s = await gate.acquire(new Budget(c.now(), 200, c.now));
      c.advance(2);
      s.release(true);
      c.advance(500);
    }
    assert.equal(gate.estimates().costMs, PRIOR_COST_MS);
    assert.equal(gate.estimates().baseMs, 2);
    // Moderate load: one call at a time, back to back, 2 ms apart: the arrival rate, not the capacity.
    for (let i = 0; i < 100; i++) {
      const s = await gate.acquire(new Budget(c.now(), 200, c.now));
      const next = await gate.acquire(new Budget(c.now(), 200, c.now));
      c.advance(2);
      s.release(true);
      c.advance(2);
      next.release(true);
    }
    assert.equal(gate.estimates().costMs, PRIOR_COST_MS, "500/s at moderate load does not make the agent look slower");
    // Busy: 400 calls outstanding, answered 0.25 ms apart (4,000/s).
    const slots: Slot[] = [];
    for (let i = 0; i < 400; i++) slots.push(await gate.acquire(new Budget(c.now(), 500, c.now)));
    for (const s of slots) {
      c.advance(0.25);
      s.release(true);
    }
    assert.ok(Math.abs(gate.estimates().costMs - 0.25) < 0.01, `cost ${gate.estimates().costMs}`);
  });
});

describe("the agent's work queue", () => {
  const job = (deadline: number, o: { cancelled?: () => boolean } = {}) => {
    const r = { ran: false, dropped: "" };
    return {
      r,
      job: {
        deadline,
        cancelled: o.cancelled ?? (() => false),
        run: () => {
          r.ran = true;
        },
        drop: (why: string) => {
          r.dropped = why;
        },
      },
    };
  };
  const drained = () => new Promise((r) => setImmediate(() => setImmediate(r)));

  it("cancelled calls and calls past their deadline are dropped without running", async () => {
    const c = fakeClock(1_000_000);
    const q = new WorkQueue({ maxQueued: 10, now: c.now });
    let cancelled = false;
    const a = job(c.now() + 1000, { cancelled: () => cancelled });
    const b = job(c.now() + 10);
    const d = job(c.now() + 1000);
    assert.equal(q.submit(a.job), undefined);
    assert.equal(q.submit(b.job), undefined);
    assert.equal(q.submit(d.job), undefined);
    cancelled = true; // the caller goes away while queued
    c.advance(20); // b's deadline passes while queued
    await drained();
    assert.deepEqual(
      [a.r, b.r, d.r],
      [
        { ran: false, dropped: "CANCELLED" },
        { ran: false, dropped: "DEADLINE_EXCEEDED" },
        { ran: true, dropped: "" },
      ],
    );
    assert.deepEqual(q.stats, { run: 1, dropped: 2, refused: 0 });
  });

  it("a full queue refuses at once; so does a call whose deadline would pass before its turn", async () => {
    const c = fakeClock(1_000_000);
    const q = new WorkQueue({ maxQueued: 2, now: c.now });
    assert.equal(q.submit(job(c.now() + 1000).job), undefined);
    assert.equal(q.submit(job(c.now() + 1000).job), undefined);
    assert.match(q.submit(job(c.now() + 1000).job) ?? "", /queue full/);
    await drained();
    assert.equal(q.length, 0);
    assert.match(q.submit(job(c.now()).job) ?? "", /before the deadline/, "no time left at all");
    assert.equal(q.stats.refused, 2);
  });
});

describe("admission and quota config", () => {
  const dir = mkdtempSync(join(tmpdir(), "xks-admission-cfg-"));
  after(() => rmSync(dir, { recursive: true, force: true }));
  const file = join(dir, "proxy.json");
  const base = (extra: Record<string, unknown>, quota?: unknown) => ({
    region: "us-east-1",
    identity: writeIdentity(dir, "proxy-identity", TEST_IDENTITIES.proxy),
    agents: [{ id: "a", target: "127.0.0.1:1", token: { env: "T" }, identities: writePins(dir, "agent", [TEST_IDENTITIES.agent]) }],
    keyStores: [
      {
        uriPathPrefix: "",
        credentials: [{ accessKeyId: "AAAAAAAAAAAAAAAAAAAAAAAAAA", secretAccessKey: { env: "S" } }],
        keys: ["foo"],
        ...(quota === undefined ? {} : { quota }),
      },
    ],
    ...extra,
  });
  const env = { T: "0123456789abcdef", S: "c2VjcmV0LWEtc2VjcmV0LWEtc2VjcmV0LWEtc2VjcmV0LWE=" };

  it("defaults: a 200 ms budget, 128 calls in flight per agent, a 100 ms queue target, no quota", () => {
    const c = parseProxyConfig(base({}), file, env);
    assert.equal(c.requestBudgetMs, 200);
    assert.deepEqual(c.admission, { maxInFlightPerAgent: 128, queueTargetMs: 100 });
    assert.equal(c.keyStores[0].quota, undefined);
    assert.deepEqual(parseProxyConfig(base({}, { rate: 1800, burst: 400 }), file, env).keyStores[0].quota, { rate: 1800, burst: 400 });
  });

  it("every problem is reported with its field", () => {
    assert.throws(
      () =>
        parseProxyConfig(
          base(
            { requestBudgetMs: 300, admission: { maxInFlightPerAgent: 0, queueTargetMs: 250, extra: 1 } },
            { rate: 0, burst: "x", y: 1 },
          ),
          file,
          env,
        ),
      (err: Error) => {
        for (const f of [
          "requestBudgetMs",
          "admission.maxInFlightPerAgent",
          "admission.queueTargetMs",
          "admission.extra",
          "keyStores[0].quota.rate",
          "keyStores[0].quota.burst",
          "keyStores[0].quota.y",
        ]) {
          assert.ok(err.message.includes(f), `${f} in: ${err.message}`);
        }
        return true;
      },
    );
    assert.throws(
      () => parseProxyConfig(base({ requestBudgetMs: 50, admission: { queueTargetMs: 80 } }), file, env),
      /queueTargetMs: must be <= requestBudgetMs/,
    );
  });
});
