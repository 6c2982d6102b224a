/**
 * Config files for the agent and the proxy, written as an operator would:
 * JSON with every secret in a 0600 file of its own, referenced by path.
 */
import { chmodSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import type { KeyStoreAllowList } from "../agent/policy.ts";
import { kmsKeys, type SoftHsmToken, TEST_KEYS } from "./hsm.ts";
import { type Identity, TEST_IDENTITIES, writeIdentity, writePins } from "./identities.ts";
import type { Creds } from "./xks/sign.ts";

/** Writes `value` to `dir/name` (0600, also when the file was there before) and returns the config's reference to it. */
export function secretFile(dir: string, name: string, value: string): { file: string } {
  writeFileSync(join(dir, name), `${value}\n`, { mode: 0o600 });
  chmodSync(join(dir, name), 0o600); // `mode` applies only when the file is created
  return { file: name };
}

export interface AgentConfigOptions {
  token: SoftHsmToken;
  /** The credential the proxy presents on every call. */
  proxyToken: string;
  agentId?: string;
  healthKey?: string;
  /** The agent's own channel identity (default TEST_IDENTITIES.agent). */
  identity?: Identity;
  /** The proxy identities it accepts (default [TEST_IDENTITIES.proxy]). */
  proxyIdentities?: Identity[];
  /** The agent's allow-lists; default: every KMS key of the test key set for each test key store (testAgentKeyStores). */
  keyStores?: KeyStoreAllowList[];
  /** The agent's worker processes (`workers`; the agent's default, 1, when not given). */
  workers?: number | "auto";
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
    identity: writeIdentity(dir, "agent-identity", o.identity ?? TEST_IDENTITIES.agent),
    proxyIdentities: writePins(dir, "pinned-proxy", o.proxyIdentities ?? [TEST_IDENTITIES.proxy]),
    healthKey: o.healthKey ?? "xks-health",
    keyStores: o.keyStores ?? testAgentKeyStores(),
    stateFile: "state/controls.json",
    audit: { dir: "state/audit" },
    ...(o.workers !== undefined ? { workers: o.workers } : {}),
    ...o.extra,
  };
  writeFileSync(file, JSON.stringify(config, null, 2));
  return file;
}

/**
 * The smallest valid agent config as an object (for tests of config parsing):
 * its secret files (0600), identity and pins written into `dir`, one key store
 * allow-listing "k1"; `over` replaces top-level fields.
 */
export function minimalAgentConfig(dir: string, over: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    pkcs11: { module: "/x.so", tokenLabel: "t", pin: secretFile(dir, "pin", "s3cret-pin-value") },
    proxyToken: secretFile(dir, "token", "0123456789abcdef-token"),
    socket: "run/a.sock",
    identity: writeIdentity(dir, "agent-identity", TEST_IDENTITIES.agent),
    proxyIdentities: writePins(dir, "pinned-proxy", [TEST_IDENTITIES.proxy]),
    keyStores: [{ keyStore: "/example/prefix", keys: ["k1"] }],
    ...over,
  };
}

/** An agent as the proxy's config names it. */
export interface AgentEntry {
  id: string;
  /** grpc-js target: `unix:///abs/path.sock` or `host:port`. */
  target: string;
  token: string;
  /** The agent identities the proxy accepts for it (default [TEST_IDENTITIES.agent]). */
  identities?: Identity[];
  /** gRPC channels per proxy process to this agent (default: the proxy's, 1). */
  connections?: number;
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
  /** The proxy's own channel identity (default TEST_IDENTITIES.proxy). */
  identity?: Identity;
  /** Any other top-level fields (deadlines, http, log, …), written as given. */
  extra?: Record<string, unknown>;
  /** The proxy's `workers` (default 1: one process, as every test but the workers' own expects). */
  workers?: number | "auto";
}

/** Writes `dir/proxy.json` and its secret files; returns the config file. */
export function writeProxyConfig(dir: string, o: ProxyConfigOptions): string {
  let n = 0;
  const config = {
    workers: o.workers ?? 1,
    listen: { host: "127.0.0.1", port: o.port ?? 0 },
    region: o.region ?? "us-east-1",
    identity: writeIdentity(dir, "proxy-identity", o.identity ?? TEST_IDENTITIES.proxy),
    agents: o.agents.map((a, i) => ({
      id: a.id,
      target: a.target,
      token: secretFile(dir, `agent-token-${i}`, a.token),
      identities: writePins(dir, `pinned-agent-${i}`, a.identities ?? [TEST_IDENTITIES.agent]),
      ...(a.connections !== undefined ? { connections: a.connections } : {}),
    })),
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

/**
 * The test agent's allow-lists: for each test key store (PREFIX, OTHER_PREFIX),
 * every KMS key of the test key set (never the health key); `more` for PREFIX only.
 */
export function testAgentKeyStores(more: string[] = []): KeyStoreAllowList[] {
  return [
    { keyStore: PREFIX, keys: [...kmsKeys(TEST_KEYS), ...more] },
    { keyStore: OTHER_PREFIX, keys: kmsKeys(TEST_KEYS) },
  ];
}

/** The test key stores: PREFIX (credentials a and b, `keys`) and OTHER_PREFIX (credential other, key foo). */
export function testKeyStores(keys: string[] = ["foo"]): KeyStoreEntry[] {
  return [
    { prefix: PREFIX, credentials: [CREDS.a, CREDS.b], keys },
    { prefix: OTHER_PREFIX, credentials: [CREDS.other], keys: ["foo"] },
  ];
}
