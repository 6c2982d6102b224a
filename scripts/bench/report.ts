/**
 * The bench's results (one JSON document, written to .bench/results.json) and
 * the printed tables. Every figure comes from the run, except the seed's,
 * which are static and labelled as measured earlier.
 */
import type { AuditCost } from "./audit-cost.ts";
import type { FloorResult } from "./floor.ts";
import type { Case, JobResult } from "./loadgen/protocol.ts";
import type { InsideLatency } from "./logs.ts";
import { type OverloadResults, overloadTargets, renderOverload } from "./overload.ts";
import type { CpuReport } from "./procstat.ts";
import type { LatencySummary } from "./stats.ts";
import type { ScalingResults } from "./scaling.ts";
import type { RoundTripCount } from "./wan/roundtrips.ts";

export interface Measured {
  label: string;
  case: Case;
  /** Open loop: the offered rate and the planned duration. */
  offered?: { rate: number; durationS: number };
  result: JobResult;
  /** CPU seconds per role over the measured window. */
  cpuS: CpuReport;
  /** Busy CPU of processes that are not part of the measurement (other work on the machine), in cores. */
  otherCores?: number;
  /** The same requests' latency as the proxy and the agent logged it themselves. */
  inside?: InsideLatency;
}

export interface StepSearch {
  case: Case;
  /** Highest rate that passed (0 if none). */
  maxRate: number;
  steps: Array<{
    rate: number;
    pass: boolean;
    p99: number;
    errors: number;
    achieved: number;
    otherCores: number;
    /** Requests answered within the step, and CPU seconds per role over it. */
    completed?: number;
    cpuS?: CpuReport;
  }>;
}

export interface WanResults {
  rttMs: number;
  netem: boolean;
  echo: { latency: LatencySummary; roundTrips: RoundTripCount };
  /** The tunnel left idle: its own exchanges (keepalives, health refresh), which can land inside an op's window. */
  background: { seconds: number; roundTrips: number; perSecond: number };
  sequential: Array<Measured & { roundTrips: RoundTripCount }>;
  lowRate: Measured;
}

export interface SoakResults {
  rate: number;
  durationS: number;
  result: JobResult;
  cpuS: CpuReport;
  otherCores: number;
  inside?: InsideLatency;
  /** RSS samples per role, bytes, every `everyS` seconds. */
  rss: Record<string, number[]>;
  everyS: number;
}

export interface Target {
  name: string;
  met: boolean;
  detail: string;
}

export interface BenchResults {
  meta: {
    date: string;
    node: string;
    cpus: number;
    kernel: string;
    tcpCongestionControl: string;
    rate: number;
    mainDurationS: number;
    otherDurationS: number;
    sockets: number;
    runTimeS: number;
    /** 1-minute load average when the bench started. */
    loadAverage: number;
  };
  floor?: FloorResult[];
  /** The audit log's cost per record under each durability policy. */
  audit?: AuditCost[];
  grpc?: Measured[];
  lowLoad?: Measured[];
  /** A bare loopback TCP echo between two processes, paced like the low-load rows: what waking idle processes costs here. */
  loopbackEcho?: Array<{ label: string; latency: LatencySummary }>;
  fixedRate?: Measured[];
  maxRate?: StepSearch[];
  wan?: WanResults;
  /** Overload and bursts from a KMS-like caller (overload.ts). */
  overload?: OverloadResults;
  soak?: SoakResults;
  /** Capacity and CPU per request by worker counts, chain and proxy only (scaling.ts). */
  scaling?: ScalingResults;
  targets: Target[];
}

/** The seed's path, measured earlier on this project's VM: p11-kit 0.26.2 remoting over ssh -R, one caller. */
export const SEED = [
  { flow: "warm reference-proxy Encrypt", rttMs: 10, roundTrips: 7, p50: 76.6, p99: 80.0, bareRt: 10.7 },
  { flow: "warm reference-proxy Encrypt", rttMs: 40, roundTrips: 7, p50: 288, p99: 293, bareRt: 40.9 },
  { flow: "same, forwarding-only ssh -N -R (Nagle)", rttMs: 40, roundTrips: 7, p50: 371, p99: 792, bareRt: 40.9 },
] as const;

// ---------------------------------------------------------------- formatting

/** A progress line on stderr (the report itself goes to stdout). */
export const progress = (s: string) => process.stderr.write(`[bench ${new Date().toISOString().slice(11, 19)}] ${s}\n`);

export function ms(v: number | undefined): string {
  if (v === undefined || !Number.isFinite(v)) return "–";
  if (v < 0.1) return v.toFixed(3);
  if (v < 10) return v.toFixed(2);
  if (v < 100) return v.toFixed(1);
  return v.toFixed(0);
}

export const int = (v: number) => (Number.isFinite(v) ? Math.round(v).toLocaleString("en-US") : "–");
const ratio = (v: number) =>
  Number.isFinite(v) ? (v >= 100 ? `${v.toFixed(0)}×` : v >= 10 ? `${v.toFixed(1)}×` : `${v.toFixed(2)}×`) : "–";
const pct = (v: number) => (Number.isFinite(v) ? (v < 10 ? `${v.toFixed(1)} %` : `${v.toFixed(0)} %`) : "–");
const caseName = (c: Case) => `${c.op} ${c.size} B`;
/** CPU seconds per 1,000 completed requests. */
const per1k = (cpuS: number, completed: number) => (completed > 0 ? (cpuS * 1000) / completed : NaN);
const cpu = (v: number) => (Number.isFinite(v) ? v.toFixed(3) : "–");
const cores = (v: number | undefined) => (v !== undefined && Number.isFinite(v) ? v.toFixed(2) : "–");

/** Left-aligned first column, right-aligned others. */
export function table(head: string[], rows: string[][], indent = "  "): string {
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? "").length)));
  const line = (cells: string[]) =>
    indent +
    cells
      .map((c, i) => (i === 0 ? (c ?? "").padEnd(widths[i]) : (c ?? "").padStart(widths[i])))
      .join("  ")
      .trimEnd();
  return [line(head), ...rows.map(line)].join("\n");
}

/** Latency from the actual send (open loop: the generator's own timer lateness taken out; 1 caller: the same). */
function fromSend(m: Measured): LatencySummary {
  return m.result.serviceLatency ?? m.result.latency;
}

function floorOf(r: BenchResults, c: Case): FloorResult | undefined {
  return r.floor?.find((f) => f.op === c.op && f.size === c.size);
}

function errorsText(res: JobResult): string {
  if (res.errors === 0) return "0";
  return String(res.errors);
}

function errorDetails(list: Measured[]): string[] {
  const out: string[] = [];
  for (const m of list) {
    for (const [kind, e] of Object.entries(m.result.errorKinds))
      out.push(`       ${m.label}: ${e.count} × ${kind}${e.example !== kind ? `  (${e.example.slice(0, 120)})` : ""}`);
  }
  return out;
}

const roles = ["proxy", "sshd", "agent", "generator"] as const;

/**
 * Client-measured latency next to what the proxy and the agent logged for the
 * same requests: client − proxy = HTTP + the client's own queue; proxy − agent
 * = SigV4/validation/JSON + the gRPC hop through the tunnel; agent = its handler.
 */
function insideTable(list: Measured[], indent: string): string {
  const pair = (a?: LatencySummary) => (a ? `${ms(a.p50)} / ${ms(a.p99)}` : "–");
  return table(
    ["requests", "client p50 / p99 ms", "inside proxy", "inside agent handler", "proxy − agent (p50)", "client − proxy (p50)"],
    list.map((m) => [
      m.label,
      pair(m.result.latency),
      pair(m.inside?.proxy),
      pair(m.inside?.agent),
      m.inside?.proxy && m.inside.agent ? ms(m.inside.proxy.p50 - m.inside.agent.p50) : "–",
      m.inside?.proxy ? ms(m.result.latency.p50 - m.inside.proxy.p50) : "–",
    ]),
    indent,
  );
}

/**
 * The rate the measured CPU cost allows on this machine with nothing else
 * running: all processes share `cpus` cores, and the proxy's event loop is one
 * thread (its CPU figure includes GC and libuv helper threads, so this is
 * generous).
 */
function cpuCeiling(x: Measured, cpus: number): string | undefined {
  const perReq = (role: string) => per1k(x.cpuS[role] ?? NaN, x.result.completed) / 1000;
  const total = roles.reduce((sum, role) => sum + perReq(role), 0);
  const proxy = perReq("proxy");
  if (!Number.isFinite(total) || !Number.isFinite(proxy) || total <= 0 || proxy <= 0) return undefined;
  const all = cpus / total;
  const one = 1 / proxy;
  return (
    `${int(Math.min(all, one))} req/s = min(${cpus} cores ÷ ${ms(total * 1000)} ms CPU per request (all four processes), ` +
    `1 thread ÷ ${ms(proxy * 1000)} ms (proxy)); the generator's share is ${ms(perReq("generator") * 1000)} ms`
  );
}

// ---------------------------------------------------------------- the report

export function renderReport(r: BenchResults): string {
  const out: string[] = [];
  const m = r.meta;
  out.push(
    `XKS pair bench — ${m.date}, ${m.cpus} CPUs, Node ${m.node}, Linux ${m.kernel}, TCP congestion control ${m.tcpCongestionControl}; run time ${fmtDuration(m.runTimeS)}`,
    "All figures are from this run except the seed's (static, measured earlier). ×floor = latency ÷ the floor's; %floor = rate ÷ the floor's.",
    `Load average at start: ${m.loadAverage.toFixed(2)}. "other load" columns: cores used meanwhile by processes outside the measurement.`,
  );

  if (r.floor) {
    out.push("", "1) FLOOR: the agent's own encrypt()/decrypt() (agent/ops) on SoftHSM, in-process, no transport");
    out.push(
      table(
        ["op", "ops/s", "p50 ms", "p99 ms", "p99.9 ms"],
        r.floor.map((f) => [`${f.op} ${f.size} B`, int(f.opsPerSec), ms(f.latency.p50), ms(f.latency.p99), ms(f.latency.p999)]),
      ),
    );
  }

  if (r.audit?.length) {
    out.push("", "1b) AUDIT: AuditLog.append() of one operation record, back to back, with a sealed checkpoint every 250 ms");
    out.push(
      table(
        ["durability", "records", "append p50 ms", "append mean ms", "append p99 ms", "checkpoint p50 ms", "per record µs (all in)"],
        r.audit.map((a) => [
          a.fsync === "checkpoint" ? "fdatasync per checkpoint (default)" : "fdatasync per record",
          int(a.records),
          ms(a.append.p50),
          ms(a.append.mean),
          ms(a.append.p99),
          a.checkpoint.n ? ms(a.checkpoint.p50) : "-",
          a.perRecordUs.toFixed(1),
        ]),
      ),
    );
  }

  if (r.grpc?.length) {
    out.push("", "2) AGENT gRPC DIRECT: its Unix socket with the proxy's token; no tunnel, no HTTP, no SigV4 (closed loop)");
    out.push(
      table(
        ["call", "ops/s", "%floor", "p50 ms", "×floor", "p99 ms", "errors", "CPU s/1k: agent", "client", "other load"],
        r.grpc.map((g) => {
          const f = floorOf(r, g.case);
          return [
            g.label,
            int(g.result.achievedRate),
            pct(f ? (100 * g.result.achievedRate) / f.opsPerSec : NaN),
            ms(g.result.latency.p50),
            ratio(f ? g.result.latency.p50 / f.latency.p50 : NaN),
            ms(g.result.latency.p99),
            errorsText(g.result),
            cpu(per1k(g.cpuS.agent, g.result.completed)),
            cpu(per1k(g.cpuS.generator, g.result.completed)),
            cores(g.otherCores),
          ];
        }),
      ),
    );
  }

  if (r.lowLoad?.length || r.fixedRate?.length) {
    out.push("", "3) FULL CHAIN: SigV4-signed HTTP → proxy → SSH tunnel (real sshd) → agent → SoftHSM; every answer checked");
  }
  if (r.lowLoad?.length) {
    out.push("  a) low load");
    out.push(
      table(
        ["flow", "n", "p50 ms", "from send", "+floor p50", "×floor", "p99 ms", "max ms", "errors", "other load"],
        r.lowLoad.map((l) => {
          const f = floorOf(r, l.case);
          const p50 = fromSend(l).p50;
          return [
            l.label,
            int(l.result.completed),
            ms(l.result.latency.p50),
            ms(p50),
            f ? `+${ms(p50 - f.latency.p50)}` : "–",
            ratio(f ? p50 / f.latency.p50 : NaN),
            ms(l.result.latency.p99),
            ms(l.result.latency.max),
            errorsText(l.result),
            cores(l.otherCores),
          ];
        }),
        "     ",
      ),
      "     p50: open loop from the scheduled send time; from send: from when the generator actually sent it (at 20 req/s its own",
      "     timer wakes up late by a fraction of a ms, which is not the chain's doing). +floor and ×floor use the latter.",
    );
    if (r.loopbackEcho?.length) {
      out.push(
        "     for comparison, a bare loopback TCP round trip between two idle processes paced the same way (no chain at all):",
        ...r.loopbackEcho.map((e) => `       ${e.label}: p50 ${ms(e.latency.p50)} ms, p99 ${ms(e.latency.p99)} ms`),
      );
    }
  }
  if (r.fixedRate?.length) {
    const rate = r.meta.rate;
    out.push(`  b) fixed offered rate ${int(rate)} req/s, OPEN loop (latency from each request's scheduled send time)`);
    out.push(
      table(
        [
          "case",
          "secs",
          "sent",
          "errors",
          "p50 ms",
          "×floor",
          "p99 ms",
          "p99.9 ms",
          "max ms",
          "done/s",
          "gen lag",
          "gen stall",
          "CPU s/1k req: proxy",
          "sshd",
          "agent",
          "gen",
          "other load",
        ],
        r.fixedRate.map((x) => {
          const f = floorOf(r, x.case);
          return [
            caseName(x.case),
            String(x.offered?.durationS ?? Math.round(x.result.elapsedS)),
            int(x.result.sent ?? x.result.completed),
            errorsText(x.result),
            ms(x.result.latency.p50),
            ratio(f ? x.result.latency.p50 / f.latency.p50 : NaN),
            ms(x.result.latency.p99),
            ms(x.result.latency.p999),
            ms(x.result.latency.max),
            int(x.result.achievedRate),
            ms(x.result.maxSendLagMs),
            ms(x.result.generatorLoopDelayMs?.max),
            ...roles.map((role) => cpu(per1k(x.cpuS[role] ?? NaN, x.result.completed))),
            cores(x.otherCores),
          ];
        }),
        "     ",
      ),
    );
    out.push(
      "     done/s: answers per second over the run (below the offered rate = the chain fell behind). gen lag: worst lateness of the",
      "     generator's own sends, ms; gen stall: its longest event-loop delay (GC, CPU starvation), ms: a tail no longer than these",
      "     may be the generator's. other load: CPU cores kept busy meanwhile by processes outside the chain (other work on this",
      "     machine competes for its 2 cores). Sampled Encrypt answers decrypted back: " +
        r.fixedRate
          .filter((x) => x.result.sampled && x.case.op === "Encrypt")
          .map((x) => `${caseName(x.case)} ${x.result.sampled!.checked - x.result.sampled!.failed}/${x.result.sampled!.checked} ok`)
          .join(", "),
    );
    const details = errorDetails(r.fixedRate);
    if (details.length) out.push("     errors by kind:", ...details);
    for (const x of r.fixedRate) {
      const c = cpuCeiling(x, r.meta.cpus);
      if (c) out.push(`     CPU ceiling, ${caseName(x.case)}: ${c}`);
    }
  }
  const timed = [...(r.lowLoad ?? []), ...(r.fixedRate ?? [])].filter((m) => m.inside);
  if (timed.length) {
    out.push("  c) where the time goes: the same requests as logged by the proxy (received → answered) and the agent (its handler)");
    out.push(insideTable(timed, "     "));
  }
  if (r.maxRate?.length) {
    out.push("  d) highest offered rate sustained with p99 < 100 ms and no errors (step search, short open-loop steps)");
    out.push(
      table(
        ["case", "max req/s", "%floor", "other load", "steps (req/s: p99 ms, errors)"],
        r.maxRate.map((s) => {
          const f = floorOf(r, s.case);
          return [
            caseName(s.case),
            s.maxRate > 0 ? int(s.maxRate) : "< lowest step",
            pct(f && s.maxRate > 0 ? (100 * s.maxRate) / f.opsPerSec : NaN),
            cores(Math.max(...s.steps.map((st) => st.otherCores))),
            s.steps.map((st) => `${int(st.rate)}${st.pass ? "✓" : "✗"}(${ms(st.p99)}${st.errors ? `, ${st.errors} err` : ""})`).join(" "),
          ];
        }),
        "     ",
      ),
    );
  }

  if (r.wan) {
    const w = r.wan;
    const rt = w.echo.latency.p50;
    out.push(
      "",
      `4) WAN: ${w.rttMs} ms RTT added by a userspace TUN delay line (RTT/2 each way, ACKs too) between the agent's network`,
      `   namespace and sshd's. sch_netem: ${w.netem ? "present (the delay line is used anyway: it also counts segments)" : "absent on this kernel"}.`,
      "   Round trips COUNTED in the line: per op, EC2→agent runs of payload segments answered by agent→EC2 runs.",
    );
    const rtText = (c: RoundTripCount) =>
      `${c.median} (${Object.entries(c.histogram)
        .map(([k, v]) => `${k}:${v}`)
        .join(" ")})`;
    const rows: string[][] = [
      [
        "bare TCP round trip (64 B echo)",
        rtText(w.echo.roundTrips),
        `${ms(w.echo.roundTrips.segmentsToAgent)} / ${ms(w.echo.roundTrips.segmentsFromAgent)}`,
        ms(rt),
        ms(w.echo.latency.p99),
        "1.00×",
        "–",
      ],
      ...w.sequential.map((s) => [
        `${caseName(s.case)}, 1 caller`,
        rtText(s.roundTrips),
        `${ms(s.roundTrips.segmentsToAgent)} / ${ms(s.roundTrips.segmentsFromAgent)}`,
        ms(s.result.latency.p50),
        ms(s.result.latency.p99),
        ratio(s.result.latency.p50 / rt),
        `+${ms(s.result.latency.p50 - rt)}`,
      ]),
      [
        `${caseName(w.lowRate.case)}, ${int(w.lowRate.result.achievedRate)} req/s open loop (from send)`,
        "–",
        "–",
        ms(fromSend(w.lowRate).p50),
        ms(fromSend(w.lowRate).p99),
        ratio(fromSend(w.lowRate).p50 / rt),
        `+${ms(fromSend(w.lowRate).p50 - rt)}`,
      ],
    ];
    out.push(
      table(["flow", "round trips/op (histogram)", "segments →agent / ←agent", "p50 ms", "p99 ms", "×RTT", "over 1 RTT"], rows, "   "),
    );
    for (const s of w.sequential) {
      const sp = s.roundTrips.split;
      out.push(
        `   ${caseName(s.case)} time along the link (median ms, beyond 2 × one-way): before the link ${ms(sp.before)} | request spread ${ms(sp.request)} | ` +
          `agent side ${ms(sp.agent)} | response spread ${ms(sp.response)} | after the link ${ms(sp.after)}`,
      );
    }
    out.push(
      "   as logged by the proxy and the agent (the proxy's figure includes the WAN round trip):",
      insideTable([...w.sequential, w.lowRate], "     "),
    );
    const errs = [...w.sequential, w.lowRate].reduce((n, s) => n + s.result.errors, 0);
    out.push(
      `   errors: ${errs}. The idle tunnel's own exchanges (ssh/gRPC keepalives, proxy health refresh): ${w.background.roundTrips} round trips ` +
        `in ${w.background.seconds} s idle = ${w.background.perSecond.toFixed(2)}/s; such an exchange landing inside an op's window counts for that op:`,
      ...w.sequential.map(
        (s) =>
          `     ${s.label}: ${s.roundTrips.total - s.roundTrips.ops} extra in ${s.roundTrips.windowS.toFixed(1)} s of op windows ` +
          `(${(w.background.perSecond * s.roundTrips.windowS).toFixed(1)} expected from background)`,
      ),
    );
    if (w.sequential.some((s) => s.roundTrips.split.request > 0.5 || s.roundTrips.split.response > 0.5)) {
      out.push(
        "   request/response spread > 0.5 ms: the TCP sender paces segments one RTT-derived gap apart (congestion control " +
          `${r.meta.tcpCongestionControl}${r.meta.tcpCongestionControl === "bbr" ? ", which paces even the initial window" : ""}).`,
      );
    }
    out.push("   Seed, MEASURED EARLIER (p11-kit 0.26.2 remoting over ssh -R, one caller, 32 B Encrypt; not re-run here):");
    out.push(
      table(
        ["flow", "RTT", "round trips", "p50 ms", "p99 ms", "×RTT (bare RT p50)"],
        SEED.map((s) => [
          s.flow,
          `${s.rttMs} ms`,
          String(s.roundTrips),
          ms(s.p50),
          ms(s.p99),
          `${ratio(s.p50 / s.bareRt)} (${ms(s.bareRt)})`,
        ]),
        "   ",
      ),
    );
  }

  if (r.overload) out.push(...renderOverload(r.overload, { table }));

  if (r.soak) {
    const s = r.soak;
    out.push("", `SOAK: ${int(s.rate)} req/s for ${fmtDuration(s.durationS)}, Encrypt and Decrypt 32 B alternating, open loop`);
    out.push(
      `   sent ${int(s.result.sent ?? s.result.completed)}, errors ${s.result.errors}, p50 ${ms(s.result.latency.p50)} ms, p99 ${ms(s.result.latency.p99)} ms, ` +
        `p99.9 ${ms(s.result.latency.p999)} ms, max ${ms(s.result.latency.max)} ms; other load ${cores(s.otherCores)} cores`,
      `   inside the proxy (its log): p50 ${ms(s.inside?.proxy?.p50)} ms, p99 ${ms(s.inside?.proxy?.p99)} ms, max ${ms(s.inside?.proxy?.max)} ms; ` +
        `agent handler p99 ${ms(s.inside?.agent?.p99)} ms. Generator: sends up to ${ms(s.result.maxSendLagMs)} ms late, ` +
        `event-loop delay p99 ${ms(s.result.generatorLoopDelayMs?.p99)} / max ${ms(s.result.generatorLoopDelayMs?.max)} ms`,
    );
    // Heaps grow to their working size in the first minute; growth after that is what a leak looks like.
    const settleS = Math.min(60, s.durationS / 10);
    const settled = Math.min(Math.round(settleS / s.everyS), Math.max(0, (Object.values(s.rss)[0]?.length ?? 1) - 1));
    out.push(
      table(
        [
          "process",
          "RSS start MB",
          `at ${Math.round(settled * s.everyS)} s`,
          "end MB",
          "max MB",
          "growth from start",
          `from ${Math.round(settled * s.everyS)} s`,
          "CPU s/1k req",
        ],
        Object.entries(s.rss).map(([role, v]) => {
          const start = v[0] ?? NaN;
          const base = v[settled] ?? NaN;
          const end = v[v.length - 1] ?? NaN;
          return [
            role,
            mb(start),
            mb(base),
            mb(end),
            mb(Math.max(...v)),
            pct((100 * (end - start)) / start),
            pct((100 * (end - base)) / base),
            cpu(per1k(s.cpuS[role] ?? NaN, s.result.completed)),
          ];
        }),
        "   ",
      ),
    );
    const details = errorDetails([{ label: "soak", case: { op: "Encrypt", size: 32 }, result: s.result, cpuS: s.cpuS }]);
    if (details.length) out.push("   errors by kind:", ...details);
  }

  if (r.targets.length) {
    out.push("", "TARGETS (shown, not asserted)");
    for (const t of r.targets) out.push(`  [${t.met ? "MET" : "MISSED"}] ${t.name}: ${t.detail}`);
  }
  return out.join("\n");
}

const mb = (b: number) => (Number.isFinite(b) ? (b / 1048576).toFixed(1) : "–");

export function fmtDuration(s: number): string {
  const m = Math.floor(s / 60);
  const sec = Math.round(s - m * 60);
  return m > 0 ? `${m} min ${sec} s` : `${sec} s`;
}

// ---------------------------------------------------------------- targets

export function evaluateTargets(r: BenchResults): Target[] {
  const t: Target[] = [];
  if (r.fixedRate?.length) {
    const bad = r.fixedRate.filter(
      (x) => !(x.result.latency.p99 < 50 && x.result.errors === 0 && x.result.achievedRate >= 0.98 * r.meta.rate),
    );
    t.push({
      name: `${int(r.meta.rate)} req/s through the full chain with p99 < 50 ms and zero errors`,
      met: bad.length === 0,
      detail: r.fixedRate
        .map(
          (x) => `${caseName(x.case)} p99 ${ms(x.result.latency.p99)} ms, ${x.result.errors} errors, ${int(x.result.achievedRate)} done/s`,
        )
        .join("; "),
    });
  }
  const floor32 = r.floor?.find((f) => f.op === "Encrypt" && f.size === 32);
  if (r.lowLoad?.length && floor32) {
    const added = r.lowLoad.map((l) => ({ label: l.label, added: fromSend(l).p50 - floor32.latency.p50 }));
    t.push({
      name: "low-load full chain adds < 3 ms p50 over the floor",
      met: added.every((a) => a.added < 3),
      detail: `${added.map((a) => `${a.label}: +${ms(a.added)} ms`).join("; ")} (p50 from send; floor p50 ${ms(floor32.latency.p50)} ms)`,
    });
  }
  if (r.wan) {
    const rt = r.wan.echo.latency.p50;
    const seq = r.wan.sequential;
    // Judged on the main case (Encrypt 32 B); 4300 B is shown too (its segments are paced by the sender's TCP).
    const main = [...seq, r.wan.lowRate].filter((s) => s.case.size === 32);
    t.push({
      name: `WAN Encrypt 32 B p50 within 1 RTT + 5 ms (${r.wan.rttMs} ms RTT; bare round trip measured ${ms(rt)} ms)`,
      met: main.every((s) => fromSend(s).p50 - rt <= 5),
      detail: [...seq, r.wan.lowRate].map((s) => `${s.label} p50 ${ms(fromSend(s).p50)} ms (+${ms(fromSend(s).p50 - rt)})`).join("; "),
    });
    // Every op needs at least its own round trip; more than one is allowed only as far as the idle tunnel's own traffic explains it.
    const bg = r.wan.background.perSecond;
    const explained = (s: (typeof seq)[number]) =>
      !s.roundTrips.histogram["0"] && s.roundTrips.total - s.roundTrips.ops <= Math.max(1, Math.ceil(bg * s.roundTrips.windowS));
    t.push({
      name: "exactly one network round trip per operation (counted on the wire)",
      met: seq.every(explained),
      detail: seq
        .map(
          (s) =>
            `${s.label}: ${s.roundTrips.histogram["1"] ?? 0}/${s.roundTrips.ops} ops had exactly 1, median ${s.roundTrips.median}, ` +
            `${s.roundTrips.total - s.roundTrips.ops} extra vs ${(bg * s.roundTrips.windowS).toFixed(1)} expected from idle-tunnel traffic`,
        )
        .join("; "),
    });
  }
  if (r.overload) t.push(...overloadTargets(r.overload));
  if (r.soak) {
    t.push({
      name: "soak without errors",
      met: r.soak.result.errors === 0,
      detail: `${r.soak.result.errors} errors in ${int(r.soak.result.sent ?? r.soak.result.completed)} requests`,
    });
  }
  return t;
}
