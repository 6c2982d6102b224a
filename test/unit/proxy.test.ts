/**
 * Proxy unit tests: Base64 canonical checker, body/metadata validation, config
 * validation, route parser, the agent-failure mapping table, the health
 * response builder, credential generation, and buildApp() in-process with a
 * STUB agent (wire ↔ proto mapping, handler never reached on auth failure).
 */
import assert from "node:assert/strict";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { createServer, type Server } from "node:http";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import * as grpc from "@grpc/grpc-js";
import { ConfigError } from "../../shared/config.ts";
import { REASONS, REASON_METADATA_KEY, XKS_ERRORS, XksError, type Reason } from "../../shared/errors.ts";
import { createLogger } from "../../shared/logging.ts";
import type { EncryptRequest } from "../../shared/proto.ts";
import { classifyAgentFailure, type AgentApi, type AgentHealth, type AgentMethod } from "../../proxy/agent-client.ts";
import { buildApp } from "../../proxy/app.ts";
import { buildRequestHandler } from "../../proxy/shed.ts";
import { base32, newCredential } from "../../proxy/credentials.ts";
import { ACCESS_KEY_ID_RE, SECRET_ACCESS_KEY_RE, loadProxyConfig, parseProxyConfig, prefixProblem } from "../../proxy/config.ts";
import { buildHealthResponse } from "../../proxy/handlers/get-health-status.ts";
import { parseXksPath } from "../../proxy/routes.ts";
import { isCanonicalBase64, parseJsonBody, parseRequestMetadata, base64Field } from "../../proxy/validate.ts";
import { CREDS, PREFIX } from "../../testbed/configs.ts";
import { newIdentity, TEST_IDENTITIES, writeIdentity, writePins } from "../../testbed/identities.ts";
import { LogCapture } from "../../testbed/logs.ts";
import { until } from "../../testbed/wait.ts";
import { send, signedPost } from "../../testbed/xks/client.ts";
import { requestMetadata as md } from "../../testbed/xks/metadata.ts";

describe("canonical standard Base64", () => {
  const good = ["", "AA==", "AAA=", "AAAA", "SGVsbG8gV29ybGQh", "a2V5X3ZlcnNpb249MQ==", "+/+/", "vBxN2ncH1oEkR8WVXpmyYQ=="];
  const bad = [
    "A",
    "AA",
    "AAA",
    "AA=",
    "A===",
    "====",
    "AAAA=",
    "AA==AA==", // length/padding
    "-_-_",
    "SGVsbG8gV29ybGQh-",
    "ab_c", // URL-safe alphabet
    "AA AA",
    " AAAA",
    "AAAA\n",
    "AA\r\nAA",
    "AAAA\t", // whitespace
    "AB==",
    "AAB=",
    "AAF=",
    "vBxN2ncH1oEkR8WVXpmyYR==", // non-zero trailing bits
    "AA=A",
    "A=AA",
    "Zm9v!",
    "Zm9vYg", // junk / missing padding
  ];
  for (const s of good) it(`accepts ${JSON.stringify(s)}`, () => assert.equal(isCanonicalBase64(s), true));
  for (const s of bad) it(`rejects ${JSON.stringify(s)}`, () => assert.equal(isCanonicalBase64(s), false));

  it("base64Field: lengths → 400, over max → 501, missing required → 400", () => {
    const code = (f: () => unknown) => {
      try {
        f();
      } catch (e) {
        return (e as XksError).errorName;
      }
      return "ok";
    };
    assert.equal(
      code(() => base64Field({ iv: Buffer.alloc(13).toString("base64") }, "iv", { required: true, lengths: [12, 16] })),
      "ValidationException",
    );
    assert.equal(
      code(() => base64Field({ iv: Buffer.alloc(16).toString("base64") }, "iv", { required: true, lengths: [12, 16] })),
      "ok",
    );
    assert.equal(
      code(() => base64Field({ p: Buffer.alloc(11).toString("base64") }, "p", { required: true, maxBytes: 10 })),
      "UnsupportedOperationException",
    );
    assert.equal(
      code(() => base64Field({}, "p", { required: true })),
      "ValidationException",
    );
    assert.equal(
      code(() => base64Field({ p: 12 }, "p", { required: true })),
      "ValidationException",
    );
    assert.equal(base64Field({}, "p", { required: false }).length, 0);
  });
});

describe("request body validation", () => {
  const errName = (f: () => unknown) => {
    try {
      f();
      return "ok";
    } catch (e) {
      return (e as XksError).errorName;
    }
  };
  it("content type must be application/json (utf-8)", () => {
    const b = Buffer.from("{}");
    assert.equal(
      errName(() => parseJsonBody(b, undefined)),
      "ValidationException",
    );
    assert.equal(
      errName(() => parseJsonBody(b, "text/plain")),
      "ValidationException",
    );
    assert.equal(
      errName(() => parseJsonBody(b, "application/x-www-form-urlencoded")),
      "ValidationException",
    );
    assert.equal(
      errName(() => parseJsonBody(b, "application/json; charset=latin1")),
      "ValidationException",
    );
    assert.equal(
      errName(() => parseJsonBody(b, "application/json")),
      "ok",
    );
    assert.equal(
      errName(() => parseJsonBody(b, "Application/JSON; charset=UTF-8")),
      "ok",
    );
  });
  it("body must be one JSON object in valid UTF-8", () => {
    for (const s of ["", "{", "[]", "null", "1", '"x"', "{}{}"])
      assert.equal(
        errName(() => parseJsonBody(Buffer.from(s), "application/json")),
        "ValidationException",
        s,
      );
    assert.equal(
      errName(() => parseJsonBody(Buffer.from([0x7b, 0xff, 0x7d]), "application/json")),
      "ValidationException",
    );
  });
  it("requestMetadata: required fields per operation, unknown fields and kmsOperation values accepted", () => {
    assert.equal(
      errName(() => parseRequestMetadata({}, "GetHealthStatus")),
      "ValidationException",
    );
    assert.equal(
      errName(() => parseRequestMetadata({ requestMetadata: {} }, "GetHealthStatus")),
      "ValidationException",
    );
    assert.equal(
      errName(() => parseRequestMetadata({ requestMetadata: [] }, "GetHealthStatus")),
      "ValidationException",
    );
    assert.equal(
      errName(() => parseRequestMetadata({ requestMetadata: { kmsRequestId: "1", kmsOperation: 7 } }, "GetHealthStatus")),
      "ValidationException",
    );
    assert.equal(
      errName(() =>
        parseRequestMetadata({ requestMetadata: { kmsRequestId: "1", kmsOperation: "SomethingNew", future: { x: 1 } } }, "GetHealthStatus"),
      ),
      "ok",
    );
    const noKeyArn = { requestMetadata: { awsPrincipalArn: "p", kmsOperation: "DescribeKey", kmsRequestId: "1" } };
    assert.equal(
      errName(() => parseRequestMetadata(noKeyArn, "GetKeyMetadata")),
      "ok",
    );
    assert.equal(
      errName(() => parseRequestMetadata(noKeyArn, "Encrypt")),
      "ValidationException",
    );
    assert.equal(
      errName(() => parseRequestMetadata({ requestMetadata: { ...md("Encrypt"), kmsViaService: 3 } }, "Encrypt")),
      "ValidationException",
    );
    const m = parseRequestMetadata({ requestMetadata: md("Decrypt", { awsSourceVpc: "vpc-1", awsSourceVpce: "vpce-1" }) }, "Decrypt");
    assert.equal(m.awsSourceVpc, "vpc-1");
    assert.equal(m.kmsViaService, "ebs");
  });
});

describe("proxy config", () => {
  let dir: string;
  before(() => {
    dir = mkdtempSync(join(tmpdir(), "xks-proxy-config-"));
    writeFileSync(join(dir, "a.secret"), `${CREDS.a.secretAccessKey}\n`, { mode: 0o600 });
    writeFileSync(join(dir, "short.secret"), "tooshort\n", { mode: 0o600 });
    writeFileSync(join(dir, "token"), "0123456789abcdef0123\n", { mode: 0o600 });
    writeIdentity(dir, "proxy-identity", TEST_IDENTITIES.proxy);
    writePins(dir, "agent", [TEST_IDENTITIES.agent, newIdentity("next"), newIdentity("third")]);
    writeFileSync(join(dir, "not-a-cert.crt"), "hello\n");
  });
  after(() => rmSync(dir, { recursive: true, force: true }));

  const valid = () => ({
    region: "us-east-1",
    identity: { key: { file: "proxy-identity.key" }, certificate: "proxy-identity.crt" },
    agents: [{ id: "mac-1", target: "unix:///run/xks/agent.sock", token: { file: "token" }, identities: ["agent-0.crt"] }],
    keyStores: [
      { uriPathPrefix: PREFIX, credentials: [{ accessKeyId: CREDS.a.accessKeyId, secretAccessKey: { file: "a.secret" } }], keys: ["foo"] },
    ],
  });

  it("loads a valid file with defaults, frozen", () => {
    const file = join(dir, "ok.json");
    writeFileSync(file, JSON.stringify(valid()));
    const c = loadProxyConfig(file, {});
    assert.equal(c.agentDeadlineMs, 200);
    assert.equal(c.fleetSize, 1);
    assert.equal(c.healthRefreshMs, 10_000);
    assert.deepEqual(c.limits, { maxPlaintextBytes: 8192, maxCiphertextBytes: 8192, maxAadBytes: 16384, maxBodyBytes: 65536 });
    assert.equal(c.keyStores[0].credentials[0].secretAccessKey, CREDS.a.secretAccessKey);
    assert.equal(c.agents[0].token, "0123456789abcdef0123");
    assert.equal(c.identity.fingerprint, TEST_IDENTITIES.proxy.fingerprint);
    assert.deepEqual(
      c.agents[0].identities.map((p) => p.fingerprint),
      [TEST_IDENTITIES.agent.fingerprint],
    );
    assert.ok(Object.isFrozen(c) && Object.isFrozen(c.keyStores[0].credentials[0]));
  });

  it("reports every problem at once, each with the file and the field, never a secret", () => {
    const file = join(dir, "bad.json");
    const bad = {
      region: "US East",
      agentDeadlineMs: 400,
      typo: true,
      identity: { key: { file: "proxy-identity.key" }, certificate: "agent-0.crt" },
      agents: [
        { id: "mac 1", target: "http://x", token: "inline-token", identities: [] },
        { id: "mac-2", target: "127.0.0.1:7000", token: { env: "NOPE" }, identities: ["agent-0.crt", "agent-1.crt", "agent-2.crt"] },
        { id: "mac-3", target: "127.0.0.1:7001", token: { file: "token" }, identities: ["agent-0.crt", "agent-0.crt"] },
        { id: "mac-4", target: "127.0.0.1:7002", token: { file: "token" }, identities: ["not-a-cert.crt", "missing.crt"] },
      ],
      limits: { maxPlaintextBytes: 4000, maxAadBytes: 1024, maxBodyBytes: 2048 },
      keyStores: [
        {
          uriPathPrefix: "short",
          credentials: [{ accessKeyId: "lowercase", secretAccessKey: { file: "short.secret" } }],
          keys: ["ok", "bad key", "ok"],
        },
        { uriPathPrefix: "/example/uri/path/prefix/", credentials: [], keys: [] },
        {
          uriPathPrefix: "/example//double",
          credentials: [{ accessKeyId: CREDS.a.accessKeyId, secretAccessKey: { file: "missing.secret" } }],
          keys: ["x"],
        },
        {
          uriPathPrefix: "short",
          credentials: [
            { accessKeyId: CREDS.a.accessKeyId, secretAccessKey: { file: "a.secret" } },
            { accessKeyId: CREDS.a.accessKeyId, secretAccessKey: { file: "a.secret" } },
          ],
          keys: ["x"],
        },
      ],
      log: { level: "loud" },
    };
    writeFileSync(file, JSON.stringify(bad));
    let err: ConfigError | undefined;
    try {
      loadProxyConfig(file, {});
    } catch (e) {
      err = e as ConfigError;
    }
    assert.ok(err instanceof ConfigError, "a ConfigError");
    assert.ok(err.message.includes(file), "names the file");
    const expectFields = [
      "region:",
      "agentDeadlineMs:",
      "typo: unknown field",
      "agents[0].id:",
      "agents[0].target:",
      "agents[0].token:",
      "agents[1].token: environment variable NOPE",
      "identity: the key does not belong to the certificate",
      "agents[0].identities: must have at least 1",
      "agents[1].identities: must have 1 or 2 entries",
      "agents[2].identities[1]: the same identity is pinned twice",
      "agents[3].identities[0]: not a PEM X.509 certificate",
      "agents[3].identities[1]: cannot read",
      "limits.maxPlaintextBytes:",
      "limits.maxAadBytes:",
      "limits.maxBodyBytes:",
      "keyStores[0].uriPathPrefix:",
      "keyStores[0].credentials[0].accessKeyId:",
      "keyStores[0].credentials[0].secretAccessKey: must be 43-64",
      "keyStores[0].keys[1]:",
      "keyStores[0].keys[2]: duplicate",
      "keyStores[1].uriPathPrefix: must not end",
      "keyStores[1].credentials: must have at least 1",
      "keyStores[2].uriPathPrefix: must not contain",
      "keyStores[2].credentials[0].secretAccessKey: cannot read",
      "keyStores[3].uriPathPrefix: duplicate",
      "keyStores[3].credentials[1].accessKeyId: duplicate",
      "log.level:",
    ];
    for (const f of expectFields)
      assert.ok(
        err.problems.some((p) => p.startsWith(f)),
        `expected a problem starting with ${f}\n${err.message}`,
      );
    assert.ok(!err.message.includes("tooshort") && !err.message.includes("inline-token"), "secrets never echoed");
  });

  it("rejects a missing file and invalid JSON as ConfigError", () => {
    assert.throws(() => loadProxyConfig(join(dir, "none.json"), {}), ConfigError);
    writeFileSync(join(dir, "garbage.json"), "{nope");
    assert.throws(() => loadProxyConfig(join(dir, "garbage.json"), {}), ConfigError);
  });

  it("an access key id shared by two stores must have the same secret", () => {
    writeFileSync(join(dir, "b.secret"), CREDS.b.secretAccessKey, { mode: 0o600 });
    const cfg = valid();
    cfg.keyStores.push({
      uriPathPrefix: "",
      credentials: [{ accessKeyId: CREDS.a.accessKeyId, secretAccessKey: { file: "b.secret" } }],
      keys: [],
    });
    assert.throws(
      () => parseProxyConfig(cfg, join(dir, "x.json"), {}),
      /keyStores\[1\]\.credentials\[0\]\.accessKeyId: is used by another key store/,
    );
  });

  it("prefix rule: empty or 9–117 chars of [a-zA-Z0-9/_-] starting with /", () => {
    assert.equal(prefixProblem(""), undefined);
    assert.equal(prefixProblem("/12345678"), undefined);
    assert.equal(prefixProblem(`/${"a".repeat(116)}`), undefined);
    assert.ok(prefixProblem("/1234567"));
    assert.ok(prefixProblem(`/${"a".repeat(117)}`));
    assert.ok(prefixProblem("/with.dot/x"));
    assert.ok(prefixProblem("no-leading-slash"));
  });
});

describe("route parser", () => {
  it("splits prefix / operation / key id on the raw path", () => {
    assert.deepEqual(parseXksPath("/kms/xks/v1/health"), { prefix: "", operation: "GetHealthStatus" });
    assert.deepEqual(parseXksPath("/a/b/kms/xks/v1/keys/foo.1_x-y/encrypt"), { prefix: "/a/b", operation: "Encrypt", keyId: "foo.1_x-y" });
    assert.deepEqual(parseXksPath("/p/kms/xks/v1/keys/k/decrypt"), { prefix: "/p", operation: "Decrypt", keyId: "k" });
    assert.deepEqual(parseXksPath("/p/kms/xks/v1/keys/k/metadata"), { prefix: "/p", operation: "GetKeyMetadata", keyId: "k" });
    for (const p of [
      "/p/kms/xks/v1/health/",
      "/p/kms/xks/v2/health",
      "/p/kms/xks/v1/keys//encrypt",
      "/p/kms/xks/v1/keys/a/b/encrypt",
      "/p/kms/xks/v1/keys/k/sign",
      "/p/KMS/xks/v1/health",
      "/ping",
    ]) {
      assert.equal(parseXksPath(p), undefined, p);
    }
  });
});

describe("agent failure → XKS error and transport (one table)", () => {
  const withReason = (reason: string, code: grpc.status) => {
    const md = new grpc.Metadata();
    md.set(REASON_METADATA_KEY, reason);
    return Object.assign(new Error("x"), { code, details: "d", metadata: md });
  };
  const noReason = (code: grpc.status) => Object.assign(new Error("x"), { code, details: "d", metadata: new grpc.Metadata() });
  const classify = (err: unknown) => {
    const f = classifyAgentFailure(err);
    return { name: f.error.errorName, transport: f.transport };
  };
  for (const [reason, row] of Object.entries(REASONS)) {
    it(`xks-reason ${reason} → ${row.xks}, not transport`, () =>
      assert.deepEqual(classify(withReason(reason, row.grpc)), { name: REASONS[reason as Reason].xks, transport: false }));
  }
  const cases: Array<[grpc.status, string, boolean]> = [
    [grpc.status.DEADLINE_EXCEEDED, "DependencyTimeoutException", true],
    [grpc.status.UNAVAILABLE, "DependencyTimeoutException", true],
    [grpc.status.UNAUTHENTICATED, "InternalException", false],
    [grpc.status.INTERNAL, "InternalException", false],
    [grpc.status.NOT_FOUND, "InternalException", false],
    [grpc.status.UNKNOWN, "InternalException", false],
  ];
  for (const [code, name, transport] of cases) {
    it(`no reason, ${grpc.status[code]} → ${name}${transport ? ", transport" : ""}`, () =>
      assert.deepEqual(classify(noReason(code)), { name, transport }));
  }
  it("an unknown reason falls back to the status, and is not transport (the agent answered)", () => {
    assert.deepEqual(classify(withReason("NEW_REASON", grpc.status.UNAVAILABLE)), { name: "DependencyTimeoutException", transport: false });
  });
  it("transport is exactly UNAVAILABLE or DEADLINE_EXCEEDED without a reason", () => {
    for (const code of Object.values(grpc.status).filter((v): v is grpc.status => typeof v === "number")) {
      const down = code === grpc.status.UNAVAILABLE || code === grpc.status.DEADLINE_EXCEEDED;
      assert.equal(classifyAgentFailure(noReason(code)).transport, down, grpc.status[code]);
      for (const reason of Object.keys(REASONS))
        assert.equal(classifyAgentFailure(withReason(reason, code)).transport, false, `${grpc.status[code]} ${reason}`);
    }
  });
  it("every XKS error name has a status and a fixed printable message under 512 chars", () => {
    for (const [name, v] of Object.entries(XKS_ERRORS)) {
      assert.ok(v.status >= 400 && v.status < 600, name);
      assert.match(v.message, /^[\x20-\x7e]{1,511}$/, name);
    }
  });
});

describe("health response builder", () => {
  const ctx = { fleetSize: 2, vendor: "V", ekmVendor: "fallback-vendor" };
  it("before the first refresh every entry is UNAVAILABLE with the configured id", () => {
    const r = buildHealthResponse(
      [
        { id: "mac-1", state: "UNAVAILABLE" },
        { id: "mac-2", state: "UNAVAILABLE" },
      ],
      ctx,
    );
    assert.equal(r.xksProxyFleetSize, 2);
    assert.equal(r.xksProxyVendor, "V");
    assert.match(r.xksProxyModel, /^xks-proxy \d+\.\d+\.\d+/);
    assert.equal(r.ekmVendor, "fallback-vendor");
    assert.deepEqual(r.ekmFleetDetails, [
      { id: "mac-1", model: "unknown", healthStatus: "UNAVAILABLE" },
      { id: "mac-2", model: "unknown", healthStatus: "UNAVAILABLE" },
    ]);
  });
  it("uses the agent's id, token model/serial and manufacturer; ids stay unique", () => {
    const report = (agentId: string) => ({
      agentId,
      state: "ACTIVE" as const,
      tokenManufacturer: "SoftHSM project",
      tokenModel: "SoftHSM v2",
      tokenSerial: "abc",
      tokenLabel: "t",
      detail: "",
      agentVersion: "0.1.0",
      paused: false,
      tunnels: [],
      auditHead: null,
      keyChecks: [],
    });
    const hs: AgentHealth[] = [
      { id: "mac-1", state: "ACTIVE", checkedAt: 1, report: report("hsm-a") },
      { id: "mac-2", state: "DEGRADED", checkedAt: 1, report: report("hsm-a") },
    ];
    const r = buildHealthResponse(hs, ctx);
    assert.equal(r.ekmVendor, "SoftHSM project");
    assert.deepEqual(r.ekmFleetDetails, [
      { id: "hsm-a", model: "SoftHSM v2 (serial abc, agent 0.1.0)", healthStatus: "ACTIVE" },
      { id: "mac-2", model: "SoftHSM v2 (serial abc, agent 0.1.0)", healthStatus: "DEGRADED" },
    ]);
  });
});

describe("credentials new", () => {
  it("makes spec-valid credentials and the KMS proxy configuration file", () => {
    const c = newCredential("/example/uri/path/prefix");
    assert.match(c.accessKeyId, ACCESS_KEY_ID_RE);
    assert.equal(c.accessKeyId.length, 26);
    assert.match(c.secretAccessKey, SECRET_ACCESS_KEY_RE);
    assert.equal(Buffer.from(c.secretAccessKey, "base64").length, 32);
    assert.deepEqual(c.proxyConfigurationFile, {
      XksProxyUriPath: "/example/uri/path/prefix/kms/xks/v1",
      XksProxyAuthenticationCredential: { AccessKeyId: c.accessKeyId, RawSecretAccessKey: c.secretAccessKey },
    });
    assert.match(c.proxyConfigurationFile.XksProxyUriPath, /^(\/[a-zA-Z0-9/_-]+\/kms\/xks\/v\d{1,2})$|^(\/kms\/xks\/v\d{1,2})$/);
    assert.equal(newCredential().proxyConfigurationFile.XksProxyUriPath, "/kms/xks/v1");
    assert.notEqual(newCredential().accessKeyId, c.accessKeyId);
    assert.equal(base32(Buffer.from("foobar")), "MZXW6YTBOI"); // RFC 4648 test vector (unpadded)
  });
});

/** A 128-character key id, the longest the spec allows. */
const LONGEST_KEY = "L".repeat(128);

describe("buildApp in-process with a stub agent", () => {
  const calls: Array<{ method: AgentMethod; req: any }> = [];
  let answer: (method: AgentMethod, req: any) => any = () => ({});
  const stub: AgentApi = {
    async call(method, req) {
      calls.push({ method, req });
      return { response: answer(method, req), agentId: "stub-1" };
    },
    healthSnapshot: () => [{ id: "stub-1", state: "UNAVAILABLE" }],
  };
  const idDir = mkdtempSync(join(tmpdir(), "xks-app-ids-"));
  const config = parseProxyConfig(
    {
      region: "us-east-1",
      identity: writeIdentity(idDir, "proxy-identity", TEST_IDENTITIES.proxy),
      agents: [
        { id: "stub-1", target: "127.0.0.1:1", token: { env: "T" }, identities: writePins(idDir, "agent", [TEST_IDENTITIES.agent]) },
      ],
      keyStores: [
        {
          uriPathPrefix: PREFIX,
          credentials: [{ accessKeyId: CREDS.a.accessKeyId, secretAccessKey: { env: "SA" } }],
          keys: ["foo", LONGEST_KEY],
        },
      ],
    },
    join(idDir, "in-memory.json"),
    { T: "0123456789abcdef", SA: CREDS.a.secretAccessKey },
  );
  const logs = new LogCapture();
  let server: ReturnType<ReturnType<typeof buildApp>["listen"]>;
  let url = "";
  before(async () => {
    const app = buildApp({ config, log: createLogger({ level: "debug" }, logs), agents: stub });
    await new Promise<void>((r) => {
      server = app.listen(0, "127.0.0.1", () => r());
    });
    const a = server.address() as { port: number };
    url = `http://127.0.0.1:${a.port}`;
  });
  after(() => new Promise<void>((r) => server.close(() => r())));

  const encBody = (extra: Record<string, unknown> = {}) => ({
    requestMetadata: md("Encrypt"),
    plaintext: Buffer.from("hello").toString("base64"),
    encryptionAlgorithm: "AES_GCM",
    ...extra,
  });

  it("maps wire → proto (metadata, keyStore, key id, bytes) and proto → wire", async () => {
    calls.length = 0;
    answer = () => ({
      ciphertext: Buffer.from("12345"),
      iv: Buffer.alloc(12, 1),
      tag: Buffer.alloc(16, 2),
      ciphertextMetadata: Buffer.alloc(0),
      integrityValue: Buffer.alloc(0),
    });
    const body = encBody({ additionalAuthenticatedData: Buffer.from("aad").toString("base64") });
    const r = await signedPost(url, `${PREFIX}/kms/xks/v1/keys/foo/encrypt`, body, CREDS.a);
    assert.equal(r.status, 200, r.text);
    assert.deepEqual(r.json, {
      ciphertext: "MTIzNDU=",
      initializationVector: "AQEBAQEBAQEBAQEB",
      authenticationTag: "AgICAgICAgICAgICAgICAg==",
    });
    assert.equal(calls.length, 1);
    const req = calls[0].req as EncryptRequest;
    assert.equal(calls[0].method, "Encrypt");
    assert.equal(req.keyId, "foo");
    assert.equal(req.plaintext.toString(), "hello");
    assert.equal(req.aad.toString(), "aad");
    assert.equal(req.wantIntegrityValue, false);
    assert.deepEqual(req.metadata, { ...body.requestMetadata, awsSourceVpc: "", awsSourceVpce: "", keyStore: PREFIX });
  });

  it("returns ciphertextMetadata only when present and the integrity value only when asked", async () => {
    answer = () => ({
      ciphertext: Buffer.from("12345"),
      iv: Buffer.alloc(12),
      tag: Buffer.alloc(16),
      ciphertextMetadata: Buffer.from("v1"),
      integrityValue: Buffer.alloc(32, 7),
    });
    const r = await signedPost(
      url,
      `${PREFIX}/kms/xks/v1/keys/foo/encrypt`,
      encBody({ ciphertextDataIntegrityValueAlgorithm: "SHA_256" }),
      CREDS.a,
    );
    assert.equal(r.status, 200);
    assert.equal(r.json.ciphertextMetadata, "djE=");
    assert.equal(r.json.ciphertextDataIntegrityValue, Buffer.alloc(32, 7).toString("base64"));
    assert.equal((calls.at(-1)!.req as EncryptRequest).wantIntegrityValue, true);
    const r2 = await signedPost(url, `${PREFIX}/kms/xks/v1/keys/foo/encrypt`, encBody(), CREDS.a);
    assert.equal(r2.json.ciphertextDataIntegrityValue, undefined);
  });

  it("a malformed agent answer is a 500, never passed on to KMS", async () => {
    answer = () => ({
      ciphertext: Buffer.from("1234"),
      iv: Buffer.alloc(12),
      tag: Buffer.alloc(16),
      ciphertextMetadata: Buffer.alloc(0),
      integrityValue: Buffer.alloc(0),
    });
    const r = await signedPost(url, `${PREFIX}/kms/xks/v1/keys/foo/encrypt`, encBody(), CREDS.a);
    assert.equal(r.status, 500);
    assert.equal(r.json.errorName, "InternalException");
    answer = () => ({ keySpec: "AES_256", keyUsage: Array(11).fill("ENCRYPT"), keyStatus: "ENABLED" });
    const m = await signedPost(url, `${PREFIX}/kms/xks/v1/keys/foo/metadata`, { requestMetadata: md("CreateKey") }, CREDS.a);
    assert.equal(m.status, 500);
  });

  it("never reaches the agent when auth, routing, validation or the allow-list fail", async () => {
    calls.length = 0;
    const wrong = { accessKeyId: CREDS.a.accessKeyId, secretAccessKey: CREDS.b.secretAccessKey };
    const cases = [
      await signedPost(url, `${PREFIX}/kms/xks/v1/keys/foo/encrypt`, encBody(), wrong),
      await signedPost(url, `/nope/kms/xks/v1/keys/foo/encrypt`, encBody(), CREDS.a),
      await signedPost(url, `${PREFIX}/kms/xks/v1/keys/foo/encrypt`, encBody({ plaintext: "not base64!" }), CREDS.a),
      await signedPost(url, `${PREFIX}/kms/xks/v1/keys/bar/encrypt`, encBody(), CREDS.a),
      await send(url, {
        method: "POST",
        path: `${PREFIX}/kms/xks/v1/keys/foo/encrypt`,
        headers: { "content-type": "application/json" },
        body: JSON.stringify(encBody()),
      }),
    ];
    assert.deepEqual(
      cases.map((c) => c.status),
      [401, 404, 400, 404, 401],
    );
    assert.deepEqual(
      cases.map((c) => c.json.errorName),
      [
        "AuthenticationFailedException",
        "InvalidUriPathException",
        "ValidationException",
        "KeyNotFoundException",
        "AuthenticationFailedException",
      ],
    );
    assert.equal(calls.length, 0);
  });

  it("the proxy's request handler (XKS POSTs without express) answers and logs every request as the express app does", async () => {
    // The same pipeline behind buildRequestHandler, which takes POSTs to a configured key store's
    // XKS path past express, and behind the express app alone. Arrival is taken when a request is
    // seen (the client shares this event loop), so neither budget depends on the loop's load.
    const arrival = () => performance.now();
    const fastLogs = new LogCapture();
    const handler = buildRequestHandler({ config, log: createLogger({ level: "debug" }, fastLogs), agents: stub, arrival });
    const expressLogs = new LogCapture();
    const app = buildApp({ config, log: createLogger({ level: "debug" }, expressLogs), agents: stub, arrival });
    const servers: Server[] = [createServer(handler), createServer(app)];
    for (const srv of servers) await new Promise<void>((r) => srv.listen(0, "127.0.0.1", () => r()));
    const [fastUrl, expressUrl] = servers.map((srv) => `http://127.0.0.1:${(srv.address() as { port: number }).port}`);
    try {
      answer = (method) =>
        method === "GetKeyMetadata"
          ? { keySpec: "AES_256", keyUsage: ["ENCRYPT", "DECRYPT"], keyStatus: "ENABLED" }
          : { ciphertext: Buffer.from("hello"), iv: Buffer.alloc(12, 1), tag: Buffer.alloc(16, 2) };
      const wrong = { accessKeyId: CREDS.a.accessKeyId, secretAccessKey: CREDS.b.secretAccessKey };
      const key = `${PREFIX}/kms/xks/v1/keys/foo`;
      // Bodies made once, so both servers see the same kmsRequestIds.
      const enc = encBody();
      const badPlaintext = encBody({ plaintext: "not base64!" });
      const meta = { requestMetadata: md("DescribeKey") };
      const requests: Array<(base: string) => Promise<{ status: number; text: string; headers: Record<string, unknown> }>> = [
        (b) => signedPost(b, `${key}/encrypt`, enc, CREDS.a),
        (b) => signedPost(b, `${key}/metadata`, meta, CREDS.a),
        (b) =>
          signedPost(
            b,
            `${PREFIX}/kms/xks/v1/health`,
            { requestMetadata: { kmsRequestId: "r-1", kmsOperation: "CreateCustomKeyStore" } },
            CREDS.a,
          ),
        (b) => signedPost(b, `${key}/encrypt`, enc, wrong),
        (b) => signedPost(b, `${key}/encrypt`, badPlaintext, CREDS.a),
        (b) => signedPost(b, `${key}/encrypt`, "{not json", CREDS.a),
        (b) => signedPost(b, `${PREFIX}/kms/xks/v1/keys/bar/encrypt`, enc, CREDS.a),
        (b) => signedPost(b, `${PREFIX}/kms/xks/v1/keys/${LONGEST_KEY}x/decrypt`, enc, CREDS.a),
        (b) => signedPost(b, `${key}/encrypt?a=1`, enc, CREDS.a),
        (b) => signedPost(b, `/nope/kms/xks/v1/keys/foo/encrypt`, enc, CREDS.a),
        (b) => signedPost(b, `${key}/encrypt`, enc, CREDS.a, { method: "PUT" }),
        (b) => send(b, { method: "POST", path: `${key}/encrypt`, headers: { "content-type": "application/json" }, body: "{}" }),
        (b) => send(b, { method: "GET", path: "/ping" }),
      ];
      const comparable = (r: { status: number; text: string; headers: Record<string, unknown> }) => ({
        status: r.status,
        text: r.text,
        contentType: r.headers["content-type"],
        allow: r.headers.allow,
        connection: r.headers.connection,
      });
      const withoutTiming = (line: Record<string, any>) => {
        const { latencyMs: _l, time: _t, pid: _p, ...rest } = line;
        return rest;
      };
      for (const [i, request] of requests.entries()) {
        const before = expressLogs.requests().length;
        const fastBefore = fastLogs.requests().length;
        const viaExpress = await request(expressUrl);
        const viaHandler = await request(fastUrl);
        assert.deepEqual(comparable(viaHandler), comparable(viaExpress), `request ${i}`);
        // The completion line is written when the response closes: wait for both.
        await until(() => expressLogs.requests().length > before && fastLogs.requests().length > fastBefore, "both completion lines");
        assert.deepEqual(
          withoutTiming(fastLogs.requests().at(-1)!),
          withoutTiming(expressLogs.requests().at(-1)!),
          `request ${i}'s log line`,
        );
      }
    } finally {
      for (const srv of servers) await new Promise<void>((r) => srv.close(() => r()));
      handler.refusals.close();
    }
  });

  it("a key id longer than 128 characters is a ValidationException, never cut to an allow-listed one", async () => {
    calls.length = 0;
    answer = () => ({ ciphertext: Buffer.alloc(5), iv: Buffer.alloc(12), tag: Buffer.alloc(16) });
    const ok = await signedPost(url, `${PREFIX}/kms/xks/v1/keys/${LONGEST_KEY}/encrypt`, encBody(), CREDS.a);
    assert.equal(ok.status, 200, ok.text);
    assert.equal(calls.length, 1);
    assert.equal(calls[0].req.keyId, LONGEST_KEY);
    calls.length = 0;
    // 152 characters whose first 128 are an allow-listed key id.
    const long = `${LONGEST_KEY}${"x".repeat(24)}`;
    const r = await signedPost(url, `${PREFIX}/kms/xks/v1/keys/${long}/encrypt`, encBody(), CREDS.a);
    assert.equal(r.status, 400);
    assert.equal(r.json.errorName, "ValidationException");
    assert.equal(calls.length, 0);
    const line = logs.requests().at(-1)!;
    assert.equal(line.key, `${LONGEST_KEY}…[152 chars]`);
    assert.match(line.detail, /key id is 152 characters, more than 128/);
  });

  it("health answers from the snapshot without calling the agent", async () => {
    calls.length = 0;
    const r = await signedPost(
      url,
      `${PREFIX}/kms/xks/v1/health`,
      { requestMetadata: { kmsRequestId: "1", kmsOperation: "KmsHealthCheck" } },
      CREDS.a,
    );
    assert.equal(r.status, 200);
    assert.deepEqual(r.json.ekmFleetDetails, [{ id: "stub-1", model: "unknown", healthStatus: "UNAVAILABLE" }]);
    assert.equal(calls.length, 0);
  });

  it("unexpected exceptions become a bare InternalException (no stack, no message)", async () => {
    answer = () => {
      throw new Error("internal detail /etc/secret at line 42");
    };
    const r = await signedPost(url, `${PREFIX}/kms/xks/v1/keys/foo/metadata`, { requestMetadata: md("CreateKey") }, CREDS.a);
    assert.equal(r.status, 500);
    assert.equal(r.text, JSON.stringify(new XksError("InternalException").toJSON()));
    const line = logs.requests().at(-1)!;
    assert.equal(line.errorName, "InternalException");
    assert.equal(line.level, "error");
  });
});

it("requestMetadata values longer than the spec's 2048-character ARNs are refused (never logged or audited)", async () => {
  const { parseRequestMetadata } = await import("../../proxy/validate.ts");
  const { MAX_METADATA_CHARS } = await import("../../shared/xks-spec.ts");
  const ok = { requestMetadata: { awsPrincipalArn: "a".repeat(MAX_METADATA_CHARS), kmsOperation: "CreateKey", kmsRequestId: "r" } };
  assert.equal(parseRequestMetadata(ok, "GetKeyMetadata").awsPrincipalArn.length, 2048);
  for (const f of ["awsPrincipalArn", "kmsRequestId", "kmsOperation", "kmsViaService"]) {
    const bad = { requestMetadata: { ...ok.requestMetadata, [f]: "x".repeat(MAX_METADATA_CHARS + 1) } };
    assert.throws(
      () => parseRequestMetadata(bad, "GetKeyMetadata"),
      (e: { errorName?: string }) => e.errorName === "ValidationException",
      f,
    );
  }
});
