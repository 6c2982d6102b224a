/** The proxy's agent pool against a fake agent over real gRPC: the health cache KMS's GetHealthStatus is answered from. */
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { AgentPool } from "../../proxy/agent-client.ts";
import { createLogger } from "../../shared/logging.ts";
import { startFakeAgent } from "../../testbed/fake-agent.ts";
import { pinOf, TEST_IDENTITIES } from "../../testbed/identities.ts";
import { until } from "../../testbed/wait.ts";

describe("agent pool health cache", () => {
  it("UNAVAILABLE before the first answer; older than 60 s → UNAVAILABLE; a stale cache kicks a refresh", async () => {
    const fa = await startFakeAgent({ name: "cache" });
    let now = 1_000_000;
    const pool = new AgentPool({
      agents: [{ id: "x", target: fa.target, token: fa.token, identities: [pinOf(TEST_IDENTITIES.agent)] }],
      identity: TEST_IDENTITIES.proxy,
      deadlineMs: 200,
      healthDeadlineMs: 500,
      healthRefreshMs: 10_000,
      log: createLogger({ level: "silent" }),
      now: () => now,
    });
    try {
      // No start(): the first snapshot itself kicks the refresh and does not wait for it. It
      // returns a plain array (no promise to await) saying what was known before the refresh.
      const first = pool.healthSnapshot();
      assert.ok(Array.isArray(first));
      assert.deepEqual(first, [{ id: "x", state: "UNAVAILABLE" }]);
      await until(() => pool.healthSnapshot()[0].state === "ACTIVE", "the kicked refresh");
      assert.equal(fa.calls.GetHealthStatus, 1);
      now += 25_000; // stale (> 2 refresh periods) but < 60 s: still reported, and refreshed in the background
      assert.equal(pool.healthSnapshot()[0].state, "ACTIVE");
      await until(() => fa.calls.GetHealthStatus === 2, "a background refresh of the stale entry");
      await until(() => pool.healthSnapshot()[0].checkedAt === now, "the refreshed entry");
      now += 61_000; // older than a minute: never reported as ACTIVE
      assert.equal(pool.healthSnapshot()[0].state, "UNAVAILABLE");
      await until(() => pool.healthSnapshot()[0].state === "ACTIVE", "fresh again after the kicked refresh");
      fa.health.state = "DEGRADED";
      await pool.refreshHealth();
      assert.equal(pool.healthSnapshot()[0].state, "DEGRADED");
      await fa.stop();
      await pool.refreshHealth();
      assert.equal(pool.healthSnapshot()[0].state, "UNAVAILABLE");
    } finally {
      pool.close();
      await fa.stop();
    }
  });

  it("a health call that never returns is cut at the health deadline: UNAVAILABLE, and the pool stays usable", async () => {
    const fa = await startFakeAgent({ name: "mute" });
    fa.health.never = true;
    const pool = new AgentPool({
      agents: [{ id: "mute", target: fa.target, token: fa.token, identities: [pinOf(TEST_IDENTITIES.agent)] }],
      identity: TEST_IDENTITIES.proxy,
      deadlineMs: 200,
      healthDeadlineMs: 300,
      healthRefreshMs: 10_000,
      log: createLogger({ level: "silent" }),
    });
    try {
      await pool.refreshHealth(); // resolves although the agent never answers
      const [h] = pool.healthSnapshot();
      assert.equal(h.state, "UNAVAILABLE");
      assert.notEqual(h.checkedAt, undefined);
      assert.equal(fa.calls.GetHealthStatus, 1);
      fa.health.never = false;
      await pool.refreshHealth();
      assert.equal(pool.healthSnapshot()[0].state, "ACTIVE");
    } finally {
      pool.close();
      await fa.stop();
    }
  });
});
