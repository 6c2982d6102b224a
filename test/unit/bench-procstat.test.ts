/**
 * The bench's CPU accounting of a daemon with workers (scripts/bench/procstat.ts):
 * a process tree found by parent pid, over a fake /proc and over a real tree
 * of processes whose busy grandchild reports the CPU it used; and the
 * bench's --workers list (scripts/bench/scaling.ts).
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { test } from "node:test";
import { cpuSeconds, processTree, startCpuMeter, treeCpuSeconds } from "../../scripts/bench/procstat.ts";
import { parseWorkers } from "../../scripts/bench/scaling.ts";
import { killQuietly } from "../../testbed/procs.ts";

/** A /proc/<pid>/stat line: comm in parentheses, then state, ppid, …, utime (14th field) and stime (15th) in ticks. */
const stat = (pid: number, comm: string, ppid: number, utime: number, stime: number) =>
  `${pid} (${comm}) S ${ppid} ${pid} ${pid} 0 -1 4194304 100 0 0 0 ${utime} ${stime} 0 0 20 0 1 0 1 1 1\n`;

test("processTree: the root and every descendant by parent pid, nothing else; treeCpuSeconds sums them", () => {
  const proc = mkdtempSync(join(tmpdir(), "fake-proc-"));
  try {
    const put = (pid: number, comm: string, ppid: number, utime: number, stime: number) => {
      mkdirSync(join(proc, String(pid)));
      writeFileSync(join(proc, String(pid), "stat"), stat(pid, comm, ppid, utime, stime));
    };
    put(100, "node (primary) x", 1, 10, 5); // a comm with spaces and parentheses
    put(101, "node", 100, 200, 20);
    put(102, "node", 100, 300, 30);
    put(103, "esbuild", 101, 7, 3);
    put(200, "other", 1, 1000, 1000);
    put(201, "other child", 200, 50, 50);
    mkdirSync(join(proc, "104")); // exited while listed: no stat
    mkdirSync(join(proc, "self"));
    writeFileSync(join(proc, "stat"), "cpu 1 2 3 4\n");

    assert.deepEqual(
      processTree(100, proc).sort((a, b) => a - b),
      [100, 101, 102, 103],
    );
    assert.deepEqual(processTree(101, proc).sort(), [101, 103]);
    assert.deepEqual(processTree(999, proc), [], "a root that is gone has no tree");
    const one = cpuSeconds(100, proc) / 15; // seconds per tick
    assert.ok(one > 0);
    assert.equal(cpuSeconds(101, proc), 220 * one);
    assert.ok(Math.abs(treeCpuSeconds(100, proc) - (15 + 220 + 330 + 10) * one) < 1e-9);
    assert.equal(cpuSeconds(999, proc), 0);
  } finally {
    rmSync(proc, { recursive: true, force: true });
  }
});

// A parent that starts a child that starts a grandchild; the grandchild spins until it has used BUSY_MS of CPU, prints it and idles.
const BUSY_MS = 300;
const GRANDCHILD = `const t = () => { const u = process.cpuUsage(); return (u.user + u.system) / 1000; };
while (t() < ${BUSY_MS}) {}
console.log("busy " + t());
setInterval(() => {}, 1e6);`;
const starter = (code: string) =>
  `require("node:child_process").spawn(process.execPath, ["-e", ${JSON.stringify(code)}], { stdio: "inherit" }); setInterval(() => {}, 1e6);`;

test("a real process tree: the CPU a grandchild burns counts for the root's tree, in treeCpuSeconds and in a meter over it", async () => {
  // A process group of its own, so that the whole tree is ended at once whatever the assertions found.
  const root = spawn(process.execPath, ["-e", starter(starter(GRANDCHILD))], { stdio: ["ignore", "pipe", "inherit"], detached: true });
  const meter = startCpuMeter({ daemon: () => processTree(root.pid!) });
  try {
    const lines = createInterface({ input: root.stdout! });
    let busyMs = NaN;
    for await (const line of lines) {
      const m = /^busy ([\d.]+)$/.exec(line);
      if (m) {
        busyMs = Number(m[1]);
        break;
      }
    }
    assert.ok(busyMs >= BUSY_MS, `the grandchild reported ${busyMs} ms`);
    const tree = processTree(root.pid!);
    assert.equal(tree.length, 3, "root, child and grandchild");
    // /proc counts whole ticks: utime and stime may each be up to one tick short (10 ms at 100 Hz).
    const slack = 0.021;
    const all = treeCpuSeconds(root.pid!);
    assert.ok(
      all - cpuSeconds(root.pid!) >= busyMs / 1000 - slack,
      `descendants ${all - cpuSeconds(root.pid!)} s, grandchild ${busyMs} ms`,
    );
    const w = meter.stop();
    assert.ok(w.byRole.daemon >= busyMs / 1000 - slack, `meter ${w.byRole.daemon} s, grandchild ${busyMs} ms`);
    assert.ok(cpuSeconds(root.pid!) < all, "the root alone does not include its descendants");
  } finally {
    killQuietly(-root.pid!, "SIGKILL");
    root.stdout!.destroy();
  }
});

test("--workers: counts 1..64 and `all` (this machine's cores), sorted without repeats; anything else is refused", () => {
  assert.deepEqual(parseWorkers(undefined, 2), [1, 2]);
  assert.deepEqual(parseWorkers(undefined, 8), [1, 2, 8]);
  assert.deepEqual(parseWorkers("4, all,1", 2), [1, 2, 4]);
  for (const bad of ["0", "65", "1.5", "two", "", "auto"])
    assert.throws(() => parseWorkers(bad, 2), /--workers: .* is not a count 1\.\.64 or "all"/);
});
