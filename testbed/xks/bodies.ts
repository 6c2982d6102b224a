/**
 * XKS request bodies as KMS sends them (XKS Proxy API spec §1.4–1.7): binary
 * values in standard Base64, `encryptionAlgorithm` AES_GCM, optional fields
 * left out when absent.
 */
import { healthMetadata, requestMetadata } from "./metadata.ts";

export type Bytes = Buffer | string;
export type Body = Record<string, unknown>;

export const b64 = (s: Bytes) => Buffer.from(s).toString("base64");
export const unb64 = (s: unknown) => Buffer.from(typeof s === "string" ? s : "", "base64");

export interface EncryptOptions {
  aad?: Bytes;
  /** Ask for the ciphertextDataIntegrityValue (SHA_256). */
  integrityValue?: boolean;
  /** requestMetadata fields to replace or add. */
  metadata?: Record<string, unknown>;
  /** Body fields to replace, add, or (value undefined) drop. */
  over?: Body;
}

function finish(body: Body, over: Body = {}): Body {
  const out: Body = { ...body, ...over };
  for (const k of Object.keys(out)) if (out[k] === undefined) delete out[k];
  return out;
}

export function encryptBody(plaintext: Bytes, o: EncryptOptions = {}): Body {
  return finish(
    {
      requestMetadata: requestMetadata("Encrypt", o.metadata),
      plaintext: b64(plaintext),
      encryptionAlgorithm: "AES_GCM",
      additionalAuthenticatedData: o.aad === undefined ? undefined : b64(o.aad),
      ciphertextDataIntegrityValueAlgorithm: o.integrityValue ? "SHA_256" : undefined,
    },
    o.over,
  );
}

/** The fields of an Encrypt answer that a Decrypt sends back. */
export interface EncryptAnswer {
  ciphertext: string;
  initializationVector: string;
  authenticationTag: string;
  ciphertextMetadata?: string;
  ciphertextDataIntegrityValue?: string;
}

export interface DecryptOptions {
  aad?: Bytes;
  metadata?: Record<string, unknown>;
  over?: Body;
}

/** A Decrypt of an Encrypt answer (its ciphertext, IV, tag and ciphertext metadata). */
export function decryptBody(e: EncryptAnswer, o: DecryptOptions = {}): Body {
  return finish(
    {
      requestMetadata: requestMetadata("Decrypt", o.metadata),
      ciphertext: e.ciphertext,
      initializationVector: e.initializationVector,
      authenticationTag: e.authenticationTag,
      ciphertextMetadata: e.ciphertextMetadata,
      additionalAuthenticatedData: o.aad === undefined ? undefined : b64(o.aad),
      encryptionAlgorithm: "AES_GCM",
    },
    o.over,
  );
}

export function metadataBody(kmsOperation = "CreateKey", metadata: Record<string, unknown> = {}): Body {
  return { requestMetadata: requestMetadata(kmsOperation, metadata) };
}

export function healthBody(metadata: Record<string, unknown> = {}): Body {
  return { requestMetadata: healthMetadata(metadata) };
}

/** The path below the URI path (`<prefix>/kms/xks/v1`) of an operation on `key`. */
export function keyPath(key: string, op: "metadata" | "encrypt" | "decrypt"): string {
  return `keys/${key}/${op}`;
}
