import pkcs11js from "pkcs11js";
import type { Hsm, KeyInfo } from "../hsm/hsm.ts";
import { AgentError } from "../../shared/errors.ts";
import type { TunnelStatus } from "../../shared/proto.ts";
import { KEY_BYTES } from "../../shared/xks-spec.ts";

/** What every operation gets: the HSM and the agent's own settings. */
export interface AgentOpContext {
  hsm: Hsm;
  /** Ciphertext metadata returned by Encrypt (<= 20 bytes, may be empty). */
  ciphertextMetadata: Buffer;
  /** Label of the dedicated health-check key. */
  healthKey: string;
  /** Stable id of this agent/HSM for ekmFleetDetails. */
  agentId: string;
  /** Labels the owner has disabled: metadata reports DISABLED, crypto is refused. */
  isKeyDisabled(label: string): boolean;
  /** The reverse tunnels' states, for health. */
  tunnels(): TunnelStatus[];
}

/**
 * The check for a crypto operation's key: it must be AES-256, enabled by the
 * owner, and allow every usage in `needs` (from its own attributes).
 */
export function keyCheck(ctx: AgentOpContext, needs: Array<"encrypt" | "decrypt">): (key: KeyInfo) => void {
  return (key) => {
    assertAes256(key);
    if (ctx.isKeyDisabled(key.label)) throw new AgentError("INVALID_STATE", `key ${key.label} is disabled by the owner`);
    for (const n of needs) {
      if (!key.usage[n])
        throw new AgentError("INVALID_KEY_USAGE", `key ${key.label} does not allow ${n} (CKA_${n.toUpperCase()} is false)`);
    }
  };
}

/** Only AES-256 keys are XKS keys; anything else is refused with a clear reason, never a wrong answer. */
export function assertAes256(key: KeyInfo): void {
  if (key.keyType !== pkcs11js.CKK_AES) {
    throw new AgentError("INVALID_KEY_USAGE", `key ${key.label} is not an AES key (CKA_KEY_TYPE 0x${key.keyType.toString(16)})`);
  }
  if (key.valueLen !== KEY_BYTES) {
    throw new AgentError("INVALID_KEY_USAGE", `key ${key.label} is AES-${key.valueLen * 8}, XKS needs AES-256`);
  }
}
