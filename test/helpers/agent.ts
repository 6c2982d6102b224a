/**
 * Runs the REAL agent (in this process) on a REAL SoftHSM token made for the
 * test, with the standard test keys. Logs are captured so tests can read them.
 */
import { randomBytes } from "node:crypto";
import { mkdtempSync, writeFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { loadAgentConfig, type AgentConfig } from "../../agent/config.ts";
import { Hsm } from "../../agent/hsm/hsm.ts";
import { createKey, type KeyUsage } from "../../agent/keys.ts";
import { runAgent, type RunningAgent } from "../../agent/main.ts";
import { LogCapture } from "./logs.ts";
import { createLogger } from "../../shared/logging.ts";
import { createSoftHsmToken, type SoftHsmToken } from "./softhsm.ts";

export const TEST_KEYS = {
  default: "foo",
  encryptOnly: "enc-only",
  decryptOnly: "dec-only",
  noUsage: "no-usage",
  health: "xks-health",
} as const;

const KEY_USAGE: Record<keyof typeof TEST_KEYS, KeyUsage[]> = {
  default: ["encrypt", "decrypt"],
  encryptOnly: ["encrypt"],
  decryptOnly: ["decrypt"],
  noUsage: [],
  health: ["encrypt", "decrypt"],
};


export interface TestAgent {
  dir: string;
  token: string;
  socketPath: string;
  configFile: string;
  config: AgentConfig;
  softhsm: SoftHsmToken;
  keys: typeof TEST_KEYS;
  agent: RunningAgent;
  logs: LogCapture;
  stop(): Promise<void>;
  restart(): Promise<void>;
  /** Stops the agent and deletes its files. */
  destroy(): Promise<void>;
}

export function writeAgentConfig(dir: string, softhsm: SoftHsmToken, token: string, extra: Record<string, unknown> = {}): string {
  writeFileSync(join(dir, "pin"), softhsm.pin, { mode: 0o600 });
  writeFileSync(join(dir, "agent-token"), token, { mode: 0o600 });
  const configFile = join(dir, "agent.json");
  writeFileSync(
    configFile,
    JSON.stringify(
      {
        agentId: "test-agent",
        pkcs11: { module: softhsm.module, tokenLabel: softhsm.tokenLabel, pin: { file: "pin" } },
        socket: "run/agent.sock",
        proxyToken: { file: "agent-token" },
        healthKey: TEST_KEYS.health,
        stateFile: "state/controls.json",
        auditLog: "state/audit.log",
        ...extra,
      },
      null,
      2,
    ),
  );
  return configFile;
}

export function createTestKeys(config: AgentConfig): void {
  const hsm = new Hsm(config.pkcs11, createLogger({ level: "silent" }));
  try {
    hsm.open();
    for (const [name, label] of Object.entries(TEST_KEYS)) createKey(hsm, label, KEY_USAGE[name as keyof typeof TEST_KEYS]);
  } finally {
    hsm.close();
  }
}

export async function startTestAgent(opts: { configExtra?: Record<string, unknown> } = {}): Promise<TestAgent> {
  const dir = mkdtempSync(join(tmpdir(), "xks-agent-"));
  const softhsm = createSoftHsmToken({ dir: join(dir, "hsm") });
  const token = randomBytes(24).toString("base64url");
  const configFile = writeAgentConfig(dir, softhsm, token, opts.configExtra);
  const config = loadAgentConfig(configFile);
  createTestKeys(config);
  const logs = new LogCapture();
  const t: TestAgent = {
    dir,
    token,
    socketPath: config.socket,
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

export { LogCapture };
