/**
 * The owner's policy: every decision the owner makes about who may use which
 * key, in one place. The operations (agent/ops/), the gRPC service
 * (agent/server.ts), `xks-agent keys list`, `check` and `policy test` all ask
 * here. A KMS key operation is decided in this order; the first refusal is
 * the answer:
 *   1. pause (the owner's switch, agent/controls.ts) → INVALID_STATE;
 *   2. the allow-list (the config's `keyStores`) → KEY_NOT_FOUND, see below;
 *   3. the rules of the policy file on the request metadata → ACCESS_DENIED
 *      (403 AccessDeniedException), see "The policy file" below;
 *   4. after the key's attributes are read from the HSM: AES-256, sensitive, not
 *      extractable (below), not disabled by the owner → INVALID_STATE, and the
 *      key's own usage (CKA_ENCRYPT / CKA_DECRYPT) → INVALID_KEY_USAGE.
 * Steps 1-3 need no HSM work. GetHealthStatus is never subject to 2 or 3.
 *
 * The allow-list. A KMS operation arriving on key store S may use a key only when
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
import { createHash } from "node:crypto";
import { EventEmitter } from "node:events";
import { readFileSync, unwatchFile, watchFile } from "node:fs";
import pkcs11js from "pkcs11js"; // NOT `import * as`: under ESM that loses every constant
import { Checker, ConfigError, deepFreeze } from "../shared/config.ts";
import { AgentError, errorMessage, type Reason } from "../shared/errors.ts";
import type { Logger } from "../shared/logging.ts";
import { EXTERNAL_KEY_ID_RE, EXTERNAL_KEY_ID_RULE, KEY_BYTES, MAX_METADATA_CHARS, prefixProblem } from "../shared/xks-spec.ts";
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

/** The owner's switch: a paused agent refuses every KMS key operation. */
export function pauseRefusal(paused: boolean): Refusal | undefined {
  return paused ? { reason: "INVALID_STATE", why: "the owner has paused the agent" } : undefined;
}

/** What the decisions need besides the allow-list: the owner's per-key switch and the policy file's rules. */
export interface OwnerPolicy extends ServingPolicy {
  /** Labels the owner has disabled: metadata reports DISABLED, crypto is refused. */
  isKeyDisabled(label: string): boolean;
  /** The policy file's rules in force (the last good file), or undefined when the config names no policy file. */
  rules(): PolicyRules | undefined;
}

/**
 * The check for a crypto operation's key, once its attributes are read: it must
 * be served for `use`, enabled by the owner, and allow every usage in `needs`
 * (from its own attributes).
 */
export function keyCheck(owner: OwnerPolicy, use: KeyUse, needs: Array<"encrypt" | "decrypt">): (key: KeyInfo) => void {
  return (key) => {
    refuseUnlessServed(owner, key.label, use, key);
    if (owner.isKeyDisabled(key.label)) throw new AgentError("INVALID_STATE", `key ${key.label} is disabled by the owner`);
    for (const n of needs) {
      if (!key.usage[n])
        throw new AgentError("INVALID_KEY_USAGE", `key ${key.label} does not allow ${n} (CKA_${n.toUpperCase()} is false)`);
    }
  };
}

/*
 * The policy file: rules on the request metadata, per key or per key store.
 *
 * {
 *   "mode": "enforce",                 // or "log-only": a denial is logged and recorded (wouldDeny), not enforced
 *   "default": "allow",                // required: the decision when no rule matches ("allow" or "deny")
 *   "rules": [                         // in order; the FIRST rule that matches decides (first match wins)
 *     { "name": "no-blocked-users",    // unique; the log line and the audit record name it
 *       "effect": "deny",              // "allow" or "deny"
 *       "keyStores": ["/xks-demo"],    // optional: only requests arriving on these key stores
 *       "keys": ["demo-key"],          // optional: only requests for these key labels
 *       "match": {                     // optional: every field given must match (AND);
 *                                      // a field matches when any of its patterns does (OR)
 *         "awsPrincipalArn": ["*:user/blocked"],
 *         "kmsOperation": ["Encrypt", "GenerateDataKey*"],
 *         "kmsViaService": ["ebs"], "awsSourceVpc": ["vpc-*"], "awsSourceVpce": ["vpce-*"],
 *         "kmsKeyArn": ["arn:aws:kms:*:111122223333:key/*"] } } ]
 * }
 *
 * A pattern matches the whole value, case-sensitively; `*` stands for any run of
 * characters (also none), every other character for itself. A field the request
 * does not carry (e.g. no kmsViaService) is the empty string, so `[""]` matches
 * its absence and `["*"]` matches anything. A rule with no scope and no match
 * matches every request. Rules are evaluated only for key operations that pass
 * the pause switch and the allow-list, never for GetHealthStatus.
 */

/** The request metadata fields a rule may match, as KMS names them (XKS Proxy API spec §1.3). */
export const MATCH_FIELDS = ["awsPrincipalArn", "kmsOperation", "kmsViaService", "awsSourceVpc", "awsSourceVpce", "kmsKeyArn"] as const;
export type MatchField = (typeof MATCH_FIELDS)[number];

export type Effect = "allow" | "deny";

export interface PolicyRule {
  name: string;
  effect: Effect;
  keyStores?: readonly string[];
  keys?: readonly string[];
  /** Per field, the patterns as written and their compiled form. */
  match: Partial<Record<MatchField, { patterns: readonly string[]; res: readonly RegExp[] }>>;
}

export interface PolicyRules {
  /** The policy file, and the SHA-256 of its content (first 16 hex digits), as logged when it was loaded. */
  file: string;
  digest: string;
  mode: "enforce" | "log-only";
  default: Effect;
  rules: readonly PolicyRule[];
}

/** What the rules are evaluated on: the key, the key store it arrived on, and the request metadata. */
export interface PolicyRequest {
  keyId: string;
  keyStore: string;
  metadata: Partial<Record<MatchField, string>>;
}

/** The rules' verdict: the effect and the rule that decided ("default" when none matched). */
export interface RuleVerdict {
  effect: Effect;
  rule: string;
}

/** A glob (`*` = any run of characters) as an anchored regular expression. */
export function globToRegExp(pattern: string): RegExp {
  const body = pattern
    .split("*")
    .map((part) => part.replace(/[\\^$.|?+()[\]{}]/g, "\\$&"))
    .join(".*");
  return new RegExp(`^${body}$`, "s");
}

function ruleMatches(rule: PolicyRule, req: PolicyRequest): boolean {
  if (rule.keyStores && !rule.keyStores.includes(req.keyStore)) return false;
  if (rule.keys && !rule.keys.includes(req.keyId)) return false;
  for (const f of MATCH_FIELDS) {
    const m = rule.match[f];
    if (m && !m.res.some((re) => re.test(req.metadata[f] ?? ""))) return false;
  }
  return true;
}

/** First match wins: the first rule (in file order) whose scope and every condition match decides; else the default. */
export function evaluateRules(policy: PolicyRules, req: PolicyRequest): RuleVerdict {
  for (const rule of policy.rules) if (ruleMatches(rule, req)) return { effect: rule.effect, rule: rule.name };
  return { effect: policy.default, rule: "default" };
}

/** The owner's decision on a KMS key operation before any HSM work (steps 1-3 above). */
export interface Decision {
  allowed: boolean;
  /** When refused: the reason (the proxy's error) and why (the owner's log). */
  reason?: Reason;
  why?: string;
  /** The rule that decided, when the policy file's rules were evaluated ("default" when none matched). */
  policyRule?: string;
  /** log-only mode: the rule that would have denied the request. */
  wouldDeny?: string;
}

/** Pause, then the allow-list, then the rules; `policy test` and the gRPC service both decide here. */
export function decideRequest(owner: OwnerPolicy, paused: boolean, req: PolicyRequest): Decision {
  const refusal = pauseRefusal(paused) ?? servingRefusals(owner, req.keyId, { keyStore: req.keyStore })[0];
  if (refusal) return { allowed: false, ...refusal };
  const rules = owner.rules();
  if (!rules) return { allowed: true };
  const v = evaluateRules(rules, req);
  if (v.effect === "allow") return { allowed: true, policyRule: v.rule };
  if (rules.mode === "log-only") return { allowed: true, policyRule: v.rule, wouldDeny: v.rule };
  return {
    allowed: false,
    reason: "ACCESS_DENIED",
    why: `denied by policy rule ${JSON.stringify(v.rule)} of ${rules.file}`,
    policyRule: v.rule,
  };
}

/** What the service's record of an operation takes from the decision. */
export interface PolicyNote {
  policyRule?: string;
  wouldDeny?: string;
}

/**
 * For the gRPC service, after the request is validated: the rules' notes go to
 * `note` (the operation's record), and a refusal is thrown as an AgentError.
 * The pause switch is checked by the service before validation.
 */
export function admitKeyRequest(
  owner: OwnerPolicy,
  req: { keyId: string; metadata?: Partial<Record<MatchField, string>> | null },
  use: { keyStore: string },
  note: PolicyNote,
): KeyUse {
  const d = decideRequest(owner, false, { keyId: req.keyId, keyStore: use.keyStore, metadata: req.metadata ?? {} });
  if (d.policyRule !== undefined) note.policyRule = d.policyRule;
  if (d.wouldDeny !== undefined) note.wouldDeny = d.wouldDeny;
  if (!d.allowed) throw new AgentError(d.reason!, d.why);
  return use;
}

/**
 * Parses a policy file's JSON; every problem is named with the file and the
 * field, all at once (ConfigError). `allowList` (the config's keyStores), when
 * given, is what a rule's `keyStores` and `keys` must name: a scope naming a
 * key store or key the agent does not serve is a typo that would never match.
 */
export function parsePolicy(raw: unknown, file: string, digest: string, allowList?: ReadonlyMap<string, ReadonlySet<string>>): PolicyRules {
  const c = new Checker(file);
  const root = c.object(raw, "(root)");
  c.noUnknown(root, "", ["mode", "default", "rules"]);
  const mode = c.string(root, "mode", "", { default: "enforce", pattern: /^(enforce|log-only)$/, hint: '"enforce" or "log-only"' });
  const def = c.string(root, "default", "", { pattern: /^(allow|deny)$/, hint: '"allow" or "deny"' });
  const names = new Set<string>();
  const allKeys = new Set([...(allowList?.values() ?? [])].flatMap((keys) => [...keys]));
  const rules = c.array(root, "rules", "", { optional: true }).map((r, i): PolicyRule => {
    const f = `rules[${i}]`;
    const o = c.object(r, f);
    c.noUnknown(o, f, ["name", "effect", "keyStores", "keys", "match"]);
    const name = c.string(o, "name", f, { default: f, pattern: /^[\x21-\x7e]{1,64}$/, hint: "1-64 printable characters, no spaces" });
    if (name === "default") c.problem(`${f}.name`, '"default" names the decision when no rule matches; choose another name');
    else if (names.has(name)) c.problem(`${f}.name`, `duplicate rule name ${JSON.stringify(name)}`);
    names.add(name);
    const effect = c.string(o, "effect", f, { pattern: /^(allow|deny)$/, hint: '"allow" or "deny"' }) as Effect;
    const strings = (key: string, check: (v: string, field: string) => void): string[] | undefined => {
      if (o[key] === undefined) return undefined;
      return c.array(o, key, f, { min: 1 }).map((v, j) => {
        const vf = `${f}.${key}[${j}]`;
        if (typeof v !== "string") {
          c.problem(vf, "must be a string");
          return "";
        }
        check(v, vf);
        return v;
      });
    };
    const keyStores = strings("keyStores", (v, vf) => {
      const p = prefixProblem(v);
      if (p) c.problem(vf, `${p} (a key store's uriPathPrefix)`);
      else if (allowList && !allowList.has(v)) c.problem(vf, `key store ${JSON.stringify(v)} is not in the agent config's keyStores`);
    });
    const keys = strings("keys", (v, vf) => {
      if (!EXTERNAL_KEY_ID_RE.test(v)) c.problem(vf, `must be a key label (externalKeyId): ${EXTERNAL_KEY_ID_RULE}`);
      else if (allowList && !allKeys.has(v)) c.problem(vf, `key ${JSON.stringify(v)} is not allow-listed in the agent config's keyStores`);
    });
    const match: PolicyRule["match"] = {};
    if (o.match !== undefined) {
      const m = c.object(o.match, `${f}.match`);
      c.noUnknown(m, `${f}.match`, [...MATCH_FIELDS]);
      for (const field of MATCH_FIELDS) {
        if (m[field] === undefined) continue;
        const patterns = c.array(m, field, `${f}.match`, { min: 1 }).map((v, j) => {
          const vf = `${f}.match.${field}[${j}]`;
          if (typeof v !== "string") c.problem(vf, "must be a string (a pattern; * matches any characters)");
          else if (v.length > MAX_METADATA_CHARS) c.problem(vf, `must be at most ${MAX_METADATA_CHARS} characters`);
          return typeof v === "string" ? v : "";
        });
        match[field] = { patterns, res: patterns.map(globToRegExp) };
      }
    }
    return { name, effect, ...(keyStores ? { keyStores } : {}), ...(keys ? { keys } : {}), match };
  });
  c.done();
  return deepFreeze({ file, digest, mode: mode as PolicyRules["mode"], default: def as Effect, rules });
}

/** Reads and parses a policy file (a read or JSON failure is a ConfigError too). */
export function loadPolicyFile(file: string, allowList?: ReadonlyMap<string, ReadonlySet<string>>): PolicyRules {
  let text: string;
  try {
    text = readFileSync(file, "utf8");
  } catch (err) {
    throw new ConfigError(file, [`cannot read file (${(err as NodeJS.ErrnoException).code ?? "error"})`]);
  }
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (err) {
    throw new ConfigError(file, [`not valid JSON (${(err as Error).message})`]);
  }
  return parsePolicy(raw, file, createHash("sha256").update(text).digest("hex").slice(0, 16), allowList);
}

/**
 * The policy file in force, reloaded without a restart: when the file changes
 * (polled like the owner controls file) and on `reload()` (SIGHUP). A file that
 * cannot be read or has any problem is refused: every problem is logged at
 * error level, "rejected" is emitted, and the last good policy stays in force.
 * At start a bad file is a ConfigError (the agent does not start without the
 * policy its config names).
 */
export class LivePolicy extends EventEmitter {
  private current: PolicyRules | undefined;
  private unwatch: (() => void) | undefined;
  /** Set by watch(): the poll interval, also for a file the config names later. */
  private watchMs: number | undefined;

  constructor(
    private file: string | undefined,
    private readonly allowList: ReadonlyMap<string, ReadonlySet<string>>,
    private readonly log: Logger,
  ) {
    super();
    if (file) {
      this.current = loadPolicyFile(file, allowList);
      this.logLoaded("info", "policy loaded");
    }
  }

  /** The rules in force, or undefined when the config names no policy file. */
  rules(): PolicyRules | undefined {
    return this.current;
  }

  /**
   * Re-reads the file the (re-read) config names: `file`, which may be another
   * one than before, or undefined when the config names none any more (then no
   * rules apply). Returns whether the new content is in force.
   */
  setFile(file: string | undefined): boolean {
    if (file !== this.file) {
      this.unwatch?.();
      this.unwatch = undefined;
      this.file = file;
      if (this.watchMs !== undefined) this.watch(this.watchMs);
      if (file === undefined) {
        this.current = undefined;
        this.log.warn("the config names no policy file any more: no rules apply");
        this.emit("loaded", undefined);
        return true;
      }
    }
    return this.reload();
  }

  /** Re-reads the policy file. Returns whether its content is in force. */
  reload(): boolean {
    if (!this.file) return true;
    let next: PolicyRules;
    try {
      next = loadPolicyFile(this.file, this.allowList);
    } catch (err) {
      const problems = err instanceof ConfigError ? err.problems : [errorMessage(err)];
      this.log.error(
        { policyFile: this.file, problems, inForce: this.current?.digest ?? null },
        "policy file rejected; the last good policy stays in force",
      );
      this.log.flush();
      this.emit("rejected", problems);
      return false;
    }
    if (next.digest === this.current?.digest && next.file === this.current.file) return true;
    this.current = next;
    this.logLoaded("warn", "policy reloaded");
    this.emit("loaded", next);
    return true;
  }

  /** Follows changes to the file (polls its stat every `intervalMs`). */
  watch(intervalMs = 200): void {
    this.watchMs = intervalMs;
    if (!this.file || this.unwatch) return;
    const file = this.file;
    const onChange = () => this.reload();
    watchFile(file, { interval: intervalMs, persistent: false }, onChange);
    this.unwatch = () => unwatchFile(file, onChange);
  }

  stopWatching(): void {
    this.unwatch?.();
    this.unwatch = undefined;
    this.watchMs = undefined;
  }

  private logLoaded(level: "info" | "warn", msg: string): void {
    const p = this.current!;
    this.log[level]({ policyFile: p.file, digest: p.digest, mode: p.mode, default: p.default, rules: p.rules.map((r) => r.name) }, msg);
    this.log.flush();
  }
}
