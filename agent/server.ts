/**
 * The agent's gRPC service: authenticates the proxy, applies the owner's
 * switches, runs one XKS operation per call and maps failures to a gRPC status
 * plus the machine-readable `xks-reason` (shared/errors.ts REASONS).
 * Transport only: the crypto lives in agent/ops/. Key operations go through
 * the work queue (agent/admission.ts): bounded, and never run for a caller
 * that has gone; health calls do not queue.
 */
import { createHash, timingSafeEqual } from "node:crypto";
import { chmodSync, lstatSync, mkdirSync, statSync, unlinkSync } from "node:fs";
import { dirname } from "node:path";
import type { Http2Server, Http2SecureServer, ServerHttp2Session } from "node:http2";
import type { Socket } from "node:net";
import type { TLSSocket } from "node:tls";
import * as grpc from "@grpc/grpc-js";
import { AGENT_TOKEN_METADATA_KEY, AgentError, REASON_METADATA_KEY, REASONS, errorMessage } from "../shared/errors.ts";
import type { Logger } from "../shared/logging.ts";
import { certificateFingerprint, type OwnIdentity, type PinnedIdentity } from "../shared/identity.ts";
import { XksAgentService, type RequestMetadata, type XksAgentHandlers } from "../shared/proto.ts";
import type { AgentOpContext } from "./ops/context.ts";
import { decrypt } from "./ops/decrypt.ts";
import { encrypt } from "./ops/encrypt.ts";
import { getHealthStatus } from "./ops/get-health-status.ts";
import { getKeyMetadata } from "./ops/get-key-metadata.ts";
import { checkKeyRequest, checkLength } from "./ops/validate.ts";
import type { Controls } from "./controls.ts";
import { admitKeyRequest, pauseRefusal, type PolicyNote } from "./policy.ts";
import {
  IV_LENGTHS,
  MAX_CIPHERTEXT_METADATA_BYTES,
  MAX_DATA_BYTES_LIMIT,
  MAX_EXTERNAL_KEY_ID_CHARS,
  MAX_LAYOUT_AAD_BYTES,
  MAX_METADATA_CHARS,
  METADATA_FIELD_COUNT,
  TAG_BYTES,
} from "../shared/xks-spec.ts";
import { WorkQueue } from "./admission.ts";

export type OperationName = "GetHealthStatus" | "GetKeyMetadata" | "Encrypt" | "Decrypt";

/** One record per operation: what the log line, the audit trail and the dashboard receive. Never payloads. */
export interface OperationRecord {
  time: string;
  operation: OperationName;
  kmsRequestId: string;
  kmsOperation: string;
  keyId: string;
  principal: string;
  kmsKeyArn: string;
  viaService: string;
  sourceVpc: string;
  sourceVpce: string;
  keyStore: string;
  result: string; // "OK" or a reason name or "UNAUTHENTICATED"; "CANCELLED"/"DEADLINE_EXCEEDED": dropped before HSM work
  latencyMs: number;
  /** The policy file's rule that decided (agent/policy.ts; "default" when none matched); absent when no rules were evaluated. */
  policyRule?: string;
  /** log-only mode: the rule that would have denied this request (it was not denied). */
  wouldDeny?: string;
  /**
   * With workers (agent/pool.ts): why the primary refused the answer of an operation a worker had done,
   * because the owner's switches changed meanwhile (the record's result is then INVALID_STATE).
   */
  overruled?: string;
  /** GetHealthStatus only: the state it answered (a call that succeeds may answer UNAVAILABLE, e.g. while paused) and why. */
  health?: { state: string; detail: string };
}

export interface AgentServiceDeps {
  ctx: AgentOpContext;
  /** The credential the proxy must present on every call. */
  token: string;
  /** The owner's switches as this process sees them (agent/controls.ts). */
  controls: Pick<Controls, "paused" | "problem">;
  log: Logger;
  /**
   * Records a finished operation before its answer leaves and before its log
   * line; throws (or, when it returns a promise, rejects) when the record
   * could not be written whole, and the call is then refused (INVALID_STATE)
   * whatever its outcome was.
   */
  audit?: (rec: OperationRecord) => void | Promise<void>;
  /** Called once per finished operation (audit log, dashboard feed). */
  onOperation?: (rec: OperationRecord) => void;
  /** Key operations waiting at most (agent/admission.ts); default 256. */
  maxQueued?: number;
  /** The work queue itself (tests); default: a new one with maxQueued. */
  queue?: WorkQueue;
}

/** Default bound of the agent's work queue: at a measured ~0.3 ms per operation, about 80 ms of work. */
export const DEFAULT_MAX_QUEUED = 256;

/** A call's deadline in ms since the epoch (grpc-js gives a Date, or Infinity for none). */
function deadlineOf(call: { getDeadline(): Date | number }): number {
  const d = call.getDeadline();
  return d instanceof Date ? d.getTime() : d;
}

const digest = (s: string | Buffer) => createHash("sha256").update(s).digest();

/**
 * A constant-time check of a presented token against the expected one (both
 * hashed first so lengths never leak; the expected digest is computed once).
 */
export function tokenChecker(expected: string): (presented: unknown) => boolean {
  const want = digest(expected);
  return (presented) => typeof presented === "string" && presented.length > 0 && timingSafeEqual(want, digest(presented));
}

/**
 * A recorded request field, cut to `max` characters with the cut marked. Every
 * field of a record comes from the caller, authenticated or not, valid or not;
 * no record carries more than the longest legal value of a field.
 */
export function capField(value: string | undefined, max: number): string {
  const v = value ?? "";
  return v.length <= max ? v : `${v.slice(0, max)}…[${v.length} chars]`;
}

/** The request fields a log line and an OperationRecord are built from (GetHealthStatus has no key or metadata). */
interface Described {
  keyId?: string;
  metadata?: RequestMetadata | null;
  kmsRequestId?: string;
  kmsOperation?: string;
}

export function createAgentService(deps: AgentServiceDeps): XksAgentHandlers {
  const { ctx, controls, log } = deps;
  const authorized = tokenChecker(deps.token);
  const queue = deps.queue ?? new WorkQueue({ maxQueued: deps.maxQueued ?? DEFAULT_MAX_QUEUED });

  function unary<Req extends Described, Res>(
    operation: OperationName,
    run: (req: Req, note: PolicyNote) => Res,
    opts: { pausable: boolean; queued: boolean; answered?: (res: Res) => Pick<OperationRecord, "health"> },
  ): grpc.handleUnaryCall<Req, Res> {
    return (call, callback) => {
      const started = process.hrtime.bigint();
      const req = call.request;
      const m = req.metadata;
      const md = (v: string | undefined) => capField(v, MAX_METADATA_CHARS);
      const rec: Omit<OperationRecord, "result" | "latencyMs"> = {
        time: new Date().toISOString(),
        operation,
        kmsRequestId: md(m?.kmsRequestId ?? req.kmsRequestId),
        kmsOperation: md(m?.kmsOperation ?? req.kmsOperation),
        keyId: capField(req.keyId, MAX_EXTERNAL_KEY_ID_CHARS),
        principal: md(m?.awsPrincipalArn),
        kmsKeyArn: md(m?.kmsKeyArn),
        viaService: md(m?.kmsViaService),
        sourceVpc: md(m?.awsSourceVpc),
        sourceVpce: md(m?.awsSourceVpce),
        keyStore: md(m?.keyStore),
      };
      const note: PolicyNote = {};
      /**
       * Records the call (audit, then log line, then feed), then calls `done` with the refusal to answer
       * with if the audit record failed. The audit is synchronous in one process; with workers
       * (agent/worker.ts) it resolves when the primary has written the record.
       */
      const finish = (
        result: string,
        detail: string | undefined,
        answered: Pick<OperationRecord, "health"> | undefined,
        done: (refused: AgentError | undefined) => void,
      ): void => {
        const latencyMs = Number(process.hrtime.bigint() - started) / 1e6;
        const full: OperationRecord = { ...rec, ...answered, result, latencyMs: Math.round(latencyMs * 1000) / 1000, ...note };
        const refusal = (err: unknown) => new AgentError("INVALID_STATE", `refused: ${errorMessage(err)}`);
        const recorded = (refused: AgentError | undefined) => {
          const outcome = refused ? "INVALID_STATE" : result;
          const why = refused ? `${refused.message} (the operation's own result was ${result})` : detail;
          // The proxies' background health refreshes (one every few seconds each) are debug when
          // answered: at info they would bury the key operations.
          const level =
            outcome === "OK" && !note.wouldDeny
              ? operation === "GetHealthStatus"
                ? "debug"
                : "info"
              : outcome === "INTERNAL" || outcome === "HSM_UNAVAILABLE" || refused
                ? "error"
                : "warn";
          log[level](
            {
              op: operation,
              kmsRequestId: full.kmsRequestId,
              kmsOperation: full.kmsOperation,
              key: full.keyId,
              principal: full.principal,
              keyStore: full.keyStore,
              latencyMs: full.latencyMs,
              result: outcome,
              ...note,
              ...(why ? { detail: capField(why, MAX_METADATA_CHARS) } : {}),
            },
            "operation",
          );
          deps.onOperation?.(refused ? { ...full, result: outcome } : full);
          done(refused);
        };
        let pending: Promise<void> | undefined;
        try {
          pending = deps.audit?.(full) ?? undefined;
        } catch (err) {
          recorded(refusal(err));
          return;
        }
        if (pending === undefined) recorded(undefined);
        else
          pending.then(
            () => recorded(undefined),
            (err: unknown) => recorded(refusal(err)),
          );
      };
      const refuse = (ae: AgentError) => {
        const md = new grpc.Metadata();
        md.set(REASON_METADATA_KEY, ae.reason);
        // The status details carry the reason only; the detail stays in the owner's log.
        callback({ code: REASONS[ae.reason].grpc, details: ae.reason, metadata: md });
      };

      if (!authorized(call.metadata.get(AGENT_TOKEN_METADATA_KEY)[0])) {
        finish("UNAUTHENTICATED", undefined, undefined, () =>
          callback({ code: grpc.status.UNAUTHENTICATED, details: "missing or wrong agent token" }),
        );
        return;
      }
      const fail = (err: unknown) => {
        const ae = err instanceof AgentError ? err : new AgentError("INTERNAL", errorMessage(err), { cause: err });
        finish(ae.reason, ae.message, undefined, (refused) => refuse(refused ?? ae));
      };
      const work = () => {
        let res: Res;
        try {
          const paused = opts.pausable ? pauseRefusal(controls.paused) : undefined;
          if (paused) throw new AgentError(paused.reason, paused.why);
          res = run(req, note);
        } catch (err) {
          fail(err);
          return;
        }
        finish("OK", undefined, opts.answered?.(res), (refused) => {
          if (refused) refuse(refused);
          else callback(null, res);
        });
      };
      if (!opts.queued) {
        work();
        return;
      }
      const refused = queue.submit({
        deadline: deadlineOf(call),
        cancelled: () => call.cancelled,
        run: work,
        drop: (why) =>
          finish(why, "dropped before any HSM work: the caller has gone or is out of time", undefined, () =>
            // Usually already ended by grpc-js (cancelled, or its deadline timer); then this is a no-op.
            callback({ code: why === "CANCELLED" ? grpc.status.CANCELLED : grpc.status.DEADLINE_EXCEEDED, details: why }),
          ),
      });
      if (refused) fail(new AgentError("THROTTLING", refused));
    };
  }

  return {
    GetHealthStatus: unary(
      "GetHealthStatus",
      (req) => {
        checkLength("kmsRequestId", req.kmsRequestId, MAX_METADATA_CHARS);
        checkLength("kmsOperation", req.kmsOperation, MAX_METADATA_CHARS);
        if (controls.paused) {
          const h = getHealthStatus(ctx);
          const detail = controls.problem ? `paused (fix: xks-agent resume): ${controls.problem}` : "paused by the owner";
          return { ...h, state: "UNAVAILABLE", paused: true, detail: detail.slice(0, 300) };
        }
        return getHealthStatus(ctx);
      },
      // Never behind the queue: health must be answered during a backlog (and tells the truth about the HSM).
      { pausable: false, queued: false, answered: (h) => ({ health: { state: h.state, detail: h.detail } }) },
    ),
    // Every key operation: its request checked (ops/validate.ts), then the owner's policy (policy.ts: the
    // allow-list for the key store it arrived on, then the policy file's rules), before any HSM work; key
    // operations wait in the bounded work queue.
    GetKeyMetadata: unary(
      "GetKeyMetadata",
      (req, note) => getKeyMetadata(ctx, req, admitKeyRequest(ctx, req, checkKeyRequest(req), note)),
      { pausable: true, queued: true },
    ),
    Encrypt: unary("Encrypt", (req, note) => encrypt(ctx, req, admitKeyRequest(ctx, req, checkKeyRequest(req), note)), {
      pausable: true,
      queued: true,
    }),
    Decrypt: unary("Decrypt", (req, note) => decrypt(ctx, req, admitKeyRequest(ctx, req, checkKeyRequest(req), note)), {
      pausable: true,
      queued: true,
    }),
  };
}

/**
 * Prepares a private directory (0700, owned by us) for the agent's socket and
 * removes a stale socket file left by a previous run.
 */
export function preparePrivateSocket(socketPath: string): void {
  const dir = dirname(socketPath);
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const st = statSync(dir);
  if (typeof process.getuid === "function" && st.uid !== process.getuid()) {
    throw new Error(`socket directory ${dir} is not owned by this user`);
  }
  if ((st.mode & 0o077) !== 0) chmodSync(dir, 0o700);
  try {
    if (lstatSync(socketPath).isSocket()) unlinkSync(socketPath);
    else throw new Error(`${socketPath} exists and is not a socket`);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== "ENOENT") throw err;
  }
}

/**
 * The largest request message the agent accepts: the largest legal Decrypt or
 * Encrypt (data at the proxy's configurable maximum, AAD at the layout's
 * maximum, every metadata string at the spec's longest value in UTF-8, at most
 * 3 bytes per UTF-16 unit, a key id, IV, tag and ciphertext metadata) plus 1 KiB
 * for protobuf framing. Larger messages are refused by grpc-js
 * (RESOURCE_EXHAUSTED) before they are decoded.
 */
export const MAX_REQUEST_MESSAGE_BYTES =
  MAX_DATA_BYTES_LIMIT +
  MAX_LAYOUT_AAD_BYTES +
  METADATA_FIELD_COUNT * MAX_METADATA_CHARS * 3 +
  MAX_EXTERNAL_KEY_ID_CHARS +
  Math.max(...IV_LENGTHS) +
  TAG_BYTES +
  MAX_CIPHERTEXT_METADATA_BYTES +
  1024;

/**
 * Concurrent HTTP/2 streams (calls) per connection. The agent runs calls one
 * at a time on its JS thread (about 3,400 calls/s over gRPC, README
 * "Performance"), so 128 calls in flight are already ~40 ms of queued work; a
 * client with more outstanding waits for a free stream on its side. The cap
 * bounds what one connection can make the agent hold: 128 requests of at most
 * MAX_REQUEST_MESSAGE_BYTES each.
 */
export const MAX_CONCURRENT_STREAMS = 128;

/** The HTTP/2 connection-level receive window the agent advertises (the default is 64 KiB). */
const RECEIVE_WINDOW_BYTES = 8 << 20;

/**
 * Lets a burst of requests cross without waiting for WINDOW_UPDATEs: with the
 * default 64 KiB connection window, a few dozen large requests fill it and the
 * rest wait until the proxy's event loop, busy with that same burst, reads the
 * update, which cost ~100 ms stalls in a 200-request burst. grpc-js has no
 * server option for it, so the window is widened on each new HTTP/2 session of
 * its (internal, pinned grpc-js 1.14.7) http2 servers.
 */
function widenFlowControlWindow(h2servers: Http2Server[]): void {
  for (const h2 of h2servers) {
    h2.on("session", (session: ServerHttp2Session) => {
      session.once("localSettings", () => {
        try {
          session.setLocalWindowSize(RECEIVE_WINDOW_BYTES);
        } catch {
          /* the session is already closing */
        }
      });
    });
  }
}

/** The HTTP/2 servers grpc-js made for its bound ports (internal, pinned grpc-js 1.14.7). */
function http2ServersOf(server: grpc.Server): Http2Server[] {
  const h2servers = (server as unknown as { http2Servers?: Map<Http2Server, unknown> }).http2Servers;
  if (!(h2servers instanceof Map)) throw new Error("grpc-js internals changed: cannot reach its HTTP/2 servers");
  return [...h2servers.keys()];
}

/** This agent's identity and the proxies it accepts, as the channel's TLS uses them. */
export interface ChannelIdentity {
  identity: OwnIdentity & { fingerprint: string };
  pins: readonly PinnedIdentity[];
}

/**
 * The server's TLS material, swappable at run time through grpc-js's
 * certificate-provider interface: new connections use the latest identity and
 * pins; established ones keep theirs.
 */
class ChannelIdentityProvider implements grpc.experimental.CertificateProvider {
  private readonly caListeners = new Set<grpc.experimental.CaCertificateUpdateListener>();
  private readonly identityListeners = new Set<grpc.experimental.IdentityCertificateUpdateListener>();
  constructor(private id: ChannelIdentity) {}

  private ca(): grpc.experimental.CaCertificateUpdate {
    return { caCertificate: Buffer.from(this.id.pins.map((p) => p.certificate).join("\n")) };
  }
  private own(): grpc.experimental.IdentityCertificateUpdate {
    return { certificate: Buffer.from(this.id.identity.certificate), privateKey: Buffer.from(this.id.identity.key) };
  }
  set(id: ChannelIdentity): void {
    this.id = id;
    for (const l of this.caListeners) l(this.ca());
    for (const l of this.identityListeners) l(this.own());
  }
  addCaCertificateListener(l: grpc.experimental.CaCertificateUpdateListener): void {
    this.caListeners.add(l);
    l(this.ca());
  }
  removeCaCertificateListener(l: grpc.experimental.CaCertificateUpdateListener): void {
    this.caListeners.delete(l);
  }
  addIdentityCertificateListener(l: grpc.experimental.IdentityCertificateUpdateListener): void {
    this.identityListeners.add(l);
    l(this.own());
  }
  removeIdentityCertificateListener(l: grpc.experimental.IdentityCertificateUpdateListener): void {
    this.identityListeners.delete(l);
  }
}

/**
 * Logs a client that failed the TLS handshake, naming the identity it
 * presented (if any) and the pinned ones; at most one line per presented
 * identity per minute, so a peer retrying every 100 ms does not flood the log.
 */
function logRefusedPeers(h2servers: Http2Server[], pins: () => readonly PinnedIdentity[], log: Logger): void {
  const lastLogged = new Map<string, number>();
  for (const h2 of h2servers) {
    (h2 as unknown as Http2SecureServer).on("tlsClientError", (err: Error, socket: TLSSocket) => {
      let presented = "none";
      try {
        const cert = socket.getPeerCertificate(false);
        if (cert?.raw) presented = certificateFingerprint(cert.raw);
      } catch {
        /* no certificate */
      }
      const now = Date.now();
      if ((lastLogged.get(presented) ?? 0) > now - 60_000) return;
      lastLogged.set(presented, now);
      if (lastLogged.size > 100) lastLogged.clear();
      log.error(
        { presented, expected: pins().map((p) => p.fingerprint), why: err.message.slice(0, 200) },
        "refused a gRPC client: it did not present a pinned proxy identity",
      );
    });
  }
}

export interface AgentServer {
  server: grpc.Server;
  socketPath: string;
  /** Swaps this agent's identity and the pinned proxy identities for new connections (rotation without restart). */
  setIdentity(id: ChannelIdentity): void;
  close(graceMs?: number): Promise<void>;
}

/**
 * Serves the agent's gRPC service over mutual TLS on a Unix socket in a private
 * directory. The agent presents its certificate, and a client must present one
 * of the pinned proxy certificates (they are the only trust anchors; each is
 * self-signed) or the handshake fails before any gRPC frame: an unpinned peer
 * sends no request and receives nothing.
 */
export async function startAgentServer(socketPath: string, deps: AgentServiceDeps, id: ChannelIdentity): Promise<AgentServer> {
  preparePrivateSocket(socketPath);
  const g = newAgentGrpcServer(deps, id);
  await new Promise<void>((resolve, reject) =>
    g.server.bindAsync(`unix://${socketPath}`, g.creds, (err) => (err ? reject(err) : resolve())),
  );
  g.ready();
  chmodSync(socketPath, 0o600);
  return { server: g.server, socketPath, setIdentity: g.setIdentity, close: g.close };
}

/** The agent's gRPC service on connections handed to it (agent/worker.ts): the same service, TLS and peer checks as startAgentServer. */
export interface InjectedAgentServer {
  server: grpc.Server;
  /** Serves one accepted connection (TLS handshake first, as on the socket). */
  inject(socket: Socket): void;
  setIdentity(id: ChannelIdentity): void;
  close(graceMs?: number): Promise<void>;
}

export function startInjectedAgentServer(deps: AgentServiceDeps, id: ChannelIdentity): InjectedAgentServer {
  const g = newAgentGrpcServer(deps, id);
  const injector = g.server.createConnectionInjector(g.creds);
  g.ready();
  return { server: g.server, inject: (socket) => injector.injectConnection(socket), setIdentity: g.setIdentity, close: g.close };
}

/** A grpc-js server with the agent's service and channel credentials; `ready()` once its HTTP/2 servers exist. */
function newAgentGrpcServer(deps: AgentServiceDeps, id: ChannelIdentity) {
  const server = new grpc.Server({
    "grpc.max_receive_message_length": MAX_REQUEST_MESSAGE_BYTES,
    "grpc.max_concurrent_streams": MAX_CONCURRENT_STREAMS,
    "grpc.keepalive_permit_without_calls": 1,
    "grpc.http2.min_ping_interval_without_data_ms": 5000,
    "grpc.enable_channelz": 0,
  });
  server.addService(XksAgentService, createAgentService(deps));
  const provider = new ChannelIdentityProvider(id);
  const creds = grpc.experimental.createCertificateProviderServerCredentials(provider, provider, true);
  let current = id;
  return {
    server,
    creds,
    ready() {
      // grpc-js registers its watcher only after our provider's first answers, so the
      // material is handed over once more now that its HTTP/2 servers exist.
      provider.set(current);
      const h2servers = http2ServersOf(server);
      widenFlowControlWindow(h2servers);
      logRefusedPeers(h2servers, () => current.pins, deps.log);
    },
    setIdentity(next: ChannelIdentity) {
      provider.set(next);
      current = next;
    },
    close: (graceMs = 2000) =>
      new Promise<void>((resolve) => {
        const timer = setTimeout(() => {
          server.forceShutdown();
          resolve();
        }, graceMs);
        server.tryShutdown(() => {
          clearTimeout(timer);
          resolve();
        });
      }),
  };
}
