/**
 * The files under deploy/ that are renderings of the install commands' templates with the example
 * paths of deploy/EC2.md; scripts/render-deploy.ts rewrites them, a unit test checks them.
 */
import { DEPLOY_EXAMPLE as AGENT_EXAMPLE, renderAgentPlist } from "../agent/service.ts";
import { DEPLOY_EXAMPLE as PROXY_EXAMPLE, renderProxyUnit, renderTmpfiles } from "../proxy/service.ts";

export const DEPLOY_FILES: Record<string, () => string> = {
  "deploy/xks-proxy.service": () => renderProxyUnit(PROXY_EXAMPLE),
  "deploy/xks-run.conf": () => renderTmpfiles(PROXY_EXAMPLE),
  "deploy/com.example.xks-agent.plist": () => renderAgentPlist(AGENT_EXAMPLE),
};
