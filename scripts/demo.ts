/**
 * The demo: the whole chain on this machine, from nothing.
 *
 *   fresh SoftHSM token + keys → real OpenSSH sshd on a free loopback port ("EC2")
 *   → proxy (bin/xks-proxy.js) ← agent's ssh2 reverse tunnel ← agent (bin/xks-agent.js)
 *
 * then a SigV4-signed health, metadata, encrypt and decrypt round trip (signed
 * by AWS's own signer and by curl), usage enforcement on the restricted keys,
 * one request denied by the agent's policy (403 AccessDeniedException), and it keeps running until Ctrl-C. Everything a client needs is written to
 * .demo/demo.json. Run it with ./scripts/demo.sh (which also does the set-up).
 *
 * `--tls`: the proxy serves HTTPS itself with mutual TLS, from a throwaway CA
 * made in .demo/tls (server certificate for localhost and 127.0.0.1, a client
 * certificate); the same checks run over it, plus a client without a
 * certificate that must get no HTTP answer, and demo.json names the files.
 */
import { TEST_IDENTITIES } from "../testbed/identities.ts";
import { spawnSync } from "node:child_process";
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { PACKAGE_ROOT } from "../shared/paths.ts";
import { type Chain, chainPidFiles, DENIED_PRINCIPAL, startChain } from "../testbed/chain.ts";
import { TLS_CLIENT_NAME } from "../testbed/tls.ts";
import { stopLeftovers } from "../testbed/procs.ts";
import { type EncryptAnswer, decryptBody, encryptBody, healthBody, keyPath, metadataBody } from "../testbed/xks/bodies.ts";
import { decryptProblem, specErrorOf } from "../testbed/xks/oracle.ts";

const { values } = parseArgs({
  options: { dir: { type: "string", default: join(PACKAGE_ROOT, ".demo") }, "no-wait": { type: "boolean" }, tls: { type: "boolean" } },
});
const dir = values.dir!;

const bold = (s: string) => (process.stdout.isTTY ? `\x1b[1m${s}\x1b[0m` : s);
const green = (s: string) => (process.stdout.isTTY ? `\x1b[32m${s}\x1b[0m` : s);
const red = (s: string) => (process.stdout.isTTY ? `\x1b[31m${s}\x1b[0m` : s);
const step = (s: string) => console.log(`\n${bold("==>")} ${s}`);

/** Stops whatever a previous run left behind (its children are recorded in .demo/pids and sshd's pid file). */
function killLeftovers(): void {
  for (const pid of stopLeftovers(chainPidFiles(dir))) console.log(`stopped a leftover process from an earlier run (pid ${pid})`);
}

let failures = 0;
function show(label: string, r: { status: number; text: string }, expectStatus: number, expectErrorName?: string): void {
  const ok = r.status === expectStatus && (!expectErrorName || specErrorOf(r) === expectErrorName);
  if (!ok) failures++;
  console.log(`${ok ? green("ok ") : red("BAD")} ${label}: HTTP ${r.status} ${r.text}`);
}

/** The demo's principal; the metadata is otherwise what KMS sends. */
const DEMO_METADATA = { awsPrincipalArn: "arn:aws:iam::123456789012:user/demo", kmsKeyArn: "arn:aws:kms:us-east-1:123456789012:key/demo" };

async function roundTrip(chain: Chain): Promise<void> {
  const post = (rest: string, body: unknown) => chain.client.post(rest, body);
  const k = chain.keys;
  step("GetHealthStatus (signed with AWS's @smithy/signature-v4)");
  show("health", await post("health", healthBody()), 200);

  step("GetKeyMetadata");
  show(`metadata ${k.default}`, await post(keyPath(k.default, "metadata"), metadataBody("CreateKey", DEMO_METADATA)), 200);

  step("Encrypt with AAD and the integrity value, then Decrypt");
  const plaintext = Buffer.from("Hello from the owner's HSM");
  const aad = Buffer.from("project=nile,department=marketing");
  const enc = await post(keyPath(k.default, "encrypt"), encryptBody(plaintext, { aad, integrityValue: true, metadata: DEMO_METADATA }));
  show("encrypt", enc, 200);
  const e = enc.json as EncryptAnswer;
  const dec = await post(keyPath(k.default, "decrypt"), decryptBody(e, { aad, metadata: DEMO_METADATA }));
  show("decrypt", dec, 200);
  const problem = decryptProblem(dec, plaintext);
  if (problem) failures++;
  const back = Buffer.from((dec.json as { plaintext?: string })?.plaintext ?? "", "base64").toString();
  console.log(`    plaintext back: ${JSON.stringify(back)} ${problem ? red(`(${problem})`) : green("(matches)")}`);

  step("The same Encrypt signed by curl --aws-sigv4 (an independent signer)");
  show("curl encrypt", await chain.client.curl(keyPath(k.default, "encrypt"), encryptBody(plaintext, { metadata: DEMO_METADATA })), 200);

  step("Usage enforcement on restricted keys");
  const encWith = (key: string, integrityValue = false) =>
    post(keyPath(key, "encrypt"), encryptBody(plaintext, { integrityValue, metadata: DEMO_METADATA }));
  show(`encrypt with ${k.encryptOnly}`, await encWith(k.encryptOnly), 200);
  show(`encrypt+integrity value with ${k.encryptOnly}`, await encWith(k.encryptOnly, true), 400, "InvalidKeyUsageException");
  show(`encrypt with ${k.decryptOnly}`, await encWith(k.decryptOnly), 400, "InvalidKeyUsageException");
  show(`encrypt with ${k.noUsage}`, await encWith(k.noUsage), 400, "InvalidKeyUsageException");
  const tampered = decryptBody(e, { aad, metadata: DEMO_METADATA, over: { authenticationTag: Buffer.alloc(16).toString("base64") } });
  show("tampered tag", await post(keyPath(k.default, "decrypt"), tampered), 400, "InvalidCiphertextException");

  step(`The owner's policy on the agent: principals ending in :user/blocked are denied (${chain.agentPolicyFile})`);
  const blocked = { ...DEMO_METADATA, awsPrincipalArn: DENIED_PRINCIPAL };
  show(
    `encrypt as ${DENIED_PRINCIPAL}`,
    await post(keyPath(k.default, "encrypt"), encryptBody(plaintext, { metadata: blocked })),
    403,
    "AccessDeniedException",
  );
}

/** Mutual TLS: curl without a client certificate gets no HTTP answer (the handshake is refused). */
function refusedWithoutCertificate(chain: Chain): void {
  step("Mutual TLS: a client without a certificate (curl --cacert only)");
  const r = spawnSync(
    "curl",
    ["-sS", "--noproxy", "*", "--max-time", "30", "--cacert", chain.tls!.caFile, "-w", "%{http_code}", `${chain.url}/ping`],
    { encoding: "utf8" },
  );
  const ok = r.status !== 0 && r.stdout.trim() === "000";
  if (!ok) failures++;
  console.log(`${ok ? green("ok ") : red("BAD")} no client certificate: no HTTP answer (${r.stderr.trim().split("\n").at(-1)})`);
}

async function main(): Promise<number> {
  killLeftovers();
  step(`Building the chain in ${dir}`);
  console.log("    fresh SoftHSM token and keys, a real OpenSSH sshd on a free loopback port, the proxy and the agent");
  // The proxy as it ships: one worker per core (the test-bed's default is one process).
  const chain = await startChain({ dir, proxyWorkers: "auto", ...(values.tls ? { tls: { mutual: true } } : {}) });
  let stopping = false;
  const stop = async (code: number) => {
    if (stopping) return;
    stopping = true;
    console.log("\nstopping agent, proxy and sshd…");
    await chain.stop();
    process.exit(code);
  };
  process.on("SIGINT", () => void stop(0));
  process.on("SIGTERM", () => void stop(0));
  try {
    await chain.waitActive();
  } catch (err) {
    console.error(red((err as Error).message));
    await stop(1);
  }
  console.log(`    sshd on 127.0.0.1:${chain.sshd.port} (host key ${chain.sshd.hostKeyFingerprint})`);
  console.log(`    proxy on ${chain.url}, agent tunnel → ${chain.remoteSocket}`);
  console.log(`    metrics: proxy ${chain.metricsUrl}, agent ${chain.agentMetricsUrl}`);
  console.log(
    `    channel: mutual TLS, agent identity ${TEST_IDENTITIES.agent.fingerprint}, proxy identity ${TEST_IDENTITIES.proxy.fingerprint} (each pinned by the other)`,
  );
  if (chain.tlsMaterial) {
    const m = chain.tlsMaterial;
    console.log(`    HTTPS with mutual TLS: server certificate ${m.server.cert} (CA ${m.serverCa.cert}),`);
    console.log(`    client certificates must chain to ${m.clientCa.cert} and be named ${TLS_CLIENT_NAME}`);
  }
  const tunnelLine = chain.agent
    .logs()
    .split("\n")
    .find((l) => l.includes("TCP_NODELAY"));
  if (tunnelLine) console.log(`    agent: ${JSON.parse(tunnelLine).msg}`);

  const demoJson = {
    url: chain.url,
    metricsUrl: chain.metricsUrl,
    agentMetricsUrl: chain.agentMetricsUrl,
    region: chain.region,
    uriPath: chain.uriPath,
    accessKeyId: chain.accessKeyId,
    secretAccessKey: chain.secretAccessKey,
    keys: {
      default: chain.keys.default,
      encryptOnly: chain.keys.encryptOnly,
      decryptOnly: chain.keys.decryptOnly,
      noUsage: chain.keys.noUsage,
    },
    deniedPrincipal: DENIED_PRINCIPAL,
    ...(chain.tls ? { caFile: chain.tls.caFile, clientCert: chain.tls.certFile, clientKey: chain.tls.keyFile } : {}),
  };
  writeFileSync(join(dir, "demo.json"), `${JSON.stringify(demoJson, null, 2)}\n`, { mode: 0o600 });

  await roundTrip(chain);
  if (chain.tlsMaterial) refusedWithoutCertificate(chain);

  step(failures === 0 ? green("All demo checks passed.") : red(`${failures} demo check(s) failed.`));
  console.log(`\nClient settings written to ${join(dir, "demo.json")}. Logs: ${join(dir, "logs")}/`);
  console.log("Try it yourself (curl signs with SigV4 itself):\n");
  const body = JSON.stringify({
    requestMetadata: {
      awsPrincipalArn: "arn:aws:iam::123456789012:user/you",
      kmsOperation: "Encrypt",
      kmsRequestId: "try-1",
      kmsKeyArn: "arn:aws:kms:us-east-1:123456789012:key/demo",
    },
    plaintext: Buffer.from("hi there").toString("base64"),
    encryptionAlgorithm: "AES_GCM",
  });
  const tls = chain.tls;
  const tlsArgs = tls ? ` --cacert ${tls.caFile} --cert ${tls.certFile} --key ${tls.keyFile}` : "";
  console.log(
    `  curl -s${tlsArgs} --aws-sigv4 "aws:amz:${chain.region}:kms-xks-proxy" --user "${chain.accessKeyId}:${chain.secretAccessKey}" \\\n` +
      `    -H 'Content-Type: application/json' --data '${body}' \\\n` +
      `    ${chain.url}${chain.uriPath}/keys/${chain.keys.default}/encrypt\n`,
  );
  console.log(`Owner controls: node bin/xks-agent.js pause --config ${chain.agentConfigFile}   (and resume)`);
  const dashFile = join(dir, "agent", "state", "dashboard-url");
  if (existsSync(dashFile)) console.log(`Live dashboard (what KMS is doing, pause switch): ${readFileSync(dashFile, "utf8").trim()}`);
  if (values["no-wait"]) {
    await stop(failures === 0 ? 0 : 1);
    return 0;
  }
  console.log("\nRunning. Press Ctrl-C to stop everything.");
  await new Promise(() => {});
  return 0;
}

main().catch((err) => {
  console.error(red(`demo failed: ${(err as Error).stack ?? err}`));
  process.exit(1);
});
