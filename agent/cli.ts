/**
 * `xks-agent` command line: a table of commands (shared/cli.ts has the
 * convention: per-command options and help, exit codes 0 / 1 / 2).
 *
 * This module loads nothing that needs pkcs11js (a native addon, an optional
 * dependency): the commands that use the HSM import their modules when they
 * run, through needPkcs11js(), so `--version`, `--help`, `install`, `identity
 * new`, `pause`/`resume` and `keys disable|enable` work without it, and the
 * others say clearly that it is missing.
 */
import { createWriteStream, readFileSync } from "node:fs";
import { once } from "node:events";
import { homedir, userInfo } from "node:os";
import { execFileSync } from "node:child_process";
import { existsSync } from "node:fs";
import { dirname, isAbsolute, join, resolve } from "node:path";
import { type Command, command, CommandFailure, EXIT, type Program, runProgram, UsageError } from "../shared/cli.ts";
import { Checker, ConfigError, readJsonFile } from "../shared/config.ts";
import { errorMessage } from "../shared/errors.ts";
import { writeNewIdentity } from "../shared/identity.ts";
import { dryRunText, writeServiceFiles } from "../shared/install.ts";
import { createLogger } from "../shared/logging.ts";
import { PACKAGE_ROOT } from "../shared/paths.ts";
import { VERSION } from "../shared/version.ts";
import { loadAgentConfig, type AgentConfig } from "./config.ts";
import { Controls } from "./controls.ts";
import { agentServiceFiles, launchdDomain, plistPath } from "./service.ts";
import type { Hsm } from "./hsm/hsm.ts";
import type { KeyDescription } from "./keys.ts";
import type { PolicyRequest, ServingPolicy } from "./policy.ts";

const out = (s: string) => console.log(s);
const err = (s: string) => process.stderr.write(`${s}\n`);

/** Said when pkcs11js (or its compiled addon) is missing: what it is, and how to get it. */
export const PKCS11JS_MISSING =
  "this command needs pkcs11js, the PKCS#11 binding, which is not installed or not built " +
  "(it is an optional dependency with a native part: install a C++ toolchain, e.g. xcode-select --install on macOS, " +
  "then run npm rebuild pkcs11js, or npm ci without --omit=optional, in the package's folder)";

function isMissingPkcs11js(e: unknown): boolean {
  const code = (e as NodeJS.ErrnoException).code;
  return (code === "ERR_MODULE_NOT_FOUND" || code === "MODULE_NOT_FOUND") && /pkcs11js|pkcs11\.node/.test(errorMessage(e));
}

/** Loads modules that need pkcs11js; a missing or unbuilt pkcs11js is one clear runtime error. */
async function needPkcs11js<T>(load: () => Promise<T>): Promise<T> {
  try {
    return await load();
  } catch (e) {
    if (isMissingPkcs11js(e)) throw new CommandFailure(PKCS11JS_MISSING);
    throw e;
  }
}

const hsmModule = () => needPkcs11js(() => import("./hsm/hsm.ts"));
const keysModule = () => needPkcs11js(() => import("./keys.ts"));
const policyModule = () => needPkcs11js(() => import("./policy.ts"));
const tokenModule = () => needPkcs11js(() => import("./token-backup.ts"));

const PASSPHRASE_FILE = { type: "string", arg: "FILE", description: "the archive's passphrase, from a 0600 file" } as const;
const PASSPHRASE_HELP =
  "The passphrase is read from --passphrase-file (mode 0600), else from standard input, else asked for without echo; never from the command line.";

async function servingPolicy(config: AgentConfig): Promise<ServingPolicy> {
  const { allowListMap } = await policyModule();
  return { healthKey: config.healthKey, keyStores: allowListMap(config.keyStores) };
}

async function withHsm<T>(config: AgentConfig, fn: (hsm: Hsm) => T): Promise<T> {
  const { Hsm } = await hsmModule();
  const hsm = new Hsm(config.pkcs11, createLogger({ level: "warn", name: "xks-agent" }, process.stderr));
  try {
    hsm.open();
    return fn(hsm);
  } finally {
    hsm.close();
  }
}

/** The config, validated; an invalid one is a ConfigError (exit 2, every problem listed). */
const load = (file: string) => loadAgentConfig(file);

const CONFIG = { type: "string", short: "c", arg: "FILE", description: "the agent's config file", required: true } as const;
const LABEL = { type: "string", arg: "LABEL", description: "the key's label on the token", required: true } as const;
const JSON_OUT = { type: "boolean", description: "JSON for scripts instead of a table" } as const;

/** `keys list` for a person: one row per key. */
function keyTable(keys: KeyDescription[]): string {
  const rows = [
    ["LABEL", "TYPE", "USAGE", "SERVED", "KEY STORES / WHY NOT"],
    ...keys.map((k) => [
      k.label,
      `${k.type}-${k.bits}`,
      k.usage.join(",") || "none",
      k.served ? "yes" : "no",
      k.served ? k.keyStores.map((s) => s || '""').join(" ") : k.notServed.join("; "),
    ]),
  ];
  const widths = rows[0].map((_, i) => Math.max(...rows.map((r) => r[i].length)));
  return rows.map((r) => r.map((c, i) => (i === r.length - 1 ? c : c.padEnd(widths[i]))).join("  ")).join("\n");
}

const describeLine = (k: KeyDescription) =>
  `${k.label}: ${k.type}-${k.bits}, usage ${k.usage.join(",") || "none"}, ${k.served ? `served through ${k.keyStores.map((s) => s || '""').join(", ")}` : `not served: ${k.notServed.join("; ")}`}`;

const AUDIT_FILTERS = {
  "request-id": { type: "string", arg: "ID", description: "the kmsRequestId" },
  principal: { type: "string", arg: "ARN", description: "the awsPrincipalArn" },
  key: { type: "string", arg: "LABEL", description: "the key label" },
  result: { type: "string", arg: "R", description: "the result (ok or an error reason)" },
  since: { type: "string", arg: "ISO", description: "records at or after this time" },
  until: { type: "string", arg: "ISO", description: "records before this time" },
} as const;

async function auditSearch(
  v: { config: string; out?: string } & Record<keyof typeof AUDIT_FILTERS, string | undefined>,
  exportTo?: string,
) {
  const config = load(v.config);
  const { searchAudit } = await import("./audit/read.ts");
  const filter = {
    requestId: v["request-id"],
    principal: v.principal,
    key: v.key,
    result: v.result,
    since: v.since,
    until: v.until,
  };
  const stream = exportTo ? createWriteStream(exportTo, { flags: "wx", mode: 0o600 }) : process.stdout;
  let count = 0;
  for await (const line of searchAudit(config.audit.dir, filter)) {
    count++;
    if (!stream.write(Buffer.concat([line, Buffer.from("\n")]))) await once(stream, "drain");
  }
  if (exportTo) {
    (stream as ReturnType<typeof createWriteStream>).end();
    await once(stream, "finish");
    out(`exported ${count} lines to ${exportTo}`);
  }
  return EXIT.ok;
}

/** Every command of xks-agent: adding a subcommand is adding an entry here. */
export const COMMANDS: Command[] = [
  command({
    name: "run",
    summary: "run the agent (exits 1 with one line on a failure that cannot heal; SIGHUP reloads identities and pins)",
    options: { config: CONFIG },
    examples: ["xks-agent run --config ~/.config/xks-agent/agent.json"],
    run: async (v) => {
      const config = load(v.config);
      const { runAgent, StartError } = await needPkcs11js(() => import("./main.ts"));
      let agent: Awaited<ReturnType<typeof runAgent>>;
      try {
        agent = await runAgent(config);
      } catch (e) {
        if (!(e instanceof StartError)) throw e;
        err(`xks-agent: cannot start: ${e.message}`);
        return EXIT.failure;
      }
      await new Promise<void>((resolvePromise) => {
        const onSignal = (sig: string) => {
          agent.log.info({ signal: sig }, "signal received");
          void agent.stop().then(resolvePromise);
        };
        process.once("SIGTERM", onSignal);
        process.once("SIGINT", onSignal);
        // Identity rotation without a restart: re-read the file; a bad file keeps the running identities.
        process.on("SIGHUP", () => {
          try {
            agent.reload(loadAgentConfig(v.config));
          } catch (e) {
            agent.log.error(
              { problems: e instanceof ConfigError ? e.problems : [errorMessage(e)] },
              "reload rejected; keeping the running identities",
            );
          }
        });
      });
      return EXIT.ok;
    },
  }),
  command({
    name: "check",
    summary: "preflight: every item ✓/✗ with a fix hint, the config included (exit 1 when any fails)",
    options: { config: CONFIG, json: { type: "boolean", description: "one JSON object: {ok, items: [{item, result, detail, fix}]}" } },
    examples: ["xks-agent check --config agent.json", "xks-agent check --config agent.json --json"],
    run: async (v) => {
      const { runChecks } = await needPkcs11js(() => import("./check.ts"));
      const outcomes = await runChecks(v.config, v.json ? () => {} : out);
      const ok = !outcomes.some((o) => o.result === "failed");
      if (v.json) out(JSON.stringify({ ok, items: outcomes }));
      return ok ? EXIT.ok : EXIT.failure;
    },
  }),
  command({
    name: "init",
    summary: "first setup: a config with safe defaults, its secrets, the keys, optionally a SoftHSM token; then check",
    options: {
      config: { ...CONFIG, description: "the config file to create (its folder holds everything init makes)" },
      "softhsm-init": {
        type: "boolean",
        description: "make a SoftHSM token of its own in the folder (softhsm2.conf, tokens/), PINs generated",
      },
      "pin-store": {
        type: "string",
        arg: "file|keychain",
        description: "where generated PINs go (keychain: macOS login Keychain)",
        default: "file",
      },
      "pin-file": { type: "string", arg: "FILE", description: "an existing token's user PIN (instead of --softhsm-init)" },
      module: { type: "string", arg: "PATH", description: "the PKCS#11 module (default: SoftHSM's, where found)" },
      "token-label": { type: "string", arg: "LABEL", description: "the token's label", default: "xks" },
      "agent-id": { type: "string", arg: "ID", description: "this agent's id (default: from the host name)" },
      "key-store": { type: "string", arg: "PREFIX", description: "the key store's uriPathPrefix in the proxy's config", default: "" },
      key: { type: "string", arg: "LABEL", description: "the label of the KMS key to create", default: "kms-key-1" },
      "proxy-identity": { type: "string", arg: "CRT", description: "the proxy's certificate to pin (copied into the folder)" },
      "tunnel-host": { type: "string", arg: "HOST", description: "the EC2 host's sshd (adds a tunnels entry)" },
      "tunnel-port": { type: "string", arg: "PORT", description: "its port", default: "22" },
      "tunnel-user": { type: "string", arg: "USER", description: "the tunnel user there (default xks-t-ID)" },
      "host-key-fingerprint": { type: "string", arg: "SHA256:…", description: "the host's pinned key (ssh-keygen -lf on the host)" },
    },
    details:
      "Nothing that exists is overwritten, and no secret is printed. The final check may report the tunnel unreachable\n" +
      "or the proxy's certificate missing: expected before the EC2 side exists (exit 0); any other failure exits 1.\n" +
      "With --softhsm-init the agent needs SOFTHSM2_CONF=FOLDER/softhsm2.conf (xks-agent install sets it).",
    examples: [
      "xks-agent init --config ~/.config/xks-agent/agent.json --softhsm-init --key-store /example/prefix",
      "xks-agent init --config agent.json --module /usr/lib/softhsm/libsofthsm2.so --token-label xks --pin-file pin",
    ],
    run: async (v) => {
      const port = Number(v["tunnel-port"]);
      if (!Number.isInteger(port) || port < 1 || port > 65535) throw new UsageError("--tunnel-port must be 1-65535");
      if (v["pin-store"] !== "file" && v["pin-store"] !== "keychain") throw new UsageError("--pin-store must be file or keychain");
      const { prefixProblem } = await import("../shared/xks-spec.ts");
      const problem = prefixProblem(v["key-store"]);
      if (problem) throw new UsageError(`--key-store ${problem}`);
      const { init } = await needPkcs11js(() => import("./setup.ts"));
      const r = await init(
        {
          config: v.config,
          softhsmInit: v["softhsm-init"],
          pinStore: v["pin-store"],
          tokenLabel: v["token-label"],
          keyStore: v["key-store"],
          key: v.key,
          tunnelPort: port,
          ...(v["pin-file"] !== undefined ? { pinFile: v["pin-file"] } : {}),
          ...(v.module !== undefined ? { module: v.module } : {}),
          ...(v["agent-id"] !== undefined ? { agentId: v["agent-id"] } : {}),
          ...(v["proxy-identity"] !== undefined ? { proxyIdentity: v["proxy-identity"] } : {}),
          ...(v["tunnel-host"] !== undefined ? { tunnelHost: v["tunnel-host"] } : {}),
          ...(v["tunnel-user"] !== undefined ? { tunnelUser: v["tunnel-user"] } : {}),
          ...(v["host-key-fingerprint"] !== undefined ? { hostKeyFingerprint: v["host-key-fingerprint"] } : {}),
        },
        out,
      );
      if (r.failed.length > 0) {
        out(`init made everything, but ${r.failed.length} check(s) failed: see the ✗ lines above`);
        return EXIT.failure;
      }
      out(r.pending.length > 0 ? "init done; the rest waits for the EC2 side (see above)" : "init done; every check passed");
      return EXIT.ok;
    },
  }),
  command({
    name: "install",
    summary: "write the launchd job for this machine and load it (macOS; --dry-run prints it anywhere)",
    options: {
      config: CONFIG,
      daemon: {
        type: "boolean",
        description: "a LaunchDaemon (/Library/LaunchDaemons, runs from boot as this user) instead of a LaunchAgent",
      },
      label: { type: "string", arg: "LABEL", description: "the launchd label", default: "local.xks-agent" },
      "softhsm-conf": {
        type: "string",
        arg: "FILE",
        description: "SOFTHSM2_CONF for the job (default: $SOFTHSM2_CONF, else softhsm2.conf beside the config)",
      },
      "dry-run": { type: "boolean", description: "print exactly what would be written; write and load nothing" },
      force: { type: "boolean", description: "replace a plist that exists with other content" },
    },
    details:
      "The job runs this machine's node (process.execPath) on this package's bin/xks-agent.js with absolute paths\n" +
      "(launchd uses no PATH). A LaunchAgent runs only while you are logged in; a LaunchDaemon cannot read the\n" +
      "login Keychain, so its secrets must be files.",
    examples: [
      "xks-agent install --config ~/.config/xks-agent/agent.json --dry-run",
      "xks-agent install --config ~/.config/xks-agent/agent.json",
    ],
    run: (v) => {
      if (!/^[A-Za-z0-9][A-Za-z0-9._-]*$/.test(v.label)) throw new UsageError("--label must be letters, digits, '.', '_' or '-'");
      const config = isAbsolute(v.config) ? v.config : resolve(v.config);
      const beside = join(dirname(config), "softhsm2.conf");
      const softhsmConf = v["softhsm-conf"] ?? process.env.SOFTHSM2_CONF ?? (existsSync(beside) ? beside : undefined);
      const user = userInfo();
      const opts = {
        label: v.label,
        node: process.execPath,
        bin: join(PACKAGE_ROOT, "bin", "xks-agent.js"),
        config,
        home: homedir(),
        ...(softhsmConf !== undefined ? { softhsmConf: resolve(softhsmConf) } : {}),
        ...(v.daemon ? { daemonUser: user.username } : {}),
      };
      const files = agentServiceFiles(opts);
      if (v["dry-run"]) {
        out(dryRunText(files));
        return EXIT.ok;
      }
      if (process.platform !== "darwin")
        throw new CommandFailure("launchd is macOS only: on this machine --dry-run prints the plist, nothing is installed");
      for (const line of writeServiceFiles(files, { root: "/", force: v.force })) out(line);
      const domain = launchdDomain(opts, user.uid);
      try {
        execFileSync("/bin/launchctl", ["bootstrap", domain, plistPath(opts)], { stdio: ["ignore", "inherit", "pipe"] });
      } catch (e) {
        const why = ((e as { stderr?: Buffer }).stderr ?? Buffer.alloc(0)).toString().trim() || errorMessage(e);
        throw new CommandFailure(
          `launchctl bootstrap ${domain} ${plistPath(opts)} failed: ${why} (if it is loaded already: launchctl bootout ${domain}/${v.label}, then install again)`,
        );
      }
      out(`loaded ${domain}/${v.label}; it starts now and at every ${v.daemon ? "boot" : "login"}`);
      out(`restart: launchctl kickstart -k ${domain}/${v.label}    stop: launchctl bootout ${domain}/${v.label}`);
      return EXIT.ok;
    },
  }),
  command({
    name: "keys create",
    summary: "make a key on the token: AES-256 for KMS (sensitive, never extractable) or the audit log's HMAC key",
    options: {
      config: CONFIG,
      label: LABEL,
      usage: { type: "string", arg: "U", description: "encrypt,decrypt | encrypt | decrypt | none", default: "encrypt,decrypt" },
      type: { type: "string", arg: "T", description: "aes (a KMS key) or audit (the audit log's HMAC key)", default: "aes" },
      json: JSON_OUT,
    },
    examples: [
      "xks-agent keys create --config agent.json --label my-kms-key",
      "xks-agent keys create --config agent.json --type audit --label xks-audit",
    ],
    run: async (v) => {
      if (v.type !== "aes" && v.type !== "audit") throw new UsageError("--type must be aes or audit");
      const { createAuditKey, createKey, describeKey, parseUsage } = await keysModule();
      let usage: ReturnType<typeof parseUsage>;
      try {
        usage = parseUsage(v.usage);
      } catch (e) {
        throw new UsageError(`--usage: ${errorMessage(e)}`);
      }
      const config = load(v.config);
      const info = await withHsm(config, (hsm) => (v.type === "audit" ? createAuditKey(hsm, v.label) : createKey(hsm, v.label, usage)));
      const d = describeKey(info, await servingPolicy(config));
      out(v.json ? JSON.stringify(d) : `created ${describeLine(d)}`);
      return EXIT.ok;
    },
  }),
  command({
    name: "keys list",
    summary: "every secret key on the token: attributes, whether KMS may use it, through which key stores, why not",
    options: { config: CONFIG, json: { type: "boolean", description: "one JSON object per line, one line per key" } },
    examples: ["xks-agent keys list --config agent.json", "xks-agent keys list --config agent.json --json"],
    run: async (v) => {
      const config = load(v.config);
      const { describeKey } = await keysModule();
      const policy = await servingPolicy(config);
      const keys = (await withHsm(config, (hsm) => hsm.listKeys())).map((k) => describeKey(k, policy));
      if (v.json) for (const k of keys) out(JSON.stringify(k));
      else out(keys.length === 0 ? "no secret keys on the token" : keyTable(keys));
      return EXIT.ok;
    },
  }),
  ...(["disable", "enable"] as const).map((what) =>
    command({
      name: `keys ${what}`,
      summary:
        what === "disable"
          ? "the owner's per-key switch: metadata says DISABLED, crypto is refused (the running agent follows at once)"
          : "undo keys disable",
      options: { config: CONFIG, label: LABEL },
      examples: [`xks-agent keys ${what} --config agent.json --label my-kms-key`],
      run: (v) => {
        const config = load(v.config);
        // Only an allow-listed label can reach KMS, so disabling any other is a typo that would
        // leave the meant key served. Enabling is never refused (it may clear a stale entry).
        const allowListed = [...new Set(config.keyStores.flatMap((s) => s.keys))];
        if (what === "disable" && !allowListed.includes(v.label)) {
          throw new UsageError(
            `no key store in ${config.file} lists the label ${JSON.stringify(v.label)}, so KMS cannot use it: nothing disabled (listed: ${allowListed.join(", ")})`,
          );
        }
        new Controls(config.stateFile).setKeyDisabled(v.label, what === "disable");
        out(`key ${v.label} ${what}d`);
        return EXIT.ok;
      },
    }),
  ),
  ...(["pause", "resume"] as const).map((what) =>
    command({
      name: what,
      summary: what === "pause" ? "cut KMS off at once: every key operation is refused until resume" : "let KMS back in after pause",
      options: { config: CONFIG },
      examples: [`xks-agent ${what} --config agent.json`],
      run: (v) => {
        new Controls(load(v.config).stateFile).setPaused(what === "pause");
        out(what === "pause" ? "paused: KMS requests are refused" : "resumed");
        return EXIT.ok;
      },
    }),
  ),
  command({
    name: "audit verify",
    summary: "check every audit segment, the hash chain, the checkpoint MACs (in the HSM) and, given a proxy log, its witnesses",
    options: {
      config: CONFIG,
      against: { type: "string", arg: "PROXY_LOG", description: "the proxy's log, whose witnessed audit heads must match" },
      "agent-id": { type: "string", arg: "ID", description: "this agent's id in that log (default: every head in it)" },
    },
    examples: ["xks-agent audit verify --config agent.json", "xks-agent audit verify --config agent.json --against proxy.log"],
    run: async (v) => {
      const config = load(v.config);
      const { verifyAudit, witnessesFromProxyLog } = await import("./audit/verify.ts");
      const { Hsm } = await hsmModule();
      const against = v.against ? witnessesFromProxyLog(readFileSync(v.against, "utf8"), v["agent-id"]) : undefined;
      if (v.against) out(`witnesses: ${against!.length} audit heads in ${v.against}`);
      const hsm = new Hsm(config.pkcs11, createLogger({ level: "warn", name: "xks-agent" }, process.stderr));
      let mac: ((data: Buffer) => Buffer) | undefined;
      try {
        hsm.open();
        hsm.hmacSha256(config.audit.key, Buffer.from("probe"));
        mac = (data) => hsm.hmacSha256(config.audit.key, data);
      } catch (e) {
        out(`checkpoint MACs NOT checked: the audit key ${config.audit.key} cannot be used (${errorMessage(e)})`);
      }
      try {
        const r = await verifyAudit(config.audit.dir, {
          mac,
          against,
          onProgress: (done, total) => {
            if (total > 256 << 20) process.stderr.write(`verified ${(done / 2 ** 20).toFixed(0)} of ${(total / 2 ** 20).toFixed(0)} MiB\n`);
          },
        });
        for (const p of r.problems) out(`BROKEN ${p.segment}${p.line ? ` line ${p.line}` : ""}: ${p.why}`);
        out(
          `${r.ok ? "audit log intact" : "audit log BROKEN"}: ${r.records} records in ${r.segments} segments, ${r.checkpoints} checkpoints` +
            `${r.macChecked ? " (MACs checked with the HSM)" : " (MACs not checked)"}, ${r.unsealed} records after the last checkpoint` +
            `${against ? `, ${r.witnessesChecked} witnessed heads matched against the log` : ""}; head ${r.head.records} ${r.head.hash}`,
        );
        return r.ok && mac !== undefined ? EXIT.ok : EXIT.failure;
      } finally {
        hsm.close();
      }
    },
  }),
  command({
    name: "audit tail",
    summary: "the last N audit records, as written",
    options: { config: CONFIG, lines: { type: "string", short: "n", arg: "N", description: "how many", default: "20" } },
    examples: ["xks-agent audit tail --config agent.json -n 50"],
    run: async (v) => {
      const n = Number(v.lines);
      if (!Number.isInteger(n) || n < 1) throw new UsageError("-n must be a positive integer");
      const config = load(v.config);
      const { tailAudit } = await import("./audit/read.ts");
      for (const line of await tailAudit(config.audit.dir, n)) process.stdout.write(`${line.toString("utf8")}\n`);
      return EXIT.ok;
    },
  }),
  command({
    name: "audit search",
    summary: "the audit records that match every filter given, across segments",
    options: { config: CONFIG, ...AUDIT_FILTERS },
    examples: ["xks-agent audit search --config agent.json --principal arn:aws:iam::123456789012:user/Alice --since 2026-12-01T00:00:00Z"],
    run: (v) => auditSearch(v),
  }),
  command({
    name: "audit export",
    summary: "the matching records' exact lines into a new file (0600), for an auditor",
    options: {
      config: CONFIG,
      out: { type: "string", arg: "FILE", description: "the file to create (never overwritten)", required: true },
      since: AUDIT_FILTERS.since,
      until: AUDIT_FILTERS.until,
    },
    examples: ["xks-agent audit export --config agent.json --out november.log --since 2026-11-01T00:00:00Z --until 2026-12-01T00:00:00Z"],
    run: (v) => auditSearch({ ...v, "request-id": undefined, principal: undefined, key: undefined, result: undefined }, v.out),
  }),
  command({
    name: "policy test",
    summary: "the owner's decision on a sample request (a JSON file) and the rule that made it, as one JSON line",
    options: {
      config: CONFIG,
      request: { type: "string", arg: "FILE", description: "the request: {keyId, keyStore, requestMetadata}", required: true },
    },
    details: 'The request file: {"keyId": label, "keyStore": uriPathPrefix, "requestMetadata": {awsPrincipalArn, kmsOperation, …}}.',
    examples: ["xks-agent policy test --config agent.json --request request.json"],
    run: async (v) => {
      const config = load(v.config);
      const { allowListMap, decideRequest, loadPolicyFile, MATCH_FIELDS } = await policyModule();
      const req = readPolicyRequest(v.request, MATCH_FIELDS);
      const keyStores = allowListMap(config.keyStores);
      const rules = config.policy ? loadPolicyFile(config.policy, keyStores) : undefined;
      const paused = new Controls(config.stateFile).paused;
      const owner = { healthKey: config.healthKey, keyStores, isKeyDisabled: () => false, rules: () => rules };
      const d = decideRequest(owner, paused, req);
      // One JSON line: the decision, the refusal's reason (the proxy's error follows from it), the rule and the file.
      out(
        JSON.stringify({
          decision: d.allowed ? "allow" : "deny",
          ...(d.reason ? { reason: d.reason, why: d.why } : {}),
          rule: d.policyRule ?? null,
          ...(d.wouldDeny ? { wouldDeny: d.wouldDeny } : {}),
          mode: rules?.mode ?? null,
          policyFile: rules?.file ?? null,
        }),
      );
      return EXIT.ok;
    },
  }),
  command({
    name: "dashboard",
    summary: "print the local dashboard's URL with its token (for the owner only)",
    options: { config: CONFIG },
    examples: ["xks-agent dashboard --config agent.json"],
    run: async (v) => {
      // The URL holds the dashboard token: it goes to stdout for the owner who asked, and nowhere else.
      const config = load(v.config);
      if (!config.dashboard)
        throw new CommandFailure(`no dashboard in ${config.file}: add "dashboard": {"port": 7420} and restart the agent`);
      const { dashboardUrl } = await needPkcs11js(() => import("./dashboard.ts"));
      out(dashboardUrl(config.dashboard, config.stateFile));
      return EXIT.ok;
    },
  }),
  command({
    name: "identity new",
    summary: "write this agent's channel identity: PATH.key (0600) and PATH.crt; never overwrites",
    options: { out: { type: "string", arg: "PATH", description: "the files' path without .key/.crt", required: true } },
    examples: ["xks-agent identity new --out ~/.config/xks-agent/agent-identity"],
    run: (v) => {
      try {
        for (const line of writeNewIdentity(v.out, "agent", "xks-agent")) out(line);
        return EXIT.ok;
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code === "EEXIST")
          throw new CommandFailure(`cannot write the identity: ${v.out}.key or .crt exists already`);
        throw e;
      }
    },
  }),
  command({
    name: "token backup",
    summary: "the SoftHSM token in an encrypted archive (0600, never overwrites) with a manifest of key check values",
    options: {
      config: CONFIG,
      out: { type: "string", arg: "ARCHIVE", description: "the archive to write", required: true },
      "passphrase-file": PASSPHRASE_FILE,
    },
    details: `${PASSPHRASE_HELP}\nThe token is the only copy of the keys (they are never extractable): keep the archive, its passphrase and the PIN apart.`,
    examples: ["xks-agent token backup --config agent.json --out xks-token.backup --passphrase-file ~/backup-passphrase"],
    run: async (v) => {
      const t = await tokenModule();
      return t.backup(load(v.config), v.out, v["passphrase-file"], t.defaultIo());
    },
  }),
  command({
    name: "token restore",
    summary: "restore a token archive into a token folder (never overwrites), then verify it against the archive's manifest",
    options: {
      config: CONFIG,
      in: { type: "string", arg: "ARCHIVE", description: "the archive", required: true },
      to: {
        type: "string",
        arg: "TOKEN_DIR",
        description: "SoftHSM's token folder (directories.tokendir) to restore into",
        required: true,
      },
      "passphrase-file": PASSPHRASE_FILE,
    },
    details: PASSPHRASE_HELP,
    examples: ["xks-agent token restore --config agent.json --in xks-token.backup --to ~/.config/softhsm2/tokens"],
    run: async (v) => {
      const t = await tokenModule();
      return t.restore(load(v.config), v.in, v.to, v["passphrase-file"], t.defaultIo());
    },
  }),
  command({
    name: "token verify",
    summary: "check an archive (and optionally a restored token) against its manifest: key check values and decrypt probes",
    options: {
      config: CONFIG,
      in: { type: "string", arg: "ARCHIVE", description: "the archive", required: true },
      "token-dir": { type: "string", arg: "TOKEN_DIR", description: "a token folder to verify instead of the configured one" },
      "passphrase-file": PASSPHRASE_FILE,
    },
    details: PASSPHRASE_HELP,
    examples: ["xks-agent token verify --config agent.json --in xks-token.backup"],
    run: async (v) => {
      const t = await tokenModule();
      return t.verify(load(v.config), v.in, v["token-dir"], v["passphrase-file"], t.defaultIo());
    },
  }),
];

export const PROGRAM: Program = {
  name: "xks-agent",
  version: VERSION,
  summary: "the owner's HSM agent for an AWS KMS external key store",
  commands: COMMANDS,
};

export function main(argv: string[]): Promise<number> {
  return runProgram(PROGRAM, argv);
}

/**
 * A sample request for `policy test`: {"keyId": label, "keyStore": uriPathPrefix,
 * "requestMetadata": {awsPrincipalArn, kmsOperation, kmsViaService, awsSourceVpc,
 * awsSourceVpce, kmsKeyArn, …}} — the metadata as KMS sends it (other fields, such
 * as kmsRequestId, are accepted and not used).
 */
function readPolicyRequest(file: string, fields: readonly string[]): PolicyRequest {
  const c = new Checker(file);
  const root = c.object(readJsonFile(file), "(root)");
  c.noUnknown(root, "", ["keyId", "keyStore", "requestMetadata"]);
  const keyId = c.string(root, "keyId", "", { min: 1 });
  const keyStore = c.string(root, "keyStore", "", { default: "" });
  const m = c.object(root.requestMetadata ?? {}, "requestMetadata");
  const metadata: Record<string, string> = {};
  for (const f of fields) {
    const v = c.optionalString(m, f, "requestMetadata");
    if (v !== undefined) metadata[f] = v;
  }
  c.done();
  return { keyId, keyStore, metadata: metadata as PolicyRequest["metadata"] };
}
