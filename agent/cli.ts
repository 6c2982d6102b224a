/**
 * `xks-agent` command line.
 *
 *   xks-agent run          --config FILE                 start the daemon (exits 1 on a failure that cannot heal)
 *   xks-agent check        --config FILE                 preflight: every item ✓/✗ with a fix hint; exit 1 on any ✗
 *   xks-agent keys create  --config FILE --label L [--usage encrypt,decrypt|encrypt|decrypt|none]
 *   xks-agent keys list    --config FILE                 every key: attributes, served or not and why
 *   xks-agent keys disable|enable --config FILE --label L   per-key switch (metadata DISABLED, crypto refused)
 *   xks-agent pause|resume --config FILE                 cut KMS off / let it back in, at once
 *   xks-agent keys create  --config FILE --type audit --label L   the audit log's HMAC key (sensitive, never extractable)
 *   xks-agent audit verify --config FILE [--against PROXY_LOG]   check every segment, chain, checkpoint MAC (HSM) and witness
 *   xks-agent audit tail   --config FILE [-n N]           the last N records
 *   xks-agent audit search --config FILE [--request-id ID] [--principal ARN] [--key L] [--result R] [--since T] [--until T]
 *   xks-agent audit export --config FILE --out FILE [--since T] [--until T]   the records' exact lines, across segments
 *   xks-agent policy test  --config FILE --request R     the owner's decision on a sample request (R: JSON file), and the rule
 *   xks-agent dashboard    --config FILE                 print the dashboard's URL with its token (for the owner only)
 *   xks-agent identity new --out PATH                    write this agent's channel identity: PATH.key (0600) and PATH.crt
 */
import { parseArgs } from "node:util";
import { Checker, ConfigError, readJsonFile } from "../shared/config.ts";
import { createLogger } from "../shared/logging.ts";
import { errorMessage } from "../shared/errors.ts";
import { writeNewIdentity } from "../shared/identity.ts";
import { createWriteStream, readFileSync } from "node:fs";
import { once } from "node:events";
import { verifyAudit, witnessesFromProxyLog } from "./audit/verify.ts";
import { type AuditFilter, searchAudit, tailAudit } from "./audit/read.ts";
import { loadAgentConfig, type AgentConfig } from "./config.ts";
import { Controls } from "./controls.ts";
import { dashboardUrl } from "./dashboard.ts";
import { Hsm } from "./hsm/hsm.ts";
import { createAuditKey, createKey, describeKey, parseUsage } from "./keys.ts";
import { runChecks } from "./check.ts";
import { runAgent, StartError } from "./main.ts";
import { allowListMap, decideRequest, loadPolicyFile, MATCH_FIELDS, type PolicyRequest, type ServingPolicy } from "./policy.ts";

const USAGE = `usage:
  xks-agent run --config FILE
  xks-agent check --config FILE
  xks-agent keys create --config FILE --label LABEL [--usage encrypt,decrypt] [--type aes|audit]
  xks-agent keys list --config FILE
  xks-agent keys disable|enable --config FILE --label LABEL
  xks-agent pause|resume --config FILE
  xks-agent audit verify --config FILE [--against PROXY_LOG_FILE] [--agent-id ID]
  xks-agent audit tail --config FILE [-n N]
  xks-agent audit search --config FILE [--request-id ID] [--principal ARN] [--key LABEL] [--result R] [--since ISO] [--until ISO]
  xks-agent audit export --config FILE --out FILE [--since ISO] [--until ISO]
  xks-agent policy test --config FILE --request REQUEST.json
  xks-agent dashboard --config FILE
  xks-agent identity new --out PATH`;

function servingPolicy(config: AgentConfig): ServingPolicy {
  return { healthKey: config.healthKey, keyStores: allowListMap(config.keyStores) };
}

function withHsm<T>(config: AgentConfig, fn: (hsm: Hsm) => T): T {
  const hsm = new Hsm(config.pkcs11, createLogger({ level: "warn", name: "xks-agent" }, process.stderr));
  try {
    hsm.open();
    return fn(hsm);
  } finally {
    hsm.close();
  }
}

export async function main(argv: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      config: { type: "string", short: "c" },
      label: { type: "string" },
      usage: { type: "string", default: "encrypt,decrypt" },
      out: { type: "string" },
      request: { type: "string" },
      type: { type: "string", default: "aes" },
      against: { type: "string" },
      "agent-id": { type: "string" },
      lines: { type: "string", short: "n", default: "20" },
      "request-id": { type: "string" },
      principal: { type: "string" },
      key: { type: "string" },
      result: { type: "string" },
      since: { type: "string" },
      until: { type: "string" },
      help: { type: "boolean", short: "h" },
    },
  });
  const [cmd, sub] = positionals;
  if (values.help || !cmd) {
    console.log(USAGE);
    return values.help ? 0 : 2;
  }
  if (cmd === "identity" && sub === "new") {
    if (!values.out) {
      console.error(`--out PATH is required\n${USAGE}`);
      return 2;
    }
    try {
      for (const line of writeNewIdentity(values.out, "agent", "xks-agent")) console.log(line);
      return 0;
    } catch (err) {
      const exists = (err as NodeJS.ErrnoException).code === "EEXIST";
      console.error(`cannot write the identity: ${exists ? `${values.out}.key or .crt exists already` : errorMessage(err)}`);
      return 1;
    }
  }
  if (!values.config) {
    console.error(`--config FILE is required\n${USAGE}`);
    return 2;
  }
  if (cmd === "check" && !sub) {
    const outcomes = await runChecks(values.config, (line) => console.log(line));
    return outcomes.some((o) => o.result === "failed") ? 1 : 0;
  }
  let config: AgentConfig;
  try {
    config = loadAgentConfig(values.config);
  } catch (err) {
    console.error(err instanceof ConfigError ? err.message : `cannot load config: ${errorMessage(err)}`);
    return 2;
  }
  const needLabel = () => {
    if (!values.label) throw new Error("--label LABEL is required");
    return values.label;
  };
  switch (`${cmd}${sub ? ` ${sub}` : ""}`) {
    case "run": {
      let agent: Awaited<ReturnType<typeof runAgent>>;
      try {
        agent = await runAgent(config);
      } catch (err) {
        if (!(err instanceof StartError)) throw err;
        console.error(`xks-agent: cannot start: ${err.message}`);
        return 1;
      }
      await new Promise<void>((resolve) => {
        const onSignal = (sig: string) => {
          agent.log.info({ signal: sig }, "signal received");
          void agent.stop().then(resolve);
        };
        process.once("SIGTERM", onSignal);
        process.once("SIGINT", onSignal);
        // Identity rotation without a restart: re-read the file; a bad file keeps the running identities.
        process.on("SIGHUP", () => {
          try {
            agent.reload(loadAgentConfig(values.config!));
          } catch (err) {
            agent.log.error(
              { problems: err instanceof ConfigError ? err.problems : [errorMessage(err)] },
              "reload rejected; keeping the running identities",
            );
          }
        });
      });
      return 0;
    }
    case "keys create": {
      const label = needLabel();
      if (values.type !== "aes" && values.type !== "audit") throw new Error("--type must be aes or audit");
      const info = withHsm(config, (hsm) =>
        values.type === "audit" ? createAuditKey(hsm, label) : createKey(hsm, label, parseUsage(values.usage!)),
      );
      console.log(JSON.stringify(describeKey(info, servingPolicy(config))));
      return 0;
    }
    case "keys list": {
      // One JSON line per secret key: its attributes, whether KMS may use it, through which key stores, and if not, why.
      for (const k of withHsm(config, (hsm) => hsm.listKeys())) console.log(JSON.stringify(describeKey(k, servingPolicy(config))));
      return 0;
    }
    case "keys disable":
    case "keys enable": {
      // Only an allow-listed label can reach KMS, so disabling any other is a typo that would
      // leave the meant key served. Enabling is never refused (it may clear a stale entry).
      const allowListed = [...new Set(config.keyStores.flatMap((s) => s.keys))];
      if (sub === "disable" && !allowListed.includes(needLabel())) {
        console.error(
          `xks-agent: no key store in ${config.file} lists the label ${JSON.stringify(values.label)}, so KMS cannot use it: nothing disabled (listed: ${allowListed.join(", ")})`,
        );
        return 2;
      }
      new Controls(config.stateFile).setKeyDisabled(needLabel(), sub === "disable");
      console.log(`key ${values.label} ${sub}d`);
      return 0;
    }
    case "pause":
    case "resume": {
      new Controls(config.stateFile).setPaused(cmd === "pause");
      console.log(cmd === "pause" ? "paused: KMS requests are refused" : "resumed");
      return 0;
    }
    case "audit verify": {
      const against = values.against ? witnessesFromProxyLog(readFileSync(values.against, "utf8"), values["agent-id"]) : undefined;
      if (values.against) console.log(`witnesses: ${against!.length} audit heads in ${values.against}`);
      const hsm = new Hsm(config.pkcs11, createLogger({ level: "warn", name: "xks-agent" }, process.stderr));
      let mac: ((data: Buffer) => Buffer) | undefined;
      try {
        hsm.open();
        hsm.hmacSha256(config.audit.key, Buffer.from("probe"));
        mac = (data) => hsm.hmacSha256(config.audit.key, data);
      } catch (err) {
        console.log(`checkpoint MACs NOT checked: the audit key ${config.audit.key} cannot be used (${errorMessage(err)})`);
      }
      try {
        const r = await verifyAudit(config.audit.dir, {
          mac,
          against,
          onProgress: (done, total) => {
            if (total > 256 << 20) process.stderr.write(`verified ${(done / 2 ** 20).toFixed(0)} of ${(total / 2 ** 20).toFixed(0)} MiB\n`);
          },
        });
        for (const p of r.problems) console.log(`BROKEN ${p.segment}${p.line ? ` line ${p.line}` : ""}: ${p.why}`);
        console.log(
          `${r.ok ? "audit log intact" : "audit log BROKEN"}: ${r.records} records in ${r.segments} segments, ${r.checkpoints} checkpoints` +
            `${r.macChecked ? " (MACs checked with the HSM)" : " (MACs not checked)"}, ${r.unsealed} records after the last checkpoint` +
            `${against ? `, ${r.witnessesChecked} witnessed heads matched against the log` : ""}; head ${r.head.records} ${r.head.hash}`,
        );
        return r.ok && mac !== undefined ? 0 : 1;
      } finally {
        hsm.close();
      }
    }
    case "audit tail": {
      const n = Number(values.lines);
      if (!Number.isInteger(n) || n < 1) throw new Error("-n must be a positive integer");
      for (const line of await tailAudit(config.audit.dir, n)) process.stdout.write(`${line.toString("utf8")}\n`);
      return 0;
    }
    case "audit search":
    case "audit export": {
      const filter: AuditFilter = {
        requestId: values["request-id"],
        principal: values.principal,
        key: values.key,
        result: values.result,
        since: values.since,
        until: values.until,
      };
      if (sub === "export" && !values.out) throw new Error("--out FILE is required");
      const out = sub === "export" ? createWriteStream(values.out!, { flags: "wx", mode: 0o600 }) : process.stdout;
      let count = 0;
      for await (const line of searchAudit(config.audit.dir, filter)) {
        count++;
        if (!out.write(Buffer.concat([line, Buffer.from("\n")]))) await once(out, "drain");
      }
      if (sub === "export") {
        (out as ReturnType<typeof createWriteStream>).end();
        await once(out, "finish");
        console.log(`exported ${count} lines to ${values.out}`);
      }
      return 0;
    }
    case "policy test": {
      if (!values.request) {
        console.error(`--request FILE is required\n${USAGE}`);
        return 2;
      }
      let req: PolicyRequest;
      try {
        req = readPolicyRequest(values.request);
      } catch (err) {
        console.error(err instanceof ConfigError ? err.message : errorMessage(err));
        return 2;
      }
      const keyStores = allowListMap(config.keyStores);
      let rules: ReturnType<typeof loadPolicyFile> | undefined;
      try {
        rules = config.policy ? loadPolicyFile(config.policy, keyStores) : undefined;
      } catch (err) {
        console.error(err instanceof ConfigError ? err.message : errorMessage(err));
        return 2;
      }
      const paused = new Controls(config.stateFile).paused;
      const owner = { healthKey: config.healthKey, keyStores, isKeyDisabled: () => false, rules: () => rules };
      const d = decideRequest(owner, paused, req);
      // One JSON line: the decision, the refusal's reason (the proxy's error follows from it), the rule and the file.
      console.log(
        JSON.stringify({
          decision: d.allowed ? "allow" : "deny",
          ...(d.reason ? { reason: d.reason, why: d.why } : {}),
          rule: d.policyRule ?? null,
          ...(d.wouldDeny ? { wouldDeny: d.wouldDeny } : {}),
          mode: rules?.mode ?? null,
          policyFile: rules?.file ?? null,
        }),
      );
      return 0;
    }
    case "dashboard": {
      // The URL holds the dashboard token: it goes to stdout for the owner who asked, and nowhere else.
      if (!config.dashboard) {
        console.error(`no dashboard in ${config.file}: add "dashboard": {"port": 7420} and restart the agent`);
        return 1;
      }
      try {
        console.log(dashboardUrl(config.dashboard, config.stateFile));
        return 0;
      } catch (err) {
        console.error(errorMessage(err));
        return 1;
      }
    }
    default:
      console.error(`unknown command: ${positionals.join(" ")}\n${USAGE}`);
      return 2;
  }
}

/**
 * A sample request for `policy test`: {"keyId": label, "keyStore": uriPathPrefix,
 * "requestMetadata": {awsPrincipalArn, kmsOperation, kmsViaService, awsSourceVpc,
 * awsSourceVpce, kmsKeyArn, …}} — the metadata as KMS sends it (other fields, such
 * as kmsRequestId, are accepted and not used).
 */
function readPolicyRequest(file: string): PolicyRequest {
  const c = new Checker(file);
  const root = c.object(readJsonFile(file), "(root)");
  c.noUnknown(root, "", ["keyId", "keyStore", "requestMetadata"]);
  const keyId = c.string(root, "keyId", "", { min: 1 });
  const keyStore = c.string(root, "keyStore", "", { default: "" });
  const m = c.object(root.requestMetadata ?? {}, "requestMetadata");
  const metadata: PolicyRequest["metadata"] = {};
  for (const f of MATCH_FIELDS) {
    const v = c.optionalString(m, f, "requestMetadata");
    if (v !== undefined) metadata[f] = v;
  }
  c.done();
  return { keyId, keyStore, metadata };
}
