/** Before a run: a current dist/ (the daemons run it) and no daemons left over from an interrupted run. */
import { spawnSync } from "node:child_process";
import { existsSync, readdirSync, readFileSync, statSync } from "node:fs";
import { join } from "node:path";
import { PACKAGE_ROOT } from "../../shared/paths.ts";
import { progress } from "./report.ts";

/** Builds dist/ when it is missing or older than a source file. */
export function ensureBuilt(): void {
  const stale = (dir: string): boolean =>
    readdirSync(join(PACKAGE_ROOT, dir), { withFileTypes: true }).some((e) => {
      const rel = join(dir, e.name);
      if (e.isDirectory()) return stale(rel);
      if (!e.name.endsWith(".ts")) return false;
      const out = join(PACKAGE_ROOT, "dist", rel.replace(/\.ts$/, ".js"));
      return !existsSync(out) || statSync(out).mtimeMs < statSync(join(PACKAGE_ROOT, rel)).mtimeMs;
    });
  if (!["agent", "proxy", "shared"].some(stale)) return;
  progress("dist/ is missing or older than the sources: npm run build");
  const r = spawnSync("npm", ["run", "--silent", "build"], { cwd: PACKAGE_ROOT, stdio: "inherit" });
  if (r.status !== 0) {
    if (!existsSync(join(PACKAGE_ROOT, "dist/agent/cli.js"))) throw new Error("npm run build failed and there is no dist/");
    progress("WARNING: npm run build failed; measuring the existing dist/");
  }
}

/** Stops daemons an interrupted earlier run left behind (pids recorded by the chains and by sshd). */
export function stopLeftovers(dir: string): void {
  for (const sub of ["chain", "wan-chain"]) {
    for (const f of ["pids", "wan-agent.pid", "ssh/sshd.pid", "ssh-wan/sshd.pid"]) {
      const file = join(dir, sub, f);
      if (!existsSync(file)) continue;
      for (const pid of readFileSync(file, "utf8").split(/\s+/).filter(Boolean).map(Number)) {
        try {
          if (!/xks-|sshd/.test(readFileSync(`/proc/${pid}/cmdline`, "utf8"))) continue; // the pid was reused
          process.kill(pid, "SIGTERM");
          progress(`stopped a leftover process of an earlier run (pid ${pid})`);
        } catch {
          /* gone */
        }
      }
    }
  }
}

export function tcpCongestionControl(): string {
  try {
    return readFileSync("/proc/sys/net/ipv4/tcp_congestion_control", "utf8").trim();
  } catch {
    return "?";
  }
}
