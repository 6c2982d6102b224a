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

export interface LoggerOptions {
  level?: LogLevel;
  name?: string;
}

/**
 * stdout, written in batches: a line is written once 4 KiB have gathered or
 * after at most a second, and everything is flushed at exit. One write per
 * line cost the daemons tens of microseconds per request under load. (The
 * agent's audit log, the record of every operation, is written synchronously
 * on its own; this is the operational log.)
 */
function stdoutDestination(): pino.DestinationStream {
  const dest = pino.destination({ fd: 1, sync: false, minLength: 4096 });
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

export function createLogger(opts: LoggerOptions = {}, destination?: pino.DestinationStream): Logger {
  return pino(
    {
      level: opts.level ?? "info",
      name: opts.name,
      base: { pid: process.pid },
      redact: { paths: REDACT_PATHS, censor: "[redacted]" },
      timestamp: pino.stdTimeFunctions.isoTime,
    },
    destination ?? stdoutDestination(),
  );
}
