/**
 * Decrypt: POST [/<prefix>]/kms/xks/v1/keys/<externalKeyId>/decrypt
 * (XKS Proxy API spec §1.6).
 */
import { XksError } from "../../shared/errors.ts";
import { IV_LENGTHS, MAX_CIPHERTEXT_METADATA_BYTES, TAG_BYTES } from "../../shared/xks-spec.ts";
import type { Limits } from "../config.ts";
import { base64Field, exactString, parseRequestMetadata, type Json, type WireRequestMetadata } from "../validate.ts";
import { b64, len, toProtoMetadata, type HandlerContext } from "./context.ts";

/** Defined per XKS Proxy API spec §1.6 (request body). All binary values standard Base64. */
export interface DecryptWireRequest {
  requestMetadata: WireRequestMetadata;
  ciphertext: string;
  encryptionAlgorithm: "AES_GCM";
  initializationVector: string;
  authenticationTag: string;
  additionalAuthenticatedData?: string;
  ciphertextMetadata?: string;
}

/** Defined per XKS Proxy API spec §1.6 (response body). */
export interface DecryptWireResponse {
  plaintext: string;
}

export interface DecryptInput {
  metadata: WireRequestMetadata;
  ciphertext: Buffer;
  iv: Buffer;
  tag: Buffer;
  aad: Buffer;
  ciphertextMetadata: Buffer;
}

export function parseDecryptRequest(body: Json, limits: Limits): DecryptInput {
  const metadata = parseRequestMetadata(body, "Decrypt");
  exactString(body, "encryptionAlgorithm", "AES_GCM", true);
  const ciphertext = base64Field(body, "ciphertext", { required: true, minBytes: 1, maxBytes: limits.maxCiphertextBytes });
  const iv = base64Field(body, "initializationVector", { required: true, lengths: IV_LENGTHS });
  const tag = base64Field(body, "authenticationTag", { required: true, lengths: [TAG_BYTES] });
  const aad = base64Field(body, "additionalAuthenticatedData", { required: false, maxBytes: limits.maxAadBytes });
  const ciphertextMetadata = base64Field(body, "ciphertextMetadata", { required: false });
  if (ciphertextMetadata.length > MAX_CIPHERTEXT_METADATA_BYTES) {
    throw new XksError("ValidationException", `ciphertextMetadata is longer than ${MAX_CIPHERTEXT_METADATA_BYTES} bytes`);
  }
  return { metadata, ciphertext, iv, tag, aad, ciphertextMetadata };
}

export async function decrypt(input: DecryptInput, ctx: HandlerContext): Promise<DecryptWireResponse> {
  const { response: r, agentId } = await ctx.agents.call("Decrypt", {
    metadata: toProtoMetadata(input.metadata, ctx.keyStore),
    keyId: ctx.keyId,
    ciphertext: input.ciphertext,
    iv: input.iv,
    tag: input.tag,
    aad: input.aad,
    ciphertextMetadata: input.ciphertextMetadata,
  });
  ctx.served(agentId);
  if (len(r.plaintext) !== input.ciphertext.length) {
    throw new XksError("InternalException", `agent ${agentId}: malformed Decrypt answer`);
  }
  return { plaintext: b64(r.plaintext) };
}
