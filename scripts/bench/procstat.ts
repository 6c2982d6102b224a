/**
 * Per-process CPU time and RSS from /proc (Linux): utime+stime of
 * /proc/<pid>/stat (all threads, including libuv's pool; testbed/procs.ts
 * cpuSeconds) and the resident set of /proc/<pid>/statm. A process that is
 * gone reads as 0. A role is a list of pids read at each sample: a daemon
 * with workers is its process tree (testbed/procs.ts processTree), and a
 * worker that exits between two reads takes its CPU of that window with it.
 */
import { execFileSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { CLK_TCK, cpuSeconds } from "../../testbed/procs.ts";

const PAGE_SIZE = (() => {
  try {
    return Number(execFileSync("getconf", ["PAGESIZE"], { encoding: "utf8" }).trim()) || 4096;
  } catch {
    return 4096;
  }
})();

/** Resident set size of `pid` in bytes. */
export function rssBytes(pid: number): number {
  try {
    return Number(readFileSync(`/proc/${pid}/statm`, "utf8").split(" ")[1]) * PAGE_SIZE;
  } catch {
    return 0;
  }
}

/** The processes to watch, by role; a role may be several processes (sshd's session pair), read at each sample. */
export type ProcessSet = Record<string, () => number[]>;

export type CpuReport = Record<string, number>;

/** Busy CPU seconds of the whole machine so far (all CPUs; everything but idle and iowait), from /proc/stat. */
export function machineBusySeconds(): number {
  try {
    const f = readFileSync("/proc/stat", "utf8").split("\n")[0].trim().split(/\s+/).slice(1).map(Number);
    // user nice system idle iowait irq softirq steal (guest time is already inside user)
    return (f[0] + f[1] + f[2] + f[5] + f[6] + (f[7] ?? 0)) / CLK_TCK;
  } catch {
    return NaN;
  }
}

export interface CpuWindow {
  /** CPU seconds per role. */
  byRole: CpuReport;
  /** Busy CPU seconds of the whole machine, and the window's wall time. */
  machineBusyS: number;
  wallS: number;
  /** Busy CPU of everything that is not one of the roles (other sessions' tests, this bench's own bookkeeping), in cores. */
  otherCores: number;
}

/** CPU seconds per role (and of the whole machine) between `start()` and the returned `stop()`. */
export function startCpuMeter(procs: ProcessSet): { stop(): CpuWindow } {
  const read = (): Map<string, Map<number, number>> =>
    new Map(Object.entries(procs).map(([role, pids]) => [role, new Map(pids().map((pid) => [pid, cpuSeconds(pid)]))]));
  const before = read();
  const machine0 = machineBusySeconds();
  const t0 = performance.now();
  return {
    stop() {
      const after = read();
      const machineBusyS = machineBusySeconds() - machine0;
      const wallS = (performance.now() - t0) / 1000;
      const byRole: CpuReport = {};
      for (const [role, pids] of after) {
        let total = 0;
        // A process that started during the window counts from 0.
        for (const [pid, s] of pids) total += s - (before.get(role)?.get(pid) ?? 0);
        byRole[role] = total;
      }
      const ours = Object.values(byRole).reduce((a, b) => a + b, 0);
      return { byRole, machineBusyS, wallS, otherCores: Math.max(0, machineBusyS - ours) / wallS };
    },
  };
}

/** RSS per role, summed over the role's processes. */
export function rssByRole(procs: ProcessSet): Record<string, number> {
  const out: Record<string, number> = {};
  for (const [role, pids] of Object.entries(procs)) out[role] = pids().reduce((sum, pid) => sum + rssBytes(pid), 0);
  return out;
}
