/**
 * The proxy on several cores: with `workers` > 1, `xks-proxy serve` is the
 * primary of a node:cluster. It validates the config once, forks the workers
 * (each runs `serve()` on the one listening address; cluster hands new
 * connections to them in turn) and supervises them. What must be one for the
 * whole proxy lives in the primary:
 *
 *   - agent health: the primary alone polls each agent (AgentPool with its
 *     refresh and key check values) and sends every refresh's result to every
 *     worker; a worker does no polling, takes that view (a new worker gets it
 *     at once), and asks the primary for a refresh where it would have started
 *     one (a transport failure, a stale cache);
 *   - per-store quotas: one token bucket per store, leased to the workers in
 *     small batches (proxy/quota-lease.ts, with the bound argued there);
 *   - admission: the per-agent in-flight limit is split, each worker getting
 *     max(1, floor(maxInFlightPerAgent / workers)), so the calls outstanding at
 *     one agent stay within the limit (unless the limit is below the number of
 *     workers: then one each). Each worker keeps its own estimate of the
 *     agent's cost per request from its own calls: it measures its own share
 *     of the agent, which is what its own queue waits for;
 *   - SIGHUP: the primary re-reads and validates the config once and, only if
 *     it is valid, sends it to every worker, which applies it as a single
 *     process would (proxy/reload.ts); one line says how many applied it;
 *   - metrics: one scrape on the metrics listener, in the primary: every
 *     worker's registry aggregated by prom-client's AggregatorRegistry (sums;
 *     the agent health gauge, the same in every worker, is taken once), plus
 *     the primary's own worker gauges;
 *   - logs: every worker writes its lines with a `worker` field (its index) to
 *     the same stdout; the primary logs worker starts and exits.
 *
 * A worker that exits unexpectedly is replaced (same index) after a backoff
 * that doubles with each recent exit; more than CRASH_LIMIT exits within
 * CRASH_WINDOW_MS stop the whole proxy with exit code 1, so systemd sees it.
 * SIGTERM/SIGINT drain every worker (each closes as a single process does)
 * and the primary exits 0. A worker whose primary has gone stops too.
 */
import cluster, { type Worker } from "node:cluster";
import client from "prom-client";
import { EXIT } from "../shared/cli.ts";
import { ConfigError, deepFreeze } from "../shared/config.ts";
import { createLogger, type Logger } from "../shared/logging.ts";
import { startMetricsListener, type MetricsListener } from "../shared/metrics.ts";
import { VERSION } from "../shared/version.ts";
import { AgentPool, type SharedHealth } from "./agent-client.ts";
import { describeConfig, loadProxyConfig, type ProxyConfig } from "./config.ts";
import { type RunningProxy, serve } from "./main.ts";
import { type LeaseAsk, type LeaseGrant, LeasedQuotas, QuotaLeaser } from "./quota-lease.ts";
import { applyReload, describeKeyStores } from "./reload.ts";

/** More than this many worker exits within CRASH_WINDOW_MS stop the proxy (exit 1). */
export const CRASH_LIMIT = 5;
export const CRASH_WINDOW_MS = 30_000;
/** The first replacement waits this long; each further recent exit doubles it, up to BACKOFF_MAX_MS. */
const BACKOFF_MS = 100;
const BACKOFF_MAX_MS = 5000;
/** A worker gets this long to drain at a stop before it is killed. */
const STOP_GRACE_MS = 5000;
/** How long the primary waits for every worker to confirm a reload. */
const RELOAD_WAIT_MS = 5000;

type ToWorker =
  | { t: "start"; index: number; workers: number; config: ProxyConfig; health: SharedHealth }
  | { t: "health"; health: SharedHealth }
  | { t: "reload"; seq: number; config: ProxyConfig }
  | { t: "stop" }
  | LeaseGrant;

type ToPrimary =
  | { t: "ready" }
  | { t: "started"; url: string }
  | { t: "refresh" }
  | { t: "reloaded"; seq: number; problem?: string }
  | LeaseAsk;

/** The config a worker runs: the per-agent in-flight limit split between the workers. */
export function workerConfig(config: Readonly<ProxyConfig>, workers: number): ProxyConfig {
  return {
    ...config,
    admission: { ...config.admission, maxInFlightPerAgent: Math.max(1, Math.floor(config.admission.maxInFlightPerAgent / workers)) },
  };
}

function isMessage(m: unknown): m is { t: string } {
  return typeof m === "object" && m !== null && typeof (m as { t?: unknown }).t === "string";
}

/** The primary: forks `workers` workers and supervises them until SIGTERM/SIGINT (0) or a crash loop (1). */
export async function runPrimary(file: string, initial: Readonly<ProxyConfig>, log: Logger, workers: number): Promise<number> {
  let config = initial;
  const agentsFor = (c: Readonly<ProxyConfig>) => c.agents.map((a) => ({ ...a, connections: 1 }));
  const send = (w: Worker | undefined, m: ToWorker) => {
    if (w?.isConnected()) w.send(m);
  };
  const slots: Array<Worker | undefined> = new Array(workers).fill(undefined);
  const live = () => slots.filter((w): w is Worker => w !== undefined);
  const broadcast = (m: ToWorker) => {
    for (const w of live()) send(w, m);
  };

  // The one health refresher (health calls only: one channel per agent).
  const agents = new AgentPool({
    agents: agentsFor(config),
    identity: config.identity,
    deadlineMs: config.agentDeadlineMs,
    healthDeadlineMs: config.healthDeadlineMs,
    healthRefreshMs: config.healthRefreshMs,
    log: log.child({ component: "agents" }),
    onRefreshed: () => broadcast({ t: "health", health: agents.sharedHealth() }),
  }).start();
  const quotas = new QuotaLeaser();

  // The primary's own series (the workers' come through the aggregator).
  const own = new client.Registry();
  const liveGauge = new client.Gauge({
    name: "xks_proxy_workers",
    help: "Proxy worker processes serving now",
    registers: [own],
  });
  const exitsCounter = new client.Counter({
    name: "xks_proxy_worker_exits_total",
    help: "Proxy worker processes that exited unexpectedly (each is replaced)",
    registers: [own],
  });
  const aggregator = new client.AggregatorRegistry();

  const index = new Map<Worker, number>();
  const started = new Set<number>();
  let startedOnce = false;
  let stopping = false;
  const exits: number[] = [];
  let reload: { seq: number; waiting: Set<Worker>; applied: number; problems: string[]; timer: NodeJS.Timeout } | undefined;
  let reloadSeq = 0;
  let metricsListener: MetricsListener | undefined;

  let finish!: (code: number) => void;
  const finished = new Promise<number>((resolve) => {
    finish = resolve;
  });

  const fork = (i: number) => {
    const w = cluster.fork({ XKS_PROXY_WORKER: String(i) });
    slots[i] = w;
    index.set(w, i);
    w.on("message", (m: unknown) => onMessage(w, i, m));
  };

  const reloadDone = () => {
    if (!reload) return;
    clearTimeout(reload.timer);
    const r = reload;
    reload = undefined;
    log.info(
      { workers, applied: r.applied, keyStores: describeKeyStores(config), ...(r.problems.length ? { problems: r.problems } : {}) },
      `key stores and identities reloaded by ${r.applied} of ${workers} workers, and the TLS certificate if any (other settings need a restart)`,
    );
  };

  const onMessage = (w: Worker, i: number, m: unknown) => {
    if (!isMessage(m)) return;
    const msg = m as ToPrimary;
    switch (msg.t) {
      case "ready":
        // A worker forked just before a stop began missed the stop: it gets it now instead of its config.
        if (stopping) send(w, { t: "stop" });
        else send(w, { t: "start", index: i, workers, config: workerConfig(config, workers), health: agents.sharedHealth() });
        break;
      case "started":
        started.add(i);
        liveGauge.set(live().length);
        log.info({ worker: i, pid: w.process.pid }, "worker started");
        if (!startedOnce && started.size === workers) {
          startedOnce = true;
          log.info({ version: VERSION, workers, config: describeConfig(config), url: msg.url }, "xks-proxy listening");
        }
        break;
      case "refresh":
        agents.kick();
        break;
      case "quota":
        send(w, quotas.ask(i, msg));
        break;
      case "reloaded":
        if (reload && reload.seq === msg.seq && reload.waiting.delete(w)) {
          reload.applied++;
          if (msg.problem) reload.problems.push(`worker ${i}: ${msg.problem}`);
          if (reload.waiting.size === 0) reloadDone();
        }
        break;
    }
  };

  cluster.on("exit", (w, code, signal) => {
    const i = index.get(w);
    index.delete(w);
    if (i === undefined || slots[i] !== w) return;
    slots[i] = undefined;
    started.delete(i);
    liveGauge.set(live().length);
    if (reload?.waiting.delete(w) && reload.waiting.size === 0) reloadDone();
    if (stopping) {
      if (live().length === 0) void shutdown(EXIT.ok);
      return;
    }
    exitsCounter.inc();
    const now = performance.now();
    exits.push(now);
    while (exits.length > 0 && now - exits[0] > CRASH_WINDOW_MS) exits.shift();
    if (!startedOnce) {
      log.fatal({ worker: i, pid: w.process.pid, code, signal }, "a worker could not start; stopping");
      void stop("worker start failure", EXIT.failure);
      return;
    }
    if (exits.length > CRASH_LIMIT) {
      log.fatal(
        { worker: i, pid: w.process.pid, code, signal, exits: exits.length, windowMs: CRASH_WINDOW_MS },
        "workers keep exiting; stopping the proxy",
      );
      void stop("crash loop", EXIT.failure);
      return;
    }
    const delay = Math.min(BACKOFF_MAX_MS, BACKOFF_MS * 2 ** (exits.length - 1));
    log.warn({ worker: i, pid: w.process.pid, code, signal, replaceInMs: delay }, "worker exited; replacing it");
    setTimeout(() => {
      if (!stopping && slots[i] === undefined) fork(i);
    }, delay);
  });

  let exitCode: number = EXIT.ok;
  let shuttingDown = false;
  const shutdown = async (code: number) => {
    if (shuttingDown) return;
    shuttingDown = true;
    agents.close();
    if (metricsListener) await metricsListener.close();
    log.info("stopped");
    log.flush();
    finish(code === EXIT.ok ? exitCode : code);
  };
  const stop = (why: string, code: number = EXIT.ok) => {
    if (stopping) return;
    stopping = true;
    exitCode = code;
    log.info({ signal: why, workers: live().length }, "shutting down");
    process.off("SIGTERM", onTerm);
    process.off("SIGINT", onInt);
    process.off("SIGHUP", onHup);
    if (live().length === 0) {
      void shutdown(code);
      return;
    }
    broadcast({ t: "stop" });
    const kill = setTimeout(() => {
      for (const w of live()) w.process.kill("SIGKILL");
    }, STOP_GRACE_MS * 2);
    kill.unref();
  };
  const onTerm = () => stop("SIGTERM");
  const onInt = () => stop("SIGINT");
  const onHup = () => {
    let next: Readonly<ProxyConfig>;
    try {
      next = loadProxyConfig(file, process.env);
    } catch (e) {
      log.error(
        { problems: e instanceof ConfigError ? e.problems : [(e as Error).message] },
        "reload rejected; keeping the running config",
      );
      return;
    }
    config = next;
    void agents.updateIdentities(next.identity, agentsFor(next));
    if (reload) reloadDone();
    const seq = ++reloadSeq;
    const targets = live();
    reload = {
      seq,
      waiting: new Set(targets),
      applied: 0,
      problems: [],
      timer: setTimeout(reloadDone, RELOAD_WAIT_MS),
    };
    for (const w of targets) send(w, { t: "reload", seq, config: workerConfig(next, workers) });
    if (targets.length === 0) reloadDone();
  };
  process.on("SIGTERM", onTerm);
  process.on("SIGINT", onInt);
  process.on("SIGHUP", onHup);

  if (config.metrics) {
    const source = {
      contentType: aggregator.contentType,
      metrics: async () => `${await aggregator.clusterMetrics()}\n${await own.metrics()}`,
    };
    try {
      metricsListener = await startMetricsListener(source, config.metrics, log);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      log.fatal(
        { err: { code, message: (err as Error).message } },
        `cannot start the metrics listener on ${config.metrics.host}:${config.metrics.port}`,
      );
      agents.close();
      log.flush();
      return EXIT.failure;
    }
  }
  log.info({ workers }, "starting workers");
  for (let i = 0; i < workers; i++) fork(i);
  return finished;
}

/** A worker: waits for its config from the primary, serves, and follows the primary's health, quotas, reloads and stop. */
export function runWorker(): Promise<number> {
  return new Promise<number>((resolve) => {
    let running: RunningProxy | undefined;
    let log: Logger | undefined;
    let quotas: LeasedQuotas | undefined;
    let pendingHealth: SharedHealth | undefined;
    let stopping = false;
    const toPrimary = (m: ToPrimary) => {
      if (process.connected) process.send?.(m);
    };
    let lastRefreshAsk = Number.NEGATIVE_INFINITY;
    const follower = {
      // At most one ask per 100 ms: the primary limits its refreshes to one a second anyway.
      requestRefresh: () => {
        const now = performance.now();
        if (now - lastRefreshAsk < 100) return;
        lastRefreshAsk = now;
        toPrimary({ t: "refresh" });
      },
    };
    const stop = (why: string) => {
      if (stopping) return;
      stopping = true;
      log?.info({ signal: why }, "shutting down");
      const done = () => {
        log?.info("stopped");
        log?.flush();
        process.off("message", onMessage);
        if (process.connected) process.disconnect();
        resolve(EXIT.ok);
      };
      if (running) void running.close(STOP_GRACE_MS).then(done);
      else done();
    };
    const onMessage = (m: unknown) => {
      if (!isMessage(m)) return;
      const msg = m as ToWorker;
      switch (msg.t) {
        case "start": {
          const config = deepFreeze(msg.config);
          log = createLogger({ level: config.log.level, format: config.log.format, name: "xks-proxy" }).child({ worker: msg.index });
          const wlog = log;
          quotas = new LeasedQuotas(toPrimary, msg.workers);
          pendingHealth = msg.health;
          serve(config, wlog, { worker: { follower, quotas } }).then(
            (r) => {
              running = r;
              // Constructing one adds prom-client's answer to the primary's metrics requests.
              new client.AggregatorRegistry();
              client.AggregatorRegistry.setRegistries([r.metrics.registry]);
              if (pendingHealth) r.agents.applySharedHealth(pendingHealth);
              if (stopping) {
                void r.close(STOP_GRACE_MS);
                return;
              }
              toPrimary({ t: "started", url: r.url });
            },
            (e: unknown) => {
              wlog.fatal({ err: { code: (e as NodeJS.ErrnoException).code, message: (e as Error).message } }, "cannot start");
              wlog.flush();
              process.exitCode = EXIT.failure;
              process.off("message", onMessage);
              if (process.connected) process.disconnect();
              resolve(EXIT.failure);
            },
          );
          break;
        }
        case "health":
          pendingHealth = msg.health;
          running?.agents.applySharedHealth(msg.health);
          break;
        case "quota-grant":
          quotas?.answered(msg);
          break;
        case "reload": {
          if (!running || !log) break;
          const problem = applyReload(running, deepFreeze(msg.config), log);
          toPrimary({ t: "reloaded", seq: msg.seq, ...(problem ? { problem } : {}) });
          break;
        }
        case "stop":
          stop("stop from the primary");
          break;
      }
    };
    process.on("message", onMessage);
    // Messages sent before this listener existed would be lost: the primary sends the config on this.
    toPrimary({ t: "ready" });
    process.on("SIGTERM", () => stop("SIGTERM"));
    process.on("SIGINT", () => stop("SIGINT"));
    // The primary reloads every worker; a SIGHUP sent to the whole group must not kill this one.
    process.on("SIGHUP", () => {});
    // The primary has gone (killed): nobody supervises this worker any more.
    process.on("disconnect", () => stop("primary gone"));
  });
}

export const isWorker = (): boolean => cluster.isWorker;
