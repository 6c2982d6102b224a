/**
 * End to end through the real chain, each part its own process:
 *   signed HTTP → proxy → real OpenSSH sshd (remote forward) → agent's ssh2 tunnel → agent → SoftHSM.
 * Requests are signed by AWS's own signer (@smithy/signature-v4) and by curl.
 */
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import * as grpc from "@grpc/grpc-js";
import { parseAgentConfig } from "../../agent/config.ts";
import { runAgent } from "../../agent/main.ts";
import type { TunnelState } from "../../agent/tunnel.ts";
import { auditOps } from "../../testbed/audit.ts";
import { type Chain, startChain } from "../../testbed/chain.ts";
import { agentClient, type CallError } from "../../testbed/grpc-client.ts";
import { TEST_IDENTITIES } from "../../testbed/identities.ts";
import { AUTHORIZATION_MARKERS, encodings, findLeaks, LogCapture } from "../../testbed/logs.ts";
import { nextEvent, until } from "../../testbed/wait.ts";
import { type EncryptAnswer, decryptBody, encryptBody, healthBody, keyPath, metadataBody, unb64 } from "../../testbed/xks/bodies.ts";
import { agentMetadata } from "../../testbed/xks/metadata.ts";
import { BUSY_ERRORS, decryptProblem, encryptProblem, verdict } from "../../testbed/xks/oracle.ts";

let chain: Chain;

before(async () => {
  chain = await startChain();
  await chain.waitActive();
});

after(() => chain?.stop());

const post = (rest: string, body: unknown) => chain.client.post(rest, body);

describe("every XKS operation through the tunnel", () => {
  test("health reports the agent ACTIVE with its token", async () => {
    const r = await post("health", healthBody());
    assert.equal(r.status, 200);
    assert.equal(r.json.xksProxyFleetSize, 1);
    assert.equal(r.json.ekmVendor, "SoftHSM project");
    assert.deepEqual(
      r.json.ekmFleetDetails.map((d: { healthStatus: string }) => d.healthStatus),
      ["ACTIVE"],
    );
    assert.ok(!r.text.includes("\n") && !r.text.includes(": "), "compact single-line JSON");
  });

  test("metadata is AES_256 from the real key", async () => {
    const r = await post(keyPath(chain.keys.default, "metadata"), metadataBody());
    assert.equal(r.status, 200, r.text);
    assert.equal(r.text, '{"keySpec":"AES_256","keyUsage":["ENCRYPT","DECRYPT"],"keyStatus":"ENABLED"}');
  });

  test("encrypt → decrypt round trip with AAD and integrity value (4300-byte plaintext, 8192-byte AAD)", async () => {
    const pt = randomBytes(4300);
    const aad = randomBytes(8192);
    const e = await post(keyPath(chain.keys.default, "encrypt"), encryptBody(pt, { aad, integrityValue: true }));
    assert.equal(encryptProblem(e, { plaintext: pt, aad, integrityValue: true }), undefined);
    assert.equal(unb64(e.json.initializationVector).length, 12, "the agent makes 12-byte IVs");
    const d = await post(keyPath(chain.keys.default, "decrypt"), decryptBody(e.json, { aad }));
    assert.equal(decryptProblem(d, pt), undefined);
  });

  test("curl --aws-sigv4 round trip", async () => {
    const pt = Buffer.from("signed by curl");
    const e = await chain.client.curl(keyPath(chain.keys.default, "encrypt"), encryptBody(pt));
    assert.equal(encryptProblem(e, { plaintext: pt }), undefined);
    const d = await chain.client.curl(keyPath(chain.keys.default, "decrypt"), decryptBody(e.json));
    assert.equal(decryptProblem(d, pt), undefined);
  });

  test("error paths arrive as the spec's errors", async () => {
    const k = chain.keys;
    const pt = Buffer.from("x");
    const aad = Buffer.from("aad");
    const e = (await post(keyPath(k.default, "encrypt"), encryptBody(pt, { aad }))).json as EncryptAnswer;
    const cases: Array<[string, string, unknown, number, string]> = [
      [
        "tampered tag",
        keyPath(k.default, "decrypt"),
        decryptBody(e, { aad, over: { authenticationTag: Buffer.alloc(16).toString("base64") } }),
        400,
        "InvalidCiphertextException",
      ],
      ["wrong AAD", keyPath(k.default, "decrypt"), decryptBody(e, { aad: "AAD" }), 400, "InvalidCiphertextException"],
      ["encrypt-only decrypt", keyPath(k.encryptOnly, "decrypt"), decryptBody(e, { aad }), 400, "InvalidKeyUsageException"],
      [
        "encrypt-only + integrity value",
        keyPath(k.encryptOnly, "encrypt"),
        encryptBody(pt, { integrityValue: true }),
        400,
        "InvalidKeyUsageException",
      ],
      ["decrypt-only encrypt", keyPath(k.decryptOnly, "encrypt"), encryptBody(pt), 400, "InvalidKeyUsageException"],
      ["no-usage encrypt", keyPath(k.noUsage, "encrypt"), encryptBody(pt), 400, "InvalidKeyUsageException"],
      ["key not in allow-list", keyPath("not-allowed", "encrypt"), encryptBody(pt), 404, "KeyNotFoundException"],
      ["health key is not a KMS key", keyPath(k.health, "encrypt"), encryptBody(pt), 404, "KeyNotFoundException"],
      [
        "bad algorithm",
        keyPath(k.default, "encrypt"),
        encryptBody(pt, { over: { encryptionAlgorithm: "AES_CBC" } }),
        400,
        "ValidationException",
      ],
      ["too large", keyPath(k.default, "encrypt"), encryptBody(randomBytes(9000)), 501, "UnsupportedOperationException"],
      ["wrong prefix", "../../../../wrong-prefix/kms/xks/v1/health", healthBody(), 404, "InvalidUriPathException"],
    ];
    for (const [name, rest, body, status, errorName] of cases) {
      const r = await post(rest, body);
      assert.equal(r.status, status, `${name}: ${r.text}`);
      assert.equal(r.json?.errorName, errorName, name);
    }
  });

  test("a burst of 200 concurrent requests: every answer correct or the spec's busy error, and retried like KMS every one completes", async (t) => {
    const key = chain.keys.default;
    const inputs = Array.from({ length: 200 }, (_, i) => ({
      pt: randomBytes(1 + (i % 64) * 50),
      aad: i % 30 ? randomBytes(i % 30) : undefined,
      cdiv: i % 2 === 0,
    }));
    const encBodies = inputs.map((x) => encryptBody(x.pt, { aad: x.aad, integrityValue: x.cdiv }));
    const encCheck = (i: number) => (a: { status: number; text: string }) =>
      encryptProblem(a, { plaintext: inputs[i].pt, aad: inputs[i].aad, integrityValue: inputs[i].cdiv });

    /** Sends every body at once (signed first, as KMS signs on its side); then retries the busy ones like KMS until each is answered. */
    const burst = async (
      op: "encrypt" | "decrypt",
      bodies: unknown[],
      check: (i: number) => (a: { status: number; text: string }) => string | undefined,
    ) => {
      const sends = await Promise.all(bodies.map((b) => chain.client.presign(keyPath(key, op), b)));
      const first = await Promise.all(sends.map((send) => send()));
      const busy: Record<string, number> = {};
      const answers = await Promise.all(
        first.map(async (r, i) => {
          const v = verdict(r, check(i));
          if (v.kind === "wrong") assert.fail(`${op} ${i}: ${v.why}`);
          if (v.kind === "ok") return r;
          assert.ok(BUSY_ERRORS.has(v.name), `${op} ${i}: ${v.name} is not a busy answer`);
          busy[v.name] = (busy[v.name] ?? 0) + 1;
          return chain.client.postRetrying(keyPath(key, op), bodies[i]);
        }),
      );
      t.diagnostic(`${op}: ${200 - Object.values(busy).reduce((a, b) => a + b, 0)} of 200 answered at once, busy: ${JSON.stringify(busy)}`);
      for (const [i, r] of answers.entries()) assert.equal(check(i)(r), undefined, `${op} ${i} after retries`);
      return answers;
    };
    const encs = await burst("encrypt", encBodies, encCheck);
    const decBodies = encs.map((e, i) => decryptBody(e.json, { aad: inputs[i].aad }));
    await burst("decrypt", decBodies, (i) => (a) => decryptProblem(a, inputs[i].pt));
  });
});

describe("the tunnel", () => {
  test("the agent ran its exec so sshd set TCP_NODELAY, and reports the tunnel up", async () => {
    assert.match(chain.agent.logs(), /tunnel exec done: sshd has TCP_NODELAY/);
    const c = agentClient(`unix://${chain.remoteSocket}`, chain.agentToken);
    try {
      const h = await c.call("GetHealthStatus", {});
      assert.equal(h.state, "ACTIVE");
      assert.equal(h.tunnels.length, 1);
      assert.equal(h.tunnels[0].state, "up");
      assert.equal(h.tunnels[0].nodelayExec, true);
    } finally {
      c.close();
    }
  });

  test("a local user on the proxy host who can reach the forwarded socket but lacks the token gets no crypto", async () => {
    for (const token of [null, "guess", chain.agentToken.slice(1)]) {
      const c = agentClient(`unix://${chain.remoteSocket}`, chain.agentToken);
      try {
        await assert.rejects(
          c.call("Encrypt", { metadata: agentMetadata("Encrypt"), keyId: chain.keys.default, plaintext: Buffer.from("steal") }, { token }),
          (e: CallError) => e.code === grpc.status.UNAUTHENTICATED,
        );
        await assert.rejects(
          c.call(
            "Decrypt",
            {
              metadata: agentMetadata("Decrypt"),
              keyId: chain.keys.default,
              ciphertext: Buffer.alloc(4),
              iv: randomBytes(12),
              tag: randomBytes(16),
            },
            { token },
          ),
          (e: CallError) => e.code === grpc.status.UNAUTHENTICATED,
        );
      } finally {
        c.close();
      }
    }
    // The refusals are in the owner's log (lines are written in batches, at most a second late).
    await until(() => /"result":"UNAUTHENTICATED"/.test(chain.agent.logs()), "the refused calls in the agent's log", undefined, 100);
  });

  test("an agent whose pinned host key does not match refuses to connect", async () => {
    const raw = JSON.parse(readFileSync(chain.agentConfigFile, "utf8"));
    const wrongFp = `SHA256:${createHash("sha256").update("not the host key").digest("base64").replace(/=+$/, "")}`;
    const dir = join(chain.dir, "wrong-hostkey");
    raw.tunnels[0].hostKeyFingerprint = wrongFp;
    raw.tunnels[0].remoteSocket = join(dir, "remote.sock");
    Object.assign(raw, { socket: join(dir, "agent.sock"), stateFile: join(dir, "controls.json"), audit: { dir: join(dir, "audit") } });
    delete raw.metrics; // the chain's agent holds its metrics port
    const logs = new LogCapture();
    const agent = await runAgent(parseAgentConfig(raw, chain.agentConfigFile), { destination: logs });
    try {
      const tunnel = agent.tunnels.list()[0];
      const down = await nextEvent<TunnelState>(tunnel, "state", (s) => s.state === "down", "the tunnel refused", {
        current: tunnel.state(),
      });
      assert.match(down.lastError ?? "", /host key verification failed/);
      // A refusal is not retried within seconds: the next attempt is at least 24 s away (30 s ±20 %).
      assert.equal(down.failure, "hostkey");
      assert.ok(down.retryInMs! >= 24_000, `next attempt in ${down.retryInMs} ms`);
      assert.equal(tunnel.state().connects, 0);
      // The agent's health carries the reason and the next attempt's time.
      const c = agentClient(`unix://${join(dir, "agent.sock")}`, chain.agentToken);
      try {
        const h = await c.call("GetHealthStatus", {});
        assert.match(h.tunnels[0].lastError, /host key verification failed/);
        assert.ok(h.tunnels[0].lastError.endsWith(`next attempt at ${down.nextAttemptAt}`), h.tunnels[0].lastError);
      } finally {
        c.close();
      }
      assert.match(logs.text(), /host key does not match the pinned fingerprint/);
      assert.ok(
        logs.text().includes(wrongFp) && logs.text().includes(chain.sshd.hostKeyFingerprint),
        "names expected and seen fingerprints",
      );
      assert.ok(!logs.text().includes("tunnel up"));
    } finally {
      await agent.stop();
    }
  });
});

describe("records on the owner's machine", () => {
  test("every KMS operation that reached the agent is in the audit log with its request id", async () => {
    const e = await post(
      keyPath(chain.keys.default, "encrypt"),
      encryptBody("hello", { metadata: { kmsOperation: "GenerateDataKey", kmsRequestId: "e2e-audit-0001", kmsViaService: "ebs" } }),
    );
    assert.equal(e.status, 200);
    const line = auditOps(join(chain.dir, "agent", "state", "audit")).find((l) => l.kmsRequestId === "e2e-audit-0001");
    assert.ok(line);
    assert.equal(line.kmsOperation, "GenerateDataKey");
    assert.equal(line.viaService, "ebs");
    assert.equal(line.keyStore, "/xks-demo");
    assert.equal(line.result, "OK");
  });

  test("no plaintext, AAD, secret or Authorization value in any process's log", async () => {
    const marker = Buffer.from("E2E-PLAINTEXT-MARKER-91c2");
    const aad = Buffer.from("E2E-AAD-MARKER-44d1");
    const e = await post(
      keyPath(chain.keys.default, "encrypt"),
      encryptBody(marker, { aad, metadata: { kmsRequestId: "e2e-log-marker" } }),
    );
    await post(keyPath(chain.keys.default, "decrypt"), decryptBody(e.json, { aad }));
    // Log lines are written in batches (at most a second late): wait until both daemons logged this request.
    await until(
      () => chain.agent.logs().includes("e2e-log-marker") && chain.proxy.logs().includes("e2e-log-marker"),
      "the request's log lines",
      undefined,
      100,
    );
    const logs = chain.agent.logs() + chain.proxy.logs() + chain.sshd.logs();
    const secrets = {
      ...encodings("plaintext", marker),
      ...encodings("AAD", aad),
      ciphertext: (e.json as EncryptAnswer).ciphertext,
      "SigV4 secret": chain.secretAccessKey,
      "agent token": chain.agentToken,
      PIN: chain.softhsm.pin,
      ...AUTHORIZATION_MARKERS,
      // Any line of either channel identity's private key (PEM body).
      ...Object.fromEntries(
        (["agent", "proxy"] as const).flatMap((side) =>
          TEST_IDENTITIES[side].key
            .split("\n")
            .filter((l) => l && !l.startsWith("-----"))
            .map((l, i) => [`${side} identity key line ${i}`, l]),
        ),
      ),
    };
    assert.deepEqual(findLeaks(logs, secrets), []);
  });
});
