import type { GetKeyMetadataRequest, GetKeyMetadataResponse } from "../../shared/proto.ts";
import { type KeyUse, refuseUnlessServed } from "../policy.ts";
import type { AgentOpContext } from "./context.ts";

/**
 * XKS GetKeyMetadata (spec §1.4), from the key's real attributes: CKA_KEY_TYPE
 * and CKA_VALUE_LEN give the spec (only AES_256 is accepted; anything else is
 * refused, never misreported), CKA_ENCRYPT/DECRYPT/SIGN/VERIFY/WRAP/UNWRAP/DERIVE
 * give the usage, and the owner's per-key switch gives the status. A key that
 * is not served for `use` (agent/policy.ts) is refused, before the HSM is
 * asked when its label alone decides.
 */
export function getKeyMetadata(ctx: AgentOpContext, req: GetKeyMetadataRequest, use: KeyUse): GetKeyMetadataResponse {
  refuseUnlessServed(ctx, req.keyId, use);
  const key = ctx.hsm.key(req.keyId);
  refuseUnlessServed(ctx, req.keyId, use, key);
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
