/**
 * `xks-proxy` command line: a table of commands (shared/cli.ts has the
 * convention: per-command options and help, exit codes 0 / 1 / 2).
 *
 *   xks-proxy serve --config FILE          validate the config, log it (no secrets), listen (with
 *                                          `workers` > 1: as the primary of that many workers, proxy/cluster.ts);
 *                                          SIGTERM/SIGINT → graceful close; SIGHUP → reload key stores
 *                                          (credentials, allow-lists), identities and the TLS certificate
 *   xks-proxy check --config FILE          validate the config and exit (0 = valid, 1 = not)
 *   xks-proxy credentials new [--prefix /p]   a fresh SigV4 credential and the KMS "proxy configuration file"
 *   xks-proxy identity new --out PATH      this proxy's channel identity: PATH.key (0600) and PATH.crt
 *   xks-proxy install --agents ID[,ID…] [--dry-run]   the systemd unit and tmpfiles.d entry for this machine
 *   xks-proxy --version | --help
 */
import { isAbsolute, join, resolve } from "node:path";
import { type Command, command, CommandFailure, EXIT, type Program, runProgram, UsageError } from "../shared/cli.ts";
import { ConfigError } from "../shared/config.ts";
import { writeNewIdentity } from "../shared/identity.ts";
import { dryRunText, writeServiceFiles } from "../shared/install.ts";
import { createLogger } from "../shared/logging.ts";
import { PACKAGE_ROOT } from "../shared/paths.ts";
import { VERSION } from "../shared/version.ts";
import { isWorker, runPrimary, runWorker } from "./cluster.ts";
import { loadProxyConfig, type ProxyConfig } from "./config.ts";
import { workerCount } from "../shared/schema.ts";
import { CREDENTIALS_DETAILS, credentialsNew } from "./credentials.ts";
import { checkFleet } from "./fleet-check.ts";
import { type RunningProxy, serve } from "./main.ts";
import { AGENT_ID_RE, proxyServiceFiles, TMPFILES_PATH } from "./service.ts";
import { applyReload, describeKeyStores } from "./reload.ts";

const out = (s: string) => process.stdout.write(`${s}\n`);
const err = (s: string) => process.stderr.write(`${s}\n`);

const CONFIG = { type: "string", arg: "FILE", description: "the proxy's config file", required: true } as const;

async function serveCommand(file: string): Promise<number> {
  // A worker of a multi-process proxy (same command line): its config comes from the primary.
  if (isWorker()) return runWorker();
  let config: Readonly<ProxyConfig>;
  try {
    config = loadProxyConfig(file, process.env);
  } catch (e) {
    if (e instanceof ConfigError) {
      err(e.message);
      return EXIT.usage;
    }
    throw e;
  }
  const log = createLogger({ level: config.log.level, format: config.log.format, name: "xks-proxy" });
  const workers = workerCount(config.workers);
  if (workers > 1) return runPrimary(file, config, log, workers);
  let proxy: RunningProxy;
  try {
    proxy = await serve(config, log);
  } catch (e) {
    log.fatal({ err: { code: (e as NodeJS.ErrnoException).code, message: (e as Error).message } }, "cannot start");
    log.flush();
    return EXIT.failure;
  }
  const running = proxy;
  return await new Promise<number>((resolvePromise) => {
    const stop = (signal: string) => {
      log.info({ signal }, "shutting down");
      process.off("SIGTERM", onTerm);
      process.off("SIGINT", onInt);
      process.off("SIGHUP", onHup);
      void running.close(5000).then(() => {
        log.info("stopped");
        log.flush();
        resolvePromise(EXIT.ok);
      });
    };
    const onTerm = () => stop("SIGTERM");
    const onInt = () => stop("SIGINT");
    // Credential rotation without restart: re-read the file, swap key stores if it is valid.
    const onHup = () => {
      try {
        const next = loadProxyConfig(file, process.env);
        applyReload(running, next, log);
        log.info(
          { keyStores: describeKeyStores(next) },
          "key stores and identities reloaded, and the TLS certificate if any (other settings need a restart)",
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

/** Every command of xks-proxy: adding a subcommand is adding an entry here. */
export const COMMANDS: Command[] = [
  command({
    name: "serve",
    summary: "run the proxy (SIGHUP reloads credentials, allow-lists, identities and the TLS certificate; SIGTERM stops gracefully)",
    options: { config: CONFIG },
    examples: ["xks-proxy serve --config /etc/xks-proxy/proxy.json"],
    run: (v) => serveCommand(v.config),
  }),
  command({
    name: "check",
    summary:
      "validate the config file and every file it names, ask every agent for its health and compare their key check values (1 when anything is wrong)",
    options: { config: CONFIG, json: { type: "boolean", description: "one JSON object: {ok, file, problems, agents}" } },
    details:
      "An agent that cannot be reached is reported and does not fail the check (its tunnel is dialled from the owner's machine); a key whose agents hold different key material does.",
    examples: ["xks-proxy check --config /etc/xks-proxy/proxy.json", "xks-proxy check --config proxy.json --json"],
    run: async (v) => {
      let problems: string[] = [];
      let config: ProxyConfig | undefined;
      try {
        config = loadProxyConfig(v.config, process.env);
      } catch (e) {
        if (!(e instanceof ConfigError)) throw e;
        problems = e.problems;
        if (!v.json) err(e.message);
      }
      const fleet = config ? await checkFleet(config) : undefined;
      const ok = problems.length === 0 && (fleet?.ok ?? false);
      if (v.json) out(JSON.stringify({ ok, file: v.config, problems, agents: fleet?.lines ?? [] }));
      else if (config) {
        out(`${v.config}: OK`);
        for (const line of fleet?.lines ?? []) out(line);
      }
      return ok ? EXIT.ok : EXIT.failure;
    },
  }),
  command({
    name: "credentials new",
    summary: "mint a SigV4 credential for a key store: the secret into a new 0600 file, the config entry and the aws kms commands printed",
    options: {
      "secret-out": {
        type: "string",
        arg: "FILE",
        description: "where the secret is written (created 0600, never overwritten)",
        required: true,
      },
      endpoint: {
        type: "string",
        arg: "URL",
        description: "the XksProxyUriEndpoint: https:// and the DNS name KMS calls (no port, no path)",
        required: true,
      },
      region: { type: "string", arg: "REGION", description: "the proxy's region (KMS signs with the key store's region)", required: true },
      prefix: { type: "string", arg: "PREFIX", description: "the key store's uriPathPrefix in the config", default: "" },
      name: { type: "string", arg: "NAME", description: "the custom key store's name", default: "xks-pair" },
      connectivity: { type: "string", arg: "TYPE", description: "PUBLIC_ENDPOINT or VPC_ENDPOINT_SERVICE", default: "PUBLIC_ENDPOINT" },
      "vpc-endpoint-service-name": {
        type: "string",
        arg: "NAME",
        description: "com.amazonaws.vpce.REGION.vpce-svc-… (VPC_ENDPOINT_SERVICE only)",
      },
      "console-file": {
        type: "string",
        arg: "FILE",
        description: "also write the KMS console's proxy configuration file (it holds the secret; 0600)",
      },
      "show-secret": {
        type: "boolean",
        description: "also print the secret and the console's file (they stay in the terminal's scrollback)",
      },
    },
    details: CREDENTIALS_DETAILS,
    examples: [
      "xks-proxy credentials new --secret-out /etc/xks-proxy/store1.secret --endpoint https://xks.example.com --region us-east-1 --prefix /example/prefix",
    ],
    run: (v) => credentialsNew(v, { out, err }),
  }),
  command({
    name: "identity new",
    summary: "write this proxy's channel identity: PATH.key (0600) and PATH.crt; never overwrites",
    options: { out: { type: "string", arg: "PATH", description: "the files' path without .key/.crt", required: true } },
    examples: ["sudo -u xks-proxy xks-proxy identity new --out /etc/xks-proxy/proxy-identity"],
    run: (v) => {
      try {
        for (const line of writeNewIdentity(v.out, "proxy", "xks-proxy")) out(line);
        return EXIT.ok;
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code === "EEXIST") throw new CommandFailure(`${v.out}.key or .crt exists already`);
        throw e;
      }
    },
  }),
  command({
    name: "install",
    summary: "write the systemd unit and the tmpfiles.d entry for this machine (--dry-run: print them only)",
    options: {
      agents: {
        type: "string",
        arg: "ID[,ID…]",
        description: "the agents' ids: tunnel user and group xks-t-ID, socket folder /run/xks/ID",
        required: true,
      },
      config: { type: "string", arg: "FILE", description: "the config the unit serves", default: "/etc/xks-proxy/proxy.json" },
      user: { type: "string", arg: "USER", description: "the proxy's own user and group", default: "xks-proxy" },
      "dry-run": { type: "boolean", description: "print exactly what would be written; write nothing" },
      force: { type: "boolean", description: "replace files that exist with other content" },
      root: { type: "string", arg: "DIR", description: "write under DIR instead of / (an image being built)", default: "/" },
    },
    details:
      "The unit runs this machine's node (process.execPath) on this package's bin/xks-proxy.js. The users and\n" +
      "groups are made by hand first (deploy/EC2.md step 1). A file that exists with other content is refused\n" +
      "unless --force; nothing is written then.",
    examples: ["xks-proxy install --agents ownermac --dry-run", "sudo xks-proxy install --agents ownermac"],
    run: (v) => {
      const agents = v.agents.split(",").map((a) => a.trim());
      const bad = agents.filter((a) => !AGENT_ID_RE.test(a));
      if (bad.length > 0)
        throw new UsageError(`--agents: ${bad.map((a) => JSON.stringify(a)).join(", ")} must match ${AGENT_ID_RE.source}`);
      if (!/^[a-z_][a-z0-9_-]{0,31}$/.test(v.user)) throw new UsageError("--user must be a user name ([a-z_][a-z0-9_-]*)");
      const config = isAbsolute(v.config) ? v.config : resolve(v.config);
      const bin = join(PACKAGE_ROOT, "bin", "xks-proxy.js");
      // ProtectHome=yes hides these folders from the service: the package and the config must live elsewhere.
      const hidden = [process.execPath, bin, config].filter((p) => /^\/(home|root|run\/user)(\/|$)/.test(p));
      if (hidden.length > 0)
        throw new CommandFailure(
          `${hidden.join(" and ")} would be hidden from the service (ProtectHome=yes): node, the package (/opt/xks) and the config (/etc/xks-proxy) must live elsewhere (README, Install for production)`,
        );
      const files = proxyServiceFiles({ node: process.execPath, bin, config, agents, user: v.user });
      if (v["dry-run"]) {
        out(dryRunText(files));
        return EXIT.ok;
      }
      for (const line of writeServiceFiles(files, { root: v.root, force: v.force })) out(line);
      out("");
      out("next, as root:");
      out(`  systemd-tmpfiles --create ${TMPFILES_PATH}`);
      out("  systemctl daemon-reload && systemctl enable --now xks-proxy");
      out("  systemctl reload xks-proxy    # after changing credentials, allow-lists or identities");
      return EXIT.ok;
    },
  }),
];

export const PROGRAM: Program = {
  name: "xks-proxy",
  version: VERSION,
  summary: "the XKS proxy for AWS KMS, forwarding to the owner's HSM agent",
  commands: COMMANDS,
};

/** Runs the CLI; resolves with the process exit code (serve resolves after a graceful stop). */
export function main(argv: string[]): Promise<number> {
  return runProgram(PROGRAM, argv);
}
