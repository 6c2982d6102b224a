/**
 * The agent under a backlog, on a real SoftHSM token (testbed/in-process.ts):
 * it never works for a caller who has gone, bounds its queue, and answers
 * health during a backlog. The backlog is made certain by an HSM call that
 * holds the agent's event loop for as long as the test says (the agent's
 * crypto is synchronous), and the HSM work done is counted at `runWithKey`.
 * All calls of a case are issued in one tick, so they reach the agent
 * together, behind the one that holds the loop.
 */
import assert from "node:assert/strict";
import { after, afterEach, before, describe, it } from "node:test";
import * as grpc from "@grpc/grpc-js";
import { type AgentTestClient, agentClient, type CallError } from "../../testbed/grpc-client.ts";
import { startTestAgent, type TestAgent } from "../../testbed/in-process.ts";
import { agentMetadata } from "../../testbed/xks/metadata.ts";
import type { OperationRecord } from "../../agent/server.ts";
import type { XksAgentClient } from "../../shared/proto.ts";

/** Counts HSM work per key label; the first call for `holdLabel` holds the event loop for `holdMs` (and may run `during`). */
function instrument(t: TestAgent) {
  const hsm = t.agent.hsm;
  const original = hsm.runWithKey.bind(hsm);
  const counts: Record<string, number> = {};
  const ctl = { holdLabel: "", holdMs: 0, during: undefined as (() => void) | undefined, holdEvery: false };
  hsm.runWithKey = ((what: string, label: string, ...rest: unknown[]) => {
    counts[label] = (counts[label] ?? 0) + 1;
    if (label === ctl.holdLabel && ctl.holdMs > 0) {
      const ms = ctl.holdMs;
      if (!ctl.holdEvery) ctl.holdMs = 0;
      ctl.during?.();
      ctl.during = undefined;
      const end = performance.now() + ms;
      while (performance.now() < end) {
        /* the agent's loop is busy, as with a slow HSM */
      }
    }
    return (original as (...a: unknown[]) => unknown)(what, label, ...rest);
  }) as typeof hsm.runWithKey;
  return { counts, ctl, restore: () => (hsm.runWithKey = original) };
}

const encReq = (keyId: string) => ({ metadata: agentMetadata("Encrypt"), keyId, plaintext: Buffer.from("queued"), aad: Buffer.alloc(0) });

describe("the agent under a backlog", () => {
  let t: TestAgent;
  let c: AgentTestClient;
  let inst: ReturnType<typeof instrument>;
  const records: OperationRecord[] = [];

  before(async () => {
    t = await startTestAgent({ extra: { maxQueued: 8 } });
    t.agent.events.on("operation", (r: OperationRecord) => records.push(r));
    c = agentClient(t.target, t.token);
    await c.call("GetHealthStatus", {}); // connected
  });
  afterEach(() => inst?.restore());
  after(async () => {
    c?.close();
    await t?.destroy();
  });

  /** Every queued call before it has been taken off the queue (FIFO) once a new queued call is answered. */
  const barrier = () => c.call("Encrypt", encReq(t.keys.default));
  const DROPPED = new Set(["DEADLINE_EXCEEDED", "CANCELLED", "THROTTLING"]);

  it("calls whose deadline passes while they wait are dropped without HSM work", async () => {
    inst = instrument(t);
    const K = t.keys;
    inst.ctl.holdLabel = K.default;
    inst.ctl.holdMs = 300;
    const holder = c.call("Encrypt", encReq(K.default));
    const late = Promise.allSettled(Array.from({ length: 5 }, () => c.call("Encrypt", encReq(K.encryptOnly), { deadlineMs: 100 })));
    await holder;
    for (const o of await late) {
      assert.equal(o.status, "rejected");
      assert.ok(
        [grpc.status.DEADLINE_EXCEEDED, grpc.status.RESOURCE_EXHAUSTED].includes(((o as PromiseRejectedResult).reason as CallError).code),
      );
    }
    await barrier();
    assert.equal(inst.counts[K.encryptOnly] ?? 0, 0, "no HSM work for callers out of time");
    const results = records.filter((r) => r.keyId === K.encryptOnly).map((r) => r.result);
    assert.ok(results.length > 0 && results.every((r) => DROPPED.has(r)), JSON.stringify(results));
  });

  it("calls cancelled by their caller while they wait are dropped without HSM work", async () => {
    inst = instrument(t);
    const K = t.keys;
    const calls: grpc.ClientUnaryCall[] = [];
    const outcomes: Array<Promise<grpc.status>> = [];
    const md = new grpc.Metadata();
    md.set("x-xks-agent-token", t.token);
    // The caller gives up while the agent is busy with the calls ahead (two, so that the
    // cancellations, sent from this same process, reach the agent before the queue moves on).
    inst.ctl.holdLabel = K.default;
    inst.ctl.holdMs = 100;
    inst.ctl.holdEvery = true;
    inst.ctl.during = () => {
      for (const call of calls) call.cancel();
    };
    const holder = Promise.all([c.call("Encrypt", encReq(K.default)), c.call("Encrypt", encReq(K.default))]);
    for (let i = 0; i < 4; i++) {
      outcomes.push(
        new Promise((resolve) => {
          calls.push(
            (c.client as unknown as XksAgentClient).Encrypt(
              encReq(K.decryptOnly),
              md,
              { deadline: Date.now() + 30_000 },
              (err: grpc.ServiceError | null) => resolve(err ? err.code : grpc.status.OK),
            ),
          );
        }),
      );
    }
    await holder;
    inst.ctl.holdMs = 0;
    assert.deepEqual(await Promise.all(outcomes), Array(4).fill(grpc.status.CANCELLED));
    await barrier();
    assert.equal(inst.counts[K.decryptOnly] ?? 0, 0, "no HSM work for callers who have gone");
    const results = records.filter((r) => r.keyId === K.decryptOnly).map((r) => r.result);
    assert.ok(
      results.every((r) => r === "CANCELLED"),
      JSON.stringify(results),
    );
  });

  it("a full queue answers RESOURCE_EXHAUSTED (THROTTLING) at once; the queued calls are served", async () => {
    inst = instrument(t);
    const K = t.keys;
    inst.ctl.holdLabel = K.default;
    inst.ctl.holdMs = 100;
    const all = Array.from({ length: 20 }, () => c.call("Encrypt", encReq(K.default)));
    const outcomes = await Promise.allSettled(all);
    const refused = outcomes.filter(
      (o) =>
        o.status === "rejected" &&
        (o.reason as CallError).code === grpc.status.RESOURCE_EXHAUSTED &&
        (o.reason as CallError).reason === "THROTTLING",
    ).length;
    const served = outcomes.filter((o) => o.status === "fulfilled").length;
    assert.equal(
      refused + served,
      20,
      JSON.stringify(outcomes.filter((o) => o.status === "rejected").map((o) => (o as PromiseRejectedResult).reason)),
    );
    assert.ok(refused >= 1, `bounded at 8 queued: ${refused} refused`);
    assert.equal(inst.counts[K.default], served, "HSM work only for the served calls");
  });

  it("health is answered during a backlog, and tells the truth about the HSM", async () => {
    inst = instrument(t);
    const K = t.keys;
    inst.ctl.holdLabel = K.default;
    inst.ctl.holdMs = 40;
    inst.ctl.holdEvery = true; // every queued call holds the loop: 8 × 40 ms of backlog
    let served = 0;
    const backlog = Array.from({ length: 8 }, () => c.call("Encrypt", encReq(K.default)).then(() => served++));
    const h = await c.call("GetHealthStatus", {});
    const servedWhenHealthy = served;
    await Promise.all(backlog);
    assert.equal(h.state, "ACTIVE");
    assert.ok(servedWhenHealthy < 8, `health answered after ${servedWhenHealthy} of 8 queued calls, not behind all of them`);
    assert.ok((inst.counts[K.health] ?? 0) >= 1, "health did real HSM work on its own key");
  });
});
