/**
 * The proxy on its own: the real binary (bin/xks-proxy.js, real HTTP, SigV4
 * checked on every request) in front of the fake agent (fake-agent-child.ts,
 * a process of its own that answers at once), with no SoftHSM, tunnel or
 * sshd competing for the cores. What it measures is the proxy's own cost and
 * how it scales with its workers.
 */
import { type ChildProcess, fork } from "node:child_process";
import { mkdirSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { newCredential } from "../../proxy/credentials.ts";
import { PACKAGE_ROOT } from "../../shared/paths.ts";
import { CHAIN_PREFIX, CHAIN_REGION } from "../../testbed/chain.ts";
import { writeProxyConfig } from "../../testbed/configs.ts";
import type { Identity } from "../../testbed/identities.ts";
import { freePort } from "../../testbed/ports.ts";
import { DAEMON_NODE_FLAGS, Daemon } from "../../testbed/procs.ts";
import { XksClient } from "../../testbed/xks/client.ts";
import { onCleanup } from "./cleanup.ts";
import type { LoadGenerator } from "./loadgen/generator.ts";
import type { Target } from "./loadgen/protocol.ts";
import { lastLines, treeOf, type Rig } from "./rig.ts";

const BIN_PROXY = join(PACKAGE_ROOT, "bin/xks-proxy.js");
const CHILD = fileURLToPath(new URL("./fake-agent-child.ts", import.meta.url));
/** The key the generator names (the fake agent serves any key id the proxy lets through). */
const KEY = "bench-key";
/** What a proxy-only folder's pid file lists (for stopping what an interrupted run left behind). */
export const PROXY_ONLY_LEFTOVERS = /xks-|fake-agent-child/;

export interface ProxyOnly {
  proxy: Daemon;
  fakeAgent: ChildProcess;
  target(sockets: number): Target;
  stop(): Promise<void>;
}

interface FakeAgentInfo {
  target: string;
  token: string;
  /** The test identities of the fake agent's process: it serves `agent` and accepts only `proxy`. */
  identities: { agent: Identity; proxy: Identity };
}

/** Forks the fake agent; resolves with its gRPC target, token and identities once it listens. */
function startFakeAgentProcess(dir: string): Promise<FakeAgentInfo & { proc: ChildProcess }> {
  const proc = fork(CHILD, [dir], { execArgv: ["--import", "tsx", ...DAEMON_NODE_FLAGS], stdio: ["ignore", "inherit", "inherit", "ipc"] });
  return new Promise((resolve, reject) => {
    proc.once("message", (m: FakeAgentInfo) => resolve({ proc, ...m }));
    proc.once("exit", (code, signal) => reject(new Error(`the fake agent exited before listening (${signal ?? code})`)));
  });
}

async function stopChild(proc: ChildProcess): Promise<void> {
  if (proc.exitCode !== null || proc.signalCode !== null) return;
  const exited = new Promise((r) => proc.once("exit", r));
  if (proc.connected) proc.disconnect();
  else proc.kill();
  const timer = setTimeout(() => proc.kill("SIGKILL"), 3000);
  await exited;
  clearTimeout(timer);
}

/**
 * The proxy with `workers` (left out of its config when not given) and
 * `proxyExtra` config fields, and the fake agent, in `dir` (wiped first); stopped at cleanup; resolves once the
 * proxy reports the agent ACTIVE, or throws when the proxy exits first.
 */
export async function startProxyOnly(
  dir: string,
  logLevel: string,
  workers?: number | "auto",
  proxyExtra?: Record<string, unknown>,
): Promise<ProxyOnly> {
  rmSync(dir, { recursive: true, force: true });
  for (const d of ["proxy", "logs", "agent"]) mkdirSync(join(dir, d), { recursive: true, mode: 0o700 });
  const fake = await startFakeAgentProcess(join(dir, "agent"));
  const stopFake = onCleanup(`fake agent ${dir}`, () => stopChild(fake.proc));
  const cred = newCredential(CHAIN_PREFIX);
  const port = await freePort();
  const configFile = writeProxyConfig(join(dir, "proxy"), {
    port,
    region: CHAIN_REGION,
    identity: fake.identities.proxy,
    agents: [{ id: "fake-agent", target: fake.target, token: fake.token, identities: [fake.identities.agent] }],
    keyStores: [{ prefix: CHAIN_PREFIX, credentials: [cred], keys: [KEY] }],
    extra: { ...(workers !== undefined ? { workers } : {}), healthRefreshMs: 1000, log: { level: logLevel }, ...proxyExtra },
  });
  const proxy = new Daemon("proxy", [BIN_PROXY, "serve", "--config", configFile], process.env, join(dir, "logs", "proxy.log"));
  proxy.start();
  const stopProxy = onCleanup(`proxy ${dir}`, () => proxy.stop());
  writeFileSync(join(dir, "pids"), `${proxy.pid}\n${fake.proc.pid}\n`);
  const endpoint = {
    url: `http://127.0.0.1:${port}`,
    uriPath: `${CHAIN_PREFIX}/kms/xks/v1`,
    region: CHAIN_REGION,
    accessKeyId: cred.accessKeyId,
    secretAccessKey: cred.secretAccessKey,
  };
  const client = new XksClient(endpoint);
  try {
    await client.untilActive("the proxy to report the fake agent ACTIVE", {
      check: () => {
        if (!proxy.running) throw new Error(`the proxy exited: ${lastLines(proxy.logs())}`);
      },
    });
  } catch (err) {
    await stopProxy();
    await stopFake();
    throw err;
  } finally {
    client.close();
  }
  return {
    proxy,
    fakeAgent: fake.proc,
    target: (sockets) => ({ ...endpoint, keyId: KEY, sockets }),
    stop: async () => {
      await stopProxy();
      await stopFake();
    },
  };
}

/** The rig for the proxy-only set-up: proxy (primary and workers), fake agent, generator. */
export function proxyOnlyRig(po: ProxyOnly, gen: LoadGenerator, dir: string): Rig {
  return {
    gen,
    procs: { proxy: treeOf(po.proxy.pid), "fake agent": treeOf(po.fakeAgent.pid), generator: () => [gen.pid] },
    // The fake agent writes no log: its side of the "inside" figures reads as none.
    logs: { proxy: po.proxy.logFile, agent: join(dir, "logs", "agent.log") },
  };
}
