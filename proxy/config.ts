/**
 * The proxy's configuration: one JSON file, read and validated once at start-up
 * (every problem reported at once, each with the file and the field), then
 * frozen and passed down. Secrets are references ({"file"}, {"env"} or
 * {"keychain"}), resolved here and never echoed back.
 *
 * Shape (defaults in brackets):
 *
 * ```jsonc
 * {
 *   "listen": { "host": "127.0.0.1", "port": 8443 },   // [127.0.0.1, 8443]; plain HTTP behind an ALB unless `tls` is set
 *   "tls": {                                            // optional: HTTPS on the listener itself (proxy/tls.ts); SIGHUP re-reads it
 *     "certificate": "server.crt",                      //   PEM: the server certificate, then its intermediates
 *     "key": { "file": "server.key" },                  //   secret: its PEM private key
 *     "clientCa": "client-ca.crt",                      //   optional, mutual TLS: CA certificate(s) client certificates chain to
 *     "clientNames": ["cks.kms.us-east-1.amazonaws.com"] //   with clientCa: allowed client subject CN / DNS SAN names, 1..10
 *   },
 *   "region": "us-east-1",                              // SigV4 region of the key store(s)
 *   "fleetSize": 1,                                     // [1]  xksProxyFleetSize
 *   "vendor": "xks-pair",                               // ["xks-pair"]  xksProxyVendor
 *   "ekmVendor": "unknown",                             // ["unknown"] ekmVendor until an agent reports its token manufacturer
 *   "agents": [                                         // 1..10; one ekmFleetDetails entry each
 *     { "id": "mac-1",                                  // unique, [A-Za-z0-9._:-]{1,64}
 *       "target": "unix:///run/xks/agent.sock",         // or "127.0.0.1:7000"
 *       "token": { "file": "agent-token" },             // secret: sent as metadata x-xks-agent-token
 *       "identities": ["agent-identity.crt"] }          // the agent's certificates accepted (1, or 2 while rotating)
 *   ],
 *   "identity": { "key": { "file": "proxy-identity.key" },   // this proxy's TLS identity towards its agents
 *                 "certificate": "proxy-identity.crt" },    //   (`xks-proxy identity new`)
 *   "agentDeadlineMs": 200,                             // [200] deadline of each crypto/metadata call, 10..240
 *   "requestBudgetMs": 200,                             // [200] each request is answered within this from its arrival, 20..240
 *                                                       //   (KMS gives up after 250 ms): a success never after it; a request
 *                                                       //   that cannot make it gets 429 ThrottlingException at once
 *   "admission": {                                      // per-agent admission (proxy/admission.ts)
 *     "maxInFlightPerAgent": 128,                       // [128] calls outstanding at one agent at most, 1..4096; others wait
 *                                                       //   in the proxy (needs >= rate x round trip: 1,800/s x 35 ms = 63)
 *     "queueTargetMs": 100                              // [100] predicted wait in the proxy allowed, 0..requestBudgetMs
 *   },
 *   "healthRefreshMs": 10000,                           // [10000] background health refresh period, 100..30000
 *   "healthDeadlineMs": 2000,                           // [2000] deadline of one background health call, 10..10000
 *   "limits": {
 *     "maxPlaintextBytes": 8192,                        // [8192]  4300..1048576 (spec minimum..agent maximum); larger -> 501
 *     "maxCiphertextBytes": 8192,                       // [8192]  4300..1048576
 *     "maxAadBytes": 16384,                             // [16384] 8192..65535 (the AAD layout's uint16 length)
 *     "maxBodyBytes": 65536                             // [65536] hard cap, checked before reading the body -> 501
 *   },
 *   "http": {                                           // HTTP server hardening (slow or idle clients)
 *     "headersTimeoutMs": 10000,                        // [10000] request line + headers must arrive within this, 100..60000;
 *                                                       //   a new connection that sends nothing is closed after it too
 *     "requestTimeoutMs": 15000,                        // [15000] whole request (headers + body), 100..300000, >= headersTimeoutMs
 *     "keepAliveTimeoutMs": 65000,                      // [65000] idle keep-alive connection closed after this, 100..600000;
 *                                                       //   keep it ABOVE the load balancer's idle timeout (ALB: 60 s)
 *     "maxConnections": 4096                            // [4096] open connections at most; more are closed at accept, 16..1000000
 *   },
 *   "keyStores": [                                      // 1+
 *     { "uriPathPrefix": "/example/prefix",             // "" or 9..117 chars of [a-zA-Z0-9/_-], starts with "/",
 *                                                       //   no trailing "/" and no "//"; unique
 *       "credentials": [                                // 1..10 live SigV4 credentials (rotation)
 *         { "accessKeyId": "ABCDEFGHIJKLMNOPQRSTUVWXYZ",   // 20..30 of [A-Z2-7], unique per store
 *           "secretAccessKey": { "file": "store1.secret" } } // secret: 43..64 of [a-zA-Z0-9/+=]
 *       ],
 *       "keys": ["foo", "bar"],                         // allow-list of externalKeyIds, each ^[a-zA-Z0-9-_.]{1,128}$
 *       "quota": { "rate": 1800, "burst": 400 } }      // optional: this store's requests per second (1..1000000) and
 *                                                       //   burst (1..1000000), a token bucket; over it -> 429
 *   ],
 *   "log": { "level": "info" }                          // [info]
 * }
 * ```
 */
import { Checker, deepFreeze, readJsonFile } from "../shared/config.ts";
import type { OwnIdentity, PinnedIdentity } from "../shared/identity.ts";
import type { QuotaConfig } from "./admission.ts";
import { describeTls, parseTlsConfig, type TlsConfig } from "./tls.ts";
import type { LogLevel } from "../shared/logging.ts";
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

export interface ListenConfig {
  host: string;
  port: number;
}

/** One SigV4 credential pair as configured in KMS (XksProxyAuthenticationCredential). */
export interface Credential {
  accessKeyId: string;
  secretAccessKey: string;
}

/** One external key store served by this proxy (one KMS custom key store). */
export interface KeyStoreConfig {
  /** "" (no prefix) or "/…"; the store's URIs are `<prefix>/kms/xks/v1/…`. */
  uriPathPrefix: string;
  credentials: Credential[];
  /** Allow-list of externalKeyIds this store may use. */
  keys: string[];
  /** Optional request quota (token bucket); over it → 429 ThrottlingException. */
  quota?: QuotaConfig;
}

/** Per-agent admission (proxy/admission.ts). */
export interface AdmissionConfig {
  maxInFlightPerAgent: number;
  queueTargetMs: number;
}

/** One agent the proxy calls (an entry of `agents`); not to be confused with the agent's own config. */
export interface AgentEndpoint {
  id: string;
  /** grpc-js target: `unix:///abs/path.sock` or `host:port`. */
  target: string;
  token: string;
  /** The agent's certificates accepted on its channel (mutual TLS, pinned). */
  identities: PinnedIdentity[];
}

export interface Limits {
  maxPlaintextBytes: number;
  maxCiphertextBytes: number;
  maxAadBytes: number;
  maxBodyBytes: number;
}

/** HTTP server hardening against slow, idle and too many clients (proxy/main.ts applies it). */
export interface HttpServerConfig {
  headersTimeoutMs: number;
  requestTimeoutMs: number;
  keepAliveTimeoutMs: number;
  maxConnections: number;
}

export interface ProxyConfig {
  file: string;
  listen: ListenConfig;
  /** HTTPS (and optionally mutual TLS) on the listener; absent: plain HTTP behind a TLS-terminating load balancer. */
  tls?: TlsConfig;
  region: string;
  fleetSize: number;
  vendor: string;
  ekmVendor: string;
  agents: AgentEndpoint[];
  /** This proxy's key and certificate towards its agents, and its fingerprint. */
  identity: OwnIdentity & { fingerprint: string };
  agentDeadlineMs: number;
  requestBudgetMs: number;
  admission: AdmissionConfig;
  healthRefreshMs: number;
  healthDeadlineMs: number;
  limits: Limits;
  http: HttpServerConfig;
  keyStores: KeyStoreConfig[];
  log: { level: LogLevel };
}

export const ACCESS_KEY_ID_RE = /^[A-Z2-7]{20,30}$/;
export const SECRET_ACCESS_KEY_RE = /^[a-zA-Z0-9/+=]{43,64}$/;
const AGENT_ID_RE = /^[A-Za-z0-9._:-]{1,64}$/;
const TARGET_RE = /^(?:unix:\/\/\/[^\s]+|unix:\/[^\s]+|[A-Za-z0-9.-]+:\d{1,5}|\[[0-9a-fA-F:.]+\]:\d{1,5})$/;
const REGION_RE = /^[a-z]{2,}(?:-[a-z0-9]+)+$/;
const TOKEN_RE = /^[\x21-\x7e]{16,1024}$/;
const LOG_LEVELS: LogLevel[] = ["fatal", "error", "warn", "info", "debug", "trace", "silent"];

function b64len(bytes: number): number {
  return 4 * Math.ceil(bytes / 3);
}

/** Smallest hard body cap that still admits the largest request the limits allow (+ room for metadata). */
export function minBodyBytes(l: Omit<Limits, "maxBodyBytes">): number {
  return b64len(Math.max(l.maxPlaintextBytes, l.maxCiphertextBytes)) + b64len(l.maxAadBytes) + 8192;
}

/**
 * Reads, validates and freezes the proxy config. Throws one ConfigError listing
 * every problem ("<field>: <problem>", under the file name).
 */
export function loadProxyConfig(file: string, env: NodeJS.ProcessEnv = process.env): Readonly<ProxyConfig> {
  const raw = readJsonFile(file);
  return parseProxyConfig(raw, file, env);
}

/** As loadProxyConfig, from an already parsed JSON value (relative secret paths resolve from `file`'s folder). */
export function parseProxyConfig(raw: unknown, file: string, env: NodeJS.ProcessEnv = process.env): Readonly<ProxyConfig> {
  const c = new Checker(file);
  const root = c.object(raw, "(root)");
  c.noUnknown(root, "", [
    "listen",
    "tls",
    "region",
    "fleetSize",
    "vendor",
    "ekmVendor",
    "agents",
    "identity",
    "agentDeadlineMs",
    "requestBudgetMs",
    "admission",
    "healthRefreshMs",
    "healthDeadlineMs",
    "limits",
    "http",
    "keyStores",
    "log",
  ]);

  const listenObj = root.listen === undefined ? {} : c.object(root.listen, "listen");
  c.noUnknown(listenObj, "listen", ["host", "port"]);
  const listen: ListenConfig = {
    host: c.string(listenObj, "host", "listen", { default: "127.0.0.1", min: 1 }),
    port: c.int(listenObj, "port", "listen", { default: 8443, min: 0, max: 65535 }),
  };

  const tls = parseTlsConfig(c, root.tls, env);

  const region = c.string(root, "region", "", { pattern: REGION_RE, hint: "an AWS region name such as us-east-1" });
  const fleetSize = c.int(root, "fleetSize", "", { default: 1, min: 1, max: 1000 });
  const vendor = c.string(root, "vendor", "", { default: "xks-pair", min: 1, max: 128 });
  const ekmVendor = c.string(root, "ekmVendor", "", { default: "unknown", min: 1, max: 128 });
  const agentDeadlineMs = c.int(root, "agentDeadlineMs", "", { default: 200, min: 10, max: 240 });
  const healthRefreshMs = c.int(root, "healthRefreshMs", "", { default: 10_000, min: 100, max: 30_000 });
  const healthDeadlineMs = c.int(root, "healthDeadlineMs", "", { default: 2_000, min: 10, max: 10_000 });
  const requestBudgetMs = c.int(root, "requestBudgetMs", "", { default: 200, min: 20, max: 240 });
  const admissionObj = root.admission === undefined ? {} : c.object(root.admission, "admission");
  c.noUnknown(admissionObj, "admission", ["maxInFlightPerAgent", "queueTargetMs"]);
  const admission: AdmissionConfig = {
    maxInFlightPerAgent: c.int(admissionObj, "maxInFlightPerAgent", "admission", { default: 128, min: 1, max: 4096 }),
    queueTargetMs: c.int(admissionObj, "queueTargetMs", "admission", { default: 100, min: 0, max: 240 }),
  };
  if (admission.queueTargetMs > requestBudgetMs) c.problem("admission.queueTargetMs", "must be <= requestBudgetMs");

  // agents
  const agents: AgentEndpoint[] = [];
  const agentList = c.array(root, "agents", "", { min: 1 });
  if (agentList.length > 10) c.problem("agents", "must have at most 10 entries (ekmFleetDetails holds 1..10)");
  const agentIds = new Set<string>();
  agentList.forEach((a, i) => {
    const f = `agents[${i}]`;
    const o = c.object(a, f);
    c.noUnknown(o, f, ["id", "target", "token", "identities"]);
    const id = c.string(o, "id", f, { pattern: AGENT_ID_RE, hint: "1-64 characters of [A-Za-z0-9._:-]" });
    if (id !== "" && agentIds.has(id)) c.problem(`${f}.id`, `duplicate agent id "${id}"`);
    agentIds.add(id);
    const target = c.string(o, "target", f, {
      pattern: TARGET_RE,
      hint: '"unix:///absolute/path.sock" or "host:port"',
    });
    const token = c.secret(o, "token", f, env);
    if (token !== "" && !TOKEN_RE.test(token)) c.problem(`${f}.token`, "must be 16-1024 printable ASCII characters without spaces");
    const identities = c.pins(o, "identities", f);
    agents.push({ id, target, token, identities });
  });

  const identity = c.identity(root, "identity", "", env) ?? { key: "", certificate: "", fingerprint: "" };

  // limits
  const limitsObj = root.limits === undefined ? {} : c.object(root.limits, "limits");
  c.noUnknown(limitsObj, "limits", ["maxPlaintextBytes", "maxCiphertextBytes", "maxAadBytes", "maxBodyBytes"]);
  const maxPlaintextBytes = c.int(limitsObj, "maxPlaintextBytes", "limits", {
    default: 8192,
    min: SPEC_MIN_PLAINTEXT_BYTES,
    max: MAX_DATA_BYTES_LIMIT,
  });
  const maxCiphertextBytes = c.int(limitsObj, "maxCiphertextBytes", "limits", {
    default: 8192,
    min: SPEC_MIN_PLAINTEXT_BYTES,
    max: MAX_DATA_BYTES_LIMIT,
  });
  // The agent's AAD layout carries at most MAX_LAYOUT_AAD_BYTES: a larger AAD could never be used.
  const maxAadBytes = c.int(limitsObj, "maxAadBytes", "limits", { default: 16384, min: SPEC_MIN_AAD_BYTES, max: MAX_LAYOUT_AAD_BYTES });
  const maxBodyBytes = c.int(limitsObj, "maxBodyBytes", "limits", { default: 65536, min: 1024, max: 8 << 20 });
  const needBody = minBodyBytes({ maxPlaintextBytes, maxCiphertextBytes, maxAadBytes });
  if (maxBodyBytes < needBody) {
    c.problem("limits.maxBodyBytes", `must be >= ${needBody} to admit the largest request the other limits allow`);
  }
  const limits: Limits = { maxPlaintextBytes, maxCiphertextBytes, maxAadBytes, maxBodyBytes };

  // HTTP server hardening
  const httpObj = root.http === undefined ? {} : c.object(root.http, "http");
  c.noUnknown(httpObj, "http", ["headersTimeoutMs", "requestTimeoutMs", "keepAliveTimeoutMs", "maxConnections"]);
  const http: HttpServerConfig = {
    headersTimeoutMs: c.int(httpObj, "headersTimeoutMs", "http", { default: 10_000, min: 100, max: 60_000 }),
    requestTimeoutMs: c.int(httpObj, "requestTimeoutMs", "http", { default: 15_000, min: 100, max: 300_000 }),
    keepAliveTimeoutMs: c.int(httpObj, "keepAliveTimeoutMs", "http", { default: 65_000, min: 100, max: 600_000 }),
    maxConnections: c.int(httpObj, "maxConnections", "http", { default: 4096, min: 16, max: 1_000_000 }),
  };
  if (http.requestTimeoutMs < http.headersTimeoutMs) c.problem("http.requestTimeoutMs", "must be >= http.headersTimeoutMs");

  // key stores
  const keyStores: KeyStoreConfig[] = [];
  const storeList = c.array(root, "keyStores", "", { min: 1 });
  const prefixes = new Set<string>();
  const secretByAccessKey = new Map<string, string>();
  storeList.forEach((s, i) => {
    const f = `keyStores[${i}]`;
    const o = c.object(s, f);
    c.noUnknown(o, f, ["uriPathPrefix", "credentials", "keys", "quota"]);
    const uriPathPrefix = c.string(o, "uriPathPrefix", f);
    const pp = typeof o.uriPathPrefix === "string" ? prefixProblem(uriPathPrefix) : undefined;
    if (pp) c.problem(`${f}.uriPathPrefix`, pp);
    if (prefixes.has(uriPathPrefix)) c.problem(`${f}.uriPathPrefix`, `duplicate prefix "${uriPathPrefix}"`);
    prefixes.add(uriPathPrefix);

    const credentials: Credential[] = [];
    const credList = c.array(o, "credentials", f, { min: 1 });
    if (credList.length > 10) c.problem(`${f}.credentials`, "must have at most 10 entries");
    const ids = new Set<string>();
    credList.forEach((cr, j) => {
      const cf = `${f}.credentials[${j}]`;
      const co = c.object(cr, cf);
      c.noUnknown(co, cf, ["accessKeyId", "secretAccessKey"]);
      const accessKeyId = c.string(co, "accessKeyId", cf, { pattern: ACCESS_KEY_ID_RE, hint: "20-30 characters of [A-Z2-7]" });
      if (accessKeyId !== "" && ids.has(accessKeyId)) c.problem(`${cf}.accessKeyId`, "duplicate access key id in this key store");
      ids.add(accessKeyId);
      const secretAccessKey = c.secret(co, "secretAccessKey", cf, env);
      if (secretAccessKey !== "" && !SECRET_ACCESS_KEY_RE.test(secretAccessKey)) {
        c.problem(`${cf}.secretAccessKey`, "must be 43-64 characters of [a-zA-Z0-9/+=]");
      }
      const seen = secretByAccessKey.get(accessKeyId);
      if (accessKeyId !== "" && secretAccessKey !== "" && seen !== undefined && seen !== secretAccessKey) {
        c.problem(`${cf}.accessKeyId`, "is used by another key store with a different secret");
      }
      if (accessKeyId !== "" && secretAccessKey !== "") secretByAccessKey.set(accessKeyId, secretAccessKey);
      credentials.push({ accessKeyId, secretAccessKey });
    });

    const keys: string[] = [];
    const keySet = new Set<string>();
    c.array(o, "keys", f).forEach((k, j) => {
      const kf = `${f}.keys[${j}]`;
      if (typeof k !== "string" || !EXTERNAL_KEY_ID_RE.test(k)) {
        c.problem(kf, `must be an externalKeyId: ${EXTERNAL_KEY_ID_RULE}`);
        return;
      }
      if (keySet.has(k)) c.problem(kf, `duplicate key "${k}"`);
      keySet.add(k);
      keys.push(k);
    });
    let quota: QuotaConfig | undefined;
    if (o.quota !== undefined) {
      const qf = `${f}.quota`;
      const qo = c.object(o.quota, qf);
      c.noUnknown(qo, qf, ["rate", "burst"]);
      quota = {
        rate: c.int(qo, "rate", qf, { min: 1, max: 1_000_000 }),
        burst: c.int(qo, "burst", qf, { min: 1, max: 1_000_000 }),
      };
    }
    keyStores.push({ uriPathPrefix, credentials, keys, ...(quota ? { quota } : {}) });
  });

  const logObj = root.log === undefined ? {} : c.object(root.log, "log");
  c.noUnknown(logObj, "log", ["level"]);
  const level = c.string(logObj, "level", "log", { default: "info" }) as LogLevel;
  if (!LOG_LEVELS.includes(level)) c.problem("log.level", `must be one of ${LOG_LEVELS.join(", ")}`);

  c.done();
  return deepFreeze({
    file,
    listen,
    ...(tls ? { tls } : {}),
    region,
    fleetSize,
    vendor,
    ekmVendor,
    agents,
    identity,
    agentDeadlineMs,
    requestBudgetMs,
    admission,
    healthRefreshMs,
    healthDeadlineMs,
    limits,
    http,
    keyStores,
    log: { level },
  });
}

/** The effective config without any secret, for the start-up log line. */
export function describeConfig(cfg: Readonly<ProxyConfig>): Record<string, unknown> {
  return {
    file: cfg.file,
    listen: cfg.listen,
    tls: describeTls(cfg.tls),
    region: cfg.region,
    fleetSize: cfg.fleetSize,
    vendor: cfg.vendor,
    identity: cfg.identity.fingerprint,
    agents: cfg.agents.map((a) => ({ id: a.id, target: a.target, identities: a.identities.map((p) => p.fingerprint) })),
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
    logLevel: cfg.log.level,
  };
}
