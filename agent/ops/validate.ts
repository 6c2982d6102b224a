/**
 * What reaches the agent, checked as if the proxy were hostile: the same caps
 * the proxy applies to KMS's requests (proxy/validate.ts, shared/xks-spec.ts),
 * before any HSM work. Every failure is VALIDATION (the proxy's
 * ValidationException) and its detail names the field and its size, never
 * its content. Key ids are refused, never truncated.
 */
import { AgentError } from "../../shared/errors.ts";
import type { RequestMetadata } from "../../shared/proto.ts";
import {
  EXTERNAL_KEY_ID_RE,
  EXTERNAL_KEY_ID_RULE,
  MAX_DATA_BYTES_LIMIT,
  MAX_EXTERNAL_KEY_ID_CHARS,
  MAX_LAYOUT_AAD_BYTES,
  MAX_METADATA_CHARS,
} from "../../shared/xks-spec.ts";

const invalid = (detail: string): never => {
  throw new AgentError("VALIDATION", detail);
};

const METADATA_FIELDS = [
  "awsPrincipalArn",
  "kmsKeyArn",
  "kmsOperation",
  "kmsRequestId",
  "kmsViaService",
  "awsSourceVpc",
  "awsSourceVpce",
  "keyStore",
] as const satisfies readonly (keyof RequestMetadata)[];

/** A string field of at most `max` characters. */
export function checkLength(field: string, value: string | undefined, max: number): void {
  if (value !== undefined && value.length > max) invalid(`${field} is ${value.length} characters, more than ${max}`);
}

/** A key id by the spec's rule (1-128 characters of [a-zA-Z0-9-_.]). */
export function checkKeyId(keyId: string): void {
  checkLength("keyId", keyId, MAX_EXTERNAL_KEY_ID_CHARS);
  if (!EXTERNAL_KEY_ID_RE.test(keyId)) invalid(`keyId is not ${EXTERNAL_KEY_ID_RULE}`);
}

/** The byte fields of a key operation, by the largest a proxy may pass on. */
export interface KeyOpBytes {
  plaintext?: Buffer;
  ciphertext?: Buffer;
  aad?: Buffer;
}

/**
 * A KMS key operation's request: metadata present with every string within
 * the spec's longest value, a valid key id, data within the largest any proxy
 * may be configured for, AAD within what the AAD layout carries. Returns the
 * key store the request arrived on, for the allow-list.
 */
export function checkKeyRequest(req: { metadata?: RequestMetadata | null; keyId: string } & KeyOpBytes): { keyStore: string } {
  const m = req.metadata;
  if (!m) return invalid("request metadata is missing");
  for (const f of METADATA_FIELDS) checkLength(`metadata.${f}`, m[f], MAX_METADATA_CHARS);
  checkKeyId(req.keyId);
  for (const f of ["plaintext", "ciphertext"] as const) {
    const b = req[f];
    if (b && b.length > MAX_DATA_BYTES_LIMIT) invalid(`${f} is ${b.length} bytes, more than ${MAX_DATA_BYTES_LIMIT}`);
  }
  if (req.aad && req.aad.length > MAX_LAYOUT_AAD_BYTES) invalid(`aad is ${req.aad.length} bytes, more than ${MAX_LAYOUT_AAD_BYTES}`);
  return { keyStore: m.keyStore };
}
