/**
 * The command-line convention of both binaries (bin/ → dist/), for every command in their tables:
 * `--help` prints the command's usage, options and example and does nothing else (run in an empty
 * folder with an empty HOME, nothing appears; `credentials new --help` prints no secret); an
 * unknown option or a stray argument is refused with exit 2 and named; the exit codes are the
 * documented ones.
 */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { COMMANDS as AGENT_COMMANDS } from "../../agent/cli.ts";
import { COMMANDS as PROXY_COMMANDS } from "../../proxy/cli.ts";
import { PACKAGE_ROOT } from "../../shared/paths.ts";
import { GENEROUS_MS } from "../../testbed/wait.ts";

const BINS = { "xks-agent": AGENT_COMMANDS, "xks-proxy": PROXY_COMMANDS } as const;
type Bin = keyof typeof BINS;
const VERSION = JSON.parse(readFileSync(join(PACKAGE_ROOT, "package.json"), "utf8")).version as string;

let dir: string;
before(() => {
  dir = mkdtempSync(join(tmpdir(), "xks-cli-conv-"));
});
after(() => rmSync(dir, { recursive: true, force: true }));

/** Runs a binary in `cwd` with HOME set to `home`; resolves with its exit code and output. */
function run(bin: Bin, args: string[], o: { cwd?: string; home?: string } = {}): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(
      process.execPath,
      [join(PACKAGE_ROOT, "bin", `${bin}.js`), ...args],
      {
        cwd: o.cwd ?? dir,
        env: { ...process.env, HOME: o.home ?? process.env.HOME, SOFTHSM2_CONF: join(o.cwd ?? dir, "softhsm2.conf") },
        timeout: GENEROUS_MS,
      },
      (err, stdout, stderr) => resolve({ code: err ? ((err as { code?: number }).code ?? -1) : 0, stdout, stderr }),
    );
  });
}

/** Every file and folder under `root`, relative to it. */
function tree(root: string): string[] {
  return readdirSync(root, { recursive: true, withFileTypes: false }) as string[];
}

/** A fresh empty folder with an empty HOME inside, for a run that must leave no trace. */
function sandbox(name: string): { cwd: string; home: string; left: () => string[] } {
  const cwd = join(dir, name);
  const home = join(cwd, "home");
  mkdirSync(home, { recursive: true });
  return { cwd, home, left: () => tree(cwd).filter((p) => p !== "home") };
}

for (const [bin, commands] of Object.entries(BINS) as Array<[Bin, (typeof BINS)[Bin]]>) {
  describe(`${bin}: every command`, () => {
    for (const c of commands) {
      test(`${c.name} --help: usage, every option, an example; nothing written`, async () => {
        const s = sandbox(`${bin}-${c.name.replace(" ", "-")}-help`);
        // Also with every required option given, and --help last: help still wins.
        const required = Object.entries(c.options)
          .filter(([, o]) => "required" in o && o.required)
          .flatMap(([n]) => [`--${n}`, join(s.cwd, "x.json")]);
        for (const args of [
          [...c.name.split(" "), "--help"],
          [...c.name.split(" "), ...required, "-h"],
        ]) {
          const r = await run(bin, args, s);
          assert.equal(r.code, 0, `${args.join(" ")}: ${r.stderr}`);
          assert.equal(r.stderr, "");
          assert.ok(r.stdout.startsWith(`${bin} ${c.name}: `), r.stdout);
          assert.match(r.stdout, new RegExp(`\\nusage: ${bin} ${c.name}`));
          for (const o of Object.keys(c.options)) assert.ok(r.stdout.includes(`--${o}`), `--${o} in the help`);
          assert.match(r.stdout, /\nexamples?:\n {2}\S/);
          assert.match(r.stdout, /exit codes:\n {2}0 {2}done\n {2}1 {2}runtime failure/);
          assert.deepEqual(s.left(), [], `${args.join(" ")} wrote nothing`);
          assert.doesNotMatch(r.stdout, /SecretAccessKey:|[A-Za-z0-9+/]{43}=/, "no secret printed");
        }
      });

      test(`${c.name}: an unknown option and a stray argument → exit 2, named; nothing written`, async () => {
        const s = sandbox(`${bin}-${c.name.replace(" ", "-")}-bad`);
        const unknown = await run(bin, [...c.name.split(" "), "--no-such-option", "v"], s);
        assert.equal(unknown.code, 2, unknown.stderr);
        assert.match(unknown.stderr, new RegExp(`^${bin} ${c.name}: unknown option '--no-such-option'\\nusage: ${bin} ${c.name}`));
        assert.equal(unknown.stdout, "");
        const stray = await run(bin, [...c.name.split(" "), "stray"], s);
        assert.equal(stray.code, 2, stray.stderr);
        assert.match(stray.stderr, /unexpected argument 'stray'/);
        assert.deepEqual(s.left(), []);
      });
    }
  });
}

describe("exit codes", () => {
  test("--version (both spellings) prints the package version; no command or an unknown one → 2", async () => {
    for (const bin of ["xks-agent", "xks-proxy"] as const) {
      for (const v of ["--version", "-V", "version"]) {
        const r = await run(bin, [v]);
        assert.equal(r.code, 0);
        assert.equal(r.stdout, `${bin} ${VERSION}\n`);
      }
      const none = await run(bin, []);
      assert.equal(none.code, 2);
      assert.match(none.stderr, /commands:/);
      const bad = await run(bin, ["nonsense"]);
      assert.equal(bad.code, 2);
      assert.match(bad.stderr, new RegExp(`${bin}: unknown command 'nonsense'`));
      const help = await run(bin, ["--help"]);
      assert.equal(help.code, 0);
      for (const c of BINS[bin]) assert.ok(help.stdout.includes(`  ${c.name} `), c.name);
    }
    const group = await run("xks-agent", ["keys"]);
    assert.equal(group.code, 2);
    assert.match(group.stderr, /'keys' needs a command; the keys commands are: keys create, keys list, keys disable, keys enable/);
    const typo = await run("xks-proxy", ["credentials", "old"]);
    assert.equal(typo.code, 2);
    assert.match(typo.stderr, /unknown command 'credentials old'/);
  });

  test("a missing required option or a bad value → 2; an invalid config → 2, except check, which reports it with 1", async () => {
    const missing = await run("xks-proxy", ["serve"]);
    assert.equal(missing.code, 2);
    assert.match(missing.stderr, /--config FILE is required/);
    const badPrefix = await run("xks-proxy", [
      "credentials",
      "new",
      ...["--secret-out", "s.secret", "--endpoint", "https://xks.example.com", "--region", "us-east-1"],
      ...["--prefix", "/p/kms/xks/v1/"],
    ]);
    assert.equal(badPrefix.code, 2);
    assert.match(badPrefix.stderr, /--prefix must not end with/);
    const badUsage = await run("xks-agent", ["audit", "tail", "--config", "x.json", "-n", "zero"]);
    assert.equal(badUsage.code, 2);
    assert.match(badUsage.stderr, /-n must be a positive integer/);

    const bad = join(dir, "bad.json");
    writeFileSync(bad, JSON.stringify({ region: 5 }));
    const serve = await run("xks-proxy", ["serve", "--config", bad]);
    assert.equal(serve.code, 2);
    assert.ok(serve.stderr.startsWith(`invalid config ${bad}:`), serve.stderr);
    const check = await run("xks-proxy", ["check", "--config", bad]);
    assert.equal(check.code, 1);
    const json = await run("xks-proxy", ["check", "--config", bad, "--json"]);
    assert.equal(json.code, 1);
    const parsed = JSON.parse(json.stdout);
    assert.equal(parsed.ok, false);
    assert.equal(parsed.file, bad);
    assert.ok(
      parsed.problems.some((p: string) => p.startsWith("region:")),
      json.stdout,
    );
    for (const cmd of [["pause"], ["keys", "disable", "--label", "k"], ["audit", "tail"]]) {
      const r = await run("xks-agent", [...cmd, "--config", bad]);
      assert.equal(r.code, 2, `${cmd.join(" ")}: ${r.stderr}`);
      assert.ok(r.stderr.startsWith(`invalid config ${bad}:`), r.stderr);
    }
  });

  test("a runtime failure → 1 with one message: an identity that exists, launchd off macOS", async () => {
    for (const bin of ["xks-agent", "xks-proxy"] as const) {
      const out = join(dir, `${bin}-identity`);
      assert.equal((await run(bin, ["identity", "new", "--out", out])).code, 0);
      const again = await run(bin, ["identity", "new", "--out", out]);
      assert.equal(again.code, 1);
      assert.match(again.stderr, /\.key or \.crt exists already\n$/);
      assert.equal(again.stderr.split("\n").length, 2, "one line");
    }
    if (process.platform !== "darwin") {
      const r = await run("xks-agent", ["install", "--config", join(dir, "agent.json")]);
      assert.equal(r.code, 1);
      assert.match(r.stderr, /launchd is macOS only: on this machine --dry-run prints the plist, nothing is installed/);
    }
  });
});
