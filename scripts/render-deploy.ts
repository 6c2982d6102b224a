/**
 * Writes deploy/xks-proxy.service, deploy/xks-run.conf and deploy/com.example.xks-agent.plist
 * from the same templates `xks-proxy install` and `xks-agent install` render, with the example
 * paths of deploy/EC2.md (test/unit/service-files.test.ts checks they are up to date).
 */
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { PACKAGE_ROOT } from "../shared/paths.ts";
import { DEPLOY_FILES } from "../testbed/deploy-files.ts";

for (const [file, render] of Object.entries(DEPLOY_FILES)) {
  writeFileSync(join(PACKAGE_ROOT, file), render());
  console.log(`wrote ${file}`);
}
