/** Unit tests of the agent's pure modules: the layouts, the CK_RV table, config validation. */
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { status } from "@grpc/grpc-js";
import { CKR, classifyCkr } from "../../agent/hsm/ckr.ts";
import { hsmAad, integrityValue } from "../../agent/xks-crypto.ts";
import { parseAgentConfig } from "../../agent/config.ts";
import { ConfigError } from "../../shared/config.ts";
import { REASONS, XKS_ERRORS } from "../../shared/errors.ts";

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

test("CK_RV classification: caller errors keep the session, device errors re-initialize", () => {
  const cases: Array<[number, boolean, string, string]> = [
    [0x05, true, "caller-or-session", "INVALID_CIPHERTEXT"], // SoftHSM 2.6 GCM tag failure
    [0x05, false, "session", "INTERNAL"],
    [0x40, true, "caller", "INVALID_CIPHERTEXT"], // SoftHSM 2.7
    [0x41, true, "caller", "INVALID_CIPHERTEXT"],
    [0x06, true, "caller-or-session", "INVALID_CIPHERTEXT"], // nShield
    [0x68, false, "caller", "INVALID_KEY_USAGE"],
    [0xb3, false, "session", "INTERNAL"],
    [0x82, false, "session", "INTERNAL"],
    [0x30, false, "device", "HSM_UNAVAILABLE"],
    [0x32, false, "device", "HSM_UNAVAILABLE"],
    [0xe0, false, "device", "HSM_UNAVAILABLE"],
    [0x12345, false, "session", "INTERNAL"], // unknown
  ];
  for (const [code, inDecrypt, scope, reason] of cases) {
    const r = classifyCkr(code, inDecrypt);
    assert.equal(r.effectiveReason, reason, `0x${code.toString(16)}`);
    if (scope !== "caller-or-session") assert.equal(r.scope, scope, `0x${code.toString(16)}`);
  }
  for (const rule of Object.values(CKR)) assert.ok(rule.reason in REASONS, rule.name);
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
  writeFileSync(join(dir, "pin"), "s3cret-pin-value");
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
  for (const field of ["pkcs11.tokenLabel", "pkcs11.pin", "proxyToken", "ciphertextMetadata", "tunnels[0].privateKey", "tunnels[0].hostKeyFingerprint", "typo"]) {
    assert.ok(err.problems.some((p) => p.startsWith(field)), `missing problem for ${field}: ${text}`);
  }
  assert.ok(!text.includes("inline-pin-9911"), "the config error echoes a secret");

  const ok = parseAgentConfig(
    { pkcs11: { module: "/x.so", tokenLabel: "t", pin: { file: "pin" } }, proxyToken: { env: "TOK" }, socket: "run/a.sock" },
    file,
    { TOK: "0123456789abcdef-token" },
  );
  assert.equal(ok.pkcs11.pin, "s3cret-pin-value");
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
