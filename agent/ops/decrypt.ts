import { AgentError } from "../../shared/errors.ts";
import type { DecryptRequest, DecryptResponse } from "../../shared/proto.ts";
import { isIvLength, TAG_BYTES } from "../../shared/xks-spec.ts";
import { gcmMechanism, hsmAad } from "../xks-crypto.ts";
import { type KeyUse, keyCheck, refuseUnlessServed } from "../policy.ts";
import type { AgentOpContext } from "./context.ts";

/**
 * XKS Decrypt (spec §1.6). Any mismatch of tag, AAD, IV, ciphertext metadata
 * or ciphertext is InvalidCiphertext (SoftHSM 2.6 says CKR_GENERAL_ERROR,
 * 2.7 CKR_ENCRYPTED_DATA_INVALID; agent/hsm/ckr.ts maps both). A key that is
 * not served for `use` (agent/policy.ts) is refused before any HSM work.
 */
export function decrypt(ctx: AgentOpContext, req: DecryptRequest, use: KeyUse): DecryptResponse {
  refuseUnlessServed(ctx, req.keyId, use);
  if (!isIvLength(req.iv.length)) throw new AgentError("INVALID_CIPHERTEXT", `IV is ${req.iv.length} bytes`);
  if (req.tag.length !== TAG_BYTES) throw new AgentError("INVALID_CIPHERTEXT", `tag is ${req.tag.length} bytes`);
  // We never make an empty ciphertext (Encrypt refuses empty plaintext).
  if (req.ciphertext.length === 0) throw new AgentError("INVALID_CIPHERTEXT", "empty ciphertext");
  const aadForHsm = hsmAad(req.aad, req.ciphertextMetadata);
  return { plaintext: decryptWith(ctx, use, req.keyId, req.ciphertext, req.iv, req.tag, aadForHsm) };
}

/** One GCM decrypt on the HSM; also the check-decrypt of Encrypt. */
export function decryptWith(
  ctx: AgentOpContext,
  use: KeyUse,
  label: string,
  ct: Buffer,
  iv: Buffer,
  tag: Buffer,
  aadForHsm: Buffer,
): Buffer {
  const input = Buffer.concat([ct, tag]);
  const out = ctx.hsm.runWithKey(
    "decrypt",
    label,
    keyCheck(ctx, use, ["decrypt"]),
    (p11, s, key) => {
      p11.C_DecryptInit(s, gcmMechanism(iv, aadForHsm), key.handle);
      return p11.C_Decrypt(s, input, Buffer.alloc(input.length));
    },
    { inDecrypt: true },
  );
  if (out.length !== ct.length) throw new AgentError("INTERNAL", `HSM returned ${out.length} bytes for ${ct.length} bytes of ciphertext`);
  return Buffer.from(out);
}
