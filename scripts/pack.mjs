// `npm pack` runs this before packing ("before": a clean build of dist/, and the lockfile as
// npm-shrinkwrap.json, which npm ships in the package so a host installs the very versions this
// repository was tested with) and after it ("after": the shrinkwrap removed again).
import { spawnSync } from "node:child_process";
import { copyFileSync, rmSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const at = (p) => join(root, p);

if (process.argv[2] === "before") {
  rmSync(at("dist"), { recursive: true, force: true });
  const r = spawnSync(process.execPath, [at("node_modules/typescript/bin/tsc"), "-p", "tsconfig.build.json"], {
    cwd: root,
    stdio: "inherit",
  });
  if (r.status !== 0) process.exit(r.status ?? 1);
  copyFileSync(at("package-lock.json"), at("npm-shrinkwrap.json"));
} else if (process.argv[2] === "after") {
  rmSync(at("npm-shrinkwrap.json"), { force: true });
} else {
  console.error("usage: node scripts/pack.mjs before|after");
  process.exit(2);
}
