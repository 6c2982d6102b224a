/**
 * Where a request's time goes, from the daemons' own logs: the proxy logs one
 * line per request with its latencyMs (request received → response sent) and
 * the agent one line per operation (its handler: token check → HSM → result).
 * The load generator tags each job's kmsRequestIds, so a job's lines can be
 * picked out. Logs are read from where they stood when the job began.
 */
import { closeSync, existsSync, openSync, readSync, statSync } from "node:fs";
import { summarize, type LatencySummary } from "./stats.ts";

export interface LogFiles {
  proxy: string;
  agent: string;
}

export interface InsideLatency {
  /** Proxy: request received → response sent (its "request" log line). */
  proxy?: LatencySummary;
  /** Agent: the operation's handler (its "operation" log line). */
  agent?: LatencySummary;
}

export type LogMark = Record<keyof LogFiles, { file: string; offset: number }>;

export function markLogs(files: LogFiles): LogMark {
  const at = (file: string) => ({ file, offset: existsSync(file) ? statSync(file).size : 0 });
  return { proxy: at(files.proxy), agent: at(files.agent) };
}

function readFrom(file: string, offset: number): string {
  if (!existsSync(file)) return "";
  const size = statSync(file).size;
  if (size <= offset) return "";
  const buf = Buffer.alloc(size - offset);
  const fd = openSync(file, "r");
  try {
    readSync(fd, buf, 0, buf.length, offset);
  } finally {
    closeSync(fd);
  }
  return buf.toString("utf8");
}

function latencies(text: string, tag: string, msg: string): number[] {
  const needle = `-${tag}-`;
  const out: number[] = [];
  for (const line of text.split("\n")) {
    if (!line.includes(needle) || !line.includes(`"msg":"${msg}"`)) continue;
    try {
      const v = (JSON.parse(line) as { latencyMs?: unknown }).latencyMs;
      if (typeof v === "number") out.push(v);
    } catch {
      /* a partial line */
    }
  }
  return out;
}

/** The latencies the proxy and the agent logged, since `mark`, for requests whose kmsRequestId carries `tag` ("bench-<run>-<tag>-<n>"). */
export async function insideLatency(mark: LogMark, tag: string): Promise<InsideLatency> {
  await new Promise((r) => setTimeout(r, 300)); // pino writes asynchronously
  const p = latencies(readFrom(mark.proxy.file, mark.proxy.offset), tag, "request");
  const a = latencies(readFrom(mark.agent.file, mark.agent.offset), tag, "operation");
  return { proxy: p.length ? summarize(p) : undefined, agent: a.length ? summarize(a) : undefined };
}
