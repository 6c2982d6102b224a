/** Messages between the bench (parent) and the load-generator child process (loadgen/child.ts). */
import type { Identity } from "../../../testbed/identities.ts";
import type { LatencySummary } from "../stats.ts";

export type XksOp = "Encrypt" | "Decrypt";

/** One kind of request: the operation and its plaintext size in bytes. */
export interface Case {
  op: XksOp;
  size: number;
}

/** Where and how to reach the proxy (from the test-bed's chain). */
export interface Target {
  url: string;
  uriPath: string;
  region: string;
  accessKeyId: string;
  secretAccessKey: string;
  keyId: string;
  /** Keep-alive sockets to the proxy. */
  sockets: number;
}

/** Requests sent on a fixed schedule, whatever the answers do. Cases are used in turn. */
export interface OpenLoopSpec {
  kind: "openLoop";
  /** Goes into every measured request's kmsRequestId ("bench-<run>-<tag>-<n>"), to find them in the daemons' logs. */
  tag?: string;
  cases: Case[];
  rate: number;
  durationS: number;
  /** Encrypt answers decrypted back after the run (spread over the run). */
  sampleDecrypts: number;
}

/** One caller, one request at a time. `windows` returns each request's [send, done] in process.hrtime ns. */
export interface SequentialSpec {
  kind: "sequential";
  tag?: string;
  case: Case;
  count: number;
  warmup: number;
  /** Pause after each answer (lets a WAN link go quiet between operations). */
  gapMs: number;
  windows: boolean;
}

/** The agent's gRPC service called directly on its Unix socket (no tunnel, no HTTP). */
export interface GrpcSpec {
  kind: "grpc";
  socket: string;
  token: string;
  /** The channel identities of the chain's configs: this process presents the proxy's and pins the agent's. */
  identities: { agent: Identity; proxy: Identity };
  /** The key store the calls name (the agent serves keyId only for the key stores it allow-lists). */
  keyStore: string;
  keyId: string;
  case: Case;
  /** 1 = sequential calls; more = that many calls kept in flight. */
  concurrency: number;
  durationS: number;
}

/** A KMS-like caller (loadgen/kms.ts): open loop through phases of fixed rates, each request given up after timeoutMs. */
export interface KmsLoadSpec {
  kind: "kms";
  tag?: string;
  case: Case;
  phases: Array<{ rate: number; durationS: number }>;
  timeoutMs: number;
  /** Connections at most (new ones are opened while none is idle). */
  sockets: number;
}

/** `size` requests sent at once, on warm keep-alive connections or (cold) new ones (loadgen/kms.ts). */
export interface BurstSpec {
  kind: "burst";
  tag?: string;
  case: Case;
  size: number;
  cold: boolean;
  /** Answers slower than this count as late. */
  lateMs: number;
  /** Give up after this long (a hang, not a late answer). */
  timeoutMs: number;
}

export type JobSpec = OpenLoopSpec | SequentialSpec | GrpcSpec;
export type KmsJobSpec = KmsLoadSpec | BurstSpec;

export interface ErrorSample {
  count: number;
  example: string;
}

export interface JobResult {
  /** Open loop: requests scheduled (= answered + cut off unanswered at the end). */
  sent?: number;
  /** Requests that got an answer or failed on their own (not cut off). */
  completed: number;
  errors: number;
  /** Errors by kind ("HTTP 503 DependencyTimeoutException", "bad IV length", "timeout", …). */
  errorKinds: Record<string, ErrorSample>;
  /** Latency of every completed request in ms; for an open loop measured from its SCHEDULED send time. */
  latency: LatencySummary;
  /** Latency from the actual send (open loop only: shows how late the generator itself was). */
  serviceLatency?: LatencySummary;
  /** How late the generator sent, worst case, ms. */
  maxSendLagMs?: number;
  /** The generator's own event-loop delay while it ran (its GC pauses and stalls show here), ms. */
  generatorLoopDelayMs?: { p99: number; max: number };
  /** Requests the background signer had not signed in time (signed on the spot, late). */
  lateSigned?: number;
  /** Wall time from the first scheduled send to the last answer, s. */
  elapsedS: number;
  /** Completed per second over elapsedS. */
  achievedRate: number;
  /** Sampled Encrypt answers decrypted back through the chain, and how many did not match. */
  sampled?: { checked: number; failed: number };
  /** sequential + windows: [sendNs, doneNs] per measured request, as decimal strings. */
  windows?: Array<[string, string]>;
}

export type ParentMessage =
  | { id: number; type: "init"; target: Target }
  | { id: number; type: "run"; spec: JobSpec }
  | { id: number; type: "kms"; spec: KmsJobSpec };

export type ChildMessage =
  | { id: number; type: "started" }
  | { id: number; type: "done"; result?: unknown }
  | { id: number; type: "failed"; message: string };
