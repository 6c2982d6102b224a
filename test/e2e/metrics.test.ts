/**
 * The metrics endpoints of both daemons, scraped during traffic through the
 * real chain (signed HTTP → proxy → sshd → agent's tunnel → agent → SoftHSM)
 * and parsed by a strict Prometheus text-format parser: the counters move by
 * exactly the requests sent, by operation, key store, error and reason, and no
 * key id, principal or secret appears in either scrape.
 */
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { after, before, test } from "node:test";
import { CHAIN_PREFIX, type Chain, startChain } from "../../testbed/chain.ts";
import { type Family, sampleSum, samples, scrape } from "../../testbed/prometheus.ts";
import { until } from "../../testbed/wait.ts";
import { type EncryptAnswer, decryptBody, encryptBody, keyPath, metadataBody } from "../../testbed/xks/bodies.ts";
import { type Resp, signedPost } from "../../testbed/xks/client.ts";

let chain: Chain;

before(async () => {
  // A quota the test can spend: the refusals it causes are counted with their reason.
  chain = await startChain({ quota: { rate: 1, burst: 12 } });
  await chain.waitActive();
});

after(() => chain?.stop());

/** Per-series change between two scrapes of one metric, keyed by its labels (JSON). */
function deltas(before: Map<string, Family>, after: Map<string, Family>, name: string): Map<string, number> {
  const key = (l: Record<string, string>) => JSON.stringify(Object.entries(l).sort());
  const was = new Map(samples(before, name).map((s) => [key(s.labels), s.value]));
  const out = new Map<string, number>();
  for (const s of samples(after, name)) {
    const d = s.value - (was.get(key(s.labels)) ?? 0);
    if (d !== 0) out.set(key(s.labels), d);
  }
  return out;
}
const delta = (b: Map<string, Family>, a: Map<string, Family>, name: string, match: Record<string, string> = {}) =>
  sampleSum(a, name, match) - sampleSum(b, name, match);

test("both endpoints count exactly the traffic sent, with bounded labels and no secret", async () => {
  const proxy0 = await scrape(chain.metricsUrl);
  const agent0 = await scrape(chain.agentMetricsUrl);

  const sent = new Map<string, number>(); // "operation|error" → requests
  const count = (operation: string, r: Resp) => {
    const k = `${operation}|${r.status === 200 ? "none" : r.json?.errorName}`;
    sent.set(k, (sent.get(k) ?? 0) + 1);
    return r;
  };
  const marker = `arn:aws:iam::111122223333:user/metrics-principal-${randomBytes(4).toString("hex")}`;
  const hiddenKey = `metrics-key-${randomBytes(4).toString("hex")}`;

  // Encrypts and the decrypts of their answers, one at a time.
  const answers: EncryptAnswer[] = [];
  for (let i = 0; i < 4; i++) {
    const r = count(
      "Encrypt",
      await chain.client.post(keyPath(chain.keys.default, "encrypt"), encryptBody(`m${i}`, { metadata: { awsPrincipalArn: marker } })),
    );
    if (r.status === 200) answers.push(r.json);
  }
  assert.ok(answers.length > 0, "at least one encrypt answered");
  for (const a of answers) count("Decrypt", await chain.client.post(keyPath(chain.keys.default, "decrypt"), decryptBody(a)));
  // A key the key store does not list (authenticated: its key store is counted).
  count("GetKeyMetadata", await chain.client.post(keyPath(hiddenKey, "metadata"), metadataBody()));
  // SigV4 failures: a wrong secret twice, an access key id nobody configured once.
  const wrongSecret = { accessKeyId: chain.accessKeyId, secretAccessKey: randomBytes(30).toString("base64") };
  for (let i = 0; i < 2; i++)
    count(
      "Encrypt",
      await signedPost(chain.url, `${chain.uriPath}/${keyPath(chain.keys.default, "encrypt")}`, encryptBody("x"), wrongSecret, {
        sign: { region: chain.region },
      }),
    );
  const stranger = { accessKeyId: "ZZZZZZZZZZZZZZZZZZZZZZZZZZ", secretAccessKey: wrongSecret.secretAccessKey };
  count(
    "Encrypt",
    await signedPost(chain.url, `${chain.uriPath}/${keyPath(chain.keys.default, "encrypt")}`, encryptBody("x"), stranger, {
      sign: { region: chain.region },
    }),
  );
  // A path that names no key store.
  count(
    "none",
    await signedPost(
      chain.url,
      `/no-such-store-here/kms/xks/v1/${keyPath(chain.keys.default, "encrypt")}`,
      encryptBody("x"),
      chain.client.endpoint,
      { sign: { region: chain.region } },
    ),
  );
  // Spend the key store's quota until the proxy has refused one for it (each request is answered
  // within the 200 ms budget, far faster than the quota's 1 per second refills).
  for (let i = 0; i < 200; i++) {
    const r = count("Encrypt", await chain.client.post(keyPath(chain.keys.default, "encrypt"), encryptBody("q")));
    if (
      r.status === 429 &&
      sampleSum((await scrape(chain.metricsUrl)).families, "xks_proxy_admission_refused_total", { reason: "quota" }) >
        sampleSum(proxy0.families, "xks_proxy_admission_refused_total", { reason: "quota" })
    )
      break;
  }
  const total = [...sent.values()].reduce((a, b) => a + b, 0);
  const okEncrypts = sent.get("Encrypt|none") ?? 0;
  const okDecrypts = sent.get("Decrypt|none") ?? 0;

  // Every answer has left the proxy; wait until it has also closed its books on them.
  let proxy1 = await scrape(chain.metricsUrl);
  await until(async () => {
    proxy1 = await scrape(chain.metricsUrl);
    return (
      sampleSum(proxy1.families, "xks_proxy_requests_in_flight") === 0 &&
      delta(proxy0.families, proxy1.families, "xks_proxy_requests_total") === total
    );
  }, "the proxy to count every request");
  const p0 = proxy0.families;
  const p1 = proxy1.families;

  // Requests: per operation and error exactly what the client saw, and nothing else.
  const byOpError = new Map<string, number>();
  for (const [labels, d] of deltas(p0, p1, "xks_proxy_requests_total")) {
    const l = Object.fromEntries(JSON.parse(labels)) as Record<string, string>;
    const k = `${l.operation}|${l.error}`;
    byOpError.set(k, (byOpError.get(k) ?? 0) + d);
    assert.ok([CHAIN_PREFIX, "unauthenticated", "unknown"].includes(l.key_store), `key_store label ${l.key_store}`);
  }
  assert.deepEqual(Object.fromEntries([...byOpError].sort()), Object.fromEntries([...sent].sort()));
  const req = (labels: Record<string, string>) => delta(p0, p1, "xks_proxy_requests_total", labels);
  assert.equal(req({ operation: "Encrypt", key_store: CHAIN_PREFIX, error: "none" }), okEncrypts);
  assert.equal(req({ operation: "Decrypt", key_store: CHAIN_PREFIX, error: "none" }), okDecrypts);
  assert.equal(req({ operation: "GetKeyMetadata", key_store: CHAIN_PREFIX, error: "KeyNotFoundException" }), 1);
  assert.equal(req({ operation: "Encrypt", key_store: "unauthenticated", error: "AuthenticationFailedException" }), 3);
  assert.equal(req({ operation: "none", key_store: "unknown", error: "InvalidUriPathException" }), 1);
  assert.equal(delta(p0, p1, "xks_proxy_request_duration_seconds_count"), total, "one latency observation per request");

  // SigV4 failures by reason.
  assert.equal(delta(p0, p1, "xks_proxy_sigv4_failures_total", { reason: "signature_mismatch" }), 2);
  assert.equal(delta(p0, p1, "xks_proxy_sigv4_failures_total", { reason: "unknown_access_key" }), 1);
  assert.equal(delta(p0, p1, "xks_proxy_sigv4_failures_total"), 3);

  // Refusals: one count per 429, by reason; the quota's come after SigV4, so they carry the key store.
  const throttled = [...sent].filter(([k]) => k.endsWith("|ThrottlingException")).reduce((a, [, n]) => a + n, 0);
  const quota = delta(p0, p1, "xks_proxy_admission_refused_total", { reason: "quota" });
  assert.ok(quota >= 1, "the quota refused at least one");
  assert.equal(delta(p0, p1, "xks_proxy_admission_refused_total"), throttled);
  assert.equal(req({ key_store: CHAIN_PREFIX, error: "ThrottlingException" }), quota);

  // The agent calls behind the successes, and the agent's health.
  const calls = (method: string) =>
    delta(p0, p1, "xks_proxy_agent_call_duration_seconds_count", { agent: "owner-machine", method, outcome: "ok" });
  assert.equal(calls("Encrypt"), okEncrypts);
  assert.equal(calls("Decrypt"), okDecrypts);
  assert.equal(sampleSum(p1, "xks_proxy_agent_health", { agent: "owner-machine", state: "ACTIVE" }), 1);
  assert.equal(sampleSum(p1, "xks_proxy_agent_health", { agent: "owner-machine" }), 1, "one state at a time");
  assert.ok(sampleSum(p1, "process_cpu_user_seconds_total") > 0, "default process metrics");

  // The agent: its operations by key store and result, audit writes, tunnel, HSM.
  const agent1 = await scrape(chain.agentMetricsUrl);
  const a0 = agent0.families;
  const a1 = agent1.families;
  const ops = (labels: Record<string, string>) => delta(a0, a1, "xks_agent_operations_total", labels);
  assert.equal(ops({ operation: "Encrypt", key_store: CHAIN_PREFIX, result: "OK" }), okEncrypts);
  assert.equal(ops({ operation: "Decrypt", key_store: CHAIN_PREFIX, result: "OK" }), okDecrypts);
  assert.equal(
    ops({ operation: "Encrypt" }) + ops({ operation: "Decrypt" }) + ops({ operation: "GetKeyMetadata" }),
    okEncrypts + okDecrypts,
    "nothing else reached the agent's key operations",
  );
  assert.equal(delta(a0, a1, "xks_agent_audit_write_seconds_count"), okEncrypts + okDecrypts, "one audit write per key operation");
  assert.equal(delta(a0, a1, "xks_agent_operation_duration_seconds_count", { operation: "Encrypt" }), okEncrypts);
  assert.ok(ops({ operation: "GetHealthStatus", key_store: "n/a", result: "OK" }) >= 0);
  assert.equal(sampleSum(a1, "xks_agent_tunnel_up", { tunnel: "local-sshd" }), 1);
  assert.ok(sampleSum(a1, "xks_agent_tunnel_connects_total", { tunnel: "local-sshd" }) >= 1);
  assert.equal(sampleSum(a1, "xks_agent_health", { state: "ACTIVE" }), 1);
  assert.equal(sampleSum(a1, "xks_agent_hsm_reinitializations_total"), 0);
  assert.ok(sampleSum(a1, "process_resident_memory_bytes") > 0, "default process metrics");

  // Nothing from a request or a secret in either scrape.
  for (const [which, text] of [
    ["proxy", proxy1.text],
    ["agent", agent1.text],
  ]) {
    for (const secret of [
      chain.secretAccessKey,
      chain.accessKeyId,
      chain.agentToken,
      wrongSecret.secretAccessKey,
      stranger.accessKeyId,
      marker,
      hiddenKey,
      ...Object.values(chain.keys),
    ])
      assert.ok(!text.includes(secret), `${which} scrape holds ${secret.slice(0, 12)}…`);
  }
});

test("the metrics listeners answer GET /metrics only", async () => {
  for (const url of [chain.metricsUrl, chain.agentMetricsUrl]) {
    const other = await fetch(url.replace("/metrics", "/"));
    assert.equal(other.status, 404);
    await other.text();
    const post = await fetch(url, { method: "POST" });
    assert.equal(post.status, 404);
    await post.text();
  }
});
