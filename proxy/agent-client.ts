/**
 * The proxy's gRPC client to its agent(s) (proto/xks/agent/v1/agent.proto).
 *
 * - One unary call per XKS request, with a deadline well inside KMS's 250 ms
 *   budget and the proxy's token in metadata `x-xks-agent-token`.
 * - Short reconnect backoff and keepalive, so a restarted agent or tunnel is
 *   picked up within about a second, and an unreachable agent fails fast
 *   (waitForReady is off: a channel in TRANSIENT_FAILURE fails the call at once).
 * - Failures are classified in ONE place, `classifyAgentFailure`: the XKS error
 *   answered, and whether it is a transport failure (which the pool routes around).
 * - Several agents: each call goes to the next agent (round-robin) whose last
 *   health is not UNAVAILABLE; if none qualifies, to the next one anyway.
 * - Health: a background refresh calls every agent's GetHealthStatus; the
 *   request path only ever reads the cache (`healthSnapshot`), never awaits
 *   an agent.
 * - The channel is mutual TLS inside whatever stream reaches the agent (the
 *   SSH-forwarded socket): the proxy presents its own certificate and accepts
 *   only the agent certificates pinned for that agent, whoever bound the
 *   socket or port. Nothing (no token, no request) is sent before the agent's
 *   certificate is verified. When a health check fails, one TLS handshake
 *   without a client certificate finds out who is listening, so the log and
 *   the health cache can name the identity presented (`identityProblem`).
 * - Admission (proxy/admission.ts): each agent has a gate (a concurrency limit
 *   and a FIFO of waiters); a call carries its request's budget, its deadline
 *   is what is left of that budget, and a call that cannot finish inside it is
 *   refused with 429 ThrottlingException before any agent work. Health calls
 *   do not pass through the gates: they never wait behind a backlog.
 * - Key check values (proxy/key-checks.ts): each health answer carries the
 *   agent's check values of its keys; a key whose agents report different
 *   values is refused (InvalidStateException) before any agent is called, and
 *   those agents are reported DEGRADED. With several agents, a key operation
 *   is sent only to an agent that has answered a health check (not
 *   UNAVAILABLE) since the proxy started, so its check values are known;
 *   otherwise 503.
 */
import type { ProxyMetrics } from "./metrics.ts";
import { connect as tlsConnect } from "node:tls";
import * as grpc from "@grpc/grpc-js";
import {
  AGENT_TOKEN_METADATA_KEY,
  REASON_METADATA_KEY,
  REASONS,
  XksError,
  errorMessage,
  isReason,
  type XksErrorName,
} from "../shared/errors.ts";
import { certificateFingerprint, type OwnIdentity, type PinnedIdentity } from "../shared/identity.ts";
import type { Logger } from "../shared/logging.ts";
import {
  XksAgentClient,
  type DecryptRequest,
  type DecryptResponse,
  type EncryptRequest,
  type EncryptResponse,
  type GetHealthStatusRequest,
  type GetHealthStatusResponse,
  type GetKeyMetadataRequest,
  type GetKeyMetadataResponse,
  type HealthState,
} from "../shared/proto.ts";
import { AgentGate, Budget, throttled } from "./admission.ts";
import type { AgentEndpoint } from "./config.ts";
import { KeyCheckBook } from "./key-checks.ts";

/** Request/response types per RPC (complete messages, shared/proto.ts). */
export interface AgentMethods {
  GetKeyMetadata: { req: GetKeyMetadataRequest; res: GetKeyMetadataResponse };
  Encrypt: { req: EncryptRequest; res: EncryptResponse };
  Decrypt: { req: DecryptRequest; res: DecryptResponse };
  GetHealthStatus: { req: GetHealthStatusRequest; res: GetHealthStatusResponse };
}
export type AgentMethod = Exclude<keyof AgentMethods, "GetHealthStatus">;

export interface AgentCallResult<T> {
  response: T;
  /** The configured id of the agent that answered. */
  agentId: string;
}

/** What the cache knows about one configured agent. */
export interface AgentHealth {
  /** Configured agent id. */
  id: string;
  /** ACTIVE / DEGRADED / UNAVAILABLE; UNAVAILABLE before the first answer, after a failure, or when older than 60 s. */
  state: HealthState;
  /** When the entry was last updated (ms since the epoch); undefined before the first refresh completes. */
  checkedAt?: number;
  /** The agent's last successful answer, if any. */
  report?: GetHealthStatusResponse;
  /** Why the agent is UNAVAILABLE, when known (e.g. an identity mismatch). */
  reason?: string;
}

/** What a call carries from its HTTP request. */
export interface CallOptions {
  /** The request's budget: the call's deadline is what is left of it, and a call that cannot make it is refused (429). */
  budget?: Budget;
  /**
   * Aborts when the HTTP client has gone away: a call still waiting leaves the queue. A call
   * already sent is left to its deadline (which the agent also checks): cancelling it would
   * cost an RST_STREAM each, and a crowd of them trips HTTP/2's rapid-reset protection (the
   * agent's nghttp2 closed the connection under a measured overload, failing every call on it).
   */
  signal?: AbortSignal;
}

/**
 * The narrow interface the HTTP layer uses. AgentPool implements it over gRPC;
 * in-process unit tests may pass a stub.
 */
export interface AgentApi {
  call<M extends AgentMethod>(
    method: M,
    request: AgentMethods[M]["req"],
    opts?: CallOptions,
  ): Promise<AgentCallResult<AgentMethods[M]["res"]>>;
  /**
   * Why a request with this budget would be refused by every agent right now
   * (undefined: some agent can take it). Cheap; asked before the body is read.
   */
  refusal?(budget: Budget): string | undefined;
  /** The cached health of every configured agent, in config order. Never blocks; kicks a refresh when stale. */
  healthSnapshot(): AgentHealth[];
}

/** Channel options: fast reconnect (defaults are 1 s initial, 120 s max; a refused local connect is cheap) and keepalive. */
export const CHANNEL_OPTIONS: grpc.ChannelOptions = {
  "grpc.initial_reconnect_backoff_ms": 100,
  "grpc.max_reconnect_backoff_ms": 500,
  "grpc.keepalive_time_ms": 10_000,
  "grpc.keepalive_timeout_ms": 5_000,
  "grpc.keepalive_permit_without_calls": 1,
  "grpc.max_receive_message_length": 4 << 20,
  "grpc.max_send_message_length": 4 << 20,
  // No gRPC-level retries (one call per KMS request, inside its deadline) and no channelz
  // bookkeeping: together about a quarter of the client's CPU per call.
  "grpc.enable_retries": 0,
  "grpc.enable_channelz": 0,
  // HTTP/2 receive window for the agent's answers (default 64 KiB): a burst of answers must not wait
  // for WINDOW_UPDATEs that a busy event loop sends late.
  "grpc-node.flow_control_window": 8 << 20,
};

/** Extra time grpc-js's own deadline gets over ours (see AgentPool.unary). */
const DEADLINE_GRACE_MS = 50;

function deadlineExceeded(afterMs: number): grpc.ServiceError {
  return Object.assign(new Error(`Deadline exceeded after ${afterMs} ms`), {
    code: grpc.status.DEADLINE_EXCEEDED,
    details: `Deadline exceeded after ${afterMs} ms`,
    metadata: new grpc.Metadata(),
  });
}

interface StatusRow {
  xks: XksErrorName;
  /** The agent, or the path to it, is down (rather than the request being bad). */
  transport: boolean;
}

/** No known `xks-reason` in the trailers: the gRPC status alone decides. */
const BY_STATUS: Partial<Record<grpc.status, StatusRow>> = {
  [grpc.status.DEADLINE_EXCEEDED]: { xks: "DependencyTimeoutException", transport: true },
  [grpc.status.UNAVAILABLE]: { xks: "DependencyTimeoutException", transport: true },
  // The agent refused our token: a misconfiguration on our side, not the caller's.
  [grpc.status.UNAUTHENTICATED]: { xks: "InternalException", transport: false },
};
const ANY_OTHER_STATUS: StatusRow = { xks: "InternalException", transport: false };

/** What a failed agent call means. */
export interface AgentFailure {
  /** The XKS error answered to KMS. */
  error: XksError;
  /** True when the agent, or the path to it, is down: the pool routes around it until a health check answers. */
  transport: boolean;
}

function statusName(code: unknown): string {
  return typeof code === "number" ? (grpc.status[code] ?? String(code)) : "UNKNOWN";
}

/**
 * THE classification of a failed agent call (one table), used both for the
 * answer to KMS and for the pool's routing:
 *   - trailing metadata `xks-reason` (the agent answered) → REASONS[reason].xks, not transport;
 *     a reason this proxy does not know → the status's XKS error, still not transport;
 *   - no reason: DEADLINE_EXCEEDED / UNAVAILABLE → 503 DependencyTimeoutException, transport;
 *     UNAUTHENTICATED → 500 InternalException; anything else → 500 InternalException.
 */
export function classifyAgentFailure(err: unknown, agentId = "?"): AgentFailure {
  const se = err as Partial<grpc.ServiceError>;
  const code = se?.code;
  let reason: unknown;
  try {
    reason = se?.metadata instanceof grpc.Metadata ? se.metadata.get(REASON_METADATA_KEY)[0] : undefined;
  } catch {
    reason = undefined;
  }
  const byStatus = (typeof code === "number" ? BY_STATUS[code as grpc.status] : undefined) ?? ANY_OTHER_STATUS;
  const name: XksErrorName = isReason(reason) ? REASONS[reason].xks : byStatus.xks;
  const details = typeof se?.details === "string" ? se.details.slice(0, 200) : errorMessage(err).slice(0, 200);
  const detail = `agent ${agentId}: ${statusName(code)}${isReason(reason) ? ` ${reason}` : ""}: ${details}`;
  return { error: new XksError(name, detail, { cause: err }), transport: reason === undefined && byStatus.transport };
}

/** Starts one call of RPC M on a client (the generated client has one typed method per RPC). */
type Invoke<M extends keyof AgentMethods> = (
  client: XksAgentClient,
  req: AgentMethods[M]["req"],
  md: grpc.Metadata,
  opts: grpc.CallOptions,
  cb: grpc.requestCallback<AgentMethods[M]["res"]>,
) => grpc.ClientUnaryCall;

const INVOKE: { [M in keyof AgentMethods]: Invoke<M> } = {
  GetKeyMetadata: (client, req, md, opts, cb) => client.GetKeyMetadata(req, md, opts, cb),
  Encrypt: (client, req, md, opts, cb) => client.Encrypt(req, md, opts, cb),
  Decrypt: (client, req, md, opts, cb) => client.Decrypt(req, md, opts, cb),
  GetHealthStatus: (client, req, md, opts, cb) => client.GetHealthStatus(req, md, opts, cb),
};

/**
 * The channel credentials for one agent: this proxy's key and certificate, and
 * the agent's pinned certificates as the only trust anchors. checkServerIdentity
 * replaces the host-name check (a socket path has no host name) with the pin
 * check on the presented public key.
 */
export function agentChannelCredentials(own: OwnIdentity, pins: readonly PinnedIdentity[]): grpc.ChannelCredentials {
  return grpc.credentials.createSsl(
    Buffer.from(pins.map((p) => p.certificate).join("\n")),
    Buffer.from(own.key),
    Buffer.from(own.certificate),
    {
      checkServerIdentity: (_host, cert) => {
        let presented = "none";
        try {
          if (cert?.raw) presented = certificateFingerprint(cert.raw);
        } catch {
          presented = "unparseable certificate";
        }
        return pins.some((p) => p.fingerprint === presented) ? undefined : new Error(`agent identity ${presented} is not pinned`);
      },
    },
  );
}

/** Where a grpc-js target points, for a raw connection: a Unix socket path or host and port. */
function socketAddress(target: string): { path: string } | { host: string; port: number } {
  if (target.startsWith("unix:")) return { path: target.replace(/^unix:(\/\/)?/, "") };
  const m = /^\[?([^\]]*?)\]?:(\d+)$/.exec(target);
  return { host: m?.[1] ?? target, port: Number(m?.[2] ?? 0) };
}

/**
 * The identity (fingerprint) of whoever listens at `target`, read from one TLS
 * handshake that presents no client certificate and sends nothing else.
 * "no TLS" when the peer is not a TLS server; undefined when nothing answers.
 */
export function presentedIdentity(target: string, timeoutMs = 1000): Promise<string | undefined> {
  return new Promise((resolve) => {
    const socket = tlsConnect({ ...socketAddress(target), servername: "localhost", ALPNProtocols: ["h2"], rejectUnauthorized: false });
    let connected = false;
    const done = (v: string | undefined) => {
      clearTimeout(timer);
      socket.destroy();
      resolve(v);
    };
    const timer = setTimeout(() => done(connected ? "no TLS" : undefined), timeoutMs);
    socket.once("connect", () => {
      connected = true;
    });
    socket.once("secureConnect", () => {
      const cert = socket.getPeerCertificate(false);
      let fp = "none";
      try {
        if (cert?.raw) fp = certificateFingerprint(cert.raw);
      } catch {
        fp = "unparseable certificate";
      }
      done(fp);
    });
    socket.once("error", () => done(connected ? "no TLS" : undefined));
  });
}

interface Conn {
  cfg: AgentEndpoint;
  client: XksAgentClient;
  /** What health checks said (the only source of the reported health). */
  health: AgentHealth;
  /** A call just failed in transport: route around it until the next health check answers. */
  suspect: boolean;
  /** The identity problem last logged for this agent (logged again only when it changes). */
  identityProblem?: string;
  gate: AgentGate;
  /** The audit head last logged for this agent (logged again when it changes). */
  auditLogged?: string;
  /** It has answered a health check (not UNAVAILABLE) since the proxy started, so its key check values are known. */
  keyChecksKnown: boolean;
}

export interface AgentPoolOptions {
  agents: readonly AgentEndpoint[];
  /** This proxy's identity on every agent channel. */
  identity: OwnIdentity;
  /** Deadline of GetKeyMetadata / Encrypt / Decrypt calls. */
  deadlineMs: number;
  /** Deadline of one background GetHealthStatus call. */
  healthDeadlineMs: number;
  /** Background refresh period. */
  healthRefreshMs: number;
  /** Admission per agent (proxy/admission.ts); default: no queue target, 128 in flight. */
  admission?: { maxInFlightPerAgent: number; queueTargetMs: number };
  log: Logger;
  now?: () => number;
  /** Agent call latencies and each agent's health (proxy/metrics.ts). */
  metrics?: ProxyMetrics;
}

/** Cached health older than this is reported UNAVAILABLE (spec: cached result ≤ 1 minute old). */
export const HEALTH_MAX_AGE_MS = 60_000;

export class AgentPool implements AgentApi {
  private readonly conns: Conn[];
  private readonly opts: AgentPoolOptions;
  private readonly now: () => number;
  private identity: OwnIdentity;
  private next = 0;
  private timer: NodeJS.Timeout | undefined;
  private refreshing: Promise<void> | undefined;
  private lastRefreshAt = Number.NEGATIVE_INFINITY;
  private kickTimer: NodeJS.Timeout | undefined;
  private closed = false;
  /** The agents' key check values, compared per key id. */
  readonly keyChecks: KeyCheckBook;

  constructor(opts: AgentPoolOptions) {
    this.opts = opts;
    this.keyChecks = new KeyCheckBook(opts.log);
    this.now = opts.now ?? Date.now;
    this.identity = opts.identity;
    this.conns = opts.agents.map((cfg) => ({
      cfg,
      client: this.newClient(cfg, opts.identity),
      health: { id: cfg.id, state: "UNAVAILABLE" },
      suspect: false,
      keyChecksKnown: false,
      gate: new AgentGate({
        maxInFlight: opts.admission?.maxInFlightPerAgent ?? 128,
        queueTargetMs: opts.admission?.queueTargetMs ?? Number.POSITIVE_INFINITY,
      }),
    }));
  }

  private newClient(cfg: AgentEndpoint, identity: OwnIdentity): XksAgentClient {
    const client = new XksAgentClient(cfg.target, agentChannelCredentials(identity, cfg.identities), CHANNEL_OPTIONS);
    // Connect eagerly so the first KMS request does not pay for the handshake.
    client.getChannel().getConnectivityState(true);
    return client;
  }

  /**
   * Identity rotation without a restart: for every agent whose pinned
   * identities changed (or for all, when this proxy's own identity changed),
   * a new channel is opened and, once it is ready (or after the health
   * deadline), replaces the old one; the old channel is closed only after
   * that, so calls in flight finish on it. Agents are matched by id; the set
   * of agents itself needs a restart.
   */
  async updateIdentities(identity: OwnIdentity, agents: readonly AgentEndpoint[]): Promise<void> {
    const ownChanged = identity.certificate !== this.identity.certificate || identity.key !== this.identity.key;
    this.identity = identity;
    await Promise.all(
      this.conns.map(async (c) => {
        const next = agents.find((a) => a.id === c.cfg.id);
        if (!next) return;
        const pinsChanged = next.identities.map((p) => p.fingerprint).join() !== c.cfg.identities.map((p) => p.fingerprint).join();
        if (!ownChanged && !pinsChanged) return;
        const client = this.newClient(next, identity);
        await new Promise<void>((resolve) => client.waitForReady(Date.now() + this.opts.healthDeadlineMs, () => resolve()));
        const old = c.client;
        c.client = client;
        c.cfg = next;
        c.identityProblem = undefined;
        this.opts.log.info(
          { agent: c.cfg.id, identities: next.identities.map((p) => p.fingerprint) },
          "agent channel re-opened with the new identities",
        );
        setTimeout(() => old.close(), this.opts.deadlineMs * 5).unref();
      }),
    );
    void this.refreshHealth();
  }

  /** Starts the background health refresh (one immediately, then every healthRefreshMs). */
  start(): this {
    if (this.timer || this.closed) return this;
    void this.refreshHealth();
    this.timer = setInterval(() => void this.refreshHealth(), this.opts.healthRefreshMs);
    this.timer.unref();
    return this;
  }

  close(): void {
    this.closed = true;
    if (this.timer) clearInterval(this.timer);
    if (this.kickTimer) clearTimeout(this.kickTimer);
    this.timer = undefined;
    this.kickTimer = undefined;
    for (const c of this.conns) c.client.close();
  }

  private metadata(c: Conn): grpc.Metadata {
    const md = new grpc.Metadata();
    md.set(AGENT_TOKEN_METADATA_KEY, c.cfg.token);
    return md;
  }

  /**
   * One unary call with a deadline of `deadlineMs`. The deadline is kept here rather
   * than by grpc-js alone: when our timer fires we let the event loop poll its sockets
   * once more (setImmediate runs after the poll phase) before giving up, so an answer
   * that arrived in time but was not yet read, because a burst kept the loop busy, is
   * not turned into a timeout. grpc-js still gets a deadline (with that grace), which
   * is also sent to the agent.
   */
  private unary<M extends keyof AgentMethods>(
    c: Conn,
    method: M,
    request: AgentMethods[M]["req"],
    deadlineMs: number,
    grace = DEADLINE_GRACE_MS,
  ): Promise<AgentMethods[M]["res"]> {
    const invoke: Invoke<M> = INVOKE[method];
    const started = Date.now();
    return new Promise((resolve, reject) => {
      let settled = false;
      const call = invoke(c.client, request, this.metadata(c), { deadline: started + deadlineMs + grace }, (err, res) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        // grpc-js passes a value with every success (null error).
        if (err) reject(err);
        else resolve(res!);
      });
      const timer = setTimeout(() => {
        setImmediate(() => {
          if (settled) return;
          settled = true;
          call.cancel();
          reject(deadlineExceeded(Date.now() - started));
        });
      }, deadlineMs);
    });
  }

  /** Round-robin among agents whose last health is not UNAVAILABLE (and not just failed); otherwise among all. */
  private pick(): Conn {
    const n = this.conns.length;
    for (let i = 0; i < n; i++) {
      const c = this.conns[(this.next + i) % n];
      if (c.health.state !== "UNAVAILABLE" && !c.suspect) {
        this.next = (this.next + i + 1) % n;
        return c;
      }
    }
    const c = this.conns[this.next % n];
    this.next = (this.next + 1) % n;
    return c;
  }

  /** Why every usable agent would refuse a request with this budget now, or undefined. */
  refusal(budget: Budget): string | undefined {
    let why: string | undefined;
    for (const c of this.conns) {
      why = c.gate.refusal(budget);
      if (why === undefined) return undefined;
    }
    return why;
  }

  /** As pick(), but the first agent in turn whose gate would admit this budget, if any. */
  private pickFor(budget: Budget | undefined): Conn {
    if (budget && this.conns.length > 1) {
      const n = this.conns.length;
      for (let i = 0; i < n; i++) {
        const c = this.conns[(this.next + i) % n];
        if (c.health.state !== "UNAVAILABLE" && !c.suspect && c.gate.refusal(budget) === undefined) {
          this.next = (this.next + i + 1) % n;
          return c;
        }
      }
    }
    return this.pick();
  }

  async call<M extends AgentMethod>(
    method: M,
    request: AgentMethods[M]["req"],
    opts: CallOptions = {},
  ): Promise<AgentCallResult<AgentMethods[M]["res"]>> {
    const { budget, signal } = opts;
    const mismatch = this.keyChecks.refusal(request.keyId);
    if (mismatch !== undefined) throw new XksError("InvalidStateException", mismatch);
    const c = this.pickFor(budget);
    // An agent never heard from may hold another key under the same label: not before its check values are known.
    if (!c.keyChecksKnown && this.conns.length > 1)
      throw new XksError(
        "DependencyTimeoutException",
        `agent ${c.cfg.id} has not answered a health check yet (its key check values are unknown)`,
      );
    // No budget (direct callers): the configured deadline alone, still within the agent's concurrency limit.
    const slot = await c.gate.acquire(budget ?? this.unbudgeted(), signal);
    let ok = false;
    try {
      // What is left of the budget, capped by the configured deadline; grpc-js's own deadline gets
      // no grace past the budget, so the agent sees the same end as we do.
      const left = budget ? Math.floor(budget.remaining()) : this.opts.deadlineMs;
      if (left <= 0) throw throttled("no budget left at dispatch", "budget_at_dispatch");
      const deadlineMs = Math.min(this.opts.deadlineMs, left);
      const sent = process.hrtime.bigint();
      const response = await this.unary(
        c,
        method,
        request,
        deadlineMs,
        budget ? Math.min(DEADLINE_GRACE_MS, left - deadlineMs) : undefined,
      ).then(
        (r) => {
          this.opts.metrics?.agentCalled(c.cfg.id, method, true, sent);
          return r;
        },
        (err: unknown) => {
          this.opts.metrics?.agentCalled(c.cfg.id, method, false, sent);
          throw err;
        },
      );
      ok = true;
      return { response, agentId: c.cfg.id };
    } catch (err) {
      if (err instanceof XksError) throw err;
      const failure = classifyAgentFailure(err, c.cfg.id);
      if (failure.transport) {
        // Route around it until a health check answers, and check now. The reported
        // health is left to that check, so one slow call does not flip KMS's view.
        c.suspect = true;
        this.kick();
      }
      throw failure.error;
    } finally {
      slot.release(ok);
    }
  }

  private unbudgeted(): Budget {
    return new Budget(performance.now(), this.opts.deadlineMs);
  }

  /** Updates the cache; logs a change of state, or of the reason when `reasonChanged` says it matters. */
  private setHealth(c: Conn, h: Omit<AgentHealth, "id">, why: string, reasonChanged = false): void {
    const before = c.health.state;
    c.health = { id: c.cfg.id, ...h };
    this.opts.metrics?.setAgentHealth(c.cfg.id, h.state);
    if (before !== h.state || reasonChanged) {
      const fields = { agent: c.cfg.id, from: before, to: h.state, why };
      if (h.state === "UNAVAILABLE") this.opts.log.warn(fields, "agent health changed");
      else this.opts.log.info(fields, "agent health changed");
    }
  }

  private async checkOne(c: Conn): Promise<void> {
    try {
      const res = await this.unary(
        c,
        "GetHealthStatus",
        { kmsRequestId: "", kmsOperation: "ProxyHealthRefresh" },
        this.opts.healthDeadlineMs,
      );
      const state: HealthState = res.state === "ACTIVE" || res.state === "DEGRADED" ? res.state : "UNAVAILABLE";
      c.identityProblem = undefined;
      this.witnessAuditHead(c, res);
      // Before the state: an agent that comes up holding another key under a known label is never routed that key.
      // An UNAVAILABLE answer (HSM failing, paused) keeps the values last reported: its checks may be missing.
      if (state !== "UNAVAILABLE") {
        this.keyChecks.report(c.cfg.id, res.keyChecks ?? []);
        c.keyChecksKnown = true;
      }
      this.setHealth(
        c,
        { state, checkedAt: this.now(), report: res, reason: state === "UNAVAILABLE" ? res.detail.slice(0, 200) : undefined },
        res.detail ? res.detail.slice(0, 200) : "health check",
      );
    } catch (err) {
      const { error, transport } = classifyAgentFailure(err, c.cfg.id);
      const problem = transport ? await this.identityProblem(c) : undefined;
      const reason = problem ?? error.message;
      // An identity problem is worth a health line of its own even when the agent was already UNAVAILABLE.
      const reasonChanged = problem !== undefined && problem !== c.health.reason;
      this.setHealth(c, { state: "UNAVAILABLE", checkedAt: this.now(), report: c.health.report, reason }, reason, reasonChanged);
    }
    c.suspect = false;
  }

  /**
   * Logs the agent's audit head (its newest sealed checkpoint) whenever it
   * changes: this log, kept on EC2, is the witness `xks-agent audit verify
   * --against` compares the owner's audit files with, so a rollback of those
   * files to an earlier state shows.
   */
  private witnessAuditHead(c: Conn, res: GetHealthStatusResponse): void {
    const h = res.auditHead;
    if (!h) return;
    const key = `${h.records}:${h.hash}:${h.problem}`;
    if (key === c.auditLogged) return;
    c.auditLogged = key;
    this.opts.log.info(
      {
        agent: c.cfg.id,
        agentId: res.agentId.slice(0, 64),
        auditRecords: Number(h.records),
        auditHash: h.hash.slice(0, 64),
        auditMac: h.mac.slice(0, 64),
        ...(h.problem ? { auditProblem: h.problem.slice(0, 200) } : {}),
      },
      "agent audit head",
    );
  }

  /**
   * After a transport failure: who is listening at the agent's target? A peer
   * with an unpinned identity (or none) is named in one error line per change;
   * a pinned agent that refuses us means it does not pin this proxy's identity.
   */
  private async identityProblem(c: Conn): Promise<string | undefined> {
    const presented = await presentedIdentity(c.cfg.target);
    const expected = c.cfg.identities.map((p) => p.fingerprint);
    let problem: string | undefined;
    if (presented === undefined) problem = undefined;
    else if (!expected.includes(presented)) {
      problem = `agent identity mismatch at ${c.cfg.target}: expected ${expected.join(" or ")}, presented ${presented}`;
    } else {
      // The pinned agent listens; the call failed anyway: a connection still in backoff from before the
      // agent was there, or the agent refusing this proxy's certificate (the agent's log then says so).
      problem = `the agent at ${c.cfg.target} presents its pinned identity ${presented} but the call failed; if this persists, check that the agent pins this proxy's identity ${certificateFingerprint(this.identity.certificate)} (proxyIdentities)`;
    }
    if (problem !== undefined && problem !== c.identityProblem) {
      const fields = { agent: c.cfg.id, target: c.cfg.target, expected, presented };
      if (presented !== undefined && expected.includes(presented)) this.opts.log.warn(fields, problem);
      else this.opts.log.error(fields, problem);
    }
    c.identityProblem = problem;
    return problem;
  }

  /** Refreshes every agent's health once (concurrent calls share one refresh). */
  refreshHealth(): Promise<void> {
    if (this.closed) return Promise.resolve();
    if (!this.refreshing) {
      this.lastRefreshAt = this.now();
      this.refreshing = Promise.all(this.conns.map((c) => this.checkOne(c))).then(
        () => {
          this.refreshing = undefined;
        },
        () => {
          this.refreshing = undefined;
        },
      );
    }
    return this.refreshing;
  }

  /** A non-blocking refresh soon: now, or (at most one per second) as soon as the last one is 1 s old. */
  private kick(): void {
    if (this.refreshing || this.kickTimer || this.closed) return;
    const wait = 1000 - (this.now() - this.lastRefreshAt);
    if (wait <= 0) {
      void this.refreshHealth();
      return;
    }
    this.kickTimer = setTimeout(() => {
      this.kickTimer = undefined;
      void this.refreshHealth();
    }, wait);
    this.kickTimer.unref();
  }

  healthSnapshot(): AgentHealth[] {
    const now = this.now();
    let stale = false;
    const out = this.conns.map((c) => {
      const h = c.health;
      if (h.checkedAt === undefined || now - h.checkedAt > this.opts.healthRefreshMs * 2) stale = true;
      if (h.checkedAt !== undefined && now - h.checkedAt > HEALTH_MAX_AGE_MS) return { ...h, state: "UNAVAILABLE" as const };
      const keyProblem = h.state === "ACTIVE" ? this.keyChecks.problemOf(c.cfg.id) : undefined;
      if (keyProblem !== undefined) return { ...h, state: "DEGRADED" as const, reason: keyProblem };
      return { ...h };
    });
    if (stale) this.kick();
    return out;
  }
}
