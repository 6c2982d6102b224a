/**
 * The REAL agent and the REAL proxy, each in this process, for integration
 * tests: the agent on a fresh SoftHSM token with the test key set, the proxy
 * on 127.0.0.1:0 in front of any agents. Both log into a LogCapture.
 */
import { randomBytes } from "node:crypto";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type AgentConfig, loadAgentConfig } from "../agent/config.ts";
import { type RunningAgent, runAgent } from "../agent/main.ts";
import { loadProxyConfig, type ProxyConfig } from "../proxy/config.ts";
import { type RunningProxy, serve } from "../proxy/main.ts";
import { createLogger } from "../shared/logging.ts";
import { type AgentEntry, type KeyStoreEntry, testAgentKeyStores, testKeyStores, writeAgentConfig, writeProxyConfig } from "./configs.ts";
import { createKeySet, createSoftHsmToken, type KeySet, type SoftHsmToken, TEST_KEYS } from "./hsm.ts";
import { LogCapture } from "./logs.ts";

export interface TestAgent {
  dir: string;
  token: string;
  socketPath: string;
  target: string;
  configFile: string;
  config: AgentConfig;
  softhsm: SoftHsmToken;
  keys: KeySet;
  agent: RunningAgent;
  logs: LogCapture;
  stop(): Promise<void>;
  restart(): Promise<void>;
  /** Stops the agent and deletes its files. */
  destroy(): Promise<void>;
}

/**
 * The real agent on a fresh token with the test keys, allow-listed for the
 * test key stores (testAgentKeyStores) with the labels in `serve` too;
 * `extra` adds config fields (e.g. a dashboard).
 */
export async function startTestAgent(opts: { extra?: Record<string, unknown>; serve?: string[] } = {}): Promise<TestAgent> {
  const dir = mkdtempSync(join(tmpdir(), "xks-agent-"));
  const softhsm = createSoftHsmToken({ dir: join(dir, "hsm") });
  createKeySet(softhsm, TEST_KEYS);
  const token = randomBytes(24).toString("base64url");
  const configFile = writeAgentConfig(dir, {
    token: softhsm,
    proxyToken: token,
    healthKey: TEST_KEYS.health,
    keyStores: testAgentKeyStores(opts.serve),
    extra: opts.extra,
  });
  const config = loadAgentConfig(configFile);
  const logs = new LogCapture();
  const t: TestAgent = {
    dir,
    token,
    socketPath: config.socket,
    target: `unix://${config.socket}`,
    configFile,
    config,
    softhsm,
    keys: TEST_KEYS,
    logs,
    agent: await runAgent(config, { destination: logs }),
    stop: () => t.agent.stop(),
    restart: async () => {
      await t.agent.stop();
      t.agent = await runAgent(config, { destination: logs });
    },
    destroy: async () => {
      await t.agent.stop();
      rmSync(dir, { recursive: true, force: true });
    },
  };
  return t;
}

export interface ProxyFixture {
  dir: string;
  config: Readonly<ProxyConfig>;
  proxy: RunningProxy;
  url: string;
  logs: LogCapture;
  close(): Promise<void>;
}

export interface ProxyFixtureOptions {
  agents: AgentEntry[];
  /** Allowed keys of the main test store (default ["foo"]). */
  keys?: string[];
  /** The key stores (default: testKeyStores(keys)). */
  keyStores?: KeyStoreEntry[];
  /** Other top-level config fields, e.g. `{ http: {...} }`. */
  extra?: Record<string, unknown>;
  dir?: string;
}

/** The real proxy in this process (debug logs captured), background health refresh every 300 ms. */
export async function startProxy(o: ProxyFixtureOptions): Promise<ProxyFixture> {
  const dir = o.dir ?? mkdtempSync(join(tmpdir(), "xks-proxy-"));
  const file = writeProxyConfig(dir, {
    agents: o.agents,
    keyStores: o.keyStores ?? testKeyStores(o.keys),
    extra: {
      vendor: "xks-pair tests",
      agentDeadlineMs: 200,
      healthRefreshMs: 300,
      healthDeadlineMs: 500,
      log: { level: "debug" },
      ...o.extra,
    },
  });
  const config = loadProxyConfig(file, {});
  const logs = new LogCapture();
  // Arrival is taken as seen: this process's event loop also runs the test's own client,
  // whose busy time is not the proxy's queue (the daemons use the proxy's LoopClock).
  const proxy = await serve(config, createLogger({ level: "debug", name: "xks-proxy" }, logs), { arrival: () => performance.now() });
  return {
    dir,
    config,
    proxy,
    url: proxy.url,
    logs,
    close: async () => {
      await proxy.close(500);
      if (!o.dir) rmSync(dir, { recursive: true, force: true });
    },
  };
}
