/**
 * Process wiring only: config → agent pool → app → listen, and a graceful close.
 * (The CLI in proxy/cli.ts adds signal handling.)
 */
import { type MetricsListener, startMetricsListener } from "../shared/metrics.ts";
import { ProxyMetrics } from "./metrics.ts";
import { createServer, type Server } from "node:http";
import { createServer as createHttpsServer, type Server as HttpsServer } from "node:https";
import type { AddressInfo, Socket } from "node:net";
import type { Duplex } from "node:stream";
import * as grpc from "@grpc/grpc-js";
import { XksError } from "../shared/errors.ts";
import type { Logger } from "../shared/logging.ts";
import { VERSION } from "../shared/version.ts";
import { AgentPool } from "./agent-client.ts";
import { describeConfig, type ProxyConfig } from "./config.ts";
import { KeyStoreRegistry } from "./routes.ts";
import type { QuotaTaker } from "./app.ts";
import { buildRequestHandler } from "./shed.ts";
import { TlsListener, tlsServerOptions } from "./tls.ts";

export interface RunningProxy {
  server: Server;
  agents: AgentPool;
  keyStores: KeyStoreRegistry;
  /** The listener's TLS (certificate reload, client-name allow-list) when the config has `tls`. */
  tls?: TlsListener;
  /** e.g. http://127.0.0.1:8443, or https://… with `tls` */
  url: string;
  port: number;
  metrics: ProxyMetrics;
  /** http://host:port/metrics when the config has a `metrics` section. */
  metricsUrl?: string;
  /** Stops accepting, lets in-flight requests finish (up to graceMs), closes the agent channels. */
  close(graceMs?: number): Promise<void>;
}

/**
 * Answers on a raw socket (no ServerResponse exists) with the XKS JSON shape, then
 * closes the connection for good: the server is allow-half-open, so a bare end()
 * would leave the socket readable for as long as a hostile client keeps it open.
 */
function answerRaw(socket: Duplex, status: number, reason: string, error: XksError): void {
  const body = JSON.stringify(error.toJSON());
  socket.end(
    `HTTP/1.1 ${status} ${reason}\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`,
  );
  socket.once("finish", () => socket.destroy());
  setTimeout(() => socket.destroy(), 1000).unref();
}

/**
 * A non-HTTP/garbled request, a head over Node's size limit, or a request too slow
 * for headersTimeout/requestTimeout never gets Node's bare 400/408/431; it gets the
 * XKS JSON shape too, and the connection is closed. A connection that timed out
 * without sending a single byte asked nothing: it is just closed (cheapest, when
 * thousands of idle connections expire in the same check).
 */
function answerClientError(err: NodeJS.ErrnoException, socket: Duplex): void {
  const silentTimeout = err.code === "ERR_HTTP_REQUEST_TIMEOUT" && (socket as Socket).bytesRead === 0;
  if (!socket.writable || err.code === "ECONNRESET" || silentTimeout) {
    socket.destroy();
    return;
  }
  answerRaw(socket, 400, "Bad Request", new XksError("ValidationException"));
}

/** How often Node sweeps connections for header/request timeouts: 1/8 of headersTimeout, 50..250 ms. */
export function connectionsCheckingInterval(headersTimeoutMs: number): number {
  return Math.max(50, Math.min(250, Math.floor(headersTimeoutMs / 8)));
}

/** At most this many request headers are parsed (KMS sends a handful; an ALB adds a few X-Forwarded-*). */
export const MAX_HEADERS_COUNT = 100;

let grpcLoggerSet = false;
/** Routes grpc-js's own diagnostics into pino (once per process). */
function routeGrpcLogs(log: Logger): void {
  if (grpcLoggerSet) return;
  grpcLoggerSet = true;
  const l = log.child({ component: "grpc-js" });
  grpc.setLogger({
    error: (...args: unknown[]) => l.warn({ msg: args.map(String).join(" ").slice(0, 500) }),
    info: (...args: unknown[]) => l.debug({ msg: args.map(String).join(" ").slice(0, 500) }),
    debug: (...args: unknown[]) => l.debug({ msg: args.map(String).join(" ").slice(0, 500) }),
  } as unknown as Console);
}

/** What a worker of a multi-process proxy (proxy/cluster.ts) shares with its primary. */
export interface WorkerHooks {
  /** Asked instead of polling agent health itself (AgentPool's `follower`). */
  follower: { requestRefresh(): void };
  /** The key stores' quotas, leased from the primary's buckets. */
  quotas: QuotaTaker;
}

/** Starts the proxy described by `config`. Resolves once it listens. */
export async function serve(
  config: Readonly<ProxyConfig>,
  log: Logger,
  opts: {
    now?: () => number;
    arrival?: () => number;
    /** Run as a worker: health and quotas from the primary, no metrics listener (the primary serves the scrape). */
    worker?: WorkerHooks;
  } = {},
): Promise<RunningProxy> {
  routeGrpcLogs(log);
  const metrics = new ProxyMetrics(config.agents.map((a) => a.id));
  const worker = opts.worker;
  const agents = new AgentPool({
    metrics,
    agents: config.agents,
    identity: config.identity,
    deadlineMs: config.agentDeadlineMs,
    healthDeadlineMs: config.healthDeadlineMs,
    healthRefreshMs: config.healthRefreshMs,
    admission: config.admission,
    log: log.child({ component: "agents" }),
    follower: worker?.follower,
  }).start();
  const keyStores = new KeyStoreRegistry(config.keyStores);
  // Refusals at the door, then the express app (proxy/shed.ts, proxy/app.ts).
  const app = buildRequestHandler({
    config,
    log,
    agents,
    keyStores,
    now: opts.now,
    arrival: opts.arrival,
    metrics,
    quotas: worker?.quotas,
  });
  const h = config.http;
  const httpOptions = {
    // Slow clients (slowloris, a body a byte at a time, connections that never send):
    // the head must be complete within headersTimeout, the whole request within
    // requestTimeout, checked every connectionsCheckingInterval (Node's default, 30 s,
    // would let a timeout overrun by up to 30 s; a short one also spreads the closing
    // of a crowd of idle connections over several small batches). Expiry → clientError.
    headersTimeout: h.headersTimeoutMs,
    requestTimeout: h.requestTimeoutMs,
    connectionsCheckingInterval: connectionsCheckingInterval(h.headersTimeoutMs),
    // Node answers an HTTP/1.1 request without Host with a bare, bodiless 400; let the
    // pipeline answer it instead (a route + SigV4, which needs a signed host → 401 JSON).
    requireHostHeader: false,
  };
  // With `tls`, the same HTTP server behind Node's TLS (https.Server is an http.Server on TLS sockets).
  const server: Server = config.tls
    ? (createHttpsServer({ ...httpOptions, ...tlsServerOptions(config.tls, h.headersTimeoutMs) }, app) as unknown as Server)
    : createServer(httpOptions, app);
  const tls = config.tls ? new TlsListener(server as unknown as HttpsServer, config.tls, log) : undefined;
  // Behind an ALB (idle timeout 60 s) the server must outlive the balancer's keep-alive.
  server.keepAliveTimeout = h.keepAliveTimeoutMs;
  server.maxHeadersCount = MAX_HEADERS_COUNT;
  // Past this many open connections new ones are closed at accept (fd/memory exhaustion).
  server.maxConnections = h.maxConnections;
  server.on("clientError", answerClientError);
  // `Expect: <anything but 100-continue>`: Node would answer a bare 417; the expectation
  // is ignored (RFC 9110 §10.1.1 allows that) and the request takes the normal pipeline.
  server.on("checkExpectation", app);
  // CONNECT never names an API URI; without a listener Node drops the connection unanswered.
  server.on("connect", (_req, socket: Duplex) => answerRaw(socket, 404, "Not Found", new XksError("InvalidUriPathException")));

  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(config.listen.port, config.listen.host, () => {
      server.off("error", reject);
      resolve();
    });
  });
  let metricsListener: MetricsListener | undefined;
  if (config.metrics && !worker) {
    try {
      metricsListener = await startMetricsListener(metrics.registry, config.metrics, log);
    } catch (err) {
      server.close();
      agents.close();
      const code = (err as NodeJS.ErrnoException).code;
      throw new Error(
        `cannot start the metrics listener on ${config.metrics.host}:${config.metrics.port}: ${code === "EADDRINUSE" ? "the port is already in use (set metrics.port)" : (err as Error).message}`,
      );
    }
  }
  const addr = server.address() as AddressInfo;
  const host = addr.family === "IPv6" ? `[${addr.address}]` : addr.address;
  log.info({ version: VERSION, config: describeConfig(config), address: `${host}:${addr.port}` }, "xks-proxy listening");
  log.flush();

  let closing: Promise<void> | undefined;
  const close = (graceMs = 5000): Promise<void> => {
    closing ??= new Promise<void>((resolve) => {
      const force = setTimeout(() => server.closeAllConnections(), graceMs);
      force.unref();
      server.close(() => {
        clearTimeout(force);
        app.refusals.close();
        agents.close();
        if (metricsListener) metricsListener.close().then(resolve);
        else resolve();
      });
      server.closeIdleConnections();
    });
    return closing;
  };
  const scheme = tls ? "https" : "http";
  return {
    server,
    agents,
    keyStores,
    tls,
    url: `${scheme}://${host}:${addr.port}`,
    port: addr.port,
    metrics,
    metricsUrl: metricsListener?.url,
    close,
  };
}
