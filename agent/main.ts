/**
 * Process wiring for the agent: config → logger → HSM → gRPC server → tunnels.
 * Shutdown runs in reverse: tunnels, server (drain), audit log, HSM.
 */
import { AuditLog } from "./audit.ts";
import { startDashboard, type Dashboard } from "./dashboard.ts";
import type { AgentConfig } from "./config.ts";
import { Controls } from "./controls.ts";
import { Hsm } from "./hsm/hsm.ts";
import type { AgentOpContext } from "./ops/context.ts";
import { startAgentServer, type AgentServer, type OperationRecord } from "./server.ts";
import { TunnelSet } from "./tunnel.ts";
import { createLogger, type Logger } from "../shared/logging.ts";
import { VERSION } from "../shared/version.ts";
import type pino from "pino";
import { EventEmitter } from "node:events";

export interface RunningAgent {
  config: AgentConfig;
  hsm: Hsm;
  controls: Controls;
  server: AgentServer;
  tunnels: TunnelSet;
  /** Emits "operation" (OperationRecord) for every finished call. */
  events: EventEmitter;
  dashboard: Dashboard | undefined;
  log: Logger;
  stop(): Promise<void>;
}

export async function runAgent(
  config: AgentConfig,
  opts: { log?: Logger; destination?: pino.DestinationStream } = {},
): Promise<RunningAgent> {
  const log = opts.log ?? createLogger({ level: config.log.level, name: "xks-agent" }, opts.destination);
  log.info(
    {
      version: VERSION,
      agentId: config.agentId,
      module: config.pkcs11.module,
      tokenLabel: config.pkcs11.tokenLabel,
      socket: config.socket,
      healthKey: config.healthKey,
      tunnels: config.tunnels.map((t) => ({ name: t.name, host: t.host, port: t.port, remote: t.remoteSocket ?? t.remoteTcp })),
    },
    "starting",
  );
  const hsm = new Hsm(config.pkcs11, log);
  try {
    hsm.open();
  } catch (err) {
    // Start anyway: health reports UNAVAILABLE and every call retries the open.
    log.error({ err: (err as Error).message }, "HSM not available at start; will retry on each call");
  }
  const controls = new Controls(config.stateFile);
  const unwatchControls = controls.watch();
  controls.on("change", (state) => {
    log.warn({ paused: state.paused, disabledKeys: state.disabledKeys }, "owner controls changed");
    log.flush();
  });
  const audit = new AuditLog(config.auditLog);
  const events = new EventEmitter();
  const tunnels = new TunnelSet(config.tunnels, config.socket, log);
  const ctx: AgentOpContext = {
    hsm,
    ciphertextMetadata: config.ciphertextMetadata,
    healthKey: config.healthKey,
    agentId: config.agentId,
    isKeyDisabled: (label) => controls.isKeyDisabled(label),
    tunnels: () =>
      tunnels.states().map((t) => ({
        name: t.name,
        state: t.state,
        since: t.since,
        lastError: t.lastError ?? "",
        connects: t.connects,
        nodelayExec: t.nodelayExec,
      })),
  };
  const onOperation = (rec: OperationRecord) => {
    // The audit log records key operations. Health checks (the proxies' background
    // refreshes, every few seconds; KMS's own health calls are answered from the
    // proxy's cache) stay in the operational log and the dashboard feed.
    if (rec.operation !== "GetHealthStatus") audit.append(rec);
    events.emit("operation", rec);
  };
  const server = await startAgentServer(config.socket, {
    ctx,
    token: config.proxyToken,
    controls,
    log,
    onOperation,
    maxQueued: config.maxQueued,
  });
  tunnels.start();
  const dashboard = config.dashboard
    ? await startDashboard({ ...config.dashboard, stateFile: config.stateFile, controls, tunnels, events, log })
    : undefined;
  log.info({ socket: config.socket, paused: controls.paused }, "listening");
  log.flush();

  let stopped: Promise<void> | undefined;
  const stop = () =>
    (stopped ??= (async () => {
      log.info("stopping");
      unwatchControls();
      await dashboard?.close();
      await tunnels.stop();
      await server.close();
      audit.close();
      hsm.close();
      log.info("stopped");
    })());
  return { config, hsm, controls, server, tunnels, events, dashboard, log, stop };
}
