/**
 * `npm run bench -- --scaling`: capacity (the step search: highest rate with
 * p99 < 100 ms and no errors) and CPU per request of every process, for each
 * pair of proxy and agent worker counts, each on a freshly started chain,
 * then the proxy alone in front of a fake agent (proxy-only.ts) for each
 * proxy worker count, and a sizing note from the CPU measured. CPU of a
 * daemon is its whole process tree (primary and workers, procstat.ts).
 *
 * A worker count of 1 is left out of the configs (their default: one
 * process, as before workers existed); any other count is written as
 * `workers`, and a daemon that refuses it gives a row with its error.
 */
import { readFileSync } from "node:fs";
import { availableParallelism } from "node:os";
import { join } from "node:path";
import type { LoadGenerator } from "./loadgen/generator.ts";
import type { Case } from "./loadgen/protocol.ts";
import { startProxyOnly, proxyOnlyRig } from "./proxy-only.ts";
import { int, ms, progress, type StepSearch, table } from "./report.ts";
import { loadTarget, openLoop, rigFor, type Rig, startBenchChain } from "./rig.ts";
import { stepSearch } from "./search.ts";

const ENC32: Case = { op: "Encrypt", size: 32 };

export interface ScalingRow {
  proxyWorkers: number;
  /** The chain's agent workers (none in proxy-only rows). */
  agentWorkers?: number;
  /** Highest rate that passed, req/s (0: none, or the set-up did not start). */
  capacity: number;
  search?: StepSearch;
  /** The step at capacity: its p99, CPU ms per request by role (primary and workers summed), other processes' load (cores). */
  atCapacity?: { rate: number; p99: number; completed: number; cpuMsPerRequest: Record<string, number>; otherCores: number };
  /** The most other processes on the machine used during any step, cores. */
  otherCores: number;
  /** Why the set-up did not run (e.g. a daemon refused `workers`). */
  error?: string;
}

export interface ScalingResults {
  workers: number[];
  stepS: number;
  cpuModel: string;
  cpus: number;
  chain: ScalingRow[];
  proxyOnly: ScalingRow[];
}

export const CHAIN_ROLES = ["proxy", "agent", "sshd", "generator"] as const;
export const PROXY_ONLY_ROLES = ["proxy", "fake agent", "generator"] as const;

/** `--workers`: a comma-separated list of counts 1..64 or `all` (this machine's cores); default 1, 2 and all, without repeats. */
export function parseWorkers(text: string | undefined, cores = availableParallelism()): number[] {
  const items = text === undefined ? ["1", "2", "all"] : text.split(",").map((s) => s.trim());
  const out = items.map((s) => {
    if (s === "all") return cores;
    const n = Number(s);
    if (!Number.isInteger(n) || n < 1 || n > 64) throw new Error(`--workers: "${s}" is not a count 1..64 or "all"`);
    return n;
  });
  return [...new Set(out)].sort((a, b) => a - b);
}

/** The config value for a count: 1 is left out (the default). */
const configured = (n: number) => (n === 1 ? undefined : n);

function cpuModel(): string {
  try {
    return /^model name\s*:\s*(.*)$/m.exec(readFileSync("/proc/cpuinfo", "utf8"))?.[1] ?? "?";
  } catch {
    return "?";
  }
}

/** The row for a finished search: the step at capacity and its CPU per request. */
function rowOf(search: StepSearch, base: Pick<ScalingRow, "proxyWorkers" | "agentWorkers">): ScalingRow {
  const at = search.steps.filter((s) => s.pass && s.rate === search.maxRate).pop();
  const cpuMsPerRequest: Record<string, number> = {};
  if (at?.cpuS && at.completed) for (const [role, s] of Object.entries(at.cpuS)) cpuMsPerRequest[role] = (s * 1000) / at.completed;
  return {
    ...base,
    capacity: search.maxRate,
    search,
    atCapacity: at ? { rate: at.rate, p99: at.p99, completed: at.completed ?? 0, cpuMsPerRequest, otherCores: at.otherCores } : undefined,
    otherCores: Math.max(0, ...search.steps.map((s) => s.otherCores).filter(Number.isFinite)),
  };
}

/**
 * One row: starts a set-up (its `stop` runs whatever happens next), points the generator at it
 * (`rig`), searches its capacity; a failure anywhere gives a row that says "did not run" and why.
 */
async function measureRow(
  base: Pick<ScalingRow, "proxyWorkers" | "agentWorkers">,
  start: () => Promise<{ stop(): Promise<void>; rig(): Promise<Rig> }>,
  hint: number,
  stepS: number,
): Promise<ScalingRow> {
  let setUp: { stop(): Promise<void>; rig(): Promise<Rig> } | undefined;
  try {
    setUp = await start();
    return rowOf(await searchOn(await setUp.rig(), hint, stepS), base);
  } catch (err) {
    const error = (err as Error).message.split("\n")[0];
    progress(`     did not run: ${error}`);
    return { ...base, capacity: 0, otherCores: NaN, error };
  } finally {
    await setUp?.stop();
  }
}

/** A warm-up at half the hint, then the step search from the hint. */
async function searchOn(rig: Rig, hint: number, stepS: number): Promise<StepSearch> {
  await rig.gen.run(openLoop(ENC32, hint / 2, 3));
  await new Promise((r) => setTimeout(r, 1000));
  return stepSearch(rig, ENC32, hint, stepS, "     ");
}

export interface ScalingOptions {
  dir: string;
  logLevel: string;
  workers: number[];
  stepS: number;
  /** Where the first search starts, req/s; each next one starts at the capacity found before it. */
  hint: number;
  sockets: number;
  /** Extra proxy config fields (the bench's --queue-target), for every proxy started here. */
  proxyExtra?: Record<string, unknown>;
  gen: LoadGenerator;
  /** Which parts: the chain's proxy × agent table, the proxy-only rows. */
  chain: boolean;
  proxyOnly: boolean;
}

export async function measureScaling(o: ScalingOptions): Promise<ScalingResults> {
  const res: ScalingResults = {
    workers: o.workers,
    stepS: o.stepS,
    cpuModel: cpuModel(),
    cpus: availableParallelism(),
    chain: [],
    proxyOnly: [],
  };
  let hint = o.hint;
  if (o.chain) {
    for (const pw of o.workers) {
      for (const aw of o.workers) {
        progress(
          `scaling: full chain, proxy workers ${pw}, agent workers ${aw}: a fresh chain, warm-up 3 s, step search (${o.stepS} s steps)`,
        );
        const row = await measureRow(
          { proxyWorkers: pw, agentWorkers: aw },
          async () => {
            const bc = await startBenchChain(join(o.dir, "scaling-chain"), o.logLevel, undefined, o.proxyExtra, {
              proxyWorkers: configured(pw),
              agentWorkers: configured(aw),
              // Every agent worker gets a channel: the agent hands each connection to one worker.
              agentConnections: configured(Math.ceil(aw / pw)),
            });
            return {
              stop: () => bc.chain.stop(),
              rig: async () => {
                await o.gen.init(loadTarget(bc.chain, o.sockets));
                return rigFor(bc, o.gen);
              },
            };
          },
          hint,
          o.stepS,
        );
        res.chain.push(row);
        if (row.capacity > 0) hint = row.capacity;
      }
    }
  }
  if (o.proxyOnly) {
    hint = o.hint;
    for (const pw of o.workers) {
      progress(`scaling: proxy only (fake agent), proxy workers ${pw}: warm-up 3 s, step search (${o.stepS} s steps)`);
      const dir = join(o.dir, "proxy-only");
      const row = await measureRow(
        { proxyWorkers: pw },
        async () => {
          const po = await startProxyOnly(dir, o.logLevel, configured(pw), o.proxyExtra);
          return {
            stop: () => po.stop(),
            rig: async () => {
              await o.gen.init(po.target(o.sockets));
              return proxyOnlyRig(po, o.gen, dir);
            },
          };
        },
        hint,
        o.stepS,
      );
      res.proxyOnly.push(row);
      if (row.capacity > 0) hint = row.capacity;
    }
  }
  return res;
}

// ---------------------------------------------------------------- the report

const cpuMs = (v: number | undefined) => (v !== undefined && Number.isFinite(v) ? v.toFixed(3) : "–");
const cores = (v: number) => (Number.isFinite(v) ? v.toFixed(2) : "–");
/** Requests per second one core gives at `msPerRequest` of CPU each. */
const perCore = (msPerRequest: number | undefined) => (msPerRequest !== undefined && msPerRequest > 0 ? int(1000 / msPerRequest) : "–");

function rowsOf(list: ScalingRow[], roles: readonly string[], first: (r: ScalingRow) => string[]): string[][] {
  return list.map((r) => {
    const c = r.atCapacity?.cpuMsPerRequest ?? {};
    const total = roles.reduce((sum, role) => sum + (c[role] ?? NaN), 0);
    if (r.error) return [...first(r), "did not run", "", ...roles.map(() => ""), "", ""];
    return [
      ...first(r),
      r.capacity > 0 ? int(r.capacity) : "< lowest step",
      ms(r.atCapacity?.p99),
      ...roles.map((role) => cpuMs(c[role])),
      cpuMs(total),
      `${cores(r.atCapacity?.otherCores ?? NaN)} / ${cores(r.otherCores)}`,
    ];
  });
}

function stepsOf(list: ScalingRow[], name: (r: ScalingRow) => string): string[] {
  return list.map((r) =>
    r.error
      ? `     ${name(r)}: did not run: ${r.error}`
      : `     ${name(r)}: ${(r.search?.steps ?? []).map((st) => `${int(st.rate)}${st.pass ? "✓" : "✗"}(${ms(st.p99)}${st.errors ? `, ${st.errors} err` : ""})`).join(" ")}`,
  );
}

const chainName = (r: ScalingRow) => `proxy ${r.proxyWorkers} × agent ${r.agentWorkers}`;
const proxyOnlyName = (r: ScalingRow) => `proxy ${r.proxyWorkers}, fake agent`;

export function renderScaling(s: ScalingResults): string {
  const out: string[] = [];
  const note =
    "CPU ms per request at capacity (the passing step at that rate), each daemon's primary and workers summed; other load: cores used by other processes during that step / during the busiest step";
  if (s.chain.length) {
    out.push(
      "",
      `SCALING, FULL CHAIN: Encrypt 32 B, capacity = highest open-loop rate with p99 < 100 ms and no errors (${s.stepS} s steps), each row a fresh chain`,
      table(
        [
          "proxy workers",
          "agent workers",
          "capacity req/s",
          "p99 ms",
          ...CHAIN_ROLES.map((r, i) => (i === 0 ? `CPU ms/req: ${r}` : r)),
          "total",
          "other load: at capacity / most",
        ],
        rowsOf(s.chain, CHAIN_ROLES, (r) => [String(r.proxyWorkers), String(r.agentWorkers)]),
        "   ",
      ),
      `   ${note}. Steps (req/s ✓ pass ✗ fail (p99 ms)):`,
      ...stepsOf(s.chain, chainName),
    );
  }
  if (s.proxyOnly.length) {
    out.push(
      "",
      "SCALING, PROXY ONLY: the real proxy (HTTP, SigV4) in front of a fake agent in its own process that answers at once; no SoftHSM, tunnel or sshd",
      table(
        [
          "proxy workers",
          "capacity req/s",
          "p99 ms",
          ...PROXY_ONLY_ROLES.map((r, i) => (i === 0 ? `CPU ms/req: ${r}` : r)),
          "total",
          "other load: at capacity / most",
        ],
        rowsOf(s.proxyOnly, PROXY_ONLY_ROLES, (r) => [String(r.proxyWorkers)]),
        "   ",
      ),
      `   ${note}. Steps:`,
      ...stepsOf(s.proxyOnly, proxyOnlyName),
    );
  }
  out.push(...sizingNote(s));
  return out.join("\n");
}

/** Requests per second per core of each daemon, from the CPU per request measured (1000 ms ÷ CPU ms per request). */
export function sizingNote(s: ScalingResults): string[] {
  const measured = [
    ...s.chain.map((r) => ({ r, name: `chain, ${chainName(r)}` })),
    ...s.proxyOnly.map((r) => ({ r, name: proxyOnlyName(r) })),
  ].filter(({ r }) => r.atCapacity);
  if (measured.length === 0) return [];
  const quota = 1800;
  const need = (v: number | undefined) => (v !== undefined && v > 0 ? ((quota * v) / 1000).toFixed(2) : "–");
  const maxOther = Math.max(0, ...measured.map(({ r }) => r.otherCores).filter(Number.isFinite));
  return [
    "",
    `SIZING: req/s one core gives each process = 1000 ms ÷ its CPU ms per request above; cores KMS's default quota of ${int(quota)} req/s per key store needs`,
    table(
      ["measured on", "req/s per proxy core", "per agent core", "per sshd core", `cores for ${int(quota)} req/s: proxy`, "agent", "sshd"],
      measured.map(({ r, name }) => {
        const c = r.atCapacity!.cpuMsPerRequest;
        return [name, perCore(c.proxy), perCore(c.agent), perCore(c.sshd), need(c.proxy), need(c.agent), need(c.sshd)];
      }),
      "   ",
    ),
    `   Measured on THIS machine only (${s.cpus} × ${s.cpuModel}, shared: other processes used up to ${cores(maxOther)} cores during the steps), at each row's`,
    "   capacity: CPU per request depends on the rate it was measured at, so each row's figures hold near its own rate; another CPU,",
    "   kernel, Node or load gives other figures. CPU per request is not capacity: a process also needs a core free when a request",
    "   arrives, and p99 < 100 ms needs headroom.",
  ];
}
