/**
 * The proxy's metrics (xks_proxy_*), served by shared/metrics.ts on their own
 * listener. The request pipeline (proxy/app.ts), the agent pool
 * (proxy/agent-client.ts) and admission call the few methods below.
 *
 * Labels are bounded: `operation` is one of the four XKS operations (or
 * "none" when the path named none), `key_store` is a configured uriPathPrefix
 * only once SigV4 has passed ("unauthenticated" before that, "unknown" when
 * the path named no configured key store), `error` is an XKS error name from
 * the catalogue, MethodNotAllowed, ClientClosedRequest or "none". Key ids,
 * principals and anything else from the request never become labels.
 */
import { client, LATENCY_BUCKETS, newRegistry, secondsSince } from "../shared/metrics.ts";
import type { Operation } from "./routes.ts";

/** Why admission refused a request (429 ThrottlingException). */
export type AdmissionRefusal = "agent_queue" | "quota" | "budget_at_dispatch" | "client_gone";

/** Which SigV4 rule failed (401 AuthenticationFailedException). */
export type SigV4FailureReason =
  | "missing_authorization"
  | "malformed"
  | "wrong_scope"
  | "clock_skew"
  | "body_hash_mismatch"
  | "unknown_access_key"
  | "signature_mismatch";

const HEALTH_STATES = ["ACTIVE", "DEGRADED", "UNAVAILABLE"] as const;

/** "" (no prefix) as a label value that Prometheus does not drop. */
export function keyStoreLabel(prefix: string): string {
  return prefix === "" ? "(none)" : prefix;
}

export class ProxyMetrics {
  readonly registry = newRegistry();
  private readonly requests = new client.Counter({
    name: "xks_proxy_requests_total",
    help: "XKS API requests answered, by operation, key store (after SigV4) and XKS error name (none for a success)",
    labelNames: ["operation", "key_store", "error"] as const,
    registers: [this.registry],
  });
  private readonly duration = new client.Histogram({
    name: "xks_proxy_request_duration_seconds",
    help: "XKS API requests end to end, arrival to the last byte of the answer, by operation",
    labelNames: ["operation"] as const,
    buckets: LATENCY_BUCKETS,
    registers: [this.registry],
  });
  private readonly inFlight = new client.Gauge({
    name: "xks_proxy_requests_in_flight",
    help: "XKS API requests received and not yet answered",
    registers: [this.registry],
  });
  private readonly refused = new client.Counter({
    name: "xks_proxy_admission_refused_total",
    help: "Requests refused by admission with 429 ThrottlingException, by reason",
    labelNames: ["reason"] as const,
    registers: [this.registry],
  });
  private readonly sigv4 = new client.Counter({
    name: "xks_proxy_sigv4_failures_total",
    help: "Requests refused by SigV4 (401 AuthenticationFailedException), by the rule that failed",
    labelNames: ["reason"] as const,
    registers: [this.registry],
  });
  private readonly agentCall = new client.Histogram({
    name: "xks_proxy_agent_call_duration_seconds",
    help: "Calls to an agent (gRPC through the tunnel), by configured agent, method and outcome (ok or error)",
    labelNames: ["agent", "method", "outcome"] as const,
    buckets: LATENCY_BUCKETS,
    registers: [this.registry],
  });
  private readonly agentHealth = new client.Gauge({
    name: "xks_proxy_agent_health",
    help: "Each configured agent's health as the background refresh last saw it: 1 for its state, 0 for the others",
    labelNames: ["agent", "state"] as const,
    registers: [this.registry],
    // Every worker of a multi-process proxy holds the same view (one refresher): one scrape shows it once.
    aggregator: "first",
  });

  constructor(agentIds: readonly string[] = []) {
    for (const a of agentIds) this.setAgentHealth(a, "UNAVAILABLE");
  }

  requestStarted(): void {
    this.inFlight.inc();
  }

  /** One answered (or abandoned) request; `keyStore` only for a request that passed SigV4. */
  requestDone(r: {
    operation?: Operation;
    keyStore?: string;
    authenticated: boolean;
    routed: boolean;
    error?: string;
    start: bigint;
  }): void {
    this.inFlight.dec();
    const operation = r.operation ?? "none";
    const keyStore = !r.routed ? "unknown" : r.authenticated && r.keyStore !== undefined ? keyStoreLabel(r.keyStore) : "unauthenticated";
    this.requests.inc({ operation, key_store: keyStore, error: r.error ?? "none" });
    this.duration.observe({ operation }, secondsSince(r.start));
  }

  admissionRefused(reason: AdmissionRefusal): void {
    this.refused.inc({ reason });
  }

  sigv4Failed(reason: SigV4FailureReason): void {
    this.sigv4.inc({ reason });
  }

  agentCalled(agent: string, method: string, ok: boolean, start: bigint): void {
    this.agentCall.observe({ agent, method, outcome: ok ? "ok" : "error" }, secondsSince(start));
  }

  setAgentHealth(agent: string, state: string): void {
    for (const s of HEALTH_STATES) this.agentHealth.set({ agent, state: s }, s === state ? 1 : 0);
  }
}
