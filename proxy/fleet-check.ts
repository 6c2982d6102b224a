/**
 * The agents part of `xks-proxy check`: one health call to every configured
 * agent (over the same mutual-TLS channel the proxy uses), each agent's state,
 * and the key check values compared across agents (proxy/key-checks.ts).
 *
 * A key whose agents disagree fails the check (the running proxy refuses that
 * key). An agent that cannot be reached is reported and does not fail it: an
 * agent may be offline while the proxy is set up (its tunnel is dialled from
 * the owner's machine), and the running proxy routes around it.
 */
import { createLogger } from "../shared/logging.ts";
import { AgentPool } from "./agent-client.ts";
import type { ProxyConfig } from "./config.ts";

export interface FleetCheck {
  lines: string[];
  /** False when some key's check values differ between agents. */
  ok: boolean;
}

export async function checkFleet(config: Readonly<ProxyConfig>): Promise<FleetCheck> {
  const pool = new AgentPool({
    agents: config.agents,
    identity: config.identity,
    deadlineMs: config.agentDeadlineMs,
    healthDeadlineMs: config.healthDeadlineMs,
    healthRefreshMs: config.healthRefreshMs,
    log: createLogger({ level: "silent" }),
  });
  try {
    await pool.refreshHealth();
    const lines: string[] = [];
    for (const h of pool.healthSnapshot()) {
      const r = h.report;
      if (h.state === "UNAVAILABLE" && !r) {
        lines.push(`- agent ${h.id}: not reached (${(h.reason ?? "no answer").slice(0, 300)}); the proxy routes around it`);
        continue;
      }
      const checked = r ? r.keyChecks.filter((k) => k.checkValue).length : 0;
      const token = r ? `token ${r.tokenLabel || "?"} serial ${r.tokenSerial || "?"}, ${checked} key check values` : "";
      const mark = h.state === "ACTIVE" ? "✓" : "✗";
      lines.push(`${mark} agent ${h.id}: ${h.state}${token ? ` (${token})` : ""}${h.reason ? `: ${h.reason.slice(0, 300)}` : ""}`);
    }
    const mismatches = pool.keyChecks.list();
    for (const m of mismatches)
      lines.push(
        `✗ key ${m.keyId}: key check values differ between agents ${m.groups.map((g) => `[${g.join(", ")}]`).join(" vs ")}; ` +
          "the proxy refuses this key (InvalidStateException): the agents must hold clones of one token",
      );
    if (mismatches.length === 0) lines.push(`✓ key check values agree for ${pool.keyChecks.agreeing()} key(s) held by more than one agent`);
    return { lines, ok: mismatches.length === 0 };
  } finally {
    pool.close();
  }
}
