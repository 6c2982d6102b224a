/**
 * The agent through its real gRPC server on a real SoftHSM token.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { createCipheriv, createDecipheriv, createHash, randomBytes } from "node:crypto";
import { cpSync, readFileSync, statSync, writeFileSync } from "node:fs";
import http2 from "node:http2";
import tls from "node:tls";
import { dirname } from "node:path";
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import pkcs11js from "pkcs11js";
import { verifyAudit } from "../../agent/audit/verify.ts";
import { auditOps, auditText } from "../../testbed/audit.ts";
import { Hsm } from "../../agent/hsm/hsm.ts";
import { createKey } from "../../agent/keys.ts";
import { agentChannelCredentials } from "../../proxy/agent-client.ts";
import { createLogger } from "../../shared/logging.ts";
import { AGENT_TOKEN_METADATA_KEY, REASON_METADATA_KEY } from "../../shared/errors.ts";
import { agentClient, type AgentTestClient, type CallError } from "../../testbed/grpc-client.ts";
import { createRawAesKey, importAesKey } from "../../testbed/hsm.ts";
import { pinOf, TEST_IDENTITIES } from "../../testbed/identities.ts";
import { startTestAgent, type TestAgent } from "../../testbed/in-process.ts";
import { encodings, findLeaks } from "../../testbed/logs.ts";
import { nextEvent } from "../../testbed/wait.ts";
import { agentMetadata as sampleMetadata } from "../../testbed/xks/metadata.ts";
import { OTHER_PREFIX, PREFIX } from "../../testbed/configs.ts";
import { MAX_CONCURRENT_STREAMS, MAX_REQUEST_MESSAGE_BYTES, type OperationRecord } from "../../agent/server.ts";
import { MAX_DATA_BYTES_LIMIT, MAX_EXTERNAL_KEY_ID_CHARS, MAX_LAYOUT_AAD_BYTES, MAX_METADATA_CHARS } from "../../shared/xks-spec.ts";

let t: TestAgent;
let c: AgentTestClient;
/** Sensitive, never extractable, with a value this test knows (imported), so Node's AES-GCM can check the agent's output. */
const KNOWN = "known-value-key";
const AES128 = "aes-128-key";
const EXTRACTABLE = "extractable-key";
const NOT_SENSITIVE = "not-sensitive-key";
/** A good key on the token that no allow-list names. */
const UNLISTED = "unlisted-key";
/** A 128-character label, the longest key id; allow-listed. */
const LONGEST = "k".repeat(128);
const knownValue = randomBytes(32);

async function rejects(p: Promise<unknown>, reason: string, code?: grpc.status): Promise<CallError> {
  try {
    await p;
  } catch (e) {
    const err = e as CallError;
    assert.equal(err.reason, reason, `expected reason ${reason}, got ${JSON.stringify(err)}`);
    if (code !== undefined) assert.equal(err.code, code);
    return err;
  }
  assert.fail(`expected ${reason}, but the call succeeded`);
}

const enc = (keyId: string, plaintext: Buffer, extra: Record<string, unknown> = {}) =>
  c.call("Encrypt", { metadata: sampleMetadata("Encrypt"), keyId, plaintext, ...extra });
const dec = (keyId: string, fields: Record<string, unknown>) =>
  c.call("Decrypt", { metadata: sampleMetadata("Decrypt"), keyId, ...fields });

before(async () => {
  // Allow-listed for PREFIX besides the test key set: the odd keys below, so that what refuses them is their attributes.
  t = await startTestAgent({ serve: [KNOWN, AES128, EXTRACTABLE, NOT_SENSITIVE, LONGEST] });
  c = agentClient(t.target, t.token);
  // Keys made straight through PKCS#11, outside the agent's own key creation.
  const hsm = new Hsm(t.config.pkcs11, createLogger({ level: "silent" }));
  hsm.open();
  importAesKey(hsm, KNOWN, knownValue);
  createRawAesKey(hsm, AES128, { bytes: 16, extractable: false });
  createRawAesKey(hsm, EXTRACTABLE, { bytes: 32, extractable: true, sensitive: true });
  createRawAesKey(hsm, NOT_SENSITIVE, { bytes: 32, extractable: false, sensitive: false });
  createKey(hsm, UNLISTED, ["encrypt", "decrypt"]);
  createKey(hsm, LONGEST, ["encrypt", "decrypt"]);
  hsm.close();
});

after(async () => {
  c?.close();
  await t?.destroy();
});

describe("encrypt and decrypt", () => {
  for (const [name, aad] of [
    ["without AAD", Buffer.alloc(0)],
    ["with AAD", Buffer.from("project=nile,department=marketing")],
  ] as const) {
    test(`round trip ${name}`, async () => {
      const pt = randomBytes(100);
      const e = await enc(t.keys.default, pt, { aad });
      assert.equal(e.ciphertext.length, pt.length, "GCM: ciphertext as long as plaintext");
      assert.equal(e.iv.length, 12);
      assert.equal(e.tag.length, 16);
      assert.ok(e.ciphertextMetadata.length > 0 && e.ciphertextMetadata.length <= 20);
      assert.equal(e.integrityValue.length, 0, "no integrity value unless asked");
      assert.notDeepEqual(e.ciphertext, pt);
      const d = await dec(t.keys.default, {
        ciphertext: e.ciphertext,
        iv: e.iv,
        tag: e.tag,
        aad,
        ciphertextMetadata: e.ciphertextMetadata,
      });
      assert.deepEqual(d.plaintext, pt);
    });
  }

  test("decrypts a ciphertext made with no ciphertext metadata (hsmAAD with an empty CM)", async () => {
    const pt = Buffer.from("made elsewhere");
    const aad = Buffer.from("a");
    const iv = randomBytes(12);
    const cipher = createCipheriv("aes-256-gcm", knownValue, iv);
    cipher.setAAD(Buffer.concat([Buffer.from([0, 1]), aad, Buffer.from([0])]));
    const ct = Buffer.concat([cipher.update(pt), cipher.final()]);
    const d = await dec(KNOWN, { ciphertext: ct, iv, tag: cipher.getAuthTag(), aad });
    assert.deepEqual(d.plaintext, pt);
  });

  test("the output is AES-256-GCM over the spec's hsmAAD layout (checked with Node's own AES-GCM)", async () => {
    const pt = Buffer.from("Hello World!");
    const aad = Buffer.from("project=nile,department=marketing");
    const e = await enc(KNOWN, pt, { aad });
    // hsmAAD = u16be(len AAD) || AAD || u8(len CM) || CM, written out by hand here.
    const layout = Buffer.concat([Buffer.from([0, aad.length]), aad, Buffer.from([e.ciphertextMetadata.length]), e.ciphertextMetadata]);
    const d = createDecipheriv("aes-256-gcm", knownValue, e.iv);
    d.setAAD(layout);
    d.setAuthTag(e.tag);
    assert.deepEqual(Buffer.concat([d.update(e.ciphertext), d.final()]), pt);
  });

  test("fresh random IV on every call", async () => {
    const ivs = new Set<string>();
    for (let i = 0; i < 50; i++) ivs.add((await enc(t.keys.default, Buffer.from("same"))).iv.toString("hex"));
    assert.equal(ivs.size, 50);
  });

  test("integrity value = SHA-256(AAD || CM || IV || CT || TAG), recomputed independently", async () => {
    const pt = randomBytes(64);
    const aad = randomBytes(40);
    const e = await enc(t.keys.default, pt, { aad, wantIntegrityValue: true });
    const expected = createHash("sha256")
      .update(Buffer.concat([aad, e.ciphertextMetadata, e.iv, e.ciphertext, e.tag]))
      .digest();
    assert.deepEqual(e.integrityValue, expected);
    const noAad = await enc(t.keys.default, pt, { wantIntegrityValue: true });
    const expected2 = createHash("sha256")
      .update(Buffer.concat([noAad.ciphertextMetadata, noAad.iv, noAad.ciphertext, noAad.tag]))
      .digest();
    assert.deepEqual(noAad.integrityValue, expected2);
  });

  test("4300-byte plaintext with 8192-byte AAD", async () => {
    const pt = randomBytes(4300);
    const aad = randomBytes(8192);
    const e = await enc(t.keys.default, pt, { aad, wantIntegrityValue: true });
    assert.equal(e.ciphertext.length, 4300);
    const d = await dec(t.keys.default, { ciphertext: e.ciphertext, iv: e.iv, tag: e.tag, aad, ciphertextMetadata: e.ciphertextMetadata });
    assert.deepEqual(d.plaintext, pt);
  });

  test("empty plaintext and ciphertext are refused, and the session survives", async () => {
    await rejects(enc(t.keys.default, Buffer.alloc(0)), "VALIDATION");
    await rejects(dec(t.keys.default, { ciphertext: Buffer.alloc(0), iv: randomBytes(12), tag: randomBytes(16) }), "INVALID_CIPHERTEXT");
    assert.equal((await enc(t.keys.default, Buffer.from("after"))).ciphertext.length, 5);
  });

  test("every tampering is InvalidCiphertext", async () => {
    const pt = randomBytes(48);
    const aad = Buffer.from("context");
    const e = await enc(t.keys.default, pt, { aad });
    const good = { ciphertext: e.ciphertext, iv: e.iv, tag: e.tag, aad, ciphertextMetadata: e.ciphertextMetadata };
    const flip = (b: Buffer, i = 0) => {
      const x = Buffer.from(b);
      x[i] ^= 1;
      return x;
    };
    const cases: Record<string, Record<string, unknown>> = {
      "tag flipped": { ...good, tag: flip(e.tag) },
      "AAD changed": { ...good, aad: Buffer.from("Context") },
      "AAD dropped": { ...good, aad: Buffer.alloc(0) },
      "IV flipped": { ...good, iv: flip(e.iv) },
      "IV 16 bytes": { ...good, iv: Buffer.concat([e.iv, Buffer.alloc(4)]) },
      "IV 8 bytes": { ...good, iv: e.iv.subarray(0, 8) },
      "IV empty": { ...good, iv: Buffer.alloc(0) },
      "tag 15 bytes": { ...good, tag: e.tag.subarray(0, 15) },
      "ciphertext flipped": { ...good, ciphertext: flip(e.ciphertext, 10) },
      "ciphertext truncated": { ...good, ciphertext: e.ciphertext.subarray(0, 47) },
      "ciphertext extended": { ...good, ciphertext: Buffer.concat([e.ciphertext, Buffer.from([0])]) },
      "metadata changed": { ...good, ciphertextMetadata: flip(e.ciphertextMetadata) },
      "metadata dropped": { ...good, ciphertextMetadata: Buffer.alloc(0) },
      "metadata moved into AAD": { ...good, aad: Buffer.concat([aad, e.ciphertextMetadata]), ciphertextMetadata: Buffer.alloc(0) },
      "metadata over 20 bytes": { ...good, ciphertextMetadata: Buffer.alloc(21) },
    };
    for (const [name, fields] of Object.entries(cases)) {
      await rejects(dec(t.keys.default, fields), "INVALID_CIPHERTEXT", grpc.status.INVALID_ARGUMENT).catch((err) => {
        throw new Error(`${name}: ${(err as Error).message}`);
      });
    }
    // And the session survived all of that.
    assert.deepEqual((await dec(t.keys.default, good)).plaintext, pt);
  });
});

describe("key usage from the key's own attributes", () => {
  test("encrypt-only key: encrypt works, decrypt and integrity value are refused", async () => {
    const e = await enc(t.keys.encryptOnly, Buffer.from("x"));
    assert.equal(e.ciphertext.length, 1);
    await rejects(
      dec(t.keys.encryptOnly, { ciphertext: e.ciphertext, iv: e.iv, tag: e.tag, ciphertextMetadata: e.ciphertextMetadata }),
      "INVALID_KEY_USAGE",
      grpc.status.FAILED_PRECONDITION,
    );
    await rejects(enc(t.keys.encryptOnly, Buffer.from("x"), { wantIntegrityValue: true }), "INVALID_KEY_USAGE");
  });

  test("decrypt-only key: encrypt refused", async () => {
    await rejects(enc(t.keys.decryptOnly, Buffer.from("x")), "INVALID_KEY_USAGE");
  });

  test("no-usage key: encrypt and decrypt refused", async () => {
    await rejects(enc(t.keys.noUsage, Buffer.from("x")), "INVALID_KEY_USAGE");
    await rejects(dec(t.keys.noUsage, { ciphertext: Buffer.alloc(4), iv: randomBytes(12), tag: randomBytes(16) }), "INVALID_KEY_USAGE");
  });

  test("a non-256-bit AES key is refused with a clear reason, never used", async () => {
    await rejects(enc(AES128, Buffer.from("x")), "INVALID_KEY_USAGE");
    await rejects(c.call("GetKeyMetadata", { metadata: sampleMetadata("CreateKey"), keyId: AES128 }), "INVALID_KEY_USAGE");
    assert.match(t.logs.text(), /aes-128-key is AES-128, XKS needs AES-256/);
  });

  test("unknown key label is KeyNotFound", async () => {
    await rejects(enc("no-such-key", Buffer.from("x")), "KEY_NOT_FOUND", grpc.status.NOT_FOUND);
    await rejects(c.call("GetKeyMetadata", { metadata: sampleMetadata("CreateKey"), keyId: "no-such-key" }), "KEY_NOT_FOUND");
  });
});

describe("metadata", () => {
  test("AES_256 and usage from the real attributes of a SoftHSM key", async () => {
    const m = await c.call("GetKeyMetadata", { metadata: sampleMetadata("CreateKey"), keyId: t.keys.default });
    assert.deepEqual(m, { keySpec: "AES_256", keyUsage: ["ENCRYPT", "DECRYPT"], keyStatus: "ENABLED" });
    assert.deepEqual((await c.call("GetKeyMetadata", { metadata: sampleMetadata("DescribeKey"), keyId: t.keys.encryptOnly })).keyUsage, [
      "ENCRYPT",
    ]);
    assert.deepEqual((await c.call("GetKeyMetadata", { metadata: sampleMetadata("CreateKey"), keyId: t.keys.decryptOnly })).keyUsage, [
      "DECRYPT",
    ]);
    assert.deepEqual((await c.call("GetKeyMetadata", { metadata: sampleMetadata("CreateKey"), keyId: t.keys.noUsage })).keyUsage, []);
  });
});

describe("recovery", () => {
  test("a session closed under the agent is replaced, and the call still succeeds", async () => {
    // Another PKCS#11 user of the same module in this process closes every session on the slot.
    const other = new pkcs11js.PKCS11();
    other.load(t.softhsm.module);
    try {
      other.C_Initialize({ flags: pkcs11js.CKF_OS_LOCKING_OK });
    } catch {
      /* already initialized by the agent in this process */
    }
    const slot = other.C_GetSlotList(true).find((s) => other.C_GetTokenInfo(s).label.trim() === t.softhsm.tokenLabel)!;
    const opened = t.agent.hsm.stats.sessionsOpened;
    other.C_CloseAllSessions(slot);
    const pt = randomBytes(32);
    const e = await enc(t.keys.default, pt);
    const d = await dec(t.keys.default, { ciphertext: e.ciphertext, iv: e.iv, tag: e.tag, ciphertextMetadata: e.ciphertextMetadata });
    assert.deepEqual(d.plaintext, pt);
    assert.equal(t.agent.hsm.stats.sessionsOpened, opened + 1, "exactly one new session");
    assert.match(t.logs.text(), /PKCS#11 failure; recovering/);
  });
});

describe("health", () => {
  test("deep health is ACTIVE with the token's identity", async () => {
    const h = await c.call("GetHealthStatus", { kmsRequestId: "h1", kmsOperation: "KmsHealthCheck" });
    assert.equal(h.state, "ACTIVE");
    assert.equal(h.agentId, "test-agent");
    assert.equal(h.tokenLabel, t.softhsm.tokenLabel);
    assert.equal(h.tokenManufacturer, "SoftHSM project");
    assert.match(h.tokenModel, /SoftHSM/);
    assert.match(h.tokenSerial, /^[0-9a-f]+$/);
  });
});

describe("authentication", () => {
  test("a call without the proxy's credential gets nothing", async () => {
    for (const token of [null, "", "wrong-token", `${t.token}x`, t.token.slice(0, -1)]) {
      try {
        await c.call(
          "Encrypt",
          { metadata: sampleMetadata("Encrypt"), keyId: t.keys.default, plaintext: Buffer.from("secret") },
          { token },
        );
        assert.fail("unauthenticated call succeeded");
      } catch (e) {
        const err = e as CallError;
        assert.equal(err.code, grpc.status.UNAUTHENTICATED, `token ${JSON.stringify(token)}`);
        assert.equal(err.reason, undefined);
      }
    }
    await assert.rejects(c.call("GetHealthStatus", {}, { token: null }), (e: CallError) => e.code === grpc.status.UNAUTHENTICATED);
  });

  test("the socket lives in a private directory", () => {
    assert.equal(statSync(dirname(t.socketPath)).mode & 0o777, 0o700);
    assert.ok(statSync(t.socketPath).isSocket());
    assert.equal(statSync(t.socketPath).mode & 0o077, 0);
  });
});

describe("contract", () => {
  test("an agent ignores request fields it does not know (additive changes)", async () => {
    // A newer proxy's contract: the same messages with extra fields.
    const newer = readFileSync(new URL("../../proto/xks/agent/v1/agent.proto", import.meta.url), "utf8")
      .replace(
        "bool want_integrity_value = 5;",
        "bool want_integrity_value = 5;\n  string future_field = 99;\n  repeated int64 future_list = 100;",
      )
      .replace("string key_store = 8;", "string key_store = 8;\n  string source_identity = 42;");
    const file = `${t.dir}/newer.proto`;
    writeFileSync(file, newer);
    const def = protoLoader.loadSync(file, { keepCase: false, defaults: true });
    const pkg = grpc.loadPackageDefinition(def) as any;
    const client = new pkg.xks.agent.v1.XksAgent(
      `unix://${t.socketPath}`,
      agentChannelCredentials(TEST_IDENTITIES.proxy, [pinOf(TEST_IDENTITIES.agent)]),
    );
    const md = new grpc.Metadata();
    md.set(AGENT_TOKEN_METADATA_KEY, t.token);
    const res: any = await new Promise((resolve, reject) =>
      client.Encrypt(
        {
          metadata: { ...sampleMetadata("Encrypt"), sourceIdentity: "future" },
          keyId: t.keys.default,
          plaintext: Buffer.from("forward compatible"),
          futureField: "ignored",
          futureList: [1, 2, 3],
        },
        md,
        (err: Error | null, r: unknown) => (err ? reject(err) : resolve(r)),
      ),
    );
    client.close();
    assert.equal(res.ciphertext.length, "forward compatible".length);
  });

  test("failures carry the reason in trailing metadata, not in parsed messages", async () => {
    const md = await new Promise<grpc.Metadata>((resolve) => {
      const meta = new grpc.Metadata();
      meta.set(AGENT_TOKEN_METADATA_KEY, t.token);
      (c.client as any).Encrypt(
        { metadata: sampleMetadata("Encrypt"), keyId: "no-such-key", plaintext: Buffer.from("x") },
        meta,
        (err: grpc.ServiceError) => resolve(err.metadata),
      );
    });
    assert.deepEqual(md.get(REASON_METADATA_KEY), ["KEY_NOT_FOUND"]);
  });
});

describe("load", () => {
  test("128 concurrent calls in flight, all answers correct", async () => {
    const inputs = Array.from({ length: 128 }, (_, i) => ({ pt: randomBytes(16 + i), aad: randomBytes(i % 7) }));
    const encs = await Promise.all(inputs.map(({ pt, aad }) => enc(t.keys.default, pt, { aad, wantIntegrityValue: true })));
    const decs = await Promise.all(
      encs.map((e, i) =>
        dec(t.keys.default, {
          ciphertext: e.ciphertext,
          iv: e.iv,
          tag: e.tag,
          aad: inputs[i].aad,
          ciphertextMetadata: e.ciphertextMetadata,
        }),
      ),
    );
    for (const [i, d] of decs.entries()) assert.deepEqual(d.plaintext, inputs[i].pt);
  });
});

describe("owner controls", () => {
  test("pause cuts KMS off at once; resume lets it back", async () => {
    t.agent.controls.setPaused(true);
    try {
      await rejects(enc(t.keys.default, Buffer.from("x")), "INVALID_STATE");
      await rejects(c.call("GetKeyMetadata", { metadata: sampleMetadata("CreateKey"), keyId: t.keys.default }), "INVALID_STATE");
      const h = await c.call("GetHealthStatus", {});
      assert.equal(h.state, "UNAVAILABLE");
      assert.equal(h.paused, true);
    } finally {
      t.agent.controls.setPaused(false);
    }
    assert.equal((await enc(t.keys.default, Buffer.from("x"))).ciphertext.length, 1);
  });

  test("a disabled key reports DISABLED and refuses crypto", async () => {
    t.agent.controls.setKeyDisabled(t.keys.default, true);
    try {
      const m = await c.call("GetKeyMetadata", { metadata: sampleMetadata("CreateKey"), keyId: t.keys.default });
      assert.equal(m.keyStatus, "DISABLED");
      await rejects(enc(t.keys.default, Buffer.from("x")), "INVALID_STATE");
    } finally {
      t.agent.controls.setKeyDisabled(t.keys.default, false);
    }
  });

  test("a pause written by another process (the CLI) is picked up by the running agent", async () => {
    const file = t.config.stateFile;
    const paused = nextEvent<{ paused: boolean }>(t.agent.controls, "change", (s) => s.paused, "the running agent to see the pause");
    writeFileSync(file, JSON.stringify({ paused: true, disabledKeys: [] }));
    try {
      await paused;
      await rejects(enc(t.keys.default, Buffer.from("x")), "INVALID_STATE");
    } finally {
      t.agent.controls.setPaused(false);
    }
  });
});

describe("records", () => {
  test("every operation is in the hash-chained audit log, and tampering is detected", async () => {
    const dir = t.config.audit.dir;
    const mac = (data: Buffer) => t.agent.hsm.hmacSha256(t.config.audit.key, data);
    const before = await verifyAudit(dir, { mac });
    assert.ok(before.ok, JSON.stringify(before.problems));
    const e = await enc(t.keys.default, Buffer.from("audited"), {
      metadata: { ...sampleMetadata("Encrypt"), kmsRequestId: "audit-me-42" },
    });
    assert.ok(e);
    const records = auditOps(dir);
    const last = records.at(-1)!;
    assert.equal(last.kmsRequestId, "audit-me-42");
    assert.equal(last.operation, "Encrypt");
    assert.equal(last.result, "OK");
    assert.equal(last.principal, "arn:aws:iam::123456789012:user/Alice");
    assert.ok(records.some((r) => r.operation === "Decrypt") && records.some((r) => r.operation === "GetKeyMetadata"));
    assert.ok(!records.some((r) => r.operation === "GetHealthStatus"), "health checks are not key operations");
    t.agent.audit.checkpoint();
    const after = await verifyAudit(dir, { mac });
    assert.ok(after.ok && after.records > before.records && after.unsealed === 0, JSON.stringify(after));
    // Change one character of an old record in a copy: verification must fail at that line.
    const copy = `${t.dir}/audit-copy`;
    cpSync(dir, copy, { recursive: true });
    const seg = `${copy}/audit-000001.log`;
    const lines = readFileSync(seg, "utf8").trim().split("\n");
    const i = lines.findIndex((l) => l.includes('"t":"op"'));
    lines[i] = lines[i].replace('"result":"OK"', '"result":"XX"').replace('"result":"KEY_NOT_FOUND"', '"result":"OK"');
    writeFileSync(seg, `${lines.join("\n")}\n`);
    const broken = await verifyAudit(copy, { mac });
    assert.equal(broken.ok, false);
    assert.equal(broken.problems[0].line, i + 1);
    assert.match(broken.problems[0].why, /record altered/);
  });

  test("logs hold one line per operation and no plaintext, ciphertext, AAD, PIN or token", async () => {
    const marker = Buffer.from("PLAINTEXT-MARKER-7f3a9c");
    const aad = Buffer.from("AAD-MARKER-51be02");
    const e = await enc(t.keys.default, marker, { aad, metadata: { ...sampleMetadata("Encrypt"), kmsRequestId: "log-check-1" } });
    await dec(t.keys.default, { ciphertext: e.ciphertext, iv: e.iv, tag: e.tag, aad, ciphertextMetadata: e.ciphertextMetadata });
    await c.call("Encrypt", { keyId: t.keys.default, plaintext: marker }, { token: "attacker-guess" }).catch(() => {});
    const text = t.logs.text();
    const line = t.logs.json().find((l) => l.kmsRequestId === "log-check-1");
    assert.ok(line, "the operation's log line");
    assert.equal(line.op, "Encrypt");
    assert.equal(line.key, t.keys.default);
    assert.equal(line.result, "OK");
    assert.equal(typeof line.latencyMs, "number");
    assert.equal(line.principal, "arn:aws:iam::123456789012:user/Alice");
    const secrets = {
      ...encodings("plaintext", marker),
      ...encodings("AAD", aad),
      ...encodings("ciphertext", e.ciphertext),
      PIN: t.softhsm.pin,
      "proxy token": t.token,
      "presented wrong token": "attacker-guess",
    };
    assert.deepEqual(findLeaks(text, secrets), [], "the operational log");
    assert.deepEqual(findLeaks(auditText(t.config.audit.dir), secrets), [], "the audit log");
  });
});

/** How many HSM lookups and operations the agent starts while `fn` runs (its Hsm's methods, counted in place). */
async function hsmCallsDuring(fn: () => Promise<unknown>): Promise<number> {
  const hsm = t.agent.hsm as unknown as Record<string, (...args: unknown[]) => unknown>;
  const methods = ["key", "run", "runWithKey", "listKeys"];
  let calls = 0;
  // The audit log's checkpoint timer seals with the HSM in the background: not the request's doing.
  let sealing = 0;
  const seal = hsm.hmacSha256;
  hsm.hmacSha256 = function (this: unknown, ...args: unknown[]) {
    sealing++;
    try {
      return seal.apply(this, args);
    } finally {
      sealing--;
    }
  };
  for (const m of methods) {
    const original = hsm[m];
    hsm[m] = function (this: unknown, ...args: unknown[]) {
      if (sealing === 0) calls++;
      return original.apply(this, args);
    };
  }
  try {
    await fn();
  } finally {
    for (const m of [...methods, "hmacSha256"]) delete hsm[m];
  }
  return calls;
}

const onStore = (keyStore: string, kmsOperation = "Encrypt") => ({ metadata: sampleMetadata(kmsOperation, {}, keyStore) });
const someCiphertext = () => ({ ciphertext: randomBytes(8), iv: randomBytes(12), tag: randomBytes(16) });

describe("the agent serves only what its config allow-lists", () => {
  test("a key on the token that no allow-list names is KeyNotFound, refused before any HSM work", async () => {
    const calls = await hsmCallsDuring(async () => {
      await rejects(enc(UNLISTED, Buffer.from("x")), "KEY_NOT_FOUND", grpc.status.NOT_FOUND);
      await rejects(dec(UNLISTED, someCiphertext()), "KEY_NOT_FOUND");
      await rejects(c.call("GetKeyMetadata", { metadata: sampleMetadata("CreateKey"), keyId: UNLISTED }), "KEY_NOT_FOUND");
    });
    assert.equal(calls, 0, "no HSM lookup or operation for a key that is not allow-listed");
    assert.match(t.logs.text(), /key unlisted-key is not allow-listed for key store \\"\/example\/uri\/path\/prefix\\"/);
  });

  test("a key allow-listed for one key store is refused on another, on an unknown and on an empty one", async () => {
    assert.equal((await c.call("Encrypt", { ...onStore(PREFIX), keyId: KNOWN, plaintext: Buffer.from("ok") })).ciphertext.length, 2);
    const calls = await hsmCallsDuring(async () => {
      for (const keyStore of [OTHER_PREFIX, "/not/a/configured/store", ""]) {
        await rejects(c.call("Encrypt", { ...onStore(keyStore), keyId: KNOWN, plaintext: Buffer.from("x") }), "KEY_NOT_FOUND");
        await rejects(c.call("Decrypt", { ...onStore(keyStore, "Decrypt"), keyId: KNOWN, ...someCiphertext() }), "KEY_NOT_FOUND");
        await rejects(c.call("GetKeyMetadata", { ...onStore(keyStore, "DescribeKey"), keyId: KNOWN }), "KEY_NOT_FOUND");
      }
    });
    assert.equal(calls, 0);
    const text = t.logs.text();
    assert.match(text, /key known-value-key is not allow-listed for key store \\"\/tenant-two\/xks\\"/);
    assert.match(text, /key store \\"\/not\/a\/configured\/store\\" is not in the agent's keyStores/);
    assert.match(text, /key store \\"\\" is not in the agent's keyStores/);
  });

  test("the health key is never used for KMS operations, while the deep health check still uses it", async () => {
    const calls = await hsmCallsDuring(async () => {
      await rejects(enc(t.keys.health, Buffer.from("x")), "KEY_NOT_FOUND");
      await rejects(dec(t.keys.health, someCiphertext()), "KEY_NOT_FOUND");
      await rejects(c.call("GetKeyMetadata", { metadata: sampleMetadata("CreateKey"), keyId: t.keys.health }), "KEY_NOT_FOUND");
    });
    assert.equal(calls, 0);
    assert.match(t.logs.text(), /key xks-health is the health key, never served for KMS operations/);
    assert.equal((await c.call("GetHealthStatus", { kmsRequestId: "h2", kmsOperation: "KmsHealthCheck" })).state, "ACTIVE");
  });

  test("an extractable key and a key that is not sensitive are refused, the reason in the owner's log", async () => {
    for (const label of [EXTRACTABLE, NOT_SENSITIVE]) {
      await rejects(enc(label, Buffer.from("x")), "INVALID_STATE", grpc.status.FAILED_PRECONDITION);
      await rejects(dec(label, someCiphertext()), "INVALID_STATE");
      await rejects(c.call("GetKeyMetadata", { metadata: sampleMetadata("CreateKey"), keyId: label }), "INVALID_STATE");
    }
    const text = t.logs.text();
    assert.match(text, /key extractable-key is extractable \(CKA_EXTRACTABLE is true\)/);
    assert.match(text, /key not-sensitive-key is not sensitive \(CKA_SENSITIVE is false\)/);
  });
});

describe("what reaches the agent is checked as if the proxy were hostile", () => {
  const fields = [
    "awsPrincipalArn",
    "kmsKeyArn",
    "kmsOperation",
    "kmsRequestId",
    "kmsViaService",
    "awsSourceVpc",
    "awsSourceVpce",
    "keyStore",
  ] as const;

  test(`every metadata string is at most ${MAX_METADATA_CHARS} characters, and metadata must be present`, async () => {
    const longest = "a".repeat(MAX_METADATA_CHARS);
    const e = await enc(t.keys.default, Buffer.from("x"), { metadata: sampleMetadata("Encrypt", { kmsKeyArn: longest }) });
    assert.equal(e.ciphertext.length, 1, "the longest legal value is served");
    const calls = await hsmCallsDuring(async () => {
      for (const f of fields) {
        const metadata = sampleMetadata("Encrypt", { [f]: `${longest}a` });
        await rejects(enc(t.keys.default, Buffer.from("x"), { metadata }), "VALIDATION", grpc.status.INVALID_ARGUMENT);
        await rejects(c.call("GetKeyMetadata", { metadata, keyId: t.keys.default }), "VALIDATION");
      }
      await rejects(c.call("Encrypt", { keyId: t.keys.default, plaintext: Buffer.from("x") }), "VALIDATION");
      await rejects(c.call("GetHealthStatus", { kmsRequestId: `${longest}a`, kmsOperation: "KmsHealthCheck" }), "VALIDATION");
    });
    assert.equal(calls, 0);
    assert.match(t.logs.text(), /metadata\.awsSourceVpce is 2049 characters, more than 2048/);
  });

  test("key ids follow the spec's rule and are refused, never truncated", async () => {
    assert.equal((await enc(LONGEST, Buffer.from("x"))).ciphertext.length, 1, "a 128-character key id is served");
    const calls = await hsmCallsDuring(async () => {
      // Its first 128 characters name an allow-listed key.
      await rejects(enc(`${LONGEST}k`, Buffer.from("x")), "VALIDATION");
      await rejects(c.call("GetKeyMetadata", { metadata: sampleMetadata("CreateKey"), keyId: `${LONGEST}k` }), "VALIDATION");
      await rejects(enc("foo/../foo", Buffer.from("x")), "VALIDATION");
      await rejects(enc("", Buffer.from("x")), "VALIDATION");
    });
    assert.equal(calls, 0);
    assert.match(t.logs.text(), /keyId is 129 characters, more than 128/);
  });

  test("data larger than any proxy may pass on is refused", async () => {
    const calls = await hsmCallsDuring(async () => {
      await rejects(enc(t.keys.default, Buffer.alloc(MAX_DATA_BYTES_LIMIT + 1)), "VALIDATION");
      await rejects(dec(t.keys.default, { ...someCiphertext(), ciphertext: Buffer.alloc(MAX_DATA_BYTES_LIMIT + 1) }), "VALIDATION");
      await rejects(enc(t.keys.default, Buffer.from("x"), { aad: Buffer.alloc(MAX_LAYOUT_AAD_BYTES + 1) }), "VALIDATION");
    });
    assert.equal(calls, 0);
  });

  test("a message larger than the largest legal request is refused by the transport", async () => {
    const before = t.agent.hsm.stats.sessionsOpened;
    await assert.rejects(
      enc(t.keys.default, Buffer.alloc(MAX_REQUEST_MESSAGE_BYTES)),
      (e: CallError) => e.code === grpc.status.RESOURCE_EXHAUSTED,
    );
    assert.equal(t.agent.hsm.stats.sessionsOpened, before);
    assert.equal((await enc(t.keys.default, Buffer.from("after"))).ciphertext.length, 5);
  });

  test(`a connection carries at most ${MAX_CONCURRENT_STREAMS} calls at once (the HTTP/2 setting the agent announces)`, async () => {
    const session = http2.connect("https://agent", {
      createConnection: () =>
        tls.connect({
          path: t.socketPath,
          key: TEST_IDENTITIES.proxy.key,
          cert: TEST_IDENTITIES.proxy.certificate,
          ca: TEST_IDENTITIES.agent.certificate,
          checkServerIdentity: () => undefined,
          ALPNProtocols: ["h2"],
        }),
    });
    try {
      const settings = await new Promise<http2.Settings>((resolve, reject) => {
        session.once("remoteSettings", resolve);
        session.once("error", reject);
      });
      assert.equal(settings.maxConcurrentStreams, MAX_CONCURRENT_STREAMS);
    } finally {
      session.destroy();
    }
  });

  test("records of unauthenticated and invalid calls carry no attacker-sized strings", async () => {
    const records: OperationRecord[] = [];
    const onRecord = (r: OperationRecord) => records.push(r);
    t.agent.events.on("operation", onRecord);
    const huge = "A".repeat(900_000);
    const long = "B".repeat(100_000);
    try {
      // Without the token: 900 KB of kmsKeyArn and a 5,000-character key id.
      await assert.rejects(
        c.call(
          "Encrypt",
          {
            metadata: sampleMetadata("Encrypt", { kmsKeyArn: huge, kmsRequestId: "m1-unauth" }),
            keyId: "k".repeat(5000),
            plaintext: Buffer.from("x"),
          },
          { token: "not-the-token" },
        ),
        (e: CallError) => e.code === grpc.status.UNAUTHENTICATED,
      );
      // With the token, invalid: 100,000 characters in every metadata field.
      const metadata = Object.fromEntries(fields.map((f) => [f, long]));
      await rejects(c.call("Decrypt", { metadata, keyId: long, ...someCiphertext() }), "VALIDATION");
    } finally {
      t.agent.events.off("operation", onRecord);
    }
    assert.equal(records.length, 2);
    const maxChars = MAX_METADATA_CHARS + 20; // the cut is marked: …[N chars]
    for (const r of records) {
      for (const [field, value] of Object.entries(r)) {
        if (typeof value === "string") assert.ok(value.length <= maxChars, `record field ${field} is ${value.length} characters`);
      }
      assert.ok(r.keyId.length <= MAX_EXTERNAL_KEY_ID_CHARS + 20);
    }
    assert.equal(records[0].kmsKeyArn, `${"A".repeat(MAX_METADATA_CHARS)}…[900000 chars]`);
    assert.equal(records[1].principal, `${"B".repeat(MAX_METADATA_CHARS)}…[100000 chars]`);
    // The audit log's and the operational log's lines for those calls are small too.
    const auditLines = auditText(t.config.audit.dir)
      .trim()
      .split("\n")
      .filter((l) => l.includes('"t":"op"'))
      .slice(-2);
    for (const l of auditLines) assert.ok(l.length < 10 * MAX_METADATA_CHARS, `audit line of ${l.length} characters`);
    for (const l of t.logs.lines) assert.ok(l.length < 10 * MAX_METADATA_CHARS, `log line of ${l.length} characters`);
  });
});
