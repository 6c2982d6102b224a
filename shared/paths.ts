import { existsSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

/** The package's root folder, whether running from sources (tsx) or from dist/. */
export const PACKAGE_ROOT: string = (() => {
  let dir = dirname(fileURLToPath(import.meta.url));
  while (!existsSync(join(dir, "package.json")) || !existsSync(join(dir, "proto"))) {
    const up = dirname(dir);
    if (up === dir) throw new Error("cannot find the package root (package.json + proto/)");
    dir = up;
  }
  return dir;
})();
