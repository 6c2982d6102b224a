/**
 * `xks-agent check --config FILE`: a preflight of everything the agent needs, without starting
 * it. A list of items, each printed ✓ or ✗ (with a fix hint), or "-" when an item it depends on
 * failed; the exit code is non-zero when any item failed.
 *
 * Items are plain entries in the lists below (configItems, HSM_ITEMS, keyItems, tunnelItems; the
 * ones built from the config are functions of it): a new check is one more entry. An item
 * returns a detail for ✓ or throws a CheckFailure for ✗ (CheckSkipped for "-"); an item marked
 * `needs: "config"` or `"hsm"` is skipped when the config is invalid or the HSM did not open.
 * keysNamedBy() lists the keys the config names: the health key and every allow-listed key.
 *
 * Nothing secret is printed: config problems name fields, never values, and the PIN, the keys and
 * the passphrases stay in memory. The HSM is logged into at most once; each tunnel's sshd is
 * dialled once, its host key checked against the pin, the login completed, and the connection
 * closed again without a forward.
 */
import { readFileSync, rmSync } from "node:fs";
import { dirname, isAbsolute, resolve } from "node:path";
import ssh2 from "ssh2";
import { ConfigError, secretFileProblem } from "../shared/config.ts";
import { errorMessage } from "../shared/errors.ts";
import { createLogger } from "../shared/logging.ts";
import { type AgentConfig, loadAgentConfig, privateKeyProblem } from "./config.ts";
import { Controls, controlsFix } from "./controls.ts";
import { Hsm, HsmOpenError } from "./hsm/hsm.ts";
import { refusalMemoFile } from "./main.ts";
import { getHealthStatus } from "./ops/get-health-status.ts";
import { allowListMap, loadPolicyFile, refuseUnlessServed } from "./policy.ts";
import { fingerprintOf, isAuthFailure, pinnedHostKey, pinsText, sshLogin, type TunnelTarget } from "./tunnel.ts";

/** A failed item: what is wrong, and how to fix it. */
export class CheckFailure extends Error {
  constructor(
    message: string,
    readonly fix: string,
  ) {
    super(message);
    this.name = "CheckFailure";
  }
}

/** Thrown by an item that cannot say anything because an earlier item failed. */
export class CheckSkipped extends Error {
  constructor(why: string) {
    super(why);
    this.name = "CheckSkipped";
  }
}

/** What the items share: the config file, and once loaded, the config and the opened HSM. */
export interface CheckSession {
  file: string;
  /** The config file as JSON, if it could be read and parsed. */
  raw?: unknown;
  config?: AgentConfig;
  /** The HSM (needs the config). */
  hsm(): Hsm;
  /** Opens the HSM (module, token, login) the first time; answers that first attempt's failure, if any. */
  openHsm(): Error | undefined;
}

export interface CheckItem {
  name: string;
  /** Skip this item when the config is invalid ("config") or the HSM did not open ("hsm"). */
  needs?: "config" | "hsm";
  /** Returns a detail for ✓; throws a CheckFailure for ✗ (any other error is a ✗ too). */
  run(s: CheckSession): string | undefined | Promise<string | undefined>;
}

export type CheckOutcome = { item: string; result: "ok" | "failed" | "skipped"; detail?: string; fix?: string };

const fixConfig = (file: string) => `correct the fields listed in ${file}; the README describes each one`;

/** Every `{"file": path}` in the config: the references to secret files, with where they are. */
function secretFileRefs(raw: unknown, file: string): Array<{ field: string; path: string }> {
  const out: Array<{ field: string; path: string }> = [];
  const walk = (v: unknown, field: string) => {
    if (typeof v !== "object" || v === null) return;
    if (Array.isArray(v)) {
      for (const [i, x] of v.entries()) walk(x, `${field}[${i}]`);
      return;
    }
    const o = v as Record<string, unknown>;
    const keys = Object.keys(o);
    if (keys.length === 1 && keys[0] === "file" && typeof o.file === "string") {
      out.push({ field, path: isAbsolute(o.file) ? o.file : resolve(dirname(file), o.file) });
      return;
    }
    for (const k of keys) walk(o[k], field ? `${field}.${k}` : k);
  };
  walk(raw, "");
  return out;
}

/** The keys the config names, each of which must be on the token. */
export function keysNamedBy(config: AgentConfig): string[] {
  return [...new Set([config.healthKey, ...config.keyStores.flatMap((s) => s.keys)])];
}

/** Before the HSM: the file, its secret files, the config itself. */
function configItems(s: CheckSession): CheckItem[] {
  const items: CheckItem[] = [];
  for (const ref of s.raw === undefined ? [] : secretFileRefs(s.raw, s.file)) {
    items.push({
      name: `secret file ${ref.field} is private`,
      run: () => {
        const problem = secretFileProblem(ref.path);
        if (problem) throw new CheckFailure(problem, `chmod 600 ${ref.path} (and make it owned by the user that runs the agent)`);
        return ref.path;
      },
    });
  }
  items.push({
    name: "config is valid",
    run: (s) => {
      s.config = loadAgentConfig(s.file);
      return s.file;
    },
  });
  items.push({
    name: "the channel identity and the pinned proxies",
    needs: "config",
    // The config load has already checked that the key belongs to the certificate and that each pin
    // is a certificate; this prints what a proxy operator must pin and what this agent accepts.
    run: (s) =>
      `this agent ${s.config!.identity.fingerprint}; accepts proxies ${s.config!.proxyIdentities.map((p) => p.fingerprint).join(", ")}`,
  });
  items.push({
    name: "the owner controls file is valid",
    needs: "config",
    run: (s) => {
      const controls = new Controls(s.config!.stateFile);
      if (controls.problem) throw new CheckFailure(controls.problem, controlsFix(s.file));
      if (controls.paused) return "valid (the agent is PAUSED by the owner: xks-agent resume lets KMS in)";
      return undefined;
    },
  });
  // Listed when the config names a policy file (agent/policy.ts).
  const raw = s.raw as Record<string, unknown> | undefined;
  if (raw !== null && typeof raw === "object" && raw.policy !== undefined)
    items.push({
      name: "the policy file is valid",
      needs: "config",
      run: (s) => {
        const file = s.config!.policy!;
        try {
          const p = loadPolicyFile(file, allowListMap(s.config!.keyStores));
          return `${file}: ${p.rules.length} rules, default ${p.default}, mode ${p.mode}`;
        } catch (err) {
          if (!(err instanceof ConfigError)) throw err;
          throw new CheckFailure(err.message, `correct the fields listed in ${file}; the README's "The owner's policy" describes each one`);
        }
      },
    });
  return items;
}

function failedAt(err: Error | undefined, stages: string[]): Error | undefined {
  if (err === undefined) return undefined;
  if (err instanceof HsmOpenError) return stages.includes(err.stage) ? err : undefined;
  return err;
}

const HSM_ITEMS: CheckItem[] = [
  {
    name: "the PKCS#11 module loads",
    needs: "config",
    run: (s) => {
      const err = failedAt(s.openHsm(), ["module"]);
      if (err) throw new CheckFailure(err.message, `check pkcs11.module (${s.config!.pkcs11.module}); install the module or fix the path`);
      return s.config!.pkcs11.module;
    },
  },
  {
    name: "the token is found",
    needs: "config",
    run: (s) => {
      const err = s.openHsm();
      if (err instanceof HsmOpenError && err.stage === "module") throw new CheckSkipped("the module did not load");
      const at = failedAt(err, ["token"]);
      if (at) throw new CheckFailure(at.message, "check pkcs11.tokenLabel against the labels listed (softhsm2-util --show-slots)");
      return `label ${JSON.stringify(s.config!.pkcs11.tokenLabel)}`;
    },
  },
  {
    name: "login with the PIN works",
    needs: "config",
    run: (s) => {
      const err = s.openHsm();
      if (err instanceof HsmOpenError && err.stage !== "login") throw new CheckSkipped("the token was not reached");
      if (err) throw new CheckFailure(err.message, "fix the PIN that pkcs11.pin refers to (one login was tried)");
      // The PIN works: a refusal remembered by an earlier `run` no longer holds.
      rmSync(refusalMemoFile(s.config!), { force: true });
      const t = s.hsm().tokenInfo();
      return `${t.manufacturer} ${t.model}, serial ${t.serial}`;
    },
  },
  {
    name: "the health key is found and usable",
    needs: "hsm",
    run: (s) => {
      const cfg = s.config!;
      const h = getHealthStatus({
        hsm: s.hsm(),
        ciphertextMetadata: cfg.ciphertextMetadata,
        healthKey: cfg.healthKey,
        agentId: cfg.agentId,
        keyStores: allowListMap(cfg.keyStores),
        isKeyDisabled: () => false,
        rules: () => undefined,
        tunnels: () => [],
      });
      if (h.state !== "ACTIVE")
        throw new CheckFailure(
          `${cfg.healthKey}: ${h.detail}`,
          `create it: xks-agent keys create --config ${s.file} --label ${cfg.healthKey} (AES-256, encrypt and decrypt)`,
        );
      return `${cfg.healthKey}: an encrypt and decrypt round trip works`;
    },
  },
  {
    name: "the audit key seals checkpoints (HMAC-SHA256 in the HSM)",
    needs: "hsm",
    run: (s) => {
      const key = s.config!.audit.key;
      try {
        s.hsm().hmacSha256(key, Buffer.from("xks-agent check"));
      } catch (err) {
        throw new CheckFailure(
          `${key}: ${errorMessage(err)}`,
          `create it: xks-agent keys create --config ${s.file} --type audit --label ${key}`,
        );
      }
      return `${key}: sensitive, never extractable, signs with CKM_SHA256_HMAC`;
    },
  },
];

function keyItems(s: CheckSession): CheckItem[] {
  return (s.config ? keysNamedBy(s.config) : []).map((label) => ({
    name: `key ${label} is on the token and can be served (AES-256, sensitive, not extractable)`,
    needs: "hsm" as const,
    run: (s: CheckSession) => {
      const cfg = s.config!;
      const policy = { healthKey: cfg.healthKey, keyStores: allowListMap(cfg.keyStores) };
      try {
        refuseUnlessServed(policy, label, label === cfg.healthKey ? "health-check" : "any-key-store", s.hsm().key(label));
      } catch (err) {
        throw new CheckFailure(errorMessage(err), `create it with xks-agent keys create --config ${s.file} --label ${label}`);
      }
      return undefined;
    },
  }));
}

/** Dials the tunnel's sshd once: pinned host key, then authentication, then disconnect. */
function probeTunnel(t: TunnelTarget): Promise<string> {
  return new Promise((resolvePromise, reject) => {
    const conn = new ssh2.Client();
    let seen: string | undefined;
    let settled = false;
    const settle = (fn: () => void) => {
      if (settled) return;
      settled = true;
      fn();
      conn.end();
    };
    conn.on("ready", () => settle(() => resolvePromise(`host key ${seen} as pinned; authenticated as ${t.username}`)));
    conn.on("error", (err) =>
      settle(() => {
        if (seen !== undefined && !pinnedHostKey(t, seen)) {
          reject(
            new CheckFailure(
              `host key verification failed: expected ${pinsText(t)}, seen ${seen}`,
              `if ${t.host} really has a new host key (check it on the host: ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub), set hostKeyFingerprint to it; otherwise someone is in the way`,
            ),
          );
        } else if (isAuthFailure(err)) {
          reject(
            new CheckFailure(
              `authentication refused for user ${t.username}: ${err.message}`,
              `add the public key of privateKey to ${t.username}'s authorized_keys on ${t.host} (deploy/EC2.md)`,
            ),
          );
        } else {
          reject(new CheckFailure(err.message, `check host and port (${t.host}:${t.port}) and that sshd runs and is reachable from here`));
        }
      }),
    );
    conn.on("close", () => settle(() => reject(new CheckFailure("connection closed before login", "check the sshd logs on the host"))));
    try {
      conn.connect({
        ...sshLogin(t),
        hostVerifier: (key: Buffer): boolean => {
          seen = fingerprintOf(key);
          return pinnedHostKey(t, seen);
        },
        readyTimeout: t.readyTimeoutMs ?? 10_000,
      });
    } catch (err) {
      settle(() => reject(new CheckFailure(errorMessage(err), "check the tunnel's privateKey")));
    }
  });
}

function tunnelItems(s: CheckSession): CheckItem[] {
  return (s.config?.tunnels ?? []).flatMap((t, i): CheckItem[] => [
    {
      name: `tunnel ${t.name}: the SSH private key parses`,
      needs: "config",
      run: () => {
        const problem = privateKeyProblem(t.privateKey, t.passphrase);
        if (problem) throw new CheckFailure(problem.msg, `fix tunnels[${i}].privateKey / privateKeyPassphrase`);
        return t.passphrase !== undefined ? "passphrase-protected, decrypted" : "not passphrase-protected";
      },
    },
    {
      name: `tunnel ${t.name}: ${t.host}:${t.port} has the pinned host key and accepts the key`,
      needs: "config",
      run: () => probeTunnel(t),
    },
  ]);
}

/**
 * Runs every item in order, printing each as it completes, and returns the outcomes. Item lists
 * that depend on the config (keys, tunnels) are built once it has loaded.
 */
export async function runChecks(file: string, print: (line: string) => void): Promise<CheckOutcome[]> {
  let hsm: Hsm | undefined;
  let opened: { err: Error | undefined } | undefined;
  const s: CheckSession = {
    file,
    hsm: () => {
      hsm ??= new Hsm(s.config!.pkcs11, createLogger({ level: "silent" }));
      return hsm;
    },
    openHsm: () => {
      if (opened === undefined) {
        try {
          s.hsm().open();
          opened = { err: undefined };
        } catch (err) {
          opened = { err: err as Error };
        }
      }
      return opened.err;
    },
  };
  try {
    s.raw = JSON.parse(readFileSync(file, "utf8"));
  } catch {
    /* reported by "config is valid" */
  }
  const outcomes: CheckOutcome[] = [];
  let hsmFailed = false;
  const runList = async (items: CheckItem[]) => {
    for (const item of items) {
      let o: CheckOutcome;
      if ((item.needs === "config" || item.needs === "hsm") && s.config === undefined) {
        o = { item: item.name, result: "skipped", detail: "the config is invalid" };
      } else if (item.needs === "hsm" && hsmFailed) {
        o = { item: item.name, result: "skipped", detail: "the HSM did not open" };
      } else {
        try {
          o = { item: item.name, result: "ok", detail: (await item.run(s)) ?? undefined };
        } catch (err) {
          if (err instanceof CheckSkipped) o = { item: item.name, result: "skipped", detail: err.message };
          else if (err instanceof ConfigError) o = { item: item.name, result: "failed", detail: err.message, fix: fixConfig(file) };
          else if (err instanceof CheckFailure) o = { item: item.name, result: "failed", detail: err.message, fix: err.fix };
          else o = { item: item.name, result: "failed", detail: errorMessage(err), fix: "see the message" };
          if (HSM_ITEMS.includes(item)) hsmFailed = true;
        }
      }
      outcomes.push(o);
      const mark = o.result === "ok" ? "✓" : o.result === "failed" ? "✗" : "-";
      print(`${mark} ${o.item}${o.detail ? `: ${o.detail}` : ""}${o.result === "skipped" ? " (skipped)" : ""}`);
      if (o.fix) print(`    fix: ${o.fix}`);
    }
  };
  try {
    await runList(configItems(s));
    await runList(HSM_ITEMS);
    await runList(keyItems(s));
    await runList(tunnelItems(s));
  } finally {
    hsm?.close();
  }
  const failed = outcomes.filter((o) => o.result === "failed").length;
  print(failed === 0 ? "all checks passed" : `${failed} check(s) failed`);
  return outcomes;
}
