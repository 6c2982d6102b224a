/**
 * Reads V8 .cpuprofile files (node --cpu-prof) and tells where the time went:
 * self time per function and per package/module, as shares of the sampled
 * time. Used by `npm run bench -- --profile`.
 */
import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";

interface CpuProfile {
  nodes: Array<{ id: number; callFrame: { functionName: string; url: string; lineNumber: number }; children?: number[] }>;
  startTime: number;
  endTime: number;
  samples: number[];
  timeDeltas: number[];
}

export interface Share {
  name: string;
  ms: number;
  /** Share of the busy (non-idle) sampled time, 0..1. */
  share: number;
}

export interface ProfileSummary {
  file: string;
  pid: number;
  tid: number;
  /** Sampled wall time, ms, and the part that was not idle. */
  totalMs: number;
  busyMs: number;
  /** Self time by function, biggest first, with the functions that called it most. */
  functions: Array<Share & { callers: Share[] }>;
  /** Self time by package / module; native frames (syscalls, crypto, V8 builtins) count for the module that called them. */
  modules: Share[];
  /** Inclusive (self + callees) time of the project's own functions. */
  inclusive: Share[];
}

/** "express", "@grpc/grpc-js", "node:internal/…", "proxy/app.ts", … */
function moduleOf(url: string): string {
  if (url === "") return "(native / V8)";
  const nm = url.lastIndexOf("node_modules/");
  if (nm >= 0) {
    const rest = url.slice(nm + "node_modules/".length).split("/");
    return rest[0].startsWith("@") ? `${rest[0]}/${rest[1]}` : rest[0];
  }
  if (url.startsWith("node:"))
    return url
      .replace(/^node:internal\//, "node:")
      .split("/")
      .slice(0, 2)
      .join("/");
  const m = /\/(dist|scripts|test)\/(.*)$/.exec(url);
  return m ? m[2] : url;
}

function frameName(f: CpuProfile["nodes"][number]["callFrame"]): string {
  const fn = f.functionName || "(anonymous)";
  if (!f.url) return fn;
  return `${fn}  ${moduleOf(f.url)}:${f.lineNumber + 1}`;
}

export function summarizeProfile(file: string, top = 15): ProfileSummary {
  const p = JSON.parse(readFileSync(file, "utf8")) as CpuProfile;
  const byId = new Map(p.nodes.map((n) => [n.id, n]));
  const parent = new Map<number, number>();
  for (const n of p.nodes) for (const c of n.children ?? []) parent.set(c, n.id);
  const self = new Map<number, number>();
  for (let i = 0; i < p.samples.length; i++) self.set(p.samples[i], (self.get(p.samples[i]) ?? 0) + (p.timeDeltas[i] ?? 0) / 1000);

  const add = (m: Map<string, number>, k: string, t: number) => m.set(k, (m.get(k) ?? 0) + t);
  let idle = 0;
  let total = 0;
  const fns = new Map<string, number>();
  const callers = new Map<string, Map<string, number>>();
  const mods = new Map<string, number>();
  const incl = new Map<string, number>();
  for (const [id, t] of self) {
    const n = byId.get(id)!;
    total += t;
    const special = n.callFrame.functionName.startsWith("(") && !n.callFrame.url;
    if (n.callFrame.functionName === "(idle)") {
      idle += t;
      continue;
    }
    const name = frameName(n.callFrame);
    add(fns, name, t);
    const up = parent.get(id);
    if (up !== undefined && !special)
      add(callers.get(name) ?? callers.set(name, new Map()).get(name)!, frameName(byId.get(up)!.callFrame), t);
    // A native frame's time goes to the nearest caller with a script.
    let owner: number | undefined = id;
    while (owner !== undefined && !byId.get(owner)!.callFrame.url && !special) owner = parent.get(owner);
    add(mods, special ? n.callFrame.functionName : owner === undefined ? "(native / V8)" : moduleOf(byId.get(owner)!.callFrame.url), t);
    // Inclusive time per project function (once per sample, even when recursive).
    const seen = new Set<string>();
    for (let cur: number | undefined = id; cur !== undefined; cur = parent.get(cur)) {
      const f = byId.get(cur)!.callFrame;
      if (!f.url || f.url.includes("node_modules") || f.url.startsWith("node:")) continue;
      const key = frameName(f);
      if (seen.has(key)) continue;
      seen.add(key);
      add(incl, key, t);
    }
  }
  const busy = total - idle;
  const ranked = (m: Map<string, number>, k: number): Share[] =>
    [...m.entries()]
      .sort((a, b) => b[1] - a[1])
      .slice(0, k)
      .map(([name, t]) => ({ name, ms: t, share: busy > 0 ? t / busy : 0 }));
  const ids = /\.(\d+)\.(\d+)\.\d+\.cpuprofile$/.exec(file);
  return {
    file,
    pid: Number(ids?.[1] ?? 0),
    tid: Number(ids?.[2] ?? 0),
    totalMs: total,
    busyMs: busy,
    functions: ranked(fns, top).map((f) => ({ ...f, callers: ranked(callers.get(f.name) ?? new Map(), 2) })),
    modules: ranked(mods, 14),
    inclusive: ranked(incl, top),
  };
}

/** Every .cpuprofile in `dir`. */
export function profilesIn(dir: string): string[] {
  try {
    return readdirSync(dir)
      .filter((f) => f.endsWith(".cpuprofile"))
      .map((f) => join(dir, f));
  } catch {
    return [];
  }
}

/**
 * `usPerShare`: the process's CPU µs per request (from /proc), so that each
 * share is also shown as µs per request. V8 samples wall time on the thread,
 * so time spent preempted shows up too: shares are of sampled time.
 */
export function renderProfile(role: string, s: ProfileSummary, usPerRequest?: number): string {
  const pct = (x: number) => `${(100 * x).toFixed(1).padStart(5)} %`;
  const us = (x: number) =>
    usPerRequest
      ? `  ≈${Math.round(x * usPerRequest)
          .toString()
          .padStart(4)} µs/req`
      : "";
  const lines = [
    `${role} (pid ${s.pid}): busy ${(s.busyMs / 1000).toFixed(2)} s of ${(s.totalMs / 1000).toFixed(2)} s sampled` +
      (usPerRequest ? `; ${Math.round(usPerRequest)} µs CPU per request (/proc)` : ""),
    "  self time by package/module (native calls counted for the module that made them):",
    ...s.modules.map((m) => `    ${pct(m.share)}${us(m.share)}  ${m.name}`),
    "  hottest functions (self time) ← their main callers:",
    ...s.functions.map(
      (f) =>
        `    ${pct(f.share)}${us(f.share)}  ${f.name}${f.callers.length ? `  ← ${f.callers.map((c) => `${c.name} (${pct(c.share).trim()})`).join(", ")}` : ""}`,
    ),
    "  project functions, inclusive time (self + callees; middleware that calls next() includes what follows):",
    ...s.inclusive.map((f) => `    ${pct(f.share)}${us(f.share)}  ${f.name}`),
  ];
  return lines.join("\n");
}
