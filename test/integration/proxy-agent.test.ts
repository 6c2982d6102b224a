/**
 * The proxy against the REAL agent on a REAL SoftHSM token (test/helpers/agent.ts),
 * over a real port, with requests signed by @smithy/signature-v4 and by curl.
 * Skips loudly when SoftHSM is not installed.
 */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { after, before, describe, it } from "node:test";
import { XKS_ERRORS, type XksErrorName } from "../shared/errors.ts";
import { CREDS, PREFIX, md, startProxy, until, type ProxyFixture } from "./helpers/proxy-fixtures.ts";
import { curlPost, signedPost, type Resp } from "./helpers/sigv4.ts";
import type { TestAgent } from "./helpers/agent.ts";


const API = `${PREFIX}/kms/xks/v1`;
const NOT_IN_HSM = "allowed-but-absent";
const b64 = (s: string | Buffer) => Buffer.from(s).toString("base64");
const unb64 = (s: string | undefined) => Buffer.from(s ?? "", "base64");

function expectError(r: Resp, name: XksErrorName, label = ""): void {
  assert.equal(r.status, XKS_ERRORS[name].status, `${label}: ${r.text}`);
  assert.equal(r.text, JSON.stringify({ errorName: name, errorMessage: XKS_ERRORS[name].message }), label);
}

const encBody = (plaintext: Buffer | string, aad?: Buffer | string, cdiv = false) => ({
  requestMetadata: md("Encrypt"),
  plaintext: b64(plaintext),
  encryptionAlgorithm: "AES_GCM",
  ...(aad !== undefined ? { additionalAuthenticatedData: b64(aad) } : {}),
  ...(cdiv ? { ciphertextDataIntegrityValueAlgorithm: "SHA_256" } : {}),
});

describe("proxy ⇄ real agent on SoftHSM", () => {
  let agent: TestAgent;
  let fx: ProxyFixture;
  let K: TestAgent["keys"];

  before(async () => {
    const { startTestAgent } = await import("./helpers/agent.ts");
    agent = await startTestAgent();
    K = agent.keys;
    fx = await startProxy({
      agents: [{ id: "mac-1", target: `unix://${agent.socketPath}`, token: agent.token }],
      keys: [K.default, K.encryptOnly, K.decryptOnly, K.noUsage, NOT_IN_HSM],
    });
    assert.ok(await until(() => fx.proxy.agents.healthSnapshot()[0].state === "ACTIVE", 5000), "agent ACTIVE");
  });
  after(async () => {
    await fx?.close();
    await agent?.destroy();
  });

  const post = (path: string, body: unknown) => signedPost(fx.url, `${API}${path}`, body, CREDS.a);

  it("GetHealthStatus reports the real token, ACTIVE", async () => {
    const r = await curlPost(fx.url, `${API}/health`, JSON.stringify({ requestMetadata: { kmsRequestId: "h-1", kmsOperation: "KmsHealthCheck" } }), CREDS.a);
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
    const eo = await curlPost(fx.url, `${API}/keys/${K.encryptOnly}/metadata`, JSON.stringify({ requestMetadata: md("DescribeKey") }), CREDS.b);
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
    const cdiv = createHash("sha256").update(Buffer.concat([aad, cm, iv, ct, tag])).digest("base64");
    assert.equal(e.json.ciphertextDataIntegrityValue, cdiv);
    const d = await curlPost(
      fx.url,
      `${API}/keys/${K.default}/decrypt`,
      JSON.stringify({
        requestMetadata: md("Decrypt"), ciphertext: e.json.ciphertext, initializationVector: e.json.initializationVector,
        authenticationTag: e.json.authenticationTag, additionalAuthenticatedData: b64(aad), encryptionAlgorithm: "AES_GCM",
        ...(e.json.ciphertextMetadata ? { ciphertextMetadata: e.json.ciphertextMetadata } : {}),
      }),
      CREDS.a,
    );
    assert.equal(d.status, 200, d.text);
    assert.equal(d.text, JSON.stringify({ plaintext: b64(pt) }));
    // Without AAD and without CDIV: no integrity value in the answer.
    const e2 = await post(`/keys/${K.default}/encrypt`, encBody("no aad"));
    assert.equal(e2.json.ciphertextDataIntegrityValue, undefined);
    const e3 = await post(`/keys/${K.default}/encrypt`, encBody("cdiv without aad", undefined, true));
    const cdiv3 = createHash("sha256")
      .update(Buffer.concat([unb64(e3.json.ciphertextMetadata), unb64(e3.json.initializationVector), unb64(e3.json.ciphertext), unb64(e3.json.authenticationTag)]))
      .digest("base64");
    assert.equal(e3.json.ciphertextDataIntegrityValue, cdiv3);
  });

  it("4300-byte plaintext with 8192-byte AAD (and the test client's 4096 + 8192 via curl)", async () => {
    for (const [size, useCurl] of [[4300, false], [4096, true]] as const) {
      const pt = Buffer.alloc(size, 7);
      const aad = Buffer.alloc(8192, 9);
      const body = encBody(pt, aad, true);
      const e = useCurl ? await curlPost(fx.url, `${API}/keys/${K.default}/encrypt`, JSON.stringify(body), CREDS.a) : await post(`/keys/${K.default}/encrypt`, body);
      assert.equal(e.status, 200, e.text);
      const d = await post(`/keys/${K.default}/decrypt`, {
        requestMetadata: md("Decrypt"), ciphertext: e.json.ciphertext, initializationVector: e.json.initializationVector,
        authenticationTag: e.json.authenticationTag, ciphertextMetadata: e.json.ciphertextMetadata, additionalAuthenticatedData: b64(aad), encryptionAlgorithm: "AES_GCM",
      });
      assert.equal(d.status, 200, d.text);
      assert.ok(unb64(d.json.plaintext).equals(pt));
    }
  });

  it("tampered tag / AAD / IV / ciphertext / metadata, or missing AAD → InvalidCiphertextException", async () => {
    const aad = Buffer.from("context=a");
    const e = await post(`/keys/${K.default}/encrypt`, encBody("tamper me please", aad));
    const base: Record<string, unknown> = {
      requestMetadata: md("Decrypt"), ciphertext: e.json.ciphertext, initializationVector: e.json.initializationVector,
      authenticationTag: e.json.authenticationTag, additionalAuthenticatedData: b64(aad), encryptionAlgorithm: "AES_GCM",
      ciphertextMetadata: e.json.ciphertextMetadata ?? b64("x"),
    };
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
    expectError(await post(`/keys/${K.default}/decrypt`, { ...base, additionalAuthenticatedData: b64("context=b") }), "InvalidCiphertextException", "different AAD");
  });

  it("key usage: encrypt-only, decrypt-only and no-usage keys → InvalidKeyUsageException", async () => {
    // encrypt-only: plain encrypt works; encrypt with CDIV needs the check-decrypt → InvalidKeyUsage; decrypt → InvalidKeyUsage.
    const ok = await post(`/keys/${K.encryptOnly}/encrypt`, encBody("x", "aad"));
    assert.equal(ok.status, 200, ok.text);
    expectError(await post(`/keys/${K.encryptOnly}/encrypt`, encBody("x", "aad", true)), "InvalidKeyUsageException", "encOnly+CDIV");
    expectError(await post(`/keys/${K.encryptOnly}/encrypt`, encBody("x", undefined, true)), "InvalidKeyUsageException", "encOnly+CDIV no aad");
    expectError(
      await post(`/keys/${K.encryptOnly}/decrypt`, {
        requestMetadata: md("Decrypt"), ciphertext: ok.json.ciphertext, initializationVector: ok.json.initializationVector,
        authenticationTag: ok.json.authenticationTag, ciphertextMetadata: ok.json.ciphertextMetadata, additionalAuthenticatedData: b64("aad"), encryptionAlgorithm: "AES_GCM",
      }),
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

  it("agent stopped → fast 503 and health UNAVAILABLE within a refresh; restarted → recovery", async () => {
    await agent.stop();
    const r = await post(`/keys/${K.default}/encrypt`, encBody("while down"));
    expectError(r, "DependencyTimeoutException", "down");
    assert.ok(r.ms < 1000, `503 in ${r.ms} ms`);
    const refresh = fx.config.healthRefreshMs;
    const t0 = Date.now();
    assert.ok(await until(() => fx.proxy.agents.healthSnapshot()[0].state === "UNAVAILABLE", refresh * 3));
    assert.ok(Date.now() - t0 <= refresh * 3);
    const h = await post(`/health`, { requestMetadata: { kmsRequestId: "h-2", kmsOperation: "KmsHealthCheck" } });
    assert.equal(h.status, 200);
    assert.ok(h.ms < 250, `health in ${h.ms} ms while the agent is down`);
    assert.equal(h.json.ekmFleetDetails[0].healthStatus, "UNAVAILABLE");

    await agent.restart();
    assert.ok(await until(async () => (await post(`/keys/${K.default}/metadata`, { requestMetadata: md("CreateKey") })).status === 200, 5000), "crypto recovers");
    assert.ok(await until(() => fx.proxy.agents.healthSnapshot()[0].state === "ACTIVE", 5000), "health recovers");
    const e = await post(`/keys/${K.default}/encrypt`, encBody("after restart"));
    assert.equal(e.status, 200, e.text);
  });

  it("the proxy's log lines never hold plaintext, ciphertext, AAD, secrets or the Authorization header", async () => {
    const pt = Buffer.from("TOP-SECRET-PLAINTEXT-91827");
    const aad = Buffer.from("AAD-VALUE-5647382910");
    const e = await post(`/keys/${K.default}/encrypt`, encBody(pt, aad, true));
    assert.equal(e.status, 200);
    const d = await curlPost(
      fx.url,
      `${API}/keys/${K.default}/decrypt`,
      JSON.stringify({
        requestMetadata: md("Decrypt"), ciphertext: e.json.ciphertext, initializationVector: e.json.initializationVector,
        authenticationTag: e.json.authenticationTag, ciphertextMetadata: e.json.ciphertextMetadata, additionalAuthenticatedData: b64(aad), encryptionAlgorithm: "AES_GCM",
      }),
      CREDS.b,
    );
    assert.equal(d.status, 200);
    await post(`/keys/${K.default}/decrypt`, { requestMetadata: md("Decrypt"), ciphertext: e.json.ciphertext, initializationVector: e.json.initializationVector, authenticationTag: b64(Buffer.alloc(16)), encryptionAlgorithm: "AES_GCM" });
    const text = fx.logs.text();
    const forbidden = [
      pt.toString(), b64(pt), aad.toString(), b64(aad), e.json.ciphertext, e.json.authenticationTag, e.json.ciphertextDataIntegrityValue,
      CREDS.a.secretAccessKey, CREDS.b.secretAccessKey, agent.token, agent.softhsm.pin, "AWS4-HMAC-SHA256", "Signature=", "Credential=",
    ];
    for (const s of forbidden) assert.ok(!text.includes(s), `proxy log contains ${s}`);
    // ...while each request is there with its id.
    const lines = fx.logs.requests().filter((l) => l.operation === "Decrypt");
    assert.ok(lines.length >= 2);
    assert.ok(lines.every((l) => typeof l.kmsRequestId === "string" && typeof l.latencyMs === "number"));
  });
});
