/**
 * `xks-agent init`: a first setup from nothing, in the config file's folder.
 *
 *   softhsm2.conf, tokens/   with --softhsm-init: a SoftHSM token of its own, made through
 *                            PKCS#11 (C_InitToken, C_InitPIN), so no PIN is ever on a command line
 *   pin, so-pin              the generated PINs (0600), or items in the macOS Keychain
 *   agent-token              the credential the proxy presents (0600; the proxy gets a copy)
 *   agent-identity.key/.crt  this agent's channel identity (the key 0600)
 *   id_ed25519, .pub         the SSH key the tunnel logs in with (0600)
 *   agent.json               the config, with safe defaults (no dashboard, state and audit in the folder)
 *
 * then the KMS key, the health key and the audit key on the token (the agent's own key creation),
 * and the preflight (`check`). No secret is printed: files are named, values never.
 * Nothing that exists is overwritten: an existing file stops init before anything is written.
 */
import { execFileSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { copyFileSync, existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { hostname } from "node:os";
import { dirname, isAbsolute, join, resolve } from "node:path";
import pkcs11js from "pkcs11js"; // NOT `import * as`: under ESM that loses every constant
import ssh2 from "ssh2";
import { CommandFailure, UsageError } from "../shared/cli.ts";
import { AgentError } from "../shared/errors.ts";
import { writeNewIdentity } from "../shared/identity.ts";
import { createLogger } from "../shared/logging.ts";
import { FINGERPRINT_RE } from "../shared/identity.ts";
import { type CheckOutcome, runChecks } from "./check.ts";
import { Hsm } from "./hsm/hsm.ts";
import { createAuditKey, createKey } from "./keys.ts";

/** Where SoftHSM v2's module is on Debian/Ubuntu (amd64, arm64) and Homebrew (Apple silicon, Intel). */
export const SOFTHSM_MODULES = [
  "/usr/lib/softhsm/libsofthsm2.so",
  "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
  "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
  "/opt/homebrew/lib/softhsm/libsofthsm2.so",
  "/usr/local/lib/softhsm/libsofthsm2.so",
];

export interface InitOptions {
  config: string;
  softhsmInit: boolean;
  module?: string;
  tokenLabel: string;
  /** With an existing token: the file holding its user PIN. */
  pinFile?: string;
  pinStore: "file" | "keychain";
  agentId?: string;
  keyStore: string;
  key: string;
  proxyIdentity?: string;
  tunnelHost?: string;
  tunnelPort: number;
  tunnelUser?: string;
  hostKeyFingerprint?: string;
}

export interface InitResult {
  /** Items of the final check that failed for a reason a first setup expects (no EC2 host or proxy identity yet). */
  pending: CheckOutcome[];
  /** Items that failed for any other reason. */
  failed: CheckOutcome[];
}

const HEALTH_KEY = "xks-health";
const AUDIT_KEY = "xks-audit";
const KEYCHAIN_SERVICE = "xks-agent";

/** An agent id fit for a user name and a path (the proxy's install makes xks-t-ID and /run/xks/ID of it). */
export function defaultAgentId(): string {
  const h = hostname()
    .split(".")[0]
    .toLowerCase()
    .replace(/[^a-z0-9-]/g, "-")
    .replace(/^[^a-z]+/, "");
  return (h || "agent").slice(0, 23);
}

const newSecret = () => randomBytes(24).toString("base64url");

function writeSecret(path: string, value: string): void {
  writeFileSync(path, `${value}\n`, { mode: 0o600, flag: "wx" });
}

/** Stores a secret as a generic password in the login Keychain; the value goes through stdin, never argv. */
function keychainStore(account: string, value: string): void {
  execFileSync("/usr/bin/security", ["-i"], {
    input: `add-generic-password -U -a ${account} -s ${KEYCHAIN_SERVICE} -w ${value}\n`,
    stdio: ["pipe", "ignore", "pipe"],
  });
}

/** Makes a SoftHSM v2 configuration with its own token folder (the test-bed's settings). */
function writeSoftHsmConf(dir: string): string {
  const tokens = join(dir, "tokens");
  mkdirSync(tokens, { mode: 0o700 });
  const conf = join(dir, "softhsm2.conf");
  writeFileSync(
    conf,
    [`directories.tokendir = ${tokens}`, "objectstore.backend = file", "log.level = ERROR", "slots.removable = false", ""].join("\n"),
    { flag: "wx" },
  );
  return conf;
}

/** Initialises the first free token of `module` as `label` with the SO PIN, and sets its user PIN. */
function initToken(module: string, label: string, soPin: string, pin: string): void {
  const p = new pkcs11js.PKCS11();
  p.load(module);
  p.C_Initialize();
  try {
    const free = p.C_GetSlotList(true).find((s) => (p.C_GetTokenInfo(s).flags & pkcs11js.CKF_TOKEN_INITIALIZED) === 0);
    if (free === undefined) throw new CommandFailure(`${module} has no free token slot to initialise`);
    // CK_UTF8CHAR label[32], blank-padded (pkcs11js would pad a shorter string with NULs).
    p.C_InitToken(free, soPin, label.padEnd(32, " "));
    // The slot keeps the token until C_Finalize (SoftHSM numbers it anew in the next session).
    const session = p.C_OpenSession(free, pkcs11js.CKF_SERIAL_SESSION | pkcs11js.CKF_RW_SESSION);
    try {
      p.C_Login(session, pkcs11js.CKU_SO, soPin);
      p.C_InitPIN(session, pin);
      p.C_Logout(session);
    } finally {
      p.C_CloseSession(session);
    }
  } finally {
    p.C_Finalize();
    p.close();
  }
}

/** Creates the key unless the token has one with this label; says which. */
function ensureKey(hsm: Hsm, label: string, create: () => unknown): string {
  try {
    hsm.key(label);
    return `key ${label} is on the token already (check verifies it)`;
  } catch (err) {
    if (!(err instanceof AgentError) || err.reason !== "KEY_NOT_FOUND") throw err;
  }
  create();
  return `created key ${label}`;
}

/** A failed check item a first setup expects: no EC2 host reachable yet, or no proxy certificate yet. */
function isPending(o: CheckOutcome): boolean {
  // A host that shows another host key is not "not set up yet": that stays a failure.
  if (/^tunnel .*has the pinned host key and accepts the key$/.test(o.item)) return !/^host key verification failed/.test(o.detail ?? "");
  if (o.item === "config is valid") {
    const problems = (o.detail ?? "").split("\n").filter((l) => l.trim().startsWith("- "));
    return problems.length > 0 && problems.every((l) => /- proxyIdentities\[\d\]: cannot read .* \(ENOENT\)/.test(l));
  }
  return false;
}

export function validateInit(o: InitOptions): void {
  if (o.softhsmInit && o.pinFile) throw new UsageError("--pin-file is for an existing token; --softhsm-init makes the PINs itself");
  if (!o.softhsmInit && !o.pinFile)
    throw new UsageError("give --softhsm-init (a new SoftHSM token) or --pin-file FILE (an existing token's PIN)");
  if (o.tokenLabel.length < 1 || Buffer.byteLength(o.tokenLabel) > 32) throw new UsageError("--token-label must be 1-32 bytes");
  if (o.pinStore === "keychain" && process.platform !== "darwin") throw new UsageError("--pin-store keychain is only available on macOS");
  if (o.agentId !== undefined && !/^[a-z][a-z0-9-]{0,22}$/.test(o.agentId))
    throw new UsageError("--agent-id must match [a-z][a-z0-9-]{0,22}");
  if (o.tunnelHost !== undefined && (o.hostKeyFingerprint === undefined || !FINGERPRINT_RE.test(o.hostKeyFingerprint)))
    throw new UsageError(
      "--tunnel-host needs --host-key-fingerprint SHA256:… (ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub on the host)",
    );
  if (o.tunnelHost === undefined && (o.hostKeyFingerprint !== undefined || o.tunnelUser !== undefined))
    throw new UsageError("--host-key-fingerprint and --tunnel-user need --tunnel-host");
}

export async function init(o: InitOptions, print: (line: string) => void): Promise<InitResult> {
  validateInit(o);
  const config = isAbsolute(o.config) ? o.config : resolve(o.config);
  const dir = dirname(config);
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const at = (name: string) => join(dir, name);
  const planned = [
    config,
    at("agent-token"),
    at("agent-identity.key"),
    at("agent-identity.crt"),
    at("id_ed25519"),
    at("id_ed25519.pub"),
    ...(o.proxyIdentity ? [at("proxy-identity.crt")] : []),
    ...(o.softhsmInit ? [at("softhsm2.conf"), at("tokens"), ...(o.pinStore === "file" ? [at("pin"), at("so-pin")] : [])] : []),
  ];
  const existing = planned.filter((p) => existsSync(p));
  if (existing.length > 0)
    throw new CommandFailure(`${existing.join(", ")} exist${existing.length === 1 ? "s" : ""} already; init writes nothing over them`);
  if (o.proxyIdentity && !existsSync(o.proxyIdentity)) throw new UsageError(`--proxy-identity ${o.proxyIdentity}: no such file`);
  const module = o.module ?? SOFTHSM_MODULES.find((m) => existsSync(m));
  if (module === undefined) throw new UsageError(`no SoftHSM module found (looked in ${SOFTHSM_MODULES.join(", ")}); give --module PATH`);
  const agentId = o.agentId ?? defaultAgentId();

  // 1. The token and its PINs.
  let pinRef: unknown;
  let pin: string;
  if (o.softhsmInit) {
    const conf = writeSoftHsmConf(dir);
    process.env.SOFTHSM2_CONF = conf;
    pin = newSecret();
    const soPin = newSecret();
    initToken(module, o.tokenLabel, soPin, pin);
    print(`initialised SoftHSM token ${JSON.stringify(o.tokenLabel)} in ${at("tokens")} (${conf})`);
    if (o.pinStore === "keychain") {
      keychainStore("softhsm", pin);
      keychainStore("softhsm-so", soPin);
      pinRef = { keychain: { service: KEYCHAIN_SERVICE, account: "softhsm" } };
      print(`stored the user PIN and the SO PIN in the login Keychain (service ${KEYCHAIN_SERVICE}, accounts softhsm, softhsm-so)`);
    } else {
      writeSecret(at("pin"), pin);
      writeSecret(at("so-pin"), soPin);
      pinRef = { file: "pin" };
      print(`wrote the user PIN to ${at("pin")} and the SO PIN to ${at("so-pin")} (0600; keep a copy of both offline)`);
    }
  } else {
    const file = resolve(o.pinFile!);
    pin = readFileSync(file, "utf8").replace(/\r?\n$/, "");
    pinRef = { file };
  }

  // 2. The keys, through the agent's own key creation.
  const hsm = new Hsm({ module, tokenLabel: o.tokenLabel, pin }, createLogger({ level: "silent" }));
  try {
    hsm.open();
    print(ensureKey(hsm, o.key, () => createKey(hsm, o.key, ["encrypt", "decrypt"])));
    print(ensureKey(hsm, HEALTH_KEY, () => createKey(hsm, HEALTH_KEY, ["encrypt", "decrypt"])));
    print(ensureKey(hsm, AUDIT_KEY, () => createAuditKey(hsm, AUDIT_KEY)));
  } finally {
    hsm.close();
  }

  // 3. The agent token, the channel identity, the SSH key.
  writeSecret(at("agent-token"), newSecret());
  print(`wrote ${at("agent-token")} (0600): the proxy needs a copy, 0600, named by its agents[].token`);
  // The identity's lines but the one about this config's "identity" field, which init writes itself.
  for (const line of writeNewIdentity(at("agent-identity"), "agent", `xks-agent ${agentId}`))
    if (!line.startsWith("this agent's config")) print(line);
  const ssh = ssh2.utils.generateKeyPairSync("ed25519", { comment: `xks-agent@${agentId}` });
  writeFileSync(at("id_ed25519"), ssh.private, { mode: 0o600, flag: "wx" });
  writeFileSync(at("id_ed25519.pub"), ssh.public, { mode: 0o644, flag: "wx" });
  print(`wrote the SSH key ${at("id_ed25519")} (0600); its line for the EC2 host's root-owned authorized_keys (deploy/EC2.md step 3):`);
  print(`  restrict,port-forwarding,command="/usr/sbin/nologin" ${ssh.public.trim()}`);
  if (o.proxyIdentity) copyFileSync(o.proxyIdentity, at("proxy-identity.crt"));

  // 4. The config.
  const tunnelUser = o.tunnelUser ?? `xks-t-${agentId}`;
  const cfg = {
    agentId,
    pkcs11: { module, tokenLabel: o.tokenLabel, pin: pinRef },
    socket: "run/agent.sock",
    proxyToken: { file: "agent-token" },
    identity: { key: { file: "agent-identity.key" }, certificate: "agent-identity.crt" },
    proxyIdentities: ["proxy-identity.crt"],
    healthKey: HEALTH_KEY,
    keyStores: [{ keyStore: o.keyStore, keys: [o.key] }],
    stateFile: "state/controls.json",
    audit: { dir: "state/audit", key: AUDIT_KEY },
    ...(o.tunnelHost !== undefined
      ? {
          tunnels: [
            {
              name: o.tunnelHost,
              host: o.tunnelHost,
              port: o.tunnelPort,
              username: tunnelUser,
              privateKey: { file: "id_ed25519" },
              hostKeyFingerprint: o.hostKeyFingerprint,
              remoteSocket: `/run/xks/${agentId}/agent.sock`,
            },
          ],
        }
      : {}),
    log: { level: "info" },
  };
  writeFileSync(config, `${JSON.stringify(cfg, null, 2)}\n`, { mode: 0o600, flag: "wx" });
  print(`wrote ${config}`);
  if (!o.proxyIdentity) print(`next: copy the proxy's certificate (xks-proxy identity new on the EC2 host) to ${at("proxy-identity.crt")}`);
  if (o.tunnelHost === undefined) print(`next: add a "tunnels" entry to ${config} once the EC2 host exists (README; deploy/EC2.md step 5)`);

  // 5. The preflight.
  print("");
  print(`xks-agent check --config ${config}:`);
  const outcomes = await runChecks(config, (line) => print(`  ${line}`));
  const failed = outcomes.filter((x) => x.result === "failed");
  const pending = failed.filter(isPending);
  for (const p of pending)
    print(
      p.item === "config is valid"
        ? "expected at this stage: the proxy's certificate is not here yet, so the items after the config were skipped"
        : `expected at this stage: ${p.item.replace(/: .*/, "")} is not reachable or not set up yet (deploy/EC2.md); run xks-agent check again then`,
    );
  return { pending, failed: failed.filter((x) => !isPending(x)) };
}
