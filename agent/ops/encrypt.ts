import { timingSafeEqual } from "node:crypto";
import { AgentError } from "../../shared/errors.ts";
import type { EncryptRequest, EncryptResponse } from "../../shared/proto.ts";
import { TAG_BYTES } from "../../shared/xks-spec.ts";
import { freshIv, gcmMechanism, hsmAad, integrityValue } from "../xks-crypto.ts";
import { type KeyUse, keyCheck, refuseUnlessServed } from "../policy.ts";
import type { AgentOpContext } from "./context.ts";
import { decryptWith } from "./decrypt.ts";

/**
 * XKS Encrypt (spec §1.5): AES-256-GCM with a fresh random 12-byte IV and a
 * 128-bit tag over hsmAAD. When the integrity value is asked for, it is
 * computed from the in-memory result FIRST, then a check-decrypt must give
 * the plaintext back (spec Appendix C) — so an encrypt-only key cannot
 * produce one (InvalidKeyUsage). A key that is not served for `use`
 * (agent/policy.ts) is refused before any HSM work.
 */
export function encrypt(ctx: AgentOpContext, req: EncryptRequest, use: KeyUse): EncryptResponse {
  refuseUnlessServed(ctx, req.keyId, use);
  const pt = req.plaintext;
  // KMS never sends an empty plaintext, and PKCS#11 modules reject an empty buffer.
  if (pt.length === 0) throw new AgentError("VALIDATION", "empty plaintext");
  const cm = ctx.ciphertextMetadata;
  const aadForHsm = hsmAad(req.aad, cm);
  // SoftHSM cannot generate the IV and accepts any length: always make a fresh 96-bit one here.
  const iv = freshIv();
  const needs: Array<"encrypt" | "decrypt"> = req.wantIntegrityValue ? ["encrypt", "decrypt"] : ["encrypt"];
  const { out, key } = ctx.hsm.runWithKey("encrypt", req.keyId, keyCheck(ctx, use, needs), (p11, s, key) => {
    p11.C_EncryptInit(s, gcmMechanism(iv, aadForHsm), key.handle);
    // Sized pt+16: CKR_BUFFER_TOO_SMALL would leave the operation active.
    return { out: p11.C_Encrypt(s, pt, Buffer.alloc(pt.length + TAG_BYTES)), key };
  });
  if (out.length !== pt.length + TAG_BYTES) {
    throw new AgentError("INTERNAL", `HSM returned ${out.length} bytes for ${pt.length} bytes of plaintext (tag missing?)`);
  }
  const ciphertext = Buffer.from(out.subarray(0, pt.length));
  const tag = Buffer.from(out.subarray(pt.length));
  let cdiv: Buffer = Buffer.alloc(0);
  if (req.wantIntegrityValue) {
    // Order matters (spec Appendix C): the value is computed from the in-memory result, then verified.
    cdiv = integrityValue(req.aad, cm, iv, ciphertext, tag);
    const back = decryptWith(ctx, use, key.label, ciphertext, iv, tag, aadForHsm);
    if (back.length !== pt.length || !timingSafeEqual(back, pt)) {
      throw new AgentError("INTERNAL", "check-decrypt did not return the plaintext");
    }
  }
  return { ciphertext, iv, tag, ciphertextMetadata: cm, integrityValue: cdiv };
}
