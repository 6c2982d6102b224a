/**
 * Builds the whole chain on one machine, from nothing, as separate real
 * processes: a fresh SoftHSM token with keys, a real OpenSSH sshd on a free
 * loopback port (standing in for EC2), the proxy (bin/xks-proxy.js) and the
 * agent (bin/xks-agent.js) whose ssh2 tunnel reaches the proxy through that sshd.
 *
 * Used by the demo (scripts/demo.ts), the end-to-end tests and the benchmark.
 * Needs `npm run build` first (the bins run dist/).
 */
import { spawn, type ChildProcess } from "node:child_process";
import { randomBytes } from "node:crypto";
import { closeSync, existsSync, mkdirSync, openSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import http from "node:http";
import { join } from "node:path";
import { Hsm } from "../../agent/hsm/hsm.ts";
import { createKey, type KeyUsage } from "../../agent/keys.ts";
import { newCredential } from "../../proxy/cli.ts";
import { createLogger } from "../../shared/logging.ts";
import { PACKAGE_ROOT } from "../../shared/paths.ts";
import { writeAgentConfig } from "../../test/helpers/agent.ts";
import { createSoftHsmToken, type SoftHsmToken } from "../../test/helpers/softhsm.ts";
import { freePort, startSshd, type Sshd } from "../../test/helpers/sshd.ts";
import { presignPost, signedPost, type Resp } from "../../test/helpers/sigv4.ts";

export const CHAIN_KEYS = {
  default: "demo-key",
  encryptOnly: "demo-encrypt-only",
  decryptOnly: "demo-decrypt-only",
  noUsage: "demo-no-usage",
} as const;
const HEALTH_KEY = "xks-health";
const USAGE: Record<keyof typeof CHAIN_KEYS, KeyUsage[]> = {
  default: ["encrypt", "decrypt"],
  encryptOnly: ["encrypt"],
  decryptOnly: ["decrypt"],
  noUsage: [],
};
export const CHAIN_PREFIX = "/xks-demo";
/**
 * Node flags the daemons run with, here as in deploy/ (systemd unit, launchd plist):
 * a 32 MiB young generation makes short-lived per-request garbage far cheaper to
 * collect (measured: proxy CPU per request −13 %, p99 at 1,800 req/s 97 → 36 ms).
 */
export const DAEMON_NODE_FLAGS = ["--max-semi-space-size=32"];
export const CHAIN_REGION = "us-east-1";

export interface ChainOptions {
  /** Folder for everything (wiped first). */
  dir: string;
  /** Remote forward kind: an OpenSSH Unix socket (default) or a loopback TCP port. */
  tunnel?: "socket" | "tcp";
  proxyPort?: number;
  logLevel?: string;
  /** Extra proxy config fields (merged at the top level). */
  proxyExtra?: Record<string, unknown>;
}

export class Daemon {
  proc: ChildProcess | undefined;
  private exited: Promise<void> = Promise.resolve();
  constructor(
    readonly name: string,
    private readonly args: string[],
    private readonly env: NodeJS.ProcessEnv,
    readonly logFile: string,
  ) {}

  start(): void {
    // stdout/stderr go straight to the log file (as under launchd/systemd), not through this process.
    const fd = openSync(this.logFile, "a", 0o600);
    // XKS_NODE_ARGS: extra node flags for the daemons, e.g. "--cpu-prof --cpu-prof-dir=/tmp/prof".
    const nodeArgs = (process.env.XKS_NODE_ARGS ?? "").split(" ").filter(Boolean);
    const p = spawn(process.execPath, [...DAEMON_NODE_FLAGS, ...nodeArgs, ...this.args], { env: this.env, stdio: ["ignore", fd, fd] });
    closeSync(fd);
    this.exited = new Promise((resolve) => p.once("exit", () => resolve()));
    this.proc = p;
  }

  get pid(): number | undefined {
    return this.proc?.pid;
  }

  /** SIGTERM (or the given signal), then SIGKILL after `graceMs`. */
  async stop(signal: NodeJS.Signals = "SIGTERM", graceMs = 3000): Promise<void> {
    const p = this.proc;
    if (!p || p.exitCode !== null || p.signalCode !== null) return;
    p.kill(signal);
    const timer = setTimeout(() => p.kill("SIGKILL"), graceMs);
    await this.exited;
    clearTimeout(timer);
  }

  logs(): string {
    return existsSync(this.logFile) ? readFileSync(this.logFile, "utf8") : "";
  }
}

export interface Chain {
  dir: string;
  url: string;
  region: string;
  uriPath: string;
  accessKeyId: string;
  secretAccessKey: string;
  keys: typeof CHAIN_KEYS;
  softhsm: SoftHsmToken;
  sshd: Sshd;
  agent: Daemon;
  proxy: Daemon;
  agentToken: string;
  agentConfigFile: string;
  proxyConfigFile: string;
  remoteSocket: string;
  /** Signs (AWS's own signer) and POSTs to `<uriPath>/<rest>`. */
  post(rest: string, body: unknown): Promise<Resp>;
  /** Signs now, sends when the returned function is called (bursts: sign all, then send all at once). */
  presign(rest: string, body: unknown): Promise<() => Promise<Resp>>;
  /** Resolves once health reports the agent ACTIVE (throws after timeoutMs). */
  waitActive(timeoutMs?: number): Promise<void>;
  stop(): Promise<void>;
}

const BIN_AGENT = join(PACKAGE_ROOT, "bin/xks-agent.js");
const BIN_PROXY = join(PACKAGE_ROOT, "bin/xks-proxy.js");

export async function startChain(o: ChainOptions): Promise<Chain> {
  if (!existsSync(join(PACKAGE_ROOT, "dist/agent/cli.js"))) throw new Error("dist/ is missing: run `npm run build` first");
  rmSync(o.dir, { recursive: true, force: true });
  for (const d of ["agent", "proxy", "logs", "ec2"]) mkdirSync(join(o.dir, d), { recursive: true, mode: 0o700 });

  // The owner's HSM: a fresh token and the keys.
  const softhsm = createSoftHsmToken({ dir: join(o.dir, "hsm"), tokenLabel: "xks-demo" });
  const hsm = new Hsm({ module: softhsm.module, tokenLabel: softhsm.tokenLabel, pin: softhsm.pin }, createLogger({ level: "silent" }));
  try {
    hsm.open();
    for (const [name, label] of Object.entries(CHAIN_KEYS)) createKey(hsm, label, USAGE[name as keyof typeof CHAIN_KEYS]);
    createKey(hsm, HEALTH_KEY, ["encrypt", "decrypt"]);
  } finally {
    hsm.close();
  }

  // "EC2": a real OpenSSH sshd; the agent's remote forward lands in o.dir/ec2.
  const tcpPort = o.tunnel === "tcp" ? await freePort() : 0;
  const sshd = await startSshd({ dir: join(o.dir, "ssh"), permitListen: o.tunnel === "tcp" ? `127.0.0.1:${tcpPort}` : undefined });
  const remoteSocket = join(o.dir, "ec2", "agent.sock");

  const agentToken = randomBytes(32).toString("base64url");
  const cred = newCredential(CHAIN_PREFIX);
  const proxyPort = o.proxyPort ?? (await freePort());

  // Agent config (the owner's machine).
  const a = join(o.dir, "agent");
  writeFileSync(join(a, "id_ed25519"), sshd.clientPrivateKey, { mode: 0o600 });
  const agentConfigFile = writeAgentConfig(a, softhsm, agentToken, {
    agentId: "owner-machine",
    healthKey: HEALTH_KEY,
    dashboard: { port: 0 },
    tunnels: [
      {
        name: "local-sshd",
        host: "127.0.0.1",
        port: sshd.port,
        username: sshd.user,
        privateKey: { file: "id_ed25519" },
        hostKeyFingerprint: sshd.hostKeyFingerprint,
        ...(o.tunnel === "tcp" ? { remoteTcp: { host: "127.0.0.1", port: tcpPort } } : { remoteSocket }),
      },
    ],
    log: { level: o.logLevel ?? "info" },
  });

  // Proxy config ("EC2").
  const p = join(o.dir, "proxy");
  writeFileSync(join(p, "agent-token"), agentToken, { mode: 0o600 });
  writeFileSync(join(p, "sigv4.secret"), cred.secretAccessKey, { mode: 0o600 });
  const proxyConfigFile = join(p, "proxy.json");
  writeFileSync(
    proxyConfigFile,
    JSON.stringify(
      {
        listen: { host: "127.0.0.1", port: proxyPort },
        region: CHAIN_REGION,
        agents: [
          { id: "owner-machine", target: o.tunnel === "tcp" ? `127.0.0.1:${tcpPort}` : `unix://${remoteSocket}`, token: { file: "agent-token" } },
        ],
        healthRefreshMs: 1000,
        keyStores: [
          {
            uriPathPrefix: CHAIN_PREFIX,
            credentials: [{ accessKeyId: cred.accessKeyId, secretAccessKey: { file: "sigv4.secret" } }],
            keys: Object.values(CHAIN_KEYS),
          },
        ],
        log: { level: o.logLevel ?? "info" },
        ...o.proxyExtra,
      },
      null,
      2,
    ),
  );

  const env = { ...process.env, ...softhsm.env };
  const proxy = new Daemon("proxy", [BIN_PROXY, "serve", "--config", proxyConfigFile], env, join(o.dir, "logs", "proxy.log"));
  const agent = new Daemon("agent", [BIN_AGENT, "run", "--config", agentConfigFile], env, join(o.dir, "logs", "agent.log"));
  proxy.start();
  agent.start();
  writeFileSync(join(o.dir, "pids"), `${proxy.pid}\n${agent.pid}\n`);

  const url = `http://127.0.0.1:${proxyPort}`;
  const uriPath = `${CHAIN_PREFIX}/kms/xks/v1`;
  const creds = { accessKeyId: cred.accessKeyId, secretAccessKey: cred.secretAccessKey };
  // Like KMS behind its load balancer: connections are kept and reused.
  const keepAlive = new http.Agent({ keepAlive: true, keepAliveMsecs: 1000, maxSockets: 256 });
  const chain: Chain = {
    dir: o.dir,
    url,
    region: CHAIN_REGION,
    uriPath,
    accessKeyId: cred.accessKeyId,
    secretAccessKey: cred.secretAccessKey,
    keys: CHAIN_KEYS,
    softhsm,
    sshd,
    agent,
    proxy,
    agentToken,
    agentConfigFile,
    proxyConfigFile,
    remoteSocket,
    post: (rest, body) => signedPost(url, `${uriPath}/${rest}`, body, creds, { sign: { region: CHAIN_REGION }, agent: keepAlive }),
    presign: (rest, body) => presignPost(url, `${uriPath}/${rest}`, body, creds, { sign: { region: CHAIN_REGION }, agent: keepAlive }),
    waitActive: async (timeoutMs = 20000) => {
      const deadline = Date.now() + timeoutMs;
      let last = "";
      while (Date.now() < deadline) {
        try {
          const r = await chain.post("health", { requestMetadata: { kmsRequestId: "wait-active", kmsOperation: "KmsHealthCheck" } });
          last = r.text;
          if (r.status === 200 && r.json?.ekmFleetDetails?.[0]?.healthStatus === "ACTIVE") return;
        } catch (err) {
          last = (err as Error).message;
        }
        await new Promise((r) => setTimeout(r, 100));
      }
      throw new Error(`the chain did not become ACTIVE within ${timeoutMs} ms (last: ${last})\nagent log:\n${agent.logs().slice(-3000)}\nproxy log:\n${proxy.logs().slice(-3000)}`);
    },
    stop: async () => {
      keepAlive.destroy();
      await Promise.all([agent.stop(), proxy.stop()]);
      await sshd.stop();
    },
  };
  return chain;
}
