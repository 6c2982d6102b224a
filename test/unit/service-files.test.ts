/**
 * The service files: deploy/ holds exactly what the install commands render for deploy/EC2.md's
 * paths; the unit has the hardening asked of it; the plist is a property list launchd can read
 * (checked by a strict reader, and by python3's plistlib where python3 is installed).
 */
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { DEPLOY_EXAMPLE as AGENT_EXAMPLE, renderAgentPlist } from "../../agent/service.ts";
import { DEPLOY_EXAMPLE as PROXY_EXAMPLE, renderProxyUnit, renderTmpfiles } from "../../proxy/service.ts";
import { PACKAGE_ROOT } from "../../shared/paths.ts";
import { DEPLOY_FILES } from "../../testbed/deploy-files.ts";
import { parsePlist, plistlib } from "../../testbed/plist.ts";

test("deploy/ holds the install commands' rendering (node --import tsx scripts/render-deploy.ts rewrites it)", () => {
  for (const [file, render] of Object.entries(DEPLOY_FILES)) assert.equal(readFileSync(join(PACKAGE_ROOT, file), "utf8"), render(), file);
});

test("the unit: reload by SIGHUP, exec start, the hardening, the user model of deploy/EC2.md", () => {
  const unit = renderProxyUnit({ ...PROXY_EXAMPLE, agents: ["ownermac", "laptop"] });
  const directives = new Map<string, string[]>();
  for (const line of unit.split("\n")) {
    const m = /^([A-Za-z]+)=(.*)$/.exec(line);
    if (m) directives.set(m[1], [...(directives.get(m[1]) ?? []), m[2]]);
  }
  const one = (k: string) => {
    assert.equal(directives.get(k)?.length, 1, `${k} set once`);
    return directives.get(k)![0];
  };
  assert.equal(one("ExecReload"), "/bin/kill -HUP $MAINPID");
  assert.equal(one("Type"), "exec");
  assert.equal(one("User"), "xks-proxy");
  assert.equal(one("Group"), "xks-proxy");
  assert.equal(one("SupplementaryGroups"), "xks-t-ownermac xks-t-laptop");
  assert.equal(
    one("ExecStart"),
    "/usr/bin/node --max-semi-space-size=32 /opt/xks/bin/xks-proxy.js serve --config /etc/xks-proxy/proxy.json",
  );
  const wanted: Record<string, string> = {
    UMask: "0077",
    SystemCallFilter: "@system-service",
    ProtectClock: "yes",
    ProtectHostname: "yes",
    RestrictSUIDSGID: "yes",
    RestrictRealtime: "yes",
    ProtectProc: "invisible",
    NoNewPrivileges: "yes",
    ProtectSystem: "strict",
    ProtectHome: "yes",
    PrivateTmp: "yes",
    PrivateDevices: "yes",
    ProtectKernelTunables: "yes",
    ProtectKernelModules: "yes",
    ProtectKernelLogs: "yes",
    ProtectControlGroups: "yes",
    RestrictAddressFamilies: "AF_UNIX AF_INET AF_INET6",
    RestrictNamespaces: "yes",
    LockPersonality: "yes",
    SystemCallArchitectures: "native",
    CapabilityBoundingSet: "",
    ReadOnlyPaths: "/etc/xks-proxy",
  };
  for (const [k, v] of Object.entries(wanted)) assert.equal(one(k), v, k);
  assert.equal(directives.has("MemoryDenyWriteExecute"), false, "V8's JIT needs executable mappings");
  assert.equal(
    renderTmpfiles({ agents: ["ownermac", "laptop"] }),
    [
      "# /etc/tmpfiles.d/xks.conf: the folders sshd creates the agents' sockets in.",
      "# One line per agent: owned by that agent's tunnel user, its group (which the",
      "# proxy's user joins) may enter, nobody else may. /run/xks itself is root's.",
      "d /run/xks          0755 root           root           -",
      "d /run/xks/ownermac 0750 xks-t-ownermac xks-t-ownermac -",
      "d /run/xks/laptop   0750 xks-t-laptop   xks-t-laptop   -",
      "",
    ].join("\n"),
  );
});

test("the plist: a LaunchAgent and a LaunchDaemon parse, with absolute paths, escaped text, no '--' in comments", () => {
  const agent = renderAgentPlist({ ...AGENT_EXAMPLE, config: "/Users/USER/a&b <x>/agent.json" });
  const parsed = parsePlist(agent) as Record<string, unknown>;
  assert.deepEqual(parsed.ProgramArguments, [
    "/opt/homebrew/bin/node",
    "--max-semi-space-size=32",
    "/Users/USER/xks/bin/xks-agent.js",
    "run",
    "--config",
    "/Users/USER/a&b <x>/agent.json",
  ]);
  assert.equal(parsed.WorkingDirectory, "/Users/USER/a&b <x>");
  assert.deepEqual(parsed.EnvironmentVariables, { SOFTHSM2_CONF: "/Users/USER/.config/xks-agent/softhsm2.conf" });
  assert.deepEqual(parsed.KeepAlive, { SuccessfulExit: false });
  assert.equal(parsed.RunAtLoad, true);
  assert.equal(parsed.UserName, undefined);
  const py = plistlib(agent);
  if (py !== undefined) assert.deepEqual(py, parsed);

  const daemon = parsePlist(renderAgentPlist({ ...AGENT_EXAMPLE, daemonUser: "owner", softhsmConf: undefined })) as Record<string, unknown>;
  assert.equal(daemon.UserName, "owner");
  assert.deepEqual(daemon.EnvironmentVariables, {});
  // The reader is strict: what launchd would refuse, it refuses.
  assert.throws(() => parsePlist(agent.replace("<!-- Restart", "<!-- -- Restart")), /"--" inside a comment/);
  assert.throws(() => parsePlist(agent.replace("<true/>", "<yes/>")), /unknown tag <yes>/);
  assert.throws(() => parsePlist(agent.replace("</array>", "")), /plist:/);
});
