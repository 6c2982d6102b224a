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
  "plaintext", "ciphertext", "additionalAuthenticatedData", "aad",
  "pin", "userPin", "secret", "secretAccessKey", "token", "agentToken", "privateKey", "authorization",
  "headers.authorization", "req.headers.authorization", 'headers["x-xks-agent-token"]',
  "body.plaintext", "body.ciphertext", "body.additionalAuthenticatedData",
];

export interface LoggerOptions {
  level?: LogLevel;
  name?: string;
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
    destination ?? pino.destination({ fd: 1, sync: false }),
  );
}
