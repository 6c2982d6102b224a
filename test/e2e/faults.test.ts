/**
 * Faults under steady traffic, through the real chain (proxy ⇄ real OpenSSH
 * sshd ⇄ agent ⇄ SoftHSM). For every fault: no wrong answer, no request
 * without an answer past its deadline, every failure a spec error (or a
 * refused/reset connection while the proxy itself is down), and service back
 * within 2 s of the path being whole again.
 */
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, renameSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { startChain, type Chain } from "../scripts/lib/chain.ts";
import { report, Traffic, type FaultReport } from "./helpers/traffic.ts";

let chain: Chain;
let root: string;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
/** A request gets its answer (success or error) well inside this; KMS's own budget is 250 ms. */
const HANG_MS = 1500;
const RECOVERY_MS = 2000;

before(async () => {
  root = mkdtempSync(join(tmpdir(), "xks-faults-"));
  chain = await startChain({ dir: join(root, "chain") });
  await chain.waitActive(30000);
});

after(async () => {
  await chain?.stop();
  rmSync(root, { recursive: true, force: true });
});

function traffic(): Traffic {
  return new Traffic({ ...chain, key: chain.keys.default }, { concurrency: 4, timeoutMs: 3000, pauseMs: 5 });
}

/** Waits until `cond()` holds; returns performance.now() at that moment. */
async function when(cond: () => boolean, timeoutMs: number, what: string): Promise<number> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(10);
  }
  return performance.now();
}

const countTunnelUp = () => chain.agent.logs().split("\n").filter((l) => l.includes('"msg":"tunnel up"')).length;

function check(name: string, r: FaultReport, opts: { netErrorsAllowed?: boolean } = {}): void {
  console.log(`# ${name}: ${JSON.stringify({ ...r, wrong: r.wrong.length })}`);
  assert.equal(r.wrong.length, 0, `${name}: wrong answers: ${JSON.stringify(r.wrong.slice(0, 3))}`);
  assert.equal(r.timeouts, 0, `${name}: requests without an answer`);
  assert.ok(r.maxMs < HANG_MS, `${name}: slowest answer took ${r.maxMs} ms`);
  if (!opts.netErrorsAllowed) assert.equal(r.netErrors, 0, `${name}: connection errors while the proxy was up`);
  for (const k of Object.keys(r.specErrors)) assert.match(k, /^(503 DependencyTimeoutException|500 InternalException)$/, name);
  assert.ok(r.recoveryMs !== undefined, `${name}: service never came back`);
  assert.ok(r.recoveryMs <= RECOVERY_MS, `${name}: service back ${r.recoveryMs} ms after the path was whole`);
  assert.ok(r.ok > 20, `${name}: too little traffic got through (${r.ok})`);
}

async function underTraffic(fault: () => Promise<number>, settleMs = 2500): Promise<FaultReport> {
  const tr = traffic();
  tr.start();
  await sleep(500);
  const wholeAt = await fault();
  await sleep(settleMs);
  await tr.stop();
  return report(tr.samples, wholeAt);
}

test("kill -9 of the sshd session process mid-traffic", async () => {
  const ups = countTunnelUp();
  const r = await underTraffic(async () => {
    const pids = chain.sshd.sessionPids();
    assert.ok(pids.length > 0);
    for (const pid of pids) {
      try {
        process.kill(pid, "SIGKILL");
      } catch {
        /* already gone */
      }
    }
    // The agent notices and dials again by itself: the path is whole when its tunnel is up again.
    return when(() => countTunnelUp() > ups, 5000, "the tunnel to come back");
  });
  check("sshd session killed", r);
});

test("sshd stopped for a second and started again", async () => {
  const ups = countTunnelUp();
  const r = await underTraffic(async () => {
    await chain.sshd.restart(1000);
    const sshdBack = performance.now();
    await when(() => countTunnelUp() > ups, 5000, "the tunnel to come back");
    return sshdBack;
  });
  check("sshd restarted", r);
});

test("agent restarted", async () => {
  const ups = countTunnelUp();
  const r = await underTraffic(async () => {
    await chain.agent.stop();
    await sleep(300);
    chain.agent.start();
    return when(() => countTunnelUp() > ups, 10000, "the new agent's tunnel");
  });
  check("agent restarted", r);
});

test("the HSM fails (token directory gone) for a second and comes back", async () => {
  const tokens = join(chain.softhsm.dir, "tokens");
  const r = await underTraffic(async () => {
    renameSync(tokens, `${tokens}.gone`);
    await sleep(1000);
    renameSync(`${tokens}.gone`, tokens);
    return performance.now();
  });
  check("HSM failed", r);
  assert.ok((r.specErrors["503 DependencyTimeoutException"] ?? 0) > 0, "the outage was seen as 503 DependencyTimeoutException");
});

test("proxy restarted", async () => {
  const r = await underTraffic(async () => {
    await chain.proxy.stop();
    await sleep(300);
    chain.proxy.start();
    // Whole again once it answers its load balancer ping.
    const deadline = Date.now() + 10000;
    while (Date.now() < deadline) {
      const ok = await fetch(`${chain.url}/ping`).then((r) => r.ok, () => false);
      if (ok) return performance.now();
      await sleep(10);
    }
    throw new Error("the proxy did not come back");
  });
  // While the proxy process is gone its port refuses connections: that is what the ALB would see too.
  check("proxy restarted", r, { netErrorsAllowed: true });
});
