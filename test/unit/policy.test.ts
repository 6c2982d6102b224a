/**
 * The owner's policy (agent/policy.ts) as tables: the rules' evaluation (first
 * match wins, globs, scope), the whole decision order (pause, allow-list,
 * rules, log-only), and the policy file's validation (every problem, with file
 * and field, at once).
 */
import assert from "node:assert/strict";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { ConfigError } from "../../shared/config.ts";
import {
  allowListMap,
  decideRequest,
  evaluateRules,
  globToRegExp,
  LivePolicy,
  type OwnerPolicy,
  type PolicyRequest,
  type PolicyRules,
  parsePolicy,
} from "../../agent/policy.ts";
import { createLogger } from "../../shared/logging.ts";
import { LogCapture } from "../../testbed/logs.ts";

const ALLOW_LIST = allowListMap([
  { keyStore: "/store/one", keys: ["k1", "k2"] },
  { keyStore: "/store/two", keys: ["k1"] },
]);

/** Rules exercising every field, the scope and the order. */
const RULES = parsePolicy(
  {
    default: "allow",
    rules: [
      { name: "ops-may-use-k2", effect: "allow", keys: ["k2"], match: { awsPrincipalArn: ["arn:aws:iam::111122223333:role/ops"] } },
      { name: "only-s3-on-k2", effect: "deny", keys: ["k2"], match: { kmsViaService: ["", "ebs", "rds"] } },
      { name: "no-blocked", effect: "deny", match: { awsPrincipalArn: ["*:user/blocked"] } },
      { name: "no-reencrypt", effect: "deny", match: { kmsOperation: ["ReEncrypt*"] } },
      { name: "bad-vpc", effect: "deny", match: { awsSourceVpc: ["vpc-bad*"] } },
      { name: "bad-vpce", effect: "deny", match: { awsSourceVpce: ["vpce-0bad"] } },
      { name: "other-account-keys", effect: "deny", match: { kmsKeyArn: ["arn:aws:kms:*:999999999999:key/*"] } },
      { name: "store-two-encrypt-only", effect: "deny", keyStores: ["/store/two"], match: { kmsOperation: ["Decrypt"] } },
      { name: "both-fields", effect: "deny", match: { awsPrincipalArn: ["*:role/both"], kmsViaService: ["sqs"] } },
    ],
  },
  "policy.json",
  "d",
  ALLOW_LIST,
);

const ALICE = "arn:aws:iam::123456789012:user/Alice";
const req = (metadata: PolicyRequest["metadata"], keyId = "k1", keyStore = "/store/one"): PolicyRequest => ({
  keyId,
  keyStore,
  metadata: { awsPrincipalArn: ALICE, kmsOperation: "Encrypt", ...metadata },
});

test("rules: first match wins, every field, scope by key and key store, the default", () => {
  const table: Array<[string, PolicyRequest, string, string]> = [
    // what, request, effect, deciding rule
    ["nothing matches → the default", req({}), "allow", "default"],
    ["principal glob at the start", req({ awsPrincipalArn: "arn:aws:iam::123456789012:user/blocked" }), "deny", "no-blocked"],
    ["glob matches the whole value only", req({ awsPrincipalArn: "arn:aws:iam::1:user/blocked-not" }), "allow", "default"],
    ["case-sensitive", req({ awsPrincipalArn: "arn:aws:iam::1:user/Blocked" }), "allow", "default"],
    ["operation glob at the end", req({ kmsOperation: "ReEncryptFrom" }), "deny", "no-reencrypt"],
    ["operation", req({ kmsOperation: "ReEncrypt" }), "deny", "no-reencrypt"],
    ["source VPC", req({ awsSourceVpc: "vpc-bad-123" }), "deny", "bad-vpc"],
    ["source VPC absent is not vpc-bad*", req({}), "allow", "default"],
    ["source VPC endpoint, exact", req({ awsSourceVpce: "vpce-0bad" }), "deny", "bad-vpce"],
    ["source VPC endpoint, a prefix is not enough", req({ awsSourceVpce: "vpce-0bad1" }), "allow", "default"],
    ["key ARN glob in the middle", req({ kmsKeyArn: "arn:aws:kms:eu-west-1:999999999999:key/abc" }), "deny", "other-account-keys"],
    ["key store scope: Decrypt on store two", req({ kmsOperation: "Decrypt" }, "k1", "/store/two"), "deny", "store-two-encrypt-only"],
    ["key store scope: Decrypt on store one", req({ kmsOperation: "Decrypt" }, "k1", "/store/one"), "allow", "default"],
    ["key scope: k2 without via-service ('' matches absent)", req({}, "k2"), "deny", "only-s3-on-k2"],
    ["key scope: k2 via ebs", req({ kmsViaService: "ebs" }, "k2"), "deny", "only-s3-on-k2"],
    ["key scope: k2 via s3", req({ kmsViaService: "s3" }, "k2"), "allow", "default"],
    ["key scope: k1 without via-service", req({}, "k1"), "allow", "default"],
    [
      "first match wins: allow before a later deny",
      req({ awsPrincipalArn: "arn:aws:iam::111122223333:role/ops" }, "k2"),
      "allow",
      "ops-may-use-k2",
    ],
    [
      "first match wins: the earlier of two denials",
      req({ awsPrincipalArn: "arn:aws:iam::1:user/blocked", kmsOperation: "ReEncrypt" }),
      "deny",
      "no-blocked",
    ],
    ["every field of a rule must match (AND): one of two", req({ awsPrincipalArn: "arn:aws:iam::1:role/both" }), "allow", "default"],
    [
      "every field of a rule must match (AND): both",
      req({ awsPrincipalArn: "arn:aws:iam::1:role/both", kmsViaService: "sqs" }),
      "deny",
      "both-fields",
    ],
  ];
  for (const [what, r, effect, rule] of table) assert.deepEqual(evaluateRules(RULES, r), { effect, rule }, what);
});

test("globs: * is any run of characters, everything else is itself", () => {
  const table: Array<[string, string, boolean]> = [
    ["*", "", true],
    ["*", "anything at all", true],
    ["", "", true],
    ["", "x", false],
    ["a.b", "a.b", true],
    ["a.b", "axb", false],
    ["(x)+[y]{1}$^|?\\", "(x)+[y]{1}$^|?\\", true],
    ["arn:*:user/*", "arn:aws:iam::1:user/bob", true],
    ["arn:*:user/*", "arn:aws:iam::1:role/bob", false],
    ["**", "x", true],
    ["a*", "line\nbreak-a", false],
    ["*a", "line\nbreak-a", true],
  ];
  for (const [pattern, value, want] of table)
    assert.equal(globToRegExp(pattern).test(value), want, `${pattern} ~ ${JSON.stringify(value)}`);
});

const owner = (rules: PolicyRules | undefined): OwnerPolicy => ({
  healthKey: "hk",
  keyStores: ALLOW_LIST,
  isKeyDisabled: () => false,
  rules: () => rules,
});

test("the decision order: pause, then the allow-list, then the rules; log-only allows and names the rule", () => {
  const logOnly = parsePolicy(
    { mode: "log-only", default: "allow", rules: [{ name: "no-blocked", effect: "deny", match: { awsPrincipalArn: ["*:user/blocked"] } }] },
    "p.json",
    "d",
  );
  const denyAll = parsePolicy({ default: "deny" }, "p.json", "d");
  const blocked = { awsPrincipalArn: "arn:aws:iam::1:user/blocked" };
  const table: Array<[string, OwnerPolicy, boolean, PolicyRequest, Record<string, unknown>]> = [
    ["no policy file: the allow-list alone", owner(undefined), false, req({}), { allowed: true }],
    ["paused beats everything", owner(RULES), true, req(blocked, "nope"), { allowed: false, reason: "INVALID_STATE" }],
    [
      "an unlisted key is KEY_NOT_FOUND before the rules",
      owner(RULES),
      false,
      req(blocked, "nope"),
      { allowed: false, reason: "KEY_NOT_FOUND" },
    ],
    ["the health key is KEY_NOT_FOUND", owner(denyAll), false, req({}, "hk"), { allowed: false, reason: "KEY_NOT_FOUND" }],
    ["an unknown key store is KEY_NOT_FOUND", owner(RULES), false, req({}, "k1", "/nope"), { allowed: false, reason: "KEY_NOT_FOUND" }],
    [
      "a deny rule is ACCESS_DENIED naming it",
      owner(RULES),
      false,
      req(blocked),
      { allowed: false, reason: "ACCESS_DENIED", policyRule: "no-blocked" },
    ],
    ["an allowed request names the deciding rule", owner(RULES), false, req({}), { allowed: true, policyRule: "default" }],
    ["default deny", owner(denyAll), false, req({}), { allowed: false, reason: "ACCESS_DENIED", policyRule: "default" }],
    [
      "log-only: allowed, would deny",
      owner(logOnly),
      false,
      req(blocked),
      { allowed: true, policyRule: "no-blocked", wouldDeny: "no-blocked" },
    ],
    ["log-only: allowed by the default", owner(logOnly), false, req({}), { allowed: true, policyRule: "default" }],
  ];
  for (const [what, o, paused, r, want] of table) {
    const d = decideRequest(o, paused, r);
    const got = Object.fromEntries(Object.entries(d).filter(([k]) => k in want));
    assert.deepEqual(got, want, what);
    if (d.reason === "ACCESS_DENIED") assert.match(d.why!, new RegExp(`policy rule "${d.policyRule}" of p(olicy)?\\.json`), what);
  }
});

test("a policy file with problems: every one named with the file and the field, at once", () => {
  const raw = {
    mode: "audit",
    rules: [
      { name: "a", effect: "maybe", match: { awsPrincipalArn: "*", kmsOperaton: ["x"] } },
      { name: "a", effect: "deny", keys: ["nope", "bad key!"], keyStores: ["/unknown", "no-slash"], match: { kmsViaService: [] } },
      { name: "default", effect: "allow", extra: 1, match: { kmsKeyArn: [7, "x".repeat(2049)] } },
      "not an object",
    ],
  };
  let err: ConfigError | undefined;
  try {
    parsePolicy(raw, "/etc/owner/policy.json", "d", ALLOW_LIST);
  } catch (e) {
    err = e as ConfigError;
  }
  assert.ok(err instanceof ConfigError);
  assert.match(err.message, /^invalid config \/etc\/owner\/policy\.json:/);
  const fields = err.problems.map((p) => p.slice(0, p.indexOf(":")));
  assert.deepEqual(fields, [
    "mode",
    "default",
    "rules[0].effect",
    "rules[0].match.kmsOperaton",
    "rules[0].match.awsPrincipalArn",
    "rules[1].name",
    "rules[1].keyStores[0]",
    "rules[1].keyStores[1]",
    "rules[1].keys[0]",
    "rules[1].keys[1]",
    "rules[1].match.kmsViaService",
    "rules[2].extra",
    "rules[2].name",
    "rules[2].match.kmsKeyArn[0]",
    "rules[2].match.kmsKeyArn[1]",
    "rules[3]",
    "rules[3].effect",
  ]);
});

test("the live policy: a good file takes effect, a bad one is refused with its problems and the last good one stays", () => {
  const dir = mkdtempSync(join(tmpdir(), "xks-policy-"));
  try {
    const file = join(dir, "policy.json");
    writeFileSync(file, JSON.stringify({ default: "allow" }));
    const logs = new LogCapture();
    const live = new LivePolicy(file, ALLOW_LIST, createLogger({ level: "info", name: "t" }, logs));
    assert.equal(live.rules()?.default, "allow");
    writeFileSync(file, JSON.stringify({ default: "deny" }));
    assert.equal(live.reload(), true);
    assert.equal(live.rules()?.default, "deny");
    writeFileSync(file, JSON.stringify({ default: "perhaps", rules: [{ effect: "deny", keys: ["zz"] }] }));
    assert.equal(live.reload(), false);
    assert.equal(live.rules()?.default, "deny", "the last good policy stays in force");
    const rejected = logs.json().find((l) => l.msg === "policy file rejected; the last good policy stays in force");
    assert.ok(rejected, logs.text());
    assert.deepEqual(
      (rejected.problems as string[]).map((p) => p.slice(0, p.indexOf(":"))),
      ["default", "rules[0].keys[0]"],
    );
    assert.equal(live.setFile(undefined), true);
    assert.equal(live.rules(), undefined, "the config names no policy any more");
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
