/**
 * One agent worker process (config `workers` > 1; the primary is agent/pool.ts).
 *
 * A worker serves the gRPC calls of the connections the primary hands it:
 * the same service, channel TLS and peer checks as the single process
 * (agent/server.ts), on its own PKCS#11 session (its own Hsm, logged in with
 * the same PIN source) and its own event loop. What the owner controls stays
 * with the primary, and the worker holds copies that the primary pushes:
 *   - the owner's switches (pause, disabled keys) and the policy file's rules:
 *     applied before the worker acknowledges them, so once the primary has every
 *     worker's acknowledgement no new key operation starts under the old state;
 *   - what health reports from the primary's side (tunnels, audit head).
 * Every finished call's record goes to the primary, which writes the audit
 * log (one ordered, keyed chain), counts metrics and feeds the dashboard. A
 * key operation's answer leaves only after the primary has acknowledged its
 * record: a record the primary could not write, or an operation the owner's
 * switches had stopped meanwhile, is answered INVALID_STATE instead, as a
 * failed audit write is in one process. The operation's log line is written
 * here, with this worker's number.
 *
 * The worker ignores SIGINT (a terminal's Ctrl-C reaches the whole process
 * group; the primary coordinates the stop) and exits when the primary goes.
 */
import type { Socket } from "node:net";
import { createLogger, type Logger } from "../shared/logging.ts";
import { errorMessage } from "../shared/errors.ts";
import type { ControlState } from "./controls.ts";
import { Hsm, HsmOpenError } from "./hsm/hsm.ts";
import type { AgentOpContext } from "./ops/context.ts";
import { allowListMap, type PolicyRules } from "./policy.ts";
import { type InjectedAgentServer, type OperationRecord, startInjectedAgentServer } from "./server.ts";
import { decodeConfig, decodePolicy, type PrimaryView, type ToPrimary, type ToWorker } from "./worker-ipc.ts";
import { dirname, join } from "node:path";

/** The owner's switches as the primary last sent them. */
class SwitchesCopy {
  private state: ControlState;
  private disabled: ReadonlySet<string>;
  constructor(state: ControlState) {
    this.state = state;
    this.disabled = new Set(state.disabledKeys);
  }
  set(state: ControlState): void {
    this.state = state;
    this.disabled = new Set(state.disabledKeys);
  }
  get paused(): boolean {
    return this.state.paused;
  }
  get problem(): string | undefined {
    return this.state.problem;
  }
  isKeyDisabled(label: string): boolean {
    return this.disabled.has(label);
  }
}

/**
 * Sends records to the primary, all those finished in one turn of the event
 * loop in one message, and settles each one's promise when the primary
 * acknowledges it.
 */
class RecordChannel {
  private next = 1;
  private batch: Array<[number, OperationRecord]> = [];
  private readonly waiting = new Map<number, { resolve: () => void; reject: (err: Error) => void }>();

  constructor(private readonly send: (m: ToPrimary) => void) {}

  /** Health calls and calls refused at the door are counted, not audited: no acknowledgement is awaited. */
  record(rec: OperationRecord): Promise<void> | undefined {
    if (rec.operation === "GetHealthStatus" || rec.result === "UNAUTHENTICATED") {
      this.push(0, rec);
      return undefined;
    }
    const id = this.next++;
    return new Promise<void>((resolve, reject) => {
      this.waiting.set(id, { resolve, reject });
      this.push(id, rec);
    });
  }

  ack(ok: number[], refused: Array<[number, string]>): void {
    for (const id of ok) {
      this.waiting.get(id)?.resolve();
      this.waiting.delete(id);
    }
    for (const [id, why] of refused) {
      this.waiting.get(id)?.reject(new Error(why));
      this.waiting.delete(id);
    }
  }

  private push(id: number, rec: OperationRecord): void {
    if (this.batch.length === 0) queueMicrotask(() => this.flush());
    this.batch.push([id, rec]);
  }

  private flush(): void {
    const recs = this.batch;
    this.batch = [];
    this.send({ t: "recs", recs });
  }
}

/** Tells the primary why this worker cannot serve, then exits 1. */
function fatal(message: string): void {
  const m: ToPrimary = { t: "fatal", message };
  if (process.connected) process.send?.(m, undefined, {}, () => process.exit(1));
  else process.exit(1);
}

/** Looks for the token this many times, this far apart, before a worker gives up on it. */
const TOKEN_LOOKS = 5;
const TOKEN_LOOK_MS = 200;

/**
 * Opens the worker's session. The primary found the token just before forking, yet once in a
 * bench run a worker saw "tokens present: none" on the same token files and the agent could
 * not start (the cause was not pinned down; SoftHSM keeps a token as files that every process
 * reads and locks at C_Initialize). So a worker that finds no token with the label looks again
 * a few times before that counts as permanent. Only that stage is retried: a refused PIN never is.
 */
function openSeeingToken(hsm: Hsm, log: Logger): void {
  for (let look = 1; ; look++) {
    try {
      hsm.open();
      return;
    } catch (err) {
      if (!(err instanceof HsmOpenError && err.stage === "token" && look < TOKEN_LOOKS)) throw err;
      hsm.close();
      log.warn({ look, err: err.message }, "token not found at the worker's start; looking again");
      // Nothing else runs in a starting worker: wait synchronously.
      Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, TOKEN_LOOK_MS);
    }
  }
}

export function runWorker(): void {
  const send = (m: ToPrimary) => {
    if (process.connected) process.send?.(m);
  };
  // The primary is gone (stopped or killed): nothing can be recorded any more.
  process.on("disconnect", () => process.exit(1));
  process.on("SIGINT", () => {});
  process.once("message", (m: ToWorker) => {
    if (m.t !== "init") return;
    try {
      start(m, send);
    } catch (err) {
      fatal(errorMessage(err));
    }
  });
  // Messages that arrive before a listener exists are lost: the primary sends init on this.
  send({ t: "hello" });
}

function start(init: Extract<ToWorker, { t: "init" }>, send: (m: ToPrimary) => void): void {
  const config = decodeConfig(init.config);
  const log: Logger = createLogger({ level: config.log.level, format: config.log.format, name: "xks-agent" }).child({
    worker: init.worker,
  });
  const hsm = new Hsm(config.pkcs11, log, { refusalMemoFile: join(dirname(config.stateFile), "pin-refused.json") });
  try {
    openSeeingToken(hsm, log);
  } catch (err) {
    if (err instanceof HsmOpenError && err.permanent) {
      hsm.close();
      log.flush();
      fatal(err.message);
      return;
    }
    log.error({ err: (err as Error).message }, "HSM not available at start; will retry on each call");
  }
  const keyStores = allowListMap(config.keyStores);
  const switches = new SwitchesCopy(init.switches);
  let rules: PolicyRules | undefined = decodePolicy(init.policy, keyStores);
  let view: PrimaryView = init.view;
  const ctx: AgentOpContext = {
    hsm,
    ciphertextMetadata: config.ciphertextMetadata,
    healthKey: config.healthKey,
    keyStores,
    agentId: config.agentId,
    audit: () => view.audit,
    isKeyDisabled: (label) => switches.isKeyDisabled(label),
    rules: () => rules,
    tunnels: () => view.tunnels,
  };
  const records = new RecordChannel(send);
  const server: InjectedAgentServer = startInjectedAgentServer(
    { ctx, token: config.proxyToken, controls: switches, log, audit: (rec) => records.record(rec), maxQueued: config.maxQueued },
    { identity: config.identity, pins: config.proxyIdentities },
  );
  let stopping = false;
  process.on("message", (m: ToWorker, handle?: Socket) => {
    switch (m.t) {
      case "ack":
        records.ack(m.ok, m.refused);
        break;
      case "conn":
        if (!handle) break;
        if (stopping) {
          handle.destroy();
          break;
        }
        handle.once("close", () => send({ t: "closed" }));
        server.inject(handle);
        break;
      case "switches":
        switches.set(m.switches);
        send({ t: "switches-ack", seq: m.seq });
        break;
      case "policy":
        try {
          rules = decodePolicy(m.policy, keyStores);
        } catch (err) {
          // The primary checked the same file with the same allow-list: this cannot differ.
          log.error({ err: errorMessage(err) }, "policy from the primary rejected; keeping the last one");
        }
        send({ t: "switches-ack", seq: m.seq });
        break;
      case "view":
        view = m.view;
        break;
      case "identity":
        server.setIdentity(m.id);
        break;
      case "stop":
        if (stopping) break;
        stopping = true;
        void server.close().then(() => {
          hsm.close();
          log.info("worker stopped");
          process.exit(0);
        });
        break;
    }
  });
  log.info("worker ready");
  send({ t: "ready" });
}
