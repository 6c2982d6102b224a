/**
 * The one table that classifies PKCS#11 return values (CK_RV).
 *
 * For each CK_RV it says:
 *   - scope: what to throw away after the failure
 *       "caller"  – the caller's data or the key's policy; the session stays good
 *       "session" – the session (or a cached handle) is bad; drop it and open a new one
 *       "device"  – the module/token is gone or broken; finalize and re-initialize the module
 *   - reason: the agent failure reason (shared/errors.ts REASONS)
 *   - inDecrypt: the scope and reason instead, when the failure happened inside a decrypt
 *     (a run with inDecrypt set: C_DecryptInit + C_Decrypt on the caller's ciphertext)
 *
 * classifyCkr() resolves the row for (code, inDecrypt) once; agent/hsm/hsm.ts
 * acts on its answer and on nothing else.
 *
 * Adapted from aws-kms-xks-proxy handlers/mod.rs (pkcs11_to_http_error, decrypt_pkcs11_to_http_error),
 * vendor notes kept next to the codes they concern.
 */
import type { Reason } from "../../shared/errors.ts";

export type FailureScope = "caller" | "session" | "device";

export interface CkrOutcome {
  scope: FailureScope;
  reason: Reason;
}

export interface CkrRule extends CkrOutcome {
  name: string;
  /** Replaces scope and reason when the failure happened inside a decrypt. */
  inDecrypt?: CkrOutcome;
  /** From C_Login: the token refuses this PIN; no login may be tried again until the PIN changes. */
  pinRefused?: true;
}

/** A CK_RV resolved for one call: its name and what to do about it. */
export interface CkrClass extends CkrOutcome {
  name: string;
}

/** Inside a decrypt these codes mean the caller's ciphertext, IV, tag or AAD is wrong; the session is fine. */
const BAD_CIPHERTEXT: CkrOutcome = { scope: "caller", reason: "INVALID_CIPHERTEXT" };

export const CKR: Record<number, CkrRule> = {
  // SoftHSM 2.6 returns CKR_GENERAL_ERROR for a GCM tag mismatch (bad tag, AAD, IV or ciphertext);
  // 2.7 returns CKR_ENCRYPTED_DATA_INVALID. Outside C_Decrypt it means the module is in trouble.
  0x05: { name: "CKR_GENERAL_ERROR", scope: "session", reason: "INTERNAL", inDecrypt: BAD_CIPHERTEXT },
  // nShield returns CKR_FUNCTION_FAILED for a GCM tag mismatch.
  0x06: { name: "CKR_FUNCTION_FAILED", scope: "session", reason: "INTERNAL", inDecrypt: BAD_CIPHERTEXT },
  // pkcs11js passes NULL for an empty buffer; modules answer CKR_ARGUMENTS_BAD.
  0x07: { name: "CKR_ARGUMENTS_BAD", scope: "caller", reason: "VALIDATION", inDecrypt: BAD_CIPHERTEXT },
  0x20: { name: "CKR_DATA_INVALID", scope: "caller", reason: "VALIDATION", inDecrypt: BAD_CIPHERTEXT },
  0x21: { name: "CKR_DATA_LEN_RANGE", scope: "caller", reason: "VALIDATION", inDecrypt: BAD_CIPHERTEXT },
  0x30: { name: "CKR_DEVICE_ERROR", scope: "device", reason: "HSM_UNAVAILABLE" },
  0x31: { name: "CKR_DEVICE_MEMORY", scope: "device", reason: "HSM_UNAVAILABLE" },
  0x32: { name: "CKR_DEVICE_REMOVED", scope: "device", reason: "HSM_UNAVAILABLE" },
  0x40: { name: "CKR_ENCRYPTED_DATA_INVALID", scope: "caller", reason: "INVALID_CIPHERTEXT" },
  0x41: { name: "CKR_ENCRYPTED_DATA_LEN_RANGE", scope: "caller", reason: "INVALID_CIPHERTEXT" },
  0x60: { name: "CKR_KEY_HANDLE_INVALID", scope: "session", reason: "INTERNAL" },
  0x63: { name: "CKR_KEY_TYPE_INCONSISTENT", scope: "caller", reason: "INVALID_KEY_USAGE" },
  0x68: { name: "CKR_KEY_FUNCTION_NOT_PERMITTED", scope: "caller", reason: "INVALID_KEY_USAGE" },
  0x70: { name: "CKR_MECHANISM_INVALID", scope: "caller", reason: "INVALID_KEY_USAGE" },
  0x71: { name: "CKR_MECHANISM_PARAM_INVALID", scope: "caller", reason: "VALIDATION", inDecrypt: BAD_CIPHERTEXT },
  0x82: { name: "CKR_OBJECT_HANDLE_INVALID", scope: "session", reason: "INTERNAL" },
  0x90: { name: "CKR_OPERATION_ACTIVE", scope: "session", reason: "INTERNAL" },
  // Login refusals: the agent cannot serve until the owner fixes the PIN, and logging in again with
  // the same PIN would only spend the token's tries (agent/hsm/hsm.ts stops until the PIN changes).
  0xa0: { name: "CKR_PIN_INCORRECT", scope: "device", reason: "HSM_UNAVAILABLE", pinRefused: true },
  0xa1: { name: "CKR_PIN_INVALID", scope: "device", reason: "HSM_UNAVAILABLE", pinRefused: true },
  0xa2: { name: "CKR_PIN_LEN_RANGE", scope: "device", reason: "HSM_UNAVAILABLE", pinRefused: true },
  0xa3: { name: "CKR_PIN_EXPIRED", scope: "device", reason: "HSM_UNAVAILABLE", pinRefused: true },
  0xa4: { name: "CKR_PIN_LOCKED", scope: "device", reason: "HSM_UNAVAILABLE", pinRefused: true },
  0xb0: { name: "CKR_SESSION_CLOSED", scope: "session", reason: "INTERNAL" },
  0xb3: { name: "CKR_SESSION_HANDLE_INVALID", scope: "session", reason: "INTERNAL" },
  0xe0: { name: "CKR_TOKEN_NOT_PRESENT", scope: "device", reason: "HSM_UNAVAILABLE" },
  0xe1: { name: "CKR_TOKEN_NOT_RECOGNIZED", scope: "device", reason: "HSM_UNAVAILABLE" },
  0x101: { name: "CKR_USER_NOT_LOGGED_IN", scope: "session", reason: "HSM_UNAVAILABLE" },
  0x150: { name: "CKR_BUFFER_TOO_SMALL", scope: "session", reason: "INTERNAL" },
  0x190: { name: "CKR_CRYPTOKI_NOT_INITIALIZED", scope: "device", reason: "HSM_UNAVAILABLE" },
};

/**
 * Classifies a CK_RV for a call made inside a decrypt or not. An unknown code
 * drops the session and is an internal error.
 */
export function classifyCkr(code: number, inDecrypt = false): CkrClass {
  const rule = CKR[code];
  if (rule === undefined) return { name: `CKR_0x${code.toString(16)}`, scope: "session", reason: "INTERNAL" };
  const { scope, reason } = (inDecrypt && rule.inDecrypt) || rule;
  return { name: rule.name, scope, reason };
}

/** Whether a C_Login failure with this CK_RV means the token refuses the PIN itself. */
export function refusesPin(code: number): boolean {
  return CKR[code]?.pinRefused === true;
}
