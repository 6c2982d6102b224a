/**
 * The agent's metrics (xks_agent_*), served by shared/metrics.ts on their own
 * listener. runAgent (agent/main.ts) feeds every operation record and times
 * each audit write; tunnel states and HSM counters are read at scrape time.
 *
 * Labels are bounded: `operation` is one of the four, `result` an agent
 * reason (OK, KEY_NOT_FOUND, …, UNAUTHENTICATED, CANCELLED), `key_store` a
 * key store from the config ("unknown" for any other value the caller sent,
 * "unauthenticated" for a call without the agent token, "n/a" for health),
 * `tunnel` a configured tunnel name. Key labels, principals and anything else
 * a caller sends never become labels.
 */
import { client, LATENCY_BUCKETS, newRegistry, secondsSince } from "../shared/metrics.ts";
import type { OperationRecord } from "./server.ts";
import type { TunnelState } from "./tunnel.ts";

const HEALTH_STATES = ["ACTIVE", "DEGRADED", "UNAVAILABLE"] as const;

/** "" (no prefix) as a label value that Prometheus does not drop. */
function keyStoreLabel(prefix: string): string {
  return prefix === "" ? "(none)" : prefix;
}

export interface AgentMetricsSources {
  /** The configured key stores (uriPathPrefix values). */
  keyStores: readonly string[];
  tunnels: () => readonly TunnelState[];
  hsm: () => { reinitializations: number };
}

export class AgentMetrics {
  readonly registry = newRegistry();
  private readonly keyStores: ReadonlySet<string>;
  private readonly operations = new client.Counter({
    name: "xks_agent_operations_total",
    help: "Calls answered, by operation, key store and result (OK or the agent's reason)",
    labelNames: ["operation", "key_store", "result"] as const,
    registers: [this.registry],
  });
  private readonly duration = new client.Histogram({
    name: "xks_agent_operation_duration_seconds",
    help: "Calls from arrival at the agent to the answer (queue, policy, HSM, audit record), by operation",
    labelNames: ["operation"] as const,
    buckets: LATENCY_BUCKETS,
    registers: [this.registry],
  });
  private readonly health = new client.Gauge({
    name: "xks_agent_health",
    help: "The state of the last health answer: 1 for its state, 0 for the others",
    labelNames: ["state"] as const,
    registers: [this.registry],
  });
  private readonly auditWrite = new client.Histogram({
    name: "xks_agent_audit_write_seconds",
    help: "Writing one operation's audit record (before its answer leaves)",
    buckets: [0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1],
    registers: [this.registry],
  });

  constructor(src: AgentMetricsSources) {
    this.keyStores = new Set(src.keyStores);
    for (const s of HEALTH_STATES) this.health.set({ state: s }, s === "UNAVAILABLE" ? 1 : 0);
    new client.Gauge({
      name: "xks_agent_tunnel_up",
      help: "Each configured tunnel: 1 while its forward is up, else 0",
      labelNames: ["tunnel"] as const,
      registers: [this.registry],
      collect() {
        for (const t of src.tunnels()) this.set({ tunnel: t.name }, t.state === "up" ? 1 : 0);
      },
    });
    new client.Counter({
      name: "xks_agent_tunnel_connects_total",
      help: "SSH connections made by each configured tunnel; every one after the first is a reconnect",
      labelNames: ["tunnel"] as const,
      registers: [this.registry],
      collect() {
        this.reset();
        for (const t of src.tunnels()) this.inc({ tunnel: t.name }, t.connects);
      },
    });
    new client.Counter({
      name: "xks_agent_hsm_reinitializations_total",
      help: "Times the PKCS#11 module was finalized and initialized again after a device failure",
      registers: [this.registry],
      collect() {
        this.reset();
        this.inc(src.hsm().reinitializations);
      },
    });
  }

  /** One answered call, as recorded for the audit and the dashboard. */
  operation(rec: OperationRecord): void {
    const result = /^[A-Z_]{1,40}$/.test(rec.result) ? rec.result : "OTHER";
    const keyStore =
      rec.operation === "GetHealthStatus"
        ? "n/a"
        : result === "UNAUTHENTICATED"
          ? "unauthenticated"
          : this.keyStores.has(rec.keyStore)
            ? keyStoreLabel(rec.keyStore)
            : "unknown";
    this.operations.inc({ operation: rec.operation, key_store: keyStore, result });
    this.duration.observe({ operation: rec.operation }, rec.latencyMs / 1000);
    if (rec.health && result === "OK") for (const s of HEALTH_STATES) this.health.set({ state: s }, s === rec.health.state ? 1 : 0);
  }

  /** Times one audit write. */
  auditWritten(start: bigint): void {
    this.auditWrite.observe(secondsSince(start));
  }
}
