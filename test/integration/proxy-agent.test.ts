/**
 * The proxy against the REAL agent on a REAL SoftHSM token (testbed/in-process.ts),
 * over a real port, with requests signed by @smithy/signature-v4 and by curl.
 */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { after, before, describe, it } from "node:test";
import type { XksErrorName } from "../../shared/errors.ts";
import { API, CREDS } from "../../testbed/configs.ts";
import { type ProxyFixture, startProxy, startTestAgent, type TestAgent } from "../../testbed/in-process.ts";
import { AUTHORIZATION_MARKERS, encodings, findLeaks } from "../../testbed/logs.ts";
import { until } from "../../testbed/wait.ts";
import { b64, decryptBody, encryptBody, unb64 } from "../../testbed/xks/bodies.ts";
import { curlPost, type Resp, signedPost } from "../../testbed/xks/client.ts";
import { requestMetadata as md } from "../../testbed/xks/metadata.ts";
import { assertSpecError } from "../../testbed/xks/oracle.ts";

const NOT_IN_HSM = "allowed-but-absent";
const expectError = (r: Resp, name: XksErrorName, label = "") => assertSpecError(r, name, label);
const encBody = (plaintext: Buffer | string, aad?: Buffer | string, integrityValue = false) =>
  encryptBody(plaintext, { aad, integrityValue });

describe("proxy ⇄ real agent on SoftHSM", () => {
  let agent: TestAgent;
  let fx: ProxyFixture;
  let K: TestAgent["keys"];

  before(async () => {
    agent = await startTestAgent();
    K = agent.keys;
    fx = await startProxy({
      agents: [{ id: "mac-1", target: agent.target, token: agent.token }],
      keys: [K.default, K.encryptOnly, K.decryptOnly, K.noUsage, NOT_IN_HSM],
    });
    await until(() => fx.proxy.agents.healthSnapshot()[0].state === "ACTIVE", "the agent ACTIVE");
  });
  after(async () => {
    await fx?.close();
    await agent?.destroy();
  });

  const post = (path: string, body: unknown) => signedPost(fx.url, `${API}${path}`, body, CREDS.a);

  it("GetHealthStatus reports the real token, ACTIVE", async () => {
    const r = await curlPost(
      fx.url,
      `${API}/health`,
      JSON.stringify({ requestMetadata: { kmsRequestId: "h-1", kmsOperation: "KmsHealthCheck" } }),
      CREDS.a,
    );
    assert.equal(r.status, 200, r.text);
    assert.equal(r.json.xksProxyFleetSize, 1);
    assert.match(r.json.ekmVendor, /SoftHSM/);
    assert.equal(r.json.ekmFleetDetails.length, 1);
    const [e] = r.json.ekmFleetDetails;
    assert.equal(e.id, "test-agent");
    assert.match(e.model, /SoftHSM/);
    assert.match(e.model, /serial /);
    assert.equal(e.healthStatus, "ACTIVE");
  });

  it("GetKeyMetadata: real attributes of an AES-256 key", async () => {
    const r = await post(`/keys/${K.default}/metadata`, { requestMetadata: md("CreateKey") });
    assert.equal(r.status, 200, r.text);
    assert.equal(r.json.keySpec, "AES_256");
    assert.deepEqual([...r.json.keyUsage].sort(), ["DECRYPT", "ENCRYPT"]);
    assert.equal(r.json.keyStatus, "ENABLED");
    const eo = await curlPost(
      fx.url,
      `${API}/keys/${K.encryptOnly}/metadata`,
      JSON.stringify({ requestMetadata: md("DescribeKey") }),
      CREDS.b,
    );
    assert.deepEqual(eo.json.keyUsage, ["ENCRYPT"]);
  });

  it("Encrypt → Decrypt round trip with AAD; integrity value recomputed independently", async () => {
    const pt = Buffer.from("The quick brown fox jumps over the lazy dog");
    const aad = Buffer.from("project=nile,department=marketing");
    const e = await post(`/keys/${K.default}/encrypt`, encBody(pt, aad, true));
    assert.equal(e.status, 200, e.text);
    const ct = unb64(e.json.ciphertext);
    const iv = unb64(e.json.initializationVector);
    const tag = unb64(e.json.authenticationTag);
    const cm = unb64(e.json.ciphertextMetadata);
    assert.equal(ct.length, pt.length);
    assert.ok(iv.length === 12 || iv.length === 16);
    assert.equal(tag.length, 16);
    assert.ok(cm.length <= 20);
    const cdiv = createHash("sha256")
      .update(Buffer.concat([aad, cm, iv, ct, tag]))
      .digest("base64");
    assert.equal(e.json.ciphertextDataIntegrityValue, cdiv);
    const d = await curlPost(fx.url, `${API}/keys/${K.default}/decrypt`, JSON.stringify(decryptBody(e.json, { aad })), CREDS.a);
    assert.equal(d.status, 200, d.text);
    assert.equal(d.text, JSON.stringify({ plaintext: b64(pt) }));
    // Without AAD and without CDIV: no integrity value in the answer.
    const e2 = await post(`/keys/${K.default}/encrypt`, encBody("no aad"));
    assert.equal(e2.json.ciphertextDataIntegrityValue, undefined);
    const e3 = await post(`/keys/${K.default}/encrypt`, encBody("cdiv without aad", undefined, true));
    const cdiv3 = createHash("sha256")
      .update(
        Buffer.concat([
          unb64(e3.json.ciphertextMetadata),
          unb64(e3.json.initializationVector),
          unb64(e3.json.ciphertext),
          unb64(e3.json.authenticationTag),
        ]),
      )
      .digest("base64");
    assert.equal(e3.json.ciphertextDataIntegrityValue, cdiv3);
  });

  it("4300-byte plaintext with 8192-byte AAD (and the test client's 4096 + 8192 via curl)", async () => {
    for (const [size, useCurl] of [
      [4300, false],
      [4096, true],
    ] as const) {
      const pt = Buffer.alloc(size, 7);
      const aad = Buffer.alloc(8192, 9);
      const body = encBody(pt, aad, true);
      const e = useCurl
        ? await curlPost(fx.url, `${API}/keys/${K.default}/encrypt`, JSON.stringify(body), CREDS.a)
        : await post(`/keys/${K.default}/encrypt`, body);
      assert.equal(e.status, 200, e.text);
      const d = await post(`/keys/${K.default}/decrypt`, decryptBody(e.json, { aad }));
      assert.equal(d.status, 200, d.text);
      assert.ok(unb64(d.json.plaintext).equals(pt));
    }
  });

  it("tampered tag / AAD / IV / ciphertext / metadata, or missing AAD → InvalidCiphertextException", async () => {
    const aad = Buffer.from("context=a");
    const e = await post(`/keys/${K.default}/encrypt`, encBody("tamper me please", aad));
    const base = decryptBody(e.json, { aad, over: { ciphertextMetadata: e.json.ciphertextMetadata ?? b64("x") } });
    const flip = (v: unknown) => {
      const b = unb64(v as string);
      b[b.length - 1] ^= 0x01;
      return b.toString("base64");
    };
    for (const f of ["authenticationTag", "additionalAuthenticatedData", "initializationVector", "ciphertext", "ciphertextMetadata"]) {
      expectError(await post(`/keys/${K.default}/decrypt`, { ...base, [f]: flip(base[f]) }), "InvalidCiphertextException", f);
    }
    const { additionalAuthenticatedData: _a, ...noAad } = base;
    expectError(await post(`/keys/${K.default}/decrypt`, noAad), "InvalidCiphertextException", "missing AAD");
    expectError(
      await post(`/keys/${K.default}/decrypt`, { ...base, additionalAuthenticatedData: b64("context=b") }),
      "InvalidCiphertextException",
      "different AAD",
    );
  });

  it("key usage: encrypt-only, decrypt-only and no-usage keys → InvalidKeyUsageException", async () => {
    // encrypt-only: plain encrypt works; encrypt with CDIV needs the check-decrypt → InvalidKeyUsage; decrypt → InvalidKeyUsage.
    const ok = await post(`/keys/${K.encryptOnly}/encrypt`, encBody("x", "aad"));
    assert.equal(ok.status, 200, ok.text);
    expectError(await post(`/keys/${K.encryptOnly}/encrypt`, encBody("x", "aad", true)), "InvalidKeyUsageException", "encOnly+CDIV");
    expectError(
      await post(`/keys/${K.encryptOnly}/encrypt`, encBody("x", undefined, true)),
      "InvalidKeyUsageException",
      "encOnly+CDIV no aad",
    );
    expectError(
      await post(`/keys/${K.encryptOnly}/decrypt`, decryptBody(ok.json, { aad: "aad" })),
      "InvalidKeyUsageException",
      "encOnly decrypt",
    );
    for (const key of [K.decryptOnly, K.noUsage]) {
      for (const body of [encBody("x", "aad"), encBody("x"), encBody("x", "aad", true), encBody("x", undefined, true)]) {
        expectError(await post(`/keys/${key}/encrypt`, body), "InvalidKeyUsageException", `${key} encrypt`);
      }
    }
  });

  it("a key in the allow-list but not in the HSM → KeyNotFoundException; not in the allow-list → KeyNotFoundException", async () => {
    expectError(await post(`/keys/${NOT_IN_HSM}/metadata`, { requestMetadata: md("CreateKey") }), "KeyNotFoundException", "absent");
    expectError(await post(`/keys/${NOT_IN_HSM}/encrypt`, encBody("x")), "KeyNotFoundException", "absent encrypt");
    expectError(await post(`/keys/${K.health}/encrypt`, encBody("x")), "KeyNotFoundException", "health key is not in the store");
  });

  it("agent stopped → 503 and health UNAVAILABLE after a refresh; restarted → recovery", async () => {
    await agent.stop();
    expectError(await post(`/keys/${K.default}/encrypt`, encBody("while down")), "DependencyTimeoutException", "down");
    await until(() => fx.proxy.agents.healthSnapshot()[0].state === "UNAVAILABLE", "health to see the agent gone");
    const h = await post(`/health`, { requestMetadata: { kmsRequestId: "h-2", kmsOperation: "KmsHealthCheck" } });
    assert.equal(h.status, 200);
    assert.equal(h.json.ekmFleetDetails[0].healthStatus, "UNAVAILABLE");

    await agent.restart();
    await until(
      async () => (await post(`/keys/${K.default}/metadata`, { requestMetadata: md("CreateKey") })).status === 200,
      "crypto to recover",
      undefined,
      50,
    );
    await until(() => fx.proxy.agents.healthSnapshot()[0].state === "ACTIVE", "health to recover");
    const e = await post(`/keys/${K.default}/encrypt`, encBody("after restart"));
    assert.equal(e.status, 200, e.text);
  });

  it("the proxy's log lines never hold plaintext, ciphertext, AAD, secrets or the Authorization header", async () => {
    const pt = Buffer.from("TOP-SECRET-PLAINTEXT-91827");
    const aad = Buffer.from("AAD-VALUE-5647382910");
    const e = await post(`/keys/${K.default}/encrypt`, encBody(pt, aad, true));
    assert.equal(e.status, 200);
    const d = await curlPost(fx.url, `${API}/keys/${K.default}/decrypt`, JSON.stringify(decryptBody(e.json, { aad })), CREDS.b);
    assert.equal(d.status, 200);
    await post(
      `/keys/${K.default}/decrypt`,
      decryptBody(e.json, { over: { authenticationTag: b64(Buffer.alloc(16)), ciphertextMetadata: undefined } }),
    );
    const secrets = {
      ...encodings("plaintext", pt),
      ...encodings("AAD", aad),
      ciphertext: e.json.ciphertext,
      tag: e.json.authenticationTag,
      "integrity value": e.json.ciphertextDataIntegrityValue,
      "secret a": CREDS.a.secretAccessKey,
      "secret b": CREDS.b.secretAccessKey,
      "agent token": agent.token,
      PIN: agent.softhsm.pin,
      ...AUTHORIZATION_MARKERS,
    };
    assert.deepEqual(findLeaks(fx.logs.text(), secrets), [], "the proxy's log");
    // ...while each request is there with its id.
    const lines = fx.logs.requests().filter((l) => l.operation === "Decrypt");
    assert.ok(lines.length >= 2);
    assert.ok(lines.every((l) => typeof l.kmsRequestId === "string" && typeof l.latencyMs === "number"));
  });
});
