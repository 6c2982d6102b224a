/**
 * `xks-agent init` (bin/ → dist/) against real SoftHSM: a token of its own made through PKCS#11,
 * or the test-bed's token; the config it writes passes `check` (everything but what needs the EC2
 * side, which init reports as expected); no secret is printed; the secrets are 0600; nothing
 * that exists is overwritten.
 */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { createHash } from "node:crypto";
import { copyFileSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { PACKAGE_ROOT } from "../../shared/paths.ts";
import { secretFile } from "../../testbed/configs.ts";
import { createSoftHsmToken } from "../../testbed/hsm.ts";
import { TEST_IDENTITIES } from "../../testbed/identities.ts";
import { findLeaks } from "../../testbed/logs.ts";
import { freePort } from "../../testbed/ports.ts";
import { GENEROUS_MS } from "../../testbed/wait.ts";

let dir: string;
before(() => {
  dir = mkdtempSync(join(tmpdir(), "xks-init-"));
});
after(() => rmSync(dir, { recursive: true, force: true }));

function agent(args: string[], env: Record<string, string>): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(
      process.execPath,
      [join(PACKAGE_ROOT, "bin/xks-agent.js"), ...args],
      { env: { ...process.env, ...env }, timeout: GENEROUS_MS },
      (err, stdout, stderr) => resolve({ code: err ? ((err as { code?: number }).code ?? -1) : 0, stdout, stderr }),
    );
  });
}

const read = (p: string) => readFileSync(p, "utf8").trim();
const mode = (p: string) => statSync(p).mode & 0o777;

test("init --softhsm-init: token, PINs, keys, identity, SSH key, config; check passes but for the EC2 host, reported as expected", async () => {
  const d = join(dir, "fresh");
  const config = join(d, "agent.json");
  const proxyCrt = join(dir, "proxy.crt");
  writeFileSync(proxyCrt, TEST_IDENTITIES.proxy.certificate);
  const closed = await freePort(); // nothing listens there: the EC2 host "does not exist yet"
  const fingerprint = `SHA256:${createHash("sha256").update("ec2 host key").digest("base64").replace(/=+$/, "")}`;
  const env = { SOFTHSM2_CONF: join(d, "softhsm2.conf") };
  const args = ["init", "--config", config, "--softhsm-init", "--key-store", "/example/prefix", "--key", "my-kms-key"];
  const more = ["--agent-id", "ownermac", "--proxy-identity", proxyCrt];
  const tunnel = ["--tunnel-host", "127.0.0.1", "--tunnel-port", String(closed), "--host-key-fingerprint", fingerprint];
  const r = await agent([...args, ...more, ...tunnel], env);
  assert.equal(r.code, 0, r.stdout + r.stderr);
  assert.match(r.stdout, /initialised SoftHSM token "xks"/);
  assert.match(r.stdout, /created key my-kms-key\ncreated key xks-health\ncreated key xks-audit\n/);
  assert.match(r.stdout, /restrict,port-forwarding,command="\/usr\/sbin\/nologin" ssh-ed25519 \S+ xks-agent@ownermac\n/);
  assert.match(r.stdout, /✗ tunnel 127\.0\.0\.1: 127\.0\.0\.1:\d+ has the pinned host key and accepts the key: .*ECONNREFUSED/);
  assert.match(r.stdout, /expected at this stage: tunnel 127\.0\.0\.1 is not reachable or not set up yet/);
  assert.match(r.stdout, /init done; the rest waits for the EC2 side/);

  const secrets = {
    PIN: read(join(d, "pin")),
    "SO PIN": read(join(d, "so-pin")),
    "agent token": read(join(d, "agent-token")),
    "identity key": read(join(d, "agent-identity.key")).split("\n")[1],
    "SSH key": read(join(d, "id_ed25519")).split("\n")[1],
  };
  assert.deepEqual(findLeaks(r.stdout + r.stderr, secrets), []);
  for (const f of ["pin", "so-pin", "agent-token", "agent-identity.key", "id_ed25519", "agent.json"])
    assert.equal(mode(join(d, f)), 0o600, f);
  assert.equal(mode(join(d, "tokens")), 0o700);
  assert.ok(secrets.PIN.length >= 16 && secrets["agent token"].length >= 16);

  // The config as written, then check on its own: every item passes but the tunnel's.
  const cfg = JSON.parse(readFileSync(config, "utf8"));
  assert.deepEqual(cfg.keyStores, [{ keyStore: "/example/prefix", keys: ["my-kms-key"] }]);
  assert.deepEqual(cfg.pkcs11.pin, { file: "pin" });
  assert.equal(cfg.tunnels[0].remoteSocket, "/run/xks/ownermac/agent.sock");
  assert.equal(cfg.tunnels[0].username, "xks-t-ownermac");
  assert.equal(cfg.dashboard, undefined, "no dashboard unless asked for");
  const check = await agent(["check", "--config", config, "--json"], env);
  assert.equal(check.code, 1, check.stderr);
  const items = JSON.parse(check.stdout).items as Array<{ item: string; result: string }>;
  const notOk = items.filter((i) => i.result !== "ok").map((i) => i.item);
  assert.deepEqual(notOk, [`tunnel 127.0.0.1: 127.0.0.1:${closed} has the pinned host key and accepts the key`]);
  assert.ok(items.some((i) => i.item === "key my-kms-key is on the token and can be served (AES-256, sensitive, not extractable)"));
  const keys = await agent(["keys", "list", "--config", config, "--json"], env);
  const byLabel = Object.fromEntries(
    keys.stdout
      .trim()
      .split("\n")
      .map((l) => [JSON.parse(l).label, JSON.parse(l)]),
  );
  assert.deepEqual(
    { served: byLabel["my-kms-key"].served, keyStores: byLabel["my-kms-key"].keyStores, bits: byLabel["my-kms-key"].bits },
    { served: true, keyStores: ["/example/prefix"], bits: 256 },
  );
  assert.equal(byLabel["xks-audit"].type, "GENERIC_SECRET");

  // Again over the same folder: refused before anything is written.
  const before = readdirSync(d).sort();
  const pinBefore = read(join(d, "pin"));
  const again = await agent([...args, ...more], env);
  assert.equal(again.code, 1);
  assert.match(again.stderr, /exist already; init writes nothing over them/);
  assert.deepEqual(readdirSync(d).sort(), before);
  assert.equal(read(join(d, "pin")), pinBefore);
});

test("init on an existing token with --pin-file, before the proxy's certificate exists; check passes once it is copied", async () => {
  const token = createSoftHsmToken({ dir: join(dir, "hsm"), tokenLabel: "owner-token" });
  const d = join(dir, "existing");
  mkdirSync(d, { mode: 0o700 });
  secretFile(d, "the-pin", token.pin);
  const config = join(d, "agent.json");
  const r = await agent(
    ["init", "--config", config, "--module", token.module, "--token-label", token.tokenLabel, "--pin-file", join(d, "the-pin")],
    token.env,
  );
  assert.equal(r.code, 0, r.stdout + r.stderr);
  assert.match(r.stdout, /next: copy the proxy's certificate .* to \S+proxy-identity\.crt/);
  assert.match(r.stdout, /expected at this stage: the proxy's certificate is not here yet/);
  assert.deepEqual(findLeaks(r.stdout + r.stderr, { PIN: token.pin, "agent token": read(join(d, "agent-token")) }), []);
  assert.deepEqual(JSON.parse(readFileSync(config, "utf8")).pkcs11.pin, { file: join(d, "the-pin") });

  const proxyCrt = join(dir, "proxy-b.crt");
  writeFileSync(proxyCrt, TEST_IDENTITIES.proxy.certificate);
  copyFileSync(proxyCrt, join(d, "proxy-identity.crt"));
  const check = await agent(["check", "--config", config], token.env);
  assert.equal(check.code, 0, check.stdout);
  assert.match(check.stdout, /all checks passed\n$/);

  // Usage errors: exit 2 and nothing written.
  const e = join(dir, "usage");
  for (const bad of [
    ["init", "--config", join(e, "a.json")],
    ["init", "--config", join(e, "a.json"), "--softhsm-init", "--pin-file", "x"],
    ["init", "--config", join(e, "a.json"), "--softhsm-init", "--tunnel-host", "h"],
    ["init", "--config", join(e, "a.json"), "--softhsm-init", "--key-store", "no-slash"],
  ]) {
    const u = await agent(bad, token.env);
    assert.equal(u.code, 2, `${bad.join(" ")}: ${u.stderr}`);
  }
  assert.throws(() => statSync(e), /ENOENT/);
});
