import type { Hsm, KeyInfo } from "../hsm/hsm.ts";
import { AgentError } from "../../shared/errors.ts";
import type { TunnelStatus } from "../../shared/proto.ts";
import { type KeyUse, refuseUnlessServed, type ServingPolicy } from "../serving.ts";

/** What every operation gets: the HSM, the agent's own settings and the owner's allow-lists. */
export interface AgentOpContext extends ServingPolicy {
  hsm: Hsm;
  /** Ciphertext metadata returned by Encrypt (<= 20 bytes, may be empty). */
  ciphertextMetadata: Buffer;
  /** Stable id of this agent/HSM for ekmFleetDetails. */
  agentId: string;
  /** Labels the owner has disabled: metadata reports DISABLED, crypto is refused. */
  isKeyDisabled(label: string): boolean;
  /** The reverse tunnels' states, for health. */
  tunnels(): TunnelStatus[];
  /** The audit log's newest sealed checkpoint and why records cannot be written or sealed, for health. */
  audit?(): { head?: { records: number; hash: string; mac: string }; problem?: string; refusing: boolean };
}

/**
 * The check for a crypto operation's key, once its attributes are read: it must
 * be served for `use` (agent/serving.ts), enabled by the owner, and allow every
 * usage in `needs` (from its own attributes).
 */
export function keyCheck(ctx: AgentOpContext, use: KeyUse, needs: Array<"encrypt" | "decrypt">): (key: KeyInfo) => void {
  return (key) => {
    refuseUnlessServed(ctx, key.label, use, key);
    if (ctx.isKeyDisabled(key.label)) throw new AgentError("INVALID_STATE", `key ${key.label} is disabled by the owner`);
    for (const n of needs) {
      if (!key.usage[n])
        throw new AgentError("INVALID_KEY_USAGE", `key ${key.label} does not allow ${n} (CKA_${n.toUpperCase()} is false)`);
    }
  };
}
