/**
 * Config files for the agent and the proxy, written as an operator would:
 * JSON with every secret in a 0600 file of its own, referenced by path.
 */
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import type { SoftHsmToken } from "./hsm.ts";
import type { Creds } from "./xks/sign.ts";

/** Writes `value` to `dir/name` (0600) and returns the config's reference to it. */
export function secretFile(dir: string, name: string, value: string): { file: string } {
  writeFileSync(join(dir, name), `${value}\n`, { mode: 0o600 });
  return { file: name };
}

export interface AgentConfigOptions {
  token: SoftHsmToken;
  /** The credential the proxy presents on every call. */
  proxyToken: string;
  agentId?: string;
  healthKey?: string;
  /** Any other top-level fields (tunnels, dashboard, log, …), written as given. */
  extra?: Record<string, unknown>;
}

/** Writes `dir/agent.json` (socket, state and audit log inside `dir`) and its secret files; returns the config file. */
export function writeAgentConfig(dir: string, o: AgentConfigOptions): string {
  const file = join(dir, "agent.json");
  const config = {
    agentId: o.agentId ?? "test-agent",
    pkcs11: { module: o.token.module, tokenLabel: o.token.tokenLabel, pin: secretFile(dir, "pin", o.token.pin) },
    socket: "run/agent.sock",
    proxyToken: secretFile(dir, "agent-token", o.proxyToken),
    healthKey: o.healthKey ?? "xks-health",
    stateFile: "state/controls.json",
    auditLog: "state/audit.log",
    ...o.extra,
  };
  writeFileSync(file, JSON.stringify(config, null, 2));
  return file;
}

/** An agent as the proxy's config names it. */
export interface AgentEntry {
  id: string;
  /** grpc-js target: `unix:///abs/path.sock` or `host:port`. */
  target: string;
  token: string;
}

/** One KMS external key store served by the proxy. */
export interface KeyStoreEntry {
  prefix: string;
  credentials: Creds[];
  keys: string[];
  /** The store's request quota (token bucket), if any. */
  quota?: { rate: number; burst: number };
}

export interface ProxyConfigOptions {
  agents: AgentEntry[];
  keyStores: KeyStoreEntry[];
  /** Default 0: any free port. */
  port?: number;
  region?: string;
  /** Any other top-level fields (deadlines, http, log, …), written as given. */
  extra?: Record<string, unknown>;
}

/** Writes `dir/proxy.json` and its secret files; returns the config file. */
export function writeProxyConfig(dir: string, o: ProxyConfigOptions): string {
  let n = 0;
  const config = {
    listen: { host: "127.0.0.1", port: o.port ?? 0 },
    region: o.region ?? "us-east-1",
    agents: o.agents.map((a, i) => ({ id: a.id, target: a.target, token: secretFile(dir, `agent-token-${i}`, a.token) })),
    keyStores: o.keyStores.map((s) => ({
      uriPathPrefix: s.prefix,
      credentials: s.credentials.map((c) => ({
        accessKeyId: c.accessKeyId,
        secretAccessKey: secretFile(dir, `sigv4-${n++}.secret`, c.secretAccessKey),
      })),
      keys: s.keys,
      ...(s.quota ? { quota: s.quota } : {}),
    })),
    ...o.extra,
  };
  const file = join(dir, "proxy.json");
  writeFileSync(file, JSON.stringify(config, null, 2));
  return file;
}

/** Two live credentials for the main test store (rotation), one for the second store. */
export const CREDS = {
  a: { accessKeyId: "AAAAAAAAAAAAAAAAAAAAAAAAAA", secretAccessKey: "c2VjcmV0LWEtc2VjcmV0LWEtc2VjcmV0LWEtc2VjcmV0LWE=" },
  b: { accessKeyId: "BBBBBBBBBBBBBBBBBBBBBBBB22", secretAccessKey: "c2VjcmV0LWItc2VjcmV0LWItc2VjcmV0LWItc2VjcmV0LWI=" },
  other: { accessKeyId: "CCCCCCCCCCCCCCCCCCCCCCCC77", secretAccessKey: "c2VjcmV0LWMtc2VjcmV0LWMtc2VjcmV0LWMtc2VjcmV0LWM=" },
} satisfies Record<string, Creds>;

export const PREFIX = "/example/uri/path/prefix";
export const OTHER_PREFIX = "/tenant-two/xks";
/** The main test store's URI path. */
export const API = `${PREFIX}/kms/xks/v1`;

/** The test key stores: PREFIX (credentials a and b, `keys`) and OTHER_PREFIX (credential other, key foo). */
export function testKeyStores(keys: string[] = ["foo"]): KeyStoreEntry[] {
  return [
    { prefix: PREFIX, credentials: [CREDS.a, CREDS.b], keys },
    { prefix: OTHER_PREFIX, credentials: [CREDS.other], keys: ["foo"] },
  ];
}
