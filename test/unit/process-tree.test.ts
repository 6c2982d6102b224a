/**
 * The test-bed's process trees and CPU times (testbed/procs.ts), with which
 * the bench counts a daemon with workers as its primary and every worker: a
 * tree found by parent pid over a fake /proc, and over a real tree of
 * processes whose busy grandchild reports the CPU it used.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { test } from "node:test";
import { CLK_TCK, cpuSeconds, descendantsOf, killQuietly, processTree } from "../../testbed/procs.ts";

const treeCpu = (root: number, procDir?: string) => processTree(root, procDir).reduce((sum, pid) => sum + cpuSeconds(pid, procDir), 0);

/** A /proc/<pid>/stat line: comm in parentheses, then state, ppid, …, utime (14th field) and stime (15th) in ticks. */
const stat = (pid: number, comm: string, ppid: number, utime: number, stime: number) =>
  `${pid} (${comm}) S ${ppid} ${pid} ${pid} 0 -1 4194304 100 0 0 0 ${utime} ${stime} 0 0 20 0 1 0 1 1 1\n`;

test("processTree: the root and every descendant by parent pid, nothing else, root first; their CPU seconds from stat", () => {
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

    const tree = processTree(100, proc);
    assert.equal(tree[0], 100);
    assert.deepEqual(
      [...tree].sort((a, b) => a - b),
      [100, 101, 102, 103],
    );
    assert.deepEqual(
      descendantsOf(100, proc)
        .map((p) => p.comm)
        .sort(),
      ["esbuild", "node", "node"],
    );
    assert.deepEqual(processTree(101, proc).sort(), [101, 103]);
    assert.deepEqual(processTree(999, proc), [], "a root that is gone has no tree");
    const one = cpuSeconds(100, proc) / 15; // seconds per tick
    assert.ok(one > 0);
    assert.equal(cpuSeconds(101, proc), 220 * one);
    assert.ok(Math.abs(treeCpu(100, proc) - (15 + 220 + 330 + 10) * one) < 1e-9);
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

test("a real process tree: the CPU a busy grandchild burns counts for the root's tree", async () => {
  // A process group of its own, so that the whole tree is ended at once whatever the assertions found.
  const root = spawn(process.execPath, ["-e", starter(starter(GRANDCHILD))], { stdio: ["ignore", "pipe", "inherit"], detached: true });
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
    // /proc counts whole ticks: utime and stime may each be up to one tick short.
    const slack = 2 / CLK_TCK + 0.001;
    const all = treeCpu(root.pid!);
    assert.ok(
      all - cpuSeconds(root.pid!) >= busyMs / 1000 - slack,
      `descendants ${all - cpuSeconds(root.pid!)} s, grandchild ${busyMs} ms`,
    );
    assert.ok(cpuSeconds(root.pid!) < all, "the root alone does not include its descendants");
  } finally {
    killQuietly(-root.pid!, "SIGKILL");
    root.stdout!.destroy();
  }
});
