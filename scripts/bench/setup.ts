/** Before a run: a current dist/ (the daemons run it) and no daemons left over from an interrupted run. */
import { spawnSync } from "node:child_process";
import { existsSync, readdirSync, readFileSync, statSync } from "node:fs";
import { join } from "node:path";
import { PACKAGE_ROOT } from "../../shared/paths.ts";
import { chainPidFiles } from "../../testbed/chain.ts";
import { stopLeftovers } from "../../testbed/procs.ts";
import { PROXY_ONLY_LEFTOVERS } from "./proxy-only.ts";
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
export function stopBenchLeftovers(dir: string): void {
  const chains = ["chain", "wan-chain", "cold-chain", "scaling-chain"].flatMap((d) => chainPidFiles(join(dir, d)));
  for (const pid of [...stopLeftovers(chains), ...stopLeftovers([join(dir, "proxy-only", "pids")], PROXY_ONLY_LEFTOVERS)]) {
    progress(`stopped a leftover process of an earlier run (pid ${pid})`);
  }
}

export function tcpCongestionControl(): string {
  try {
    return readFileSync("/proc/sys/net/ipv4/tcp_congestion_control", "utf8").trim();
  } catch {
    return "?";
  }
}
