/**
 * Robustness fuzz: a REAL proxy on 127.0.0.1:0 in front of the REAL agent on a
 * REAL SoftHSM token, hit with >= 10,000 seeded bad requests (fuzz/generator.ts)
 * whose right answers come from a model of the pipeline (fuzz/model.ts); the
 * run (fuzz/runner.ts) happens once, and each test asserts one property of it.
 */
import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import { type ProxyFixture, startProxy, startTestAgent, type TestAgent } from "../../testbed/in-process.ts";
import { until } from "../../testbed/wait.ts";
import { ONLY, PT_B64 } from "./fuzz/generator.ts";
import { STORES } from "./fuzz/model.ts";
import { CATEGORIES, type FuzzRun, runFuzz } from "./fuzz/runner.ts";
import { PREFIX } from "../../testbed/configs.ts";

/** RSS growth bound (full GC before each sample) for the default run; longer runs get 1 MiB more per extra 1,000 cases (allocator retention). */
const RSS_GROWTH_LIMIT = (150 + Math.max(0, Math.ceil((Number(process.env.XKS_FUZZ_COUNT ?? 10_400) - 10_400) / 1000))) * 1024 * 1024;
/** Live JS heap growth bound once the run's own captures are released: a per-request leak in the proxy or agent shows here. */
const HEAP_GROWTH_LIMIT = 32 * 1024 * 1024;
const mib = (n: number) => `${(n / 2 ** 20).toFixed(1)} MiB`;

describe("robustness: >= 10,000 seeded bad requests against the proxy and the real agent", () => {
  let agent: TestAgent;
  let fx: ProxyFixture;
  let run: FuzzRun;

  before(async () => {
    agent = await startTestAgent();
    fx = await startProxy({ agents: [{ id: "mac-1", target: agent.target, token: agent.token }], keys: STORES[PREFIX].keys });
    await until(() => fx.proxy.agents.healthSnapshot()[0].state === "ACTIVE", "the agent ACTIVE");
    run = await runFuzz(fx, agent);
  });
  after(async () => {
    await fx?.close();
    await agent?.destroy();
  });

  it("every case was generated and sent, across every category, mostly signed", () => {
    assert.equal(run.sent, run.planned);
    assert.equal(run.rawSent, run.rawPlanned);
    if (ONLY) return;
    assert.ok(run.sent + run.rawSent >= 10_000, `${run.sent + run.rawSent} requests`);
    assert.ok((run.bySigning.get("signed") ?? 0) > run.sent * 0.7, "most requests are correctly signed (they reach validation)");
    for (const c of CATEGORIES) assert.ok((run.byCategory.get(c) ?? 0) >= 100, `category ${c} ran ${run.byCategory.get(c) ?? 0} times`);
  });

  it("every answer is the model's: a spec status, compact JSON naming a spec error with its own status, never HTML or a stack trace, never a hang", () => {
    assert.deepEqual(run.failures, [], `${run.failures.length} bad answers (${run.seedLine}):\n${run.failures.slice(0, 40).join("\n")}`);
  });

  it("no 500 from malformed input", () => {
    assert.deepEqual(run.fiveHundreds, []);
  });

  it("no secret, plaintext, AAD, Authorization value or signature in the proxy's log, the agent's log or its audit file", () => {
    assert.deepEqual(run.leaks, []);
  });

  it("one completion line per request that reached the app", () => {
    // Requests refused by Node's HTTP parser (the raw cases, some header abuse) never reach it.
    assert.ok(run.completions >= run.sent * 0.9, `${run.completions} completion lines for ${run.sent} requests`);
  });

  it("memory stays bounded: RSS and the live heap after a full GC", () => {
    const m = run.memory;
    assert.ok(m.after.rss - m.before.rss < RSS_GROWTH_LIMIT, `RSS grew by ${mib(m.after.rss - m.before.rss)}`);
    assert.ok(
      m.afterReleased.heapUsed - m.before.heapUsed < HEAP_GROWTH_LIMIT,
      `heap used grew by ${mib(m.afterReleased.heapUsed - m.before.heapUsed)}`,
    );
  });

  it("the proxy stays up: a signed round trip works afterwards, and no connection is left open", () => {
    assert.equal(run.finalEncrypt.status, 200, run.finalEncrypt.text);
    assert.equal(run.finalDecrypt.status, 200, run.finalDecrypt.text);
    assert.equal(run.finalDecrypt.json.plaintext, PT_B64);
    assert.equal(run.connectionsLeft, 0);
  });
});
