/**
 * The agent's config file (JSON), validated once at start. Every problem is
 * reported at once with the file and the field. Secrets (the PIN, the proxy
 * token, SSH private keys) are references: {"file": …} | {"env": …} |
 * {"keychain": {"service", "account"}} (macOS), never inline and never logged.
 *
 * {
 *   "agentId": "owner-mac",                       // default: the host name
 *   "pkcs11": { "module": "/usr/lib/softhsm/libsofthsm2.so", "tokenLabel": "xks", "pin": {"file": "pin"} },
 *   "socket": "run/agent.sock",                    // gRPC Unix socket; its folder is made private (0700)
 *   "proxyToken": {"file": "agent-token"},         // the credential the proxy presents on every call
 *   "healthKey": "xks-health",                     // dedicated key for the deep health check
 *   "ciphertextMetadata": "xks-agent/1",           // returned by Encrypt, <= 20 bytes (UTF-8)
 *   "stateFile": "state/controls.json",            // the owner's pause switch and disabled keys
 *   "auditLog": "state/audit.log",                 // hash-chained record of every operation
 *   "dashboard": { "port": 7420 },                 // optional local dashboard on 127.0.0.1
 *   "tunnels": [ { "name": "ec2-a", "host": "ec2.example.com", "port": 22, "username": "xks-tunnel",
 *                  "privateKey": {"file": "id_ed25519"}, "hostKeyFingerprint": "SHA256:…",
 *                  "remoteSocket": "/run/xks/agent.sock" } ],   // or "remoteTcp": {"host": "127.0.0.1", "port": 7000}
 *   "maxQueued": 256,                              // key operations waiting at most, 1..100000; more -> THROTTLING (429)
 *   "log": { "level": "info" }
 * }
 */
import { hostname } from "node:os";
import { Checker, deepFreeze, readJsonFile } from "../shared/config.ts";
import type { LogLevel } from "../shared/logging.ts";
import { EXTERNAL_KEY_ID_RE, MAX_CIPHERTEXT_METADATA_BYTES } from "../shared/xks-spec.ts";
import type { TunnelTarget } from "./tunnel.ts";

export interface AgentConfig {
  file: string;
  agentId: string;
  pkcs11: { module: string; tokenLabel: string; pin: string };
  socket: string;
  proxyToken: string;
  healthKey: string;
  ciphertextMetadata: Buffer;
  stateFile: string;
  auditLog: string;
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
    "healthKey",
    "ciphertextMetadata",
    "stateFile",
    "auditLog",
    "dashboard",
    "tunnels",
    "maxQueued",
    "log",
  ]);
  const p = c.object(root.pkcs11, "pkcs11");
  c.noUnknown(p, "pkcs11", ["module", "tokenLabel", "pin"]);
  const pkcs11 = {
    module: c.path(p, "module", "pkcs11"),
    tokenLabel: c.string(p, "tokenLabel", "pkcs11", { min: 1, max: 32 }),
    pin: c.secret(p, "pin", "pkcs11", env),
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
      "hostKeyFingerprint",
      "remoteSocket",
      "remoteTcp",
      "keepaliveIntervalMs",
    ]);
    const target: TunnelTarget = {
      name: c.string(o, "name", f, { default: `tunnel-${i}` }),
      host: c.string(o, "host", f, { min: 1 }),
      port: c.int(o, "port", f, { default: 22, min: 1, max: 65535 }),
      username: c.string(o, "username", f, { min: 1 }),
      privateKey: c.secret(o, "privateKey", f, env),
      hostKeyFingerprint: c.string(o, "hostKeyFingerprint", f, {
        pattern: /^SHA256:[A-Za-z0-9+/]{43}$/,
        hint: "SHA256:<43 base64 characters>, as printed by ssh-keygen -lf <host key>.pub",
      }),
      keepaliveIntervalMs: c.int(o, "keepaliveIntervalMs", f, { default: 5000, min: 500, max: 600000 }),
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
  const log = c.object(root.log ?? {}, "log");
  const cfg: AgentConfig = {
    file,
    agentId: c.string(root, "agentId", "", { default: hostname(), pattern: /^[\x21-\x7e]{1,64}$/, hint: "1-64 printable characters" }),
    pkcs11,
    socket: c.path(root, "socket", ""),
    proxyToken: c.secret(root, "proxyToken", "", env),
    healthKey: c.string(root, "healthKey", "", {
      default: "xks-health",
      pattern: EXTERNAL_KEY_ID_RE,
      hint: "a key label of [a-zA-Z0-9._-]",
    }),
    ciphertextMetadata,
    stateFile: c.path(root, "stateFile", "", "state/controls.json"),
    auditLog: c.path(root, "auditLog", "", "state/audit.log"),
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
