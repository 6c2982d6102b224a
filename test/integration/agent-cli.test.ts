/** The real `xks-agent` CLI (bin/xks-agent.js → dist/) against a real SoftHSM token. */
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { writeAgentConfig } from "../../testbed/configs.ts";
import { createSoftHsmToken, type SoftHsmToken } from "../../testbed/hsm.ts";

const run = promisify(execFile);
const BIN = new URL("../../bin/xks-agent.js", import.meta.url).pathname;
let dir: string;
let hsm: SoftHsmToken;
let config: string;

async function cli(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const { stdout, stderr } = await run(process.execPath, [BIN, ...args], { env: { ...process.env, ...hsm.env } });
    return { code: 0, stdout, stderr };
  } catch (e) {
    const err = e as { code: number; stdout: string; stderr: string };
    return { code: err.code, stdout: err.stdout, stderr: err.stderr };
  }
}

before(() => {
  dir = mkdtempSync(join(tmpdir(), "xks-cli-"));
  hsm = createSoftHsmToken({ dir: join(dir, "hsm") });
  config = writeAgentConfig(dir, { token: hsm, proxyToken: "cli-test-token-0123456789" });
});
after(() => rmSync(dir, { recursive: true, force: true }));

test("keys create makes AES-256 keys with the usage asked for; keys list shows them", async () => {
  assert.equal((await cli("keys", "create", "--config", config, "--label", "both")).code, 0);
  const r = await cli("keys", "create", "--config", config, "--label", "enc", "--usage", "encrypt");
  assert.equal(r.code, 0, r.stderr);
  assert.deepEqual(JSON.parse(r.stdout), { label: "enc", type: "AES", bits: 256, usage: ["encrypt"] });
  assert.equal((await cli("keys", "create", "--config", config, "--label", "dec", "--usage", "decrypt")).code, 0);
  assert.equal((await cli("keys", "create", "--config", config, "--label", "none", "--usage", "none")).code, 0);
  const list = await cli("keys", "list", "--config", config);
  assert.equal(list.code, 0, list.stderr);
  const keys = list.stdout
    .trim()
    .split("\n")
    .map((l) => JSON.parse(l));
  const byLabel = Object.fromEntries(keys.map((k) => [k.label, k]));
  assert.deepEqual(byLabel.both, { label: "both", type: "AES", bits: 256, usage: ["encrypt", "decrypt"] });
  assert.deepEqual(byLabel.enc.usage, ["encrypt"]);
  assert.deepEqual(byLabel.dec.usage, ["decrypt"]);
  assert.deepEqual(byLabel.none.usage, []);
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
  assert.ok(!r.stderr.includes("1234-inline"));
});

test("pause / resume and key disable write the owner's state file", async () => {
  assert.equal((await cli("pause", "--config", config)).code, 0);
  const state = () => JSON.parse(readFileSync(join(dir, "state/controls.json"), "utf8"));
  assert.equal(state().paused, true);
  assert.equal((await cli("keys", "disable", "--config", config, "--label", "both")).code, 0);
  assert.deepEqual(state().disabledKeys, ["both"]);
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
