/**
 * `xks-proxy credentials new` through the real CLI in a child process: the
 * secret file it writes (mode, content, never over an existing file), the
 * proxy config entry it prints (loaded by the real config loader), the aws
 * CLI commands it prints (run by bash against a stand-in `aws` that prints
 * its arguments, so the shell's own parsing and `$(cat …)` are what is
 * checked), no secret on the terminal unless asked for, and `--help` with no
 * side effect.
 */
import assert from "node:assert/strict";
import { execFileSync, spawn } from "node:child_process";
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { ACCESS_KEY_ID_RE, parseProxyConfig, SECRET_ACCESS_KEY_RE } from "../../proxy/config.ts";
import { XKS_URI_PATH_RE } from "../../proxy/credentials.ts";
import { TEST_IDENTITIES } from "../../testbed/identities.ts";
import { secretFile } from "../../testbed/configs.ts";
import { writeIdentity, writePins } from "../../testbed/identities.ts";

const ROOT = new URL("../..", import.meta.url).pathname;
const RUN = "import { main } from './proxy/cli.ts'; process.exitCode = await main(process.argv.slice(1));";
const PREFIX = "/xks/store-one";
const ENDPOINT = "https://xks.example.com";
const REGION = "eu-west-1";
const FAKE_STORE_ID = "cks-0123456789abcdef0";

function run(args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const p = spawn(process.execPath, ["--import", "tsx", "--input-type=module", "-e", RUN, ...args], {
      cwd: ROOT,
      stdio: ["ignore", "pipe", "pipe"],
    });
    let stdout = "";
    let stderr = "";
    p.stdout.on("data", (c: Buffer) => (stdout += c.toString()));
    p.stderr.on("data", (c: Buffer) => (stderr += c.toString()));
    p.on("close", (code) => resolve({ code, stdout, stderr }));
  });
}

/** The printed shell command that starts with `first`: its line and every continuation line. */
function commandBlock(stdout: string, first: string): string {
  const lines = stdout.split("\n");
  const i = lines.findIndex((l) => l.startsWith(first));
  assert.ok(i >= 0, `a line starting with ${first}`);
  let j = i;
  while (lines[j].endsWith("\\")) j++;
  return lines.slice(i, j + 1).join("\n");
}

/** The AWS CLI's shorthand `K=V,K=V` (values without commas, as here). */
function shorthand(s: string): Record<string, string> {
  return Object.fromEntries(
    s.split(",").map((kv) => {
      const eq = kv.indexOf("=");
      return [kv.slice(0, eq), kv.slice(eq + 1)];
    }),
  );
}

/** `--name value` pairs of an argument list (after the two positionals). */
function options(args: string[]): Record<string, string> {
  const o: Record<string, string> = {};
  for (let i = 2; i < args.length; i += 2) {
    assert.match(args[i], /^--[a-z-]+$/, `an option name at ${i}: ${args[i]}`);
    o[args[i].slice(2)] = args[i + 1];
  }
  return o;
}

describe("xks-proxy credentials new", () => {
  let dir: string;
  let bin: string;
  before(() => {
    dir = mkdtempSync(join(tmpdir(), "xks-credentials-"));
    // A stand-in for the aws CLI: prints its arguments as JSON (and a key store id when asked for one).
    bin = join(dir, "bin");
    mkdirSync(bin);
    writeFileSync(
      join(bin, "aws"),
      `#!${process.execPath}\nconst a = process.argv.slice(2);\nif (a[1] === "describe-custom-key-stores") console.log("${FAKE_STORE_ID}");\nelse console.log(JSON.stringify(a));\n`,
      { mode: 0o755 },
    );
  });
  after(() => rmSync(dir, { recursive: true, force: true }));

  /** Runs a printed command block with bash, the stand-in aws first on PATH; the arguments aws received. */
  function viaShell(block: string): string[] {
    const printed = execFileSync("bash", ["-euc", block], {
      env: { ...process.env, PATH: `${bin}:${process.env.PATH}` },
      encoding: "utf8",
    });
    return JSON.parse(printed.trim().split("\n").at(-1)!);
  }

  it("--help prints the usage and mints nothing, wherever it appears", async () => {
    const work = mkdtempSync(join(dir, "help-"));
    const secret = join(work, "s.secret");
    for (const args of [
      ["credentials", "new", "--help"],
      ["credentials", "--help"],
      ["credentials", "new", "-h"],
      ["credentials", "new", "--secret-out", secret, "--endpoint", ENDPOINT, "--region", REGION, "--help"],
    ]) {
      const r = await run(args);
      assert.equal(r.code, 0, r.stderr);
      // The command's own help, or for the group its list of commands.
      assert.match(r.stdout, args[1] === "new" ? /usage: xks-proxy credentials new --secret-out FILE/ : /credentials new {2}mint/);
      assert.doesNotMatch(r.stdout, /AccessKeyId: /);
      assert.deepEqual(readdirSync(work), [], `${args.join(" ")} wrote nothing`);
    }
  });

  it("writes the secret to a new 0600 file, prints no secret, and the config entry it prints loads", async () => {
    const secret = join(dir, "store-one.secret");
    const r = await run(["credentials", "new", "--secret-out", secret, "--endpoint", ENDPOINT, "--region", REGION, "--prefix", PREFIX]);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stderr, "");
    assert.equal(statSync(secret).mode & 0o777, 0o600);
    const text = readFileSync(secret, "utf8");
    assert.match(text, /^[a-zA-Z0-9/+=]{43,64}\n$/, "the secret and one newline");
    const value = text.trim();
    assert.match(value, SECRET_ACCESS_KEY_RE);
    assert.ok(!r.stdout.includes(value), "the secret is not printed");
    const accessKeyId = /^AccessKeyId: (\S+)$/m.exec(r.stdout)![1];
    assert.match(accessKeyId, ACCESS_KEY_ID_RE);

    // The printed keyStores credential entry, in a config the real loader reads.
    const entry = JSON.parse(/^ {2}(\{"accessKeyId".*)$/m.exec(r.stdout)![1]);
    assert.deepEqual(entry, { accessKeyId, secretAccessKey: { file: secret } });
    const cfgDir = mkdtempSync(join(dir, "cfg-"));
    const cfg = parseProxyConfig(
      {
        region: REGION,
        identity: writeIdentity(cfgDir, "proxy-identity", TEST_IDENTITIES.proxy),
        agents: [
          {
            id: "ownermac",
            target: "unix:///run/xks/ownermac/agent.sock",
            token: secretFile(cfgDir, "agent-token", "0123456789abcdef0123"),
            identities: writePins(cfgDir, "agent", [TEST_IDENTITIES.agent]),
          },
        ],
        keyStores: [{ uriPathPrefix: PREFIX, credentials: [entry], keys: ["my-kms-key"] }],
      },
      join(cfgDir, "proxy.json"),
    );
    assert.deepEqual(cfg.keyStores[0].credentials, [{ accessKeyId, secretAccessKey: value }]);

    // The create command, as the shell runs it: every argument KMS needs, the secret read from the file.
    const create = viaShell(commandBlock(r.stdout, "aws kms create-custom-key-store"));
    assert.deepEqual(create.slice(0, 2), ["kms", "create-custom-key-store"]);
    const o = options(create);
    assert.deepEqual(Object.keys(o).sort(), [
      "custom-key-store-name",
      "custom-key-store-type",
      "region",
      "xks-proxy-authentication-credential",
      "xks-proxy-connectivity",
      "xks-proxy-uri-endpoint",
      "xks-proxy-uri-path",
    ]);
    assert.equal(o.region, REGION);
    assert.equal(o["custom-key-store-type"], "EXTERNAL_KEY_STORE");
    assert.equal(o["custom-key-store-name"], "xks-pair");
    assert.equal(o["xks-proxy-connectivity"], "PUBLIC_ENDPOINT");
    assert.equal(o["xks-proxy-uri-endpoint"], ENDPOINT);
    assert.equal(o["xks-proxy-uri-path"], `${PREFIX}/kms/xks/v1`);
    assert.match(o["xks-proxy-uri-path"], XKS_URI_PATH_RE);
    assert.deepEqual(shorthand(o["xks-proxy-authentication-credential"]), { AccessKeyId: accessKeyId, RawSecretAccessKey: value });

    // The update command (rotation): the store id looked up by name, the same credential.
    const update = viaShell(
      `${commandBlock(r.stdout, "KEY_STORE_ID=$(aws kms describe-custom-key-stores")}\n${commandBlock(r.stdout, "aws kms update-custom-key-store")}`,
    );
    assert.deepEqual(update.slice(0, 2), ["kms", "update-custom-key-store"]);
    const u = options(update);
    assert.equal(u.region, REGION);
    assert.equal(u["custom-key-store-id"], FAKE_STORE_ID);
    assert.deepEqual(shorthand(u["xks-proxy-authentication-credential"]), { AccessKeyId: accessKeyId, RawSecretAccessKey: value });
    assert.match(commandBlock(r.stdout, "KEY_STORE_ID="), /--custom-key-store-name xks-pair /);
  });

  it("never overwrites an existing file, and checks every argument before it writes anything", async () => {
    const secret = join(dir, "taken.secret");
    writeFileSync(secret, "in use\n", { mode: 0o600 });
    const taken = await run(["credentials", "new", "--secret-out", secret, "--endpoint", ENDPOINT, "--region", REGION]);
    assert.equal(taken.code, 1);
    assert.match(taken.stderr, /exists already; it is never overwritten/);
    assert.equal(taken.stdout, "");
    assert.equal(readFileSync(secret, "utf8"), "in use\n");

    const fresh = join(dir, "never.secret");
    const cases: Array<[string[], RegExp]> = [
      [["--endpoint", ENDPOINT, "--region", REGION], /--secret-out FILE is required/],
      [["--secret-out", fresh, "--region", REGION], /--endpoint URL is required/],
      [["--secret-out", fresh, "--endpoint", ENDPOINT], /--region REGION is required/],
      [
        ["--secret-out", fresh, "--endpoint", "https://xks.example.com:443", "--region", REGION],
        /--endpoint must be https:\/\/ and a DNS name/,
      ],
      [["--secret-out", fresh, "--endpoint", `${ENDPOINT}/x`, "--region", REGION], /no port and no path/],
      [["--secret-out", fresh, "--endpoint", ENDPOINT, "--region", REGION, "--prefix", "no-slash"], /--prefix must be/],
      [["--secret-out", fresh, "--endpoint", ENDPOINT, "--region", REGION, "--prefixx", PREFIX], /unknown option '--prefixx'/],
      [
        ["--secret-out", fresh, "--endpoint", ENDPOINT, "--region", REGION, "--connectivity", "VPC_ENDPOINT_SERVICE"],
        /needs --vpc-endpoint-service-name/,
      ],
      [["--secret-out", fresh, "--endpoint", ENDPOINT, "--region", "Europe"], /--region must be an AWS region/],
    ];
    for (const [args, why] of cases) {
      const r = await run(["credentials", "new", ...args]);
      assert.equal(r.code, 2, `${args.join(" ")}: ${r.stderr}`);
      assert.match(r.stderr, why);
      assert.equal(r.stdout, "");
      assert.throws(() => statSync(fresh), /ENOENT/, `${args.join(" ")} wrote no file`);
    }
    assert.equal((await run(["credentials", "old", "--secret-out", fresh, "--endpoint", ENDPOINT, "--region", REGION])).code, 2);
    assert.throws(() => statSync(fresh), /ENOENT/);
  });

  it("VPC endpoint service connectivity; the console's file and the secret only when asked for", async () => {
    const secret = join(dir, "vpc.secret");
    const consoleFile = join(dir, "vpc-console.json");
    const service = "com.amazonaws.vpce.eu-west-1.vpce-svc-0123456789abcdef0";
    const r = await run([
      "credentials",
      "new",
      "--secret-out",
      secret,
      "--endpoint",
      ENDPOINT,
      "--region",
      REGION,
      "--prefix",
      PREFIX,
      "--name",
      "xks-vpc",
      "--connectivity",
      "VPC_ENDPOINT_SERVICE",
      "--vpc-endpoint-service-name",
      service,
      "--console-file",
      consoleFile,
      "--show-secret",
    ]);
    assert.equal(r.code, 0, r.stderr);
    const value = readFileSync(secret, "utf8").trim();
    const accessKeyId = /^AccessKeyId: (\S+)$/m.exec(r.stdout)![1];
    const o = options(viaShell(commandBlock(r.stdout, "aws kms create-custom-key-store")));
    assert.equal(o["xks-proxy-connectivity"], "VPC_ENDPOINT_SERVICE");
    assert.equal(o["xks-proxy-vpc-endpoint-service-name"], service);
    assert.equal(o["custom-key-store-name"], "xks-vpc");
    assert.equal(statSync(consoleFile).mode & 0o777, 0o600);
    const proxyConfigurationFile = {
      XksProxyUriPath: `${PREFIX}/kms/xks/v1`,
      XksProxyAuthenticationCredential: { AccessKeyId: accessKeyId, RawSecretAccessKey: value },
    };
    assert.deepEqual(JSON.parse(readFileSync(consoleFile, "utf8")), proxyConfigurationFile);
    // --show-secret: the operator asked for it on the terminal.
    assert.ok(r.stdout.includes(`SecretAccessKey: ${value}`));
    assert.ok(r.stdout.includes(JSON.stringify(proxyConfigurationFile)));
  });
});
