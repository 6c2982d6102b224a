/**
 * SigV4 credentials for a KMS external key store: minted by the proxy (the
 * spec lets the proxy choose them), with the KMS console's "proxy
 * configuration file" that hands them to KMS.
 */
import { randomBytes } from "node:crypto";
import { API_BASE } from "./routes.ts";

const BASE32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

/** RFC 4648 base32 without padding. */
export function base32(bytes: Uint8Array): string {
  let out = "";
  let bits = 0;
  let value = 0;
  for (const b of bytes) {
    value = (value << 8) | b;
    bits += 8;
    while (bits >= 5) {
      out += BASE32[(value >>> (bits - 5)) & 31];
      bits -= 5;
    }
  }
  if (bits > 0) out += BASE32[(value << (5 - bits)) & 31];
  return out;
}

export interface NewCredential {
  accessKeyId: string;
  secretAccessKey: string;
  /** The KMS console's "proxy configuration file" for CreateCustomKeyStore. */
  proxyConfigurationFile: {
    XksProxyUriPath: string;
    XksProxyAuthenticationCredential: { AccessKeyId: string; RawSecretAccessKey: string };
  };
}

/**
 * A fresh credential: access key id = base32 of 16 random bytes (26 chars of
 * A-Z2-7, spec: 20–30), secret = base64 of 32 random bytes (44 chars, 256 bits,
 * spec: 43–64 of a-zA-Z0-9/+=).
 */
export function newCredential(prefix = ""): NewCredential {
  const accessKeyId = base32(randomBytes(16));
  const secretAccessKey = randomBytes(32).toString("base64");
  return {
    accessKeyId,
    secretAccessKey,
    proxyConfigurationFile: {
      XksProxyUriPath: `${prefix}${API_BASE}`,
      XksProxyAuthenticationCredential: { AccessKeyId: accessKeyId, RawSecretAccessKey: secretAccessKey },
    },
  };
}
