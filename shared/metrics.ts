/**
 * The metrics listener both daemons share: GET /metrics in the Prometheus text
 * format from one prom-client Registry, on a listener of its own (never the
 * XKS port, never the dashboard's). Each daemon keeps its metrics in one
 * module (proxy/metrics.ts, agent/metrics.ts) with its own Registry, so two
 * daemons in one process (tests) never share a series.
 *
 * Label values are bounded by construction: operations, reasons and results
 * come from fixed tables, and names (key stores, agents, tunnels) only from
 * the config. Nothing a caller sends becomes a label value.
 */
import { createServer, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import client from "prom-client";
import type { Logger } from "./logging.ts";

export { client };

/** Latency buckets in seconds: 0.5 ms to 2.5 s (the XKS budget is 250 ms). */
export const LATENCY_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.5, 1, 2.5];

/** A Registry with the default process and Node.js metrics (process_*, nodejs_*). */
export function newRegistry(): client.Registry {
  const registry = new client.Registry();
  client.collectDefaultMetrics({ register: registry });
  return registry;
}

/** Seconds since `start` (process.hrtime.bigint()). */
export function secondsSince(start: bigint): number {
  return Number(process.hrtime.bigint() - start) / 1e9;
}

export interface MetricsListener {
  /** http://host:port/metrics */
  url: string;
  close(): Promise<void>;
}

/** What a scrape reads: a Registry, or anything that produces the text format (a cluster's aggregate). */
export interface MetricsSource {
  metrics(): Promise<string>;
  contentType: string;
}

/** Serves `registry` on host:port: GET /metrics, anything else 404. */
export async function startMetricsListener(
  registry: MetricsSource,
  where: { host: string; port: number },
  log: Logger,
): Promise<MetricsListener> {
  const server: Server = createServer((req, res) => {
    if (req.method !== "GET" || (req.url ?? "").split("?")[0] !== "/metrics") {
      res.writeHead(404, { "content-type": "text/plain" }).end("not found: GET /metrics\n");
      return;
    }
    registry.metrics().then(
      (text) => res.writeHead(200, { "content-type": registry.contentType }).end(text),
      (err: Error) => {
        log.error({ err: err.message }, "metrics: cannot collect");
        res.writeHead(500, { "content-type": "text/plain" }).end("cannot collect metrics\n");
      },
    );
  });
  server.requestTimeout = 10_000;
  server.headersTimeout = 5_000;
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(where.port, where.host, () => {
      server.off("error", reject);
      resolve();
    });
  });
  const { port } = server.address() as AddressInfo;
  const host = where.host.includes(":") ? `[${where.host}]` : where.host;
  const url = `http://${host}:${port}/metrics`;
  log.info({ url }, "metrics listening");
  return {
    url,
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}
