/**
 * The package as a host gets it: `npm pack` in a copy of this repository (prepack builds dist/
 * afresh and ships the lockfile as npm-shrinkwrap.json), the tarball unpacked on a "host" and
 * installed with `npm ci --omit=dev --omit=optional --offline` (no network here: npm's cache
 * holds every tarball the lockfile names), then both binaries run from it. Without the optional
 * pkcs11js the proxy works and the agent's HSM commands say what is missing. The module graphs
 * in dist/ show why: the proxy never reaches pkcs11js, the agent's CLI only on demand.
 */
import assert from "node:assert/strict";
import { execFile, execFileSync } from "node:child_process";
import { cpSync, existsSync, mkdirSync, mkdtempSync, readFileSync, realpathSync, rmSync, symlinkSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { after, before, test } from "node:test";
import { PACKAGE_ROOT } from "../../shared/paths.ts";
import { testKeyStores, writeAgentConfig, writeProxyConfig } from "../../testbed/configs.ts";
import { createKeySet, createSoftHsmToken, TEST_KEYS } from "../../testbed/hsm.ts";
import { GENEROUS_MS } from "../../testbed/wait.ts";

const VERSION = JSON.parse(readFileSync(join(PACKAGE_ROOT, "package.json"), "utf8")).version as string;
let dir: string;
let host: string;
let packed: { filename: string; files: Array<{ path: string }> };

function sh(
  cmd: string,
  args: string[],
  cwd: string,
  env: NodeJS.ProcessEnv = process.env,
): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolvePromise) => {
    execFile(cmd, args, { cwd, env, timeout: 4 * GENEROUS_MS, maxBuffer: 64 << 20 }, (err, stdout, stderr) =>
      resolvePromise({ code: err ? ((err as { code?: number }).code ?? -1) : 0, stdout, stderr }),
    );
  });
}

/** npm's own environment, without what `npm test` sets for its own run (npm_config_*, npm_lifecycle_*…). */
function npmEnv(): NodeJS.ProcessEnv {
  return Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("npm_")));
}

before(async () => {
  dir = mkdtempSync(join(tmpdir(), "xks-package-"));
  // A copy of the repository as git sees it (tracked and new files, nothing ignored), with its node_modules.
  const src = join(dir, "src");
  const files = execFileSync("git", ["ls-files", "-z", "--cached", "--others", "--exclude-standard"], {
    cwd: PACKAGE_ROOT,
    encoding: "utf8",
  })
    .split("\0")
    .filter((f) => f !== "" && existsSync(join(PACKAGE_ROOT, f)));
  for (const f of files) {
    mkdirSync(dirname(join(src, f)), { recursive: true });
    cpSync(join(PACKAGE_ROOT, f), join(src, f));
  }
  symlinkSync(realpathSync(join(PACKAGE_ROOT, "node_modules")), join(src, "node_modules"));
  mkdirSync(join(dir, "out"));
  const pack = await sh("npm", ["pack", "--json", "--pack-destination", join(dir, "out")], src, npmEnv());
  assert.equal(pack.code, 0, pack.stderr);
  packed = JSON.parse(pack.stdout.slice(pack.stdout.indexOf("[")))[0];
  assert.equal(existsSync(join(src, "npm-shrinkwrap.json")), false, "postpack removed the shrinkwrap again");
  host = unpack("host");
});

/** The tarball unpacked into a new folder `name`, as on a host: tar -xzf … --strip-components=1. */
function unpack(name: string): string {
  const to = join(dir, name);
  mkdirSync(to);
  execFileSync("tar", ["-xzf", join(dir, "out", packed.filename), "-C", to, "--strip-components=1"]);
  return to;
}
after(() => rmSync(dir, { recursive: true, force: true }));

test("the tarball: dist/, bin/, proto/, deploy/, license, changelog, the lockfile as shrinkwrap; no sources, tests or test-bed", () => {
  const paths = packed.files.map((f) => f.path);
  for (const p of [
    "bin/xks-agent.js",
    "bin/xks-proxy.js",
    "dist/agent/cli.js",
    "dist/proxy/cli.js",
    "dist/shared/cli.js",
    "proto/xks/agent/v1/agent.proto",
    "deploy/xks-proxy.service",
    "deploy/com.example.xks-agent.plist",
    "scripts/prepare.mjs",
    "npm-shrinkwrap.json",
    "package.json",
    "README.md",
    "CHANGELOG.md",
    "LICENSE",
  ])
    assert.ok(paths.includes(p), `${p} is in the package`);
  assert.deepEqual(
    paths.filter((p) => /\.ts$|^(test|testbed|agent|proxy|shared)\//.test(p) || (p.startsWith("scripts/") && p !== "scripts/prepare.mjs")),
    [],
  );
  assert.match(readFileSync(join(host, "LICENSE"), "utf8"), /Apache License\s+Version 2\.0/);
  assert.deepEqual(
    JSON.parse(readFileSync(join(host, "npm-shrinkwrap.json"), "utf8")).packages[""],
    JSON.parse(readFileSync(join(PACKAGE_ROOT, "package-lock.json"), "utf8")).packages[""],
  );
});

test("npm ci --omit=dev --omit=optional --offline on the host: no TypeScript, no pkcs11js, no C++ build; both binaries run", async () => {
  const ci = await sh("npm", ["ci", "--omit=dev", "--omit=optional", "--offline", "--no-audit", "--no-fund"], host, npmEnv());
  assert.equal(ci.code, 0, ci.stderr);
  assert.match(ci.stdout, /prepare: dist\/ is built already; TypeScript is not needed/);
  for (const absent of ["typescript", "tsx", "pkcs11js", "@biomejs/biome"])
    assert.equal(existsSync(join(host, "node_modules", absent)), false, absent);
  for (const present of ["@grpc/grpc-js", "express", "pino", "ssh2", "ws"])
    assert.ok(existsSync(join(host, "node_modules", present)), present);

  const bin = (name: string) => join(host, "bin", `${name}.js`);
  for (const name of ["xks-proxy", "xks-agent"]) {
    const v = await sh(process.execPath, [bin(name), "--version"], dir);
    assert.equal(v.stdout, `${name} ${VERSION}\n`, v.stderr);
    const h = await sh(process.execPath, [bin(name), "--help"], dir);
    assert.equal(h.code, 0, h.stderr);
    assert.match(h.stdout, /\ncommands:\n/);
  }
  // The proxy's whole module graph loads (its CLI imports the server statically): check a real config.
  const cfgDir = join(dir, "proxy-config");
  mkdirSync(cfgDir);
  const cfg = writeProxyConfig(cfgDir, {
    agents: [{ id: "a", target: "unix:///run/xks/a/agent.sock", token: "t".repeat(32) }],
    keyStores: testKeyStores(),
  });
  const check = await sh(process.execPath, [bin("xks-proxy"), "check", "--config", cfg], dir);
  assert.equal(check.code, 0, check.stderr);
  const unit = await sh(process.execPath, [bin("xks-proxy"), "install", "--agents", "a", "--dry-run"], dir);
  assert.equal(unit.code, 0, unit.stderr);
  assert.ok(unit.stdout.includes(` ${resolve(host, "bin/xks-proxy.js")} serve --config `), "the unit runs the installed package");

  // The agent without pkcs11js: what needs no HSM works, the rest says what is missing (exit 1).
  const plist = await sh(process.execPath, [bin("xks-agent"), "install", "--config", join(dir, "agent.json"), "--dry-run"], dir);
  assert.equal(plist.code, 0, plist.stderr);
  const missing = await sh(process.execPath, [bin("xks-agent"), "check", "--config", join(dir, "agent.json")], dir);
  assert.equal(missing.code, 1);
  assert.match(
    missing.stderr,
    /^xks-agent check: this command needs pkcs11js, the PKCS#11 binding, which is not installed or not built .* npm rebuild pkcs11js/,
  );
  assert.equal(missing.stderr.trim().split("\n").length, 1, "one line, no stack");
});

test("with optional dependencies, pkcs11js is built and the agent from the package passes check on a real token", async () => {
  const full = unpack("host-full");
  const ci = await sh("npm", ["ci", "--omit=dev", "--offline", "--no-audit", "--no-fund"], full, npmEnv());
  assert.equal(ci.code, 0, ci.stderr);
  assert.ok(existsSync(join(full, "node_modules/pkcs11js/build/Release/pkcs11.node")));
  const cfgDir = join(dir, "agent-config");
  mkdirSync(cfgDir);
  const token = createSoftHsmToken({ dir: join(cfgDir, "hsm") });
  createKeySet(token, TEST_KEYS);
  const config = writeAgentConfig(cfgDir, { token, proxyToken: "package-test-token-0123456789" });
  const check = await sh(process.execPath, [join(full, "bin/xks-agent.js"), "check", "--config", config], dir, {
    ...process.env,
    ...token.env,
  });
  assert.equal(check.code, 0, check.stdout + check.stderr);
  assert.match(
    check.stdout,
    /✓ the health key is found and usable: xks-health: an encrypt and decrypt round trip works\n[\s\S]*all checks passed\n$/,
  );
});

test("a pkcs11js build that fails (no Node headers for node-gyp) does not fail the install", async () => {
  const broken = unpack("host-no-toolchain");
  const ci = await sh("npm", ["ci", "--omit=dev", "--offline", "--no-audit", "--no-fund"], broken, {
    ...npmEnv(),
    npm_config_nodedir: join(dir, "no-such-node-headers"),
  });
  assert.equal(ci.code, 0, ci.stderr);
  assert.equal(existsSync(join(broken, "node_modules/pkcs11js")), false, "npm removed the optional dependency whose build failed");
  const v = await sh(process.execPath, [join(broken, "bin/xks-proxy.js"), "--version"], dir);
  assert.equal(v.stdout, `xks-proxy ${VERSION}\n`);
});

/** Every module `entry` reaches in dist/ (relative imports), and the packages they import; `dynamic` follows import() too. */
function graph(entry: string, dynamic: boolean): { modules: Set<string>; packages: Set<string> } {
  const modules = new Set<string>();
  const packages = new Set<string>();
  const visit = (file: string) => {
    if (modules.has(file)) return;
    modules.add(file);
    const src = readFileSync(file, "utf8");
    const re = dynamic
      ? /(?:^|\n)\s*(?:import|export)\s[^;]*?from\s*["']([^"']+)["']|(?:^|\n)\s*import\s*["']([^"']+)["']|\bimport\(\s*["']([^"']+)["']\s*\)/g
      : /(?:^|\n)\s*(?:import|export)\s[^;]*?from\s*["']([^"']+)["']|(?:^|\n)\s*import\s*["']([^"']+)["']/g;
    for (let m = re.exec(src); m !== null; m = re.exec(src)) {
      const spec = m[1] ?? m[2] ?? m[3];
      if (spec.startsWith(".")) visit(resolve(dirname(file), spec));
      else if (!spec.startsWith("node:")) packages.add(spec.startsWith("@") ? spec.split("/").slice(0, 2).join("/") : spec.split("/")[0]);
    }
  };
  visit(entry);
  return { modules, packages };
}

test("dist/: the proxy's module graph (every import, dynamic ones too) never reaches pkcs11js; the agent CLI's static graph neither", () => {
  const proxy = graph(join(PACKAGE_ROOT, "dist/proxy/cli.js"), true);
  assert.ok(proxy.modules.size > 15 && proxy.packages.has("express"), "the walk sees the proxy's modules");
  assert.equal(proxy.packages.has("pkcs11js"), false);
  assert.equal(
    [...proxy.modules].some((m) => m.includes("/dist/agent/")),
    false,
  );
  const agentStatic = graph(join(PACKAGE_ROOT, "dist/agent/cli.js"), false);
  assert.equal(agentStatic.packages.has("pkcs11js"), false, "loaded only by the commands that need it");
  assert.ok(graph(join(PACKAGE_ROOT, "dist/agent/cli.js"), true).packages.has("pkcs11js"), "the walk does find it where it is imported");
});
