/**
 * Key check values (KCVs): a short public fingerprint of a secret key, made by
 * the HSM with the key itself, so that two tokens can be compared without the
 * key ever leaving either. The proxy compares the KCVs its agents report for
 * the same key id (a clone of one token gives the same values; two separately
 * made tokens do not), and `xks-agent token backup/verify` compares a restored
 * token with the original.
 *
 * The value is "<method>:<6 hex digits>", the first 3 bytes of:
 *
 *   aes-ecb      AES-ECB encryption of the block KCV_BLOCK (keys that may encrypt)
 *   aes-ecb-dec  AES-ECB decryption of KCV_BLOCK (AES keys that may only decrypt:
 *                PKCS#11 allows C_EncryptInit only with CKA_ENCRYPT)
 *   hmac-sha256  CKM_SHA256_HMAC of KCV_BLOCK (generic secret keys that may sign:
 *                the audit key)
 *
 * An AES key that may neither encrypt nor decrypt has no check value.
 *
 * Why this does not weaken a key that AES-256-GCM uses with random 96-bit IVs:
 *  - The classic KCV, AES of the zero block, is NOT used: AES_K(0^128) is the
 *    GHASH subkey H of GCM, and knowing H (even in part) helps forge tags.
 *  - KCV_BLOCK is 12 non-zero bytes followed by a 32-bit zero counter. GCM with
 *    a 96-bit IV encrypts only blocks IV || ctr with ctr from 1 upwards (the
 *    tag mask at 1, data from 2) and never reaches ctr = 0 (a message is at most
 *    2^32 - 2 blocks; the agent's at most 1 MiB), and H is AES_K(0^128), which
 *    KCV_BLOCK is not. So AES_K(KCV_BLOCK) is a value GCM never computes under
 *    the key: revealing 3 bytes of it tells nothing about any keystream or tag.
 *  - The decryption direction yields AES_K^-1(KCV_BLOCK), a block GCM would
 *    only meet if a random IV equalled its first 96 bits (probability 2^-96 per
 *    encryption, the same bound as any IV collision).
 *  - No fixed IV is ever used with the key, so no GCM nonce is reused.
 *  - Only 3 bytes leave the HSM, and a known plaintext/ciphertext pair does not
 *    help recover an AES-256 key.
 * A key whose CKA_ALLOWED_MECHANISMS excludes CKM_AES_ECB simply has no check
 * value (the HSM refuses; `problem` says so).
 */
import pkcs11js from "pkcs11js"; // NOT `import * as`: under ESM that loses every constant
import { AgentError, errorMessage } from "../../shared/errors.ts";
import { KEY_BYTES } from "../../shared/xks-spec.ts";
import type { Hsm, KeyInfo } from "./hsm.ts";

/** "XKS KCV v1.0" (12 non-zero bytes) followed by a zero 32-bit counter: never a block GCM encrypts (see above). */
export const KCV_BLOCK = Buffer.concat([Buffer.from("XKS KCV v1.0", "ascii"), Buffer.alloc(4)]);
/** Bytes of the HSM's output kept in a check value. */
export const KCV_BYTES = 3;

export type KcvMethod = "aes-ecb" | "aes-ecb-dec" | "hmac-sha256";

/** How a check value is made for this key, or why none can be. */
export function kcvMethod(k: KeyInfo): KcvMethod | { none: string } {
  if (k.keyType === pkcs11js.CKK_AES) {
    if (k.valueLen !== KEY_BYTES) return { none: `not an AES-256 key (AES-${k.valueLen * 8})` };
    if (k.usage.encrypt) return "aes-ecb";
    if (k.usage.decrypt) return "aes-ecb-dec";
    return { none: "the key may neither encrypt nor decrypt" };
  }
  if (k.keyType === pkcs11js.CKK_GENERIC_SECRET && k.usage.sign) return "hmac-sha256";
  return { none: `no check value for this key type (0x${k.keyType.toString(16)})` };
}

/** Check values already made, per key as last read from the token: a key read again (new session, new token) is checked again. */
const made = new WeakMap<KeyInfo, string>();

/**
 * The check value of the secret key `label` ("aes-ecb:1a2b3c"), made in the
 * HSM. Throws AgentError: KEY_NOT_FOUND when there is no such key,
 * INVALID_KEY_USAGE when the key cannot have one (kcvMethod), or the HSM's
 * failure.
 */
export function keyCheckValue(hsm: Hsm, label: string): string {
  return hsm.runWithKey(
    "key check value",
    label,
    (key) => {
      const m = kcvMethod(key);
      if (typeof m !== "string") throw new AgentError("INVALID_KEY_USAGE", `key ${label}: ${m.none}`);
    },
    (p11, s, key) => {
      const known = made.get(key);
      if (known !== undefined) return known;
      const method = kcvMethod(key) as KcvMethod;
      let out: Buffer;
      if (method === "hmac-sha256") {
        p11.C_SignInit(s, { mechanism: pkcs11js.CKM_SHA256_HMAC }, key.handle);
        out = p11.C_Sign(s, KCV_BLOCK, Buffer.alloc(32));
      } else if (method === "aes-ecb") {
        p11.C_EncryptInit(s, { mechanism: pkcs11js.CKM_AES_ECB }, key.handle);
        out = p11.C_Encrypt(s, KCV_BLOCK, Buffer.alloc(16));
      } else {
        p11.C_DecryptInit(s, { mechanism: pkcs11js.CKM_AES_ECB }, key.handle);
        out = p11.C_Decrypt(s, KCV_BLOCK, Buffer.alloc(16));
      }
      if (out.length < KCV_BYTES) throw new AgentError("INTERNAL", `key check value: the HSM returned ${out.length} bytes`);
      const value = `${method}:${out.subarray(0, KCV_BYTES).toString("hex")}`;
      made.set(key, value);
      return value;
    },
  );
}

/** One key's check value, or why there is none (for health and `token verify`). */
export interface KeyCheck {
  keyId: string;
  /** Empty when there is none; `problem` says why. */
  checkValue: string;
  problem: string;
}

/** The check value of each label; a failure is that key's `problem` (no secret in it), never a throw. */
export function keyChecks(hsm: Hsm, labels: Iterable<string>): KeyCheck[] {
  const out: KeyCheck[] = [];
  for (const keyId of labels) {
    try {
      out.push({ keyId, checkValue: keyCheckValue(hsm, keyId), problem: "" });
    } catch (err) {
      out.push({
        keyId,
        checkValue: "",
        problem: errorMessage(err)
          .replace(/[^\x20-\x7e]/g, "?")
          .slice(0, 200),
      });
    }
  }
  return out;
}
