/**
 * The XKS Proxy API's fixed numbers and formats, used by both daemons: the
 * proxy checks requests and the agent's answers against them, the agent makes
 * its answers and checks its config against them.
 */

/** externalKeyId (KMS XksKeyId): 1-128 characters of [a-zA-Z0-9-_.]. On the agent it is the key's CKA_LABEL. */
export const EXTERNAL_KEY_ID_RE = /^[a-zA-Z0-9\-_.]{1,128}$/;
export const MAX_EXTERNAL_KEY_ID_CHARS = 128;
/** The rule above in words, for error messages and hints. */
export const EXTERNAL_KEY_ID_RULE = "1-128 characters of [a-zA-Z0-9-_.]";

/** XKS keys are AES_256 (spec §1.4): 32-byte keys. */
export const KEY_BYTES = 32;

/** ciphertextMetadata is at most 20 bytes (spec §1.5); KMS rejects an Encrypt answer with more. */
export const MAX_CIPHERTEXT_METADATA_BYTES = 20;

/** initializationVector lengths KMS accepts from Encrypt and sends to Decrypt (spec §1.5, §1.6). */
export const IV_LENGTHS: readonly number[] = [12, 16];
/** The IV this implementation makes: 12 bytes (96 bits, GCM's native size), one of IV_LENGTHS. */
export const GENERATED_IV_BYTES = 12;

export function isIvLength(bytes: number): boolean {
  return IV_LENGTHS.includes(bytes);
}

/** authenticationTag: 16 bytes (128 bits) (spec §1.5, §1.6). */
export const TAG_BYTES = 16;

/** ciphertextDataIntegrityValue: a SHA-256 digest (spec Appendix C). */
export const INTEGRITY_VALUE_BYTES = 32;

/**
 * The largest AAD the AAD layout handed to the HSM can carry (spec §4: the AAD
 * length is a big-endian uint16).
 */
export const MAX_LAYOUT_AAD_BYTES = 0xffff;

/** Sizes an implementation must support at least (spec §1.5, §1.6): plaintext (and so ciphertext) and AAD. */
export const SPEC_MIN_PLAINTEXT_BYTES = 4300;
export const SPEC_MIN_AAD_BYTES = 8192;

/** requestMetadata values (spec §1.3): the longest is an ARN of up to 2048 characters. */
export const MAX_METADATA_CHARS = 2048;

/**
 * The largest plaintext or ciphertext a proxy may be configured to pass on
 * (proxy limits.maxPlaintextBytes / maxCiphertextBytes at most). The agent
 * refuses anything larger, whatever the proxy sent.
 */
export const MAX_DATA_BYTES_LIMIT = 1 << 20;

/** The RequestMetadata strings the proxy passes to the agent (the seven of spec §1.3, and the key store). */
export const METADATA_FIELD_COUNT = 8;

/**
 * A key store's URI path prefix (spec §1.2: XksProxyUriPath is 10-128 characters of
 * [a-zA-Z0-9/_-] and ends in /kms/xks/v1): "" or "/" and 8-116 more of those characters.
 */
export const PREFIX_RE = /^\/[a-zA-Z0-9/_-]{8,116}$/;

/** Why a URI path prefix is invalid, or undefined when it is fine ("" is fine). */
export function prefixProblem(prefix: string): string | undefined {
  if (prefix === "") return undefined;
  if (/\/kms\/xks\/v1\/?$/.test(prefix)) return 'must not end with "/kms/xks/v1": give the prefix without /kms/xks/v1 (KMS appends it)';
  if (!PREFIX_RE.test(prefix)) return 'must be "" or 9-117 characters of [a-zA-Z0-9/_-] starting with "/"';
  if (prefix.endsWith("/")) return 'must not end with "/"';
  if (prefix.includes("//")) return 'must not contain "//"';
  return undefined;
}
