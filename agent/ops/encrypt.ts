import { randomBytes, timingSafeEqual } from "node:crypto";
import pkcs11js from "pkcs11js";
import { AgentError } from "../../shared/errors.ts";
import type { EncryptRequest, EncryptResponse } from "../../shared/proto.ts";
import { gcmMechanism, hsmAad, integrityValue, IV_BYTES, TAG_BYTES } from "../xks-crypto.ts";
import { usableKey, type OpContext } from "./context.ts";
import { decryptWith } from "./decrypt.ts";

/**
 * XKS Encrypt (spec §1.5): AES-256-GCM with a fresh random 12-byte IV and a
 * 128-bit tag over hsmAAD. When the integrity value is asked for, it is
 * computed from the in-memory result FIRST, then a check-decrypt must give
 * the plaintext back (spec Appendix C) — so an encrypt-only key cannot
 * produce one (InvalidKeyUsage).
 */
export function encrypt(ctx: OpContext, req: EncryptRequest): EncryptResponse {
  const key = usableKey(ctx, req.keyId, req.wantIntegrityValue ? ["encrypt", "decrypt"] : ["encrypt"]);
  const cm = ctx.ciphertextMetadata;
  const aadForHsm = hsmAad(req.aad, cm);
  // SoftHSM cannot generate the IV and accepts any length: always make a fresh 96-bit one here.
  const iv = randomBytes(IV_BYTES);
  const pt = req.plaintext;
  const out = ctx.hsm.run("encrypt", (p11: pkcs11js.PKCS11, s) => {
    p11.C_EncryptInit(s, gcmMechanism(iv, aadForHsm), key.handle);
    // Sized pt+16: CKR_BUFFER_TOO_SMALL would leave the operation active.
    return p11.C_Encrypt(s, pt, Buffer.alloc(pt.length + TAG_BYTES));
  });
  if (out.length !== pt.length + TAG_BYTES) {
    throw new AgentError("INTERNAL", `HSM returned ${out.length} bytes for ${pt.length} bytes of plaintext (tag missing?)`);
  }
  const ciphertext = Buffer.from(out.subarray(0, pt.length));
  const tag = Buffer.from(out.subarray(pt.length));
  let cdiv: Buffer = Buffer.alloc(0);
  if (req.wantIntegrityValue) {
    cdiv = integrityValue(req.aad, cm, iv, ciphertext, tag);
    const back = decryptWith(ctx, key, ciphertext, iv, tag, aadForHsm);
    if (back.length !== pt.length || !timingSafeEqual(back, pt)) {
      throw new AgentError("INTERNAL", "check-decrypt did not return the plaintext");
    }
  }
  return { ciphertext, iv, tag, ciphertextMetadata: cm, integrityValue: cdiv };
}
