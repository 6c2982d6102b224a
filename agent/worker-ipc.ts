/**
 * The messages between the agent's primary process (agent/pool.ts) and its
 * workers (agent/worker.ts), over the IPC channel node:cluster gives each
 * worker (JSON). Secrets cross it only in `init` (the config: the PIN, the
 * agent token, the channel identity's key), on a pipe between two processes
 * of the same user. Never a payload: records carry what the audit log holds.
 */
import type { TunnelStatus } from "../shared/proto.ts";
import type { AgentConfig } from "./config.ts";
import type { ControlState } from "./controls.ts";
import { type MatchField, parsePolicy, type PolicyRules } from "./policy.ts";
import type { ChannelIdentity, OperationRecord } from "./server.ts";

/** What health answers from the primary's side: the tunnels and the audit log. */
export interface PrimaryView {
  tunnels: TunnelStatus[];
  audit: { head?: { records: number; hash: string; mac: string }; problem?: string; refusing: boolean };
}

/** The policy file's rules as they cross the channel (the patterns; each worker compiles them again). */
export interface PolicyWire {
  file: string;
  digest: string;
  raw: unknown;
}

export type ToWorker =
  /** The first message: everything the worker needs to serve. */
  | { t: "init"; worker: number; config: string; switches: ControlState; policy: PolicyWire | null; view: PrimaryView }
  /** The owner's switches changed; answered by "switches-ack" with the same seq once in force. */
  | { t: "switches"; seq: number; switches: ControlState }
  /** The policy file's rules changed (null: none apply); answered by "switches-ack" too. */
  | { t: "policy"; seq: number; policy: PolicyWire | null }
  | { t: "view"; view: PrimaryView }
  | { t: "identity"; id: ChannelIdentity }
  /** Records written (ok) or refused (id, why): each operation's answer may leave. */
  | { t: "ack"; ok: number[]; refused: Array<[number, string]> }
  /** A connection to serve: the socket is the message's handle. */
  | { t: "conn" }
  /** Drain and exit. */
  | { t: "stop" };

export type ToPrimary =
  /** The worker listens for messages: init may be sent. */
  | { t: "hello" }
  | { t: "ready" }
  /** The worker cannot serve (e.g. its HSM session cannot be opened for a reason waiting will not fix). */
  | { t: "fatal"; message: string }
  /** Finished operations, in order; id 0: no acknowledgement wanted (health, calls refused at the door). */
  | { t: "recs"; recs: Array<[number, OperationRecord]> }
  | { t: "switches-ack"; seq: number }
  /** A connection handed to this worker has closed. */
  | { t: "closed" };

/** The config as text (Buffers survive: ciphertextMetadata). */
export function encodeConfig(config: AgentConfig): string {
  return JSON.stringify(config);
}

export function decodeConfig(text: string): AgentConfig {
  return JSON.parse(text, (_k, v) =>
    v && typeof v === "object" && v.type === "Buffer" && Array.isArray(v.data) ? Buffer.from(v.data as number[]) : v,
  ) as AgentConfig;
}

/** The rules as the policy file would state them, for a worker to compile (parsePolicy) again. */
export function encodePolicy(rules: PolicyRules | undefined): PolicyWire | null {
  if (!rules) return null;
  return {
    file: rules.file,
    digest: rules.digest,
    raw: {
      mode: rules.mode,
      default: rules.default,
      rules: rules.rules.map((r) => ({
        name: r.name,
        effect: r.effect,
        ...(r.keyStores ? { keyStores: r.keyStores } : {}),
        ...(r.keys ? { keys: r.keys } : {}),
        match: Object.fromEntries(Object.entries(r.match).map(([f, m]) => [f as MatchField, m?.patterns])),
      })),
    },
  };
}

export function decodePolicy(wire: PolicyWire | null, allowList: ReadonlyMap<string, ReadonlySet<string>>): PolicyRules | undefined {
  return wire ? parsePolicy(wire.raw, wire.file, wire.digest, allowList) : undefined;
}
