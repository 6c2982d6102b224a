/**
 * Writes deploy/CONFIG.md, the reference of both config files, from their
 * schemas (proxy/config.ts, agent/config.ts): every field with its type, its
 * range or rule, its default and its `.describe()` text.
 *
 *   node --import tsx scripts/gen-config-docs.ts           write deploy/CONFIG.md (npm run gen:config-docs)
 *   node --import tsx scripts/gen-config-docs.ts --check   fail if deploy/CONFIG.md differs (npm run check:config-docs)
 */
import { readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { agentConfigSchema } from "../agent/config.ts";
import { proxyConfigSchema } from "../proxy/config.ts";
import { configReference } from "../shared/config-docs.ts";
import { DOCS_CONTEXT } from "../shared/schema.ts";

const OUT = join(dirname(fileURLToPath(import.meta.url)), "..", "deploy", "CONFIG.md");

/** The page as the schemas generate it now. */
export function configDocs(): string {
  return configReference(proxyConfigSchema(DOCS_CONTEXT), agentConfigSchema(DOCS_CONTEXT));
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const want = configDocs();
  if (process.argv.includes("--check")) {
    let have = "";
    try {
      have = readFileSync(OUT, "utf8");
    } catch {
      /* missing: differs */
    }
    if (have !== want) {
      console.error("check:config-docs: deploy/CONFIG.md is out of date with the config schemas: run npm run gen:config-docs");
      process.exit(1);
    }
    console.log("check:config-docs: deploy/CONFIG.md matches the config schemas");
  } else {
    writeFileSync(OUT, want);
    console.log(`wrote ${OUT}`);
  }
}
