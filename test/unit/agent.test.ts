/** Unit tests of the agent's pure modules: the layouts, the CK_RV table, config validation. */
import { test } from "node:test";
import assert from "node:assert/strict";
import { chmodSync, chownSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { status } from "@grpc/grpc-js";
import { CKR, classifyCkr, type FailureScope, refusesPin } from "../../agent/hsm/ckr.ts";
import { hsmAad, integrityValue } from "../../agent/xks-crypto.ts";
import { parseAgentConfig } from "../../agent/config.ts";
import type { KeyInfo } from "../../agent/hsm/hsm.ts";
import { allowListMap, servingRefusals } from "../../agent/policy.ts";
import { ConfigError, secretFileProblem } from "../../shared/config.ts";
import { minimalAgentConfig } from "../../testbed/configs.ts";
import { TEST_IDENTITIES, writeIdentity, writePins } from "../../testbed/identities.ts";
import { REASONS, XKS_ERRORS, type Reason } from "../../shared/errors.ts";

test("hsmAAD = u16be(len AAD) || AAD || u8(len CM) || CM", () => {
  assert.deepEqual(hsmAad(Buffer.from("ab"), Buffer.from("xyz")), Buffer.from([0, 2, 0x61, 0x62, 3, 0x78, 0x79, 0x7a]));
  assert.deepEqual(hsmAad(Buffer.alloc(0), Buffer.alloc(0)), Buffer.from([0, 0, 0]));
  const big = Buffer.alloc(8192, 7);
  const out = hsmAad(big, Buffer.alloc(0));
  assert.equal(out.readUInt16BE(0), 8192);
  assert.equal(out.length, 2 + 8192 + 1);
  assert.throws(() => hsmAad(Buffer.alloc(0), Buffer.alloc(21)), /ciphertext metadata/);
  assert.throws(() => hsmAad(Buffer.alloc(65536), Buffer.alloc(0)), /AAD/);
});

test("integrity value matches the spec's worked example", () => {
  // XKS Proxy API spec §Encrypt example: AAD, CM, IV, CT, TAG → CDIV.
  const b = (s: string) => Buffer.from(s, "base64");
  const v = integrityValue(
    b("cHJvamVjdD1uaWxlLGRlcGFydG1lbnQ9bWFya2V0aW5n"),
    b("a2V5X3ZlcnNpb249MQ=="),
    b("HMrlRw85cAJUd5Ax"),
    b("ghxkK1txeDNn3q8Y"),
    b("vBxN2ncH1oEkR8WVXpmyYQ=="),
  );
  assert.equal(v.toString("base64"), "qHA/ImC9h5HsLRXqCyPmWgYx7tzyoTplzILbP0fPXsc=");
});

test("CK_RV classification: one table gives the name, scope and reason for (code, inDecrypt)", () => {
  // [code, inDecrypt, name, scope, reason]: every row of CKR, outside and inside a decrypt, and an unknown code.
  const table: Array<[number, boolean, string, FailureScope, Reason]> = [
    [0x05, false, "CKR_GENERAL_ERROR", "session", "INTERNAL"],
    [0x05, true, "CKR_GENERAL_ERROR", "caller", "INVALID_CIPHERTEXT"], // SoftHSM 2.6 GCM tag mismatch
    [0x06, false, "CKR_FUNCTION_FAILED", "session", "INTERNAL"],
    [0x06, true, "CKR_FUNCTION_FAILED", "caller", "INVALID_CIPHERTEXT"], // nShield GCM tag mismatch
    [0x07, false, "CKR_ARGUMENTS_BAD", "caller", "VALIDATION"],
    [0x07, true, "CKR_ARGUMENTS_BAD", "caller", "INVALID_CIPHERTEXT"],
    [0x20, false, "CKR_DATA_INVALID", "caller", "VALIDATION"],
    [0x20, true, "CKR_DATA_INVALID", "caller", "INVALID_CIPHERTEXT"],
    [0x21, false, "CKR_DATA_LEN_RANGE", "caller", "VALIDATION"],
    [0x21, true, "CKR_DATA_LEN_RANGE", "caller", "INVALID_CIPHERTEXT"],
    [0x30, false, "CKR_DEVICE_ERROR", "device", "HSM_UNAVAILABLE"],
    [0x30, true, "CKR_DEVICE_ERROR", "device", "HSM_UNAVAILABLE"],
    [0x31, false, "CKR_DEVICE_MEMORY", "device", "HSM_UNAVAILABLE"],
    [0x31, true, "CKR_DEVICE_MEMORY", "device", "HSM_UNAVAILABLE"],
    [0x32, false, "CKR_DEVICE_REMOVED", "device", "HSM_UNAVAILABLE"],
    [0x32, true, "CKR_DEVICE_REMOVED", "device", "HSM_UNAVAILABLE"],
    [0x40, false, "CKR_ENCRYPTED_DATA_INVALID", "caller", "INVALID_CIPHERTEXT"],
    [0x40, true, "CKR_ENCRYPTED_DATA_INVALID", "caller", "INVALID_CIPHERTEXT"], // SoftHSM 2.7 GCM tag mismatch
    [0x41, false, "CKR_ENCRYPTED_DATA_LEN_RANGE", "caller", "INVALID_CIPHERTEXT"],
    [0x41, true, "CKR_ENCRYPTED_DATA_LEN_RANGE", "caller", "INVALID_CIPHERTEXT"],
    [0x60, false, "CKR_KEY_HANDLE_INVALID", "session", "INTERNAL"],
    [0x60, true, "CKR_KEY_HANDLE_INVALID", "session", "INTERNAL"],
    [0x63, false, "CKR_KEY_TYPE_INCONSISTENT", "caller", "INVALID_KEY_USAGE"],
    [0x63, true, "CKR_KEY_TYPE_INCONSISTENT", "caller", "INVALID_KEY_USAGE"],
    [0x68, false, "CKR_KEY_FUNCTION_NOT_PERMITTED", "caller", "INVALID_KEY_USAGE"],
    [0x68, true, "CKR_KEY_FUNCTION_NOT_PERMITTED", "caller", "INVALID_KEY_USAGE"],
    [0x70, false, "CKR_MECHANISM_INVALID", "caller", "INVALID_KEY_USAGE"],
    [0x70, true, "CKR_MECHANISM_INVALID", "caller", "INVALID_KEY_USAGE"],
    [0x71, false, "CKR_MECHANISM_PARAM_INVALID", "caller", "VALIDATION"],
    [0x71, true, "CKR_MECHANISM_PARAM_INVALID", "caller", "INVALID_CIPHERTEXT"],
    [0x82, false, "CKR_OBJECT_HANDLE_INVALID", "session", "INTERNAL"],
    [0x82, true, "CKR_OBJECT_HANDLE_INVALID", "session", "INTERNAL"],
    [0x90, false, "CKR_OPERATION_ACTIVE", "session", "INTERNAL"],
    [0x90, true, "CKR_OPERATION_ACTIVE", "session", "INTERNAL"],
    [0xa0, false, "CKR_PIN_INCORRECT", "device", "HSM_UNAVAILABLE"],
    [0xa0, true, "CKR_PIN_INCORRECT", "device", "HSM_UNAVAILABLE"],
    [0xa1, false, "CKR_PIN_INVALID", "device", "HSM_UNAVAILABLE"],
    [0xa1, true, "CKR_PIN_INVALID", "device", "HSM_UNAVAILABLE"],
    [0xa2, false, "CKR_PIN_LEN_RANGE", "device", "HSM_UNAVAILABLE"],
    [0xa2, true, "CKR_PIN_LEN_RANGE", "device", "HSM_UNAVAILABLE"],
    [0xa3, false, "CKR_PIN_EXPIRED", "device", "HSM_UNAVAILABLE"],
    [0xa3, true, "CKR_PIN_EXPIRED", "device", "HSM_UNAVAILABLE"],
    [0xa4, false, "CKR_PIN_LOCKED", "device", "HSM_UNAVAILABLE"],
    [0xa4, true, "CKR_PIN_LOCKED", "device", "HSM_UNAVAILABLE"],
    [0xb0, false, "CKR_SESSION_CLOSED", "session", "INTERNAL"],
    [0xb0, true, "CKR_SESSION_CLOSED", "session", "INTERNAL"],
    [0xb3, false, "CKR_SESSION_HANDLE_INVALID", "session", "INTERNAL"],
    [0xb3, true, "CKR_SESSION_HANDLE_INVALID", "session", "INTERNAL"],
    [0xe0, false, "CKR_TOKEN_NOT_PRESENT", "device", "HSM_UNAVAILABLE"],
    [0xe0, true, "CKR_TOKEN_NOT_PRESENT", "device", "HSM_UNAVAILABLE"],
    [0xe1, false, "CKR_TOKEN_NOT_RECOGNIZED", "device", "HSM_UNAVAILABLE"],
    [0xe1, true, "CKR_TOKEN_NOT_RECOGNIZED", "device", "HSM_UNAVAILABLE"],
    [0x101, false, "CKR_USER_NOT_LOGGED_IN", "session", "HSM_UNAVAILABLE"],
    [0x101, true, "CKR_USER_NOT_LOGGED_IN", "session", "HSM_UNAVAILABLE"],
    [0x150, false, "CKR_BUFFER_TOO_SMALL", "session", "INTERNAL"],
    [0x150, true, "CKR_BUFFER_TOO_SMALL", "session", "INTERNAL"],
    [0x190, false, "CKR_CRYPTOKI_NOT_INITIALIZED", "device", "HSM_UNAVAILABLE"],
    [0x190, true, "CKR_CRYPTOKI_NOT_INITIALIZED", "device", "HSM_UNAVAILABLE"],
    [0x12345, false, "CKR_0x12345", "session", "INTERNAL"], // unknown
    [0x12345, true, "CKR_0x12345", "session", "INTERNAL"],
  ];
  for (const [code, inDecrypt, name, scope, reason] of table) {
    assert.deepEqual(classifyCkr(code, inDecrypt), { name, scope, reason }, `0x${code.toString(16)} inDecrypt=${inDecrypt}`);
  }
  assert.deepEqual(classifyCkr(0x05), classifyCkr(0x05, false), "inDecrypt defaults to false");
  // The PIN refusals, after which no login is tried until the PIN changes: exactly these five.
  assert.deepEqual(
    Object.keys(CKR)
      .map(Number)
      .filter(refusesPin)
      .map((c) => CKR[c].name),
    ["CKR_PIN_INCORRECT", "CKR_PIN_INVALID", "CKR_PIN_LEN_RANGE", "CKR_PIN_EXPIRED", "CKR_PIN_LOCKED"],
  );
  // The test's table covers every row of CKR, both ways.
  const covered = new Set(table.map(([code, inDecrypt]) => `${code}/${inDecrypt}`));
  for (const code of Object.keys(CKR).map(Number)) {
    assert.ok(covered.has(`${code}/false`) && covered.has(`${code}/true`), `0x${code.toString(16)} missing from the test's table`);
  }
  for (const rule of Object.values(CKR)) {
    assert.ok(rule.reason in REASONS, rule.name);
    if (rule.inDecrypt) assert.ok(rule.inDecrypt.reason in REASONS, rule.name);
  }
});

test("every agent reason maps to a gRPC status and an XKS error with its HTTP status", () => {
  for (const [reason, { grpc, xks }] of Object.entries(REASONS)) {
    assert.ok(Object.values(status).includes(grpc), reason);
    assert.ok(xks in XKS_ERRORS, reason);
  }
  assert.equal(XKS_ERRORS[REASONS.KEY_NOT_FOUND.xks].status, 404);
  assert.equal(XKS_ERRORS[REASONS.INVALID_CIPHERTEXT.xks].status, 400);
  assert.equal(XKS_ERRORS[REASONS.HSM_UNAVAILABLE.xks].status, 503);
  for (const { message } of Object.values(XKS_ERRORS)) assert.match(message, /^[\x20-\x7e]{1,511}$/);
});

test("agent config: every problem reported at once, with file and field, never the secret", () => {
  const dir = mkdtempSync(join(tmpdir(), "xks-cfg-"));
  writeFileSync(join(dir, "pin"), "s3cret-pin-value", { mode: 0o600 });
  const file = join(dir, "agent.json");
  const raw = {
    pkcs11: { module: "/x.so", tokenLabel: "", pin: "inline-pin-9911" },
    proxyToken: { env: "NOT_SET_ANYWHERE_XKS" },
    socket: "run/a.sock",
    ciphertextMetadata: "this is far more than twenty bytes",
    tunnels: [{ host: "h", username: "u", privateKey: { file: "missing-key" }, hostKeyFingerprint: "MD5:aa" }],
    typo: 1,
  };
  const err = (() => {
    try {
      parseAgentConfig(raw, file, {});
    } catch (e) {
      return e;
    }
  })();
  assert.ok(err instanceof ConfigError);
  const text = err.message;
  assert.match(text, new RegExp(file.replace(/[/.]/g, "\\$&")));
  for (const field of [
    "pkcs11.tokenLabel",
    "pkcs11.pin",
    "proxyToken",
    "ciphertextMetadata",
    "tunnels[0].privateKey",
    "tunnels[0].hostKeyFingerprint",
    "identity",
    "proxyIdentities",
    "keyStores",
    "typo",
  ]) {
    assert.ok(
      err.problems.some((p) => p.startsWith(field)),
      `missing problem for ${field}: ${text}`,
    );
  }
  assert.ok(!text.includes("inline-pin-9911"), "the config error echoes a secret");

  const ok = parseAgentConfig(
    {
      pkcs11: { module: "/x.so", tokenLabel: "t", pin: { file: "pin" } },
      proxyToken: { env: "TOK" },
      socket: "run/a.sock",
      identity: writeIdentity(dir, "agent-identity", TEST_IDENTITIES.agent),
      proxyIdentities: writePins(dir, "proxy", [TEST_IDENTITIES.proxy]),
      keyStores: [{ keyStore: "/example/prefix", keys: ["k1"] }],
    },
    file,
    { TOK: "0123456789abcdef-token" },
  );
  assert.equal(ok.pkcs11.pin, "s3cret-pin-value");
  assert.equal(ok.identity.fingerprint, TEST_IDENTITIES.agent.fingerprint);
  assert.deepEqual(
    ok.proxyIdentities.map((p) => p.fingerprint),
    [TEST_IDENTITIES.proxy.fingerprint],
  );
  assert.equal(ok.socket, join(dir, "run/a.sock"));
  assert.ok(Object.isFrozen(ok) && Object.isFrozen(ok.pkcs11));
});

test("IVs are 12 fresh random bytes, distinct across pool refills", async () => {
  const { freshIv } = await import("../../agent/xks-crypto.ts");
  const seen = new Set<string>();
  for (let i = 0; i < 3000; i++) {
    const iv = freshIv();
    assert.equal(iv.length, 12);
    seen.add(iv.toString("hex"));
  }
  assert.equal(seen.size, 3000, "no IV repeats (3000 draws span ~9 pool refills)");
  assert.ok(!seen.has("000000000000000000000000"));
});

test("agent config: keyStores is required; each store and key is checked; the health key is never listed", () => {
  const dir = mkdtempSync(join(tmpdir(), "xks-cfg-"));
  const file = join(dir, "agent.json");
  const { keyStores: _, ...base } = minimalAgentConfig(dir, { proxyToken: { env: "TOK" } });
  const problems = (extra: Record<string, unknown>): string[] => {
    try {
      parseAgentConfig({ ...base, ...extra }, file, { TOK: "0123456789abcdef-token" });
      return [];
    } catch (e) {
      assert.ok(e instanceof ConfigError);
      assert.ok(e.message.includes(file));
      return e.problems;
    }
  };
  assert.deepEqual(problems({}), ["keyStores: must be an array"]);
  assert.deepEqual(problems({ keyStores: [] }), ["keyStores: must have at least 1 entries"]);
  assert.deepEqual(
    problems({
      keyStores: [
        { keyStore: "/example/prefix", keys: ["k1", "k1", "xks-health", "bad/label", "k".repeat(129)] },
        { keyStore: "/example/prefix", keys: ["k2"] },
        { keyStore: "short", keys: [] },
        { keys: ["k3"], typo: true },
      ],
    }),
    [
      'keyStores[0].keys[1]: duplicate key "k1"',
      "keyStores[0].keys[2]: is the health key (healthKey); the health key is never served to KMS",
      "keyStores[0].keys[3]: must be a key label (externalKeyId): 1-128 characters of [a-zA-Z0-9-_.]",
      "keyStores[0].keys[4]: must be a key label (externalKeyId): 1-128 characters of [a-zA-Z0-9-_.]",
      'keyStores[1].keyStore: duplicate key store "/example/prefix"',
      'keyStores[2].keyStore: must be "" or 9-117 characters of [a-zA-Z0-9/_-] starting with "/" (the key store\'s uriPathPrefix in the proxy\'s config)',
      "keyStores[2].keys: must have at least 1 entries",
      "keyStores[3].typo: unknown field",
      "keyStores[3].keyStore: is required",
    ],
  );
  const ok = parseAgentConfig(
    {
      ...base,
      keyStores: [
        { keyStore: "", keys: ["a"] },
        { keyStore: "/tenant-two/xks", keys: ["a", "b"] },
      ],
    },
    file,
    { TOK: "0123456789abcdef-token" },
  );
  assert.deepEqual(ok.keyStores, [
    { keyStore: "", keys: ["a"] },
    { keyStore: "/tenant-two/xks", keys: ["a", "b"] },
  ]);
});

test("serving: the health key is refused for KMS even when an allow-list names it; each rule gives its reason", () => {
  const good: KeyInfo = {
    label: "k",
    handle: Buffer.alloc(8),
    keyType: 0x1f, // CKK_AES
    valueLen: 32,
    usage: { encrypt: true, decrypt: true, sign: false, verify: false, wrap: false, unwrap: false, derive: false },
    sensitive: true,
    extractable: false,
  };
  // A policy built by hand (the config refuses to list the health key).
  const policy = { healthKey: "hk", keyStores: allowListMap([{ keyStore: "/store/one", keys: ["k", "hk"] }]) };
  const reasons = (label: string, use: Parameters<typeof servingRefusals>[2], key?: KeyInfo) =>
    servingRefusals(policy, label, use, key).map((r) => `${r.reason}: ${r.why}`);
  assert.deepEqual(reasons("k", { keyStore: "/store/one" }, good), []);
  assert.deepEqual(reasons("hk", { keyStore: "/store/one" }, { ...good, label: "hk" }), [
    "KEY_NOT_FOUND: key hk is the health key, never served for KMS operations",
  ]);
  assert.deepEqual(reasons("hk", "any-key-store"), ["KEY_NOT_FOUND: key hk is the health key, never served for KMS operations"]);
  assert.deepEqual(reasons("hk", "health-check", { ...good, label: "hk" }), []);
  assert.deepEqual(reasons("k", "health-check"), ["KEY_NOT_FOUND: key k is not the health key"]);
  assert.deepEqual(reasons("k", { keyStore: "/store/two" }), ['KEY_NOT_FOUND: key store "/store/two" is not in the agent\'s keyStores']);
  assert.deepEqual(reasons("k", { keyStore: "" }), ['KEY_NOT_FOUND: key store "" is not in the agent\'s keyStores']);
  assert.deepEqual(reasons("other", { keyStore: "/store/one" }), [
    'KEY_NOT_FOUND: key other is not allow-listed for key store "/store/one"',
  ]);
  assert.deepEqual(reasons("other", "any-key-store"), ["KEY_NOT_FOUND: key other is not allow-listed for any key store"]);
  assert.deepEqual(reasons("k", { keyStore: "/store/one" }, { ...good, valueLen: 16, sensitive: false, extractable: true }), [
    "INVALID_KEY_USAGE: key k is AES-128, XKS needs AES-256",
    "INVALID_STATE: key k is not sensitive (CKA_SENSITIVE is false)",
    "INVALID_STATE: key k is extractable (CKA_EXTRACTABLE is true)",
  ]);
  assert.deepEqual(reasons("k", { keyStore: "/store/one" }, { ...good, keyType: 0x15 }), [
    "INVALID_KEY_USAGE: key k is not an AES key (CKA_KEY_TYPE 0x15)",
  ]);
});

test("secret files must be private: group/other access or another owner is refused, naming the file and the fix", () => {
  const dir = mkdtempSync(join(tmpdir(), "xks-secret-perm-"));
  const file = join(dir, "agent.json");
  const write = (name: string, value: string, mode: number) => {
    writeFileSync(join(dir, name), value, { mode });
    chmodSync(join(dir, name), mode); // the umask does not narrow it
  };
  write("pin", "perm-pin-value-1", 0o600);
  write("token-640", "perm-token-value-0123456789", 0o640);
  write("token-604", "perm-token-value-0123456789", 0o604);
  const raw = (token: string) => ({
    pkcs11: { module: "/x.so", tokenLabel: "t", pin: { file: "pin" } },
    proxyToken: { file: token },
    socket: "run/a.sock",
    identity: writeIdentity(dir, "agent-identity", TEST_IDENTITIES.agent),
    proxyIdentities: writePins(dir, "proxy", [TEST_IDENTITIES.proxy]),
    keyStores: [{ keyStore: "/example/prefix", keys: ["k1"] }],
  });
  for (const [name, mode] of [
    ["token-640", "0640"],
    ["token-604", "0604"],
  ]) {
    const err = (() => {
      try {
        parseAgentConfig(raw(name), file, {});
      } catch (e) {
        return e;
      }
    })();
    assert.ok(err instanceof ConfigError, `${name} accepted`);
    const path = join(dir, name);
    assert.deepEqual(err.problems, [
      `proxyToken: the secret file ${path} has mode ${mode}, so other users may read it: run chmod 600 ${path}`,
    ]);
    assert.ok(!err.message.includes("perm-token-value"), "the secret is not echoed");
  }
  chmodSync(join(dir, "token-640"), 0o400);
  assert.equal(parseAgentConfig(raw("token-640"), file, {}).proxyToken, "perm-token-value-0123456789", "0400 is private");
  assert.equal(secretFileProblem(join(dir, "pin")), undefined);

  // Owned by someone else (needs root to arrange; CI runs the suite as root for sshd).
  if (process.getuid?.() === 0) {
    chownSync(join(dir, "pin"), 65534, 65534);
    const p = secretFileProblem(join(dir, "pin")) ?? "";
    assert.match(p, /is owned by uid 65534, not by the user running this \(uid 0\)/);
    assert.ok(p.includes(join(dir, "pin")));
  }
  rmSync(dir, { recursive: true, force: true });
});
