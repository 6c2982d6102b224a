/**
 * The XKS URI table, in one place (XKS Proxy API spec §1.2):
 *
 *   [/<prefix>]/kms/xks/v1/keys/<externalKeyId>/metadata   GetKeyMetadata
 *   [/<prefix>]/kms/xks/v1/keys/<externalKeyId>/encrypt    Encrypt
 *   [/<prefix>]/kms/xks/v1/keys/<externalKeyId>/decrypt    Decrypt
 *   [/<prefix>]/kms/xks/v1/health                          GetHealthStatus
 *
 * Resolution works on the raw path as sent (no decoding, no normalisation), so
 * what is routed is exactly what was signed. An unknown prefix or path is a
 * 404 InvalidUriPathException, decided before any signature check.
 */
import type { KeyStoreConfig } from "./config.ts";

export type Operation = "GetKeyMetadata" | "Encrypt" | "Decrypt" | "GetHealthStatus";

export const API_BASE = "/kms/xks/v1";

export interface ParsedPath {
  prefix: string;
  operation: Operation;
  /** The externalKeyId segment (raw) for key operations. */
  keyId?: string;
}

const PATH_RE = /^(.*)\/kms\/xks\/v1\/(?:(health)|keys\/([^/]+)\/(metadata|encrypt|decrypt))$/;
const OP_BY_SEGMENT = { metadata: "GetKeyMetadata", encrypt: "Encrypt", decrypt: "Decrypt" } as const;

/**
 * Splits a raw path into (prefix, operation, keyId). The suffix is anchored at
 * the end, so the split is unique; the prefix is then looked up exactly.
 */
export function parseXksPath(rawPath: string): ParsedPath | undefined {
  const m = PATH_RE.exec(rawPath);
  if (!m) return undefined;
  const prefix = m[1];
  if (m[2] === "health") return { prefix, operation: "GetHealthStatus" };
  return { prefix, operation: OP_BY_SEGMENT[m[4] as keyof typeof OP_BY_SEGMENT], keyId: m[3] };
}

/** The path part of a request target (`req.originalUrl`), and its raw query. */
export function splitTarget(target: string): { path: string; query: string } {
  const q = target.indexOf("?");
  return q < 0 ? { path: target, query: "" } : { path: target.slice(0, q), query: target.slice(q + 1) };
}

/**
 * The configured key stores by prefix. Replaceable as a whole (credential
 * rotation or key allow-list changes on SIGHUP) without rebuilding the app.
 */
export class KeyStoreRegistry {
  private byPrefix = new Map<string, Readonly<KeyStoreConfig>>();

  constructor(stores: readonly Readonly<KeyStoreConfig>[]) {
    this.replace(stores);
  }

  replace(stores: readonly Readonly<KeyStoreConfig>[]): void {
    this.byPrefix = new Map(stores.map((s) => [s.uriPathPrefix, s]));
  }

  get(prefix: string): Readonly<KeyStoreConfig> | undefined {
    return this.byPrefix.get(prefix);
  }

  prefixes(): string[] {
    return [...this.byPrefix.keys()];
  }
}
