import type { GetKeyMetadataRequest, GetKeyMetadataResponse } from "../../shared/proto.ts";
import { assertAes256, type AgentOpContext } from "./context.ts";

/**
 * XKS GetKeyMetadata (spec §1.4), from the key's real attributes: CKA_KEY_TYPE
 * and CKA_VALUE_LEN give the spec (only AES_256 is accepted; anything else is
 * refused, never misreported), CKA_ENCRYPT/DECRYPT/SIGN/VERIFY/WRAP/UNWRAP/DERIVE
 * give the usage, and the owner's per-key switch gives the status.
 */
export function getKeyMetadata(ctx: AgentOpContext, req: GetKeyMetadataRequest): GetKeyMetadataResponse {
  const key = ctx.hsm.key(req.keyId);
  assertAes256(key);
  const u = key.usage;
  const keyUsage = (
    [
      [u.encrypt, "ENCRYPT"],
      [u.decrypt, "DECRYPT"],
      [u.sign, "SIGN"],
      [u.verify, "VERIFY"],
      [u.wrap, "WRAP"],
      [u.unwrap, "UNWRAP"],
      [u.derive, "DERIVE"],
    ] as const
  )
    .filter(([on]) => on)
    .map(([, name]) => name);
  return { keySpec: "AES_256", keyUsage, keyStatus: ctx.isKeyDisabled(req.keyId) ? "DISABLED" : "ENABLED" };
}
