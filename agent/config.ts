/**
 * The agent's config file (JSON, comments allowed), validated once at start.
 * Every problem is reported at once with the file and the field. Secrets (the
 * PIN, the proxy token, SSH private keys) are references: {"file": …} |
 * {"env": …} | {"keychain": {"service", "account"}} (macOS), never inline and
 * never logged. A secret file must be private to the user running the agent
 * (mode 0600 or stricter, owned by that user), as OpenSSH requires of private keys.
 *
 * The schema below is the single source of the file's shape, its defaults and
 * its reference page, deploy/CONFIG.md (`npm run gen:config-docs`): every
 * field's text is its `.describe()`.
 */
import { hostname } from "node:os";
import ssh2 from "ssh2";
import { deepFreeze } from "../shared/config.ts";
import {
  identity,
  int,
  type LoadContext,
  loadConfig,
  logSection,
  matching,
  metricsSection,
  parseConfig,
  path,
  pins,
  secret,
  secretRef,
  section,
  z,
  workersField,
} from "../shared/schema.ts";
import { EXTERNAL_KEY_ID_RE, EXTERNAL_KEY_ID_RULE, MAX_CIPHERTEXT_METADATA_BYTES, prefixProblem } from "../shared/xks-spec.ts";
import type { AuditSettings } from "./audit.ts";
import type { KeyStoreAllowList } from "./policy.ts";
import type { TunnelTarget } from "./tunnel.ts";

/** The default port of the agent's metrics listener. */
export const AGENT_METRICS_PORT = 9465;

const label = (what: string) => matching(EXTERNAL_KEY_ID_RE, "a key label of [a-zA-Z0-9._-]").describe(what);
const servedLabel = z
  .string({ error: `must be a key label (externalKeyId): ${EXTERNAL_KEY_ID_RULE}` })
  .regex(EXTERNAL_KEY_ID_RE, { error: `must be a key label (externalKeyId): ${EXTERNAL_KEY_ID_RULE}` });

type Loose = Record<string, unknown> | undefined;
const arr = (v: unknown): unknown[] => (Array.isArray(v) ? v : []);
const obj = (v: unknown): Loose => (typeof v === "object" && v !== null && !Array.isArray(v) ? (v as Record<string, unknown>) : undefined);

/** The agent config's schema; secrets, certificates and relative paths are read from `ctx.file`'s folder. */
export function agentConfigSchema(ctx: LoadContext) {
  const tunnel = z
    .strictObject({
      name: z.string().optional().describe("short name for logs, health and metrics [tunnel-<index>]"),
      host: z.string().min(1).describe("the sshd to dial (the EC2 host)"),
      port: int(1, 65535).default(22).describe("its port"),
      username: z.string().min(1).describe("the tunnel's user on that host"),
      privateKey: secret(ctx).describe("secret reference: the OpenSSH private key"),
      privateKeyPassphrase: secret(ctx).optional().describe("secret reference: its passphrase, for a passphrase-protected key"),
      hostKeyFingerprint: matching(
        /^SHA256:[A-Za-z0-9+/]{43}$/,
        "SHA256:<43 base64 characters>, as printed by ssh-keygen -lf <host key>.pub",
      ).describe("the pinned host key: SHA256:…, as `ssh-keygen -lf <host key>.pub` prints it"),
      nextHostKeyFingerprint: matching(
        /^SHA256:[A-Za-z0-9+/]{43}$/,
        "SHA256:<43 base64 characters>, as printed by ssh-keygen -lf <host key>.pub",
      )
        .optional()
        .describe(
          "a second accepted host key while the host's key is being replaced (either pin is accepted; remove the old one afterwards)",
        ),
      remoteSocket: matching(/^\//, "an absolute path")
        .optional()
        .describe("the Unix socket sshd binds on the host for the proxy (give this or remoteTcp)"),
      remoteTcp: z
        .strictObject({
          host: z.string().default("127.0.0.1").describe("the loopback address sshd binds (must equal sshd's permitlisten)"),
          port: int(1, 65535).describe("its port"),
        })
        .optional()
        .describe("a loopback TCP forward instead of a socket"),
      keepaliveIntervalMs: int(500, 600_000).default(5000).describe("SSH keepalive period"),
      reassertAfterMs: int(1000, 600_000)
        .default(30_000)
        .describe("silence on the forward after which it is cancelled and requested again"),
    })
    .superRefine(
      (v, zc) => {
        const o = obj(v);
        if (!o) return;
        if (o.remoteSocket !== undefined && o.remoteTcp !== undefined)
          zc.addIssue({ code: "custom", message: 'give "remoteSocket" or "remoteTcp", not both' });
        else if (o.remoteSocket === undefined && o.remoteTcp === undefined)
          zc.addIssue({ code: "custom", message: "is required", path: ["remoteSocket"] });
        // The key is parsed only when both secrets could be read (a problem with either is already reported).
        const secretsRead = !zc.issues.some((i) => i.path?.[0] === "privateKey" || i.path?.[0] === "privateKeyPassphrase");
        if (secretsRead && typeof o.privateKey === "string") {
          const p = privateKeyProblem(o.privateKey, o.privateKeyPassphrase as string | undefined);
          if (p) zc.addIssue({ code: "custom", message: p.msg, path: [p.field === "key" ? "privateKey" : "privateKeyPassphrase"] });
        }
      },
      { when: () => true },
    );

  return z
    .strictObject({
      agentId: matching(/^[\x21-\x7e]{1,64}$/, "1-64 printable characters")
        .optional()
        .describe("this agent's name towards the proxy [the host name]"),
      pkcs11: z
        .strictObject({
          module: path(ctx).describe("the PKCS#11 module, e.g. /opt/homebrew/lib/softhsm/libsofthsm2.so"),
          tokenLabel: z.string().min(1).max(32).describe("the token's label"),
          pin: secretRef(ctx).describe(
            "secret reference: the user PIN (a file is read again when the token refused the PIN and the file changes)",
          ),
        })
        .describe("the HSM"),
      socket: path(ctx).describe("the gRPC Unix socket the tunnels forward to; its folder is made private (0700)"),
      proxyToken: secret(ctx)
        .pipe(z.string().min(16))
        .describe("secret reference: the token the proxy presents on every call, at least 16 characters"),
      identity: identity(ctx).describe(
        'this agent\'s identity on the gRPC channel: {"key": <secret reference to the PEM key>, "certificate": <path>} (`xks-agent identity new`)',
      ),
      proxyIdentities: pins(ctx).describe("paths of the proxy certificates accepted: 1, or 2 while rotating"),
      healthKey: label("the key of the deep health check, never served to KMS").default("xks-health"),
      keyStores: z
        .array(
          z.strictObject({
            keyStore: z
              .string()
              .superRefine((v, zc) => {
                const p = prefixProblem(v);
                if (p) zc.addIssue({ code: "custom", message: `${p} (the key store's uriPathPrefix in the proxy's config)` });
              })
              .describe("the key store's uriPathPrefix in the proxy's config (\"\" for none); unique"),
            keys: z
              .array(servedLabel)
              .min(1)
              .describe("the labels (externalKeyIds) KMS may use through it; unique, never the health or audit key"),
          }),
        )
        .min(1)
        .describe("the allow-list, required: the ONLY keys KMS may use, per key store"),
      policy: path(ctx).optional().describe("the owner's policy file (rules on request metadata), reloaded when it changes and on SIGHUP"),
      ciphertextMetadata: z
        .string()
        .default("xks-agent/1")
        .refine((v) => Buffer.byteLength(v, "utf8") <= MAX_CIPHERTEXT_METADATA_BYTES, {
          error: `must be at most ${MAX_CIPHERTEXT_METADATA_BYTES} bytes (KMS rejects more)`,
        })
        .describe(`returned by Encrypt, at most ${MAX_CIPHERTEXT_METADATA_BYTES} bytes (UTF-8)`),
      stateFile: path(ctx).prefault("state/controls.json").describe("the owner's switches: pause and disabled keys"),
      auditLog: path(ctx).optional().describe("older name of audit.dir"),
      audit: section({
        dir: path(ctx).optional().describe("the segments' folder (audit-NNNNNN.log) [state/audit]"),
        key: label("label of the HMAC key that seals checkpoints (`keys create --type audit`)").default("xks-audit"),
        segmentKiB: int(16, 4 << 20)
          .default(65536)
          .describe("a segment is closed past this size, and at the end of each UTC day"),
        checkpointMs: int(10, 1000).default(250).describe("a sealed checkpoint at most this long after a record"),
        fsync: z
          .enum(["checkpoint", "record"])
          .default("checkpoint")
          .describe('fdatasync at each checkpoint ("checkpoint") or after every record ("record")'),
        keepDays: int(1, 1_000_000).optional().describe("retention: closed segments older than this are removed"),
        keepGiB: z
          .number({ error: "must be a number > 0" })
          .gt(0, { error: "must be a number > 0" })
          .optional()
          .describe("retention: closed segments beyond this total are removed"),
      }).describe("the record of every key operation"),
      dashboard: z
        .strictObject({
          host: matching(/^(127\.\d+\.\d+\.\d+|localhost|::1)$/, "a loopback address")
            .default("127.0.0.1")
            .describe("a loopback address"),
          port: int(0, 65535).default(7420).describe("its port"),
        })
        .optional()
        .describe("the local dashboard; absent: none"),
      tunnels: z.array(tunnel).default([]).describe("the reverse tunnels to the proxies' hosts"),
      maxQueued: int(1, 100_000).default(256).describe("key operations waiting at most; more get THROTTLING (429)"),
      workers: workersField()
        .default(1)
        .describe(
          'processes serving key operations, each with its own HSM session: 1 (one process), an integer up to 64, or "auto" (one per core); with more than 1 a primary process keeps the tunnels, switches, audit log, dashboard and metrics',
        ),
      metrics: metricsSection(AGENT_METRICS_PORT),
      log: logSection(),
    })
    .superRefine(
      (v, zc) => {
        // Rules between fields; they run even when a field failed, so each reads defensively.
        const problem = (path: PropertyKey[], message: string) => zc.addIssue({ code: "custom", message, path });
        const o = obj(v) ?? {};
        const healthKey = typeof o.healthKey === "string" ? o.healthKey : "xks-health";
        const audit = obj(o.audit) ?? {};
        const auditKey = typeof audit.key === "string" ? audit.key : "xks-audit";
        if (o.auditLog !== undefined && audit.dir !== undefined)
          problem(["auditLog"], 'give "audit.dir" only ("auditLog" is its older name)');
        if (auditKey === healthKey) problem(["audit", "key"], "is the health key (healthKey); the audit key is a key of its own");
        const stores = new Set<string>();
        arr(o.keyStores).forEach((s, i) => {
          const so = obj(s);
          if (!so) return;
          if (typeof so.keyStore === "string" && prefixProblem(so.keyStore) === undefined) {
            if (stores.has(so.keyStore)) problem(["keyStores", i, "keyStore"], `duplicate key store ${JSON.stringify(so.keyStore)}`);
            stores.add(so.keyStore);
          }
          const keys = new Set<string>();
          arr(so.keys).forEach((k, j) => {
            if (typeof k !== "string" || !EXTERNAL_KEY_ID_RE.test(k)) return;
            if (k === healthKey)
              problem(["keyStores", i, "keys", j], "is the health key (healthKey); the health key is never served to KMS");
            else if (keys.has(k)) problem(["keyStores", i, "keys", j], `duplicate key ${JSON.stringify(k)}`);
            else if (k === auditKey)
              problem(["keyStores", i, "keys", j], "is the audit key (audit.key); the audit key is never served to KMS");
            keys.add(k);
          });
        });
      },
      { when: () => true },
    )
    .transform((v) => {
      const { pin, ...pkcs11 } = v.pkcs11;
      const { dir, segmentKiB, keepGiB, ...audit } = v.audit;
      const auditSettings: AuditSettings = {
        ...audit,
        dir: dir ?? v.auditLog ?? path(ctx).parse("state/audit"),
        segmentBytes: segmentKiB * 1024,
        ...(keepGiB !== undefined ? { keepBytes: Math.floor(keepGiB * 2 ** 30) } : {}),
      };
      const tunnels = v.tunnels.map(
        ({ privateKeyPassphrase, name, ...t }, i): TunnelTarget => ({
          ...t,
          name: name ?? `tunnel-${i}`,
          ...(privateKeyPassphrase !== undefined ? { passphrase: privateKeyPassphrase } : {}),
        }),
      );
      const keyStores: KeyStoreAllowList[] = v.keyStores;
      const { auditLog: _, ...rest } = v;
      return {
        ...rest,
        agentId: v.agentId ?? hostname(),
        /** `pinFile`: the file the PIN was read from, when it is a file (re-read after the token refuses the PIN). */
        pkcs11: { ...pkcs11, pin: pin.value, ...(pin.file !== undefined ? { pinFile: pin.file } : {}) },
        keyStores,
        ciphertextMetadata: Buffer.from(v.ciphertextMetadata, "utf8"),
        audit: auditSettings,
        tunnels,
      };
    });
}

/** The agent's config: the schema's output, and the file it came from. */
export type AgentConfig = z.output<ReturnType<typeof agentConfigSchema>> & { file: string };

export function loadAgentConfig(file: string, env: NodeJS.ProcessEnv = process.env): AgentConfig {
  return freeze(file, loadConfig(agentConfigSchema({ file, env }), file));
}

export function parseAgentConfig(raw: unknown, file: string, env: NodeJS.ProcessEnv = process.env): AgentConfig {
  return freeze(file, parseConfig(agentConfigSchema({ file, env }), raw, file));
}

function freeze(file: string, cfg: z.output<ReturnType<typeof agentConfigSchema>>): AgentConfig {
  // The frozen config holds the secrets themselves (the PIN, the proxy token, SSH private keys),
  // for the HSM and the tunnels. It is never logged as a whole: log lines are built from named
  // fields only (runAgent's "starting" line names its fields), and the logger's `redact`
  // (shared/logging.ts) is the backstop for log-object fields named pin, token or privateKey.
  return deepFreeze({ file, ...cfg });
}

/**
 * Why ssh2 could not use this private key (with this passphrase), or undefined
 * when it parses as a private key. The answer never contains the key or the
 * passphrase.
 */
export function privateKeyProblem(
  key: string | Buffer,
  passphrase: string | undefined,
): { field: "key" | "passphrase"; msg: string } | undefined {
  const parsed = ssh2.utils.parseKey(key, passphrase);
  if (parsed instanceof Error) {
    const m = parsed.message;
    if (/no passphrase given/i.test(m))
      return { field: "passphrase", msg: 'the private key is passphrase-protected: give "privateKeyPassphrase" (a secret reference)' };
    if (/decrypt|bad passphrase|integrity check/i.test(m) && passphrase !== undefined)
      return { field: "passphrase", msg: "cannot decrypt the private key with this passphrase (wrong passphrase?)" };
    return { field: "key", msg: `cannot parse the private key (${m.replace(/[^\x20-\x7e]/g, "?").slice(0, 120)})` };
  }
  const key0 = Array.isArray(parsed) ? parsed[0] : parsed;
  if (!key0?.isPrivateKey())
    return { field: "key", msg: "is a public key, not a private key: give the private key file (e.g. id_ed25519, not id_ed25519.pub)" };
  return undefined;
}
