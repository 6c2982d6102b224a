/**
 * Load shedding at the door: the proxy's HTTP request handler, which answers a
 * key operation that admission control refuses (proxy/admission.ts) with 429
 * ThrottlingException before the body, SigV4 or a per-request log line, hands
 * every other POST to a configured key store's XKS path to the pipeline
 * without express, and everything else to the express app (proxy/app.ts).
 *
 * Under overload most requests are refusals, and every CPU microsecond a
 * refusal costs is taken from the requests that are being served. Measured
 * with a fake agent holding the only slot (every key operation refused at
 * arrival), proxy CPU per refused request: 225-280 µs through express, of
 * which the router ~9 %, the thrown error's stack capture ~8 %, the error
 * middleware, the response-close listener and the JSON log line most of the
 * rest; the socket write (~20 %) is the same on either path.
 *
 * The decision is the same one the app makes (route on the raw path, a
 * configured key store, a key operation, the agents' admission gate with the
 * request's budget from its arrival), so a request admitted here meets the
 * same check again in the app microseconds later, and a request the app
 * serves alone (buildApp in tests) is refused the same way there.
 *
 * Refusals are logged as a summary (RefusalLog): the first of a run at once,
 * with its reason, then one line per second while they go on, with counts by
 * key store and operation. A refused request's body is never read, so there
 * is nothing more to say about it (no KMS request id), and one warn line per
 * refusal would be thousands of lines a second exactly when the proxy has the
 * least time for them.
 */
import type { IncomingMessage, ServerResponse } from "node:http";
import { XKS_ERRORS, XksError } from "../shared/errors.ts";
import type { Logger } from "../shared/logging.ts";
import { Budget, LoopClock, monotonic } from "./admission.ts";
import { type AppDeps, buildPipeline } from "./app.ts";
import { KeyStoreRegistry, parseXksPath, splitTarget } from "./routes.ts";

const THROTTLED_STATUS = XKS_ERRORS.ThrottlingException.status;
const THROTTLED_BODY = Buffer.from(JSON.stringify(new XksError("ThrottlingException").toJSON()));
const THROTTLED_HEADERS = {
  "content-type": "application/json; charset=utf-8",
  "content-length": String(THROTTLED_BODY.length),
};

/** How often a run of refusals is summarised in the log (ms). */
export const REFUSAL_SUMMARY_MS = 1000;

/** Refusals at the door, summarised: the first of a run at once, then one line per REFUSAL_SUMMARY_MS. */
export class RefusalLog {
  private count = 0;
  private byStore = new Map<string, number>();
  private byOperation = new Map<string, number>();
  private lastReason = "";
  private timer: NodeJS.Timeout | undefined;
  /** Every refusal at the door since start. */
  total = 0;

  constructor(private readonly log: Logger) {}

  note(keyStore: string, operation: string, reason: string): void {
    this.total++;
    if (!this.timer) {
      // The first of a run: said at once, with its reason.
      this.log.warn(
        { keyStore, operation, status: THROTTLED_STATUS, errorName: "ThrottlingException", detail: reason.slice(0, 300) },
        "request refused by admission control (further refusals are summarised every second)",
      );
      this.timer = setTimeout(() => this.flush(), REFUSAL_SUMMARY_MS);
      this.timer.unref();
      return;
    }
    this.count++;
    this.byStore.set(keyStore, (this.byStore.get(keyStore) ?? 0) + 1);
    this.byOperation.set(operation, (this.byOperation.get(operation) ?? 0) + 1);
    this.lastReason = reason;
  }

  private flush(): void {
    if (this.count === 0) {
      // A quiet second: the next refusal starts a new run.
      this.timer = undefined;
      return;
    }
    this.summary();
    this.timer = setTimeout(() => this.flush(), REFUSAL_SUMMARY_MS);
    this.timer.unref();
  }

  private summary(): void {
    this.log.warn(
      {
        refused: this.count,
        status: THROTTLED_STATUS,
        errorName: "ThrottlingException",
        keyStores: Object.fromEntries(this.byStore),
        operations: Object.fromEntries(this.byOperation),
        lastDetail: this.lastReason.slice(0, 300),
        windowMs: REFUSAL_SUMMARY_MS,
      },
      "requests refused by admission control",
    );
    this.count = 0;
    this.byStore.clear();
    this.byOperation.clear();
  }

  /** Logs what is pending now and stops (at close). */
  close(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
    if (this.count > 0) this.summary();
  }
}

export interface RequestHandler {
  (req: IncomingMessage, res: ServerResponse): void;
  refusals: RefusalLog;
}

/** The proxy's request handler: shedding at the door, then the express app. */
export function buildRequestHandler(deps: AppDeps): RequestHandler {
  const { config, agents, metrics } = deps;
  const keyStores = deps.keyStores ?? new KeyStoreRegistry(config.keyStores);
  const loop = new LoopClock();
  const arrival = deps.arrival ?? (() => loop.arrival());
  const { app, serveXks } = buildPipeline({ ...deps, keyStores, arrival });
  const refusals = new RefusalLog(deps.log.child({ component: "admission" }));
  const handler = ((req: IncomingMessage, res: ServerResponse) => {
    if (req.method === "POST") {
      const { path, query } = splitTarget(req.url ?? "");
      const parsed = parseXksPath(path);
      if (parsed && keyStores.get(parsed.prefix)) {
        if (parsed.operation !== "GetHealthStatus" && agents.refusal) {
          const start = process.hrtime.bigint();
          const budget = new Budget(arrival(), config.requestBudgetMs, monotonic, performance.now());
          const why = agents.refusal(budget);
          if (why) {
            res.writeHead(THROTTLED_STATUS, THROTTLED_HEADERS);
            res.end(THROTTLED_BODY);
            refusals.note(parsed.prefix, parsed.operation, why);
            if (metrics) {
              // Counted as the app counts a refusal before SigV4: routed, not authenticated.
              metrics.requestStarted();
              metrics.requestDone({ operation: parsed.operation, authenticated: false, routed: true, error: "ThrottlingException", start });
              metrics.admissionRefused("agent_queue");
            }
            return;
          }
        }
        // Admitted (or not a key operation): the pipeline without express.
        serveXks(req, res, path, query, parsed);
        return;
      }
    }
    app(req, res);
  }) as RequestHandler;
  handler.refusals = refusals;
  return handler;
}
