/**
 * The XKS cryptographic layout (XKS Proxy API spec §4), with no I/O: pure
 * functions over buffers, unit-tested on their own.
 */
import { createHash, randomFillSync } from "node:crypto";
import pkcs11js from "pkcs11js";
import { AgentError } from "../shared/errors.ts";
import { GENERATED_IV_BYTES, MAX_CIPHERTEXT_METADATA_BYTES, MAX_LAYOUT_AAD_BYTES, TAG_BYTES } from "../shared/xks-spec.ts";

export const TAG_BITS = TAG_BYTES * 8;

/**
 * A fresh random 96-bit IV per encryption, from the OS CSPRNG. Drawn from a
 * pool refilled 4 KiB at a time (one getrandom call per ~340 IVs instead of
 * one per IV); every IV is returned as its own copy and never reused.
 */
const IV_POOL = Buffer.alloc(4092);
let ivPoolOffset = IV_POOL.length;
export function freshIv(): Buffer {
  if (ivPoolOffset + GENERATED_IV_BYTES > IV_POOL.length) {
    randomFillSync(IV_POOL);
    ivPoolOffset = 0;
  }
  const iv = Buffer.from(IV_POOL.subarray(ivPoolOffset, ivPoolOffset + GENERATED_IV_BYTES));
  IV_POOL.fill(0, ivPoolOffset, ivPoolOffset + GENERATED_IV_BYTES);
  ivPoolOffset += GENERATED_IV_BYTES;
  return iv;
}

/**
 * The AAD handed to the HSM, binding the ciphertext metadata to the ciphertext:
 *
 *   hsmAAD = uint16_be(len(AAD)) || AAD || uint8(len(CM)) || CM
 *
 * Lengths are of the decoded bytes; an absent AAD or CM has length 0.
 * (This is the spec's literal layout; the reference proxy hashes AAD instead.
 * If the layout ever changes, the ciphertext metadata must name the scheme.)
 */
export function hsmAad(aad: Buffer, cm: Buffer): Buffer {
  if (aad.length > MAX_LAYOUT_AAD_BYTES)
    throw new AgentError("VALIDATION", `AAD is ${aad.length} bytes, more than ${MAX_LAYOUT_AAD_BYTES}`);
  if (cm.length > MAX_CIPHERTEXT_METADATA_BYTES) throw new AgentError("INVALID_CIPHERTEXT", `ciphertext metadata is ${cm.length} bytes`);
  const out = Buffer.allocUnsafe(2 + aad.length + 1 + cm.length);
  out.writeUInt16BE(aad.length, 0);
  aad.copy(out, 2);
  out.writeUInt8(cm.length, 2 + aad.length);
  cm.copy(out, 3 + aad.length);
  return out;
}

/**
 * ciphertextDataIntegrityValue (spec Appendix C): SHA-256(AAD || CM || IV || CT || TAG),
 * no length prefixes, absent fields contribute nothing.
 */
export function integrityValue(aad: Buffer, cm: Buffer, iv: Buffer, ct: Buffer, tag: Buffer): Buffer {
  return createHash("sha256").update(aad).update(cm).update(iv).update(ct).update(tag).digest();
}

/** CKM_AES_GCM parameters. tagBits must be set: pkcs11js defaults to 0 and SoftHSM then returns no tag. */
export function gcmMechanism(iv: Buffer, aad: Buffer): pkcs11js.Mechanism {
  return {
    mechanism: pkcs11js.CKM_AES_GCM,
    parameter: { type: pkcs11js.CK_PARAMS_AES_GCM_v240, iv, ivBits: iv.length * 8, aad, tagBits: TAG_BITS } as pkcs11js.AesGCM,
  };
}
