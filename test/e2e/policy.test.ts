/**
 * The owner's policy on the agent (agent/policy.ts) through the real chain,
 * each part its own process: signed HTTP → proxy → sshd → agent's tunnel →
 * agent. Allow, deny by each request metadata field (403
 * AccessDeniedException, the rule named in the audit record and the log),
 * health never denied, reload without restart (a good file takes effect, a
 * bad one is refused with its problems logged and the old policy stays),
 * SIGHUP, log-only mode, and `xks-agent policy test` through the real CLI.
 */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { readFileSync, renameSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { promisify } from "node:util";
import { after, before, describe, test } from "node:test";
import { PACKAGE_ROOT } from "../../shared/paths.ts";
import { auditOps } from "../../testbed/audit.ts";
import { CHAIN_PREFIX, type Chain, DEMO_POLICY, DENIED_PRINCIPAL, startChain } from "../../testbed/chain.ts";
import { agentClient } from "../../testbed/grpc-client.ts";
import { GENEROUS_MS, until } from "../../testbed/wait.ts";
import { type EncryptAnswer, decryptBody, encryptBody, healthBody, keyPath, metadataBody } from "../../testbed/xks/bodies.ts";
import type { Resp } from "../../testbed/xks/client.ts";
import { healthMetadata } from "../../testbed/xks/metadata.ts";
import { encryptProblem } from "../../testbed/xks/oracle.ts";

const run = promisify(execFile);
const BIN = join(PACKAGE_ROOT, "bin/xks-agent.js");

let chain: Chain;

/** One rule per request metadata field, one scoped to a key, one to a key store; the rest allowed. */
const rulesFor = (c: Chain) => [
  { name: "deny-principal", effect: "deny", match: { awsPrincipalArn: ["*:user/blocked"] } },
  { name: "deny-operation", effect: "deny", match: { kmsOperation: ["GenerateDataKeyWithoutPlaintext"] } },
  { name: "deny-via-service", effect: "deny", match: { kmsViaService: ["rds"] } },
  { name: "deny-vpc", effect: "deny", match: { awsSourceVpc: ["vpc-0bad*"] } },
  { name: "deny-vpce", effect: "deny", match: { awsSourceVpce: ["vpce-0bad*"] } },
  { name: "deny-key-arn", effect: "deny", match: { kmsKeyArn: ["arn:aws:kms:*:999999999999:key/*"] } },
  { name: "default-key-no-sqs", effect: "deny", keys: [c.keys.default], match: { kmsViaService: ["sqs"] } },
  { name: "store-no-reencrypt", effect: "deny", keyStores: [CHAIN_PREFIX], match: { kmsOperation: ["ReEncrypt*"] } },
];

before(async () => {
  // The agent starts with no policy file in its config; the first test names one and sends SIGHUP.
  chain = await startChain({ policy: null });
  await chain.waitActive();
});

after(() => chain?.stop());

const post = (rest: string, body: unknown) => chain.client.postRetrying(rest, body);
const digestOf = (text: string) => createHash("sha256").update(text).digest("hex").slice(0, 16);

/** Replaces the policy file as an editor that saves atomically does; returns the new content's digest. */
function writePolicy(policy: unknown, file = chain.agentPolicyFile): string {
  const text = `${JSON.stringify(policy, null, 2)}\n`;
  writeFileSync(`${file}.tmp`, text);
  renameSync(`${file}.tmp`, file);
  return digestOf(text);
}

/** The agent's log lines, parsed. */
const agentLog = () =>
  chain.agent
    .logs()
    .split("\n")
    .filter((l) => l.startsWith("{"))
    .map((l) => JSON.parse(l) as Record<string, any>);

/** Waits for the agent to log that the policy with `digest` is in force. */
const inForce = (digest: string) =>
  until(
    () => agentLog().some((l) => /^policy (re)?loaded$/.test(l.msg) && l.digest === digest),
    `the agent to load policy ${digest}`,
    GENEROUS_MS,
    50,
  );

/** The audit record of the request with this kmsRequestId (written before the answer is sent). */
function auditRecord(kmsRequestId: string): Record<string, any> {
  const rec = auditOps(join(chain.dir, "agent", "state", "audit")).find((r) => r.kmsRequestId === kmsRequestId);
  assert.ok(rec, `audit record of ${kmsRequestId}`);
  return rec;
}

const rid = (what: string) => `policy-${what}-${randomBytes(4).toString("hex")}`;

function assertDenied(r: Resp, what: string): void {
  assert.equal(r.status, 403, `${what}: ${r.text}`);
  assert.equal(r.json?.errorName, "AccessDeniedException", what);
}

describe("the owner's policy through the chain", () => {
  test("SIGHUP makes the agent take up the policy file its config now names", async () => {
    const digest = writePolicy({ mode: "enforce", default: "allow", rules: rulesFor(chain) });
    const raw = JSON.parse(readFileSync(chain.agentConfigFile, "utf8"));
    raw.policy = "policy.json";
    writeFileSync(chain.agentConfigFile, JSON.stringify(raw, null, 2));
    chain.agent.proc!.kill("SIGHUP");
    await inForce(digest);
  });

  test("allowed requests pass; each metadata field, a key scope and a key store scope deny with the rule named", async () => {
    const k = chain.keys;
    // Allowed: the test-bed's usual metadata (Alice via EBS), every operation.
    const okId = rid("ok");
    const e = await post(keyPath(k.default, "encrypt"), encryptBody("allowed", { metadata: { kmsRequestId: okId } }));
    assert.equal(encryptProblem(e, { plaintext: Buffer.from("allowed") }), undefined);
    assert.equal((await post(keyPath(k.default, "decrypt"), decryptBody(e.json as EncryptAnswer))).status, 200);
    assert.equal((await post(keyPath(k.default, "metadata"), metadataBody())).status, 200);
    assert.equal(auditRecord(okId).result, "OK");
    assert.equal(auditRecord(okId).policyRule, "default");
    // Via SQS is allowed for another key: that rule is scoped to the default key.
    assert.equal((await post(keyPath(k.encryptOnly, "encrypt"), encryptBody("x", { metadata: { kmsViaService: "sqs" } }))).status, 200);

    const cases: Array<[string, Record<string, unknown>, string]> = [
      ["awsPrincipalArn", { awsPrincipalArn: DENIED_PRINCIPAL }, "deny-principal"],
      ["kmsOperation", { kmsOperation: "GenerateDataKeyWithoutPlaintext" }, "deny-operation"],
      ["kmsViaService", { kmsViaService: "rds" }, "deny-via-service"],
      ["awsSourceVpc", { awsSourceVpc: "vpc-0bad1234" }, "deny-vpc"],
      ["awsSourceVpce", { awsSourceVpce: "vpce-0bad5678" }, "deny-vpce"],
      ["kmsKeyArn", { kmsKeyArn: "arn:aws:kms:eu-west-1:999999999999:key/abcd" }, "deny-key-arn"],
      ["key scope", { kmsViaService: "sqs" }, "default-key-no-sqs"],
      ["key store scope", { kmsOperation: "ReEncrypt" }, "store-no-reencrypt"],
    ];
    for (const [what, metadata, rule] of cases) {
      const id = rid(rule);
      assertDenied(await post(keyPath(k.default, "encrypt"), encryptBody("denied", { metadata: { ...metadata, kmsRequestId: id } })), what);
      const rec = auditRecord(id);
      assert.equal(rec.result, "ACCESS_DENIED", what);
      assert.equal(rec.policyRule, rule, what);
    }
    // Every key operation is subject to the rules: metadata and decrypt too.
    assertDenied(await post(keyPath(k.default, "metadata"), metadataBody("CreateKey", { awsPrincipalArn: DENIED_PRINCIPAL })), "metadata");
    const dId = rid("decrypt");
    assertDenied(
      await post(
        keyPath(k.default, "decrypt"),
        decryptBody(e.json as EncryptAnswer, { metadata: { awsPrincipalArn: DENIED_PRINCIPAL, kmsRequestId: dId } }),
      ),
      "decrypt",
    );
    assert.equal(auditRecord(dId).policyRule, "deny-principal");
    // The owner's log line names the rule (lines are written in batches, at most a second late).
    await until(
      () =>
        agentLog().some(
          (l) => l.msg === "operation" && l.kmsRequestId === dId && l.result === "ACCESS_DENIED" && l.policyRule === "deny-principal",
        ),
      "the denial's log line naming the rule",
      GENEROUS_MS,
      50,
    );
    // An unlisted key stays KEY_NOT_FOUND, whatever the rules say.
    const nf = await post(keyPath("not-allowed", "encrypt"), encryptBody("x", { metadata: { awsPrincipalArn: DENIED_PRINCIPAL } }));
    assert.equal(nf.json?.errorName, "KeyNotFoundException", nf.text);
  });

  test("a good file takes effect without a restart, and health is never subject to the policy", async () => {
    const denyAll = { default: "deny", rules: [{ name: "deny-everything", effect: "deny", match: { kmsOperation: ["*"] } }] };
    await inForce(writePolicy(denyAll));
    const id = rid("deny-all");
    assertDenied(await post(keyPath(chain.keys.default, "encrypt"), encryptBody("x", { metadata: { kmsRequestId: id } })), "deny-all");
    assert.equal(auditRecord(id).policyRule, "deny-everything");
    // Health through the proxy, and the agent's own GetHealthStatus on the forwarded socket (what the proxy calls).
    const h = await post("health", healthBody());
    assert.equal(h.status, 200, h.text);
    const c = agentClient(`unix://${chain.remoteSocket}`, chain.agentToken);
    try {
      const m = healthMetadata();
      const s = await c.call("GetHealthStatus", { kmsRequestId: m.kmsRequestId, kmsOperation: m.kmsOperation });
      assert.equal(s.state, "ACTIVE");
    } finally {
      c.close();
    }
  });

  test("a bad file is refused with every problem logged, and the last good policy stays in force", async () => {
    const before = agentLog().length;
    writePolicy({ mode: "audit", default: "allow", rules: [{ name: "x", effect: "maybe", keys: ["no-such-key"] }] });
    await until(
      () =>
        agentLog()
          .slice(before)
          .some((l) => l.msg === "policy file rejected; the last good policy stays in force"),
      "the agent to reject the bad policy file",
      GENEROUS_MS,
      50,
    );
    const line = agentLog()
      .slice(before)
      .find((l) => l.msg === "policy file rejected; the last good policy stays in force")!;
    assert.equal(line.policyFile, chain.agentPolicyFile);
    assert.deepEqual(
      (line.problems as string[]).map((p) => p.slice(0, p.indexOf(":"))),
      ["mode", "rules[0].effect", "rules[0].keys[0]"],
    );
    assertDenied(await post(keyPath(chain.keys.default, "encrypt"), encryptBody("x")), "the deny-all policy is still in force");
    assert.ok(chain.agent.running, "the agent keeps running");
  });

  test("log-only: what would be denied is allowed, logged and recorded with wouldDeny", async () => {
    await inForce(writePolicy({ ...DEMO_POLICY, mode: "log-only" }));
    const id = rid("log-only");
    const r = await post(
      keyPath(chain.keys.default, "encrypt"),
      encryptBody("x", { metadata: { awsPrincipalArn: DENIED_PRINCIPAL, kmsRequestId: id } }),
    );
    assert.equal(encryptProblem(r, { plaintext: Buffer.from("x") }), undefined);
    const rec = auditRecord(id);
    assert.equal(rec.result, "OK");
    assert.equal(rec.wouldDeny, "deny-blocked-users");
    await until(
      () =>
        agentLog().some(
          (l) => l.msg === "operation" && l.kmsRequestId === id && l.wouldDeny === "deny-blocked-users" && l.level === "warn",
        ),
      "the would-be denial's log line (warn)",
      GENEROUS_MS,
      50,
    );
    // Back to enforcing: the same request is denied.
    await inForce(writePolicy(DEMO_POLICY));
    assertDenied(
      await post(keyPath(chain.keys.default, "encrypt"), encryptBody("x", { metadata: { awsPrincipalArn: DENIED_PRINCIPAL } })),
      "enforced",
    );
  });
});

describe("xks-agent policy test (the real CLI)", () => {
  const cli = async (...args: string[]) => {
    try {
      const { stdout, stderr } = await run(process.execPath, [BIN, ...args], { timeout: GENEROUS_MS });
      return { code: 0, stdout, stderr };
    } catch (err) {
      const e = err as { code: number; stdout: string; stderr: string };
      return { code: e.code, stdout: e.stdout, stderr: e.stderr };
    }
  };
  const request = (name: string, body: unknown) => {
    const file = join(chain.dir, `${name}.json`);
    writeFileSync(file, JSON.stringify(body));
    return file;
  };

  test("prints the decision and the rule, exit 0; a bad request file is named with its field, exit 2", async () => {
    // A config of its own (same folder, so its secret references resolve), naming a policy file and a controls file of its own.
    const policyFile = join(chain.dir, "agent", "policy-cli.json");
    writeFileSync(policyFile, JSON.stringify({ default: "allow", rules: rulesFor(chain) }));
    const config = join(chain.dir, "agent", "agent-cli.json");
    writeFileSync(
      config,
      JSON.stringify({
        ...JSON.parse(readFileSync(chain.agentConfigFile, "utf8")),
        policy: "policy-cli.json",
        stateFile: "state-cli/controls.json",
      }),
    );
    const meta = { awsPrincipalArn: "arn:aws:iam::123456789012:user/Alice", kmsOperation: "Encrypt", kmsRequestId: "r-1" };
    const table: Array<[string, unknown, Record<string, unknown>]> = [
      ["allowed", { keyId: chain.keys.default, keyStore: CHAIN_PREFIX, requestMetadata: meta }, { decision: "allow", rule: "default" }],
      [
        "denied by principal",
        { keyId: chain.keys.default, keyStore: CHAIN_PREFIX, requestMetadata: { ...meta, awsPrincipalArn: DENIED_PRINCIPAL } },
        { decision: "deny", reason: "ACCESS_DENIED", rule: "deny-principal" },
      ],
      [
        "denied by VPC endpoint",
        { keyId: chain.keys.default, keyStore: CHAIN_PREFIX, requestMetadata: { ...meta, awsSourceVpce: "vpce-0bad1" } },
        { decision: "deny", reason: "ACCESS_DENIED", rule: "deny-vpce" },
      ],
      [
        "an unlisted key",
        { keyId: "not-allowed", keyStore: CHAIN_PREFIX, requestMetadata: meta },
        { decision: "deny", reason: "KEY_NOT_FOUND", rule: null },
      ],
    ];
    for (const [what, body, want] of table) {
      const r = await cli("policy", "test", "--config", config, "--request", request(`req-${what.replaceAll(" ", "-")}`, body));
      assert.equal(r.code, 0, `${what}: ${r.stderr}`);
      const out = JSON.parse(r.stdout);
      for (const [k, v] of Object.entries(want)) assert.deepEqual(out[k], v, `${what}: ${k} in ${r.stdout}`);
      assert.equal(out.policyFile, policyFile);
    }
    // The pause switch (the config's controls file) is the first decision.
    const pause = await cli("pause", "--config", config);
    assert.equal(pause.code, 0, pause.stderr);
    const paused = await cli("policy", "test", "--config", config, "--request", request("req-paused", table[0][1]));
    assert.equal(paused.code, 0, paused.stderr);
    assert.equal(JSON.parse(paused.stdout).reason, "INVALID_STATE");
    // An invalid policy file: exit 2, every problem named with the file and the field.
    writeFileSync(policyFile, JSON.stringify({ default: "maybe", rules: [{ effect: "deny", keyStores: ["/no-such-store"] }] }));
    const badPolicy = await cli("policy", "test", "--config", config, "--request", request("req-any", table[0][1]));
    assert.equal(badPolicy.code, 2);
    assert.match(badPolicy.stderr, /policy-cli\.json/);
    assert.match(badPolicy.stderr, /- default: must match/);
    assert.match(badPolicy.stderr, /- rules\[0\]\.keyStores\[0\]: key store "\/no-such-store" is not in the agent config's keyStores/);
    const bad = await cli(
      "policy",
      "test",
      "--config",
      config,
      "--request",
      request("req-bad", { keyId: 7, requestMetadata: { kmsViaService: 1 } }),
    );
    assert.equal(bad.code, 2);
    assert.match(bad.stderr, /req-bad\.json/);
    assert.match(bad.stderr, /keyId: must be a string/);
    assert.match(bad.stderr, /requestMetadata\.kmsViaService: must be a string/);
  });
});
