// `npm install` / `npm ci` in this folder runs this (the "prepare" script): it builds dist/ with
// TypeScript, a dev dependency. Where TypeScript is not installed (npm ci --omit=dev) or there are
// no sources (the unpacked package, which ships dist/), a dist/ that is already built is used as
// it is; without one the install stops here and says what to do.
import { spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const at = (p) => join(root, p);
const tsc = at("node_modules/typescript/bin/tsc");
const hasSources = existsSync(at("tsconfig.build.json")) && existsSync(at("agent/cli.ts"));
const built = existsSync(at("dist/agent/cli.js")) && existsSync(at("dist/proxy/cli.js"));

if (hasSources && existsSync(tsc)) {
  const r = spawnSync(process.execPath, [tsc, "-p", "tsconfig.build.json"], { cwd: root, stdio: "inherit" });
  process.exit(r.status ?? 1);
} else if (built) {
  console.log("prepare: dist/ is built already; TypeScript is not needed");
} else {
  console.error(
    "prepare: cannot build dist/: TypeScript is a dev dependency and is not installed.\n" +
      "  From a clone: npm ci (with the dev dependencies), then npm prune --omit=dev for a production-only node_modules.\n" +
      "  Or on a build machine: npm ci && npm pack, and on the host install that package (README, Install).",
  );
  process.exit(1);
}
