/**
 * xks-proxy command line.
 *
 *   xks-proxy serve --config FILE        validate the config, log it (no secrets), listen;
 *                                        SIGTERM/SIGINT → graceful close; SIGHUP → reload key stores
 *                                        (credentials, allow-lists), identities and the TLS
 *                                        certificate from the same file
 *   xks-proxy check --config FILE        validate the config and exit (0 = valid)
 *   xks-proxy credentials new [--prefix /p]
 *                                        print a fresh SigV4 credential and the KMS
 *                                        "proxy configuration file" JSON for it
 *   xks-proxy identity new --out PATH    write this proxy's channel identity: PATH.key (0600) and PATH.crt
 *   xks-proxy version
 */
import { ConfigError } from "../shared/config.ts";
import { writeNewIdentity } from "../shared/identity.ts";
import { createLogger, type Logger } from "../shared/logging.ts";
import { VERSION } from "../shared/version.ts";
import { loadProxyConfig, prefixProblem, type ProxyConfig } from "./config.ts";
import { newCredential } from "./credentials.ts";
import { type RunningProxy, serve } from "./main.ts";
import { describeTls } from "./tls.ts";

const USAGE = `usage:
  xks-proxy serve --config FILE
  xks-proxy check --config FILE
  xks-proxy credentials new [--prefix /uri/path/prefix]
  xks-proxy identity new --out PATH
  xks-proxy version`;

function flag(argv: string[], name: string): string | undefined {
  const i = argv.indexOf(name);
  if (i < 0) return undefined;
  const v = argv[i + 1];
  return v === undefined || v.startsWith("--") ? "" : v;
}

function out(s: string): void {
  process.stdout.write(`${s}\n`);
}
function err(s: string): void {
  process.stderr.write(`${s}\n`);
}

async function cmdServe(argv: string[]): Promise<number> {
  const file = flag(argv, "--config");
  if (!file) {
    err(USAGE);
    return 2;
  }
  let config: Readonly<ProxyConfig>;
  try {
    config = loadProxyConfig(file, process.env);
  } catch (e) {
    if (e instanceof ConfigError) {
      err(e.message);
      return 1;
    }
    throw e;
  }
  const log = createLogger({ level: config.log.level, name: "xks-proxy" });
  let proxy: RunningProxy;
  try {
    proxy = await serve(config, log);
  } catch (e) {
    log.fatal({ err: { code: (e as NodeJS.ErrnoException).code, message: (e as Error).message } }, "cannot start");
    log.flush();
    return 1;
  }
  const running = proxy;
  return await new Promise<number>((resolve) => {
    const stop = (signal: string) => {
      log.info({ signal }, "shutting down");
      process.off("SIGTERM", onTerm);
      process.off("SIGINT", onInt);
      process.off("SIGHUP", onHup);
      void running.close(5000).then(() => {
        log.info("stopped");
        log.flush();
        resolve(0);
      });
    };
    const onTerm = () => stop("SIGTERM");
    const onInt = () => stop("SIGINT");
    // Credential rotation without restart: re-read the file, swap key stores if it is valid.
    const onHup = () => {
      try {
        const next = loadProxyConfig(file, process.env);
        running.keyStores.replace(next.keyStores);
        void running.agents.updateIdentities(next.identity, next.agents);
        reloadTls(running, next, log);
        log.info(
          {
            keyStores: next.keyStores.map((s) => ({
              uriPathPrefix: s.uriPathPrefix,
              accessKeyIds: s.credentials.map((c) => c.accessKeyId),
              keys: s.keys.length,
            })),
          },
          "key stores and identities reloaded (other settings need a restart)",
        );
      } catch (e) {
        log.error(
          { problems: e instanceof ConfigError ? e.problems : [(e as Error).message] },
          "reload rejected; keeping the running config",
        );
      }
    };
    process.on("SIGTERM", onTerm);
    process.on("SIGINT", onInt);
    process.on("SIGHUP", onHup);
  });
}

/** SIGHUP's TLS part: the re-read certificate, key and client CA for new connections (proxy/tls.ts). */
function reloadTls(running: RunningProxy, next: Readonly<ProxyConfig>, log: Logger): void {
  if (!running.tls) {
    if (next.tls) log.warn("tls was added to the config: serving HTTPS needs a restart; still serving plain HTTP");
    return;
  }
  const problem = running.tls.reload(next.tls);
  if (problem) log.warn(problem);
  else log.info({ tls: describeTls(next.tls) }, "TLS certificate reloaded for new connections");
}

function cmdCheck(argv: string[]): number {
  const file = flag(argv, "--config");
  if (!file) {
    err(USAGE);
    return 2;
  }
  try {
    loadProxyConfig(file, process.env);
    out(`${file}: OK`);
    return 0;
  } catch (e) {
    if (e instanceof ConfigError) {
      err(e.message);
      return 1;
    }
    throw e;
  }
}

function cmdCredentials(argv: string[]): number {
  if (argv[0] !== "new") {
    err(USAGE);
    return 2;
  }
  const prefix = flag(argv, "--prefix") ?? "";
  const problem = prefixProblem(prefix);
  if (problem) {
    err(`--prefix ${problem}`);
    return 2;
  }
  const c = newCredential(prefix);
  out(`AccessKeyId:     ${c.accessKeyId}`);
  out(`SecretAccessKey: ${c.secretAccessKey}`);
  out("");
  out("Store the secret in a file readable only by the proxy and reference it from the config:");
  out(`  {"accessKeyId":"${c.accessKeyId}","secretAccessKey":{"file":"<path>"}}`);
  out("");
  out("KMS proxy configuration file (CreateCustomKeyStore / UpdateCustomKeyStore):");
  out(JSON.stringify(c.proxyConfigurationFile));
  return 0;
}

function cmdIdentity(argv: string[]): number {
  const outPath = flag(argv, "--out");
  if (argv[0] !== "new" || !outPath) {
    err(USAGE);
    return 2;
  }
  try {
    for (const line of writeNewIdentity(outPath, "proxy", "xks-proxy")) out(line);
    return 0;
  } catch (e) {
    err(
      `cannot write the identity: ${(e as NodeJS.ErrnoException).code === "EEXIST" ? `${outPath}.key or .crt exists already` : (e as Error).message}`,
    );
    return 1;
  }
}

/** Runs the CLI; resolves with the process exit code (serve resolves after a graceful stop). */
export async function main(argv: string[]): Promise<number> {
  switch (argv[0]) {
    case "serve":
      return cmdServe(argv.slice(1));
    case "check":
      return cmdCheck(argv.slice(1));
    case "credentials":
      return cmdCredentials(argv.slice(1));
    case "identity":
      return cmdIdentity(argv.slice(1));
    case "version":
    case "--version":
      out(`xks-proxy ${VERSION}`);
      return 0;
    case "help":
    case "--help":
    case "-h":
      out(USAGE);
      return 0;
    default:
      err(USAGE);
      return 2;
  }
}
