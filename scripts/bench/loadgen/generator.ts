/** The parent's handle on the load-generator child process (child.ts): spawn, run jobs, stop. */
import { fork, type ChildProcess } from "node:child_process";
import { fileURLToPath } from "node:url";
import type { BurstResult, KmsLoadResult } from "./kms.ts";
import type { BurstSpec, ChildMessage, JobResult, JobSpec, KmsLoadSpec, ParentMessage, Target } from "./protocol.ts";

/** A message before it gets its id (Omit distributed over the union). */
type Unsent<T> = T extends unknown ? Omit<T, "id"> : never;

const CHILD = fileURLToPath(new URL("./child.ts", import.meta.url));

export class LoadGenerator {
  private readonly proc: ChildProcess;
  private nextId = 1;
  private readonly pending = new Map<number, { resolve(r: unknown): void; reject(e: Error): void; started?: () => void }>();
  private readonly exited: Promise<void>;

  constructor() {
    // The child inherits NODE_OPTIONS etc.; --import tsx runs the TypeScript directly.
    this.proc = fork(CHILD, [], {
      execArgv: ["--import", "tsx", ...(process.env.BENCH_GEN_NODE_ARGS ?? "").split(" ").filter(Boolean)],
      stdio: ["ignore", "inherit", "inherit", "ipc"],
    });
    this.exited = new Promise((resolve) => this.proc.once("exit", () => resolve()));
    this.proc.on("message", (m: ChildMessage) => {
      const p = this.pending.get(m.id);
      if (!p) return;
      if (m.type === "started") p.started?.();
      else {
        this.pending.delete(m.id);
        if (m.type === "done") p.resolve(m.result);
        else p.reject(new Error(`load generator: ${m.message}`));
      }
    });
    this.proc.once("exit", (code, signal) => {
      for (const p of this.pending.values()) p.reject(new Error(`load generator exited (${signal ?? code})`));
      this.pending.clear();
    });
  }

  get pid(): number {
    return this.proc.pid!;
  }

  private request(m: Unsent<ParentMessage>, started?: () => void): Promise<unknown> {
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject, started });
      this.proc.send({ ...m, id } as ParentMessage);
    });
  }

  async init(target: Target): Promise<void> {
    await this.request({ type: "init", target });
  }

  /** Runs a job; `started` is called when its measured part begins (after signing ahead and warm-up). */
  async run(spec: JobSpec, started?: () => void): Promise<JobResult> {
    return (await this.request({ type: "run", spec }, started)) as JobResult;
  }

  /** Runs the KMS-like caller (loadgen/kms.ts). */
  async kms(spec: KmsLoadSpec, started?: () => void): Promise<KmsLoadResult> {
    return (await this.request({ type: "kms", spec }, started)) as KmsLoadResult;
  }

  /** Sends one burst (loadgen/kms.ts). */
  async burst(spec: BurstSpec, started?: () => void): Promise<BurstResult> {
    return (await this.request({ type: "kms", spec }, started)) as BurstResult;
  }

  async stop(): Promise<void> {
    if (this.proc.exitCode !== null || this.proc.signalCode !== null) return;
    this.proc.disconnect();
    const timer = setTimeout(() => this.proc.kill("SIGKILL"), 3000);
    await this.exited;
    clearTimeout(timer);
  }
}
