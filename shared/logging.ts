/**
 * One root pino logger per process. Callers log an explicit allow-list of
 * fields; `redact` is the second line of defence for anything secret that
 * slips into a log object anyway.
 */
import pino from "pino";

export type Logger = pino.Logger;
export type LogLevel = "fatal" | "error" | "warn" | "info" | "debug" | "trace" | "silent";

/**
 * Paths that must never reach a log. Exact paths only: pino compiles them into
 * a cheap check, where wildcards cost tens of microseconds per line. Log
 * objects are built from allow-listed fields, so this is the backstop, not the rule.
 */
export const REDACT_PATHS = [
  "plaintext",
  "ciphertext",
  "additionalAuthenticatedData",
  "aad",
  "pin",
  "userPin",
  "secret",
  "secretAccessKey",
  "token",
  "agentToken",
  "privateKey",
  "authorization",
  "headers.authorization",
  "req.headers.authorization",
  'headers["x-xks-agent-token"]',
  "body.plaintext",
  "body.ciphertext",
  "body.additionalAuthenticatedData",
];

export type LogFormat = "json" | "pretty";

export interface LoggerOptions {
  level?: LogLevel;
  name?: string;
  /** "json" (default) or "pretty"; LOG_FORMAT=pretty|json in the environment overrides it. */
  format?: LogFormat;
}

/** The format in force: LOG_FORMAT from the environment when it names one, else the config's. */
export function logFormat(configured: LogFormat | undefined, env: NodeJS.ProcessEnv = process.env): LogFormat {
  return env.LOG_FORMAT === "pretty" || env.LOG_FORMAT === "json" ? env.LOG_FORMAT : (configured ?? "json");
}

const PRETTY_SKIP = new Set(["level", "time", "msg", "name", "pid"]);

/**
 * One JSON log line as one readable line: `<time> <LEVEL> <name>: <msg> key=value …`,
 * values as JSON unless they are plain words. The same fields as the JSON line,
 * so redaction holds; a line that is not JSON is passed through.
 */
export function prettyLine(json: string): string {
  let o: Record<string, unknown>;
  try {
    o = JSON.parse(json);
  } catch {
    return json.endsWith("\n") ? json : `${json}\n`;
  }
  const fields = Object.entries(o)
    .filter(([k]) => !PRETTY_SKIP.has(k))
    .map(([k, v]) => `${k}=${typeof v === "string" && /^[\w./:@+-]+$/.test(v) ? v : JSON.stringify(v)}`);
  const level = String(o.level ?? "")
    .toUpperCase()
    .padEnd(5);
  return `${o.time ?? ""} ${level} ${o.name ?? ""}: ${o.msg ?? ""}${fields.length ? ` ${fields.join(" ")}` : ""}\n`;
}

/** A destination that writes each line through prettyLine into `out`. */
export function prettyDestination(out: pino.DestinationStream): pino.DestinationStream {
  return { write: (line: string) => out.write(prettyLine(line.replace(/\n$/, ""))) };
}

/**
 * stdout, written in batches: a line is written once 3 KiB have gathered or
 * after at most a second, and everything is flushed at exit. One write per
 * line cost the daemons tens of microseconds per request under load. (The
 * agent's audit log, the record of every operation, is written synchronously
 * on its own; this is the operational log.)
 */
function stdoutDestination(): pino.DestinationStream {
  // Each write is whole lines of at most PIPE_BUF (4 KiB) bytes, which a pipe writes atomically: several
  // processes on one stdout (the proxy's workers) never interleave inside a line.
  const dest = pino.destination({ fd: 1, sync: false, minLength: 3072, maxWrite: 4096 });
  setInterval(() => dest.flush(), 1000).unref();
  process.once("exit", () => {
    try {
      dest.flushSync();
    } catch {
      /* stdout already gone */
    }
  });
  return dest;
}

/**
 * The process's logger. Levels are written as words (`"level":"info"`), which
 * log shippers and people read without pino's number table.
 */
export function createLogger(opts: LoggerOptions = {}, destination?: pino.DestinationStream): Logger {
  const dest = destination ?? stdoutDestination();
  return pino(
    {
      level: opts.level ?? "info",
      name: opts.name,
      base: { pid: process.pid },
      redact: { paths: REDACT_PATHS, censor: "[redacted]" },
      timestamp: pino.stdTimeFunctions.isoTime,
      formatters: { level: (label) => ({ level: label }) },
    },
    logFormat(opts.format) === "pretty" ? prettyDestination(dest) : dest,
  );
}
