/**
 * `npm run bench`: the whole chain on this machine, measured side by side in
 * one run (scripts/bench/ holds one module per concern):
 *
 *   1. the floor: the agent's own encrypt()/decrypt() on SoftHSM, in-process;
 *   2. the agent's gRPC service called directly on its Unix socket;
 *   3. the full chain (SigV4 HTTP → proxy → SSH tunnel → agent → SoftHSM) at low
 *      load, at a fixed OPEN-loop rate, and a step search for the highest rate
 *      with p99 < 100 ms, with CPU per 1,000 requests for every process;
 *   4. the same chain over a simulated WAN (TUN delay line), with round trips
 *      per operation counted on the wire.
 *
 * Options (npm run bench -- --help): durations, rate, RTT, and two other modes:
 * --soak SECONDS (RSS over time at --soak-rate) and --profile (CPU profiles of
 * proxy, agent and generator at the fixed rate). Prints a table, writes
 * .bench/results.json, and stops everything it started, also on Ctrl-C.
 */
import { mkdirSync, rmSync, writeFileSync } from "node:fs";
import { cpus, loadavg, release } from "node:os";
import { join, relative } from "node:path";
import { parseArgs } from "node:util";
import { PACKAGE_ROOT } from "../shared/paths.ts";
import { CHAIN_PREFIX, type Chain } from "../testbed/chain.ts";
import { freePort } from "../testbed/ports.ts";
import { cleanupOnSignals, onCleanup, runAll } from "./bench/cleanup.ts";
import { measureEcho } from "./bench/echo.ts";
import { measureAuditCost } from "./bench/audit-cost.ts";
import { measureFloor } from "./bench/floor.ts";
import type { LoadGenerator } from "./bench/loadgen/generator.ts";
import type { Case, JobSpec } from "./bench/loadgen/protocol.ts";
import { insideLatency, markLogs } from "./bench/logs.ts";
import { rssByRole, startCpuMeter } from "./bench/procstat.ts";
import { profilesIn, renderProfile, summarizeProfile } from "./bench/profile.ts";
import { evaluateTargets, fmtDuration, int, ms, progress, renderReport, type BenchResults } from "./bench/report.ts";
import { caseName, loadTarget, measure, openLoop, rigFor, setQuietWait, startBenchChain, startGenerator, type Rig } from "./bench/rig.ts";
import { ensureBuilt, stopBenchLeftovers, tcpCongestionControl } from "./bench/setup.ts";
import { measureOverload, oneBurst } from "./bench/overload.ts";
import { measureScaling, parseWorkers, renderScaling } from "./bench/scaling.ts";
import { stepSearch } from "./bench/search.ts";
import { netemAvailable, startWanLink } from "./bench/wan/link.ts";
import { countRoundTrips } from "./bench/wan/roundtrips.ts";

const HELP = `npm run bench -- [options]
  --duration S         main case (Encrypt 32 B) at the fixed rate, seconds      [30]
  --short-duration S   the other fixed-rate cases, seconds                      [10]
  --rate N             fixed offered rate, req/s                                [1800]
  --step-seconds S     length of each step of the max-rate search               [3]
  --search WHICH       max-rate search for: all | main | none                   [all]
  --rtt MS             simulated WAN round-trip time                            [35]
  --no-wan             skip the WAN part
  --sockets N          keep-alive HTTP sockets of the generator                 [32]
  --quiet-wait S       before each measurement, wait up to S s for other processes
                       on the machine to go quiet (they share its cores)        [0]
  --log-level L        proxy and agent log level (production: info)             [info]
  --overload-seconds S length of the 2× capacity overload                       [30]
  --capacity N         capacity for the overload part, req/s (default: the step
                       search's Encrypt 32 B result, or a search of its own)
  --queue-target MS    the proxy's admission.queueTargetMs for the chains      [the proxy's default]
  --overload           instead of the bench: only the overload and burst part
  --soak S             instead of the bench: a soak of S seconds with RSS sampled
  --soak-rate N        soak rate, req/s                                         [1000]
  --profile            instead of the bench: CPU-profile proxy, agent and generator
                       at the fixed rate for --duration (at most 20 s)
  --scaling            instead of the bench: capacity and CPU per request for every
                       proxy × agent worker count (a fresh chain each), then the
                       proxy alone (fake agent) for each proxy worker count, and a
                       sizing note; --step-seconds, --rate (where searches start)
  --proxy-only         instead of the bench: only the proxy-alone rows and the note
  --workers LIST       worker counts for --scaling/--proxy-only, e.g. 1,2,all  [1,2,all]
  --dir DIR            working folder (chains, logs, results.json)              [.bench]`;

const { values: opt } = parseArgs({
  options: {
    duration: { type: "string", default: "30" },
    "short-duration": { type: "string", default: "10" },
    rate: { type: "string", default: "1800" },
    "step-seconds": { type: "string", default: "3" },
    search: { type: "string", default: "all" },
    rtt: { type: "string", default: "35" },
    "no-wan": { type: "boolean", default: false },
    sockets: { type: "string", default: "32" },
    "quiet-wait": { type: "string", default: "0" },
    "log-level": { type: "string", default: "info" },
    "overload-seconds": { type: "string", default: "30" },
    capacity: { type: "string" },
    overload: { type: "boolean", default: false },
    "queue-target": { type: "string" },
    soak: { type: "string" },
    "soak-rate": { type: "string", default: "1000" },
    profile: { type: "boolean", default: false },
    scaling: { type: "boolean", default: false },
    "proxy-only": { type: "boolean", default: false },
    workers: { type: "string" },
    dir: { type: "string", default: join(PACKAGE_ROOT, ".bench") },
    help: { type: "boolean", default: false },
  },
});

const num = (name: keyof typeof opt): number => {
  const v = Number(opt[name]);
  if (!Number.isFinite(v) || v <= 0) throw new Error(`--${name} must be a positive number`);
  return v;
};

const DIR = opt.dir!;
const RATE = num("rate");
const MAIN_S = num("duration");
const SHORT_S = num("short-duration");
const STEP_S = num("step-seconds");
const ENC32: Case = { op: "Encrypt", size: 32 };
const CASES: Case[] = [ENC32, { op: "Encrypt", size: 4300 }, { op: "Decrypt", size: 32 }, { op: "Decrypt", size: 4300 }];

/** Proxy config the bench's chains get on top of the defaults. */
const proxyExtra = () => (opt["queue-target"] !== undefined ? { admission: { queueTargetMs: Number(opt["queue-target"]) } } : undefined);

const sleep = (msec: number) => new Promise((r) => setTimeout(r, msec));

// ---------------------------------------------------------------- the parts

async function floorPart(r: BenchResults): Promise<void> {
  progress("1/4 floor: agent/ops encrypt()/decrypt() in-process on SoftHSM");
  r.floor = measureFloor(join(DIR, "floor"), [32, 4300], 2);
  progress("1/4 floor: the audit log's cost per record (agent/audit.ts), both durability policies");
  r.audit = measureAuditCost(join(DIR, "audit"), 2);
}

async function grpcPart(r: BenchResults, chain: Chain, rig: Rig): Promise<void> {
  progress("2/4 agent gRPC direct (Unix socket)");
  const socket = chain.agentSocket;
  r.grpc = [];
  for (const size of [32, 4300]) {
    const c: Case = { op: "Encrypt", size };
    for (const concurrency of [1, 16]) {
      const label = `${caseName(c)}, ${concurrency === 1 ? "1 caller" : `${concurrency} in flight`}`;
      r.grpc.push(
        await measure(rig, label, c, {
          kind: "grpc",
          socket,
          token: chain.agentToken,
          identities: chain.identities,
          keyStore: CHAIN_PREFIX,
          keyId: chain.keys.default,
          case: c,
          concurrency,
          durationS: 2,
        }),
      );
    }
  }
}

async function lowLoadPart(r: BenchResults, rig: Rig): Promise<void> {
  progress("3/4 full chain: low load");
  r.lowLoad = [
    await measure(rig, "Encrypt 32 B, 1 caller", ENC32, {
      kind: "sequential",
      case: ENC32,
      count: 1000,
      warmup: 200,
      gapMs: 0,
      windows: false,
    }),
    await measure(rig, "Encrypt 32 B, 20 req/s open loop", ENC32, openLoop(ENC32, 20, SHORT_S)),
  ];
  const port = await freePort();
  r.loopbackEcho = [
    { label: "back to back (like 1 caller)", latency: (await measureEcho({ host: "127.0.0.1", port, count: 2000, gapMs: 0 })).latency },
    { label: "one every 50 ms (like 20 req/s)", latency: (await measureEcho({ host: "127.0.0.1", port, count: 100, gapMs: 50 })).latency },
  ];
}

async function fixedRatePart(r: BenchResults, rig: Rig): Promise<void> {
  progress(`3/4 full chain: ${int(RATE)} req/s open loop (warm-up 3 s first)`);
  await rig.gen.run(openLoop(ENC32, RATE, 3));
  await sleep(1000);
  r.fixedRate = [];
  for (const c of CASES) {
    const secs = c === ENC32 ? MAIN_S : SHORT_S;
    r.fixedRate.push(await measure(rig, `${caseName(c)} at ${int(RATE)}/s for ${secs} s`, c, openLoop(c, RATE, secs, 100)));
    await sleep(1000);
  }
}

async function maxRatePart(r: BenchResults, rig: Rig): Promise<void> {
  const which = opt.search === "none" ? [] : opt.search === "main" ? [ENC32] : CASES;
  if (which.length === 0) return;
  progress(`3/4 full chain: highest rate with p99 < 100 ms (${STEP_S} s steps)`);
  r.maxRate = [];
  for (const c of which) {
    const fixed = r.fixedRate?.find((x) => x.case === c)?.result;
    // Start near where the fixed-rate run says the answer is.
    const hint = fixed && fixed.errors === 0 && fixed.latency.p99 < 100 ? RATE * 1.2 : (fixed?.achievedRate ?? RATE) * 0.8;
    r.maxRate.push(await stepSearch(rig, c, hint, STEP_S));
  }
}

async function wanPart(r: BenchResults, gen: LoadGenerator): Promise<void> {
  const rttMs = num("rtt");
  progress(`4/4 WAN: ${rttMs} ms RTT delay line`);
  const netem = netemAvailable();
  const link = await startWanLink({ rttMs, binDir: join(DIR, "bin") });
  onCleanup("WAN link", () => link.stop());
  const segFile = join(DIR, "segments.txt");

  // A bare round trip over the same link, counted the same way.
  const echoPort = 7007;
  await link.line.filter(echoPort);
  await link.line.reset();
  const echo = await measureEcho({ host: link.agentAddr, port: echoPort, count: 200, gapMs: 5, wrap: link.agentSide });
  const oneWay = echo.latency.p50 / 2;
  const echoTrips = countRoundTrips(await link.line.segments(segFile), echo.windows, oneWay);
  progress(`   echo: p50 ${ms(echo.latency.p50)} ms, round trips ${echoTrips.median}`);

  // The same chain with its agent on the far side of the link: sshd also listens on the link's
  // EC2 end, the agent's tunnel dials that address, and the agent runs in the link's namespace.
  const wan = await startBenchChain(join(DIR, "wan-chain"), opt["log-level"], { sshdHost: link.ec2Addr, agentWrap: link.agentSide });
  await gen.init(loadTarget(wan.chain, num("sockets")));
  const rig = rigFor(wan, gen);
  await link.line.filter(wan.chain.sshd.port);

  // The idle tunnel's own exchanges, so that one landing inside an op's window is recognised as such.
  const idleS = 6;
  await link.line.reset();
  const idleFrom = process.hrtime.bigint();
  await sleep(idleS * 1000);
  const idle = countRoundTrips(await link.line.segments(segFile), [[idleFrom, process.hrtime.bigint()]], oneWay);
  const background = { seconds: idleS, roundTrips: idle.total, perSecond: idle.total / idleS };
  progress(`   idle tunnel: ${idle.total} round trips in ${idleS} s`);

  const sequential: NonNullable<BenchResults["wan"]>["sequential"] = [];
  for (const [c, count] of [
    [ENC32, 200],
    [{ op: "Encrypt", size: 4300 }, 100],
  ] as Array<[Case, number]>) {
    await link.line.reset();
    const m = await measure(rig, `${caseName(c)}, 1 caller`, c, {
      kind: "sequential",
      case: c,
      count,
      warmup: 20,
      gapMs: 5,
      windows: true,
    });
    const windows = m.result.windows!.map(([a, b]) => [BigInt(a), BigInt(b)] as [bigint, bigint]);
    delete m.result.windows;
    const roundTrips = countRoundTrips(await link.line.segments(segFile), windows, oneWay);
    progress(`   ${m.label}: round trips median ${roundTrips.median}, mean ${roundTrips.mean.toFixed(3)}`);
    sequential.push({ ...m, roundTrips });
  }
  const lowRate = await measure(rig, "Encrypt 32 B, 20 req/s", ENC32, openLoop(ENC32, 20, SHORT_S, 20));
  r.wan = { rttMs, netem, echo: { latency: echo.latency, roundTrips: echoTrips }, background, sequential, lowRate };
  await wan.chain.stop();
  await link.stop();
  rmSync(segFile, { force: true });
}

/** Overload and warm bursts on the running chain, then the first burst of a freshly started chain (cold). */
async function overloadPart(r: BenchResults, rig: Rig): Promise<void> {
  let capacity = opt.capacity !== undefined ? num("capacity") : (r.maxRate?.find((s) => s.case === ENC32)?.maxRate ?? 0);
  let capacitySource = opt.capacity !== undefined ? "--capacity" : "the step search above (p99 < 100 ms, no errors)";
  if (capacity <= 0) {
    progress("5/5 overload: capacity first (warm-up 3 s, then a step search, Encrypt 32 B)");
    await rig.gen.run(openLoop(ENC32, RATE / 2, 3));
    await sleep(1000);
    capacity = (await stepSearch(rig, ENC32, RATE, STEP_S)).maxRate;
    capacitySource = "a step search of this run (p99 < 100 ms, no errors)";
  }
  if (capacity <= 0) throw new Error("no capacity figure for the overload part");
  if (opt.capacity !== undefined) {
    progress("5/5 overload: warm-up 3 s");
    await rig.gen.run(openLoop(ENC32, capacity / 2, 3));
  }
  await sleep(1000);
  const o = await measureOverload(rig, { capacity, capacitySource, overloadS: num("overload-seconds"), normalS: 5, case: ENC32 });
  r.overload = { ...o, bursts: o.warm };
}

async function coldBurst(gen: LoadGenerator): Promise<Awaited<ReturnType<typeof oneBurst>>> {
  progress("5/5 cold: a fresh chain, its first burst (200) on new connections");
  const cold = await startBenchChain(join(DIR, "cold-chain"), opt["log-level"], undefined, proxyExtra());
  await gen.init(loadTarget(cold.chain, num("sockets")));
  const b = await oneBurst(rigFor(cold, gen), ENC32, 200, true);
  await cold.chain.stop();
  return b;
}

// ---------------------------------------------------------------- the modes

async function bench(r: BenchResults): Promise<void> {
  await floorPart(r);
  const bc = await startBenchChain(join(DIR, "chain"), opt["log-level"], undefined, proxyExtra());
  const gen = startGenerator();
  await gen.init(loadTarget(bc.chain, num("sockets")));
  const rig = rigFor(bc, gen);
  await grpcPart(r, bc.chain, rig);
  await lowLoadPart(r, rig);
  await fixedRatePart(r, rig);
  await maxRatePart(r, rig);
  await overloadPart(r, rig);
  await bc.chain.stop();
  const cold = await coldBurst(gen);
  r.overload?.bursts.push(cold);
  if (!opt["no-wan"]) await wanPart(r, gen);
}

/** --overload: only the overload and burst part (the cold burst first, on the chain's first requests). */
async function overloadOnly(r: BenchResults): Promise<void> {
  const gen = startGenerator();
  const cold = await coldBurst(gen);
  const bc = await startBenchChain(join(DIR, "chain"), opt["log-level"], undefined, proxyExtra());
  await gen.init(loadTarget(bc.chain, num("sockets")));
  await overloadPart(r, rigFor(bc, gen));
  r.overload?.bursts.push(cold);
  await bc.chain.stop();
}

async function soak(r: BenchResults): Promise<void> {
  const durationS = num("soak");
  const rate = num("soak-rate");
  const bc = await startBenchChain(join(DIR, "chain"), opt["log-level"]);
  const gen = startGenerator();
  await gen.init(loadTarget(bc.chain, num("sockets")));
  const rig = rigFor(bc, gen);
  const { procs } = rig;
  progress(`soak: ${int(rate)} req/s for ${fmtDuration(durationS)} (Encrypt and Decrypt 32 B), RSS every 5 s; 5 s warm-up first`);
  await gen.run(openLoop(ENC32, rate, 5));
  const everyS = 5;
  const rss: Record<string, number[]> = {};
  const sample = () => {
    for (const [role, bytes] of Object.entries(rssByRole(procs))) {
      rss[role] ??= [];
      rss[role].push(bytes);
    }
  };
  let timer: NodeJS.Timeout | undefined;
  let meter: ReturnType<typeof startCpuMeter> | undefined;
  const tag = `soak${Date.now().toString(36)}`;
  const spec: JobSpec = { kind: "openLoop", cases: [ENC32, { op: "Decrypt", size: 32 }], rate, durationS, sampleDecrypts: 200, tag };
  const mark = markLogs(rig.logs);
  const result = await gen.run(spec, () => {
    meter = startCpuMeter(procs);
    sample();
    timer = setInterval(sample, everyS * 1000);
  });
  clearInterval(timer);
  sample();
  const w = meter?.stop();
  const inside = await insideLatency(mark, tag);
  r.soak = { rate, durationS, result, cpuS: w?.byRole ?? {}, otherCores: w?.otherCores ?? NaN, inside, rss, everyS };
  await bc.chain.stop();
}

async function profile(r: BenchResults): Promise<string> {
  const profDir = join(DIR, "profiles");
  rmSync(profDir, { recursive: true, force: true });
  mkdirSync(profDir, { recursive: true });
  const flags = `--cpu-prof --cpu-prof-dir=${profDir}`;
  process.env.XKS_NODE_ARGS = flags; // read by the test-bed's Daemon (testbed/procs.ts)
  process.env.BENCH_GEN_NODE_ARGS = flags;
  const bc = await startBenchChain(join(DIR, "chain"), opt["log-level"]);
  const { chain } = bc;
  const gen = startGenerator();
  await gen.init(loadTarget(chain, num("sockets")));
  const rig = rigFor(bc, gen);
  const secs = Math.min(MAIN_S, 20);
  progress(`profile: ${caseName(ENC32)} at ${int(RATE)} req/s for ${secs} s, proxy/agent/generator under --cpu-prof`);
  await gen.run(openLoop(ENC32, RATE, 3));
  r.fixedRate = [await measure(rig, `${caseName(ENC32)} at ${int(RATE)}/s (profiled)`, ENC32, openLoop(ENC32, RATE, secs, 100))];
  const roles = new Map<number, string>([
    [chain.proxy.pid!, "proxy"],
    [chain.agent.pid!, "agent"],
    [gen.pid, "generator"],
  ]);
  await gen.stop();
  await chain.stop(); // SIGTERM: the daemons exit normally and write their profiles
  const m = r.fixedRate[0];
  const out: string[] = [`CPU PROFILES (${relative(process.cwd(), profDir)}/; open in Chrome DevTools or speedscope for the call trees)`];
  for (const file of profilesIn(profDir)) {
    const s = summarizeProfile(file);
    const role = roles.get(s.pid) ?? "other";
    if (s.busyMs < 0.05 * s.totalMs) continue; // a helper thread (e.g. tsx's module loader) that sat idle
    out.push("", renderProfile(role, s, ((m.cpuS[role] ?? NaN) * 1e6) / m.result.completed));
  }
  if (out.length === 1) out.push("no profiles were written (does testbed/procs.ts pass XKS_NODE_ARGS to the daemons?)");
  return out.join("\n");
}

/** --scaling / --proxy-only (scripts/bench/scaling.ts). */
async function scaling(r: BenchResults): Promise<string> {
  r.scaling = await measureScaling({
    dir: DIR,
    logLevel: opt["log-level"]!,
    workers: parseWorkers(opt.workers),
    stepS: STEP_S,
    hint: RATE,
    sockets: num("sockets"),
    proxyExtra: proxyExtra(),
    gen: startGenerator(),
    chain: opt.scaling!,
    proxyOnly: true,
  });
  return renderScaling(r.scaling);
}

// ---------------------------------------------------------------- main

async function main(): Promise<number> {
  if (opt.help) {
    console.log(HELP);
    return 0;
  }
  cleanupOnSignals();
  setQuietWait(Number(opt["quiet-wait"]) || 0);
  const started = performance.now();
  mkdirSync(DIR, { recursive: true });
  stopBenchLeftovers(DIR);
  ensureBuilt();
  const r: BenchResults = {
    meta: {
      date: `${new Date().toISOString().replace("T", " ").slice(0, 16)} UTC`,
      node: process.version,
      cpus: cpus().length,
      kernel: release(),
      tcpCongestionControl: tcpCongestionControl(),
      rate: RATE,
      mainDurationS: MAIN_S,
      otherDurationS: SHORT_S,
      sockets: num("sockets"),
      runTimeS: 0,
      loadAverage: loadavg()[0],
    },
    targets: [],
  };
  let extra = "";
  try {
    if (opt.soak !== undefined) await soak(r);
    else if (opt.overload) await overloadOnly(r);
    else if (opt.profile) extra = await profile(r);
    else if (opt.scaling || opt["proxy-only"]) extra = await scaling(r);
    else await bench(r);
  } finally {
    await runAll();
  }
  r.meta.runTimeS = (performance.now() - started) / 1000;
  r.targets = opt.profile ? [] : evaluateTargets(r);
  const file = join(
    DIR,
    opt.soak !== undefined
      ? "soak.json"
      : opt.profile
        ? "profile.json"
        : opt.overload
          ? "overload.json"
          : opt.scaling || opt["proxy-only"]
            ? "scaling.json"
            : "results.json",
  );
  writeFileSync(file, `${JSON.stringify(r, null, 2)}\n`);
  console.log(renderReport(r));
  if (extra) console.log(`\n${extra}`);
  console.log(`\nJSON: ${relative(process.cwd(), file)}   logs: ${relative(process.cwd(), DIR)}/*/logs/`);
  return 0;
}

main().then(
  (code) => process.exit(code),
  async (err) => {
    console.error(`bench failed: ${(err as Error).stack ?? err}`);
    await runAll();
    process.exit(1);
  },
);
