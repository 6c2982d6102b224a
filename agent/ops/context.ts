import type { Hsm } from "../hsm/hsm.ts";
import type { TunnelStatus } from "../../shared/proto.ts";
import type { OwnerPolicy } from "../policy.ts";

/** What every operation gets: the HSM, the agent's own settings and the owner's policy (agent/policy.ts). */
export interface AgentOpContext extends OwnerPolicy {
  hsm: Hsm;
  /** Ciphertext metadata returned by Encrypt (<= 20 bytes, may be empty). */
  ciphertextMetadata: Buffer;
  /** Stable id of this agent/HSM for ekmFleetDetails. */
  agentId: string;
  /** The reverse tunnels' states, for health. */
  tunnels(): TunnelStatus[];
  /** The audit log's newest sealed checkpoint and why records cannot be written or sealed, for health. */
  audit?(): { head?: { records: number; hash: string; mac: string }; problem?: string; refusing: boolean };
}
