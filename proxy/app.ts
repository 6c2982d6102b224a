/**
 * buildApp(deps): the XKS proxy's express application, without listen()
 * (proxy/main.ts does the process wiring).
 *
 * Request pipeline, in this order:
 *   1. request log state + one completion line per request (allow-listed fields only)
 *   2. GET /ping                                  → 200 "pong from xks-proxy <version>" (no auth): liveness
 *      GET /ready                                 → 200 / 503 from the agent health cache (no auth): readiness
 *   3. resolve the route on the raw path          → 404 InvalidUriPathException (before any auth)
 *      non-POST on an API URI                     → 405 (METHOD_NOT_ALLOWED: no errorName, Allow: POST)
 *   4. read the raw body (hard cap, no inflation) → 501 UnsupportedOperationException if over the cap
 *   5. SigV4 over the raw bytes                   → 401 AuthenticationFailedException
 *   6. Content-Type, JSON, per-operation fields   → 400 ValidationException / 501 for sizes
 *   7. key allow-list of the key store            → 404 KeyNotFoundException
 *   8. the operation: ONE agent call (or the health cache)
 *   9. ONE error middleware, last: every failure becomes compact {"errorName","errorMessage"} JSON
 *      (the 405 gets METHOD_NOT_ALLOWED's {"errorMessage"}).
 *
 * Every request has a budget (requestBudgetMs) from its arrival (proxy/admission.ts):
 * a key operation that cannot finish inside it is refused with 429 ThrottlingException
 * at once, before its body is read (agent queue too deep) or right after SigV4 (its key
 * store's quota is spent), and a success is never written after the budget.
 */
import type { IncomingMessage, ServerResponse } from "node:http";
import express, { type NextFunction, type Request, type Response } from "express";
import { METHOD_NOT_ALLOWED, XKS_ERRORS, XksError, errorMessage, type XksErrorName } from "../shared/errors.ts";
import type { Logger } from "../shared/logging.ts";
import { VERSION } from "../shared/version.ts";
import { MAX_EXTERNAL_KEY_ID_CHARS, MAX_METADATA_CHARS } from "../shared/xks-spec.ts";
import { Budget, LoopClock, monotonic, type QuotaConfig, QuotaSet, ThrottledError, throttled } from "./admission.ts";
import type { AgentApi } from "./agent-client.ts";
import type { Limits, ProxyConfig } from "./config.ts";
import type { HandlerContext } from "./handlers/context.ts";
import { decrypt, parseDecryptRequest } from "./handlers/decrypt.ts";
import { encrypt, parseEncryptRequest } from "./handlers/encrypt.ts";
import { getHealthStatus, parseGetHealthStatusRequest } from "./handlers/get-health-status.ts";
import { getKeyMetadata, parseGetKeyMetadataRequest } from "./handlers/get-key-metadata.ts";
import { KeyStoreRegistry, parseXksPath, splitTarget, type Operation, type ParsedPath } from "./routes.ts";
import type { AdmissionRefusal, ProxyMetrics, SigV4FailureReason } from "./metrics.ts";
import { SigV4Error, verifySigV4 } from "./sigv4.ts";
import { parseJsonBody, peekRequestId, type Json, type WireRequestMetadata } from "./validate.ts";

export interface AppDeps {
  config: Readonly<ProxyConfig>;
  log: Logger;
  agents: AgentApi;
  /** Key stores by prefix; defaults to config.keyStores. Pass one to swap stores at runtime (SIGHUP reload). */
  keyStores?: KeyStoreRegistry;
  /** Clock for SigV4's ±5 minutes (tests). */
  now?: () => number;
  /**
   * A request's arrival on the performance.now() clock, taken when it is first seen. Default:
   * LoopClock (the proxy's own event loop). In-process tests share the loop with their client,
   * whose work is not the proxy's queue: they pass performance.now.
   */
  arrival?: () => number;
  /** Where the pipeline counts requests, refusals and latencies (proxy/metrics.ts); none in some tests. */
  metrics?: ProxyMetrics;
  /** The key stores' quotas; default: this process's own buckets (a proxy worker passes leases from its primary). */
  quotas?: QuotaTaker;
}

/** Takes one request's token from a key store's quota: true when there was one (or the store has none). */
export interface QuotaTaker {
  take(prefix: string, quota: Readonly<QuotaConfig> | undefined): boolean | Promise<boolean>;
}

/** Per-request state behind the completion log line. Only allow-listed, non-secret fields. */
interface RequestState {
  start: bigint;
  /** Arrival on the monotonic clock (performance.now(), LoopClock): the budget's start. */
  arrivedAt: number;
  /** When the handler first saw it (performance.now()). */
  seenAt: number;
  operation?: Operation;
  keyStore?: string;
  key?: string;
  kmsRequestId?: string;
  kmsOperation?: string;
  principal?: string;
  accessKeyId?: string;
  agent?: string;
  errorName?: string;
  detail?: string;
  /** The path named a configured key store (step 3 passed). */
  routed?: boolean;
  /** Why admission refused it, or which SigV4 rule failed (for metrics). */
  refusal?: AdmissionRefusal;
  sigv4?: SigV4FailureReason;
}

function state(res: Response): RequestState {
  return res.locals.xks as RequestState;
}

/** A non-POST method on an API URI: answered with the catalogue's METHOD_NOT_ALLOWED. */
class MethodNotAllowedError extends Error {
  constructor(method: string) {
    super(`method ${method.slice(0, 16)} not allowed`);
    this.name = "MethodNotAllowedError";
  }
}
const METHOD_NOT_ALLOWED_BODY = JSON.stringify(METHOD_NOT_ALLOWED.body);

/**
 * A body over limits.maxBodyBytes. Answered as 501 UnsupportedOperationException:
 * the spec's name for "a parameter exceeds the implementation's max size"
 * (the cap sits above what the per-field limits admit), and XKS has no 413.
 */
class BodyTooLargeError extends XksError {
  constructor(declared?: number) {
    super("UnsupportedOperationException", `body larger than limits.maxBodyBytes${declared ? ` (Content-Length ${declared})` : ""}`);
  }
}

/** A request body validated by its operation's parser, bound to that operation's handler. */
interface ParsedOperation {
  metadata: WireRequestMetadata;
  run(ctx: HandlerContext): Promise<object>;
}

/** Pairs an operation's parser with its handler; their input type is checked here and needs no cast. */
function op<I extends { metadata: WireRequestMetadata }>(
  parse: (body: Json, limits: Limits) => I,
  run: (input: I, ctx: HandlerContext) => Promise<object>,
): (body: Json, limits: Limits) => ParsedOperation {
  return (body, limits) => {
    const input = parse(body, limits);
    return { metadata: input.metadata, run: (ctx) => run(input, ctx) };
  };
}

/** The four XKS operations: validation + logic, one module each under proxy/handlers/. */
const OPERATIONS: Record<Operation, (body: Json, limits: Limits) => ParsedOperation> = {
  GetKeyMetadata: op(parseGetKeyMetadataRequest, getKeyMetadata),
  Encrypt: op(parseEncryptRequest, encrypt),
  Decrypt: op(parseDecryptRequest, decrypt),
  GetHealthStatus: op(parseGetHealthStatusRequest, getHealthStatus),
};

/** Compact JSON, written directly (no content negotiation or ETag work: XKS answers are never cached). */
function sendJson(res: ServerResponse, status: number, body: object | string, headers: Record<string, string> = {}): void {
  const text = typeof body === "string" ? body : JSON.stringify(body);
  res.writeHead(status, {
    "content-type": "application/json; charset=utf-8",
    "content-length": String(Buffer.byteLength(text)),
    ...headers,
  });
  res.end(text);
}

/** A request body stream failed (client went away, or it is encoded): the spec's ValidationException. */
class BodyReadError extends XksError {
  constructor(detail: string) {
    super("ValidationException", `body: ${detail}`);
  }
}

/**
 * Reads the request body as raw bytes, at most `limit` of them. A declared
 * Content-Length over the cap is refused before a byte is read; a chunked
 * body that grows past it is refused as soon as it does. Content-Encoding is
 * never inflated (KMS does not compress; this also stops decompression bombs).
 */
function readRawBody(req: IncomingMessage, limit: number): Promise<Buffer> {
  const declared = Number(req.headers["content-length"] ?? 0);
  if (declared > limit) return Promise.reject(new BodyTooLargeError(declared));
  const encoding = (req.headers["content-encoding"] ?? "identity").toLowerCase();
  if (encoding !== "identity") return Promise.reject(new BodyReadError("encoding.unsupported"));
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    let done = false;
    const finish = (err: Error | undefined, value?: Buffer) => {
      if (done) return;
      done = true;
      req.off("data", onData).off("end", onEnd).off("error", onError).off("aborted", onAborted);
      if (err) {
        req.pause();
        reject(err);
      } else resolve(value!);
    };
    const onData = (chunk: Buffer) => {
      size += chunk.length;
      if (size > limit) finish(new BodyTooLargeError());
      else chunks.push(chunk);
    };
    const onEnd = () => finish(undefined, chunks.length === 1 ? chunks[0] : Buffer.concat(chunks, size));
    const onError = () => finish(new BodyReadError("request.aborted"));
    const onAborted = () => finish(new BodyReadError("request.aborted"));
    req.on("data", onData).on("end", onEnd).on("error", onError).on("aborted", onAborted);
  });
}

/** Maps anything thrown to the XKS error it is on the wire. */
function toXksError(err: unknown): XksError {
  if (err instanceof XksError) return err;
  // Errors raised by express/Node for a malformed request carry a 4xx status.
  const status = (err as { status?: unknown })?.status;
  if (typeof status === "number" && status >= 400 && status < 500) {
    return new XksError("ValidationException", errorMessage(err).slice(0, 200), { cause: err });
  }
  return new XksError("InternalException", errorMessage(err).slice(0, 200), { cause: err });
}

/**
 * The proxy's request pipeline: the express app (health endpoints, and every
 * request the fast path does not take) and `serveXks`, which runs steps 1 and
 * 3–9 for a POST to a configured key store's XKS path without express (its
 * router, request/response prototypes and error dispatch cost CPU on every
 * KMS request and decide nothing there). Both run the same steps, in the same
 * order, with the same quotas.
 */
export interface Pipeline {
  app: express.Express;
  /** A POST whose raw path `parsed` names an XKS operation of a configured key store. */
  serveXks(req: IncomingMessage, res: ServerResponse, path: string, query: string, parsed: ParsedPath): void;
}

export function buildApp(deps: AppDeps): express.Express {
  return buildPipeline(deps).app;
}

export function buildPipeline(deps: AppDeps): Pipeline {
  const { config, log, agents, metrics } = deps;
  const registry = deps.keyStores ?? new KeyStoreRegistry(config.keyStores);
  const now = deps.now ?? Date.now;
  const quotas: QuotaTaker = deps.quotas ?? new QuotaSet();
  const loop = new LoopClock();
  const arrival = deps.arrival ?? (() => loop.arrival());

  /** 1. The request's state and its one completion line (level from the status); `probe`: a load balancer's path. */
  function track(req: IncomingMessage, res: ServerResponse, path: string, probe?: "/ping" | "/ready"): RequestState {
    const st: RequestState = { start: process.hrtime.bigint(), arrivedAt: arrival(), seenAt: performance.now() };
    const counted = metrics !== undefined && probe === undefined;
    if (counted) metrics.requestStarted();
    res.once("close", () => {
      const latencyMs = Math.round(Number(process.hrtime.bigint() - st.start) / 1e4) / 100;
      // 499 (nginx's "client closed request") when the client left before any answer.
      const status = res.headersSent ? res.statusCode : 499;
      const line = {
        kmsRequestId: st.kmsRequestId,
        operation: st.operation,
        kmsOperation: st.kmsOperation,
        keyStore: st.keyStore,
        key: st.key,
        principal: st.principal,
        accessKeyId: st.accessKeyId,
        agent: st.agent,
        method: req.method,
        path: path.slice(0, 300),
        status,
        errorName: st.errorName,
        detail: st.detail,
        latencyMs,
        aborted: res.writableFinished ? undefined : true,
      };
      if (counted) {
        const error = status === 499 ? "ClientClosedRequest" : st.errorName;
        metrics.requestDone({
          operation: st.operation,
          keyStore: st.keyStore,
          authenticated: st.accessKeyId !== undefined,
          routed: st.routed === true,
          error,
          start: st.start,
        });
        if (st.refusal) metrics.admissionRefused(st.refusal);
        if (st.sigv4) metrics.sigv4Failed(st.sigv4);
      }
      // A load balancer polls these every few seconds; agent health changes have log lines of their own.
      if ((probe === "/ping" && status < 400) || probe === "/ready") log.debug(line, "request");
      else if (status >= 500) log.error(line, "request");
      else if (status >= 400) log.warn(line, "request");
      else log.info(line, "request");
    });
    return st;
  }

  /** 3–8. Everything after the health endpoints; a rejection is answered by `answerError`. */
  async function pipeline(
    req: IncomingMessage,
    res: ServerResponse,
    st: RequestState,
    path: string,
    query: string,
    parsed: ParsedPath | undefined,
  ): Promise<void> {
    // 3. Route resolution on the raw path, before anything reads the body or checks a signature.
    const store = parsed ? registry.get(parsed.prefix) : undefined;
    if (!parsed || !store) throw new XksError("InvalidUriPathException", "no such key store or API path");
    st.operation = parsed.operation;
    st.keyStore = parsed.prefix;
    st.routed = true;
    // The log line's copy is cut (and marked); the key id itself is never cut, see step 6.
    st.key =
      parsed.keyId !== undefined && parsed.keyId.length > MAX_EXTERNAL_KEY_ID_CHARS
        ? `${parsed.keyId.slice(0, MAX_EXTERNAL_KEY_ID_CHARS)}…[${parsed.keyId.length} chars]`
        : parsed.keyId;
    const method = req.method ?? "";
    if (method !== "POST") throw new MethodNotAllowedError(method);

    // The budget: a key operation the agents cannot finish in time is refused now, before any work.
    const budget = new Budget(st.arrivedAt, config.requestBudgetMs, monotonic, st.seenAt);
    const keyOperation = parsed.operation !== "GetHealthStatus";
    if (keyOperation) {
      const why = agents.refusal?.(budget);
      if (why) throw throttled(why, "agent_queue");
    }

    // 4. The raw body, any content type, capped, never inflated (the bytes SigV4 covers).
    const body = await readRawBody(req, config.limits.maxBodyBytes);

    // 5. SigV4 over those bytes, with this key store's credentials.
    const { accessKeyId } = verifySigV4(
      { method, path, query, rawHeaders: req.rawHeaders, body },
      { region: config.region, credentials: store.credentials, now: now() },
    );
    st.accessKeyId = accessKeyId;
    // The key store's quota, spent only by its own authenticated callers' key operations (health is
    // answered from a cache and is how KMS decides whether the store is connected at all).
    if (keyOperation) {
      let token = quotas.take(store.uriPathPrefix, store.quota);
      if (typeof token !== "boolean") token = await token;
      if (!token) throw throttled("key store quota exceeded", "quota");
    }

    // 6. Content type, JSON, the operation's fields.
    const operation = parsed.operation;
    const json = parseJsonBody(body, req.headers["content-type"]);
    st.kmsRequestId = peekRequestId(json);
    const validated = OPERATIONS[operation](json, config.limits);
    st.kmsOperation = validated.metadata.kmsOperation.slice(0, 64);
    st.principal = validated.metadata.awsPrincipalArn ? validated.metadata.awsPrincipalArn.slice(0, MAX_METADATA_CHARS) : undefined;

    // An externalKeyId is at most MAX_EXTERNAL_KEY_ID_CHARS (spec §1.2); a longer one is invalid input.
    const keyId = parsed.keyId ?? "";
    if (keyId.length > MAX_EXTERNAL_KEY_ID_CHARS) {
      throw new XksError("ValidationException", `key id is ${keyId.length} characters, more than ${MAX_EXTERNAL_KEY_ID_CHARS}`);
    }

    // 7. The key store's allow-list.
    if (operation !== "GetHealthStatus" && !store.keys.includes(keyId)) {
      throw new XksError("KeyNotFoundException", "key not in the key store's allow-list");
    }

    // 8. The operation: one agent call (or the health cache), inside the budget. A client
    // that goes away takes its call with it (out of the queue, or cancelled at the agent).
    const gone = new AbortController();
    const onClose = () => {
      if (!res.writableFinished) gone.abort();
    };
    res.once("close", onClose);
    const callOpts = { budget, signal: gone.signal };
    const ctx: HandlerContext = {
      agents: keyOperation
        ? { call: (method, request) => agents.call(method, request, callOpts), healthSnapshot: () => agents.healthSnapshot() }
        : agents,
      keyStore: store.uriPathPrefix,
      keyId,
      limits: config.limits,
      fleetSize: config.fleetSize,
      vendor: config.vendor,
      ekmVendor: config.ekmVendor,
      served: (agentId) => {
        st.agent = agentId;
      },
    };
    const answer = await validated.run(ctx);
    res.off("close", onClose);
    // Never a success after the budget: KMS has stopped waiting, so the answer is the spec's "did not answer in time".
    if (keyOperation && budget.remaining() < 0) {
      throw new XksError("DependencyTimeoutException", `answer ready ${budget.elapsed().toFixed(1)} ms after arrival, past the budget`);
    }
    sendJson(res, 200, answer);
  }

  /** 9. The one error handler. Wire bodies carry only the name and its fixed message. */
  function answerError(err: unknown, res: ServerResponse, st: RequestState): void {
    if (res.headersSent) {
      st.detail = `error after headers were sent: ${errorMessage(err).slice(0, 200)}`;
      res.destroy();
      return;
    }
    if (err instanceof MethodNotAllowedError) {
      st.errorName = "MethodNotAllowed";
      st.detail = err.message;
      sendJson(res, METHOD_NOT_ALLOWED.status, METHOD_NOT_ALLOWED_BODY, METHOD_NOT_ALLOWED.headers);
      return;
    }
    const xe = toXksError(err);
    if (xe instanceof ThrottledError) st.refusal = xe.reason;
    if (xe instanceof SigV4Error) st.sigv4 = xe.reason;
    const name: XksErrorName = xe.errorName;
    st.errorName = name;
    st.detail = xe.message === name ? undefined : xe.message.slice(0, 300);
    // Do not keep reading (or keep alive) a connection whose body we refused.
    sendJson(res, XKS_ERRORS[name].status, xe.toJSON(), xe instanceof BodyTooLargeError ? { connection: "close" } : {});
  }

  const app = express();
  app.disable("x-powered-by");
  app.set("etag", false);
  app.set("query parser", false);

  app.use((req: Request, res: Response, next: NextFunction) => {
    const probe = req.path === "/ping" || req.path === "/ready" ? req.path : undefined;
    res.locals.xks = track(req, res, splitTarget(req.originalUrl).path, probe);
    next();
  });

  // 2. Load balancer health check, unauthenticated.
  app.get("/ping", (_req, res) => {
    res.type("text/plain").send(`pong from xks-proxy ${VERSION}`);
  });

  // Readiness for a load balancer's target group: serving needs at least one agent that the
  // health cache does not report UNAVAILABLE. Counts only; no agent ids, keys or reasons.
  app.get("/ready", (_req, res) => {
    const health = agents.healthSnapshot();
    const usable = health.filter((h) => h.state !== "UNAVAILABLE").length;
    const ready = usable > 0;
    sendJson(res, ready ? 200 : 503, { ready, agents: health.length, usableAgents: usable }, { "cache-control": "no-store" });
  });

  // 3–8. One handler for every other request (one router layer instead of five; the steps stay in order).
  app.use((req: Request, res: Response) => {
    const { path, query } = splitTarget(req.originalUrl);
    return pipeline(req, res, state(res), path, query, parseXksPath(path));
  });

  app.use((err: unknown, _req: Request, res: Response, _next: NextFunction) => {
    answerError(err, res, state(res) ?? { start: process.hrtime.bigint(), arrivedAt: performance.now(), seenAt: performance.now() });
  });

  return {
    app,
    serveXks(req, res, path, query, parsed) {
      const st = track(req, res, path);
      pipeline(req, res, st, path, query, parsed).catch((err: unknown) => answerError(err, res, st));
    },
  };
}
