/** The agent's workers, one module at a time: the config field, the late check of the switches, and what crosses the IPC channel. */
import assert from "node:assert/strict";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { parseAgentConfig } from "../../agent/config.ts";
import { workerCount } from "../../shared/schema.ts";
import { allowListMap, evaluateRules, parsePolicy, type PolicyRequest } from "../../agent/policy.ts";
import { lateRefusal } from "../../agent/pool.ts";
import type { OperationRecord } from "../../agent/server.ts";
import { decodeConfig, decodePolicy, encodeConfig, encodePolicy } from "../../agent/worker-ipc.ts";
import { ConfigError } from "../../shared/config.ts";
import { minimalAgentConfig } from "../../testbed/configs.ts";

const dir = mkdtempSync(join(tmpdir(), "xks-workers-"));
const file = join(dir, "agent.json");

test("workers: default 1, an integer 1..64 or auto (one per core); anything else is refused with the field named", () => {
  assert.equal(parseAgentConfig(minimalAgentConfig(dir), file).workers, 1);
  assert.equal(parseAgentConfig(minimalAgentConfig(dir, { workers: 4 }), file).workers, 4);
  const auto = parseAgentConfig(minimalAgentConfig(dir, { workers: "auto" }), file).workers;
  assert.equal(auto, "auto");
  assert.ok(workerCount(auto) >= 1);
  assert.equal(workerCount(3), 3);
  for (const bad of [0, 65, 1.5, "two", null]) {
    assert.throws(
      () => parseAgentConfig(minimalAgentConfig(dir, { workers: bad }), file),
      (e: unknown) => e instanceof ConfigError && e.problems.some((p) => p.startsWith("workers")),
      `workers: ${JSON.stringify(bad)}`,
    );
  }
});

const rec = (over: Partial<OperationRecord>): OperationRecord => ({
  time: "2026-01-01T00:00:00.000Z",
  operation: "Encrypt",
  kmsRequestId: "r",
  kmsOperation: "Encrypt",
  keyId: "k1",
  principal: "",
  kmsKeyArn: "",
  viaService: "",
  sourceVpc: "",
  sourceVpce: "",
  keyStore: "/store/one",
  result: "OK",
  latencyMs: 0.1,
  ...over,
});

test("the primary's late check: a successful key operation is refused when paused or its key disabled for crypto; others pass", () => {
  const running = { paused: false, isKeyDisabled: () => false };
  const paused = { paused: true, isKeyDisabled: () => false };
  const k1Off = { paused: false, isKeyDisabled: (k: string) => k === "k1" };
  assert.equal(lateRefusal(running, rec({})), undefined);
  assert.equal(lateRefusal(paused, rec({})), "the owner has paused the agent");
  assert.equal(lateRefusal(paused, rec({ operation: "GetKeyMetadata" })), "the owner has paused the agent");
  assert.equal(lateRefusal(k1Off, rec({ operation: "Decrypt" })), "key k1 is disabled by the owner");
  // Metadata of a disabled key is answered (it says DISABLED); another key is served.
  assert.equal(lateRefusal(k1Off, rec({ operation: "GetKeyMetadata" })), undefined);
  assert.equal(lateRefusal(k1Off, rec({ keyId: "k2" })), undefined);
  // Health is never paused; a refusal stays the refusal it was.
  assert.equal(lateRefusal(paused, rec({ operation: "GetHealthStatus" })), undefined);
  assert.equal(lateRefusal(paused, rec({ result: "KEY_NOT_FOUND" })), undefined);
});

test("the config crosses the channel whole, Buffers included", () => {
  const cfg = parseAgentConfig(minimalAgentConfig(dir, { ciphertextMetadata: "meta/1", workers: 2 }), file);
  const back = decodeConfig(encodeConfig(cfg));
  assert.ok(Buffer.isBuffer(back.ciphertextMetadata));
  assert.equal(back.ciphertextMetadata.toString(), "meta/1");
  assert.deepEqual(JSON.parse(JSON.stringify(back)), JSON.parse(JSON.stringify(cfg)));
});

test("the policy's rules cross the channel and decide as the primary's do", () => {
  const allow = allowListMap([{ keyStore: "/store/one", keys: ["k1", "k2"] }]);
  const raw = {
    mode: "log-only",
    default: "deny",
    rules: [
      { name: "blocked", effect: "deny", match: { awsPrincipalArn: ["*:user/blocked"], kmsOperation: ["Encrypt", "GenerateDataKey*"] } },
      { name: "k2-only-vpc", effect: "allow", keys: ["k2"], keyStores: ["/store/one"], match: { awsSourceVpc: ["vpc-1*"] } },
      { name: "everyone", effect: "allow" },
    ],
  };
  const primary = parsePolicy(raw, "/p.json", "abcd", allow);
  const worker = decodePolicy(JSON.parse(JSON.stringify(encodePolicy(primary))), allow)!;
  assert.equal(worker.digest, "abcd");
  assert.equal(worker.mode, "log-only");
  assert.equal(worker.default, "deny");
  const reqs: PolicyRequest[] = [
    {
      keyId: "k1",
      keyStore: "/store/one",
      metadata: { awsPrincipalArn: "arn:aws:iam::1:user/blocked", kmsOperation: "GenerateDataKeyPair" },
    },
    { keyId: "k1", keyStore: "/store/one", metadata: { awsPrincipalArn: "arn:aws:iam::1:user/blocked", kmsOperation: "Decrypt" } },
    { keyId: "k2", keyStore: "/store/one", metadata: { awsSourceVpc: "vpc-123" } },
    { keyId: "k2", keyStore: "/store/other", metadata: {} },
  ];
  for (const r of reqs) assert.deepEqual(evaluateRules(worker, r), evaluateRules(primary, r));
  assert.deepEqual(
    reqs.map((r) => evaluateRules(worker, r).rule),
    ["blocked", "everyone", "k2-only-vpc", "everyone"],
  );
  assert.equal(encodePolicy(undefined), null);
  assert.equal(decodePolicy(null, allow), undefined);
});
