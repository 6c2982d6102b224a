/**
 * Key administration for `xks-agent keys …`: AES-256 token keys that are
 * sensitive and never extractable, with the usage the owner chooses, so that
 * encrypt-only, decrypt-only and no-usage keys can be made.
 */
import pkcs11js from "pkcs11js";
import { AgentError } from "../shared/errors.ts";
import { EXTERNAL_KEY_ID_RE, EXTERNAL_KEY_ID_RULE, KEY_BYTES } from "../shared/xks-spec.ts";
import type { Hsm, KeyInfo } from "./hsm/hsm.ts";
import { servingRefusals, type ServingPolicy } from "./policy.ts";

export type KeyUsage = "encrypt" | "decrypt";
export const ALL_USAGES: readonly KeyUsage[] = ["encrypt", "decrypt"];

export function parseUsage(text: string): KeyUsage[] {
  if (text === "" || text === "none") return [];
  const parts = text.split(",").map((s) => s.trim().toLowerCase());
  for (const p of parts)
    if (!ALL_USAGES.includes(p as KeyUsage)) throw new Error(`unknown usage ${JSON.stringify(p)} (use encrypt, decrypt or none)`);
  return [...new Set(parts)] as KeyUsage[];
}

/**
 * Generates a secret key on the token under a new label, with the attributes
 * every key the agent makes shares (a token object, private, sensitive, never
 * extractable, not modifiable) plus `own` (its type, length and usage).
 */
function generateSecretKey(hsm: Hsm, label: string, what: string, mechanism: number, own: pkcs11js.Template): KeyInfo {
  if (!EXTERNAL_KEY_ID_RE.test(label)) throw new Error(`a key label must be ${EXTERNAL_KEY_ID_RULE} (the XKS key id rules)`);
  try {
    hsm.key(label);
    throw new AgentError("INVALID_STATE", `a key labelled ${label} already exists`);
  } catch (err) {
    if (!(err instanceof AgentError) || err.reason !== "KEY_NOT_FOUND") throw err;
  }
  hsm.run(what, (p11, s) =>
    p11.C_GenerateKey(s, { mechanism }, [
      { type: pkcs11js.CKA_CLASS, value: pkcs11js.CKO_SECRET_KEY },
      { type: pkcs11js.CKA_LABEL, value: label },
      { type: pkcs11js.CKA_TOKEN, value: true },
      { type: pkcs11js.CKA_PRIVATE, value: true },
      { type: pkcs11js.CKA_SENSITIVE, value: true },
      { type: pkcs11js.CKA_EXTRACTABLE, value: false },
      { type: pkcs11js.CKA_MODIFIABLE, value: false },
      { type: pkcs11js.CKA_WRAP, value: false },
      { type: pkcs11js.CKA_UNWRAP, value: false },
      { type: pkcs11js.CKA_DERIVE, value: false },
      ...own,
    ]),
  );
  hsm.forgetKeys();
  return hsm.key(label);
}

/** An AES-256 key for XKS operations, allowing the usages asked for and nothing else. */
export function createKey(hsm: Hsm, label: string, usage: readonly KeyUsage[]): KeyInfo {
  return generateSecretKey(hsm, label, "generate key", pkcs11js.CKM_AES_KEY_GEN, [
    { type: pkcs11js.CKA_KEY_TYPE, value: pkcs11js.CKK_AES },
    { type: pkcs11js.CKA_VALUE_LEN, value: KEY_BYTES },
    { type: pkcs11js.CKA_ENCRYPT, value: usage.includes("encrypt") },
    { type: pkcs11js.CKA_DECRYPT, value: usage.includes("decrypt") },
    { type: pkcs11js.CKA_SIGN, value: false },
    { type: pkcs11js.CKA_VERIFY, value: false },
  ]);
}

/**
 * The audit log's checkpoint key: a 256-bit generic secret for CKM_SHA256_HMAC
 * (sign and verify only), sensitive and never extractable, so only the token
 * can seal or check a checkpoint.
 */
export function createAuditKey(hsm: Hsm, label: string): KeyInfo {
  return generateSecretKey(hsm, label, "generate audit key", pkcs11js.CKM_GENERIC_SECRET_KEY_GEN, [
    { type: pkcs11js.CKA_KEY_TYPE, value: pkcs11js.CKK_GENERIC_SECRET },
    { type: pkcs11js.CKA_VALUE_LEN, value: 32 },
    { type: pkcs11js.CKA_SIGN, value: true },
    { type: pkcs11js.CKA_VERIFY, value: true },
    { type: pkcs11js.CKA_ENCRYPT, value: false },
    { type: pkcs11js.CKA_DECRYPT, value: false },
  ]);
}

export interface KeyDescription {
  label: string;
  type: string;
  bits: number;
  usage: string[];
  sensitive: boolean;
  extractable: boolean;
  /** Whether KMS may use the key (agent/policy.ts), through the key stores listed in `keyStores`. */
  served: boolean;
  keyStores: string[];
  /** Every reason why it is not served; empty when served. */
  notServed: string[];
}

/** One line of `keys list`: the key's attributes and whether, where and (if not) why not it is served. */
export function describeKey(k: KeyInfo, policy: ServingPolicy): KeyDescription {
  const type =
    k.keyType === pkcs11js.CKK_AES ? "AES" : k.keyType === pkcs11js.CKK_GENERIC_SECRET ? "GENERIC_SECRET" : `0x${k.keyType.toString(16)}`;
  const usage = Object.entries(k.usage)
    .filter(([, on]) => on)
    .map(([n]) => n);
  const notServed = servingRefusals(policy, k.label, "any-key-store", k).map((r) => r.why);
  const keyStores = [...policy.keyStores].filter(([, keys]) => keys.has(k.label)).map(([store]) => store);
  return {
    label: k.label,
    type,
    bits: k.valueLen > 0 ? k.valueLen * 8 : 0,
    usage,
    sensitive: k.sensitive,
    extractable: k.extractable,
    served: notServed.length === 0,
    keyStores,
    notServed,
  };
}
