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
import type { Http2Server, ServerHttp2Session } from "node:http2";
import * as grpc from "@grpc/grpc-js";
import { AGENT_TOKEN_METADATA_KEY, AgentError, REASON_METADATA_KEY, REASONS, errorMessage } from "../shared/errors.ts";
import type { Logger } from "../shared/logging.ts";
import { XksAgentService, type RequestMetadata, type XksAgentHandlers } from "../shared/proto.ts";
import type { AgentOpContext } from "./ops/context.ts";
import { decrypt } from "./ops/decrypt.ts";
import { encrypt } from "./ops/encrypt.ts";
import { getHealthStatus } from "./ops/get-health-status.ts";
import { getKeyMetadata } from "./ops/get-key-metadata.ts";
import type { Controls } from "./controls.ts";
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
}

export interface AgentServiceDeps {
  ctx: AgentOpContext;
  /** The credential the proxy must present on every call. */
  token: string;
  controls: Controls;
  log: Logger;
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
    run: (req: Req) => Res,
    opts: { pausable: boolean; queued: boolean },
  ): grpc.handleUnaryCall<Req, Res> {
    return (call, callback) => {
      const started = process.hrtime.bigint();
      const req = call.request;
      const m = req.metadata;
      const rec: Omit<OperationRecord, "result" | "latencyMs"> = {
        time: new Date().toISOString(),
        operation,
        kmsRequestId: m?.kmsRequestId ?? req.kmsRequestId ?? "",
        kmsOperation: m?.kmsOperation ?? req.kmsOperation ?? "",
        keyId: req.keyId ?? "",
        principal: m?.awsPrincipalArn ?? "",
        kmsKeyArn: m?.kmsKeyArn ?? "",
        viaService: m?.kmsViaService ?? "",
        sourceVpc: m?.awsSourceVpc ?? "",
        sourceVpce: m?.awsSourceVpce ?? "",
        keyStore: m?.keyStore ?? "",
      };
      const finish = (result: string, detail?: string) => {
        const latencyMs = Number(process.hrtime.bigint() - started) / 1e6;
        const full: OperationRecord = { ...rec, result, latencyMs: Math.round(latencyMs * 1000) / 1000 };
        const level = result === "OK" ? "info" : result === "INTERNAL" || result === "HSM_UNAVAILABLE" ? "error" : "warn";
        log[level](
          {
            op: operation,
            kmsRequestId: full.kmsRequestId,
            kmsOperation: full.kmsOperation,
            key: full.keyId,
            principal: full.principal,
            keyStore: full.keyStore,
            latencyMs: full.latencyMs,
            result,
            ...(detail ? { detail } : {}),
          },
          "operation",
        );
        deps.onOperation?.(full);
      };

      if (!authorized(call.metadata.get(AGENT_TOKEN_METADATA_KEY)[0])) {
        finish("UNAUTHENTICATED");
        callback({ code: grpc.status.UNAUTHENTICATED, details: "missing or wrong agent token" });
        return;
      }
      const fail = (err: unknown) => {
        const ae = err instanceof AgentError ? err : new AgentError("INTERNAL", errorMessage(err), { cause: err });
        const md = new grpc.Metadata();
        md.set(REASON_METADATA_KEY, ae.reason);
        finish(ae.reason, ae.message);
        // The status details carry the reason only; the detail stays in the owner's log.
        callback({ code: REASONS[ae.reason].grpc, details: ae.reason, metadata: md });
      };
      const work = () => {
        let res: Res;
        try {
          if (opts.pausable && controls.paused) throw new AgentError("INVALID_STATE", "the owner has paused the agent");
          res = run(req);
        } catch (err) {
          fail(err);
          return;
        }
        finish("OK");
        callback(null, res);
      };
      if (!opts.queued) {
        work();
        return;
      }
      const refused = queue.submit({
        deadline: deadlineOf(call),
        cancelled: () => call.cancelled,
        run: work,
        drop: (why) => {
          finish(why, "dropped before any HSM work: the caller has gone or is out of time");
          // Usually already ended by grpc-js (cancelled, or its deadline timer); then this is a no-op.
          callback({ code: why === "CANCELLED" ? grpc.status.CANCELLED : grpc.status.DEADLINE_EXCEEDED, details: why });
        },
      });
      if (refused) fail(new AgentError("THROTTLING", refused));
    };
  }

  return {
    GetHealthStatus: unary(
      "GetHealthStatus",
      () => {
        if (controls.paused) {
          const h = getHealthStatus(ctx);
          return { ...h, state: "UNAVAILABLE", paused: true, detail: "paused by the owner" };
        }
        return getHealthStatus(ctx);
      },
      // Never behind the queue: health must be answered during a backlog (and tells the truth about the HSM).
      { pausable: false, queued: false },
    ),
    GetKeyMetadata: unary("GetKeyMetadata", (req) => getKeyMetadata(ctx, req), { pausable: true, queued: true }),
    Encrypt: unary("Encrypt", (req) => encrypt(ctx, req), { pausable: true, queued: true }),
    Decrypt: unary("Decrypt", (req) => decrypt(ctx, req), { pausable: true, queued: true }),
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
function widenFlowControlWindow(server: grpc.Server): void {
  const h2servers = (server as unknown as { http2Servers?: Map<Http2Server, unknown> }).http2Servers;
  if (!(h2servers instanceof Map)) throw new Error("grpc-js internals changed: cannot set the HTTP/2 receive window");
  for (const h2 of h2servers.keys()) {
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

export interface AgentServer {
  server: grpc.Server;
  socketPath: string;
  close(graceMs?: number): Promise<void>;
}

/** Serves the agent's gRPC service on a Unix socket in a private directory. */
export async function startAgentServer(socketPath: string, deps: AgentServiceDeps): Promise<AgentServer> {
  preparePrivateSocket(socketPath);
  const server = new grpc.Server({
    "grpc.max_receive_message_length": 1 << 20,
    "grpc.keepalive_permit_without_calls": 1,
    "grpc.http2.min_ping_interval_without_data_ms": 5000,
    "grpc.enable_channelz": 0,
  });
  server.addService(XksAgentService, createAgentService(deps));
  await new Promise<void>((resolve, reject) =>
    server.bindAsync(`unix://${socketPath}`, grpc.ServerCredentials.createInsecure(), (err) => (err ? reject(err) : resolve())),
  );
  chmodSync(socketPath, 0o600);
  widenFlowControlWindow(server);
  return {
    server,
    socketPath,
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
