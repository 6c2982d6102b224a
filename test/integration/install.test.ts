/**
 * `xks-proxy install` and `xks-agent install` (bin/ → dist/): --dry-run prints exactly the files
 * with this machine's node and this package's bin; the unit passes `systemd-analyze verify` where
 * systemd is installed; writing refuses a differing file unless --force and writes nothing then;
 * the plist is a property list with the real paths.
 */
import assert from "node:assert/strict";
import { execFile, execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { homedir, tmpdir, userInfo } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { PACKAGE_ROOT } from "../../shared/paths.ts";
import { parsePlist, plistlib } from "../../testbed/plist.ts";
import { GENEROUS_MS } from "../../testbed/wait.ts";

let dir: string;
before(() => {
  dir = mkdtempSync(join(tmpdir(), "xks-install-"));
});
after(() => rmSync(dir, { recursive: true, force: true }));

function run(bin: string, args: string[], env: NodeJS.ProcessEnv = process.env): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [join(PACKAGE_ROOT, "bin", `${bin}.js`), ...args], { env, timeout: GENEROUS_MS }, (err, stdout, stderr) =>
      resolve({ code: err ? ((err as { code?: number }).code ?? -1) : 0, stdout, stderr }),
    );
  });
}

/** The files of a --dry-run: path → content. */
function dryRunFiles(text: string): Map<string, string> {
  const files = new Map<string, string>();
  const parts = text.split(/^# (\/\S+) \(mode 0644\)\n/m);
  assert.equal(parts[0], "", "the output starts with a file header");
  // Each file's content ends with a newline, and one more separates it from the next (or ends the output).
  for (let i = 1; i < parts.length; i += 2) files.set(parts[i], parts[i + 1].slice(0, -1));
  return files;
}

const hasSystemdAnalyze = (() => {
  try {
    execFileSync("systemd-analyze", ["--version"], { stdio: "ignore" });
    return true;
  } catch {
    return false;
  }
})();

test("xks-proxy install --dry-run: the unit and tmpfiles entry for this machine, exactly what install writes", async () => {
  const args = ["install", "--agents", "ownermac,laptop", "--config", "/etc/xks-proxy/proxy.json"];
  const dry = await run("xks-proxy", [...args, "--dry-run"]);
  assert.equal(dry.code, 0, dry.stderr);
  const files = dryRunFiles(dry.stdout);
  assert.deepEqual([...files.keys()], ["/etc/systemd/system/xks-proxy.service", "/etc/tmpfiles.d/xks.conf"]);
  const unit = files.get("/etc/systemd/system/xks-proxy.service")!;
  assert.match(
    unit,
    new RegExp(
      `\\nExecStart=${process.execPath} --max-semi-space-size=32 ${join(PACKAGE_ROOT, "bin/xks-proxy.js")} serve --config /etc/xks-proxy/proxy.json\\n`,
    ),
  );
  assert.match(unit, /\nSupplementaryGroups=xks-t-ownermac xks-t-laptop\n/);
  assert.match(unit, /\nExecReload=\/bin\/kill -HUP \$MAINPID\n/);
  assert.match(files.get("/etc/tmpfiles.d/xks.conf")!, /\nd \/run\/xks\/laptop +0750 xks-t-laptop +xks-t-laptop +-\n/);

  // Written under a root of its own: the same bytes as the dry run, then the commands to run.
  const root = join(dir, "proxy-root");
  const wrote = await run("xks-proxy", [...args, "--root", root]);
  assert.equal(wrote.code, 0, wrote.stderr);
  assert.match(wrote.stdout, /^wrote \S+xks-proxy\.service\nwrote \S+xks\.conf\n/);
  assert.match(wrote.stdout, /systemctl daemon-reload && systemctl enable --now xks-proxy/);
  const unitFile = join(root, "etc/systemd/system/xks-proxy.service");
  for (const [path, content] of files) assert.equal(readFileSync(join(root, path), "utf8"), content, path);
  assert.equal(statSync(unitFile).mode & 0o777, 0o644);
  if (hasSystemdAnalyze) {
    // verify checks the syntax and that ExecStart's binary exists; it prints parse problems as warnings and still exits 0.
    const v = await new Promise<{ err: Error | null; out: string }>((resolve) =>
      execFile("systemd-analyze", ["verify", unitFile], (err, stdout, stderr) => resolve({ err, out: stdout + stderr })),
    );
    assert.equal(v.err, null, v.out);
    assert.equal(v.out, "", "systemd-analyze verify: no warning");
  }

  // The same again: unchanged. A changed file: refused, nothing written, until --force.
  const same = await run("xks-proxy", [...args, "--root", root]);
  assert.equal(same.code, 0);
  assert.match(same.stdout, /^unchanged \S+xks-proxy\.service\nunchanged \S+xks\.conf\n/);
  writeFileSync(unitFile, "# edited by hand\n");
  const tmpfiles = join(root, "etc/tmpfiles.d/xks.conf");
  const other = [...args.slice(0, 2), "ownermac", ...args.slice(3)];
  const refused = await run("xks-proxy", [...other, "--root", root]);
  assert.equal(refused.code, 1);
  assert.match(refused.stderr, /xks-proxy\.service, \S+xks\.conf exist with other content; nothing was written/);
  assert.equal(readFileSync(unitFile, "utf8"), "# edited by hand\n");
  assert.match(readFileSync(tmpfiles, "utf8"), /laptop/, "the tmpfiles entry was not rewritten either");
  const forced = await run("xks-proxy", [...other, "--root", root, "--force"]);
  assert.equal(forced.code, 0, forced.stderr);
  assert.match(forced.stdout, /^replaced \S+xks-proxy\.service\nreplaced \S+xks\.conf\n/);
  assert.doesNotMatch(readFileSync(tmpfiles, "utf8"), /laptop/);
});

test("xks-proxy install refuses paths ProtectHome=yes would hide, and bad agent ids", async () => {
  const home = await run("xks-proxy", ["install", "--agents", "a1", "--config", "/home/ops/proxy.json", "--dry-run"]);
  assert.equal(home.code, 1);
  assert.match(home.stderr, /\/home\/ops\/proxy\.json would be hidden from the service \(ProtectHome=yes\)/);
  const bad = await run("xks-proxy", ["install", "--agents", "Owner Mac", "--dry-run"]);
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /--agents: "Owner Mac" must match/);
});

test("xks-agent install --dry-run: a plist with this machine's node, bin, config and SOFTHSM2_CONF; --daemon", async () => {
  const conf = join(dir, "softhsm2.conf");
  const env = { ...process.env, SOFTHSM2_CONF: conf };
  const agent = await run("xks-agent", ["install", "--config", join(dir, "agent.json"), "--dry-run"], env);
  assert.equal(agent.code, 0, agent.stderr);
  const path = join(homedir(), "Library/LaunchAgents/local.xks-agent.plist");
  const files = dryRunFiles(agent.stdout);
  assert.deepEqual([...files.keys()], [path]);
  const xml = files.get(path)!;
  const p = parsePlist(xml) as Record<string, any>;
  assert.equal(p.Label, "local.xks-agent");
  assert.deepEqual(p.ProgramArguments, [
    process.execPath,
    "--max-semi-space-size=32",
    join(PACKAGE_ROOT, "bin/xks-agent.js"),
    "run",
    "--config",
    join(dir, "agent.json"),
  ]);
  assert.deepEqual(p.EnvironmentVariables, { SOFTHSM2_CONF: conf });
  assert.equal(p.WorkingDirectory, dir);
  assert.equal(p.StandardErrorPath, join(homedir(), "Library/Logs/xks-agent.log"));
  const py = plistlib(xml);
  if (py !== undefined) assert.deepEqual(py, p);

  const daemon = await run(
    "xks-agent",
    ["install", "--config", join(dir, "agent.json"), "--daemon", "--label", "org.example.xks", "--dry-run"],
    env,
  );
  assert.equal(daemon.code, 0, daemon.stderr);
  const dFiles = dryRunFiles(daemon.stdout);
  const dPath = "/Library/LaunchDaemons/org.example.xks.plist";
  assert.deepEqual([...dFiles.keys()], [dPath]);
  const d = parsePlist(dFiles.get(dPath)!) as Record<string, any>;
  assert.equal(d.UserName, userInfo().username);
  assert.equal(d.Label, "org.example.xks");
});
