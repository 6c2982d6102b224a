/**
 * One root pino logger per process. Callers log an explicit allow-list of
 * fields; `redact` is the second line of defence for anything secret that
 * slips into a log object anyway.
 */
import pino from "pino";

export type Logger = pino.Logger;
export type LogLevel = "fatal" | "error" | "warn" | "info" | "debug" | "trace" | "silent";

/** Paths that must never reach a log, whatever object carries them. */
export const REDACT_PATHS = [
  "plaintext", "*.plaintext", "ciphertext", "*.ciphertext",
  "additionalAuthenticatedData", "*.additionalAuthenticatedData", "aad", "*.aad",
  "pin", "*.pin", "userPin", "*.userPin",
  "secret", "*.secret", "secretAccessKey", "*.secretAccessKey", "token", "*.token", "agentToken", "*.agentToken",
  "privateKey", "*.privateKey",
  "authorization", "*.authorization", "headers.authorization", "req.headers.authorization",
  'headers["x-xks-agent-token"]',
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
