/**
 * Encrypt: POST [/<prefix>]/kms/xks/v1/keys/<externalKeyId>/encrypt
 * (XKS Proxy API spec §1.5). The agent does the AES-256-GCM work, the
 * ciphertextMetadata and the integrity value; the proxy validates and maps.
 */
import { XksError } from "../../shared/errors.ts";
import { INTEGRITY_VALUE_BYTES, isIvLength, MAX_CIPHERTEXT_METADATA_BYTES, TAG_BYTES } from "../../shared/xks-spec.ts";
import type { Limits } from "../config.ts";
import { base64Field, exactString, parseRequestMetadata, type Json, type WireRequestMetadata } from "../validate.ts";
import { b64, len, toProtoMetadata, type HandlerContext } from "./context.ts";

/** Defined per XKS Proxy API spec §1.5 (request body). */
export interface EncryptWireRequest {
  requestMetadata: WireRequestMetadata;
  plaintext: string;
  encryptionAlgorithm: "AES_GCM";
  additionalAuthenticatedData?: string;
  ciphertextDataIntegrityValueAlgorithm?: "SHA_256";
}

/** Defined per XKS Proxy API spec §1.5 (response body). All values standard Base64. */
export interface EncryptWireResponse {
  ciphertext: string;
  initializationVector: string;
  authenticationTag: string;
  /** Omitted when the agent returns none. */
  ciphertextMetadata?: string;
  /** Present iff the request asked for it (ciphertextDataIntegrityValueAlgorithm = SHA_256). */
  ciphertextDataIntegrityValue?: string;
}

export interface EncryptInput {
  metadata: WireRequestMetadata;
  plaintext: Buffer;
  aad: Buffer;
  wantIntegrityValue: boolean;
}

export function parseEncryptRequest(body: Json, limits: Limits): EncryptInput {
  const metadata = parseRequestMetadata(body, "Encrypt");
  exactString(body, "encryptionAlgorithm", "AES_GCM", true);
  const wantIntegrityValue = exactString(body, "ciphertextDataIntegrityValueAlgorithm", "SHA_256", false);
  const plaintext = base64Field(body, "plaintext", { required: true, minBytes: 1, maxBytes: limits.maxPlaintextBytes });
  const aad = base64Field(body, "additionalAuthenticatedData", { required: false, maxBytes: limits.maxAadBytes });
  return { metadata, plaintext, aad, wantIntegrityValue };
}

export async function encrypt(input: EncryptInput, ctx: HandlerContext): Promise<EncryptWireResponse> {
  const { response: r, agentId } = await ctx.agents.call("Encrypt", {
    metadata: toProtoMetadata(input.metadata, ctx.keyStore),
    keyId: ctx.keyId,
    plaintext: input.plaintext,
    aad: input.aad,
    wantIntegrityValue: input.wantIntegrityValue,
  });
  ctx.served(agentId);
  // Never hand KMS something it will reject: GCM keeps the length, IV 12/16, tag 16, CM <= 20, CDIV = SHA-256.
  if (
    len(r.ciphertext) !== input.plaintext.length ||
    !isIvLength(len(r.iv)) ||
    len(r.tag) !== TAG_BYTES ||
    len(r.ciphertextMetadata) > MAX_CIPHERTEXT_METADATA_BYTES ||
    (input.wantIntegrityValue && len(r.integrityValue) !== INTEGRITY_VALUE_BYTES)
  ) {
    throw new XksError("InternalException", `agent ${agentId}: malformed Encrypt answer`);
  }
  const out: EncryptWireResponse = {
    ciphertext: b64(r.ciphertext),
    initializationVector: b64(r.iv),
    authenticationTag: b64(r.tag),
  };
  if (len(r.ciphertextMetadata) > 0) out.ciphertextMetadata = b64(r.ciphertextMetadata);
  if (input.wantIntegrityValue) out.ciphertextDataIntegrityValue = b64(r.integrityValue);
  return out;
}
