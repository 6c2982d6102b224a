/**
 * Process wiring only: config → agent pool → app → listen, and a graceful close.
 * (The CLI in proxy/cli.ts adds signal handling.)
 */
import { createServer, type Server } from "node:http";
import type { AddressInfo, Socket } from "node:net";
import * as grpc from "@grpc/grpc-js";
import { XksError } from "../shared/errors.ts";
import type { Logger } from "../shared/logging.ts";
import { VERSION } from "../shared/version.ts";
import { AgentPool } from "./agent-client.ts";
import { buildApp } from "./app.ts";
import { describeConfig, type ProxyConfig } from "./config.ts";
import { KeyStoreRegistry } from "./routes.ts";

export interface RunningProxy {
  server: Server;
  agents: AgentPool;
  keyStores: KeyStoreRegistry;
  /** e.g. http://127.0.0.1:8443 */
  url: string;
  port: number;
  /** Stops accepting, lets in-flight requests finish (up to graceMs), closes the agent channels. */
  close(graceMs?: number): Promise<void>;
}

/** A non-HTTP/garbled request never gets Node's bare 400; it gets the XKS JSON shape too. */
function answerClientError(err: NodeJS.ErrnoException, socket: Socket): void {
  if (!socket.writable || err.code === "ECONNRESET") {
    socket.destroy();
    return;
  }
  const body = JSON.stringify(new XksError("ValidationException").toJSON());
  socket.end(
    `HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`,
  );
}

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

/** Starts the proxy described by `config`. Resolves once it listens. */
export async function serve(config: Readonly<ProxyConfig>, log: Logger, opts: { now?: () => number } = {}): Promise<RunningProxy> {
  routeGrpcLogs(log);
  const agents = new AgentPool({
    agents: config.agents,
    deadlineMs: config.agentDeadlineMs,
    healthDeadlineMs: config.healthDeadlineMs,
    healthRefreshMs: config.healthRefreshMs,
    log: log.child({ component: "agents" }),
  }).start();
  const keyStores = new KeyStoreRegistry(config.keyStores);
  const app = buildApp({ config, log, agents, keyStores, now: opts.now });
  const server = createServer(app);
  // Behind an ALB (idle timeout 60 s) the server must outlive the balancer's keep-alive.
  server.keepAliveTimeout = 65_000;
  server.headersTimeout = 66_000;
  server.requestTimeout = 10_000;
  server.on("clientError", answerClientError);

  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(config.listen.port, config.listen.host, () => {
      server.off("error", reject);
      resolve();
    });
  });
  const addr = server.address() as AddressInfo;
  const host = addr.family === "IPv6" ? `[${addr.address}]` : addr.address;
  log.info({ version: VERSION, config: describeConfig(config), address: `${host}:${addr.port}` }, "xks-proxy listening");

  let closing: Promise<void> | undefined;
  const close = (graceMs = 5000): Promise<void> => {
    closing ??= new Promise<void>((resolve) => {
      const force = setTimeout(() => server.closeAllConnections(), graceMs);
      force.unref();
      server.close(() => {
        clearTimeout(force);
        agents.close();
        resolve();
      });
      server.closeIdleConnections();
    });
    return closing;
  };
  return { server, agents, keyStores, url: `http://${host}:${addr.port}`, port: addr.port, close };
}
