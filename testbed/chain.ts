/**
 * The whole chain on one machine, from nothing, each part a real process: a
 * fresh SoftHSM token with a key set, a real OpenSSH sshd on a free port
 * (standing in for EC2), the proxy (bin/xks-proxy.js) and the agent
 * (bin/xks-agent.js) whose ssh2 tunnel reaches the proxy through that sshd;
 * the agent's policy file is the demo's (DEMO_POLICY) unless told otherwise.
 * The demo, the end-to-end tests and the bench all start it here; the bench's
 * WAN variant only sets options (where sshd also listens, where the agent's
 * tunnel dials, how the agent is started).
 *
 * Needs `npm run build` first: the bins run dist/.
 */
import { randomBytes } from "node:crypto";
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { newCredential } from "../proxy/credentials.ts";
import { PACKAGE_ROOT } from "../shared/paths.ts";
import { secretFile, writeAgentConfig, writeProxyConfig } from "./configs.ts";
import { cloneSoftHsmToken, createKeySet, createSoftHsmToken, DEMO_KEYS, type KeySet, kmsKeys, type SoftHsmToken } from "./hsm.ts";
import { type Identity, TEST_IDENTITIES } from "./identities.ts";
import { freePort } from "./ports.ts";
import { Daemon } from "./procs.ts";
import { startSshd, type Sshd } from "./sshd.ts";
import { makeTlsMaterial, TLS_CLIENT_NAME, type TlsMaterial } from "./tls.ts";
import { GENEROUS_MS } from "./wait.ts";
import { XksClient, type XksEndpoint } from "./xks/client.ts";

export const CHAIN_PREFIX = "/xks-demo";
export const CHAIN_REGION = "us-east-1";

/** The principal the demo's agent policy denies. */
export const DENIED_PRINCIPAL = "arn:aws:iam::123456789012:user/blocked";

/** The agent policy the chain ships unless told otherwise (the demo's): principals ending in `:user/blocked` are denied, the rest allowed. */
export const DEMO_POLICY = {
  mode: "enforce",
  default: "allow",
  rules: [{ name: "deny-blocked-users", effect: "deny", match: { awsPrincipalArn: ["*:user/blocked"] } }],
};

export interface ChainOptions {
  /** Folder for everything (wiped first); default: a new temp folder, removed again by stop(). */
  dir?: string;
  /** Key labels (default: the demo's). */
  keys?: KeySet;
  /** Remote forward kind: an OpenSSH Unix socket (default) or a loopback TCP port. */
  tunnel?: "socket" | "tcp";
  /** The proxy's port (default: a free one). */
  proxyPort?: number;
  /** Proxy and agent log level (default info). */
  logLevel?: string;
  /**
   * The proxy serves HTTPS itself with throwaway material made in `<dir>/tls`
   * (testbed/tls.ts) and, with `mutual`, requires a client certificate named
   * TLS_CLIENT_NAME from its client CA; the chain's client presents it.
   */
  tls?: { mutual?: boolean };
  /** Extra proxy config fields (merged at the top level). */
  proxyExtra?: Record<string, unknown>;
  /** The agent's policy file (agent/policy.ts), written to `<dir>/agent/policy.json`; default DEMO_POLICY, null for none. */
  policy?: Record<string, unknown> | null;
  /** Extra fields of the agent's tunnel entry (e.g. `reassertAfterMs`). */
  agentTunnel?: Record<string, unknown>;
  /** The chain's key store's request quota (token bucket), if any. */
  quota?: { rate: number; burst: number };
  /**
   * The agent on the far side of a network link: sshd also listens on
   * `sshdHost` (same port), the agent's tunnel dials that address, and the
   * agent's command is wrapped by `agentWrap` (e.g. `ip netns exec <ns>`).
   */
  remoteAgent?: { sshdHost: string; agentWrap: (argv: string[]) => string[] };
  /**
   * More agents behind the same proxy (listed after the first, "owner-machine"),
   * each a process of its own with its own SoftHSM token, config and tunnel
   * through the same sshd: `token: "clone"` copies the first agent's token
   * directory (the same keys, as a second machine restored from a backup
   * holds), `"new"` makes a fresh token with the same labels (other keys).
   */
  moreAgents?: Array<{ id: string; token: "clone" | "new" }>;
  /** The proxy's `workers` (default 1). */
  proxyWorkers?: number | "auto";
  /** The agents' `workers` (default: the agent config's default). */
  agentWorkers?: number | "auto";
  /** The proxy's `connections` to the (first) agent (default: the proxy's, 1). */
  agentConnections?: number;
}

/** One of ChainOptions.moreAgents, started. */
export interface ChainAgent {
  id: string;
  agent: Daemon;
  softhsm: SoftHsmToken;
  configFile: string;
  remoteSocket: string;
}

export interface Chain extends XksEndpoint {
  dir: string;
  keys: KeySet;
  softhsm: SoftHsmToken;
  sshd: Sshd;
  agent: Daemon;
  proxy: Daemon;
  agentToken: string;
  agentConfigFile: string;
  /** The agent's policy file (written even when the config names none, so a test can point the config at it). */
  agentPolicyFile: string;
  proxyConfigFile: string;
  /** The agent's own gRPC socket on the owner's machine. */
  agentSocket: string;
  /** The forwarded socket sshd makes on "EC2" (the proxy's agent target), in socket mode. */
  remoteSocket: string;
  /** The loopback port of the forward on "EC2", in TCP mode (0 in socket mode). */
  remoteTcpPort: number;
  /** Signs like KMS and sends, with keep-alive connections. */
  client: XksClient;
  /** ChainOptions.moreAgents, started, in order. */
  moreAgents: ChainAgent[];
  /** The proxy's and the agent's Prometheus endpoints (GET → the text format). */
  metricsUrl: string;
  agentMetricsUrl: string;
  /** The TLS material when started with `tls` (the proxy's certificate files are `tlsMaterial.server`). */
  tlsMaterial?: TlsMaterial;
  /** The channel identities the configs were written with (a process of its own, e.g. a load generator, needs them). */
  identities: { agent: Identity; proxy: Identity };
  /** Resolves once health reports the agent ACTIVE. */
  waitActive(capMs?: number): Promise<void>;
  stop(): Promise<void>;
}

const BIN_AGENT = join(PACKAGE_ROOT, "bin/xks-agent.js");
const BIN_PROXY = join(PACKAGE_ROOT, "bin/xks-proxy.js");

/** The pid files a chain in `dir` leaves (for stopping what an interrupted run left behind). */
export const chainPidFiles = (dir: string) => [join(dir, "pids"), join(dir, "ssh", "sshd.pid")];

export async function startChain(o: ChainOptions = {}): Promise<Chain> {
  if (!existsSync(join(PACKAGE_ROOT, "dist/agent/cli.js"))) throw new Error("dist/ is missing: run `npm run build` first");
  const temporary = o.dir === undefined;
  const dir = o.dir ?? mkdtempSync(join(tmpdir(), "xks-chain-"));
  rmSync(dir, { recursive: true, force: true });
  for (const d of ["agent", "proxy", "logs", "ec2"]) mkdirSync(join(dir, d), { recursive: true, mode: 0o700 });
  const keys = o.keys ?? DEMO_KEYS;
  const logLevel = o.logLevel ?? "info";

  // The owner's HSM: a fresh token and the keys.
  const softhsm = createSoftHsmToken({ dir: join(dir, "hsm"), tokenLabel: "xks-demo" });
  createKeySet(softhsm, keys);

  // "EC2": a real OpenSSH sshd; the agent's remote forward lands in <dir>/ec2.
  const tcpPort = o.tunnel === "tcp" ? await freePort() : 0;
  const sshd = await startSshd({
    dir: join(dir, "ssh"),
    listenHosts: o.remoteAgent ? [o.remoteAgent.sshdHost] : [],
    permitListen: o.tunnel === "tcp" ? `127.0.0.1:${tcpPort}` : undefined,
  });
  const remoteSocket = join(dir, "ec2", "agent.sock");
  const agentToken = randomBytes(32).toString("base64url");
  const cred = newCredential(CHAIN_PREFIX);
  const proxyPort = o.proxyPort ?? (await freePort());
  const proxyMetricsPort = await freePort();
  const agentMetricsPort = await freePort();

  // The owner's machine.
  const a = join(dir, "agent");
  const agentPolicyFile = join(a, "policy.json");
  const policy = o.policy === undefined ? DEMO_POLICY : o.policy;
  writeFileSync(agentPolicyFile, `${JSON.stringify(policy ?? { default: "allow" }, null, 2)}\n`);
  const writeAgent = (
    agentDir: string,
    token: SoftHsmToken,
    agentId: string,
    forward: Record<string, unknown>,
    top: Record<string, unknown> = {},
  ) => {
    if (policy !== null) writeFileSync(join(agentDir, "policy.json"), `${JSON.stringify(policy, null, 2)}\n`);
    return writeAgentConfig(agentDir, {
      token,
      proxyToken: agentToken,
      agentId,
      healthKey: keys.health,
      ...(o.agentWorkers !== undefined ? { workers: o.agentWorkers } : {}),
      keyStores: [{ keyStore: CHAIN_PREFIX, keys: kmsKeys(keys) }],
      extra: {
        ...(policy !== null ? { policy: "policy.json" } : {}),
        dashboard: { port: 0 },
        ...top,
        tunnels: [
          {
            name: "local-sshd",
            host: o.remoteAgent?.sshdHost ?? "127.0.0.1",
            port: sshd.port,
            username: sshd.user,
            privateKey: secretFile(agentDir, "id_ed25519", sshd.clientPrivateKey),
            hostKeyFingerprint: sshd.hostKeyFingerprint,
            ...forward,
            ...o.agentTunnel,
          },
        ],
        log: { level: logLevel },
      },
    });
  };
  const agentConfigFile = writeAgent(
    a,
    softhsm,
    "owner-machine",
    o.tunnel === "tcp" ? { remoteTcp: { host: "127.0.0.1", port: tcpPort } } : { remoteSocket },
    { metrics: { port: agentMetricsPort } },
  );
  // More agents: their own folder, token and forwarded socket (socket mode only).
  const more = (o.moreAgents ?? []).map((m) => {
    if (o.tunnel === "tcp") throw new Error("moreAgents needs the socket tunnel");
    const d = join(dir, `agent-${m.id}`);
    mkdirSync(d, { recursive: true, mode: 0o700 });
    let token: SoftHsmToken;
    if (m.token === "clone") token = cloneSoftHsmToken(softhsm, join(d, "hsm"));
    else {
      token = createSoftHsmToken({ dir: join(d, "hsm"), tokenLabel: softhsm.tokenLabel, pin: softhsm.pin });
      createKeySet(token, keys);
    }
    const sock = join(dir, "ec2", `${m.id}.sock`);
    return { id: m.id, dir: d, softhsm: token, remoteSocket: sock, configFile: writeAgent(d, token, m.id, { remoteSocket: sock }) };
  });

  // "EC2": the proxy, serving HTTPS itself when asked.
  const tlsMaterial = o.tls ? makeTlsMaterial(join(dir, "tls")) : undefined;
  const tlsSection = tlsMaterial
    ? {
        tls: {
          certificate: tlsMaterial.server.cert,
          key: { file: tlsMaterial.server.key },
          ...(o.tls?.mutual ? { clientCa: tlsMaterial.clientCa.cert, clientNames: [TLS_CLIENT_NAME] } : {}),
        },
      }
    : {};
  const proxyConfigFile = writeProxyConfig(join(dir, "proxy"), {
    port: proxyPort,
    region: CHAIN_REGION,
    workers: o.proxyWorkers,
    agents: [
      {
        id: "owner-machine",
        target: o.tunnel === "tcp" ? `127.0.0.1:${tcpPort}` : `unix://${remoteSocket}`,
        token: agentToken,
        connections: o.agentConnections,
      },
      ...more.map((m) => ({ id: m.id, target: `unix://${m.remoteSocket}`, token: agentToken })),
    ],
    keyStores: [{ prefix: CHAIN_PREFIX, credentials: [cred], keys: kmsKeys(keys), ...(o.quota ? { quota: o.quota } : {}) }],
    extra: {
      healthRefreshMs: 1000,
      metrics: { port: proxyMetricsPort },
      log: { level: logLevel },
      ...tlsSection,
      ...o.proxyExtra,
    },
  });

  const env = { ...process.env, ...softhsm.env };
  const proxy = new Daemon("proxy", [BIN_PROXY, "serve", "--config", proxyConfigFile], env, join(dir, "logs", "proxy.log"));
  const agent = new Daemon(
    "agent",
    [BIN_AGENT, "run", "--config", agentConfigFile],
    env,
    join(dir, "logs", "agent.log"),
    o.remoteAgent?.agentWrap,
  );
  const moreAgents: ChainAgent[] = more.map((m) => ({
    id: m.id,
    softhsm: m.softhsm,
    configFile: m.configFile,
    remoteSocket: m.remoteSocket,
    agent: new Daemon(
      `agent-${m.id}`,
      [BIN_AGENT, "run", "--config", m.configFile],
      { ...process.env, ...m.softhsm.env },
      join(dir, "logs", `agent-${m.id}.log`),
      o.remoteAgent?.agentWrap,
    ),
  }));
  proxy.start();
  agent.start();
  for (const m of moreAgents) m.agent.start();
  writeFileSync(join(dir, "pids"), `${[proxy.pid, agent.pid, ...moreAgents.map((m) => m.agent.pid)].join("\n")}\n`);

  const endpoint: XksEndpoint = {
    url: `${tlsMaterial ? "https" : "http"}://127.0.0.1:${proxyPort}`,
    uriPath: `${CHAIN_PREFIX}/kms/xks/v1`,
    region: CHAIN_REGION,
    accessKeyId: cred.accessKeyId,
    secretAccessKey: cred.secretAccessKey,
    ...(tlsMaterial
      ? {
          tls: {
            caFile: tlsMaterial.serverCa.cert,
            ...(o.tls?.mutual ? { certFile: tlsMaterial.clients.good.cert, keyFile: tlsMaterial.clients.good.key } : {}),
          },
        }
      : {}),
  };
  const client = new XksClient(endpoint);
  const chain: Chain = {
    ...endpoint,
    dir,
    keys,
    softhsm,
    sshd,
    agent,
    proxy,
    agentToken,
    agentConfigFile,
    agentPolicyFile,
    proxyConfigFile,
    agentSocket: join(a, "run", "agent.sock"),
    remoteSocket,
    remoteTcpPort: tcpPort,
    client,
    moreAgents,
    metricsUrl: `http://127.0.0.1:${proxyMetricsPort}/metrics`,
    agentMetricsUrl: `http://127.0.0.1:${agentMetricsPort}/metrics`,
    identities: TEST_IDENTITIES,
    ...(tlsMaterial ? { tlsMaterial } : {}),
    waitActive: async (capMs = GENEROUS_MS) => {
      try {
        await client.untilActive("the chain to report the agent ACTIVE", { capMs });
      } catch (err) {
        throw new Error(`${(err as Error).message}\nagent log:\n${agent.logs().slice(-3000)}\nproxy log:\n${proxy.logs().slice(-3000)}`);
      }
    },
    stop: async () => {
      client.close();
      await Promise.all([agent.stop(), proxy.stop(), ...moreAgents.map((m) => m.agent.stop())]);
      await sshd.stop();
      if (temporary) rmSync(dir, { recursive: true, force: true });
    },
  };
  return chain;
}
