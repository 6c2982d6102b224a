/**
 * Key check values on the real SoftHSM, and `xks-agent token backup | restore
 * | verify` through the real CLI (bin/xks-agent.js, dist/): an encrypted
 * archive of the token folder, refused with a wrong passphrase or any altered
 * byte before anything is written, never restored over or beside an existing
 * token, and a restored token that decrypts what the original encrypted.
 * Needs `npm run build` first.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createCipheriv, createDecipheriv, createHmac, randomBytes } from "node:crypto";
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import pkcs11js from "pkcs11js";
import { KCV_BLOCK, keyCheckValue } from "../../agent/hsm/key-check.ts";
import { decrypt } from "../../agent/ops/decrypt.ts";
import { encrypt } from "../../agent/ops/encrypt.ts";
import { ARCHIVE_HEADER_BYTES } from "../../agent/token-backup.ts";
import { PACKAGE_ROOT } from "../../shared/paths.ts";
import { writeAgentConfig } from "../../testbed/configs.ts";
import {
  createKeySet,
  createSoftHsmToken,
  DIRECT_USE,
  directOpContext,
  importAesKey,
  onToken,
  type SoftHsmToken,
  TEST_KEYS,
} from "../../testbed/hsm.ts";

const BIN_AGENT = join(PACKAGE_ROOT, "bin/xks-agent.js");
const PASSPHRASE = "correct horse battery staple 7";

interface Run {
  code: number | null;
  out: string;
}

/** The real agent CLI in a child process, SoftHSM pointed at `conf`; `stdin` is written and closed. */
function agentCli(args: string[], conf: string, stdin = ""): Promise<Run> {
  return new Promise((resolve) => {
    const p = spawn(process.execPath, [BIN_AGENT, ...args], {
      env: { ...process.env, SOFTHSM2_CONF: conf },
      stdio: ["pipe", "pipe", "pipe"],
    });
    let out = "";
    p.stdout.on("data", (c: Buffer) => (out += c.toString()));
    p.stderr.on("data", (c: Buffer) => (out += c.toString()));
    p.on("close", (code) => resolve({ code, out }));
    p.stdin.end(stdin);
  });
}

describe("key check values on SoftHSM", () => {
  let token: SoftHsmToken;
  before(() => {
    token = createSoftHsmToken();
  });
  after(() => rmSync(token.dir, { recursive: true, force: true }));

  it("are AES-ECB (encrypt, or decrypt for a decrypt-only key) or HMAC-SHA256 of the documented block, 3 bytes", () => {
    const value = randomBytes(32);
    // Node's AES-256-ECB without padding, one block each way.
    const ecb = (v: Buffer, block: Buffer, dir: "enc" | "dec") => {
      const c = dir === "enc" ? createCipheriv("aes-256-ecb", v, null) : createDecipheriv("aes-256-ecb", v, null);
      c.setAutoPadding(false);
      return Buffer.concat([c.update(block), c.final()])
        .subarray(0, 3)
        .toString("hex");
    };
    onToken(token, (hsm) => {
      importAesKey(hsm, "known", value);
      hsm.run("import", (p11, s) => {
        if (!(p11 instanceof pkcs11js.PKCS11)) throw new Error("needs pkcs11js");
        const common = [
          { type: pkcs11js.CKA_CLASS, value: pkcs11js.CKO_SECRET_KEY },
          { type: pkcs11js.CKA_TOKEN, value: true },
          { type: pkcs11js.CKA_PRIVATE, value: true },
          { type: pkcs11js.CKA_SENSITIVE, value: true },
          { type: pkcs11js.CKA_EXTRACTABLE, value: false },
          { type: pkcs11js.CKA_VALUE, value },
        ];
        p11.C_CreateObject(s, [
          ...common,
          { type: pkcs11js.CKA_KEY_TYPE, value: pkcs11js.CKK_AES },
          { type: pkcs11js.CKA_LABEL, value: "known-dec" },
          { type: pkcs11js.CKA_ENCRYPT, value: false },
          { type: pkcs11js.CKA_DECRYPT, value: true },
        ]);
        p11.C_CreateObject(s, [
          ...common,
          { type: pkcs11js.CKA_KEY_TYPE, value: pkcs11js.CKK_GENERIC_SECRET },
          { type: pkcs11js.CKA_LABEL, value: "known-hmac" },
          { type: pkcs11js.CKA_SIGN, value: true },
        ]);
      });
      hsm.forgetKeys();
      assert.equal(keyCheckValue(hsm, "known"), `aes-ecb:${ecb(value, KCV_BLOCK, "enc")}`);
      assert.equal(keyCheckValue(hsm, "known-dec"), `aes-ecb-dec:${ecb(value, KCV_BLOCK, "dec")}`);
      assert.equal(
        keyCheckValue(hsm, "known-hmac"),
        `hmac-sha256:${createHmac("sha256", value).update(KCV_BLOCK).digest().subarray(0, 3).toString("hex")}`,
      );
      // Never the classic zero-block KCV (AES_K(0) is GCM's hash key H).
      assert.notEqual(keyCheckValue(hsm, "known"), `aes-ecb:${ecb(value, Buffer.alloc(16), "enc")}`);
    });
  });
});

describe("xks-agent token backup / restore / verify", () => {
  let dir: string;
  let token: SoftHsmToken;
  let config: string;
  let archive: string;
  let passFile: string;
  const outputs: string[] = [];
  const made: Array<{ key: string; pt: Buffer; aad: Buffer; ct: Buffer; iv: Buffer; tag: Buffer; cm: Buffer }> = [];
  const cli = async (args: string[], conf = token.conf, stdin = "") => {
    const r = await agentCli(args, conf, stdin);
    outputs.push(r.out);
    return r;
  };
  const secretFile = (name: string, value: string) => {
    const p = join(dir, name);
    writeFileSync(p, `${value}\n`, { mode: 0o600 });
    return p;
  };

  before(() => {
    dir = mkdtempSync(join(tmpdir(), "xks-token-backup-"));
    token = createSoftHsmToken({ dir: join(dir, "hsm"), tokenLabel: "xks-owner" });
    createKeySet(token, TEST_KEYS);
    mkdirSync(join(dir, "agent"));
    config = writeAgentConfig(join(dir, "agent"), { token, proxyToken: randomBytes(24).toString("base64url") });
    archive = join(dir, "token.xksbackup");
    passFile = secretFile("passphrase", PASSPHRASE);
    // Ciphertexts the original token makes, with the agent's own Encrypt.
    onToken(token, (hsm) => {
      const ctx = directOpContext(hsm, { serve: [TEST_KEYS.default, TEST_KEYS.encryptOnly] });
      for (const key of [TEST_KEYS.default, TEST_KEYS.default, TEST_KEYS.encryptOnly]) {
        const pt = randomBytes(100);
        const aad = randomBytes(10);
        const e = encrypt(ctx, { metadata: null, keyId: key, plaintext: pt, aad, wantIntegrityValue: false }, DIRECT_USE);
        made.push({ key, pt, aad, ct: e.ciphertext, iv: e.iv, tag: e.tag, cm: e.ciphertextMetadata });
      }
    });
  });
  after(() => rmSync(dir, { recursive: true, force: true }));

  it("backup writes an encrypted archive (0600, exclusive) and says the token is the only copy", async () => {
    const short = await cli([
      "token",
      "backup",
      "--config",
      config,
      "--out",
      join(dir, "x"),
      "--passphrase-file",
      secretFile("short", "too short"),
    ]);
    assert.equal(short.code, 1);
    assert.match(short.out, /at least 12 characters/);
    assert.equal(existsSync(join(dir, "x")), false);

    const r = await cli(["token", "backup", "--config", config, "--out", archive, "--passphrase-file", passFile]);
    assert.equal(r.code, 0, r.out);
    assert.equal(statSync(archive).mode & 0o777, 0o600);
    assert.match(r.out, /backed up token xks-owner/);
    assert.match(r.out, /The token is the only copy of its keys/);
    assert.match(r.out, /archive, its passphrase and the token's user PIN in three separate places/);
    assert.match(r.out, new RegExp(`key ${TEST_KEYS.default}: check value aes-ecb:[0-9a-f]{6}`));
    const bytes = readFileSync(archive);
    assert.equal(bytes.subarray(0, 16).toString(), "XKS-TOKEN-BACKUP");
    // Nothing of the token in the clear: its label is in the token file, not in the archive.
    assert.equal(bytes.includes(Buffer.from("xks-owner".padEnd(32, " "))), false);

    const again = await cli(["token", "backup", "--config", config, "--out", archive, "--passphrase-file", passFile]);
    assert.equal(again.code, 1);
    assert.match(again.out, /exists already; a backup never overwrites/);
    assert.deepEqual(readFileSync(archive), bytes);
  });

  it("verify: the original token matches its backup", async () => {
    const r = await cli(["token", "verify", "--config", config, "--in", archive, "--passphrase-file", passFile]);
    assert.equal(r.code, 0, r.out);
    assert.match(r.out, /the token matches the backup/);
    assert.match(r.out, new RegExp(`✓ key ${TEST_KEYS.default}: decrypts the ciphertext the original token made`));
  });

  it("restore refuses a wrong passphrase and any altered byte, before writing anything", async () => {
    const to = join(dir, "restored-never");
    const wrong = await cli([
      "token",
      "restore",
      "--config",
      config,
      "--in",
      archive,
      "--to",
      to,
      "--passphrase-file",
      secretFile("wrong", "not the passphrase at all"),
    ]);
    assert.equal(wrong.code, 1);
    assert.match(wrong.out, /wrong passphrase, or the archive was altered or damaged/);
    const good = readFileSync(archive);
    const variants: Array<[string, Buffer]> = [
      ["a body byte", flip(good, ARCHIVE_HEADER_BYTES + 5)],
      ["the salt", flip(good, 24)],
      ["the IV", flip(good, ARCHIVE_HEADER_BYTES - 3)],
      ["the tag", flip(good, good.length - 1)],
      ["cut short", good.subarray(0, good.length - 100)],
    ];
    for (const [what, bytes] of variants) {
      const f = join(dir, "tampered");
      writeFileSync(f, bytes);
      const r = await cli(["token", "restore", "--config", config, "--in", f, "--to", to, "--passphrase-file", passFile]);
      assert.equal(r.code, 1, what);
      assert.match(r.out, /the archive cannot be opened/, what);
      rmSync(f);
    }
    const scrypt = flip(good, 17); // the scrypt cost in the header: out of range, or authenticated as the AAD
    writeFileSync(join(dir, "tampered"), scrypt);
    const r = await cli(["token", "restore", "--config", config, "--in", join(dir, "tampered"), "--to", to, "--passphrase-file", passFile]);
    assert.equal(r.code, 1);
    assert.match(r.out, /scrypt parameters out of range|the archive cannot be opened/);
    assert.equal(existsSync(to), false, "nothing written");
  });

  it("restore never overwrites a token nor puts a second one with the same label beside it", async () => {
    const tokens = join(token.dir, "tokens");
    const before = readdirSync(tokens);
    const r = await cli(["token", "restore", "--config", config, "--in", archive, "--to", tokens, "--passphrase-file", passFile]);
    assert.equal(r.code, 1);
    assert.match(r.out, /exists already; restore never overwrites a token/);
    // Another folder that holds a token with the same label (made separately).
    const other = createSoftHsmToken({ dir: join(dir, "other"), tokenLabel: "xks-owner" });
    const r2 = await cli([
      "token",
      "restore",
      "--config",
      config,
      "--in",
      archive,
      "--to",
      join(other.dir, "tokens"),
      "--passphrase-file",
      passFile,
    ]);
    assert.equal(r2.code, 1);
    assert.match(r2.out, /already holds a token labelled xks-owner/);
    assert.deepEqual(readdirSync(tokens), before);
    // And a token that is not the backed-up one does not pass verify.
    createKeySet(other, TEST_KEYS);
    const v = await cli([
      "token",
      "verify",
      "--config",
      config,
      "--in",
      archive,
      "--token-dir",
      join(other.dir, "tokens"),
      "--passphrase-file",
      passFile,
    ]);
    assert.equal(v.code, 1, v.out);
    assert.match(v.out, /is not the backed-up token/);
    assert.match(
      v.out,
      new RegExp(`✗ key ${TEST_KEYS.default}: check value aes-ecb:[0-9a-f]{6}, backed up aes-ecb:[0-9a-f]{6}: a different key`),
    );
    assert.match(v.out, /the token does NOT match the backup/);
  });

  it("restore (passphrase on stdin) verifies the restored token, which decrypts what the original encrypted", async () => {
    const to = join(dir, "new-mac", "tokens");
    const r = await cli(["token", "restore", "--config", config, "--in", archive, "--to", to], token.conf, `${PASSPHRASE}\n`);
    assert.equal(r.code, 0, r.out);
    assert.match(r.out, /restored token xks-owner/);
    assert.match(r.out, /verified: the restored token holds the same keys/);
    assert.doesNotMatch(r.out, /✗/);
    const folder = readdirSync(to);
    assert.equal(folder.length, 1);
    for (const f of readdirSync(join(to, folder[0]))) assert.equal(statSync(join(to, folder[0], f)).mode & 0o077, 0, `${f} private`);

    // The restored token alone (its own softhsm2.conf), with the agent's own Decrypt.
    const conf = join(dir, "new-mac", "softhsm2.conf");
    writeFileSync(conf, `directories.tokendir = ${to}\nobjectstore.backend = file\nlog.level = ERROR\n`);
    onToken(
      token,
      (hsm) => {
        const ctx = directOpContext(hsm, { serve: [TEST_KEYS.default, TEST_KEYS.encryptOnly] });
        for (const m of made.filter((x) => x.key === TEST_KEYS.default)) {
          const d = decrypt(
            ctx,
            { metadata: null, keyId: m.key, ciphertext: m.ct, iv: m.iv, tag: m.tag, aad: m.aad, ciphertextMetadata: m.cm },
            DIRECT_USE,
          );
          assert.deepEqual(d.plaintext, m.pt);
        }
      },
      conf,
    );
    // The encrypt-only key cannot decrypt anywhere; its check value shows it is the same key.
    const v = await cli(["token", "verify", "--config", config, "--in", archive, "--token-dir", to, "--passphrase-file", passFile]);
    assert.equal(v.code, 0, v.out);
    assert.match(v.out, new RegExp(`✓ key ${TEST_KEYS.encryptOnly}: check value aes-ecb:[0-9a-f]{6} as backed up`));
    const again = await cli(["token", "restore", "--config", config, "--in", archive, "--to", to, "--passphrase-file", passFile]);
    assert.equal(again.code, 1, "a second restore onto the restored token is refused");
  });

  it("no passphrase and no PIN in any output", () => {
    const all = outputs.join("\n");
    assert.ok(outputs.length >= 10);
    for (const [what, secret] of [
      ["passphrase", PASSPHRASE],
      ["wrong passphrase", "not the passphrase at all"],
      ["PIN", token.pin],
      ["SO PIN", token.soPin],
    ])
      assert.ok(!all.includes(secret), `${what} printed`);
  });
});

function flip(b: Buffer, at: number): Buffer {
  const c = Buffer.from(b);
  c[at] ^= 0x01;
  return c;
}
