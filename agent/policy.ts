/**
 * Which keys the agent serves, and why not the others: the one decision that
 * the operations (agent/ops/) and `xks-agent keys list` share.
 *
 * A KMS operation arriving on key store S may use a key only when
 *   - it is not the health key (that key exists for the deep health check alone),
 *   - the owner's config allow-lists its label for S (S is the proxy's URI path
 *     prefix of the key store, RequestMetadata.keyStore; an unknown or empty S
 *     allow-lists nothing unless the owner listed it),
 *   - it is an AES-256 key, CKA_SENSITIVE and not CKA_EXTRACTABLE.
 * The deep health check uses the health key only, with the same attribute rules.
 *
 * Refusal reasons (shared/errors.ts REASONS, which the proxy maps to the spec's errors):
 *   - not allow-listed, the health key → KEY_NOT_FOUND (404 KeyNotFoundException): to KMS the key
 *     does not exist in that key store, the same answer the proxy gives for a key outside its own
 *     allow-list; the agent says it before touching the HSM, so nothing tells whether the label exists.
 *   - not AES-256 → INVALID_KEY_USAGE (the key cannot do XKS operations at all).
 *   - not sensitive, extractable → INVALID_STATE (400 InvalidStateException, "the external key is
 *     disabled or blocked", valid for every operation): the key could work, the owner's rules block it.
 */
import pkcs11js from "pkcs11js"; // NOT `import * as`: under ESM that loses every constant
import { AgentError, type Reason } from "../shared/errors.ts";
import { KEY_BYTES } from "../shared/xks-spec.ts";
import type { KeyInfo } from "./hsm/hsm.ts";

/** One entry of the config's `keyStores`: the labels KMS may use through one key store. */
export interface KeyStoreAllowList {
  /** The key store's URI path prefix as the proxy sends it in RequestMetadata.keyStore. */
  keyStore: string;
  keys: readonly string[];
}

/** What the decision needs from the agent's settings. */
export interface ServingPolicy {
  /** Label of the dedicated health-check key. */
  healthKey: string;
  /** Key store → labels allow-listed for it. */
  keyStores: ReadonlyMap<string, ReadonlySet<string>>;
}

/** The config's allow-lists as the lookup ServingPolicy uses. */
export function allowListMap(stores: readonly KeyStoreAllowList[]): ReadonlyMap<string, ReadonlySet<string>> {
  return new Map(stores.map((s) => [s.keyStore, new Set(s.keys)]));
}

/**
 * What a key is being used for: a KMS operation that arrived on a key store,
 * any configured key store (`keys list`), or the agent's deep health check.
 */
export type KeyUse = { keyStore: string } | "any-key-store" | "health-check";

export interface Refusal {
  reason: Reason;
  /** For the owner's log and `keys list`; names the key and the rule, never a secret. */
  why: string;
}

/**
 * Every reason why `label` is not served for `use`, in order; empty when it is
 * served. Without `key` (its attributes, read from the HSM) only the rules that
 * need no HSM are applied, so a caller can refuse before any HSM work.
 */
export function servingRefusals(policy: ServingPolicy, label: string, use: KeyUse, key?: KeyInfo): Refusal[] {
  const out: Refusal[] = [];
  const notFound = (why: string) => out.push({ reason: "KEY_NOT_FOUND", why });
  if (use === "health-check") {
    if (label !== policy.healthKey) notFound(`key ${label} is not the health key`);
  } else if (label === policy.healthKey) {
    notFound(`key ${label} is the health key, never served for KMS operations`);
  } else if (use === "any-key-store") {
    if (![...policy.keyStores.values()].some((keys) => keys.has(label))) notFound(`key ${label} is not allow-listed for any key store`);
  } else {
    const keys = policy.keyStores.get(use.keyStore);
    const store = JSON.stringify(use.keyStore);
    if (!keys) notFound(`key store ${store} is not in the agent's keyStores`);
    else if (!keys.has(label)) notFound(`key ${label} is not allow-listed for key store ${store}`);
  }
  if (key) {
    if (key.keyType !== pkcs11js.CKK_AES) {
      out.push({ reason: "INVALID_KEY_USAGE", why: `key ${label} is not an AES key (CKA_KEY_TYPE 0x${key.keyType.toString(16)})` });
    } else if (key.valueLen !== KEY_BYTES) {
      out.push({ reason: "INVALID_KEY_USAGE", why: `key ${label} is AES-${key.valueLen * 8}, XKS needs AES-256` });
    }
    if (!key.sensitive) out.push({ reason: "INVALID_STATE", why: `key ${label} is not sensitive (CKA_SENSITIVE is false)` });
    if (key.extractable) out.push({ reason: "INVALID_STATE", why: `key ${label} is extractable (CKA_EXTRACTABLE is true)` });
  }
  return out;
}

/** Throws the first refusal of {@link servingRefusals} as an AgentError; returns when the key is served. */
export function refuseUnlessServed(policy: ServingPolicy, label: string, use: KeyUse, key?: KeyInfo): void {
  const [first] = servingRefusals(policy, label, use, key);
  if (first) throw new AgentError(first.reason, first.why);
}
