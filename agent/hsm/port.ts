/**
 * The narrow PKCS#11 port: exactly the Cryptoki calls the agent makes, with
 * pkcs11js's signatures, so that agent/hsm/hsm.ts can run on the real module
 * (pkcs11jsPort) or on an in-memory stub in the unit tests.
 *
 * Contract for every implementation: a call that fails with a CK_RV throws an
 * Error carrying that CK_RV as a numeric `code`. pkcs11js throws its own
 * Pkcs11Error; any other implementation throws a Pkcs11Failure. ckrOf() reads
 * the CK_RV from either, and answers undefined for every other error.
 *
 * The CKA_*, CKM_*, CKO_*, CKF_*, CKU_* constants still come from pkcs11js.
 */
import pkcs11js from "pkcs11js"; // NOT `import * as`: under ESM that loses every constant

export type Handle = pkcs11js.Handle;

/** The token fields the agent reads from C_GetTokenInfo (strings space-padded, as PKCS#11 returns them; flags CKF_*). */
export type Pkcs11TokenInfo = Pick<pkcs11js.TokenInfo, "label" | "manufacturerID" | "model" | "serialNumber" | "flags">;

export interface Pkcs11Port {
  /** Loads the PKCS#11 module (shared library) at `modulePath`. */
  load(modulePath: string): void;
  /** Unloads the module. */
  close(): void;
  C_Initialize(options: { flags: number }): void;
  C_Finalize(): void;
  C_GetSlotList(tokenPresent: boolean): Handle[];
  C_GetTokenInfo(slot: Handle): Pkcs11TokenInfo;
  C_OpenSession(slot: Handle, flags: number): Handle;
  C_CloseSession(session: Handle): void;
  C_Login(session: Handle, userType: number, pin: string): void;
  C_FindObjectsInit(session: Handle, template: pkcs11js.Template): void;
  C_FindObjects(session: Handle, maxObjectCount: number): Handle[];
  C_FindObjectsFinal(session: Handle): void;
  /** Every value comes back as the raw bytes of the attribute. */
  C_GetAttributeValue(session: Handle, object: Handle, template: pkcs11js.Template): pkcs11js.AttributeResult[];
  C_EncryptInit(session: Handle, mechanism: pkcs11js.Mechanism, key: Handle): void;
  /** Returns the part of `outData` that was written. */
  C_Encrypt(session: Handle, inData: Buffer, outData: Buffer): Buffer;
  C_DecryptInit(session: Handle, mechanism: pkcs11js.Mechanism, key: Handle): void;
  /** Returns the part of `outData` that was written. */
  C_Decrypt(session: Handle, inData: Buffer, outData: Buffer): Buffer;
  C_GenerateKey(session: Handle, mechanism: pkcs11js.Mechanism, template: pkcs11js.Template): Handle;
  C_SignInit(session: Handle, mechanism: pkcs11js.Mechanism, key: Handle): void;
  /** Returns the part of `outData` that was written. */
  C_Sign(session: Handle, inData: Buffer, outData: Buffer): Buffer;
}

/** The real port: a fresh pkcs11js.PKCS11 (not loaded yet). Its failures are pkcs11js.Pkcs11Error. */
export function pkcs11jsPort(): Pkcs11Port {
  return new pkcs11js.PKCS11();
}

/** A PKCS#11 failure thrown by a port other than pkcs11js (e.g. a test stub). */
export class Pkcs11Failure extends Error {
  /** The CK_RV. */
  readonly code: number;
  constructor(code: number, method = "") {
    super(`${method ? `${method}: ` : ""}CK_RV 0x${code.toString(16)}`);
    this.name = "Pkcs11Failure";
    this.code = code;
  }
}

/** The CK_RV of a failed port call, or undefined when `err` is not a PKCS#11 failure. */
export function ckrOf(err: unknown): number | undefined {
  if (err instanceof pkcs11js.Pkcs11Error || err instanceof Pkcs11Failure) return err.code;
  return undefined;
}
