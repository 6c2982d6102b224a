/**
 * Faults under steady traffic, through the real chain (proxy ⇄ real OpenSSH
 * sshd ⇄ agent ⇄ SoftHSM). For every fault: no wrong answer, every request
 * answered (a hang is a request without an answer after 10 s, with the
 * proxy's agent deadline at 200 ms), every failure one of the spec's errors
 * (or a refused connection while the proxy itself is down), and the service
 * comes back by itself once the path is whole again. How long it takes to
 * come back is printed, not asserted: that is a figure of the machine.
 */
import assert from "node:assert/strict";
import { renameSync } from "node:fs";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { type Chain, startChain } from "../../testbed/chain.ts";
import { killQuietly } from "../../testbed/procs.ts";
import { sleep, until } from "../../testbed/wait.ts";
import { type FaultReport, faultReport, Traffic } from "../../testbed/xks/traffic.ts";

let chain: Chain;

before(async () => {
  chain = await startChain();
  await chain.waitActive();
});

after(() => chain?.stop());

const countTunnelUp = () =>
  chain.agent
    .logs()
    .split("\n")
    .filter((l) => l.includes('"msg":"tunnel up"')).length;

function check(name: string, r: FaultReport, opts: { netErrorsAllowed?: boolean } = {}): void {
  console.log(`# ${name}: ${JSON.stringify({ ...r, wrong: r.wrong.length })}`);
  assert.equal(r.wrong.length, 0, `${name}: wrong answers: ${JSON.stringify(r.wrong.slice(0, 3))}`);
  assert.equal(r.hangs, 0, `${name}: requests without an answer`);
  if (!opts.netErrorsAllowed) assert.equal(r.netErrors, 0, `${name}: connection errors while the proxy was up`);
  for (const k of Object.keys(r.specErrors))
    assert.match(k, /^(503 DependencyTimeoutException|429 ThrottlingException|500 InternalException)$/, name);
  assert.ok(r.okBefore > 0, `${name}: no traffic got through before the fault`);
  assert.ok(r.recoveryMs !== undefined && r.okAfter > 0, `${name}: service never came back`);
}

/**
 * Runs `fault` under traffic: the traffic first gets through once, then the
 * fault runs and resolves when the path is whole again; the traffic goes on
 * until ten requests in a row have succeeded after that.
 */
async function underTraffic(fault: () => Promise<number>): Promise<FaultReport> {
  const tr = new Traffic(chain, chain.keys.default, { concurrency: 4, hangMs: 10_000, pauseMs: 5 });
  tr.start();
  await until(() => tr.samples.some((s) => s.kind === "ok"), "traffic to get through before the fault");
  const faultAt = performance.now();
  const wholeAt = await fault();
  await until(() => {
    const after = tr.samples.filter((s) => s.start >= wholeAt && s.end > 0);
    return after.length >= 10 && after.slice(-10).every((s) => s.kind === "ok");
  }, "ten successes in a row after the path was whole again");
  await tr.stop();
  return faultReport(tr.samples, faultAt, wholeAt);
}

test("kill -9 of the sshd session process mid-traffic", async () => {
  const ups = countTunnelUp();
  const r = await underTraffic(async () => {
    const pids = chain.sshd.sessionPids();
    assert.ok(pids.length > 0);
    for (const pid of pids) killQuietly(pid, "SIGKILL");
    // The agent notices and dials again by itself: the path is whole when its tunnel is up again.
    return until(() => countTunnelUp() > ups, "the tunnel to come back");
  });
  check("sshd session killed", r);
});

test("sshd stopped for a second and started again", async () => {
  const ups = countTunnelUp();
  const r = await underTraffic(async () => {
    await chain.sshd.restart(1000);
    await until(() => countTunnelUp() > ups, "the tunnel to come back");
    return performance.now();
  });
  check("sshd restarted", r);
});

test("agent restarted", async () => {
  const ups = countTunnelUp();
  const r = await underTraffic(async () => {
    await chain.agent.stop();
    await sleep(300);
    chain.agent.start();
    return until(() => countTunnelUp() > ups, "the new agent's tunnel");
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
    return until(
      () =>
        fetch(`${chain.url}/ping`).then(
          (res) => res.ok,
          () => false,
        ),
      "the proxy to answer /ping",
    );
  });
  // While the proxy process is gone its port refuses connections: that is what the ALB would see too.
  check("proxy restarted", r, { netErrorsAllowed: true });
});
