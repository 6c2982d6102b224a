/**
 * proxy/cli.ts main(argv) in a child process: `credentials new`, `check`, and
 * `serve` (start-up log without secrets, real port, SIGHUP credential
 * rotation, SIGTERM graceful stop with exit code 0).
 */
import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { ACCESS_KEY_ID_RE, SECRET_ACCESS_KEY_RE } from "../../proxy/config.ts";
import { CREDS, PREFIX, testKeyStores, writeProxyConfig } from "../../testbed/configs.ts";
import { type FakeAgent, startFakeAgent } from "../../testbed/fake-agent.ts";
import { GENEROUS_MS, until } from "../../testbed/wait.ts";
import { send, signedPost } from "../../testbed/xks/client.ts";

const ROOT = new URL("../..", import.meta.url).pathname;
const RUN = "import { main } from './proxy/cli.ts'; process.exitCode = await main(process.argv.slice(1));";

function cli(args: string[]): ChildProcess {
  return spawn(process.execPath, ["--import", "tsx", "--input-type=module", "-e", RUN, ...args], {
    cwd: ROOT,
    stdio: ["ignore", "pipe", "pipe"],
  });
}

function run(args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const p = cli(args);
    let stdout = "";
    let stderr = "";
    p.stdout!.on("data", (c: Buffer) => (stdout += c.toString()));
    p.stderr!.on("data", (c: Buffer) => (stderr += c.toString()));
    p.on("close", (code) => resolve({ code, stdout, stderr }));
  });
}

describe("xks-proxy CLI", () => {
  let dir: string;
  let agent: FakeAgent;
  before(async () => {
    dir = mkdtempSync(join(tmpdir(), "xks-proxy-cli-"));
    agent = await startFakeAgent({ dir });
  });
  after(async () => {
    await agent.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  it("credentials new writes a spec-valid credential (more in credentials-cli.test.ts)", async () => {
    const secret = join(dir, "minted.secret");
    const r = await run([
      "credentials",
      "new",
      "--prefix",
      PREFIX,
      "--secret-out",
      secret,
      "--endpoint",
      "https://xks.example.com",
      "--region",
      "us-east-1",
    ]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(/^AccessKeyId: (\S+)$/m.exec(r.stdout)![1], ACCESS_KEY_ID_RE);
    assert.match(readFileSync(secret, "utf8").trim(), SECRET_ACCESS_KEY_RE);
    assert.ok(r.stdout.includes(`--xks-proxy-uri-path ${PREFIX}/kms/xks/v1`));
    const bad = await run([
      "credentials",
      "new",
      ...["--secret-out", join(dir, "bad.secret"), "--endpoint", "https://xks.example.com", "--region", "us-east-1"],
      ...["--prefix", "no-slash"],
    ]);
    assert.equal(bad.code, 2);
    assert.match(bad.stderr, /--prefix must be/);
  });

  it("check validates a config file and lists every problem", async () => {
    const good = writeProxyConfig(dir, { agents: [{ id: "a", target: agent.target, token: agent.token }], keyStores: testKeyStores() });
    const ok = await run(["check", "--config", good]);
    assert.equal(ok.code, 0, ok.stderr);
    const badFile = join(dir, "bad.json");
    writeFileSync(badFile, JSON.stringify({ region: "x", agents: [], keyStores: [{ uriPathPrefix: "p", credentials: [], keys: [] }] }));
    const bad = await run(["check", "--config", badFile]);
    assert.equal(bad.code, 1);
    assert.ok(bad.stderr.includes(badFile));
    for (const f of ["region:", "agents: must have at least 1", "keyStores[0].uriPathPrefix:", "keyStores[0].credentials:"])
      assert.ok(bad.stderr.includes(f), f);
    assert.equal((await run(["serve"])).code, 2);
    assert.equal((await run(["nonsense"])).code, 2);
  });

  it("serve: logs the config once without secrets, serves, reloads credentials on SIGHUP, stops cleanly on SIGTERM", async () => {
    const file = writeProxyConfig(dir, { agents: [{ id: "a", target: agent.target, token: agent.token }], keyStores: testKeyStores() });
    const p = cli(["serve", "--config", file]);
    let stdout = "";
    let stderr = "";
    p.stdout!.on("data", (c: Buffer) => (stdout += c.toString()));
    p.stderr!.on("data", (c: Buffer) => (stderr += c.toString()));
    const exited = new Promise<number | null>((r) => p.on("close", (code) => r(code)));
    try {
      await until(() => stdout.includes("xks-proxy listening") || p.exitCode !== null, "the proxy to start");
      assert.ok(stdout.includes("xks-proxy listening"), `started: ${stderr}`);
      const start = stdout
        .split("\n")
        .filter(Boolean)
        .map((l) => JSON.parse(l))
        .find((l) => l.msg === "xks-proxy listening");
      assert.deepEqual(start.config.keyStores[0], {
        uriPathPrefix: PREFIX,
        accessKeyIds: [CREDS.a.accessKeyId, CREDS.b.accessKeyId],
        keys: ["foo"],
      });
      for (const s of [CREDS.a.secretAccessKey, CREDS.b.secretAccessKey, agent.token])
        assert.ok(!stdout.includes(s), "no secret in the start-up log");
      const url = `http://${start.address}`;
      assert.equal((await send(url, { method: "GET", path: "/ping" })).status, 200);
      const health = { requestMetadata: { kmsRequestId: "1", kmsOperation: "KmsHealthCheck" } };
      assert.equal((await signedPost(url, `${PREFIX}/kms/xks/v1/health`, health, CREDS.a)).status, 200);

      // Rotation without restart: drop credential a, add a new one, SIGHUP.
      const cfg = JSON.parse(readFileSync(file, "utf8"));
      const fresh = { accessKeyId: "DDDDDDDDDDDDDDDDDDDDDDDDDD", secretAccessKey: "ZnJlc2gtc2VjcmV0LWZyZXNoLXNlY3JldC1mcmVzaC1zZWNyZXQ=" };
      writeFileSync(join(dir, "fresh.secret"), fresh.secretAccessKey, { mode: 0o600 });
      cfg.keyStores[0].credentials = [
        cfg.keyStores[0].credentials[1],
        { accessKeyId: fresh.accessKeyId, secretAccessKey: { file: "fresh.secret" } },
      ];
      writeFileSync(file, JSON.stringify(cfg));
      p.kill("SIGHUP");
      await until(() => stdout.includes("key stores and identities reloaded"), "the reload");
      assert.equal((await signedPost(url, `${PREFIX}/kms/xks/v1/health`, health, fresh)).status, 200);
      assert.equal((await signedPost(url, `${PREFIX}/kms/xks/v1/health`, health, CREDS.b)).status, 200);
      assert.equal((await signedPost(url, `${PREFIX}/kms/xks/v1/health`, health, CREDS.a)).status, 401);
      // An invalid file on SIGHUP keeps the running config.
      writeFileSync(file, "{broken");
      p.kill("SIGHUP");
      await until(() => stdout.includes("reload rejected"), "the refused reload");
      assert.equal((await signedPost(url, `${PREFIX}/kms/xks/v1/health`, health, fresh)).status, 200);
      assert.ok(!stdout.includes(fresh.secretAccessKey));

      p.kill("SIGTERM");
      const code = await Promise.race([exited, new Promise<"timeout">((r) => setTimeout(() => r("timeout"), GENEROUS_MS).unref())]);
      assert.equal(code, 0, stderr);
      assert.ok(stdout.includes('"msg":"stopped"'));
    } finally {
      if (p.exitCode === null) p.kill("SIGKILL");
    }
  });
});
