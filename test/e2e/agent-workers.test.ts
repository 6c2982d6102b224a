/**
 * The agent with two workers (config `workers: 2`, agent/pool.ts), the whole
 * chain real (bin/xks-agent.js, SoftHSM, sshd, the proxy), and gRPC clients of
 * the agent's own socket, each on a connection of its own, so that calls
 * arrive on connections served by each worker. Which worker served a call is
 * read from its operation log line (`worker`).
 *
 * Needs `npm run build` first.
 */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { promisify } from "node:util";
import { listSegments } from "../../agent/audit.ts";
import { PACKAGE_ROOT } from "../../shared/paths.ts";
import { auditOps } from "../../testbed/audit.ts";
import { CHAIN_PREFIX, type Chain, startChain } from "../../testbed/chain.ts";
import { type AgentTestClient, agentClient, type CallError } from "../../testbed/grpc-client.ts";
import { killQuietly } from "../../testbed/procs.ts";
import { until } from "../../testbed/wait.ts";
import { encryptBody, healthBody, keyPath } from "../../testbed/xks/bodies.ts";
import { agentMetadata } from "../../testbed/xks/metadata.ts";

const run = promisify(execFile);
const BIN = join(PACKAGE_ROOT, "bin/xks-agent.js");

let chain: Chain;
const clients: AgentTestClient[] = [];
let seq = 0;

/** The agent's log lines (JSON) so far. */
function agentLog(): Array<Record<string, any>> {
  return chain.agent
    .logs()
    .split("\n")
    .filter((l) => l.startsWith("{"))
    .map((l) => JSON.parse(l) as Record<string, any>);
}

/** The operation log line of the call with this kmsRequestId, once the agent has written it (logs are flushed within a second). */
async function opLine(id: string): Promise<Record<string, any>> {
  let line: Record<string, any> | undefined;
  await until(() => {
    line = agentLog().find((l) => l.msg === "operation" && l.kmsRequestId === id);
    return line !== undefined;
  }, `the operation line of ${id}`);
  return line!;
}

function encrypt(c: AgentTestClient, id: string, key = chain.keys.default): Promise<any> {
  return c.call("Encrypt", {
    metadata: agentMetadata("Encrypt", { kmsRequestId: id }, CHAIN_PREFIX),
    keyId: key,
    plaintext: Buffer.from("thirty-two bytes of plaintext!!!"),
  });
}

async function refusal(p: Promise<unknown>): Promise<CallError> {
  try {
    await p;
  } catch (err) {
    return err as CallError;
  }
  throw new Error("the call was answered; a refusal was expected");
}

/** Which worker served each client's connection, from one call on each. */
async function workersOfClients(tag: string): Promise<number[]> {
  const ids = clients.map((_, i) => `${tag}-${i}-${seq++}`);
  await Promise.all(clients.map((c, i) => encrypt(c, ids[i])));
  return Promise.all(ids.map(async (id) => (await opLine(id)).worker as number));
}

async function agentCli(...args: string[]): Promise<string> {
  const r = await run(process.execPath, [BIN, ...args, "--config", chain.agentConfigFile], {
    env: { ...process.env, ...chain.softhsm.env },
  });
  return r.stdout;
}

/** Resolves once the primary logs that the owner's controls (as `pred` wants them) are in force on every worker. */
async function inForceOnEveryWorker(pred: (l: Record<string, any>) => boolean, what: string): Promise<void> {
  const before = agentLog().length;
  await until(
    () =>
      agentLog()
        .slice(before)
        .some((l) => l.msg === "owner controls in force on every worker" && pred(l)),
    what,
  );
}

before(async () => {
  chain = await startChain({ agentWorkers: 2, agentConnections: 2 });
  await chain.waitActive();
  for (let i = 0; i < 4; i++) clients.push(agentClient(`unix://${chain.agentSocket}`, chain.agentToken, {}, { ownConnection: true }));
});

after(async () => {
  for (const c of clients) c.close();
  await chain?.stop();
});

describe("an agent with two workers", () => {
  test("each worker opens its own HSM session, and operations succeed through both", async () => {
    const workers = await workersOfClients("sessions");
    assert.deepEqual([...new Set(workers)].sort(), [0, 1], `connections spread over both workers (got ${workers})`);
    const opens = agentLog().filter((l) => l.msg === "HSM session open");
    const byWorker = new Map(opens.filter((l) => l.worker !== undefined).map((l) => [l.worker as number, l.pid as number]));
    assert.deepEqual([...byWorker.keys()].sort(), [0, 1]);
    assert.notEqual(byWorker.get(0), byWorker.get(1), "two processes");
    assert.ok(
      opens.some((l) => l.worker === undefined && l.pid === chain.agent.pid),
      "the primary has its own session (the audit log's seals)",
    );
  });

  test("one proxy process's calls reach both workers (its `connections` channels to the agent)", async () => {
    // The chain's proxy is one process with two channels to the agent (`connections: 2`); calls in
    // flight together go to the channel with the fewest outstanding, and the agent's primary
    // hands each channel's connection to the worker with the fewest connections.
    const ids = Array.from({ length: 16 }, () => `via-proxy-${seq++}`);
    const answers = await Promise.all(
      ids.map((id) =>
        chain.client.postRetrying(
          keyPath(chain.keys.default, "encrypt"),
          encryptBody(Buffer.from("sixteen bytes!!!"), { metadata: { kmsRequestId: id } }),
        ),
      ),
    );
    assert.deepEqual(
      answers.map((a) => a.status),
      ids.map(() => 200),
    );
    const workers = await Promise.all(ids.map(async (id) => (await opLine(id)).worker as number));
    assert.deepEqual([...new Set(workers)].sort(), [0, 1], `calls through the proxy served by both workers (got ${workers})`);
  });

  test("pause, disable and resume reach every worker", async () => {
    const workers = await workersOfClients("switch");
    assert.deepEqual([...new Set(workers)].sort(), [0, 1]);

    const paused = inForceOnEveryWorker((l) => l.paused === true, "the pause on every worker");
    await agentCli("pause");
    await paused;
    for (const [i, c] of clients.entries()) {
      const id = `paused-${i}`;
      const e = await refusal(encrypt(c, id));
      assert.equal(e.reason, "INVALID_STATE");
      // Refused by the worker before any HSM work (its own copy of the switch), not only at the record.
      assert.equal((await opLine(id)).detail, "the owner has paused the agent");
    }
    // Health through the proxy says so too (answered by a worker, with the primary's state).
    await until(async () => {
      const h = await chain.client.post("health", healthBody());
      return h.json?.ekmFleetDetails?.[0]?.healthStatus === "UNAVAILABLE";
    }, "health to report the pause");

    const resumed = inForceOnEveryWorker((l) => l.paused === false && l.disabledKeys.length === 0, "the resume on every worker");
    await agentCli("resume");
    await resumed;
    for (const [i, c] of clients.entries()) await encrypt(c, `resumed-${i}`);

    const disabled = inForceOnEveryWorker((l) => l.disabledKeys.includes(chain.keys.default), "the disabled key on every worker");
    await agentCli("keys", "disable", "--label", chain.keys.default);
    await disabled;
    for (const [i, c] of clients.entries()) {
      const e = await refusal(encrypt(c, `disabled-${i}`));
      assert.equal(e.reason, "INVALID_STATE");
      assert.match(String((await opLine(`disabled-${i}`)).detail), /disabled by the owner/);
      // Another key is still served on the same connection.
      await encrypt(c, `other-key-${i}`, chain.keys.encryptOnly);
    }
    const enabled = inForceOnEveryWorker((l) => l.disabledKeys.length === 0, "the enabled key on every worker");
    await agentCli("keys", "enable", "--label", chain.keys.default);
    await enabled;
    for (const [i, c] of clients.entries()) await encrypt(c, `enabled-${i}`);
    const served = await Promise.all(clients.map((_, i) => opLine(`enabled-${i}`)));
    assert.deepEqual([...new Set(served.map((l) => l.worker))].sort(), [0, 1], "served again by both workers");
  });

  test("a changed policy file reaches every worker", async () => {
    const late = "arn:aws:iam::123456789012:user/late";
    const asLate = (c: AgentTestClient, id: string) =>
      c.call("Encrypt", {
        metadata: agentMetadata("Encrypt", { kmsRequestId: id, awsPrincipalArn: late }, CHAIN_PREFIX),
        keyId: chain.keys.default,
        plaintext: Buffer.from("x"),
      });
    for (const [i, c] of clients.entries()) await asLate(c, `before-policy-${i}`);
    const mark = agentLog().length;
    const policy = JSON.parse(readFileSync(chain.agentPolicyFile, "utf8"));
    policy.rules.push({ name: "deny-late", effect: "deny", match: { awsPrincipalArn: ["*:user/late"] } });
    writeFileSync(chain.agentPolicyFile, JSON.stringify(policy));
    await until(
      () =>
        agentLog()
          .slice(mark)
          .some((l) => l.msg === "policy in force on every worker"),
      "the new policy on every worker",
    );
    const workers = new Set<number>();
    for (const [i, c] of clients.entries()) {
      const e = await refusal(asLate(c, `after-policy-${i}`));
      assert.equal(e.reason, "ACCESS_DENIED");
      const line = await opLine(`after-policy-${i}`);
      assert.equal(line.policyRule, "deny-late");
      workers.add(line.worker);
    }
    assert.deepEqual([...workers].sort(), [0, 1]);
  });

  test("a killed worker is replaced, and the other keeps answering meanwhile", async () => {
    const workers = await workersOfClients("kill");
    const ready = agentLog().filter((l) => l.msg === "worker ready");
    const victim = ready.filter((l) => l.worker === 1).at(-1)!;
    const survivors = clients.filter((_, i) => workers[i] === 0);
    assert.ok(survivors.length > 0, "a client on worker 0");
    assert.ok(killQuietly(victim.pid, "SIGKILL"));
    // Worker 0 answers every call while worker 1 is gone and replaced.
    let during = 0;
    let replaced: Record<string, any> | undefined;
    await until(async () => {
      await Promise.all(survivors.map((c) => encrypt(c, `during-kill-${seq++}`)));
      during++;
      replaced = agentLog().find((l) => l.msg === "worker ready" && l.worker === 1 && l.pid !== victim.pid);
      return replaced !== undefined;
    }, "a new worker 1");
    assert.ok(during > 0);
    assert.ok(agentLog().some((l) => l.msg === "worker exited; its connections are lost; starting another" && l.signal === "SIGKILL"));
    // The clients that were on the killed worker reconnect and are answered (retried like the proxy).
    for (const [i, c] of clients.entries()) {
      await until(
        () =>
          encrypt(c, `after-kill-${i}-${seq++}`).then(
            () => true,
            () => false,
          ),
        `client ${i} answered again`,
      );
    }
    // The new worker serves: a fresh connection goes to the worker with the fewest.
    const fresh = [0, 1, 2].map(() => agentClient(`unix://${chain.agentSocket}`, chain.agentToken, {}, { ownConnection: true }));
    try {
      const ids = fresh.map((_, i) => `fresh-${i}-${seq++}`);
      await Promise.all(fresh.map((c, i) => encrypt(c, ids[i])));
      const lines = await Promise.all(ids.map(opLine));
      assert.ok(
        lines.some((l) => l.worker === 1 && l.pid === replaced!.pid),
        "the new worker 1 serves",
      );
    } finally {
      for (const c of fresh) c.close();
    }
  });

  test("the audit log stays one ordered, keyed chain under concurrent traffic; a tamper is still detected", async () => {
    const N = 200;
    const ids = Array.from({ length: N }, (_, i) => `audit-${i}`);
    const settled = await Promise.allSettled(ids.map((id, i) => encrypt(clients[i % clients.length], id)));
    const answeredOk = settled.filter((s) => s.status === "fulfilled").length;
    // Every call got the agent's own answer (a reason), none lost in transit.
    for (const s of settled) if (s.status === "rejected") assert.ok((s.reason as CallError).reason, "a refusal with the agent's reason");
    const served = new Set((await Promise.all(ids.map(opLine))).map((l) => l.worker));
    assert.deepEqual([...served].sort(), [0, 1], "both workers wrote records");

    // One scrape counts the calls of both workers.
    const scrape = await (await fetch(chain.agentMetricsUrl)).text();
    const encrypts = [...scrape.matchAll(/^xks_agent_operations_total\{operation="Encrypt",[^}]*\} (\d+)$/gm)].reduce(
      (a, m) => a + Number(m[1]),
      0,
    );
    assert.ok(encrypts >= N, `the agent's metrics count every Encrypt (${encrypts})`);

    // The stop drains the workers, then seals and closes the log.
    await chain.agent.stop();
    const auditDir = join(chain.dir, "agent", "state", "audit");
    const ops = auditOps(auditDir).filter((o) => String(o.kmsRequestId).startsWith("audit-"));
    assert.equal(ops.length, N, "one record per call answered");
    assert.equal(ops.filter((o) => o.result === "OK").length, answeredOk);
    assert.deepEqual(new Set(ops.map((o) => o.kmsRequestId)), new Set(ids));

    const verified = await agentCli("audit", "verify");
    assert.match(verified, /audit log intact/);
    assert.match(verified, /MACs checked with the HSM/);

    // One record changed: verify says BROKEN and exits 1.
    const seg = listSegments(auditDir).at(-1)!;
    const text = readFileSync(seg.path, "utf8");
    const target = `"kmsRequestId":"audit-7"`;
    assert.ok(text.includes(target));
    writeFileSync(seg.path, text.replace(target, `"kmsRequestId":"audit-X"`));
    const broken = await agentCli("audit", "verify").then(
      () => assert.fail("verify passed a tampered log"),
      (e: { code: number; stdout: string }) => e,
    );
    assert.equal(broken.code, 1);
    assert.match(broken.stdout, /BROKEN/);
  });
});
