/**
 * A real SoftHSM v2 token in a folder of its own, and the named key sets the
 * tests, the demo and the bench put on it. Sets SOFTHSM2_CONF in this
 * process's environment (pkcs11js reads it at C_Initialize) and returns it for
 * child processes too.
 */
import { execFileSync } from "node:child_process";
import pkcs11js from "pkcs11js";
import { cpSync, existsSync, mkdirSync, mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Hsm } from "../agent/hsm/hsm.ts";
import { createAuditKey, createKey, type KeyUsage } from "../agent/keys.ts";
import type { AgentOpContext } from "../agent/ops/context.ts";
import { allowListMap } from "../agent/policy.ts";
import { createLogger } from "../shared/logging.ts";

export const SOFTHSM_MODULE_CANDIDATES = [
  "/usr/lib/softhsm/libsofthsm2.so",
  "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
  "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
  "/opt/homebrew/lib/softhsm/libsofthsm2.so",
  "/usr/local/lib/softhsm/libsofthsm2.so",
];

export function findSoftHsmModule(): string {
  const found = SOFTHSM_MODULE_CANDIDATES.find((p) => existsSync(p));
  if (!found) throw new Error(`SoftHSM v2 not found (looked in ${SOFTHSM_MODULE_CANDIDATES.join(", ")}); install softhsm2`);
  return found;
}

export interface SoftHsmToken {
  dir: string;
  conf: string;
  module: string;
  tokenLabel: string;
  pin: string;
  soPin: string;
  env: Record<string, string>;
}

export function createSoftHsmToken(opts: { dir?: string; tokenLabel?: string; pin?: string } = {}): SoftHsmToken {
  const dir = opts.dir ?? mkdtempSync(join(tmpdir(), "xks-softhsm-"));
  const { conf } = writeSoftHsmConf(dir);
  const tokenLabel = opts.tokenLabel ?? "xks-test";
  const pin = opts.pin ?? "1234-test-pin";
  const soPin = "5678-so-pin";
  const env = { SOFTHSM2_CONF: conf };
  execFileSync("softhsm2-util", ["--init-token", "--free", "--label", tokenLabel, "--so-pin", soPin, "--pin", pin], {
    env: { ...process.env, ...env },
    stdio: ["ignore", "ignore", "pipe"],
  });
  process.env.SOFTHSM2_CONF = conf;
  return { dir, conf, module: findSoftHsmModule(), tokenLabel, pin, soPin, env };
}

/** Writes the softhsm2.conf a token folder uses: its tokens in `<dir>/tokens`. */
function writeSoftHsmConf(dir: string): { conf: string; tokens: string } {
  const tokens = join(dir, "tokens");
  mkdirSync(tokens, { recursive: true, mode: 0o700 });
  const conf = join(dir, "softhsm2.conf");
  writeFileSync(
    conf,
    [
      `directories.tokendir = ${tokens}`,
      "objectstore.backend = file",
      "log.level = ERROR",
      "slots.removable = false",
      "slots.mechanisms = ALL",
      "library.reset_on_fork = false",
      "",
    ].join("\n"),
  );
  return { conf, tokens };
}

/**
 * A clone of `src` in `dir`: its token files copied as they are (the same
 * token, serial, PIN and keys), under a softhsm2.conf of its own. Unlike
 * createSoftHsmToken, this process's SOFTHSM2_CONF is left alone.
 */
export function cloneSoftHsmToken(src: SoftHsmToken, dir: string): SoftHsmToken {
  const { conf, tokens } = writeSoftHsmConf(dir);
  cpSync(join(src.dir, "tokens"), tokens, { recursive: true });
  return { ...src, dir, conf, env: { SOFTHSM2_CONF: conf } };
}

/** The roles a key set fills: one key per usage case, and the agent's health key. */
export interface KeySet {
  default: string;
  encryptOnly: string;
  decryptOnly: string;
  noUsage: string;
  health: string;
}

export const KEY_USAGE: Record<keyof KeySet, KeyUsage[]> = {
  default: ["encrypt", "decrypt"],
  encryptOnly: ["encrypt"],
  decryptOnly: ["decrypt"],
  noUsage: [],
  health: ["encrypt", "decrypt"],
};

/** The label of the audit log's HMAC key on every token the test-bed makes (the agent config's default audit.key). */
export const AUDIT_KEY = "xks-audit";

/** Labels for the tests. */
export const TEST_KEYS: KeySet = {
  default: "foo",
  encryptOnly: "enc-only",
  decryptOnly: "dec-only",
  noUsage: "no-usage",
  health: "xks-health",
};

/** Labels for the demo and the bench (what a person reads in their output). */
export const DEMO_KEYS: KeySet = {
  default: "demo-key",
  encryptOnly: "demo-encrypt-only",
  decryptOnly: "demo-decrypt-only",
  noUsage: "demo-no-usage",
  health: "xks-health",
};

/** The keys a KMS key store may use: every key of the set but the health key. */
export function kmsKeys(keys: KeySet): string[] {
  return [keys.default, keys.encryptOnly, keys.decryptOnly, keys.noUsage];
}

/**
 * Creates every key of `keys` on the token with the agent's own key creation
 * (AES-256, sensitive, never extractable, usage per role), through an Hsm
 * that is closed again afterwards, and the audit log's HMAC key (AUDIT_KEY).
 */
export function createKeySet(token: SoftHsmToken, keys: KeySet): void {
  const hsm = new Hsm({ module: token.module, tokenLabel: token.tokenLabel, pin: token.pin }, createLogger({ level: "silent" }));
  try {
    hsm.open();
    for (const role of Object.keys(KEY_USAGE) as Array<keyof KeySet>) createKey(hsm, keys[role], KEY_USAGE[role]);
    createAuditKey(hsm, AUDIT_KEY);
  } finally {
    hsm.close();
  }
}

/**
 * An AES key made straight through PKCS#11, outside the agent's own key
 * creation, for what the agent must refuse: another length (e.g. AES-128), an
 * extractable key, a key that is not sensitive (sensitive defaults to
 * !extractable). A key that is extractable and not sensitive has its value
 * returned (PKCS#11 reveals CKA_VALUE of no other key).
 */
export function createRawAesKey(
  hsm: Hsm,
  label: string,
  o: { bytes: number; extractable: boolean; sensitive?: boolean },
): Buffer | undefined {
  const sensitive = o.sensitive ?? !o.extractable;
  return hsm.run("test key", (p11, s) => {
    const k = p11.C_GenerateKey(s, { mechanism: pkcs11js.CKM_AES_KEY_GEN }, [
      { type: pkcs11js.CKA_CLASS, value: pkcs11js.CKO_SECRET_KEY },
      { type: pkcs11js.CKA_KEY_TYPE, value: pkcs11js.CKK_AES },
      { type: pkcs11js.CKA_VALUE_LEN, value: o.bytes },
      { type: pkcs11js.CKA_LABEL, value: label },
      { type: pkcs11js.CKA_TOKEN, value: true },
      { type: pkcs11js.CKA_PRIVATE, value: true },
      { type: pkcs11js.CKA_SENSITIVE, value: sensitive },
      { type: pkcs11js.CKA_EXTRACTABLE, value: o.extractable },
      { type: pkcs11js.CKA_ENCRYPT, value: true },
      { type: pkcs11js.CKA_DECRYPT, value: true },
    ]);
    return sensitive || !o.extractable ? undefined : (p11.C_GetAttributeValue(s, k, [{ type: pkcs11js.CKA_VALUE }])[0].value as Buffer);
  });
}

/**
 * An AES-256 key with a value the test knows, imported (C_CreateObject) as
 * sensitive and never extractable, so the agent serves it and a test can check
 * its output with Node's own AES-GCM. Needs the real module (pkcs11js).
 */
export function importAesKey(hsm: Hsm, label: string, value: Buffer): void {
  hsm.run("import test key", (p11, s) => {
    if (!(p11 instanceof pkcs11js.PKCS11)) throw new Error("importAesKey needs the pkcs11js port");
    p11.C_CreateObject(s, [
      { type: pkcs11js.CKA_CLASS, value: pkcs11js.CKO_SECRET_KEY },
      { type: pkcs11js.CKA_KEY_TYPE, value: pkcs11js.CKK_AES },
      { type: pkcs11js.CKA_VALUE, value },
      { type: pkcs11js.CKA_LABEL, value: label },
      { type: pkcs11js.CKA_TOKEN, value: true },
      { type: pkcs11js.CKA_PRIVATE, value: true },
      { type: pkcs11js.CKA_SENSITIVE, value: true },
      { type: pkcs11js.CKA_EXTRACTABLE, value: false },
      { type: pkcs11js.CKA_ENCRYPT, value: true },
      { type: pkcs11js.CKA_DECRYPT, value: true },
    ]);
  });
}

/** The key use of direct operation calls: the key store directOpContext allow-lists its `serve` labels for. */
export const DIRECT_USE = { keyStore: "/direct-calls" } as const;

/**
 * What the agent's operations need, for calling them directly on `hsm` (no
 * server, no owner switches); the labels in `serve` are allow-listed for
 * DIRECT_USE.
 */
export function directOpContext(hsm: Hsm, o: Partial<AgentOpContext> & { serve?: string[] } = {}): AgentOpContext {
  const { serve = [], ...over } = o;
  return {
    hsm,
    ciphertextMetadata: Buffer.from("xks-agent/1"),
    healthKey: "xks-health",
    keyStores: allowListMap([{ keyStore: DIRECT_USE.keyStore, keys: serve }]),
    agentId: "direct",
    isKeyDisabled: () => false,
    rules: () => undefined,
    tunnels: () => [],
    ...over,
  };
}

/**
 * Runs `fn` on an Hsm opened on `token` in this process, through `conf` (default: the
 * token's own softhsm2.conf; SoftHSM reads SOFTHSM2_CONF at each C_Initialize).
 */
export function onToken<T>(token: SoftHsmToken, fn: (hsm: Hsm) => T, conf = token.conf): T {
  const before = process.env.SOFTHSM2_CONF;
  process.env.SOFTHSM2_CONF = conf;
  const hsm = new Hsm({ module: token.module, tokenLabel: token.tokenLabel, pin: token.pin }, createLogger({ level: "silent" }));
  try {
    hsm.open();
    return fn(hsm);
  } finally {
    hsm.close();
    process.env.SOFTHSM2_CONF = before;
  }
}
