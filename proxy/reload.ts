/**
 * What SIGHUP changes in a running proxy, given a new config that has been
 * validated: the key stores (credentials, allow-lists, quotas), the agents'
 * pinned identities and this proxy's own, and the listener's TLS certificate.
 * Other settings need a restart. A single-process proxy applies it in
 * proxy/cli.ts; each worker of a multi-process proxy applies what its primary
 * sends (proxy/cluster.ts).
 */
import type { Logger } from "../shared/logging.ts";
import type { ProxyConfig } from "./config.ts";
import type { RunningProxy } from "./main.ts";
import { describeTls } from "./tls.ts";

/** The reloaded key stores without secrets, for the log line. */
export function describeKeyStores(next: Readonly<ProxyConfig>): Array<Record<string, unknown>> {
  return next.keyStores.map((s) => ({
    uriPathPrefix: s.uriPathPrefix,
    accessKeyIds: s.credentials.map((c) => c.accessKeyId),
    keys: s.keys.length,
  }));
}

/** Applies `next` to `running`; returns a TLS problem to report, if any (the rest always applies). */
export function applyReload(running: RunningProxy, next: Readonly<ProxyConfig>, log: Logger): string | undefined {
  running.keyStores.replace(next.keyStores);
  void running.agents.updateIdentities(next.identity, next.agents);
  return reloadTls(running, next, log);
}

/** SIGHUP's TLS part: the re-read certificate, key and client CA for new connections (proxy/tls.ts). */
function reloadTls(running: RunningProxy, next: Readonly<ProxyConfig>, log: Logger): string | undefined {
  if (!running.tls) {
    if (next.tls) {
      const problem = "tls was added to the config: serving HTTPS needs a restart; still serving plain HTTP";
      log.warn(problem);
      return problem;
    }
    return undefined;
  }
  const problem = running.tls.reload(next.tls);
  if (problem) log.warn(problem);
  else log.info({ tls: describeTls(next.tls) }, "TLS certificate reloaded for new connections");
  return problem;
}
