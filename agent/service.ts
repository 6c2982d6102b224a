/**
 * The agent's launchd job, rendered for a machine: `xks-agent install`
 * renders it with this machine's node, this package's bin/xks-agent.js, the
 * config and SOFTHSM2_CONF; deploy/com.example.xks-agent.plist is the same
 * rendering for example paths (a test keeps them equal).
 *
 * A LaunchAgent (~/Library/LaunchAgents, the gui/UID domain) runs while the
 * user is logged in and can read the login Keychain; a LaunchDaemon
 * (/Library/LaunchDaemons, the system domain, with UserName) runs from boot
 * without a login and cannot, so its secrets must be files.
 */
import { dirname, join } from "node:path";
import type { ServiceFile } from "../shared/install.ts";

export interface AgentServiceOptions {
  label: string;
  /** The node binary (absolute; launchd uses no PATH). */
  node: string;
  /** bin/xks-agent.js of the installed package (absolute). */
  bin: string;
  /** The agent's config file (absolute). */
  config: string;
  /** SOFTHSM2_CONF for the job, when the token is a SoftHSM one. */
  softhsmConf?: string;
  /** The user's home folder (the log goes to HOME/Library/Logs). */
  home: string;
  /** A LaunchDaemon running as this user, instead of a LaunchAgent. */
  daemonUser?: string;
}

const escapeXml = (s: string) => s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
/** XML forbids "--" inside a comment: paths named in the header comment are written with it broken up. */
const inComment = (s: string) => escapeXml(s).replace(/--/g, "-\u2010");
const str = (s: string) => `<string>${escapeXml(s)}</string>`;

export function plistPath(o: Pick<AgentServiceOptions, "label" | "home" | "daemonUser">): string {
  return o.daemonUser !== undefined
    ? join("/Library/LaunchDaemons", `${o.label}.plist`)
    : join(o.home, "Library/LaunchAgents", `${o.label}.plist`);
}

/** The launchctl domain the job goes into. */
export function launchdDomain(o: Pick<AgentServiceOptions, "daemonUser">, uid: number): string {
  return o.daemonUser !== undefined ? "system" : `gui/${uid}`;
}

export function renderAgentPlist(o: AgentServiceOptions): string {
  const path = plistPath(o);
  const domain = o.daemonUser !== undefined ? "system" : "gui/$(id -u)";
  const log = join(o.home, "Library/Logs/xks-agent.log");
  const env = o.softhsmConf !== undefined ? { SOFTHSM2_CONF: o.softhsmConf } : {};
  return `<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<!--
  launchd ${o.daemonUser !== undefined ? "daemon" : "user agent"} for the XKS agent (owner's Mac), written by \`xks-agent install\`,
  which also loads it: launchctl bootstrap ${domain} ${inComment(path)}
  Restart:  launchctl kickstart -k ${domain}/${inComment(o.label)}
  Stop:     launchctl bootout ${domain}/${inComment(o.label)}
  Every path is absolute: launchd expands neither ~ nor PATH.
${
  o.daemonUser !== undefined
    ? "  A daemon runs from boot without a login: its secrets must be files (it cannot read the login Keychain).\n"
    : "  A user agent runs in the login session, so the PIN can come from the login Keychain:\n" +
      '  "pin": {"keychain": {"service": "xks-agent", "account": "softhsm"}}.\n'
}-->
<plist version="1.0">
<dict>
  <key>Label</key>${str(o.label)}
  <key>ProgramArguments</key>
  <array>
    ${str(o.node)}
    ${str("--max-semi-space-size=32")}
    ${str(o.bin)}
    ${str("run")}
    ${str("--config")}
    ${str(o.config)}
  </array>${o.daemonUser !== undefined ? `\n  <key>UserName</key>${str(o.daemonUser)}` : ""}
  <key>WorkingDirectory</key>${str(dirname(o.config))}
  <key>EnvironmentVariables</key>
  <dict>${Object.entries(env)
    .map(([k, v]) => `\n    <key>${k}</key>${str(v)}`)
    .join("")}
  </dict>
  <key>RunAtLoad</key><true/>
  <!-- Restart after a crash, not after a clean stop. -->
  <key>KeepAlive</key><dict><key>SuccessfulExit</key><false/></dict>
  <key>ThrottleInterval</key><integer>5</integer>
  <!-- Latency-sensitive: KMS gives every call 250 ms. -->
  <key>ProcessType</key><string>Interactive</string>
  <key>StandardOutPath</key>${str(log)}
  <key>StandardErrorPath</key>${str(log)}
</dict>
</plist>
`;
}

export function agentServiceFiles(o: AgentServiceOptions): ServiceFile[] {
  return [{ path: plistPath(o), content: renderAgentPlist(o), mode: 0o644 }];
}

/** The example paths deploy/com.example.xks-agent.plist is rendered with. */
export const DEPLOY_EXAMPLE: AgentServiceOptions = {
  label: "com.example.xks-agent",
  node: "/opt/homebrew/bin/node",
  bin: "/Users/USER/xks/bin/xks-agent.js",
  config: "/Users/USER/.config/xks-agent/agent.json",
  softhsmConf: "/Users/USER/.config/xks-agent/softhsm2.conf",
  home: "/Users/USER",
};
