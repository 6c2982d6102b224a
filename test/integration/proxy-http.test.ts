/**
 * The proxy over a REAL port (127.0.0.1:0), requests signed by an independent
 * signer (@smithy/signature-v4) and by real `curl --aws-sigv4`, talking gRPC
 * to fake agents (real grpc-js servers; see testbed/fake-agent.ts) so that
 * every agent failure reason can be provoked. The real agent on SoftHSM is
 * exercised in proxy-agent.test.ts.
 */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { connect } from "node:net";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { gzipSync } from "node:zlib";
import { after, before, describe, it } from "node:test";
import { XKS_ERRORS, type XksErrorName } from "../../shared/errors.ts";
import { CREDS, OTHER_PREFIX, PREFIX } from "../../testbed/configs.ts";
import { type FakeAgent, startFakeAgent } from "../../testbed/fake-agent.ts";
import { type ProxyFixture, startProxy } from "../../testbed/in-process.ts";
import { until } from "../../testbed/wait.ts";
import { b64, decryptBody, encryptBody, healthBody } from "../../testbed/xks/bodies.ts";
import { curlPost, type Resp, retryBusy, send, signedPost } from "../../testbed/xks/client.ts";
import { requestMetadata as md } from "../../testbed/xks/metadata.ts";
import { assertSpecError } from "../../testbed/xks/oracle.ts";

const REASON_KEYS = [
  "reason-KEY_NOT_FOUND",
  "reason-INVALID_KEY_USAGE",
  "reason-INVALID_CIPHERTEXT",
  "reason-INVALID_STATE",
  "reason-ACCESS_DENIED",
  "reason-THROTTLING",
  "reason-INTERNAL",
  "reason-VALIDATION",
  "reason-HSM_UNAVAILABLE",
];
const KEYS = ["foo", "never", "status-internal", "bad-answer", ...REASON_KEYS];
const API = `${PREFIX}/kms/xks/v1`;

function expectError(r: Resp, name: XksErrorName, label = ""): void {
  assertSpecError(r, name, label);
  if (Object.keys(r.headers).length) assert.match(String(r.headers["content-type"]), /^application\/json/);
}

const encBody = (plaintext: string | Buffer = "hello world", over: Record<string, unknown> = {}) => encryptBody(plaintext, { over });

describe("proxy over a real port (fake agent)", () => {
  let agent: FakeAgent;
  let fx: ProxyFixture;
  let dir: string;

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), "xks-proxy-http-"));
    agent = await startFakeAgent({ dir });
    fx = await startProxy({ agents: [{ id: "mac-1", target: agent.target, token: agent.token }], keys: KEYS });
    await until(() => fx.proxy.agents.healthSnapshot()[0].state === "ACTIVE", "the agent to be healthy");
  });
  after(async () => {
    await fx.close();
    await agent.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  it("GET /ping answers without auth", async () => {
    const r = await send(fx.url, { method: "GET", path: "/ping" });
    assert.equal(r.status, 200);
    assert.match(r.text, /^pong from xks-proxy \d+\.\d+\.\d+/);
  });

  it("encrypt (smithy) → decrypt (curl) round trip, with AAD and integrity value", async () => {
    const aad = b64("project=nile,department=marketing");
    const e = await signedPost(
      fx.url,
      `${API}/keys/foo/encrypt`,
      encBody("Hello World!", { additionalAuthenticatedData: aad, ciphertextDataIntegrityValueAlgorithm: "SHA_256" }),
      CREDS.a,
    );
    assert.equal(e.status, 200, e.text);
    assert.ok(!e.text.includes("\n") && !e.text.includes(": "), "compact single line");
    assert.deepEqual(Object.keys(e.json).sort(), [
      "authenticationTag",
      "ciphertext",
      "ciphertextDataIntegrityValue",
      "ciphertextMetadata",
      "initializationVector",
    ]);
    const d = await curlPost(
      fx.url,
      `${API}/keys/foo/decrypt`,
      JSON.stringify(decryptBody(e.json, { over: { additionalAuthenticatedData: aad } }), null, 4), // pretty-printed, as the AWS test client sends it
      CREDS.b, // second live credential (rotation)
    );
    assert.equal(d.status, 200, d.text);
    assert.equal(d.text, JSON.stringify({ plaintext: b64("Hello World!") }));
  });

  it("GetKeyMetadata and GetHealthStatus (curl)", async () => {
    // On a busy machine the fake agent's answer may miss the budget: the spec's busy answer, retried like KMS.
    const m = await retryBusy(() =>
      curlPost(fx.url, `${API}/keys/foo/metadata`, JSON.stringify({ requestMetadata: md("DescribeKey") }), CREDS.a),
    );
    assert.equal(m.text, '{"keySpec":"AES_256","keyUsage":["ENCRYPT","DECRYPT"],"keyStatus":"ENABLED"}');
    const h = await curlPost(fx.url, `${API}/health`, JSON.stringify(healthBody()), CREDS.a);
    assert.equal(h.status, 200);
    assert.deepEqual(h.json, {
      xksProxyFleetSize: 1,
      xksProxyVendor: "xks-pair tests",
      xksProxyModel: h.json.xksProxyModel,
      ekmVendor: "FakeHSM Inc.",
      ekmFleetDetails: [{ id: "fake-agent", model: "FakeHSM 1 (serial 0001, agent 0.0.0)", healthStatus: "ACTIVE" }],
    });
    assert.match(h.json.xksProxyModel, /^xks-proxy \d/);
  });

  it("every XKS error name with its status, as compact JSON", async () => {
    const reasonCase = (key: string) => signedPost(fx.url, `${API}/keys/${key}/metadata`, { requestMetadata: md("CreateKey") }, CREDS.a);
    const cases: Array<[XksErrorName, () => Promise<Resp>]> = [
      ["ValidationException", () => signedPost(fx.url, `${API}/keys/foo/encrypt`, "{not json", CREDS.a)],
      ["ValidationException", () => reasonCase("reason-VALIDATION")],
      ["InvalidStateException", () => reasonCase("reason-INVALID_STATE")],
      ["InvalidCiphertextException", () => reasonCase("reason-INVALID_CIPHERTEXT")],
      ["InvalidKeyUsageException", () => reasonCase("reason-INVALID_KEY_USAGE")],
      [
        "AuthenticationFailedException",
        () =>
          curlPost(fx.url, `${API}/keys/foo/metadata`, JSON.stringify({ requestMetadata: md("CreateKey") }), {
            ...CREDS.a,
            secretAccessKey: CREDS.b.secretAccessKey,
          }),
      ],
      [
        "AuthenticationFailedException",
        () =>
          curlPost(fx.url, `${API}/keys/foo/metadata`, JSON.stringify({ requestMetadata: md("CreateKey") }), {
            ...CREDS.a,
            accessKeyId: `INVALID${CREDS.a.accessKeyId}`.slice(0, 30),
          }),
      ],
      ["AccessDeniedException", () => reasonCase("reason-ACCESS_DENIED")],
      ["KeyNotFoundException", () => reasonCase("reason-KEY_NOT_FOUND")],
      ["KeyNotFoundException", () => signedPost(fx.url, `${API}/keys/non_existing_key/encrypt`, encBody(), CREDS.a)],
      ["InvalidUriPathException", () => curlPost(fx.url, `${PREFIX}/invalid/kms/xks/v1/health`, JSON.stringify(healthBody()), CREDS.a)],
      ["ThrottlingException", () => reasonCase("reason-THROTTLING")],
      ["InternalException", () => reasonCase("reason-INTERNAL")],
      ["InternalException", () => reasonCase("status-internal")],
      ["InternalException", () => reasonCase("bad-answer")],
      ["UnsupportedOperationException", () => signedPost(fx.url, `${API}/keys/foo/encrypt`, encBody(Buffer.alloc(8193)), CREDS.a)],
      ["DependencyTimeoutException", () => reasonCase("reason-HSM_UNAVAILABLE")],
      ["DependencyTimeoutException", () => reasonCase("never")], // the agent never answers: the deadline is certain to pass
    ];
    for (const [name, run] of cases) expectError(await run(), name, name);
    const named = new Set(cases.map((c) => c[0]));
    for (const n of Object.keys(XKS_ERRORS)) assert.ok(named.has(n as XksErrorName), `covered: ${n}`);
  });

  it("Decrypt with a tampered tag, AAD, IV, ciphertext or metadata → InvalidCiphertextException", async () => {
    const aad = b64("aad-1");
    const e = await signedPost(fx.url, `${API}/keys/foo/encrypt`, encBody("secret stuff", { additionalAuthenticatedData: aad }), CREDS.a);
    const base = decryptBody(e.json, { over: { additionalAuthenticatedData: aad } }) as Record<string, string>;
    const flip = (s: string) => {
      const b = Buffer.from(s, "base64");
      b[0] ^= 1;
      return b.toString("base64");
    };
    assert.equal((await signedPost(fx.url, `${API}/keys/foo/decrypt`, base, CREDS.a)).status, 200);
    for (const f of [
      "ciphertext",
      "initializationVector",
      "authenticationTag",
      "additionalAuthenticatedData",
      "ciphertextMetadata",
    ] as const) {
      expectError(
        await signedPost(fx.url, `${API}/keys/foo/decrypt`, { ...base, [f]: flip(base[f]) }, CREDS.a),
        "InvalidCiphertextException",
        f,
      );
    }
    const { additionalAuthenticatedData: _a, ...noAad } = base;
    expectError(await signedPost(fx.url, `${API}/keys/foo/decrypt`, noAad, CREDS.a), "InvalidCiphertextException", "missing AAD");
  });

  it("unknown prefix or path → 404 InvalidUriPathException with a valid, an invalid or no signature", async () => {
    // Background health refreshes (every 300 ms here) may call GetHealthStatus meanwhile: count the rest.
    const keyCalls = () => ({ ...agent.calls, GetHealthStatus: 0 });
    const calls = keyCalls();
    const wrong = `/example/uri/path/prefix/invalid/kms/xks/v1/keys/foo/encrypt`;
    expectError(await signedPost(fx.url, wrong, encBody(), CREDS.a), "InvalidUriPathException", "valid sig");
    expectError(
      await signedPost(fx.url, wrong, encBody(), { ...CREDS.a, secretAccessKey: CREDS.b.secretAccessKey }),
      "InvalidUriPathException",
      "bad sig",
    );
    expectError(
      await send(fx.url, { path: wrong, headers: { "content-type": "application/json" }, body: "{}" }),
      "InvalidUriPathException",
      "no sig",
    );
    for (const p of [
      "/",
      "/kms/xks/v1/health",
      `${API}/keys/foo/sign`,
      `${API}/health/`,
      `${API.toUpperCase()}/health`,
      `${API}/keys/foo/%65ncrypt`,
      "/%",
      "/ping/x",
    ]) {
      expectError(await signedPost(fx.url, p, healthBody(), CREDS.a), "InvalidUriPathException", p);
    }
    assert.deepEqual(keyCalls(), calls, "agent never called");
  });

  it("a credential of another key store is rejected (401), its own works", async () => {
    expectError(await signedPost(fx.url, `${OTHER_PREFIX}/kms/xks/v1/health`, healthBody(), CREDS.a), "AuthenticationFailedException");
    assert.equal((await signedPost(fx.url, `${OTHER_PREFIX}/kms/xks/v1/health`, healthBody(), CREDS.other)).status, 200);
    expectError(await signedPost(fx.url, `${API}/health`, healthBody(), CREDS.other), "AuthenticationFailedException");
  });

  it("SigV4 over the wire: stale date, other region, changed body, injected x-amz-content-sha256", async () => {
    const p = `${API}/keys/foo/encrypt`;
    expectError(
      await signedPost(fx.url, p, encBody(), CREDS.a, { sign: { date: new Date(Date.now() - 6 * 60_000) } }),
      "AuthenticationFailedException",
      "stale",
    );
    expectError(
      await signedPost(fx.url, p, encBody(), CREDS.a, { sign: { date: new Date(Date.now() + 6 * 60_000) } }),
      "AuthenticationFailedException",
      "future",
    );
    expectError(
      await signedPost(fx.url, p, encBody(), CREDS.a, { sign: { region: "us-west-2" } }),
      "AuthenticationFailedException",
      "region",
    );
    expectError(
      await curlPost(fx.url, p, JSON.stringify(encBody()), CREDS.a, { region: "eu-west-1" }),
      "AuthenticationFailedException",
      "curl region",
    );
    const other = JSON.stringify(encBody("attacker"));
    expectError(
      await signedPost(fx.url, p, encBody(), CREDS.a, {
        after: (h, body) => ({ headers: { ...h, "x-amz-content-sha256": sha256Hex(body) }, body: other }),
      }),
      "AuthenticationFailedException",
      "replayed signature with new body",
    );
  });

  it("GET (and other non-POST) on an API URI → 405 with Allow: POST and a JSON body without errorName (the spec defines none)", async () => {
    for (const method of ["GET", "PUT", "DELETE", "PATCH"]) {
      const r = await send(fx.url, { method, path: `${API}/keys/foo/encrypt` });
      assert.equal(r.status, 405, method);
      assert.equal(r.headers.allow, "POST");
      assert.deepEqual(r.json, { errorMessage: "Only POST is allowed on this URI." });
    }
    assert.equal((await send(fx.url, { method: "GET", path: `${API}/health` })).status, 405);
    expectError(await send(fx.url, { method: "GET", path: `/other/kms/xks/v1/health` }), "InvalidUriPathException");
  });

  it("sizes: 4300-byte plaintext + 8192-byte AAD and the configured maxima pass; one byte more → 501", async () => {
    const ok1 = await signedPost(
      fx.url,
      `${API}/keys/foo/encrypt`,
      encBody(Buffer.alloc(4300, 1), { additionalAuthenticatedData: b64(Buffer.alloc(8192, 2)) }),
      CREDS.a,
    );
    assert.equal(ok1.status, 200, ok1.text);
    const ok2 = await curlPost(
      fx.url,
      `${API}/keys/foo/encrypt`,
      JSON.stringify(encBody(Buffer.alloc(8192, 1), { additionalAuthenticatedData: b64(Buffer.alloc(16384, 2)) })),
      CREDS.a,
    );
    assert.equal(ok2.status, 200, ok2.text);
    expectError(
      await signedPost(fx.url, `${API}/keys/foo/encrypt`, encBody(Buffer.alloc(8193)), CREDS.a),
      "UnsupportedOperationException",
      "pt",
    );
    expectError(
      await signedPost(fx.url, `${API}/keys/foo/encrypt`, encBody("x", { additionalAuthenticatedData: b64(Buffer.alloc(16385)) }), CREDS.a),
      "UnsupportedOperationException",
      "aad",
    );
    const dec = {
      requestMetadata: md("Decrypt"),
      ciphertext: b64(Buffer.alloc(8193)),
      initializationVector: b64(Buffer.alloc(12)),
      authenticationTag: b64(Buffer.alloc(16)),
      encryptionAlgorithm: "AES_GCM",
    };
    expectError(await signedPost(fx.url, `${API}/keys/foo/decrypt`, dec, CREDS.a), "UnsupportedOperationException", "ct");
  });

  it("a body over the hard cap is refused before it is read, as XKS JSON (501)", async () => {
    const huge = JSON.stringify(encBody("x", { pad: "A".repeat(70_000) }));
    const r = await signedPost(fx.url, `${API}/keys/foo/encrypt`, huge, CREDS.a);
    expectError(r, "UnsupportedOperationException", "hard cap");
    assert.equal(r.headers.connection, "close");
    // Content-Length alone decides: the proxy answers without waiting for the (never sent) body.
    const raw = await rawExchange(
      fx.url,
      `POST ${API}/keys/foo/encrypt HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 10000000\r\n\r\n`,
    );
    assert.match(raw, /^HTTP\/1\.1 501 /);
    assert.ok(raw.includes('{"errorName":"UnsupportedOperationException"'));
  });

  it("non-canonical Base64 → 400 ValidationException", async () => {
    const good = b64("hello world"); // "aGVsbG8gd29ybGQ="
    assert.equal(good, "aGVsbG8gd29ybGQ=");
    const variants = [
      "aGVsbG8gd29ybGQ", // missing padding
      `${good}=`, // extra padding
      `${good.slice(0, 8)} ${good.slice(8)}`,
      `${good}\n`,
      `\t${good}`, // whitespace
      "aGVsbG8-d29ybGRf",
      "aGVsbG8_d29ybA==", // URL-safe alphabet
      "aGVsbG8gd29ybGR=", // non-zero trailing bits
      "aGVsbG8gd29ybGQ=aGVs", // padding in the middle
      "", // empty plaintext
    ];
    for (const v of variants)
      expectError(
        await signedPost(fx.url, `${API}/keys/foo/encrypt`, encBody("x", { plaintext: v }), CREDS.a),
        "ValidationException",
        JSON.stringify(v),
      );
    const aad = b64("ab"); // "YWI="
    expectError(
      await signedPost(fx.url, `${API}/keys/foo/encrypt`, encBody("x", { additionalAuthenticatedData: "YWJ=" }), CREDS.a),
      "ValidationException",
      aad,
    );
  });

  it("strict field validation → 400 ValidationException", async () => {
    const p = `${API}/keys/foo/encrypt`;
    const bad: Array<[string, unknown]> = [
      ["missing plaintext", { requestMetadata: md("Encrypt"), encryptionAlgorithm: "AES_GCM" }],
      ["wrong algorithm", encBody("x", { encryptionAlgorithm: "AES_CBC" })],
      ["missing algorithm", { requestMetadata: md("Encrypt"), plaintext: b64("x") }],
      ["wrong CDIV algorithm", encBody("x", { ciphertextDataIntegrityValueAlgorithm: "SHA_512" })],
      ["plaintext not a string", encBody("x", { plaintext: 5 })],
      ["no requestMetadata", { plaintext: b64("x"), encryptionAlgorithm: "AES_GCM" }],
      ["no principal", encBody("x", { requestMetadata: { ...md("Encrypt"), awsPrincipalArn: undefined } })],
      ["no kmsKeyArn", encBody("x", { requestMetadata: { ...md("Encrypt"), kmsKeyArn: undefined } })],
      ["kmsRequestId number", encBody("x", { requestMetadata: { ...md("Encrypt"), kmsRequestId: 1 } })],
      ["array body", []],
    ];
    for (const [label, body] of bad) expectError(await signedPost(fx.url, p, body, CREDS.a), "ValidationException", label);
    const dec = (o: Record<string, unknown>) => ({
      requestMetadata: md("Decrypt"),
      ciphertext: b64("abc"),
      initializationVector: b64(Buffer.alloc(12)),
      authenticationTag: b64(Buffer.alloc(16)),
      encryptionAlgorithm: "AES_GCM",
      ...o,
    });
    for (const [label, o] of [
      ["IV 13 bytes", { initializationVector: b64(Buffer.alloc(13)) }],
      ["IV missing", { initializationVector: undefined }],
      ["tag 15 bytes", { authenticationTag: b64(Buffer.alloc(15)) }],
      ["CM 21 bytes", { ciphertextMetadata: b64(Buffer.alloc(21)) }],
      ["ciphertext missing", { ciphertext: undefined }],
    ] as const) {
      expectError(await signedPost(fx.url, `${API}/keys/foo/decrypt`, dec(o), CREDS.a), "ValidationException", label);
    }
    // 16-byte IV and 20-byte metadata are valid input (the fake agent then fails the tag: 400 InvalidCiphertext).
    expectError(
      await signedPost(
        fx.url,
        `${API}/keys/foo/decrypt`,
        dec({ initializationVector: b64(Buffer.alloc(16)), ciphertextMetadata: b64(Buffer.alloc(20)) }),
        CREDS.a,
      ),
      "InvalidCiphertextException",
    );
  });

  it("unknown JSON fields and unknown kmsOperation values are accepted", async () => {
    const r = await signedPost(
      fx.url,
      `${API}/keys/foo/encrypt`,
      encBody("x", {
        someFutureField: { a: [1, 2] },
        requestMetadata: { ...md("SomeNewKmsOperation"), SourceIdentity: "x", kmsRecipientAttestationPCR0: "y" },
      }),
      CREDS.a,
    );
    assert.equal(r.status, 200, r.text);
    const m = await signedPost(
      fx.url,
      `${API}/keys/foo/metadata`,
      { requestMetadata: { ...md("DescribeKey"), unknown: 1 }, extra: null },
      CREDS.a,
    );
    assert.equal(m.status, 200, m.text);
  });

  it("malformed health bodies, bad JSON, wrong or missing content type → 400 ValidationException", async () => {
    expectError(await curlPost(fx.url, `${API}/health`, "{}", CREDS.a), "ValidationException", "{}");
    expectError(
      await curlPost(fx.url, `${API}/health`, '{\n    "requestMetadata": {\n    }\n}', CREDS.a),
      "ValidationException",
      "empty md",
    );
    expectError(await curlPost(fx.url, `${API}/health`, '{"requestMetadata":', CREDS.a), "ValidationException", "bad json");
    expectError(
      await curlPost(fx.url, `${API}/health`, JSON.stringify(healthBody()), CREDS.a, { contentType: "text/plain" }),
      "ValidationException",
      "text/plain",
    );
    expectError(
      await curlPost(fx.url, `${API}/health`, JSON.stringify(healthBody()), CREDS.a, { contentType: null }),
      "ValidationException",
      "curl default form type",
    );
    expectError(await signedPost(fx.url, `${API}/health`, "", CREDS.a), "ValidationException", "empty body");
    const gz = gzipSync(JSON.stringify(healthBody()));
    expectError(
      await signedPost(fx.url, `${API}/health`, gz, CREDS.a, {
        headers: { "content-type": "application/json", "content-encoding": "gzip" },
      }),
      "ValidationException",
      "gzip",
    );
  });

  it("never HTML: a garbled HTTP request gets XKS JSON too", async () => {
    const raw = await rawExchange(fx.url, "THIS IS NOT HTTP\r\n\r\n");
    assert.match(raw, /^HTTP\/1\.1 400 /);
    assert.ok(raw.includes('{"errorName":"ValidationException"'));
    assert.ok(!/<html|<pre|stack/i.test(raw));
  });

  it("logs one allow-listed line per request; 5xx at error, 4xx at warn; no payloads or secrets", async () => {
    const marker = "PLAINTEXT-MARKER-4711";
    const aadMarker = "AAD-MARKER-0815";
    const before = fx.logs.requests().length;
    const e = await signedPost(
      fx.url,
      `${API}/keys/foo/encrypt`,
      encBody(marker, { additionalAuthenticatedData: b64(aadMarker) }),
      CREDS.a,
    );
    await signedPost(fx.url, `${API}/keys/reason-INTERNAL/metadata`, { requestMetadata: md("CreateKey") }, CREDS.a);
    await signedPost(fx.url, `${API}/keys/reason-INVALID_STATE/metadata`, { requestMetadata: md("CreateKey") }, CREDS.a);
    await until(() => fx.logs.requests().length >= before + 3, "three completion lines");
    const lines = fx.logs.requests().slice(before);
    const [ok, five, four] = lines;
    assert.equal(ok.level, "info");
    assert.equal(ok.status, 200);
    assert.equal(ok.operation, "Encrypt");
    assert.equal(ok.kmsOperation, "Encrypt");
    assert.equal(ok.keyStore, PREFIX);
    assert.equal(ok.key, "foo");
    assert.equal(ok.principal, "arn:aws:iam::123456789012:user/Alice");
    assert.equal(ok.accessKeyId, CREDS.a.accessKeyId);
    assert.equal(ok.agent, "mac-1");
    assert.match(ok.kmsRequestId, /^req-/);
    assert.equal(typeof ok.latencyMs, "number");
    assert.equal(five.level, "error");
    assert.equal(five.errorName, "InternalException");
    assert.equal(four.level, "warn");
    assert.equal(four.errorName, "InvalidStateException");
    const all = fx.logs.text();
    for (const s of [
      marker,
      b64(marker),
      aadMarker,
      b64(aadMarker),
      e.json.ciphertext,
      CREDS.a.secretAccessKey,
      CREDS.b.secretAccessKey,
      agent.token,
      "AWS4-HMAC-SHA256",
      "Signature=",
    ]) {
      assert.ok(!all.includes(s), `log must not contain ${s}`);
    }
  });
});

describe("proxy with unreachable / misconfigured agents", () => {
  let fx: ProxyFixture;
  let wrongToken: ProxyFixture;
  let agent: FakeAgent;
  let dir: string;
  before(async () => {
    dir = mkdtempSync(join(tmpdir(), "xks-proxy-down-"));
    agent = await startFakeAgent({ dir, name: "tok" });
    fx = await startProxy({
      agents: [
        { id: "gone-unix", target: `unix://${join(dir, "nothing-here.sock")}`, token: "0123456789abcdef0123" },
        { id: "gone-tcp", target: "127.0.0.1:1", token: "0123456789abcdef0123" },
      ],
    });
    wrongToken = await startProxy({ agents: [{ id: "tok", target: agent.target, token: "not-the-agents-token-at-all" }] });
  });
  after(async () => {
    await fx.close();
    await wrongToken.close();
    await agent.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  it("crypto calls get 503 DependencyTimeoutException, every time", async () => {
    for (let i = 0; i < 4; i++)
      expectError(await signedPost(fx.url, `${API}/keys/foo/encrypt`, encBody(), CREDS.a), "DependencyTimeoutException");
  });

  it("health answers from the cache, every entry UNAVAILABLE", async () => {
    const r = await curlPost(fx.url, `${API}/health`, JSON.stringify(healthBody()), CREDS.a);
    assert.equal(r.status, 200);
    assert.deepEqual(r.json.ekmFleetDetails, [
      { id: "gone-unix", model: "unknown", healthStatus: "UNAVAILABLE" },
      { id: "gone-tcp", model: "unknown", healthStatus: "UNAVAILABLE" },
    ]);
  });

  it("an agent that refuses the proxy's token → 500 InternalException (misconfiguration), health UNAVAILABLE", async () => {
    expectError(
      await signedPost(wrongToken.url, `${API}/keys/foo/metadata`, { requestMetadata: md("CreateKey") }, CREDS.a),
      "InternalException",
    );
    await until(() => wrongToken.proxy.agents.healthSnapshot()[0].checkedAt !== undefined, "a health check");
    assert.equal(wrongToken.proxy.agents.healthSnapshot()[0].state, "UNAVAILABLE");
    assert.equal(agent.calls.GetKeyMetadata, undefined, "the agent ran nothing");
  });
});

describe("several agents: routing to healthy ones, health per agent", () => {
  let a1: FakeAgent;
  let a2: FakeAgent;
  let fx: ProxyFixture;
  let dir: string;
  before(async () => {
    dir = mkdtempSync(join(tmpdir(), "xks-proxy-rr-"));
    a1 = await startFakeAgent({ dir, name: "one" });
    a2 = await startFakeAgent({ dir, name: "two" });
    fx = await startProxy({
      agents: [
        { id: "mac-1", target: a1.target, token: a1.token },
        { id: "mac-2", target: a2.target, token: a2.token },
      ],
    });
    await until(() => fx.proxy.agents.healthSnapshot().every((h) => h.state === "ACTIVE"), "both agents ACTIVE");
  });
  after(async () => {
    await fx.close();
    await a1.stop();
    await a2.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  it("spreads calls round-robin, reports each agent, skips UNAVAILABLE ones (DEGRADED still serves)", async () => {
    for (let i = 0; i < 6; i++)
      assert.equal((await signedPost(fx.url, `${API}/keys/foo/metadata`, { requestMetadata: md("CreateKey") }, CREDS.a)).status, 200);
    assert.equal(a1.calls.GetKeyMetadata, 3);
    assert.equal(a2.calls.GetKeyMetadata, 3);
    a2.health.state = "UNAVAILABLE";
    a1.health.state = "DEGRADED";
    await until(() => fx.proxy.agents.healthSnapshot()[1].state === "UNAVAILABLE", "agent two UNAVAILABLE");
    const h = await signedPost(fx.url, `${API}/health`, healthBody(), CREDS.a);
    assert.deepEqual(
      h.json.ekmFleetDetails.map((e: { id: string; healthStatus: string }) => [e.id, e.healthStatus]),
      [
        ["fake-one", "DEGRADED"],
        ["fake-two", "UNAVAILABLE"],
      ],
    );
    for (let i = 0; i < 4; i++)
      assert.equal((await signedPost(fx.url, `${API}/keys/foo/metadata`, { requestMetadata: md("CreateKey") }, CREDS.a)).status, 200);
    assert.equal(a1.calls.GetKeyMetadata, 7, "DEGRADED still serves; UNAVAILABLE is skipped");
    assert.equal(a2.calls.GetKeyMetadata, 3);
  });

  it("a stopped agent costs at most one 503, then traffic goes to the other", async () => {
    a2.health.state = "ACTIVE";
    a1.health.state = "ACTIVE";
    await until(() => fx.proxy.agents.healthSnapshot().every((h) => h.state === "ACTIVE"), "both agents ACTIVE");
    await a2.stop();
    const statuses: number[] = [];
    for (let i = 0; i < 8; i++)
      statuses.push((await signedPost(fx.url, `${API}/keys/foo/metadata`, { requestMetadata: md("CreateKey") }, CREDS.a)).status);
    assert.ok(statuses.filter((s) => s === 503).length <= 1, `statuses ${statuses}`);
    await until(() => fx.proxy.agents.healthSnapshot()[1].state === "UNAVAILABLE", "the stopped agent UNAVAILABLE");
  });
});

function sha256Hex(b: string | Buffer): string {
  return createHash("sha256").update(b).digest("hex");
}

/** Writes raw bytes to the proxy's port and returns whatever comes back before close (≤ 2 s). */
function rawExchange(url: string, data: string): Promise<string> {
  const u = new URL(url);
  return new Promise((resolve, reject) => {
    const s = connect(Number(u.port), u.hostname);
    let out = "";
    const t = setTimeout(() => {
      s.destroy();
      resolve(out);
    }, 2000);
    s.on("data", (c) => {
      out += c.toString("utf8");
      if (out.includes("\r\n\r\n") && /\}$/.test(out)) {
        clearTimeout(t);
        s.destroy();
        resolve(out);
      }
    });
    s.on("error", reject);
    s.on("close", () => {
      clearTimeout(t);
      resolve(out);
    });
    s.write(data);
  });
}
