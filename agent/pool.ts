/**
 * The agent on more than one core (config `workers` > 1): this process is the
 * primary and forks the workers (agent/worker.ts) with node:cluster.
 *
 * The primary keeps everything that must be one: the agent's Unix socket (the
 * tunnels forward into it; the same private directory, stale-socket and 0600
 * checks as the single process), the tunnels, the owner's switches and the
 * policy file, the audit log (its only writer), the dashboard and the metrics
 * listener. It accepts each connection without reading from it and hands the
 * socket to the worker with the fewest open connections; the worker does the
 * TLS handshake and serves the connection's calls on its own PKCS#11 session.
 *
 * - Audit: a worker sends each finished call's record here and answers a key
 *   operation only after this process acknowledges it. Records are appended in
 *   arrival order, so the log stays one hash chain that `xks-agent audit verify`
 *   checks as before; a record that cannot be written refuses its call
 *   (INVALID_STATE), as in one process.
 * - Switches: a change of the owner's switches or of the policy file's rules is
 *   sent to every worker, which applies it before acknowledging. And this
 *   process checks the switches again when a key operation's record arrives:
 *   once `pause` (or disabling a key) has taken effect here, a worker's record of
 *   an operation that succeeded under the old state is written with result
 *   INVALID_STATE and `overruled` (why), and the call is refused. So after the
 *   primary has applied a pause, no key operation is answered successfully by
 *   any worker, even before the worker has the new state; once every worker has
 *   acknowledged (logged "owner controls in force on every worker"), none starts
 *   its HSM work either. The state file is followed as in one process.
 * - Health: a worker's deep check uses its own session; the tunnels and the
 *   audit head it reports come from here (sent when they change).
 * - A worker that exits is replaced (at once, or after a back-off of up to 5 s
 *   when it did not live 5 s); its connections and their calls in flight fail,
 *   the proxy's reconnects land on the workers that live.
 * - Stop: the listener closes, every worker drains its calls (records still
 *   acknowledged meanwhile) and exits; then the caller closes the audit log and
 *   the HSM.
 */
import cluster, { type Worker } from "node:cluster";
import { chmodSync } from "node:fs";
import { createServer, type Socket } from "node:net";
import { extname } from "node:path";
import { fileURLToPath } from "node:url";
import { errorMessage } from "../shared/errors.ts";
import type { Logger } from "../shared/logging.ts";
import type { AgentConfig } from "./config.ts";
import type { Controls } from "./controls.ts";
import type { LivePolicy } from "./policy.ts";
import { type ChannelIdentity, type OperationRecord, preparePrivateSocket } from "./server.ts";
import { encodeConfig, encodePolicy, type PrimaryView, type ToPrimary, type ToWorker } from "./worker-ipc.ts";

export interface WorkerPoolOptions {
  config: AgentConfig;
  /** How many workers (> 1). */
  count: number;
  controls: Controls;
  policy: LivePolicy;
  /** What health reports from this process's side, now. */
  view: () => PrimaryView;
  /** Writes a worker's record (audit, metrics, dashboard feed); returns why its call must be refused, or undefined. */
  record: (rec: OperationRecord) => string | undefined;
  log: Logger;
}

export interface WorkerPool {
  socketPath: string;
  /** The workers' process ids, by worker number (undefined while one is being replaced). */
  pids(): Array<number | undefined>;
  setIdentity(id: ChannelIdentity): void;
  close(graceMs?: number): Promise<void>;
}

/** A worker that lived less than this before exiting is restarted after a back-off. */
const QUICK_EXIT_MS = 5000;
const MAX_BACKOFF_MS = 5000;
/** How often the primary's view (tunnels, audit head) is compared with what the workers last got. */
const VIEW_MS = 100;

interface Slot {
  n: number;
  worker: Worker;
  /** init was sent: later broadcasts reach it in order. */
  inited: boolean;
  ready: boolean;
  conns: number;
  startedAt: number;
  ackedSeq: number;
  exited: Promise<void>;
}

/**
 * Why a worker's successful key operation must not be answered: the owner's
 * switches as this process sees them now (paused, or the key disabled for
 * crypto). Undefined when it may be.
 */
export function lateRefusal(controls: Pick<Controls, "paused" | "isKeyDisabled">, rec: OperationRecord): string | undefined {
  if (rec.result !== "OK" || rec.operation === "GetHealthStatus") return undefined;
  if (controls.paused) return "the owner has paused the agent";
  if ((rec.operation === "Encrypt" || rec.operation === "Decrypt") && controls.isKeyDisabled(rec.keyId))
    return `key ${rec.keyId} is disabled by the owner`;
  return undefined;
}

export async function startWorkerPool(o: WorkerPoolOptions): Promise<WorkerPool> {
  const { log, controls, policy } = o;
  const here = fileURLToPath(import.meta.url);
  // The worker's entry beside this module (.ts under tsx, .js when built); node flags are inherited.
  cluster.setupPrimary({ exec: fileURLToPath(new URL(`./worker-main${extname(here)}`, import.meta.url)), args: [] });
  const configText = encodeConfig(o.config);
  const slots: Array<Slot | undefined> = new Array(o.count).fill(undefined);
  const quickExits: number[] = new Array(o.count).fill(0);
  const respawns = new Set<NodeJS.Timeout>();
  let stopping = false;
  let seq = 0;
  let lastView = "";
  let identity: ChannelIdentity | undefined;

  const send = (slot: Slot, m: ToWorker, handle?: Socket): boolean => {
    if (!slot.worker.isConnected()) return false;
    slot.worker.send(m, handle as never, (err: Error | null) => {
      if (err && handle) {
        slot.conns--;
        handle.destroy();
      }
    });
    return true;
  };
  const live = () => slots.filter((s): s is Slot => s?.inited === true && s.worker.isConnected());

  /** Sends a change to every worker; resolves when each that got it has acknowledged it (or exited). */
  const broadcast = (make: (seq: number) => ToWorker): Promise<number> => {
    const s = ++seq;
    const m = make(s);
    const targets = live().filter((slot) => send(slot, m));
    return Promise.all(
      targets.map(
        (slot) =>
          new Promise<void>((resolve) => {
            const check = () => {
              if (slot.ackedSeq >= s || !slot.worker.isConnected()) {
                slot.worker.off("message", check);
                slot.worker.off("exit", check);
                resolve();
              }
            };
            slot.worker.on("message", check);
            slot.worker.on("exit", check);
            check();
          }),
      ),
    ).then(() => s);
  };

  const onRecords = (slot: Slot, recs: Array<[number, OperationRecord]>) => {
    const ok: number[] = [];
    const refused: Array<[number, string]> = [];
    for (const [id, rec] of recs) {
      let why: string | undefined;
      try {
        why = o.record(rec);
      } catch (err) {
        why = errorMessage(err);
      }
      if (id === 0) continue;
      if (why === undefined) ok.push(id);
      else refused.push([id, why]);
    }
    if (ok.length > 0 || refused.length > 0) send(slot, { t: "ack", ok, refused });
  };

  let startFailure: ((why: string) => void) | undefined;
  const fork = (n: number): Slot => {
    const worker = cluster.fork();
    let exitedResolve!: () => void;
    const slot: Slot = {
      n,
      worker,
      inited: false,
      ready: false,
      conns: 0,
      startedAt: Date.now(),
      ackedSeq: seq,
      exited: new Promise((r) => {
        exitedResolve = r;
      }),
    };
    slots[n] = slot;
    const sendInit = () => {
      const init: ToWorker = {
        t: "init",
        worker: n,
        config: configText,
        switches: controls.snapshot(),
        policy: encodePolicy(policy.rules()),
        view: o.view(),
      };
      slot.ackedSeq = seq;
      slot.inited = send(slot, init);
      if (identity) send(slot, { t: "identity", id: identity });
    };
    worker.on("message", (m: ToPrimary) => {
      switch (m.t) {
        case "hello":
          sendInit();
          break;
        case "recs":
          onRecords(slot, m.recs);
          break;
        case "switches-ack":
          slot.ackedSeq = Math.max(slot.ackedSeq, m.seq);
          break;
        case "closed":
          slot.conns--;
          break;
        case "ready":
          slot.ready = true;
          worker.emit("xks-ready");
          break;
        case "fatal":
          log.error({ worker: n, err: m.message }, "worker cannot serve");
          startFailure?.(m.message);
          break;
      }
    });
    worker.once("exit", (code, signal) => {
      exitedResolve();
      if (slots[n] === slot) slots[n] = undefined;
      if (stopping) return;
      if (startFailure) {
        // At start: the start fails (the caller stops the others); nothing is replaced.
        startFailure(`worker ${n} exited at start (${signal ?? `code ${code}`})`);
        return;
      }
      const lived = Date.now() - slot.startedAt;
      quickExits[n] = lived < QUICK_EXIT_MS ? quickExits[n] + 1 : 0;
      const delay = quickExits[n] === 0 ? 0 : Math.min(MAX_BACKOFF_MS, 100 * 2 ** quickExits[n]);
      log.error(
        { worker: n, pid: worker.process.pid, code, signal, connections: slot.conns, restartInMs: delay },
        "worker exited; its connections are lost; starting another",
      );
      log.flush();
      const timer = setTimeout(() => {
        respawns.delete(timer);
        if (!stopping) fork(n);
      }, delay);
      respawns.add(timer);
    });
    return slot;
  };

  // Start: every worker ready, or the first that cannot serve fails the start.
  await new Promise<void>((resolve, reject) => {
    startFailure = (why) => {
      startFailure = undefined;
      reject(new Error(why));
    };
    let ready = 0;
    for (let n = 0; n < o.count; n++) {
      fork(n).worker.once("xks-ready", () => {
        if (++ready === o.count && startFailure) {
          startFailure = undefined;
          resolve();
        }
      });
    }
  }).catch(async (err: Error) => {
    stopping = true;
    for (const s of slots) s?.worker.process.kill("SIGKILL");
    await Promise.all(slots.map((s) => s?.exited));
    throw err;
  });

  const onControls = () =>
    void broadcast((s) => ({ t: "switches", seq: s, switches: controls.snapshot() })).then((s) => {
      if (s === seq)
        log.info({ paused: controls.paused, disabledKeys: controls.snapshot().disabledKeys }, "owner controls in force on every worker");
    });
  const onPolicy = () =>
    void broadcast((s) => ({ t: "policy", seq: s, policy: encodePolicy(policy.rules()) })).then(() =>
      log.info({ digest: policy.rules()?.digest ?? null }, "policy in force on every worker"),
    );
  controls.on("change", onControls);
  policy.on("loaded", onPolicy);
  const pushView = () => {
    const view = o.view();
    const text = JSON.stringify(view);
    if (text === lastView) return;
    lastView = text;
    for (const slot of live()) send(slot, { t: "view", view });
  };
  const viewTimer = setInterval(pushView, VIEW_MS);
  viewTimer.unref();

  // The socket the tunnels forward into: accepted here, served by a worker.
  preparePrivateSocket(o.config.socket);
  const listener = createServer({ pauseOnConnect: true }, (socket) => {
    let best: Slot | undefined;
    for (const s of slots) if (s?.ready && s.worker.isConnected() && (!best || s.conns < best.conns)) best = s;
    if (!best) {
      log.warn("no worker can take a connection (all being replaced); closed");
      socket.destroy();
      return;
    }
    best.conns++;
    if (!send(best, { t: "conn" }, socket)) {
      best.conns--;
      socket.destroy();
    }
  });
  await new Promise<void>((resolve, reject) => {
    listener.once("error", reject);
    listener.listen(o.config.socket, () => {
      listener.off("error", reject);
      resolve();
    });
  });
  chmodSync(o.config.socket, 0o600);
  log.info({ workers: o.count, pids: slots.map((s) => s?.worker.process.pid) }, "workers ready");

  return {
    socketPath: o.config.socket,
    pids: () => slots.map((s) => s?.worker.process.pid),
    setIdentity(id) {
      identity = id;
      for (const slot of live()) send(slot, { t: "identity", id });
    },
    async close(graceMs = 2000) {
      if (stopping) return;
      stopping = true;
      clearInterval(viewTimer);
      for (const t of respawns) clearTimeout(t);
      controls.off("change", onControls);
      policy.off("loaded", onPolicy);
      await new Promise<void>((resolve) => listener.close(() => resolve()));
      const running = slots.filter((s): s is Slot => s !== undefined);
      for (const s of running) if (!send(s, { t: "stop" })) s.worker.process.kill("SIGKILL");
      // A worker drains for graceMs; one that has not exited well after that is killed.
      const killer = setTimeout(() => {
        for (const s of running) s.worker.process.kill("SIGKILL");
      }, graceMs + 3000);
      await Promise.all(running.map((s) => s.exited));
      clearTimeout(killer);
    },
  };
}
