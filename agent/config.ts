/**
 * The agent's config file (JSON), validated once at start. Every problem is
 * reported at once with the file and the field. Secrets (the PIN, the proxy
 * token, SSH private keys) are references: {"file": …} | {"env": …} |
 * {"keychain": {"service", "account"}} (macOS), never inline and never logged.
 * A secret file must be private to the user running the agent (mode 0600 or
 * stricter, owned by that user), as OpenSSH requires of private keys.
 *
 * {
 *   "agentId": "owner-mac",                       // default: the host name
 *   "pkcs11": { "module": "/usr/lib/softhsm/libsofthsm2.so", "tokenLabel": "xks", "pin": {"file": "pin"} },
 *   "socket": "run/agent.sock",                    // gRPC Unix socket; its folder is made private (0700)
 *   "proxyToken": {"file": "agent-token"},         // the credential the proxy presents on every call
 *   "identity": { "key": {"file": "agent-identity.key"}, "certificate": "agent-identity.crt" },
 *                                                  // this agent's TLS identity on the gRPC channel (`xks-agent identity new`)
 *   "proxyIdentities": ["proxy-identity.crt"],     // the proxy certificates accepted (1, or 2 while rotating)
 *   "healthKey": "xks-health",                     // dedicated key for the deep health check, never served to KMS
 *   "keyStores": [                                 // required, 1+: the ONLY keys KMS may use, per key store
 *     { "keyStore": "/example/prefix",             //   the proxy's uriPathPrefix of the key store ("" = no prefix), unique
 *       "keys": ["my-kms-key"] }                   //   labels (externalKeyIds), unique, never the health key
 *   ],
 *   "policy": "policy.json",                       // optional: the owner's rules on request metadata (agent/policy.ts),
 *                                                  //   reloaded when the file changes and on SIGHUP
 *   "ciphertextMetadata": "xks-agent/1",           // returned by Encrypt, <= 20 bytes (UTF-8)
 *   "stateFile": "state/controls.json",            // the owner's pause switch and disabled keys
 *   "audit": {                                     // the record of every key operation (agent/audit.ts)
 *     "dir": "state/audit",                        //   its segments (audit-NNNNNN.log); "auditLog" is an older name of this field
 *     "key": "xks-audit",                          //   label of the HMAC key on the token (`keys create --type audit`)
 *     "segmentKiB": 65536,                         //   a segment is closed past this size, and at the end of each UTC day
 *     "checkpointMs": 250,                         //   a sealed checkpoint at most this long after a record
 *     "fsync": "checkpoint",                       //   or "record": fdatasync at each checkpoint or after every record
 *     "keepDays": 400, "keepGiB": 50 },            //   optional retention: older / beyond this, closed segments are removed
 *   "dashboard": { "port": 7420 },                 // optional local dashboard on 127.0.0.1
 *   "tunnels": [ { "name": "ec2-a", "host": "ec2.example.com", "port": 22, "username": "xks-tunnel",
 *                  "privateKey": {"file": "id_ed25519"}, "hostKeyFingerprint": "SHA256:…",
 *                  "privateKeyPassphrase": {"keychain": {…}},   // optional, for a passphrase-protected key
 *                  "remoteSocket": "/run/xks/agent.sock",      // or "remoteTcp": {"host": "127.0.0.1", "port": 7000}
 *                  "reassertAfterMs": 30000 } ],                // silence after which the forward is taken back
 *   "maxQueued": 256,                              // key operations waiting at most, 1..100000; more -> THROTTLING (429)
 *   "log": { "level": "info" }
 * }
 */
import { hostname } from "node:os";
import ssh2 from "ssh2";
import { Checker, deepFreeze, readJsonFile } from "../shared/config.ts";
import type { OwnIdentity, PinnedIdentity } from "../shared/identity.ts";
import type { LogLevel } from "../shared/logging.ts";
import { EXTERNAL_KEY_ID_RE, EXTERNAL_KEY_ID_RULE, MAX_CIPHERTEXT_METADATA_BYTES, prefixProblem } from "../shared/xks-spec.ts";
import type { AuditSettings } from "./audit.ts";
import type { KeyStoreAllowList } from "./policy.ts";
import type { TunnelTarget } from "./tunnel.ts";

export interface AgentConfig {
  file: string;
  agentId: string;
  /** `pinFile`: the file the PIN was read from, when it is a file (re-read after the token refuses the PIN). */
  pkcs11: { module: string; tokenLabel: string; pin: string; pinFile?: string };
  socket: string;
  proxyToken: string;
  /** This agent's key and certificate on the gRPC channel, and its fingerprint. */
  identity: OwnIdentity & { fingerprint: string };
  /** The proxies' certificates this agent accepts (mutual TLS: a proxy without one of them gets nothing). */
  proxyIdentities: PinnedIdentity[];
  healthKey: string;
  /** What KMS may use, per key store (agent/policy.ts); nothing else is served. */
  keyStores: KeyStoreAllowList[];
  /** The policy file (agent/policy.ts), when the config names one. */
  policy?: string;
  ciphertextMetadata: Buffer;
  stateFile: string;
  audit: AuditSettings;
  dashboard?: { host: string; port: number };
  tunnels: TunnelTarget[];
  /** Key operations waiting at most (agent/admission.ts). */
  maxQueued: number;
  log: { level: LogLevel };
}

const LEVELS = /^(fatal|error|warn|info|debug|trace|silent)$/;

export function loadAgentConfig(file: string, env: NodeJS.ProcessEnv = process.env): AgentConfig {
  return parseAgentConfig(readJsonFile(file), file, env);
}

export function parseAgentConfig(raw: unknown, file: string, env: NodeJS.ProcessEnv = process.env): AgentConfig {
  const c = new Checker(file);
  const root = c.object(raw, "(root)");
  c.noUnknown(root, "", [
    "agentId",
    "pkcs11",
    "socket",
    "proxyToken",
    "identity",
    "proxyIdentities",
    "healthKey",
    "keyStores",
    "policy",
    "ciphertextMetadata",
    "stateFile",
    "auditLog",
    "audit",
    "dashboard",
    "tunnels",
    "maxQueued",
    "log",
  ]);
  const p = c.object(root.pkcs11, "pkcs11");
  c.noUnknown(p, "pkcs11", ["module", "tokenLabel", "pin"]);
  const pin = c.secretRef(p, "pin", "pkcs11", env);
  const pkcs11 = {
    module: c.path(p, "module", "pkcs11"),
    tokenLabel: c.string(p, "tokenLabel", "pkcs11", { min: 1, max: 32 }),
    pin: pin.value,
    ...(pin.file !== undefined ? { pinFile: pin.file } : {}),
  };
  const cmText = c.string(root, "ciphertextMetadata", "", { default: "xks-agent/1" });
  const ciphertextMetadata = Buffer.from(cmText, "utf8");
  if (ciphertextMetadata.length > MAX_CIPHERTEXT_METADATA_BYTES) {
    c.problem("ciphertextMetadata", `must be at most ${MAX_CIPHERTEXT_METADATA_BYTES} bytes (KMS rejects more)`);
  }
  const tunnels = c.array(root, "tunnels", "", { optional: true }).map((t, i) => {
    const f = `tunnels[${i}]`;
    const o = c.object(t, f);
    c.noUnknown(o, f, [
      "name",
      "host",
      "port",
      "username",
      "privateKey",
      "privateKeyPassphrase",
      "hostKeyFingerprint",
      "remoteSocket",
      "remoteTcp",
      "keepaliveIntervalMs",
      "reassertAfterMs",
    ]);
    const problemsBefore = c.problems.length;
    const privateKey = c.secret(o, "privateKey", f, env);
    const passphrase = c.optionalSecret(o, "privateKeyPassphrase", f, env);
    // The key is parsed only when both secrets could be read (a problem with either is already reported).
    const keyProblem = c.problems.length === problemsBefore ? privateKeyProblem(privateKey, passphrase) : undefined;
    if (keyProblem) c.problem(keyProblem.field === "key" ? `${f}.privateKey` : `${f}.privateKeyPassphrase`, keyProblem.msg);
    const target: TunnelTarget = {
      name: c.string(o, "name", f, { default: `tunnel-${i}` }),
      host: c.string(o, "host", f, { min: 1 }),
      port: c.int(o, "port", f, { default: 22, min: 1, max: 65535 }),
      username: c.string(o, "username", f, { min: 1 }),
      privateKey,
      ...(passphrase !== undefined ? { passphrase } : {}),
      hostKeyFingerprint: c.string(o, "hostKeyFingerprint", f, {
        pattern: /^SHA256:[A-Za-z0-9+/]{43}$/,
        hint: "SHA256:<43 base64 characters>, as printed by ssh-keygen -lf <host key>.pub",
      }),
      keepaliveIntervalMs: c.int(o, "keepaliveIntervalMs", f, { default: 5000, min: 500, max: 600000 }),
      reassertAfterMs: c.int(o, "reassertAfterMs", f, { default: 30_000, min: 1000, max: 600_000 }),
    };
    if (o.remoteSocket !== undefined && o.remoteTcp !== undefined) c.problem(f, 'give "remoteSocket" or "remoteTcp", not both');
    if (o.remoteTcp !== undefined) {
      const r = c.object(o.remoteTcp, `${f}.remoteTcp`);
      target.remoteTcp = {
        host: c.string(r, "host", `${f}.remoteTcp`, { default: "127.0.0.1" }),
        port: c.int(r, "port", `${f}.remoteTcp`, { min: 1, max: 65535 }),
      };
    } else {
      target.remoteSocket = c.string(o, "remoteSocket", f, { pattern: /^\//, hint: "an absolute path" });
    }
    return target;
  });
  let dashboard: AgentConfig["dashboard"];
  if (root.dashboard !== undefined) {
    const d = c.object(root.dashboard, "dashboard");
    c.noUnknown(d, "dashboard", ["host", "port"]);
    dashboard = {
      host: c.string(d, "host", "dashboard", {
        default: "127.0.0.1",
        pattern: /^(127\.\d+\.\d+\.\d+|localhost|::1)$/,
        hint: "a loopback address",
      }),
      port: c.int(d, "port", "dashboard", { default: 7420, min: 0, max: 65535 }),
    };
  }
  const healthKey = c.string(root, "healthKey", "", {
    default: "xks-health",
    pattern: EXTERNAL_KEY_ID_RE,
    hint: "a key label of [a-zA-Z0-9._-]",
  });
  const keyStores = parseKeyStores(c, root, healthKey);
  const audit = parseAudit(c, root);
  if (audit.key === healthKey) c.problem("audit.key", "is the health key (healthKey); the audit key is a key of its own");
  keyStores.forEach((s, i) => {
    const j = s.keys.indexOf(audit.key);
    if (j >= 0) c.problem(`keyStores[${i}].keys[${j}]`, "is the audit key (audit.key); the audit key is never served to KMS");
  });
  const log = c.object(root.log ?? {}, "log");
  const cfg: AgentConfig = {
    file,
    agentId: c.string(root, "agentId", "", { default: hostname(), pattern: /^[\x21-\x7e]{1,64}$/, hint: "1-64 printable characters" }),
    pkcs11,
    socket: c.path(root, "socket", ""),
    proxyToken: c.secret(root, "proxyToken", "", env),
    identity: c.identity(root, "identity", "", env) ?? { key: "", certificate: "", fingerprint: "" },
    proxyIdentities: c.pins(root, "proxyIdentities", ""),
    healthKey,
    keyStores,
    ...(root.policy !== undefined ? { policy: c.path(root, "policy", "") } : {}),
    ciphertextMetadata,
    stateFile: c.path(root, "stateFile", "", "state/controls.json"),
    audit,
    dashboard,
    tunnels,
    maxQueued: c.int(root, "maxQueued", "", { default: 256, min: 1, max: 100_000 }),
    log: { level: c.string(log, "level", "log", { default: "info", pattern: LEVELS }) as LogLevel },
  };
  if (cfg.proxyToken && cfg.proxyToken.length < 16) c.problem("proxyToken", "must be at least 16 characters");
  c.done();
  // The frozen config holds the secrets themselves (the PIN, the proxy token, SSH private keys),
  // for the HSM and the tunnels. It is never logged as a whole: log lines are built from named
  // fields only (runAgent's "starting" line names its fields), and the logger's `redact`
  // (shared/logging.ts) is the backstop for log-object fields named pin, token or privateKey.
  return deepFreeze(cfg);
}

/**
 * `keyStores`: required and non-empty, so that an agent never starts serving
 * keys nobody listed. Each key store at most once, each label at most once per
 * store; the health key is never listed.
 */
function parseKeyStores(c: Checker, root: Record<string, unknown>, healthKey: string): KeyStoreAllowList[] {
  const seen = new Set<string>();
  return c.array(root, "keyStores", "", { min: 1 }).map((s, i) => {
    const f = `keyStores[${i}]`;
    const o = c.object(s, f);
    c.noUnknown(o, f, ["keyStore", "keys"]);
    const keyStore = c.string(o, "keyStore", f, { hint: "the key store's uriPathPrefix in the proxy's config" });
    const problem = typeof o.keyStore === "string" ? prefixProblem(keyStore) : undefined;
    if (problem) c.problem(`${f}.keyStore`, `${problem} (the key store's uriPathPrefix in the proxy's config)`);
    else if (seen.has(keyStore)) c.problem(`${f}.keyStore`, `duplicate key store ${JSON.stringify(keyStore)}`);
    seen.add(keyStore);
    const keys = new Set<string>();
    c.array(o, "keys", f, { min: 1 }).forEach((k, j) => {
      const kf = `${f}.keys[${j}]`;
      if (typeof k !== "string" || !EXTERNAL_KEY_ID_RE.test(k))
        c.problem(kf, `must be a key label (externalKeyId): ${EXTERNAL_KEY_ID_RULE}`);
      else if (k === healthKey) c.problem(kf, `is the health key (healthKey); the health key is never served to KMS`);
      else if (keys.has(k)) c.problem(kf, `duplicate key ${JSON.stringify(k)}`);
      else keys.add(k);
    });
    return { keyStore, keys: [...keys] };
  });
}

/** `audit` (and its older `auditLog`, the directory alone). */
function parseAudit(c: Checker, root: Record<string, unknown>): AuditSettings {
  const a = c.object(root.audit ?? {}, "audit");
  c.noUnknown(a, "audit", ["dir", "key", "segmentKiB", "checkpointMs", "fsync", "keepDays", "keepGiB"]);
  if (root.auditLog !== undefined && a.dir !== undefined) c.problem("auditLog", 'give "audit.dir" only ("auditLog" is its older name)');
  const dir = a.dir !== undefined ? c.path(a, "dir", "audit") : c.path(root, "auditLog", "", "state/audit");
  const fsync = c.string(a, "fsync", "audit", {
    default: "checkpoint",
    pattern: /^(checkpoint|record)$/,
    hint: '"checkpoint" or "record"',
  });
  const keepGiB = a.keepGiB;
  if (keepGiB !== undefined && (typeof keepGiB !== "number" || !(keepGiB > 0))) c.problem("audit.keepGiB", "must be a number > 0");
  return {
    dir,
    key: c.string(a, "key", "audit", { default: "xks-audit", pattern: EXTERNAL_KEY_ID_RE, hint: "a key label of [a-zA-Z0-9._-]" }),
    segmentBytes: c.int(a, "segmentKiB", "audit", { default: 65536, min: 16, max: 4 << 20 }) * 1024,
    checkpointMs: c.int(a, "checkpointMs", "audit", { default: 250, min: 10, max: 1000 }),
    fsync: fsync as AuditSettings["fsync"],
    ...(a.keepDays !== undefined ? { keepDays: c.int(a, "keepDays", "audit", { min: 1 }) } : {}),
    ...(typeof keepGiB === "number" && keepGiB > 0 ? { keepBytes: Math.floor(keepGiB * 2 ** 30) } : {}),
  };
}

/**
 * Why ssh2 could not use this private key (with this passphrase), or undefined
 * when it parses as a private key. The answer never contains the key or the
 * passphrase.
 */
export function privateKeyProblem(
  key: string | Buffer,
  passphrase: string | undefined,
): { field: "key" | "passphrase"; msg: string } | undefined {
  const parsed = ssh2.utils.parseKey(key, passphrase);
  if (parsed instanceof Error) {
    const m = parsed.message;
    if (/no passphrase given/i.test(m))
      return { field: "passphrase", msg: 'the private key is passphrase-protected: give "privateKeyPassphrase" (a secret reference)' };
    if (/decrypt|bad passphrase|integrity check/i.test(m) && passphrase !== undefined)
      return { field: "passphrase", msg: "cannot decrypt the private key with this passphrase (wrong passphrase?)" };
    return { field: "key", msg: `cannot parse the private key (${m.replace(/[^\x20-\x7e]/g, "?").slice(0, 120)})` };
  }
  const key0 = Array.isArray(parsed) ? parsed[0] : parsed;
  if (!key0?.isPrivateKey())
    return { field: "key", msg: "is a public key, not a private key: give the private key file (e.g. id_ed25519, not id_ed25519.pub)" };
  return undefined;
}
