/**
 * The proxy's configuration: one JSON file (comments allowed), read and
 * validated once at start-up (every problem reported at once, each with the
 * file and the field), then frozen and passed down. Secrets are references
 * ({"file"}, {"env"} or {"keychain"}), resolved here and never echoed back.
 *
 * The schema below is the single source of the file's shape, its defaults and
 * its reference page, deploy/CONFIG.md (`npm run gen:config-docs`): every
 * field's text is its `.describe()`. A new field is one line in the schema.
 */
import { deepFreeze } from "../shared/config.ts";
import {
  identity,
  int,
  type LoadContext,
  loadConfig,
  logSection,
  matching,
  metricsSection,
  numOr,
  parseConfig,
  pins,
  secret,
  section,
  viaChecker,
  z,
  workersField,
} from "../shared/schema.ts";
import { describeTls, parseTlsConfig, type TlsConfig } from "./tls.ts";
import {
  EXTERNAL_KEY_ID_RE,
  EXTERNAL_KEY_ID_RULE,
  MAX_DATA_BYTES_LIMIT,
  MAX_LAYOUT_AAD_BYTES,
  PREFIX_RE,
  prefixProblem,
  SPEC_MIN_AAD_BYTES,
  SPEC_MIN_PLAINTEXT_BYTES,
} from "../shared/xks-spec.ts";

export { PREFIX_RE, prefixProblem };

export const ACCESS_KEY_ID_RE = /^[A-Z2-7]{20,30}$/;
export const SECRET_ACCESS_KEY_RE = /^[a-zA-Z0-9/+=]{43,64}$/;
const AGENT_ID_RE = /^[A-Za-z0-9._:-]{1,64}$/;
const TARGET_RE = /^(?:unix:\/\/\/[^\s]+|unix:\/[^\s]+|[A-Za-z0-9.-]+:\d{1,5}|\[[0-9a-fA-F:.]+\]:\d{1,5})$/;
const REGION_RE = /^[a-z]{2,}(?:-[a-z0-9]+)+$/;
const TOKEN_RE = /^[\x21-\x7e]{16,1024}$/;

/** The default port of the proxy's metrics listener. */
export const PROXY_METRICS_PORT = 9464;

function b64len(bytes: number): number {
  return 4 * Math.ceil(bytes / 3);
}

/** Smallest hard body cap that still admits the largest request the limits allow (+ room for metadata). */
export function minBodyBytes(l: { maxPlaintextBytes: number; maxCiphertextBytes: number; maxAadBytes: number }): number {
  return b64len(Math.max(l.maxPlaintextBytes, l.maxCiphertextBytes)) + b64len(l.maxAadBytes) + 8192;
}

/** A uriPathPrefix: "" or the spec's rule (shared/xks-spec.ts prefixProblem). */
const uriPathPrefix = z.string().superRefine((v, zc) => {
  const p = prefixProblem(v);
  if (p) zc.addIssue({ code: "custom", message: p });
});

const externalKeyId = z
  .string({ error: `must be an externalKeyId: ${EXTERNAL_KEY_ID_RULE}` })
  .regex(EXTERNAL_KEY_ID_RE, { error: `must be an externalKeyId: ${EXTERNAL_KEY_ID_RULE}` });

/** The proxy config's schema; secrets and certificates are read relative to `ctx.file`. */
export function proxyConfigSchema(ctx: LoadContext) {
  const agent = z.strictObject({
    id: matching(AGENT_ID_RE, "1-64 characters of [A-Za-z0-9._:-]").describe("the agent's name in logs, health and metrics; unique"),
    target: matching(TARGET_RE, '"unix:///absolute/path.sock" or "host:port"').describe(
      'where the agent\'s tunnel ends on this host: "unix:///run/xks/agent.sock" or "127.0.0.1:7000"',
    ),
    token: secret(ctx)
      .pipe(z.string().regex(TOKEN_RE, { error: "must be 16-1024 printable ASCII characters without spaces" }))
      .describe("secret reference: the agent token, sent on every call (16-1024 printable ASCII characters)"),
    identities: pins(ctx).describe("paths of the agent's certificates accepted on its channel: 1, or 2 while rotating"),
    connections: int(1, 16)
      .default(1)
      .describe(
        "gRPC channels each proxy process opens to this agent; each call goes to the one with the fewest calls outstanding. An agent hands each channel to one of its workers: with agent workers, proxy workers × connections should be at least the agent's workers (a second channel costs the agent and sshd CPU when the agent is one process)",
      ),
  });
  const credential = z.strictObject({
    accessKeyId: matching(ACCESS_KEY_ID_RE, "20-30 characters of [A-Z2-7]").describe(
      "the credential's access key id (20-30 of [A-Z2-7]); unique in its key store",
    ),
    secretAccessKey: secret(ctx)
      .pipe(z.string().regex(SECRET_ACCESS_KEY_RE, { error: "must be 43-64 characters of [a-zA-Z0-9/+=]" }))
      .describe("secret reference: its secret access key (43-64 of [a-zA-Z0-9/+=])"),
  });
  const keyStore = z.strictObject({
    uriPathPrefix: uriPathPrefix.describe(
      '"" or 9-117 characters of [a-zA-Z0-9/_-], starting with "/", without a trailing "/", "//" or the "/kms/xks/v1" KMS appends; unique',
    ),
    credentials: z
      .array(credential)
      .min(1)
      .max(10)
      .describe("1-10 live SigV4 credentials (two while rotating: add, reload, update KMS, remove, reload)"),
    keys: z.array(externalKeyId).describe(`allow-list of the externalKeyIds this key store may use (each ${EXTERNAL_KEY_ID_RULE}); unique`),
    quota: z
      .strictObject({
        rate: int(1, 1_000_000).describe("requests per second"),
        burst: int(1, 1_000_000).describe("requests allowed at once above the rate"),
      })
      .optional()
      .describe("this key store's request quota, a token bucket; over it: 429 ThrottlingException"),
  });

  return z
    .strictObject({
      workers: workersField()
        .default("auto")
        .describe(
          '"auto" (one per core: os.availableParallelism()) or 1-64 proxy processes behind the one listener; 1: a single process, no primary',
        ),
      listen: section({
        host: z
          .string()
          .min(1)
          .default("127.0.0.1")
          .describe("address the XKS listener binds; give the host's address (or 0.0.0.0) for a load balancer"),
        port: int(0, 65535).default(8443).describe("its port (plain HTTP: TLS ends at the load balancer)"),
      }).describe("the XKS API's listener"),
      tls: z
        .unknown()
        .transform((v, zc): TlsConfig | undefined => viaChecker(ctx, zc, (c, o) => parseTlsConfig(c, o.v, ctx.env, Date.now(), "v"), v))
        .optional()
        .meta({ kind: "tls" })
        .describe(
          'optional HTTPS on the listener itself (absent: plain HTTP behind a TLS-terminating load balancer): {"certificate": <path to PEM, leaf then intermediates>, "key": <secret reference to its PEM key>, "clientCa": <path to PEM CA certificate(s), mutual TLS>, "clientNames": [1-10 client subject CN or DNS SAN names, required with clientCa]}; TLS 1.2+, ECDHE with AEAD only; SIGHUP re-reads it',
        ),
      region: matching(REGION_RE, "an AWS region name such as us-east-1").describe("the SigV4 region of the key store(s), e.g. us-east-1"),
      fleetSize: int(1, 1000).default(1).describe("xksProxyFleetSize in the health answer"),
      vendor: z.string().min(1).max(128).default("xks-pair").describe("xksProxyVendor in the health answer"),
      ekmVendor: z
        .string()
        .min(1)
        .max(128)
        .default("unknown")
        .describe("ekmVendor in the health answer until an agent reports its token's manufacturer"),
      agents: z
        .array(agent)
        .min(1)
        .max(10, { error: "must have at most 10 entries (ekmFleetDetails holds 1..10)" })
        .describe("the agents, 1-10 (one ekmFleetDetails entry each)"),
      identity: identity(ctx).describe(
        'this proxy\'s identity towards its agents: {"key": <secret reference to the PEM key>, "certificate": <path>} (`xks-proxy identity new`)',
      ),
      agentDeadlineMs: int(10, 240).default(200).describe("deadline of each crypto or metadata call to an agent"),
      requestBudgetMs: int(20, 240)
        .default(200)
        .describe(
          "each request is answered within this from its arrival (KMS gives up after 250 ms); one that cannot make it gets 429 at once",
        ),
      admission: section({
        maxInFlightPerAgent: int(1, 4096)
          .default(128)
          .describe("calls outstanding at one agent at most; others wait in the proxy (needs >= rate x round trip: 1,800/s x 35 ms = 63)"),
        queueTargetMs: int(0, 240).default(100).describe("predicted wait in the proxy allowed; at most requestBudgetMs"),
      }).describe("per-agent admission"),
      healthRefreshMs: int(100, 30_000).default(10_000).describe("background health refresh period"),
      healthDeadlineMs: int(10, 10_000).default(2_000).describe("deadline of one background health call"),
      limits: section({
        maxPlaintextBytes: int(SPEC_MIN_PLAINTEXT_BYTES, MAX_DATA_BYTES_LIMIT)
          .default(8192)
          .describe("larger plaintext: 501 (spec minimum..agent maximum)"),
        maxCiphertextBytes: int(SPEC_MIN_PLAINTEXT_BYTES, MAX_DATA_BYTES_LIMIT).default(8192).describe("larger ciphertext: 501"),
        // The agent's AAD layout carries at most MAX_LAYOUT_AAD_BYTES: a larger AAD could never be used.
        maxAadBytes: int(SPEC_MIN_AAD_BYTES, MAX_LAYOUT_AAD_BYTES)
          .default(16384)
          .describe("larger AAD: 501 (the AAD layout's length is 16 bits)"),
        maxBodyBytes: int(1024, 8 << 20)
          .default(65536)
          .describe("hard cap, checked before the body is read: 501; at least what the other limits need"),
      }).describe("request size limits"),
      http: section({
        headersTimeoutMs: int(100, 60_000)
          .default(10_000)
          .describe("request line and headers must arrive within this; a new connection that sends nothing is closed after it too"),
        requestTimeoutMs: int(100, 300_000).default(15_000).describe("the whole request (headers and body); at least headersTimeoutMs"),
        keepAliveTimeoutMs: int(100, 600_000)
          .default(65_000)
          .describe("an idle keep-alive connection is closed after this; keep it above the load balancer's idle timeout (ALB: 60 s)"),
        maxConnections: int(16, 1_000_000).default(4096).describe("open connections at most; more are closed at accept"),
      }).describe("HTTP server hardening against slow, idle and too many clients"),
      keyStores: z.array(keyStore).min(1).describe("the external key stores served (one KMS custom key store each), 1+"),
      metrics: metricsSection(PROXY_METRICS_PORT),
      log: logSection(),
    })
    .superRefine(
      (v, zc) => {
        // Rules between fields. They run even when a field failed (every problem
        // at once), so each reads its values defensively.
        const problem = (path: PropertyKey[], message: string) => zc.addIssue({ code: "custom", message, path });
        const o = v as Partial<Record<string, unknown>> & typeof v;
        if (numOr(o.admission?.queueTargetMs, 100) > numOr(o.requestBudgetMs, 200))
          problem(["admission", "queueTargetMs"], "must be <= requestBudgetMs");
        const l = o.limits ?? {};
        const need = minBodyBytes({
          maxPlaintextBytes: numOr(l.maxPlaintextBytes, 8192),
          maxCiphertextBytes: numOr(l.maxCiphertextBytes, 8192),
          maxAadBytes: numOr(l.maxAadBytes, 16384),
        });
        if (numOr(l.maxBodyBytes, 65536) < need)
          problem(["limits", "maxBodyBytes"], `must be >= ${need} to admit the largest request the other limits allow`);
        if (numOr(o.http?.requestTimeoutMs, 15_000) < numOr(o.http?.headersTimeoutMs, 10_000))
          problem(["http", "requestTimeoutMs"], "must be >= http.headersTimeoutMs");
        const ids = new Set<string>();
        (Array.isArray(o.agents) ? o.agents : []).forEach((a, i) => {
          if (typeof a?.id !== "string" || a.id === "") return;
          if (ids.has(a.id)) problem(["agents", i, "id"], `duplicate agent id "${a.id}"`);
          ids.add(a.id);
        });
        const prefixes = new Set<string>();
        const secretByAccessKey = new Map<string, unknown>();
        (Array.isArray(o.keyStores) ? o.keyStores : []).forEach((s, i) => {
          if (typeof s !== "object" || s === null) return;
          if (typeof s.uriPathPrefix === "string") {
            if (prefixes.has(s.uriPathPrefix)) problem(["keyStores", i, "uriPathPrefix"], `duplicate prefix "${s.uriPathPrefix}"`);
            prefixes.add(s.uriPathPrefix);
          }
          const accessKeyIds = new Set<string>();
          (Array.isArray(s.credentials) ? s.credentials : []).forEach((c, j) => {
            const id = c?.accessKeyId;
            if (typeof id !== "string" || id === "") return;
            if (accessKeyIds.has(id))
              problem(["keyStores", i, "credentials", j, "accessKeyId"], "duplicate access key id in this key store");
            accessKeyIds.add(id);
            const secretValue = c.secretAccessKey;
            if (typeof secretValue !== "string" || secretValue === "") return;
            const seen = secretByAccessKey.get(id);
            if (seen !== undefined && seen !== secretValue)
              problem(["keyStores", i, "credentials", j, "accessKeyId"], "is used by another key store with a different secret");
            secretByAccessKey.set(id, secretValue);
          });
          const keys = new Set<string>();
          (Array.isArray(s.keys) ? s.keys : []).forEach((k, j) => {
            if (typeof k !== "string") return;
            if (keys.has(k)) problem(["keyStores", i, "keys", j], `duplicate key "${k}"`);
            keys.add(k);
          });
        });
      },
      { when: () => true },
    );
}

/** The proxy's config: the schema's output, and the file it came from. */
export type ProxyConfig = z.output<ReturnType<typeof proxyConfigSchema>> & { file: string };
export type ListenConfig = ProxyConfig["listen"];
/** One external key store served by this proxy (one KMS custom key store). */
export type KeyStoreConfig = ProxyConfig["keyStores"][number];
/** One SigV4 credential pair as configured in KMS (XksProxyAuthenticationCredential). */
export type Credential = KeyStoreConfig["credentials"][number];
/** One agent the proxy calls (an entry of `agents`); not to be confused with the agent's own config. */
export type AgentEndpoint = ProxyConfig["agents"][number];
export type AdmissionConfig = ProxyConfig["admission"];
export type Limits = ProxyConfig["limits"];
/** HTTP server hardening against slow, idle and too many clients (proxy/main.ts applies it). */
export type HttpServerConfig = ProxyConfig["http"];

/**
 * Reads, validates and freezes the proxy config. Throws one ConfigError listing
 * every problem ("<field>: <problem>", under the file name).
 */
export function loadProxyConfig(file: string, env: NodeJS.ProcessEnv = process.env): Readonly<ProxyConfig> {
  return deepFreeze({ file, ...loadConfig(proxyConfigSchema({ file, env }), file) });
}

/** As loadProxyConfig, from an already parsed JSON value (relative secret paths resolve from `file`'s folder). */
export function parseProxyConfig(raw: unknown, file: string, env: NodeJS.ProcessEnv = process.env): Readonly<ProxyConfig> {
  return deepFreeze({ file, ...parseConfig(proxyConfigSchema({ file, env }), raw, file) });
}

/** The effective config without any secret, for the start-up log line. */
export function describeConfig(cfg: Readonly<ProxyConfig>): Record<string, unknown> {
  return {
    file: cfg.file,
    workers: cfg.workers,
    listen: cfg.listen,
    tls: describeTls(cfg.tls),
    region: cfg.region,
    fleetSize: cfg.fleetSize,
    vendor: cfg.vendor,
    identity: cfg.identity.fingerprint,
    agents: cfg.agents.map((a) => ({
      id: a.id,
      target: a.target,
      connections: a.connections,
      identities: a.identities.map((p) => p.fingerprint),
    })),
    agentDeadlineMs: cfg.agentDeadlineMs,
    requestBudgetMs: cfg.requestBudgetMs,
    admission: cfg.admission,
    healthRefreshMs: cfg.healthRefreshMs,
    healthDeadlineMs: cfg.healthDeadlineMs,
    limits: cfg.limits,
    http: cfg.http,
    keyStores: cfg.keyStores.map((s) => ({
      uriPathPrefix: s.uriPathPrefix,
      accessKeyIds: s.credentials.map((k) => k.accessKeyId),
      keys: s.keys,
      quota: s.quota,
    })),
    metrics: cfg.metrics,
    logLevel: cfg.log.level,
  };
}
