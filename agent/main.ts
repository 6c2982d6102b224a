/**
 * Process wiring for the agent: config → logger → HSM → gRPC server → dashboard → tunnels.
 * Shutdown runs in reverse: tunnels, server (drain), audit log, HSM.
 *
 * A failure at start that cannot heal by itself (no such PKCS#11 module, no token with the
 * label, the PIN refused, the dashboard's port taken) rejects with a StartError, after undoing
 * what was started. Anything else (the HSM busy or briefly gone) starts anyway and recovers.
 */
import { type MetricsListener, startMetricsListener } from "../shared/metrics.ts";
import { AgentMetrics } from "./metrics.ts";
import { AuditLog } from "./audit.ts";
import { startDashboard, type Dashboard } from "./dashboard.ts";
import type { AgentConfig } from "./config.ts";
import { Controls, controlsFix } from "./controls.ts";
import { Hsm, HsmOpenError } from "./hsm/hsm.ts";
import type { AgentOpContext } from "./ops/context.ts";
import { allowListMap, LivePolicy } from "./policy.ts";
import { startAgentServer, type AgentServer, type OperationRecord } from "./server.ts";
import { TunnelSet } from "./tunnel.ts";
import { lateRefusal, startWorkerPool } from "./pool.ts";
import { ConfigError } from "../shared/config.ts";
import { workerCount } from "../shared/schema.ts";
import { errorMessage } from "../shared/errors.ts";
import { createLogger, type Logger } from "../shared/logging.ts";
import { VERSION } from "../shared/version.ts";
import type pino from "pino";
import { EventEmitter } from "node:events";
import { dirname, join } from "node:path";

/** Where a refusal of the PIN file is remembered across restarts (agent/hsm/hsm.ts). */
export function refusalMemoFile(config: AgentConfig): string {
  return join(dirname(config.stateFile), "pin-refused.json");
}

/** A reason the agent cannot start that waiting will not fix; its message is one line for the owner. */
export class StartError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = "StartError";
  }
}

export interface RunningAgent {
  config: AgentConfig;
  hsm: Hsm;
  controls: Controls;
  /** The policy file's rules in force (agent/policy.ts). */
  policy: LivePolicy;
  /** The gRPC service on the agent's socket: served here, or by the workers (agent/pool.ts) when `workers` > 1. */
  server: Pick<AgentServer, "socketPath" | "setIdentity" | "close">;
  /** The workers' process ids (empty with one process). */
  workerPids(): Array<number | undefined>;
  tunnels: TunnelSet;
  /** Emits "operation" (OperationRecord) for every finished call. */
  events: EventEmitter;
  /** The record of every key operation (agent/audit.ts). */
  audit: AuditLog;
  dashboard: Dashboard | undefined;
  metrics: AgentMetrics;
  /** http://host:port/metrics when the config has a `metrics` section. */
  metricsUrl: string | undefined;
  log: Logger;
  /**
   * Applies what can change without a restart from a re-read config: this
   * agent's identity and the pinned proxy identities (for new connections),
   * and the policy file (re-read; a bad one is refused and the last good one stays).
   */
  reload(next: AgentConfig): void;
  stop(): Promise<void>;
}

export async function runAgent(
  config: AgentConfig,
  opts: { log?: Logger; destination?: pino.DestinationStream } = {},
): Promise<RunningAgent> {
  const log = opts.log ?? createLogger({ level: config.log.level, format: config.log.format, name: "xks-agent" }, opts.destination);
  log.info(
    {
      version: VERSION,
      agentId: config.agentId,
      module: config.pkcs11.module,
      tokenLabel: config.pkcs11.tokenLabel,
      socket: config.socket,
      healthKey: config.healthKey,
      identity: config.identity.fingerprint,
      proxyIdentities: config.proxyIdentities.map((p) => p.fingerprint),
      keyStores: config.keyStores.map((s) => ({ keyStore: s.keyStore, keys: s.keys.length })),
      tunnels: config.tunnels.map((t) => ({ name: t.name, host: t.host, port: t.port, remote: t.remoteSocket ?? t.remoteTcp })),
    },
    "starting",
  );
  // The policy comes first: an invalid one stops the start before any HSM work.
  const keyStores = allowListMap(config.keyStores);
  let policy: LivePolicy;
  try {
    policy = new LivePolicy(config.policy, keyStores, log);
  } catch (err) {
    const problems = err instanceof ConfigError ? err.problems : [(err as Error).message];
    log.fatal({ policyFile: config.policy, problems }, "cannot start: the policy file is invalid");
    log.flush();
    throw new StartError(`the policy file ${config.policy} is invalid: ${problems.join("; ")}`, { cause: err });
  }
  // A refused PIN file is remembered next to the owner's switches: a restart by launchd does not spend another try.
  const hsm = new Hsm(config.pkcs11, log, { refusalMemoFile: refusalMemoFile(config) });
  try {
    hsm.open();
  } catch (err) {
    if (err instanceof HsmOpenError && err.permanent) {
      hsm.close();
      log.fatal({ err: err.message, stage: err.stage }, "cannot start");
      log.flush();
      throw new StartError(err.message, { cause: err });
    }
    // Start anyway: health reports UNAVAILABLE and every call retries the open.
    log.error({ err: (err as Error).message }, "HSM not available at start; will retry on each call");
  }
  policy.watch();
  const controls = new Controls(config.stateFile);
  const reportDamage = (problem: string | undefined) => {
    if (problem === undefined) return;
    log.error({ stateFile: config.stateFile, problem }, `OWNER CONTROLS FILE DAMAGED: the agent is PAUSED. ${controlsFix(config.file)}`);
    log.flush();
  };
  reportDamage(controls.problem);
  const unwatchControls = controls.watch();
  controls.on("change", (state) => {
    log.warn({ paused: state.paused, disabledKeys: state.disabledKeys }, "owner controls changed");
    log.flush();
  });
  controls.on("damaged", reportDamage);
  let audit: AuditLog;
  try {
    // Checkpoints are sealed with the audit key inside the HSM; while it cannot, health says so.
    audit = new AuditLog(config.audit, { seal: (data) => hsm.hmacSha256(config.audit.key, data), log });
  } catch (err) {
    unwatchControls();
    hsm.close();
    const msg = `cannot open the audit log in ${config.audit.dir}: ${errorMessage(err)}`;
    log.fatal({ err: msg }, "cannot start");
    log.flush();
    throw new StartError(msg, { cause: err });
  }
  const events = new EventEmitter();
  const tunnels = new TunnelSet(config.tunnels, config.socket, log);
  const metrics = new AgentMetrics({
    keyStores: config.keyStores.map((s) => s.keyStore),
    tunnels: () => tunnels.states(),
    hsm: () => hsm.stats,
  });
  const ctx: AgentOpContext = {
    hsm,
    ciphertextMetadata: config.ciphertextMetadata,
    healthKey: config.healthKey,
    keyStores,
    agentId: config.agentId,
    audit: () => ({ head: audit.head(), problem: audit.problem(), refusing: audit.refusing() }),
    isKeyDisabled: (label) => controls.isKeyDisabled(label),
    rules: () => policy.rules(),
    tunnels: () =>
      tunnels.states().map((t) => ({
        name: t.name,
        state: t.state,
        since: t.since,
        // While down, the reason and when the next attempt is due.
        lastError:
          t.state === "down" && t.nextAttemptAt ? `${t.lastError ?? "down"}; next attempt at ${t.nextAttemptAt}` : (t.lastError ?? ""),
        connects: t.connects,
        nodelayExec: t.nodelayExec,
      })),
  };
  // The audit log records key operations. Health checks (the proxies' background
  // refreshes, every few seconds; KMS's own health calls are answered from the
  // proxy's cache) stay in the operational log and the dashboard feed.
  // Calls refused at the door (no or a wrong token) are counted and sampled, not written one by one.
  const auditRecord = (rec: OperationRecord) => {
    if (rec.result === "UNAUTHENTICATED") audit.noteUnauthenticated(rec);
    else if (rec.operation !== "GetHealthStatus") {
      const start = process.hrtime.bigint();
      audit.append(rec);
      metrics.auditWritten(start);
    }
  };
  const onOperation = (rec: OperationRecord) => {
    metrics.operation(rec);
    events.emit("operation", rec);
  };
  const workers = workerCount(config.workers);
  let server: RunningAgent["server"];
  let workerPids: RunningAgent["workerPids"] = () => [];
  if (workers > 1) {
    try {
      const pool = await startWorkerPool({
        config,
        count: workers,
        controls,
        policy,
        log,
        view: () => ({ tunnels: ctx.tunnels(), audit: ctx.audit!() }),
        // A worker's record: refused when the owner's switches stopped it meanwhile, or when it cannot be written.
        record: (rec) => {
          let written = rec;
          let refusal = lateRefusal(controls, rec);
          if (refusal) written = { ...rec, result: "INVALID_STATE", overruled: refusal };
          try {
            auditRecord(written);
          } catch (err) {
            refusal = errorMessage(err);
            written = { ...written, result: "INVALID_STATE" };
          }
          onOperation(written);
          return refusal;
        },
      });
      server = pool;
      workerPids = pool.pids;
    } catch (err) {
      unwatchControls();
      policy.stopWatching();
      audit.close();
      hsm.close();
      const msg = `the workers cannot start: ${errorMessage(err)}`;
      log.fatal({ err: msg }, "cannot start");
      log.flush();
      throw new StartError(msg, { cause: err });
    }
  } else {
    server = await startAgentServer(
      config.socket,
      { ctx, token: config.proxyToken, controls, log, audit: auditRecord, onOperation, maxQueued: config.maxQueued },
      { identity: config.identity, pins: config.proxyIdentities },
    );
  }
  let dashboard: Dashboard | undefined;
  /** A listener that cannot start: undo what has started, say why, and fail the start. */
  const abandonStart = async (msg: string, cause: unknown): Promise<never> => {
    unwatchControls();
    policy.stopWatching();
    await dashboard?.close();
    await server.close(0);
    audit.close();
    hsm.close();
    log.fatal({ err: msg }, "cannot start");
    log.flush();
    throw new StartError(msg, { cause });
  };
  if (config.dashboard) {
    const where = `${config.dashboard.host}:${config.dashboard.port}`;
    try {
      const keys = [...new Set(config.keyStores.flatMap((s) => s.keys))].sort();
      dashboard = await startDashboard({
        ...config.dashboard,
        stateFile: config.stateFile,
        controls,
        tunnels,
        hsm,
        events,
        keys,
        audit: () => ({ head: audit.head(), problem: audit.problem() }),
        log,
      });
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      await abandonStart(
        code === "EADDRINUSE"
          ? `the dashboard's port ${where} is already in use (another xks-agent?): stop it or set dashboard.port`
          : `cannot start the dashboard on ${where}: ${(err as Error).message}`,
        err,
      );
    }
  }
  let metricsListener: MetricsListener | undefined;
  if (config.metrics) {
    const where = `${config.metrics.host}:${config.metrics.port}`;
    try {
      metricsListener = await startMetricsListener(metrics.registry, config.metrics, log);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      await abandonStart(
        code === "EADDRINUSE"
          ? `the metrics port ${where} is already in use: stop what holds it or set metrics.port`
          : `cannot start the metrics listener on ${where}: ${(err as Error).message}`,
        err,
      );
    }
  }
  tunnels.start();
  log.info({ socket: config.socket, paused: controls.paused, workers }, "listening");
  log.flush();

  let stopped: Promise<void> | undefined;
  const stop = () =>
    (stopped ??= (async () => {
      log.info("stopping");
      unwatchControls();
      policy.stopWatching();
      await dashboard?.close();
      await metricsListener?.close();
      await tunnels.stop();
      await server.close();
      audit.close();
      hsm.close();
      log.info("stopped");
    })());
  const reload = (next: AgentConfig) => {
    server.setIdentity({ identity: next.identity, pins: next.proxyIdentities });
    log.info(
      { identity: next.identity.fingerprint, proxyIdentities: next.proxyIdentities.map((p) => p.fingerprint) },
      "identities reloaded (the policy file is re-read; other settings need a restart)",
    );
    log.flush();
    policy.setFile(next.policy);
  };
  return {
    config,
    hsm,
    controls,
    policy,
    server,
    workerPids,
    tunnels,
    events,
    audit,
    dashboard,
    metrics,
    metricsUrl: metricsListener?.url,
    log,
    reload,
    stop,
  };
}
