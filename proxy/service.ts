/**
 * The proxy's systemd unit and tmpfiles.d entry, rendered for a machine:
 * `xks-proxy install` renders them with this machine's node and package, and
 * deploy/xks-proxy.service and deploy/xks-run.conf are the same rendering for
 * the paths deploy/EC2.md uses (a test keeps them equal).
 *
 * The user model (deploy/EC2.md): the proxy runs as its own user `xks-proxy`;
 * each agent `ID` has a tunnel user and group `xks-t-ID` that owns the folder
 * /run/xks/ID sshd makes the agent's socket in (0750); the proxy joins each
 * agent's group (SupplementaryGroups), so it may connect to the socket but not
 * replace it.
 */
import { dirname } from "node:path";
import type { ServiceFile } from "../shared/install.ts";

export interface ProxyServiceOptions {
  /** The node binary (absolute). */
  node: string;
  /** bin/xks-proxy.js of the installed package (absolute). */
  bin: string;
  /** The proxy's config file (absolute). */
  config: string;
  /** The agents' ids: each has the tunnel user and group xks-t-ID and the socket folder /run/xks/ID. */
  agents: string[];
  user: string;
}

export const UNIT_PATH = "/etc/systemd/system/xks-proxy.service";
export const TMPFILES_PATH = "/etc/tmpfiles.d/xks.conf";

/** An agent id as it may appear in a user name and a path. */
export const AGENT_ID_RE = /^[a-z][a-z0-9-]{0,22}$/;

export const tunnelUser = (agent: string) => `xks-t-${agent}`;

export function renderProxyUnit(o: ProxyServiceOptions): string {
  return `# systemd unit for the XKS proxy on EC2, behind an ALB that terminates TLS.
# Rendered by \`xks-proxy install\` (which writes it to ${UNIT_PATH}); then
#   systemctl daemon-reload && systemctl enable --now xks-proxy
# The proxy runs as its own user; it joins each agent's socket group (one
# SupplementaryGroups entry per agent, deploy/EC2.md step 1), so it can connect
# to the socket sshd makes for that agent's forward (0660) but not replace it.
[Unit]
Description=AWS KMS XKS proxy (forwards to the owner's HSM agent over an SSH reverse tunnel)
After=network-online.target sshd.service
Wants=network-online.target

[Service]
# Node cannot notify systemd of readiness by itself; exec: started once node has been executed.
Type=exec
User=${o.user}
Group=${o.user}
SupplementaryGroups=${o.agents.map(tunnelUser).join(" ")}
# A 32 MiB young generation: per-request garbage is collected far more cheaply (README, Performance).
ExecStart=${o.node} --max-semi-space-size=32 ${o.bin} serve --config ${o.config}
# SIGHUP reloads credentials, allow-lists and identities from the same file (bad file: kept as it was).
ExecReload=/bin/kill -HUP $MAINPID
Restart=on-failure
RestartSec=1
# Secrets (SigV4 secrets, the agent token, the identity key) are 0600 files of this user;
# anything else is refused at start.
ReadOnlyPaths=${dirname(o.config)}
UMask=0077
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectClock=yes
ProtectHostname=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectProc=invisible
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
RestrictNamespaces=yes
RestrictSUIDSGID=yes
RestrictRealtime=yes
LockPersonality=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallErrorNumber=EPERM
CapabilityBoundingSet=
# Do NOT set MemoryDenyWriteExecute=yes: V8's JIT needs executable mappings.

[Install]
WantedBy=multi-user.target
`;
}

export function renderTmpfiles(o: Pick<ProxyServiceOptions, "agents">): string {
  const w = Math.max(...o.agents.map((a) => `/run/xks/${a}`.length), "/run/xks".length);
  const u = Math.max(...o.agents.map((a) => tunnelUser(a).length), "root".length);
  const line = (path: string, mode: string, user: string) => `d ${path.padEnd(w)} ${mode} ${user.padEnd(u)} ${user.padEnd(u)} -`;
  return [
    `# ${TMPFILES_PATH}: the folders sshd creates the agents' sockets in.`,
    "# One line per agent: owned by that agent's tunnel user, its group (which the",
    "# proxy's user joins) may enter, nobody else may. /run/xks itself is root's.",
    line("/run/xks", "0755", "root"),
    ...o.agents.map((a) => line(`/run/xks/${a}`, "0750", tunnelUser(a))),
    "",
  ].join("\n");
}

/** The files `xks-proxy install` writes. */
export function proxyServiceFiles(o: ProxyServiceOptions): ServiceFile[] {
  return [
    { path: UNIT_PATH, content: renderProxyUnit(o), mode: 0o644 },
    { path: TMPFILES_PATH, content: renderTmpfiles(o), mode: 0o644 },
  ];
}

/** The paths deploy/EC2.md uses: the files under deploy/ are this rendering. */
export const DEPLOY_EXAMPLE: ProxyServiceOptions = {
  node: "/usr/bin/node",
  bin: "/opt/xks/bin/xks-proxy.js",
  config: "/etc/xks-proxy/proxy.json",
  agents: ["ownermac"],
  user: "xks-proxy",
};
