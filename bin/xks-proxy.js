#!/usr/bin/env node
// xks-proxy entry point. Runs the compiled CLI (npx tsc -p tsconfig.build.json → dist/).
import { main } from "../dist/proxy/cli.js";

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (err) => {
    process.stderr.write(`xks-proxy: ${err?.message ? err.message : String(err)}\n`);
    process.exitCode = 1;
  },
);
