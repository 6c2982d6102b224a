/**
 * End to end through the real chain, each part its own process:
 *   signed HTTP → proxy → real OpenSSH sshd (remote forward) → agent's ssh2 tunnel → agent → SoftHSM.
 * Requests are signed by AWS's own signer (@smithy/signature-v4) and by curl.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { createHash, randomBytes, randomUUID } from "node:crypto";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import * as grpc from "@grpc/grpc-js";
import { startChain, type Chain } from "../scripts/lib/chain.ts";
import { curlPost } from "./helpers/sigv4.ts";
import { agentClient, sampleMetadata, type CallError } from "./helpers/grpc.ts";

let chain: Chain;
let root: string;

const md = (op: string) => ({
  awsPrincipalArn: "arn:aws:iam::123456789012:user/e2e",
  kmsKeyArn: "arn:aws:kms:us-east-1:123456789012:key/e2e",
  kmsOperation: op,
  kmsRequestId: randomUUID(),
});

async function encrypt(key: string, pt: Buffer, aad?: Buffer, cdiv = false) {
  return chain.post(`keys/${key}/encrypt`, {
    requestMetadata: md("Encrypt"),
    plaintext: pt.toString("base64"),
    encryptionAlgorithm: "AES_GCM",
    ...(aad ? { additionalAuthenticatedData: aad.toString("base64") } : {}),
    ...(cdiv ? { ciphertextDataIntegrityValueAlgorithm: "SHA_256" } : {}),
  });
}

function decryptBody(e: Record<string, string>, aad?: Buffer, over: Record<string, string> = {}) {
  return {
    requestMetadata: md("Decrypt"),
    ciphertext: e.ciphertext,
    initializationVector: e.initializationVector,
    authenticationTag: e.authenticationTag,
    ...(e.ciphertextMetadata ? { ciphertextMetadata: e.ciphertextMetadata } : {}),
    ...(aad ? { additionalAuthenticatedData: aad.toString("base64") } : {}),
    encryptionAlgorithm: "AES_GCM",
    ...over,
  };
}

before(async () => {
  root = mkdtempSync(join(tmpdir(), "xks-e2e-"));
  chain = await startChain({ dir: join(root, "chain") });
  await chain.waitActive(30000);
});

after(async () => {
  await chain?.stop();
  rmSync(root, { recursive: true, force: true });
});

describe("every XKS operation through the tunnel", () => {
  test("health reports the agent ACTIVE with its token", async () => {
    const r = await chain.post("health", { requestMetadata: { kmsRequestId: randomUUID(), kmsOperation: "KmsHealthCheck" } });
    assert.equal(r.status, 200);
    assert.equal(r.json.xksProxyFleetSize, 1);
    assert.equal(r.json.ekmVendor, "SoftHSM project");
    assert.deepEqual(r.json.ekmFleetDetails.map((d: { healthStatus: string }) => d.healthStatus), ["ACTIVE"]);
    assert.ok(!r.text.includes("\n") && !r.text.includes(": "), "compact single-line JSON");
  });

  test("metadata is AES_256 from the real key", async () => {
    const r = await chain.post(`keys/${chain.keys.default}/metadata`, { requestMetadata: md("CreateKey") });
    assert.equal(r.status, 200, r.text);
    assert.equal(r.text, '{"keySpec":"AES_256","keyUsage":["ENCRYPT","DECRYPT"],"keyStatus":"ENABLED"}');
  });

  test("encrypt → decrypt round trip with AAD and integrity value (4300-byte plaintext, 8192-byte AAD)", async () => {
    const pt = randomBytes(4300);
    const aad = randomBytes(8192);
    const e = await encrypt(chain.keys.default, pt, aad, true);
    assert.equal(e.status, 200, e.text);
    const j = e.json as Record<string, string>;
    const b = (s: string) => Buffer.from(s, "base64");
    assert.equal(b(j.ciphertext).length, 4300);
    assert.equal(b(j.initializationVector).length, 12);
    assert.equal(b(j.authenticationTag).length, 16);
    const cdiv = createHash("sha256")
      .update(Buffer.concat([aad, b(j.ciphertextMetadata), b(j.initializationVector), b(j.ciphertext), b(j.authenticationTag)]))
      .digest("base64");
    assert.equal(j.ciphertextDataIntegrityValue, cdiv);
    const d = await chain.post(`keys/${chain.keys.default}/decrypt`, decryptBody(j, aad));
    assert.equal(d.status, 200, d.text);
    assert.deepEqual(b(d.json.plaintext), pt);
  });

  test("curl --aws-sigv4 round trip", async () => {
    const pt = Buffer.from("signed by curl");
    const e = await curlPost(
      chain.url,
      `${chain.uriPath}/keys/${chain.keys.default}/encrypt`,
      JSON.stringify({ requestMetadata: md("Encrypt"), plaintext: pt.toString("base64"), encryptionAlgorithm: "AES_GCM" }),
      chain,
      { region: chain.region },
    );
    assert.equal(e.status, 200, e.text);
    const d = await curlPost(chain.url, `${chain.uriPath}/keys/${chain.keys.default}/decrypt`, JSON.stringify(decryptBody(e.json)), chain, {
      region: chain.region,
    });
    assert.equal(d.status, 200, d.text);
    assert.equal(Buffer.from(d.json.plaintext, "base64").toString(), "signed by curl");
  });

  test("error paths arrive as the spec's errors", async () => {
    const pt = Buffer.from("x");
    const e = (await encrypt(chain.keys.default, pt, Buffer.from("aad"))).json as Record<string, string>;
    const cases: Array<[string, Promise<{ status: number; json: any }>, number, string]> = [
      ["tampered tag", chain.post(`keys/${chain.keys.default}/decrypt`, decryptBody(e, Buffer.from("aad"), { authenticationTag: Buffer.alloc(16).toString("base64") })), 400, "InvalidCiphertextException"],
      ["wrong AAD", chain.post(`keys/${chain.keys.default}/decrypt`, decryptBody(e, Buffer.from("AAD"))), 400, "InvalidCiphertextException"],
      ["encrypt-only decrypt", chain.post(`keys/${chain.keys.encryptOnly}/decrypt`, decryptBody(e, Buffer.from("aad"))), 400, "InvalidKeyUsageException"],
      ["encrypt-only + integrity value", encrypt(chain.keys.encryptOnly, pt, undefined, true), 400, "InvalidKeyUsageException"],
      ["decrypt-only encrypt", encrypt(chain.keys.decryptOnly, pt), 400, "InvalidKeyUsageException"],
      ["no-usage encrypt", encrypt(chain.keys.noUsage, pt), 400, "InvalidKeyUsageException"],
      ["key not in allow-list", encrypt("not-allowed", pt), 404, "KeyNotFoundException"],
      ["bad algorithm", chain.post(`keys/${chain.keys.default}/encrypt`, { requestMetadata: md("Encrypt"), plaintext: "eA==", encryptionAlgorithm: "AES_CBC" }), 400, "ValidationException"],
      ["too large", encrypt(chain.keys.default, randomBytes(9000)), 501, "UnsupportedOperationException"],
    ];
    for (const [name, p, status, errorName] of cases) {
      const r = await p;
      assert.equal(r.status, status, `${name}: ${JSON.stringify(r.json)}`);
      assert.equal(r.json?.errorName, errorName, name);
    }
    const wrongPrefix = await chain.post("../../../../wrong-prefix/kms/xks/v1/health", { requestMetadata: { kmsRequestId: "x", kmsOperation: "x" } });
    assert.equal(wrongPrefix.status, 404);
  });

  test("200 concurrent requests, every answer correct", async () => {
    const n = 200;
    const inputs = Array.from({ length: n }, (_, i) => ({ pt: randomBytes(1 + (i % 64) * 50), aad: randomBytes(i % 30), cdiv: i % 2 === 0 }));
    // Sign all first (KMS signs on its side), then put all 200 in flight at once.
    const encSends = await Promise.all(
      inputs.map((x) =>
        chain.presign(`keys/${chain.keys.default}/encrypt`, {
          requestMetadata: md("Encrypt"),
          plaintext: x.pt.toString("base64"),
          encryptionAlgorithm: "AES_GCM",
          ...(x.aad.length ? { additionalAuthenticatedData: x.aad.toString("base64") } : {}),
          ...(x.cdiv ? { ciphertextDataIntegrityValueAlgorithm: "SHA_256" } : {}),
        }),
      ),
    );
    const encs = await Promise.all(encSends.map((send) => send()));
    encs.forEach((e, i) => assert.equal(e.status, 200, `encrypt ${i}: ${e.text}`));
    const decSends = await Promise.all(
      encs.map((e, i) => chain.presign(`keys/${chain.keys.default}/decrypt`, decryptBody(e.json, inputs[i].aad.length ? inputs[i].aad : undefined))),
    );
    const decs = await Promise.all(decSends.map((send) => send()));
    decs.forEach((d, i) => {
      assert.equal(d.status, 200, `decrypt ${i}: ${d.text}`);
      assert.deepEqual(Buffer.from(d.json.plaintext, "base64"), inputs[i].pt, `answer ${i}`);
    });
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
          c.call("Encrypt", { metadata: sampleMetadata("Encrypt"), keyId: chain.keys.default, plaintext: Buffer.from("steal") }, { token }),
          (e: CallError) => e.code === grpc.status.UNAUTHENTICATED,
        );
        await assert.rejects(
          c.call("Decrypt", { metadata: sampleMetadata("Decrypt"), keyId: chain.keys.default, ciphertext: Buffer.alloc(4), iv: randomBytes(12), tag: randomBytes(16) }, { token }),
          (e: CallError) => e.code === grpc.status.UNAUTHENTICATED,
        );
      } finally {
        c.close();
      }
    }
    // The refusals are in the owner's log (lines are written in batches, at most a second late).
    const deadline = Date.now() + 5000;
    while (!/"result":"UNAUTHENTICATED"/.test(chain.agent.logs())) {
      assert.ok(Date.now() < deadline, "the refused calls were not logged");
      await new Promise((r) => setTimeout(r, 100));
    }
  });

  test("an agent whose pinned host key does not match refuses to connect", async () => {
    const { runAgent } = await import("../agent/main.ts");
    const { parseAgentConfig } = await import("../agent/config.ts");
    const { LogCapture } = await import("./helpers/agent.ts");
    const { readFileSync } = await import("node:fs");
    const raw = JSON.parse(readFileSync(chain.agentConfigFile, "utf8"));
    const wrongFp = "SHA256:" + createHash("sha256").update("not the host key").digest("base64").replace(/=+$/, "");
    raw.tunnels[0].hostKeyFingerprint = wrongFp;
    raw.socket = join(root, "wrong-hostkey", "agent.sock");
    raw.stateFile = join(root, "wrong-hostkey", "controls.json");
    raw.auditLog = join(root, "wrong-hostkey", "audit.log");
    raw.tunnels[0].remoteSocket = join(root, "wrong-hostkey-remote.sock");
    const logs = new LogCapture();
    const agent = await runAgent(parseAgentConfig(raw, chain.agentConfigFile), { destination: logs });
    try {
      await new Promise((r) => setTimeout(r, 1500));
      const state = agent.tunnels.states()[0];
      assert.notEqual(state.state, "up");
      assert.match(logs.text(), /host key does not match the pinned fingerprint/);
      assert.ok(logs.text().includes(wrongFp) && logs.text().includes(chain.sshd.hostKeyFingerprint), "names expected and seen fingerprints");
      assert.ok(!logs.text().includes("tunnel up"));
    } finally {
      await agent.stop();
    }
  });
});

describe("records on the owner's machine", () => {
  test("every KMS operation that reached the agent is in the audit log with its request id", async () => {
    const e = await chain.post(`keys/${chain.keys.default}/encrypt`, {
      requestMetadata: { ...md("GenerateDataKey"), kmsRequestId: "e2e-audit-0001", kmsViaService: "ebs" },
      plaintext: "aGVsbG8=",
      encryptionAlgorithm: "AES_GCM",
    });
    assert.equal(e.status, 200);
    const { readFileSync } = await import("node:fs");
    const audit = readFileSync(join(chain.dir, "agent", "state", "audit.log"), "utf8");
    const line = audit.split("\n").filter(Boolean).map((l) => JSON.parse(l)).find((l) => l.rec.kmsRequestId === "e2e-audit-0001");
    assert.ok(line);
    assert.equal(line.rec.kmsOperation, "GenerateDataKey");
    assert.equal(line.rec.viaService, "ebs");
    assert.equal(line.rec.keyStore, "/xks-demo");
    assert.equal(line.rec.result, "OK");
  });

  test("no plaintext, AAD, secret or Authorization value in any process's log", async () => {
    const marker = Buffer.from("E2E-PLAINTEXT-MARKER-91c2");
    const aad = Buffer.from("E2E-AAD-MARKER-44d1");
    const e = await chain.post(`keys/${chain.keys.default}/encrypt`, {
      requestMetadata: { ...md("Encrypt"), kmsRequestId: "e2e-log-marker" },
      plaintext: marker.toString("base64"),
      additionalAuthenticatedData: aad.toString("base64"),
      encryptionAlgorithm: "AES_GCM",
    });
    await chain.post(`keys/${chain.keys.default}/decrypt`, decryptBody(e.json, aad));
    // Log lines are written in batches (at most a second late): wait until both daemons logged this request.
    const deadline = Date.now() + 5000;
    while (!(chain.agent.logs().includes("e2e-log-marker") && chain.proxy.logs().includes("e2e-log-marker"))) {
      assert.ok(Date.now() < deadline, "the request's log lines never appeared");
      await new Promise((r) => setTimeout(r, 100));
    }
    const logs = chain.agent.logs() + chain.proxy.logs() + chain.sshd.logs();
    for (const s of [marker.toString(), marker.toString("base64"), aad.toString(), aad.toString("base64"), chain.secretAccessKey, chain.agentToken, chain.softhsm.pin, "Signature=", (e.json as { ciphertext: string }).ciphertext]) {
      assert.ok(!logs.includes(s), `a log contains ${s}`);
    }
  });
});
