/**
 * Several agents behind one proxy, through the real chain (each agent a
 * process of its own with its own SoftHSM token, tunnelled through a real
 * sshd): the key check values the agents report decide which keys the proxy
 * routes.
 *   - Two agents holding DIFFERENT keys under the same labels: the proxy
 *     refuses those keys (InvalidStateException) instead of answering from
 *     whichever agent a request reaches; health, the log and `xks-proxy
 *     check` name the key and the agents. A clone of the first token put in
 *     place of the second makes the key served again.
 *   - Two agents with CLONED tokens: the same check values, requests spread
 *     over both; one agent stops answering (SIGSTOP, as a sleeping Mac) under
 *     live traffic, retried like KMS: no request fails, and every ciphertext
 *     made before, by either agent, still decrypts.
 */
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { rmSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { keyChecks } from "../../agent/hsm/key-check.ts";
import { encrypt } from "../../agent/ops/encrypt.ts";
import { PACKAGE_ROOT } from "../../shared/paths.ts";
import { type Chain, startChain } from "../../testbed/chain.ts";
import { cloneSoftHsmToken, DIRECT_USE, directOpContext, kmsKeys, onToken, type SoftHsmToken } from "../../testbed/hsm.ts";
import { sampleSum, scrape } from "../../testbed/prometheus.ts";
import { until } from "../../testbed/wait.ts";
import { b64, decryptBody, type EncryptAnswer, encryptBody, healthBody, keyPath, metadataBody } from "../../testbed/xks/bodies.ts";
import { RETRYABLE_STATUSES, type Resp, retryBusy } from "../../testbed/xks/client.ts";
import { decryptProblem, encryptProblem, specErrorOf } from "../../testbed/xks/oracle.ts";

const BIN_PROXY = join(PACKAGE_ROOT, "bin/xks-proxy.js");

/** The check value of every KMS key of the chain's key set on `token`, by label (keys without one left out). */
function checkValues(chain: Chain, token: SoftHsmToken): Map<string, string> {
  return new Map(
    onToken(token, (hsm) => keyChecks(hsm, kmsKeys(chain.keys)))
      .filter((k) => k.checkValue)
      .map((k) => [k.keyId, k.checkValue]),
  );
}

function proxyCheck(chain: Chain): { status: number | null; out: string } {
  const r = spawnSync(process.execPath, [BIN_PROXY, "check", "--config", chain.proxyConfigFile], { encoding: "utf8" });
  return { status: r.status, out: r.stdout + r.stderr };
}

async function fleet(chain: Chain): Promise<Array<[string, string]>> {
  const r = await chain.client.postRetrying("health", healthBody());
  assert.equal(r.status, 200, r.text);
  return r.json.ekmFleetDetails.map((d: { id: string; healthStatus: string }) => [d.id, d.healthStatus]);
}

/** Whether health reports every agent (two) in `state`; false while the proxy is not up yet. */
async function allIn(chain: Chain, state: string): Promise<boolean> {
  const f = await fleet(chain).catch(() => []);
  return f.length === 2 && f.every(([, s]) => s === state);
}

/** The proxy's log lines (JSON) with this message. */
function proxyLines(chain: Chain, pred: (l: Record<string, any>) => boolean): Array<Record<string, any>> {
  return chain.proxy
    .logs()
    .split("\n")
    .filter((l) => l.startsWith("{"))
    .map((l) => JSON.parse(l) as Record<string, any>)
    .filter(pred);
}

/** How many health calls `agent`'s log shows (the proxy asks every second). */
/** Health calls the chain's first agent has answered (its metrics; they are logged at debug only). */
const healthCalls = async (chain: Chain) =>
  sampleSum((await scrape(chain.agentMetricsUrl)).families, "xks_agent_operations_total", { operation: "GetHealthStatus" });

describe("two agents with different keys under the same labels", () => {
  let chain: Chain;
  before(async () => {
    chain = await startChain({ moreAgents: [{ id: "second-mac", token: "new" }] });
  });
  after(() => chain?.stop());

  test("the proxy refuses those keys, never answers from the wrong agent, and says so; a clone makes them served again", async () => {
    const first = checkValues(chain, chain.softhsm);
    const second = checkValues(chain, chain.moreAgents[0].softhsm);
    const served = [chain.keys.default, chain.keys.encryptOnly, chain.keys.decryptOnly];
    for (const k of served) assert.notEqual(first.get(k), second.get(k), `different keys under ${k}`);
    assert.equal(first.has(chain.keys.noUsage), false, "a key that may neither encrypt nor decrypt has no check value");

    // Both agents heard from: each is DEGRADED (its other keys would still be served), not ACTIVE.
    await until(() => allIn(chain, "DEGRADED"), "both agents reported DEGRADED", 60_000, 200);
    assert.deepEqual(await fleet(chain), [
      ["owner-machine", "DEGRADED"],
      ["second-mac", "DEGRADED"],
    ]);

    // A ciphertext the first agent's key made: through the proxy, its Decrypt is refused every
    // time, never answered by the second agent with InvalidCiphertextException (nor by the first).
    const pt = randomBytes(48);
    const aad = Buffer.from("made by owner-machine");
    const made = onToken(chain.softhsm, (hsm) =>
      encrypt(
        directOpContext(hsm, { serve: [chain.keys.default] }),
        { metadata: null, keyId: chain.keys.default, plaintext: pt, aad, wantIntegrityValue: false },
        DIRECT_USE,
      ),
    );
    const answer: EncryptAnswer = {
      ciphertext: b64(made.ciphertext),
      initializationVector: b64(made.iv),
      authenticationTag: b64(made.tag),
      ciphertextMetadata: b64(made.ciphertextMetadata),
    };
    const names = new Map<string, number>();
    const count = (r: Resp) => {
      const n = specErrorOf(r) ?? String(r.status);
      names.set(n, (names.get(n) ?? 0) + 1);
    };
    for (let i = 0; i < 12; i++) {
      count(await chain.client.postRetrying(keyPath(chain.keys.default, "decrypt"), decryptBody(answer, { aad })));
      count(await chain.client.postRetrying(keyPath(chain.keys.default, "encrypt"), encryptBody(pt)));
      count(await chain.client.postRetrying(keyPath(chain.keys.decryptOnly, "metadata"), metadataBody()));
    }
    assert.deepEqual([...names], [["InvalidStateException", 36]], "every operation on a key the agents disagree on is refused");

    // The log: one error per key, naming the key and the agents, however many refreshes passed.
    const calls = await healthCalls(chain);
    await until(async () => (await healthCalls(chain)) >= calls + 3, "three more health refreshes");
    const errors = proxyLines(chain, (l) => l.level === "error" && typeof l.keyId === "string");
    assert.deepEqual(errors.map((l) => l.keyId).sort(), [...served].sort(), "one error line per key");
    for (const l of errors) {
      assert.deepEqual(l.agentGroups, [["owner-machine"], ["second-mac"]]);
      assert.match(l.msg, /differ between agents \[owner-machine\] vs \[second-mac\]/);
    }

    // `xks-proxy check` fails and names the key and both agents.
    const c = proxyCheck(chain);
    assert.equal(c.status, 1, c.out);
    for (const k of served)
      assert.match(c.out, new RegExp(`✗ key ${k}: key check values differ between agents \\[owner-machine\\] vs \\[second-mac\\]`));

    // No check value reached the proxy's log, its answers or the check's output.
    const everything = chain.proxy.logs() + c.out + JSON.stringify(await fleet(chain));
    for (const v of [...first.values(), ...second.values()]) assert.ok(!everything.includes(v.split(":")[1]), "no check value leaks");

    // The remedy: the second agent gets a clone of the first agent's token.
    const m = chain.moreAgents[0];
    await m.agent.stop();
    rmSync(m.softhsm.dir, { recursive: true, force: true });
    cloneSoftHsmToken(chain.softhsm, m.softhsm.dir);
    m.agent.start();
    await until(
      () => proxyLines(chain, (l) => /agree again/.test(l.msg ?? "")).length === served.length,
      "the proxy to see the check values agree",
      60_000,
      100,
    );
    const d = await chain.client.postRetrying(keyPath(chain.keys.default, "decrypt"), decryptBody(answer, { aad }));
    assert.equal(decryptProblem(d, pt), undefined);
    const ok = proxyCheck(chain);
    assert.equal(ok.status, 0, ok.out);
    assert.match(ok.out, /✓ key check values agree for 3 key\(s\) held by more than one agent/);
  });
});

describe("two agents with cloned tokens", () => {
  let chain: Chain;
  before(async () => {
    chain = await startChain({ moreAgents: [{ id: "second-mac", token: "clone" }] });
  });
  after(async () => {
    chain?.moreAgents[0]?.agent.proc?.kill("SIGCONT");
    await chain?.stop();
  });

  test("same check values, requests spread; one agent stops answering under live traffic: no request fails, every ciphertext decrypts", async () => {
    assert.deepEqual(checkValues(chain, chain.moreAgents[0].softhsm), checkValues(chain, chain.softhsm));
    await until(() => allIn(chain, "ACTIVE"), "both agents ACTIVE", 60_000, 200);
    const c = proxyCheck(chain);
    assert.equal(c.status, 0, c.out);
    assert.match(c.out, /✓ key check values agree for 3 key\(s\)/);

    const key = chain.keys.default;
    const made: Array<{ pt: Buffer; aad: Buffer; answer: EncryptAnswer }> = [];
    const encryptOne = async () => {
      const pt = randomBytes(16 + Math.floor(Math.random() * 100));
      const aad = randomBytes(8);
      const r = await chain.client.postRetrying(keyPath(key, "encrypt"), encryptBody(pt, { aad }));
      assert.equal(encryptProblem(r, { plaintext: pt, aad }), undefined, r.text);
      made.push({ pt, aad, answer: r.json });
    };
    for (let i = 0; i < 20; i++) await encryptOne();
    const servedBy = (from: number) =>
      proxyLines(chain, (l) => l.msg === "request" && l.operation === "Encrypt" && l.status === 200)
        .slice(from)
        .map((l) => l.agent);
    const spread = servedBy(0);
    assert.ok(spread.includes("owner-machine") && spread.includes("second-mac"), `both agents served: ${spread}`);

    // Live traffic: loops of Encrypt → Decrypt, each request retried on 429/503 like KMS
    // (jittered exponential backoff, at most 10 attempts).
    let running = true;
    const outcomes = { pairs: 0, busyAnswers: 0, failures: [] as string[] };
    const retrying = (rest: string, body: unknown) =>
      retryBusy(() =>
        chain.client.post(rest, body).then((r) => {
          if (RETRYABLE_STATUSES.has(r.status)) outcomes.busyAnswers++;
          return r;
        }),
      );
    const loop = async () => {
      while (running) {
        const pt = randomBytes(32);
        const aad = randomBytes(8);
        const e = await retrying(keyPath(key, "encrypt"), encryptBody(pt, { aad }));
        const ep = encryptProblem(e, { plaintext: pt, aad });
        if (ep) {
          outcomes.failures.push(`encrypt: ${ep}`);
          continue;
        }
        made.push({ pt, aad, answer: e.json });
        const d = await retrying(keyPath(key, "decrypt"), decryptBody(e.json, { aad }));
        const dp = decryptProblem(d, pt);
        if (dp) outcomes.failures.push(`decrypt: ${dp}`);
        outcomes.pairs++;
      }
    };
    const loops = [loop(), loop(), loop()];
    await until(() => outcomes.pairs >= 20, "traffic through both agents");

    // The second machine goes to sleep: its process stops answering, its connections stay open.
    const m = chain.moreAgents[0];
    m.agent.proc!.kill("SIGSTOP");
    await until(async () => (await fleet(chain))[1][1] === "UNAVAILABLE", "the sleeping agent UNAVAILABLE", 60_000, 200);
    // A 200 from the stopped agent can only have been logged before it stopped (pino's `time` is when the line was made).
    const unavailableAt = Date.now();
    const pairsThen = outcomes.pairs;
    await until(() => outcomes.pairs >= pairsThen + 40, "traffic on the remaining agent");
    running = false;
    await Promise.all(loops);
    assert.deepEqual(outcomes.failures, [], "no request failed (busy answers retried like KMS)");
    const later = () =>
      proxyLines(chain, (l) => l.msg === "request" && l.key === key && l.status === 200 && Date.parse(l.time) >= unavailableAt);
    await until(() => later().length >= 40, "the proxy's log of the requests after the stop (written at least once a second)");
    assert.deepEqual([...new Set(later().map((l) => l.agent))], ["owner-machine"], "only the awake agent served");

    // Every ciphertext made before and during, by either agent, decrypts on the remaining one.
    for (const x of made) {
      const d = await chain.client.postRetrying(keyPath(key, "decrypt"), decryptBody(x.answer, { aad: x.aad }));
      assert.equal(decryptProblem(d, x.pt), undefined, d.text);
    }
    console.log(
      `cloned tokens: ${spread.filter((a) => a === "second-mac").length}/${spread.length} warm-up encrypts on second-mac; ` +
        `${outcomes.pairs} live pairs (${outcomes.busyAnswers} busy answers retried), ${made.length} ciphertexts decrypted after the stop, no failure`,
    );
    m.agent.proc!.kill("SIGCONT");
  });
});
