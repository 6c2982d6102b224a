/**
 * Builds (gcc, cached under .bench/bin) and drives delayline.c: the process
 * that owns both TUN devices of the simulated WAN and holds every packet for
 * the one-way delay. It reads commands on stdin and answers one line each; it
 * exits when its stdin closes, so it cannot outlive the bench.
 */
import { execFileSync, spawn, type ChildProcess } from "node:child_process";
import { existsSync, mkdirSync, readFileSync, statSync } from "node:fs";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";

const SOURCE = fileURLToPath(new URL("./delayline.c", import.meta.url));

export interface LinkCounters {
  /** Packets, TCP segments with payload, and bytes, per direction: a = agent→EC2, b = EC2→agent. */
  packets: { a: number; b: number };
  dataSegments: { a: number; b: number };
  bytes: { a: number; b: number };
  bursts: { a: number; b: number };
  drops: number;
}

/** One TCP segment with payload, as it entered the line. */
export interface Segment {
  /** CLOCK_MONOTONIC ns (process.hrtime's clock). */
  tNs: bigint;
  /** a = agent→EC2, b = EC2→agent. */
  dir: "a" | "b";
  bytes: number;
}

/** Compiles delayline.c into `binDir` unless an up-to-date binary is there; returns its path. */
export function buildDelayLine(binDir: string): string {
  mkdirSync(binDir, { recursive: true });
  const bin = join(binDir, "delayline");
  if (!existsSync(bin) || statSync(bin).mtimeMs < statSync(SOURCE).mtimeMs) {
    execFileSync("gcc", ["-O2", "-Wall", "-Wextra", "-o", bin, SOURCE], { stdio: ["ignore", "inherit", "inherit"] });
  }
  return bin;
}

export class DelayLine {
  private readonly proc: ChildProcess;
  private readonly lines: AsyncIterator<string>;
  private queue: Promise<unknown> = Promise.resolve();
  private readonly exited: Promise<void>;

  /** Starts the line between two new TUN devices; resolves once both exist. */
  static async start(bin: string, tunA: string, tunB: string, oneWayUs: number): Promise<DelayLine> {
    const line = new DelayLine(spawn(bin, [tunA, tunB, String(Math.round(oneWayUs))], { stdio: ["pipe", "pipe", "inherit"] }));
    const first = await line.lines.next();
    if (first.done || first.value !== "ready") {
      await line.stop();
      throw new Error(`delayline did not start (${first.done ? "exited" : first.value})`);
    }
    return line;
  }

  private constructor(proc: ChildProcess) {
    this.proc = proc;
    this.lines = createInterface({ input: proc.stdout! })[Symbol.asyncIterator]();
    this.exited = new Promise((resolve) => proc.once("exit", () => resolve()));
  }

  get pid(): number {
    return this.proc.pid!;
  }

  /** Sends one command and returns its one-line answer (commands are serialised). */
  private command(cmd: string): Promise<string> {
    const run = async () => {
      this.proc.stdin!.write(`${cmd}\n`);
      const r = await this.lines.next();
      if (r.done) throw new Error("delayline exited");
      if (r.value.startsWith("error")) throw new Error(`delayline ${cmd}: ${r.value}`);
      return r.value;
    };
    const p = this.queue.then(run, run);
    this.queue = p.catch(() => undefined);
    return p;
  }

  /** Count only TCP segments to or from this port (0: all). */
  async filter(port: number): Promise<void> {
    await this.command(`filter ${port}`);
  }

  async reset(): Promise<void> {
    await this.command("reset");
  }

  async counters(): Promise<LinkCounters> {
    const n = (await this.command("stats"))
      .split(" ")
      .filter((w) => /^\d+$/.test(w))
      .map(Number);
    return {
      packets: { a: n[0], b: n[1] },
      dataSegments: { a: n[2], b: n[3] },
      bytes: { a: n[4], b: n[5] },
      bursts: { a: n[6], b: n[7] },
      drops: n[8],
    };
  }

  /** The segment log since the last reset (written to `file`, then parsed). */
  async segments(file: string): Promise<Segment[]> {
    await this.command(`dump ${file}`);
    return readFileSync(file, "utf8")
      .split("\n")
      .filter(Boolean)
      .map((l) => {
        const [t, dir, bytes] = l.split(" ");
        return { tNs: BigInt(t), dir: dir as "a" | "b", bytes: Number(bytes) };
      });
  }

  /** Closing stdin ends it (and its TUN devices); SIGKILL if it lingers. */
  async stop(): Promise<void> {
    if (this.proc.exitCode !== null || this.proc.signalCode !== null) return;
    this.proc.stdin!.end();
    const timer = setTimeout(() => this.proc.kill("SIGKILL"), 2000);
    await this.exited;
    clearTimeout(timer);
  }
}
