/**
 * Overload and bursts, from a KMS-like caller (loadgen/kms.ts): what KMS sees
 * when more is asked than the chain can do.
 *  - overload: the normal rate (half the measured capacity) for a few seconds,
 *    then twice the capacity for `overloadS`, then the normal rate again;
 *    goodput, how fast refusals come, whether any success comes after 250 ms,
 *    and how soon p99 is back to normal after the overload stops;
 *  - bursts of 200, 400 and 800 simultaneous requests on warm connections,
 *    and the first burst after a fresh start (cold: new daemons, new
 *    connections).
 */
import type { BurstResult, KmsLoadResult, PhaseResult } from "./loadgen/kms.ts";
import type { Case } from "./loadgen/protocol.ts";
import { startCpuMeter } from "./procstat.ts";
import { int, ms, progress, type Target } from "./report.ts";
import type { Rig } from "./rig.ts";

/** KMS gives up on a proxy call after this long. */
export const KMS_TIMEOUT_MS = 250;
/** A refusal counts as fast within this. */
export const FAST_REFUSAL_MS = 20;

export interface OverloadResults {
  capacity: number;
  /** Where the capacity figure came from. */
  capacitySource: string;
  load: KmsLoadResult;
  /** Cores used by processes outside the chain during the overload phase. */
  otherCores: number;
  /** p99 of the requests sent in the first second after the overload, and in the rest of that phase. */
  afterP99: { firstSecond: number; rest: number };
  /** The "normal" p99 the recovery is judged against: the phase before the overload's, × 1.5 + 5 ms (noise on a shared machine). */
  normalP99: number;
  bursts: Array<BurstResult & { otherCores: number }>;
}

export interface OverloadOptions {
  capacity: number;
  capacitySource: string;
  overloadS: number;
  normalS: number;
  case: Case;
}

/** The overload run and the warm bursts on a running chain. */
export async function measureOverload(
  rig: Rig,
  o: OverloadOptions,
): Promise<Omit<OverloadResults, "bursts"> & { warm: OverloadResults["bursts"] }> {
  const normal = Math.round(o.capacity / 2);
  const over = Math.round(o.capacity * 2);
  progress(
    `5/5 overload: KMS-like caller (open loop, ${KMS_TIMEOUT_MS} ms timeout): ${int(normal)}/s ${o.normalS} s → ${int(over)}/s ${o.overloadS} s → ${int(normal)}/s ${o.normalS} s`,
  );
  let meter: ReturnType<typeof startCpuMeter> | undefined;
  let overMeter: ReturnType<typeof startCpuMeter> | undefined;
  let otherCores = NaN;
  const timers: NodeJS.Timeout[] = [];
  const load = await rig.gen.kms(
    {
      kind: "kms",
      case: o.case,
      phases: [
        { rate: normal, durationS: o.normalS },
        { rate: over, durationS: o.overloadS },
        { rate: normal, durationS: o.normalS },
      ],
      timeoutMs: KMS_TIMEOUT_MS,
      sockets: 2048,
    },
    () => {
      meter = startCpuMeter(rig.procs);
      timers.push(setTimeout(() => (overMeter = startCpuMeter(rig.procs)), o.normalS * 1000));
      timers.push(setTimeout(() => (otherCores = overMeter?.stop().otherCores ?? NaN), (o.normalS + o.overloadS) * 1000));
    },
  );
  for (const t of timers) clearTimeout(t);
  meter?.stop();
  const [before, during, after] = load.phases;
  const normalP99 = before.allLatency.p99 * 1.5 + 5;
  const afterP99 = { firstSecond: after.p99FirstSecond, rest: after.p99AfterFirstSecond };
  progress(
    `   overload: ${phaseLine(during)}; after: p99 ${ms(afterP99.firstSecond)} ms in its first second, ${ms(afterP99.rest)} ms after`,
  );

  const warm: OverloadResults["bursts"] = [];
  for (const size of [200, 400, 800]) {
    await new Promise((r) => setTimeout(r, 1500));
    warm.push(await oneBurst(rig, o.case, size, false));
  }
  return { capacity: o.capacity, capacitySource: o.capacitySource, load, otherCores, afterP99, normalP99, warm };
}

export async function oneBurst(rig: Rig, c: Case, size: number, cold: boolean): Promise<BurstResult & { otherCores: number }> {
  let meter: ReturnType<typeof startCpuMeter> | undefined;
  const b = await rig.gen.burst({ kind: "burst", case: c, size, cold, lateMs: KMS_TIMEOUT_MS, timeoutMs: 10_000 }, () => {
    meter = startCpuMeter(rig.procs);
  });
  const otherCores = meter?.stop().otherCores ?? NaN;
  progress(`   burst ${size}${cold ? " (cold)" : ""}: ${burstLine(b)}`);
  return { ...b, otherCores };
}

const refusedText = (r: Record<string, number>) =>
  Object.entries(r)
    .map(([k, v]) => `${int(v)} ${k}`)
    .join(", ") || "0";
const refusedCount = (r: Record<string, number>) => Object.values(r).reduce((a, b) => a + b, 0);

function phaseLine(p: PhaseResult): string {
  return (
    `goodput ${int(p.goodput)}/s, ${int(p.ok)} ok, refused ${refusedText(p.refused)} (p99 ${ms(p.refusedLatency.p99)} ms), ` +
    `${int(p.timeouts)} timeouts, ${p.wrong} wrong, ${p.transport} transport errors`
  );
}

function burstLine(b: BurstResult): string {
  const late = b.lateOk + b.lateRefused + b.timeouts + b.transport;
  return (
    `${int(b.ok)} ok in time, refused ${refusedText(b.refused)}, ${int(late)} late or unanswered ` +
    `(${b.lateOk} successes after ${KMS_TIMEOUT_MS} ms), p50 ${ms(b.allLatency.p50)} ms, p99 ${ms(b.allLatency.p99)} ms, max ${ms(b.allLatency.max)} ms`
  );
}

/** The report's section for overload and bursts. */
export function renderOverload(
  o: OverloadResults,
  fmt: { table: (head: string[], rows: string[][], indent?: string) => string },
): string[] {
  const out: string[] = [];
  out.push(
    "",
    `5) OVERLOAD AND BURSTS: a KMS-like caller (open loop, new connections when none is idle, gives up after ${KMS_TIMEOUT_MS} ms); Encrypt 32 B`,
    `   capacity ${int(o.capacity)} req/s (${o.capacitySource}); goodput = correct answers within ${KMS_TIMEOUT_MS} ms of the send, per second`,
  );
  const names = ["normal (½ capacity)", "OVERLOAD (2× capacity)", "normal again"];
  out.push(
    fmt.table(
      [
        "phase",
        "offered/s",
        "secs",
        "goodput/s",
        "% capacity",
        "ok p99 ms",
        "refused (429/503)",
        "refused p99 ms",
        "timeouts",
        "200s after 250 ms",
        "wrong",
        "gen lag max",
      ],
      o.load.phases.map((p, k) => [
        names[k] ?? `phase ${k + 1}`,
        int(p.rate),
        String(p.durationS),
        int(p.goodput),
        `${((100 * p.goodput) / o.capacity).toFixed(0)} %`,
        ms(p.okLatency.p99),
        refusedText(p.refused),
        ms(p.refusedLatency.p99),
        int(p.timeouts),
        String(p.lateOk),
        String(p.wrong + p.transport),
        ms(p.maxSendLagMs),
      ]),
      "   ",
    ),
  );
  const after = o.load.phases[2];
  out.push(
    `   after the overload: p99 ${ms(o.afterP99.firstSecond)} ms in the first second, ${ms(o.afterP99.rest)} ms from then on ` +
      `(normal: ${ms(o.load.phases[0].allLatency.p99)} ms before the overload); p99 per 100 ms in the first second: ${after.p99BySlot
        .slice(0, 10)
        .map((v) => ms(v))
        .join(" ")} ms`,
    `   other load during the overload: ${Number.isFinite(o.otherCores) ? o.otherCores.toFixed(2) : "–"} cores; generator loop stall max ${ms(o.load.generatorLoopDelayMaxMs)} ms`,
    "   bursts: all requests signed beforehand and sent at once; warm = one open keep-alive connection per request, cold = the first",
    "   burst after the chain started, on new connections; late = answered after 250 ms (no client timeout here, to see them)",
  );
  out.push(
    fmt.table(
      [
        "burst",
        "ok ≤ 250 ms",
        "refused (429/503)",
        "late or unanswered",
        "200s after 250 ms",
        "wrong",
        "p50 ms",
        "p99 ms",
        "max ms",
        "other load",
      ],
      o.bursts.map((b) => [
        `${b.size}${b.cold ? " cold (first after start)" : " warm"}`,
        int(b.ok),
        refusedText(b.refused),
        int(b.lateOk + b.lateRefused + b.timeouts + b.transport),
        String(b.lateOk),
        String(b.wrong),
        ms(b.allLatency.p50),
        ms(b.allLatency.p99),
        ms(b.allLatency.max),
        Number.isFinite(b.otherCores) ? b.otherCores.toFixed(2) : "–",
      ]),
      "   ",
    ),
  );
  return out;
}

export function overloadTargets(o: OverloadResults): Target[] {
  const during = o.load.phases[1];
  const late = (b: BurstResult) => b.lateOk + b.lateRefused + b.timeouts + b.transport;
  const allLateOk = o.load.phases.reduce((n, p) => n + p.lateOk, 0) + o.bursts.reduce((n, b) => n + b.lateOk, 0);
  return [
    {
      name: "overload at 2× capacity: goodput ≥ 90 % of capacity",
      met: during.goodput >= 0.9 * o.capacity,
      detail: `${int(during.goodput)}/s of ${int(o.capacity)}/s (${((100 * during.goodput) / o.capacity).toFixed(0)} %)`,
    },
    {
      name: `overload: excess refused with 429/503 within ${FAST_REFUSAL_MS} ms (p99), none left to time out`,
      met: refusedCount(during.refused) > 0 && during.refusedLatency.p99 <= FAST_REFUSAL_MS && during.timeouts === 0,
      detail: `refused ${refusedText(during.refused)}, p99 ${ms(during.refusedLatency.p99)} ms, ${int(during.timeouts)} timeouts`,
    },
    {
      name: "zero successful answers after 250 ms",
      met: allLateOk === 0,
      detail: `${allLateOk} (bursts; under the KMS-like caller's 250 ms timeout a late answer is a timeout, counted above)`,
    },
    {
      name: "p99 back to normal within 1 s after the overload stops",
      met: o.afterP99.rest <= o.normalP99,
      detail: `p99 from 1 s after: ${ms(o.afterP99.rest)} ms; before the overload ${ms(o.load.phases[0].allLatency.p99)} ms (allowed ${ms(o.normalP99)}: × 1.5 + 5 ms); first second ${ms(o.afterP99.firstSecond)} ms`,
    },
    {
      name: "bursts 200/400/800 warm and the first cold: every request answered within 250 ms (success or 429)",
      met: o.bursts.every((b) => late(b) === 0 && b.wrong === 0),
      detail: o.bursts.map((b) => `${b.size}${b.cold ? " cold" : ""}: ${late(b)} late`).join("; "),
    },
  ];
}
