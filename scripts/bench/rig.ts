/**
 * The measuring rig around a running chain: the load generator, the
 * processes whose CPU is read, the daemons' logs, and `measure()`, which runs
 * one job and collects all three around its measured part.
 */
import { randomBytes } from "node:crypto";
import { type Chain, type ChainOptions, startChain } from "../../testbed/chain.ts";
import { onCleanup, trackSshdSessions } from "./cleanup.ts";
import { LoadGenerator } from "./loadgen/generator.ts";
import type { Case, JobSpec, Target } from "./loadgen/protocol.ts";
import { insideLatency, markLogs, type LogFiles } from "./logs.ts";
import { processTree } from "../../testbed/procs.ts";
import { startCpuMeter, type ProcessSet } from "./procstat.ts";
import { int, ms, progress, type Measured } from "./report.ts";

export interface BenchChain {
  chain: Chain;
  /** The chain's sshd session processes (remembered for cleanup). */
  sshdSessions(): number[];
}

/**
 * The test-bed's chain in `dir`, stopped at cleanup; resolves once the agent is ACTIVE.
 * `remoteAgent` puts the agent on the far side of a network link (the WAN part);
 * `workers` sets the proxy's and the agent's worker counts (not given: their configs leave `workers` out).
 */
export async function startBenchChain(
  dir: string,
  logLevel: string | undefined,
  remoteAgent?: ChainOptions["remoteAgent"],
  proxyExtra?: ChainOptions["proxyExtra"],
  workers: Pick<ChainOptions, "proxyWorkers" | "agentWorkers" | "agentConnections"> = {},
): Promise<BenchChain> {
  const chain = await startChain({ dir, logLevel, remoteAgent, proxyExtra, ...workers });
  const sessions = trackSshdSessions(chain.sshd, dir);
  onCleanup(`chain ${dir}`, () => chain.stop());
  try {
    await activeOrExited(chain);
  } catch (err) {
    await chain.stop();
    throw err;
  }
  sessions.pids();
  return { chain, sshdSessions: sessions.pids };
}

/** The last lines of a log, on one line (for an error message). */
export function lastLines(text: string, n = 3): string {
  return text.trim().split("\n").slice(-n).join(" | ").slice(0, 600);
}

/** chain.waitActive(), or an error as soon as the proxy or the agent has exited (e.g. it refused its config). */
async function activeOrExited(chain: Chain): Promise<void> {
  let waiting = true;
  const exited = (async () => {
    while (waiting) {
      for (const d of [chain.proxy, chain.agent]) if (!d.running) throw new Error(`the ${d.name} exited: ${lastLines(d.logs())}`);
      await new Promise((r) => setTimeout(r, 100));
    }
  })();
  try {
    await Promise.race([chain.waitActive(), exited]);
  } finally {
    waiting = false;
  }
}

export function loadTarget(chain: Chain, sockets: number): Target {
  return {
    url: chain.url,
    uriPath: chain.uriPath,
    region: chain.region,
    accessKeyId: chain.accessKeyId,
    secretAccessKey: chain.secretAccessKey,
    keyId: chain.keys.default,
    sockets,
  };
}

export function startGenerator(): LoadGenerator {
  const gen = new LoadGenerator();
  onCleanup("load generator", () => gen.stop());
  return gen;
}

export interface Rig {
  gen: LoadGenerator;
  procs: ProcessSet;
  logs: LogFiles;
}

/** A daemon's processes: its own and its workers' (its whole process tree). */
export const treeOf = (pid: number | undefined) => () => (pid === undefined ? [] : processTree(pid));

/** The rig for a chain. */
export function rigFor(bc: BenchChain, gen: LoadGenerator): Rig {
  return {
    gen,
    procs: {
      proxy: treeOf(bc.chain.proxy.pid),
      sshd: bc.sshdSessions,
      agent: treeOf(bc.chain.agent.pid),
      generator: () => [gen.pid],
    },
    logs: { proxy: bc.chain.proxy.logFile, agent: bc.chain.agent.logFile },
  };
}

export const caseName = (c: Case) => `${c.op} ${c.size} B`;

export const openLoop = (c: Case, rate: number, durationS: number, sampleDecrypts = 0): JobSpec => ({
  kind: "openLoop",
  cases: [c],
  rate,
  durationS,
  sampleDecrypts,
});

let quietWaitS = 0;

/** --quiet-wait: before each measurement, wait up to `seconds` for other processes to leave the CPUs alone. */
export function setQuietWait(seconds: number): void {
  quietWaitS = seconds;
}

/** Waits (up to the --quiet-wait limit) until processes outside the rig use under 0.15 cores over a second. */
export async function waitForQuiet(rig: Rig): Promise<void> {
  if (quietWaitS <= 0) return;
  const deadline = performance.now() + quietWaitS * 1000;
  for (;;) {
    const meter = startCpuMeter(rig.procs);
    await new Promise((r) => setTimeout(r, 1000));
    const other = meter.stop().otherCores;
    if (other < 0.15) return;
    if (performance.now() > deadline) {
      progress(`   other processes still use ${other.toFixed(2)} cores after ${quietWaitS} s of waiting; measuring anyway`);
      return;
    }
  }
}

const RUN_TAG = randomBytes(3).toString("hex");
let jobCount = 0;

/**
 * Runs one job. CPU is read over its measured part only (after signing ahead
 * and warm-up); the proxy's and agent's own latencies come from their logs,
 * found by the job's tag in the kmsRequestIds.
 */
export async function measure(rig: Rig, label: string, c: Case, spec: JobSpec): Promise<Measured> {
  const tag = `${RUN_TAG}j${++jobCount}`;
  const tagged = spec.kind === "grpc" ? spec : { ...spec, tag };
  await waitForQuiet(rig);
  const mark = markLogs(rig.logs);
  let meter: ReturnType<typeof startCpuMeter> | undefined;
  const result = await rig.gen.run(tagged, () => (meter = startCpuMeter(rig.procs)));
  const w = meter?.stop();
  const inside = spec.kind === "grpc" ? undefined : await insideLatency(mark, tag);
  const e = result.errors ? `, ${result.errors} ERRORS` : "";
  const other = w && w.otherCores > 0.2 ? ` (other processes kept ${w.otherCores.toFixed(2)} cores busy)` : "";
  progress(
    `   ${label}: ${int(result.completed)} done, p50 ${ms(result.latency.p50)} ms, p99 ${ms(result.latency.p99)} ms, ${int(result.achievedRate)}/s${e}${other}`,
  );
  const offered = spec.kind === "openLoop" ? { rate: spec.rate, durationS: spec.durationS } : undefined;
  return { label, case: c, offered, result, cpuS: w?.byRole ?? {}, otherCores: w?.otherCores, inside };
}
