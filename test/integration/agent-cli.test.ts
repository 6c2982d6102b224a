/** The real `xks-agent` CLI (bin/xks-agent.js → dist/) against a real SoftHSM token (and a real sshd for `check`). */
import { test, before, after, describe } from "node:test";
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { createHash } from "node:crypto";
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import net from "node:net";
import pkcs11js from "pkcs11js";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { AuditLog } from "../../agent/audit.ts";
import { Hsm } from "../../agent/hsm/hsm.ts";
import { createLogger } from "../../shared/logging.ts";
import { OTHER_PREFIX, PREFIX, secretFile, writeAgentConfig } from "../../testbed/configs.ts";
import { createKeySet, createRawAesKey, createSoftHsmToken, kmsKeys, type SoftHsmToken, TEST_KEYS } from "../../testbed/hsm.ts";
import { TEST_IDENTITIES } from "../../testbed/identities.ts";
import { findLeaks } from "../../testbed/logs.ts";
import { startSshd, type Sshd } from "../../testbed/sshd.ts";
import { GENEROUS_MS } from "../../testbed/wait.ts";

const run = promisify(execFile);
const BIN = new URL("../../bin/xks-agent.js", import.meta.url).pathname;
let dir: string;
let hsm: SoftHsmToken;
let config: string;

async function cli(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return cliWith(hsm, ...args);
}

/** The CLI with `token`'s SoftHSM config; a run that does not end by itself is killed after GENEROUS_MS (a failure then). */
async function cliWith(token: SoftHsmToken, ...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const { stdout, stderr } = await run(process.execPath, [BIN, ...args], { env: { ...process.env, ...token.env }, timeout: GENEROUS_MS });
    return { code: 0, stdout, stderr };
  } catch (e) {
    const err = e as { code: number; stdout: string; stderr: string };
    return { code: err.code, stdout: err.stdout, stderr: err.stderr };
  }
}

before(() => {
  dir = mkdtempSync(join(tmpdir(), "xks-cli-"));
  hsm = createSoftHsmToken({ dir: join(dir, "hsm") });
  config = writeAgentConfig(dir, {
    token: hsm,
    proxyToken: "cli-test-token-0123456789",
    keyStores: [
      { keyStore: PREFIX, keys: ["both", "enc", "dec", "none", "extractable", "not-sensitive", "aes-128"] },
      { keyStore: OTHER_PREFIX, keys: ["both"] },
    ],
  });
});
after(() => rmSync(dir, { recursive: true, force: true }));

test("keys create makes AES-256 keys with the usage asked for; keys list shows them", async () => {
  assert.equal((await cli("keys", "create", "--config", config, "--label", "both")).code, 0);
  const r = await cli("keys", "create", "--config", config, "--label", "enc", "--usage", "encrypt", "--json");
  assert.equal(r.code, 0, r.stderr);
  assert.deepEqual(JSON.parse(r.stdout), {
    label: "enc",
    type: "AES",
    bits: 256,
    usage: ["encrypt"],
    sensitive: true,
    extractable: false,
    served: true,
    keyStores: [PREFIX],
    notServed: [],
  });
  assert.equal((await cli("keys", "create", "--config", config, "--label", "dec", "--usage", "decrypt")).code, 0);
  assert.equal((await cli("keys", "create", "--config", config, "--label", "none", "--usage", "none")).code, 0);
  const list = await cli("keys", "list", "--config", config, "--json");
  assert.equal(list.code, 0, list.stderr);
  const keys = list.stdout
    .trim()
    .split("\n")
    .map((l) => JSON.parse(l));
  const byLabel = Object.fromEntries(keys.map((k) => [k.label, k]));
  assert.deepEqual(byLabel.both, {
    label: "both",
    type: "AES",
    bits: 256,
    usage: ["encrypt", "decrypt"],
    sensitive: true,
    extractable: false,
    served: true,
    keyStores: [PREFIX, OTHER_PREFIX],
    notServed: [],
  });
  assert.deepEqual(byLabel.enc.usage, ["encrypt"]);
  assert.deepEqual(byLabel.dec.usage, ["decrypt"]);
  assert.deepEqual(byLabel.none.usage, []);
});

test("keys list shows for every key whether it is served, through which key stores, and if not why", async () => {
  assert.equal((await cli("keys", "create", "--config", config, "--label", "xks-health")).code, 0);
  assert.equal((await cli("keys", "create", "--config", config, "--label", "unlisted")).code, 0);
  // Keys the agent's own key creation never makes, straight through PKCS#11.
  const h = new Hsm({ module: hsm.module, tokenLabel: hsm.tokenLabel, pin: hsm.pin }, createLogger({ level: "silent" }));
  h.open();
  try {
    createRawAesKey(h, "extractable", { bytes: 32, extractable: true, sensitive: true });
    createRawAesKey(h, "not-sensitive", { bytes: 32, extractable: false, sensitive: false });
    createRawAesKey(h, "aes-128", { bytes: 16, extractable: false });
  } finally {
    h.close();
  }
  const list = await cli("keys", "list", "--config", config, "--json");
  assert.equal(list.code, 0, list.stderr);
  const byLabel = Object.fromEntries(
    list.stdout
      .trim()
      .split("\n")
      .map((l) => JSON.parse(l))
      .map((k) => [k.label, k]),
  );
  const verdict = (label: string) => {
    const k = byLabel[label];
    return { served: k.served, keyStores: k.keyStores, notServed: k.notServed };
  };
  assert.deepEqual(verdict("both"), { served: true, keyStores: [PREFIX, OTHER_PREFIX], notServed: [] });
  assert.deepEqual(verdict("xks-health"), {
    served: false,
    keyStores: [],
    notServed: ["key xks-health is the health key, never served for KMS operations"],
  });
  assert.deepEqual(verdict("unlisted"), {
    served: false,
    keyStores: [],
    notServed: ["key unlisted is not allow-listed for any key store"],
  });
  assert.deepEqual(verdict("extractable"), {
    served: false,
    keyStores: [PREFIX],
    notServed: ["key extractable is extractable (CKA_EXTRACTABLE is true)"],
  });
  assert.deepEqual(verdict("not-sensitive"), {
    served: false,
    keyStores: [PREFIX],
    notServed: ["key not-sensitive is not sensitive (CKA_SENSITIVE is false)"],
  });
  assert.deepEqual(verdict("aes-128"), { served: false, keyStores: [PREFIX], notServed: ["key aes-128 is AES-128, XKS needs AES-256"] });
  assert.equal(byLabel.extractable.extractable, true);
  assert.equal(byLabel["not-sensitive"].sensitive, false);
});

test("keys create refuses a duplicate label and a bad usage", async () => {
  const dup = await cli("keys", "create", "--config", config, "--label", "both");
  assert.notEqual(dup.code, 0);
  assert.match(dup.stderr, /already exists/);
  const bad = await cli("keys", "create", "--config", config, "--label", "x1", "--usage", "sign");
  assert.notEqual(bad.code, 0);
  assert.match(bad.stderr, /unknown usage/);
});

test("a bad config is reported with file and field, exit code 2, no secret echoed", async () => {
  const badFile = join(dir, "bad.json");
  writeFileSync(badFile, JSON.stringify({ pkcs11: { module: "/x.so", pin: "1234-inline" }, socket: 5 }));
  const r = await cli("keys", "list", "--config", badFile);
  assert.equal(r.code, 2);
  assert.ok(r.stderr.includes(badFile));
  assert.match(r.stderr, /pkcs11\.tokenLabel: is required/);
  assert.match(r.stderr, /pkcs11\.pin: must reference a secret/);
  assert.match(r.stderr, /socket: must be a string/);
  assert.match(r.stderr, /proxyToken: /);
  assert.match(r.stderr, /keyStores: must be an array/);
  assert.ok(!r.stderr.includes("1234-inline"));
});

test("pause / resume and key disable write the owner's state file", async () => {
  assert.equal((await cli("pause", "--config", config)).code, 0);
  const state = () => JSON.parse(readFileSync(join(dir, "state/controls.json"), "utf8"));
  assert.equal(state().paused, true);
  assert.equal((await cli("keys", "disable", "--config", config, "--label", "both")).code, 0);
  assert.deepEqual(state().disabledKeys, ["both"]);
  const typo = await cli("keys", "disable", "--config", config, "--label", "bothh");
  assert.equal(typo.code, 2, "a label no key store lists is refused");
  assert.match(typo.stderr, /no key store in .* lists the label "bothh".*nothing disabled \(listed: .*both/);
  assert.deepEqual(state().disabledKeys, ["both"], "the state file is unchanged");
  assert.equal((await cli("resume", "--config", config)).code, 0);
  assert.equal((await cli("keys", "enable", "--config", config, "--label", "both")).code, 0);
  assert.deepEqual(state(), { paused: false, disabledKeys: [] });
});

test("a wrong PIN is a clear error, and the PIN is not printed", async () => {
  const wrong = join(dir, "wrong.json");
  writeFileSync(join(dir, "wrong-pin"), "9999-wrong", { mode: 0o600 });
  writeFileSync(wrong, readFileSync(config, "utf8").replace('"file": "pin"', '"file": "wrong-pin"'));
  const r = await cli("keys", "list", "--config", wrong);
  assert.notEqual(r.code, 0);
  assert.match(r.stderr, /CKR_PIN_INCORRECT|cannot open the HSM/);
  assert.ok(!r.stderr.includes("9999-wrong"));
});

/** Changes the token's user PIN (C_SetPIN), as an owner would with the token's own tools. */
function setUserPin(token: SoftHsmToken, from: string, to: string): void {
  const p = new pkcs11js.PKCS11();
  p.load(token.module);
  try {
    p.C_Initialize();
  } catch (err) {
    if ((err as { code?: number }).code !== 0x191) throw err; // already initialized in this process
  }
  try {
    const slot = p.C_GetSlotList(true).find((s) => p.C_GetTokenInfo(s).label.trim() === token.tokenLabel)!;
    const session = p.C_OpenSession(slot, pkcs11js.CKF_SERIAL_SESSION | pkcs11js.CKF_RW_SESSION);
    try {
      p.C_Login(session, pkcs11js.CKU_USER, from);
      p.C_SetPIN(session, from, to);
      p.C_Logout(session);
    } finally {
      p.C_CloseSession(session);
    }
  } finally {
    p.C_Finalize();
    p.close();
  }
}

describe("errors that cannot heal", () => {
  /** A copy of the working config with `change` applied to its JSON, in a folder of its own. */
  function variant(name: string, change: (raw: any, dir: string) => void): string {
    const d = join(dir, name);
    mkdirSync(d, { recursive: true });
    const f = writeAgentConfig(d, { token: hsm, proxyToken: "cli-test-token-0123456789" });
    const raw = JSON.parse(readFileSync(f, "utf8"));
    change(raw, d);
    writeFileSync(f, JSON.stringify(raw));
    return f;
  }

  /** `run` ends by itself with exit code 1 and exactly one line on stderr. */
  async function runFails(config: string, line: RegExp): Promise<{ stdout: string; stderr: string }> {
    const r = await cli("run", "--config", config);
    assert.equal(r.code, 1, `exit code (stderr: ${r.stderr})`);
    assert.equal(r.stderr.trim().split("\n").length, 1, r.stderr);
    assert.match(r.stderr.trim(), line);
    return r;
  }

  test("run: no such PKCS#11 module → exit 1 with one line", async () => {
    const f = variant("no-module", (raw) => {
      raw.pkcs11.module = "/nonexistent/libnothing-pkcs11.so";
    });
    await runFails(f, /^xks-agent: cannot start: cannot load the PKCS#11 module \/nonexistent\/libnothing-pkcs11\.so: /);
  });

  test("run: no token with the label → exit 1, the labels present named", async () => {
    const f = variant("no-token", (raw) => {
      raw.pkcs11.tokenLabel = "no-such-token";
    });
    await runFails(f, new RegExp(`^xks-agent: cannot start: no token labelled "no-such-token" \\(tokens present: .*"${hsm.tokenLabel}"`));
  });

  test("run: the PIN refused → exit 1 after one login, the PIN never printed; a restart with the same PIN file tries none", async () => {
    const f = variant("bad-pin", (raw, d) => {
      raw.pkcs11.pin = secretFile(d, "pin-wrong", "7777-wrong-pin");
    });
    const r = await runFails(f, /^xks-agent: cannot start: PIN refused by the token \(CKR_PIN_INCORRECT\): fix the PIN/);
    assert.doesNotMatch(r.stderr, /no login was tried/);
    assert.deepEqual(findLeaks(r.stdout + r.stderr, { "wrong PIN": "7777-wrong-pin", PIN: hsm.pin }), []);
    // Started again (as launchd would) with the PIN file unchanged: refused without a login.
    const again = await runFails(f, /^xks-agent: cannot start: PIN refused by the token \(CKR_PIN_INCORRECT\)/);
    assert.match(again.stderr, /the PIN file has not changed since, so no login was tried/);
    // Another PIN in the file: tried (once) again.
    secretFile(join(dir, "bad-pin"), "pin-wrong", "7778-wrong-pin");
    const changed = await runFails(f, /^xks-agent: cannot start: PIN refused by the token \(CKR_PIN_INCORRECT\)/);
    assert.doesNotMatch(changed.stderr, /no login was tried/);
    // The token's PIN is changed to the file's instead: `check` logs in and forgets the refusal.
    const memo = join(dir, "bad-pin", "state", "pin-refused.json");
    assert.ok(existsSync(memo));
    setUserPin(hsm, hsm.pin, "7778-wrong-pin");
    try {
      const r = await cli("check", "--config", f);
      assert.match(r.stdout, /✓ login with the PIN works/);
      assert.equal(existsSync(memo), false);
    } finally {
      setUserPin(hsm, "7778-wrong-pin", hsm.pin);
    }
  });

  test("run: the dashboard's port taken → exit 1 (not a half-started daemon)", async (t) => {
    const squatter = net.createServer();
    await new Promise<void>((resolve) => squatter.listen(0, "127.0.0.1", () => resolve()));
    t.after(() => squatter.close());
    const port = (squatter.address() as net.AddressInfo).port;
    const f = variant("dashboard-taken", (raw) => {
      raw.dashboard = { port };
    });
    await runFails(f, new RegExp(`^xks-agent: cannot start: the dashboard's port 127\\.0\\.0\\.1:${port} is already in use`));
  });

  test("run: an invalid policy file → exit 1, every problem named with the file and the field", async () => {
    const f = variant("bad-policy", (raw, d) => {
      writeFileSync(join(d, "policy.json"), JSON.stringify({ default: "perhaps", rules: [{ effect: "deny", keys: ["no-such-key"] }] }));
      raw.policy = "policy.json";
    });
    await runFails(
      f,
      /^xks-agent: cannot start: the policy file \S+\/bad-policy\/policy\.json is invalid: default: must match "allow" or "deny"; rules\[0\]\.keys\[0\]: key "no-such-key" is not allow-listed/,
    );
  });

  test("a group-readable secret file is refused at config load, naming the file and the fix", async () => {
    const f = variant("open-pin", (raw, d) => {
      raw.pkcs11.pin = secretFile(d, "pin-open", hsm.pin);
      chmodSync(join(d, "pin-open"), 0o640);
    });
    const r = await cli("run", "--config", f);
    assert.equal(r.code, 2);
    const path = join(dir, "open-pin", "pin-open");
    assert.ok(
      r.stderr.includes(`pkcs11.pin: the secret file ${path} has mode 0640, so other users may read it: run chmod 600 ${path}`),
      r.stderr,
    );
    assert.deepEqual(findLeaks(r.stderr, { PIN: hsm.pin }), []);
  });
});

describe("xks-agent check", () => {
  let cdir: string;
  let token: SoftHsmToken;
  let sshd: Sshd;
  /** The sshd's authorized client key, re-encrypted under PASSPHRASE. */
  let encryptedKey: string;
  const PASSPHRASE = "check-ssh-passphrase-31";
  const check = (config: string) => cliWith(token, "check", "--config", config);

  before(async () => {
    cdir = mkdtempSync(join(tmpdir(), "xks-check-"));
    token = createSoftHsmToken({ dir: join(cdir, "hsm"), tokenLabel: "xks-check" });
    createKeySet(token, TEST_KEYS);
    sshd = await startSshd();
    const keyFile = join(cdir, "id_ed25519-encrypted");
    writeFileSync(keyFile, sshd.clientPrivateKey, { mode: 0o600 });
    await run("ssh-keygen", ["-q", "-p", "-f", keyFile, "-P", "", "-N", PASSPHRASE]);
    encryptedKey = readFileSync(keyFile, "utf8");
  });
  after(async () => {
    await sshd?.stop();
    rmSync(cdir, { recursive: true, force: true });
  });

  /** A complete agent config (one tunnel to the real sshd), with `change` applied to its JSON. */
  function config(name: string, change: (raw: any, d: string) => void = () => {}): string {
    const d = join(cdir, name);
    mkdirSync(d, { recursive: true });
    const f = writeAgentConfig(d, {
      token,
      proxyToken: "check-test-token-0123456789",
      extra: {
        tunnels: [
          {
            name: "ec2-test",
            host: "127.0.0.1",
            port: sshd.port,
            username: sshd.user,
            privateKey: secretFile(d, "id_ed25519", encryptedKey),
            privateKeyPassphrase: secretFile(d, "ssh-passphrase", PASSPHRASE),
            hostKeyFingerprint: sshd.hostKeyFingerprint,
            remoteSocket: join(sshd.dir, `${name}.sock`),
          },
        ],
      },
    });
    const raw = JSON.parse(readFileSync(f, "utf8"));
    change(raw, d);
    writeFileSync(f, JSON.stringify(raw));
    return f;
  }

  const lines = (out: string) => out.trim().split("\n");
  const item = (out: string, name: string) => lines(out).find((l) => l.slice(2).startsWith(name)) ?? `(no line for ${name})`;

  test("a good config: every item ✓, exit 0; the tunnel authenticated and made no forward", async () => {
    const r = await check(config("good"));
    assert.equal(r.code, 0, r.stdout + r.stderr);
    const expected = [
      "secret file pkcs11.pin is private",
      "secret file proxyToken is private",
      "secret file identity.key is private",
      "secret file tunnels[0].privateKey is private",
      "secret file tunnels[0].privateKeyPassphrase is private",
      "config is valid",
      "the channel identity and the pinned proxies",
      "the owner controls file is valid",
      "the PKCS#11 module loads",
      "the token is found",
      "login with the PIN works",
      "the health key is found and usable",
      "the audit key seals checkpoints (HMAC-SHA256 in the HSM)",
      ...[TEST_KEYS.health, ...kmsKeys(TEST_KEYS)].map(
        (k) => `key ${k} is on the token and can be served (AES-256, sensitive, not extractable)`,
      ),
      "tunnel ec2-test: the SSH private key parses",
      `tunnel ec2-test: 127.0.0.1:${sshd.port} has the pinned host key and accepts the key`,
    ];
    const items = lines(r.stdout).filter((l) => /^[✓✗-] /.test(l));
    assert.equal(items.length, expected.length, r.stdout);
    for (const [i, e] of expected.entries()) assert.ok(items[i].startsWith(`✓ ${e}`), `item ${i}: ${items[i]} (expected ✓ ${e})`);
    assert.equal(lines(r.stdout).at(-1), "all checks passed");
    assert.match(item(r.stdout, "tunnel ec2-test: the SSH private key parses"), /passphrase-protected, decrypted$/);
    assert.match(
      item(r.stdout, "the channel identity and the pinned proxies"),
      new RegExp(`this agent ${TEST_IDENTITIES.agent.fingerprint.replace(/[+/]/g, "\\$&")}; accepts proxies`),
    );
    assert.match(sshd.logs(), /Accepted publickey for/);
    assert.equal(existsSync(join(sshd.dir, "good.sock")), false, "no forward");
    assert.deepEqual(
      findLeaks(r.stdout + r.stderr, { PIN: token.pin, passphrase: PASSPHRASE, "SSH key": encryptedKey.split("\n")[1] }),
      [],
    );
  });

  test("a wrong PIN: ✗ login with a fix hint, the key items skipped, exit 1, the PIN not printed", async () => {
    const r = await check(
      config("wrong-pin", (raw, d) => {
        raw.pkcs11.pin = secretFile(d, "pin-wrong", "5555-wrong");
      }),
    );
    assert.equal(r.code, 1);
    assert.match(item(r.stdout, "login with the PIN works"), /^✗ login with the PIN works: PIN refused by the token \(CKR_PIN_INCORRECT\)/);
    assert.match(r.stdout, /\n {4}fix: fix the PIN that pkcs11\.pin refers to/);
    assert.match(item(r.stdout, "the token is found"), /^✓/);
    assert.match(item(r.stdout, "the health key is found and usable"), /^- .*\(skipped\)$/);
    assert.match(item(r.stdout, "tunnel ec2-test: 127.0.0.1"), /^✓/, "the tunnels are checked all the same");
    assert.match(lines(r.stdout).at(-1)!, /^1 check\(s\) failed$/);
    assert.deepEqual(findLeaks(r.stdout + r.stderr, { "wrong PIN": "5555-wrong", PIN: token.pin }), []);
  });

  test("a missing module: ✗ module loads, token and login skipped", async () => {
    const r = await check(
      config("no-module", (raw) => {
        raw.pkcs11.module = "/nonexistent/libnothing-pkcs11.so";
      }),
    );
    assert.equal(r.code, 1);
    assert.match(item(r.stdout, "the PKCS#11 module loads"), /^✗ the PKCS#11 module loads: cannot load the PKCS#11 module \/nonexistent/);
    assert.match(r.stdout, /fix: check pkcs11\.module/);
    for (const name of ["the token is found", "login with the PIN works", "the health key is found and usable"])
      assert.match(item(r.stdout, name), /^- /, name);
  });

  test("a wrong token label: ✗ token found, naming the labels present", async () => {
    const r = await check(
      config("wrong-label", (raw) => {
        raw.pkcs11.tokenLabel = "not-this-one";
      }),
    );
    assert.equal(r.code, 1);
    assert.match(item(r.stdout, "the PKCS#11 module loads"), /^✓/);
    assert.match(
      item(r.stdout, "the token is found"),
      /^✗ the token is found: no token labelled "not-this-one" \(tokens present: "xks-check"\)/,
    );
    assert.match(r.stdout, /fix: check pkcs11\.tokenLabel/);
  });

  test("a wrong host key fingerprint: ✗ for that tunnel, naming both fingerprints, with a fix hint", async () => {
    const wrong = `SHA256:${createHash("sha256").update("some other host").digest("base64").replace(/=+$/, "")}`;
    const r = await check(
      config("wrong-hostkey", (raw) => {
        raw.tunnels[0].hostKeyFingerprint = wrong;
      }),
    );
    assert.equal(r.code, 1);
    assert.match(item(r.stdout, "the health key is found and usable"), /^✓/);
    const l = item(r.stdout, "tunnel ec2-test: 127.0.0.1");
    assert.ok(l.startsWith("✗") && l.includes(`expected ${wrong}, seen ${sshd.hostKeyFingerprint}`), l);
    assert.match(r.stdout, /fix: if 127\.0\.0\.1 really has a new host key/);
  });

  test("a damaged owner controls file: ✗ with the fix (the agent would start paused)", async () => {
    const f = config("damaged-controls");
    mkdirSync(join(cdir, "damaged-controls", "state"), { recursive: true });
    writeFileSync(join(cdir, "damaged-controls", "state", "controls.json"), "{ oops", { mode: 0o600 });
    const r = await check(f);
    assert.equal(r.code, 1);
    assert.match(item(r.stdout, "the owner controls file is valid"), /^✗ .*controls\.json is damaged: not valid JSON/);
    assert.match(r.stdout, /fix: Check the file, then run `xks-agent resume --config .*agent\.json`/);
  });

  test("the policy file: ✓ with its rules when valid, ✗ with every problem when not", async () => {
    const withPolicy = (name: string, policy: unknown) =>
      config(name, (raw, d) => {
        writeFileSync(join(d, "policy.json"), JSON.stringify(policy));
        raw.policy = "policy.json";
      });
    const good = await check(
      withPolicy("good-policy", {
        default: "allow",
        rules: [{ name: "r1", effect: "deny", match: { awsPrincipalArn: ["*:user/blocked"] } }],
      }),
    );
    assert.match(item(good.stdout, "the policy file is valid"), /^✓ .*policy\.json: 1 rules, default allow, mode enforce$/);
    const bad = await check(withPolicy("bad-policy", { mode: "audit", rules: [{ effect: "deny", match: { kmsOperaton: ["x"] } }] }));
    assert.equal(bad.code, 1);
    assert.match(item(bad.stdout, "the policy file is valid"), /^✗ /);
    for (const p of ["- mode: must match", "- default: is required", "- rules[0].match.kmsOperaton: unknown field"])
      assert.ok(bad.stdout.includes(p), `${p} in ${bad.stdout}`);
  });

  test("an invalid config: every problem listed under ✗ config, a world-readable secret named, the rest skipped", async () => {
    const r = await check(
      config("invalid", (raw, d) => {
        chmodSync(join(d, "agent-token"), 0o644);
        raw.socket = 5;
      }),
    );
    assert.equal(r.code, 1);
    assert.match(item(r.stdout, "secret file proxyToken is private"), /^✗ .*has mode 0644/);
    assert.match(r.stdout, /fix: chmod 600 /);
    assert.match(item(r.stdout, "config is valid"), /^✗ config is valid: invalid config/);
    assert.match(r.stdout, /- socket: must be a string/);
    assert.match(item(r.stdout, "the PKCS#11 module loads"), /^- .*\(skipped\)$/);
  });
});

describe("xks-agent audit", () => {
  test("keys create --type audit, then audit verify (MACs on the HSM), tail, search, export, --against a proxy log; no PIN printed", async () => {
    const made = await cli("keys", "create", "--config", config, "--type", "audit", "--label", "xks-audit", "--json");
    assert.equal(made.code, 0, made.stderr);
    const key = JSON.parse(made.stdout);
    assert.equal(key.type, "GENERIC_SECRET");
    assert.equal(key.sensitive, true);
    assert.equal(key.extractable, false);
    assert.equal(key.served, false, "never served to KMS");
    // A log written by the agent's own writer, sealed on this token.
    const auditDir = join(dir, "state", "audit");
    process.env.SOFTHSM2_CONF = hsm.conf; // later tests in this file made tokens of their own
    const h = new Hsm({ module: hsm.module, tokenLabel: hsm.tokenLabel, pin: hsm.pin }, createLogger({ level: "silent" }));
    h.open();
    let head: { records: number; hash: string } | undefined;
    try {
      const log = new AuditLog(
        { dir: auditDir, key: "xks-audit", segmentBytes: 16 * 1024, checkpointMs: 1000, fsync: "checkpoint" },
        { seal: (d) => h.hmacSha256("xks-audit", d), log: createLogger({ level: "silent" }) },
      );
      for (let i = 1; i <= 60; i++)
        log.append({
          time: new Date(Date.UTC(2026, 0, 1, 0, 0, i)).toISOString(),
          operation: "Encrypt",
          kmsRequestId: `cli-${i}`,
          kmsOperation: "Encrypt",
          keyId: "both",
          principal: "arn:aws:iam::123456789012:user/Alice",
          kmsKeyArn: "",
          viaService: "",
          sourceVpc: "",
          sourceVpce: "",
          keyStore: PREFIX,
          result: "OK",
          latencyMs: 0.1,
        });
      log.close();
      head = log.state();
    } finally {
      h.close();
    }
    const verify = await cli("audit", "verify", "--config", config);
    assert.equal(verify.code, 0, verify.stdout + verify.stderr);
    assert.match(
      verify.stdout,
      /audit log intact: \d+ records in [2-9] segments, \d+ checkpoints \(MACs checked with the HSM\), 0 records after/,
    );
    const tail = await cli("audit", "tail", "--config", config, "-n", "3");
    const tailLines = tail.stdout.trim().split("\n");
    assert.equal(tailLines.length, 3);
    assert.equal(JSON.parse(tailLines[2]).t, "cp");
    const found = await cli("audit", "search", "--config", config, "--request-id", "cli-7");
    assert.equal(found.stdout.trim().split("\n").length, 1);
    assert.equal(JSON.parse(found.stdout).kmsRequestId, "cli-7");
    const out = join(dir, "export.jsonl");
    const exp = await cli("audit", "export", "--config", config, "--out", out);
    assert.equal(exp.code, 0, exp.stderr);
    const segments = readdirSync(auditDir)
      .filter((f) => /^audit-\d+\.log$/.test(f))
      .sort()
      .map((f) => readFileSync(join(auditDir, f), "utf8"))
      .join("");
    assert.equal(readFileSync(out, "utf8"), segments, "the exact lines, across segments");
    // The proxy saw this log at its head, and later one 40 records longer: the owner's files were rolled back.
    const proxyLog = join(dir, "proxy.log");
    const line = (records: number, hash: string) =>
      JSON.stringify({
        level: "info",
        time: Date.now(),
        msg: "agent audit head",
        agent: "a",
        agentId: "test-agent",
        auditRecords: records,
        auditHash: hash,
      });
    writeFileSync(proxyLog, `${line(head!.records, head!.hash)}\n`);
    const witnessed = await cli("audit", "verify", "--config", config, "--against", proxyLog);
    assert.equal(witnessed.code, 0, witnessed.stdout);
    assert.match(witnessed.stdout, /1 witnessed heads matched/);
    writeFileSync(proxyLog, `${line(head!.records, head!.hash)}\n${line(head!.records + 40, "a".repeat(64))}\n`);
    const rolled = await cli("audit", "verify", "--config", config, "--against", proxyLog);
    assert.equal(rolled.code, 1);
    assert.match(rolled.stdout, /rolled back: the proxy saw record \d+ \(proxy log line 2/);
    // A record edited in place.
    const first = join(auditDir, "audit-000001.log");
    writeFileSync(first, readFileSync(first, "utf8").replace('"kmsRequestId":"cli-3"', '"kmsRequestId":"cli-X"'));
    const broken = await cli("audit", "verify", "--config", config);
    assert.equal(broken.code, 1);
    assert.match(broken.stdout, /BROKEN audit-000001\.log line \d+: hash does not match the line's bytes \(record altered\)/);
    const all = [made, verify, tail, found, exp, witnessed, rolled, broken].map((r) => r.stdout + r.stderr).join("");
    assert.deepEqual(findLeaks(all, { PIN: hsm.pin }), []);
  });
});
