/**
 * Trust between the halves, through the real chain (proxy ⇄ real OpenSSH sshd
 * ⇄ agent ⇄ SoftHSM): whoever binds the agent's socket path or port on the
 * proxy's host gets nothing, and the pinned identities can be rotated under
 * traffic without losing a request.
 *
 * An impostor (testbed/rogue.ts) answers with a TLS server of its own
 * identity and records every byte that reaches it, before and after TLS
 * decryption: neither may hold the agent token, a plaintext, or any of the
 * request's metadata.
 */
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { readFileSync, writeFileSync } from "node:fs";
import { dirname } from "node:path";
import { describe, test } from "node:test";
import { type Chain, startChain } from "../../testbed/chain.ts";
import { type Identity, newIdentity, TEST_IDENTITIES, writeIdentity, writePins } from "../../testbed/identities.ts";
import { encodings, findLeaks } from "../../testbed/logs.ts";
import { type Rogue, rogueForward, squatTcpPort } from "../../testbed/rogue.ts";
import { until } from "../../testbed/wait.ts";
import { decryptBody, encryptBody, healthBody, keyPath } from "../../testbed/xks/bodies.ts";
import type { Resp } from "../../testbed/xks/client.ts";
import { decryptProblem, encryptProblem, specErrorOf } from "../../testbed/xks/oracle.ts";

/** One Encrypt → Decrypt round trip, retried like KMS on busy answers; the answers' problems, if any. */
async function roundTrip(chain: Chain, plaintext: Buffer): Promise<string | undefined> {
  const key = chain.keys.default;
  const e = await chain.client.postRetrying(keyPath(key, "encrypt"), encryptBody(plaintext));
  const ep = encryptProblem(e, { plaintext });
  if (ep) return `encrypt: ${ep}`;
  const d = await chain.client.postRetrying(keyPath(key, "decrypt"), decryptBody(JSON.parse(e.text)));
  const dp = decryptProblem(d, plaintext);
  return dp ? `decrypt: ${dp}` : undefined;
}

/**
 * The agent stops; `takeOver` puts an impostor where its forward was; the
 * proxy must answer 503, never reach the impostor with anything secret, name
 * the identity it was shown, and report the agent UNAVAILABLE with that
 * reason. Then the real agent comes back and service returns.
 */
async function impostorTest(chain: Chain, takeOver: () => Promise<Rogue & { identity?: Identity }>, thenFree: (r: Rogue) => Promise<void>) {
  await chain.waitActive();
  assert.equal(await roundTrip(chain, Buffer.from("before the impostor")), undefined);
  await chain.agent.stop();
  const impostor = await takeOver();

  const plaintext = `plaintext-marker-${randomBytes(8).toString("hex")}`;
  const principal = `arn:aws:iam::111122223333:user/metadata-marker-${randomBytes(4).toString("hex")}`;
  const requestIds: string[] = [];
  const answers: Resp[] = [];
  await until(async () => {
    const kmsRequestId = `req-marker-${randomBytes(6).toString("hex")}`;
    requestIds.push(kmsRequestId);
    answers.push(
      await chain.client.post(
        keyPath(chain.keys.default, "encrypt"),
        encryptBody(Buffer.from(plaintext), { metadata: { awsPrincipalArn: principal, kmsRequestId } }),
      ),
    );
    return impostor.capture().connections > 0 && chain.proxy.logs().includes("agent identity mismatch");
  }, "the proxy to reach the impostor and name the identity it presented");
  for (const a of answers) assert.equal(specErrorOf(a), "DependencyTimeoutException", `${a.status} ${a.text}`);

  const got = impostor.capture();
  assert.equal(got.cleartext.length, 0, "the impostor decrypted nothing");
  const secrets = {
    ...encodings("the agent token", chain.agentToken),
    ...encodings("the plaintext", plaintext),
    ...encodings("the principal", principal),
    ...Object.fromEntries(requestIds.map((id, i) => [`request id ${i}`, id])),
  };
  assert.deepEqual(findLeaks(got.raw.toString("latin1"), secrets), [], "what reached the impostor");

  const mismatch = chain.proxy
    .logs()
    .split("\n")
    .find((l) => l.includes("agent identity mismatch"));
  assert.ok(mismatch?.includes(TEST_IDENTITIES.agent.fingerprint), `names the expected identity: ${mismatch}`);
  if (impostor.identity) assert.ok(mismatch?.includes(impostor.identity.fingerprint), `names the presented identity: ${mismatch}`);
  const health = await chain.client.post("health", healthBody());
  assert.equal(JSON.parse(health.text).ekmFleetDetails[0].healthStatus, "UNAVAILABLE");
  // The proxy's log reaches its file within a second (buffered writes): wait for the line.
  await until(
    () => /"why":"agent identity mismatch[^\n]*"msg":"agent health changed"/.test(chain.proxy.logs()),
    "the proxy to log the health change with the mismatch as its reason",
  );

  await thenFree(impostor);
  chain.agent.start();
  await chain.waitActive();
  assert.equal(await roundTrip(chain, Buffer.from("after the impostor")), undefined);
}

describe("an impostor where the agent's forward should be gets nothing", () => {
  test("socket mode: a second authorised tunnel key rebinds the socket path (StreamLocalBindUnlink)", async () => {
    const chain = await startChain();
    try {
      const identity = newIdentity("rogue");
      await impostorTest(
        chain,
        async () => Object.assign(await rogueForward(chain.sshd, chain.remoteSocket, identity), { identity }),
        // The rogue stays connected: the agent's new forward takes the path back from it.
        async () => {},
      );
    } finally {
      await chain.stop();
    }
  });

  test("TCP mode: an unprivileged local user squats the loopback port while the tunnel is down", async () => {
    const chain = await startChain({ tunnel: "tcp" });
    try {
      const identity = newIdentity("squatter");
      await impostorTest(
        chain,
        async () => {
          const s = await squatTcpPort(chain.remoteTcpPort, identity);
          if (process.getuid?.() === 0) assert.equal(s.uid, 65534, "the squatter runs as nobody");
          return Object.assign(s, { identity });
        },
        // The port is the squatter's until it leaves; the agent's forward request is retried until it binds.
        (s) => s.stop(),
      );
    } finally {
      await chain.stop();
    }
  });
});

/** Rewrites a JSON config file in place. */
function editJson(file: string, edit: (c: Record<string, any>) => void): void {
  const c = JSON.parse(readFileSync(file, "utf8"));
  edit(c);
  writeFileSync(file, JSON.stringify(c, null, 2));
}

test("both identities are rotated under live traffic (two pins at once, SIGHUP) without losing a request", async () => {
  const chain = await startChain();
  const agentDir = dirname(chain.agentConfigFile);
  const proxyDir = dirname(chain.proxyConfigFile);
  let stop = false;
  const problems: string[] = [];
  let trips = 0;
  const worker = async (w: number) => {
    for (let i = 0; !stop; i++) {
      const p = await roundTrip(chain, Buffer.from(`rotation ${w}-${i}`));
      trips++;
      if (p) problems.push(p);
    }
  };
  const reloaded = async (daemon: "agent" | "proxy", line: string) => {
    const d = chain[daemon];
    const before = d.logs().split(line).length;
    process.kill(d.pid!, "SIGHUP");
    await until(() => d.logs().split(line).length > before, `the ${daemon} to log "${line}"`);
  };
  const tripsNow = async () => {
    const at = trips;
    await until(() => trips >= at + 5, "traffic to go on after the step");
  };
  try {
    await chain.waitActive();
    const workers = [0, 1].map(worker);
    await tripsNow();

    // The agent's identity: the proxy pins the new one beside the old, the agent switches, the old pin goes.
    const agentNext = newIdentity("xks-agent next");
    editJson(chain.proxyConfigFile, (c) => {
      c.agents[0].identities = writePins(proxyDir, "agent-rotation", [TEST_IDENTITIES.agent, agentNext]);
    });
    await reloaded("proxy", "agent channel re-opened");
    await tripsNow();
    editJson(chain.agentConfigFile, (c) => {
      c.identity = writeIdentity(agentDir, "agent-identity-next", agentNext);
    });
    await reloaded("agent", "identities reloaded");
    await tripsNow();
    editJson(chain.proxyConfigFile, (c) => {
      c.agents[0].identities = writePins(proxyDir, "agent-rotated", [agentNext]);
    });
    await reloaded("proxy", "agent channel re-opened");
    await tripsNow();

    // The proxy's identity, the same way round.
    const proxyNext = newIdentity("xks-proxy next");
    editJson(chain.agentConfigFile, (c) => {
      c.proxyIdentities = writePins(agentDir, "proxy-rotation", [TEST_IDENTITIES.proxy, proxyNext]);
    });
    await reloaded("agent", "identities reloaded");
    await tripsNow();
    editJson(chain.proxyConfigFile, (c) => {
      c.identity = writeIdentity(proxyDir, "proxy-identity-next", proxyNext);
    });
    await reloaded("proxy", "agent channel re-opened");
    await tripsNow();
    editJson(chain.agentConfigFile, (c) => {
      c.proxyIdentities = writePins(agentDir, "proxy-rotated", [proxyNext]);
    });
    await reloaded("agent", "identities reloaded");
    await tripsNow();

    // A broken file at reload is refused, naming the problem; the running identities stay.
    const good = readFileSync(chain.agentConfigFile, "utf8");
    editJson(chain.agentConfigFile, (c) => {
      c.proxyIdentities = ["no-such.crt"];
    });
    await reloaded("agent", "reload rejected; keeping the running identities");
    assert.match(chain.agent.logs(), /proxyIdentities\[0\]: cannot read/);
    writeFileSync(chain.agentConfigFile, good);
    await tripsNow();

    stop = true;
    await Promise.all(workers);
    console.log(`# rotation: ${trips} round trips, ${problems.length} problems`);
    assert.deepEqual(problems, [], "every request answered correctly (busy answers retried like KMS)");
    // No connection was ever refused for its identity on either side.
    assert.doesNotMatch(chain.proxy.logs(), /identity mismatch/);
    assert.doesNotMatch(chain.agent.logs(), /refused a gRPC client/);

    // What is pinned now is what is used: a fresh proxy connection (after a restart) works with the new pair only.
    await chain.proxy.stop();
    chain.proxy.start();
    await chain.waitActive();
    assert.equal(await roundTrip(chain, Buffer.from("after a restart")), undefined);
  } finally {
    stop = true;
    await chain.stop();
  }
});
