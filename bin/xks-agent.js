#!/usr/bin/env node
// Runs the compiled agent CLI (npm run build / npm ci builds dist/).
import { main } from "../dist/agent/cli.js";

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (err) => {
    console.error(err instanceof Error ? err.message : String(err));
    process.exitCode = 1;
  },
);
