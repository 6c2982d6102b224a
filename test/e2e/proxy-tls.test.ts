/**
 * The proxy without an ALB, through the real chain (proxy ⇄ real OpenSSH sshd
 * ⇄ agent ⇄ SoftHSM): the proxy serves HTTPS itself with mutual TLS, from
 * throwaway material made by openssl (testbed/tls.ts). Clients are the real
 * curl (its own TLS and its own SigV4) and Node's https with requests signed
 * by @smithy/signature-v4.
 *
 * Where a refused client certificate is refused on the wire is Node's, and
 * asserted here because the README states it: no certificate gets a TLS alert
 * inside the handshake (TLS 1.2 handshake_failure, TLS 1.3
 * certificate_required); an untrusted, expired or wrongly named certificate
 * lets the handshake finish and the connection is closed without an alert.
 * Every one of them gets no HTTP answer, and the proxy reads no request.
 */
import assert from "node:assert/strict";
import { copyFileSync, readFileSync, writeFileSync } from "node:fs";
import { connect } from "node:tls";
import { after, before, describe, test } from "node:test";
import { type Chain, startChain } from "../../testbed/chain.ts";
import { type CertFiles, certFingerprint, issueServerCert } from "../../testbed/tls.ts";
import { GENEROUS_MS, until } from "../../testbed/wait.ts";
import { decryptBody, encryptBody, healthBody, keyPath } from "../../testbed/xks/bodies.ts";
import { type ClientTls, curlTlsArgs, nodeTlsOptions, type Resp, runCurl, send, signedPost } from "../../testbed/xks/client.ts";
import { decryptProblem, encryptProblem } from "../../testbed/xks/oracle.ts";

interface CurlResult {
  /** curl's exit code (0: an HTTP answer arrived). */
  code: number | null;
  /** %{http_code}: "000" when no HTTP answer arrived. */
  httpCode: string;
  body: string;
  /** curl -v's trace and error lines. */
  verbose: string;
}

/** Runs the real curl with -v against the chain; `args` come before the URL. */
async function curl(url: string, args: string[]): Promise<CurlResult> {
  const r = await runCurl(["-v", "-w", "\n%{http_code}", ...args, url]);
  const nl = r.stdout.lastIndexOf("\n");
  return { code: r.code, httpCode: r.stdout.slice(nl + 1), body: r.stdout.slice(0, nl), verbose: r.stderr };
}

/** curl's arguments for a SigV4-signed GetHealthStatus to the chain (as AWS's XKS test client sends it). */
function signedHealthArgs(chain: Chain, kmsRequestId?: string): string[] {
  return [
    "--aws-sigv4",
    `aws:amz:${chain.region}:kms-xks-proxy`,
    "--user",
    `${chain.accessKeyId}:${chain.secretAccessKey}`,
    "-H",
    "Content-Type: application/json",
    "--data",
    JSON.stringify(healthBody(kmsRequestId ? { kmsRequestId } : {})),
  ];
}

/** The server certificate's fingerprint on a new connection, and the TLS version and cipher negotiated. */
function handshake(
  port: number,
  tls: ClientTls,
  o: { maxVersion?: "TLSv1.2" | "TLSv1.3" } = {},
): Promise<{ fingerprint256: string; protocol: string; cipher: string }> {
  return new Promise((resolve, reject) => {
    const s = connect({ host: "127.0.0.1", port, servername: "localhost", ...nodeTlsOptions(tls), ...o }, () => {
      const r = { fingerprint256: s.getPeerCertificate().fingerprint256, protocol: s.getProtocol() ?? "", cipher: s.getCipher().name };
      s.end();
      resolve(r);
    });
    s.on("error", reject);
  });
}

const count = (text: string, needle: string) => text.split(needle).length - 1;

describe("the proxy without an ALB: direct TLS, mutual TLS and /ready", () => {
  let chain: Chain;
  let tls: ClientTls;
  let port: number;
  before(async () => {
    chain = await startChain({ tls: { mutual: true } });
    await chain.waitActive();
    tls = chain.tls!;
    port = Number(new URL(chain.url).port);
  });
  after(async () => {
    await chain?.stop();
  });

  test("a SigV4-signed request over HTTPS (curl --aws-sigv4 --cacert with the client certificate; smithy over Node's https)", async () => {
    assert.match(chain.url, /^https:\/\//);
    const plaintext = Buffer.from("over direct TLS");
    const byCurl = await chain.client.curl(keyPath(chain.keys.default, "encrypt"), encryptBody(plaintext));
    assert.equal(encryptProblem(byCurl, { plaintext }), undefined, byCurl.text);
    const e = await chain.client.postRetrying(keyPath(chain.keys.default, "encrypt"), encryptBody(plaintext));
    assert.equal(encryptProblem(e, { plaintext }), undefined, e.text);
    const d = await chain.client.postRetrying(keyPath(chain.keys.default, "decrypt"), decryptBody(JSON.parse(e.text)));
    assert.equal(decryptProblem(d, plaintext), undefined, d.text);

    // TLS 1.3 by default; in TLS 1.2 an ECDHE key exchange with an AEAD cipher.
    assert.equal((await handshake(port, tls)).protocol, "TLSv1.3");
    const t12 = await handshake(port, tls, { maxVersion: "TLSv1.2" });
    assert.equal(t12.protocol, "TLSv1.2");
    assert.match(t12.cipher, /^ECDHE-(ECDSA|RSA)-(AES(128|256)-GCM-SHA(256|384)|CHACHA20-POLY1305)$/);
  });

  test("the suites KMS requires are served; TLS 1.2 without ECDHE+AEAD, TLS 1.1 and TLS 1.0 are refused in the handshake", async () => {
    const base = [...curlTlsArgs(tls)];
    for (const suite of ["--tls13-ciphers TLS_AES_256_GCM_SHA384", "--tls13-ciphers TLS_CHACHA20_POLY1305_SHA256"]) {
      const r = await curl(`${chain.url}/ping`, [...base, ...suite.split(" ")]);
      assert.equal(r.httpCode, "200", `${suite}: ${r.verbose.slice(-400)}`);
    }
    const gcm = await curl(`${chain.url}/ping`, [...base, "--tls-max", "1.2", "--ciphers", "ECDHE-ECDSA-AES256-GCM-SHA384"]);
    assert.equal(gcm.httpCode, "200", gcm.verbose.slice(-400));
    assert.match(gcm.verbose, /SSL connection using TLSv1\.2 \/ ECDHE-ECDSA-AES256-GCM-SHA384/);

    // ECDHE but CBC (no AEAD): the client offers only that, the server has no suite in common.
    const cbc = await curl(`${chain.url}/ping`, [...base, "--tls-max", "1.2", "--ciphers", "ECDHE-ECDSA-AES256-SHA"]);
    assert.equal(cbc.httpCode, "000");
    assert.match(cbc.verbose, /TLS alert, handshake failure/);

    // Old protocol versions: curl really sends the old ClientHello (its own security level lowered) and gets protocol_version.
    for (const v of ["1.0", "1.1"]) {
      const r = await curl(`${chain.url}/ping`, [...base, `--tlsv${v}`, "--tls-max", v, "--ciphers", "DEFAULT@SECLEVEL=0"]);
      assert.equal(r.httpCode, "000", `TLS ${v}`);
      assert.match(r.verbose, new RegExp(`TLSv${v.replace(".", "\\.")} \\(OUT\\), TLS handshake, Client hello`), `TLS ${v} hello sent`);
      assert.match(r.verbose, /TLS alert, protocol version/, `TLS ${v}`);
    }
  });

  test("mutual TLS: no certificate, a self-signed, an expired or a wrongly named one get no HTTP answer; a good one is served", async () => {
    const m = chain.tlsMaterial!;
    const withCert = (c: CertFiles) => ["--cert", c.cert, "--key", c.key];
    const cases: Array<{ name: string; args: string[] }> = [
      { name: "no certificate", args: [] },
      { name: "self-signed", args: withCert(m.clients.selfSigned) },
      { name: "expired", args: withCert(m.clients.expired) },
      { name: "wrong name", args: withCert(m.clients.wrongName) },
    ];
    for (const version of ["1.2", "1.3"]) {
      for (const c of cases) {
        const label = `TLS ${version}, ${c.name}`;
        const kmsRequestId = `refused-${version}-${c.name.replaceAll(" ", "-")}`;
        const refusedBefore = count(chain.proxy.logs(), "client certificate refused");
        const r = await curl(`${chain.url}${chain.uriPath}/health`, [
          "--cacert",
          tls.caFile,
          `--tlsv${version}`,
          "--tls-max",
          version,
          ...c.args,
          ...signedHealthArgs(chain, kmsRequestId),
        ]);
        assert.notEqual(r.code, 0, label);
        assert.equal(r.httpCode, "000", `${label}: ${r.body}`);
        assert.doesNotMatch(r.verbose, /^< HTTP\//m, label);
        // What the client sees on the wire (the README says the same).
        if (c.name === "no certificate") {
          assert.match(r.verbose, version === "1.2" ? /TLS alert, handshake failure/ : /alert certificate required/, label);
        } else {
          assert.doesNotMatch(r.verbose, /\(IN\), TLS alert/, `${label}: Node closes without an alert`);
          assert.match(r.verbose, /SSL_ERROR_SYSCALL|Empty reply from server|Connection reset by peer/, label);
        }
        // The proxy logged the refusal and read no request (its completion line would carry the kmsRequestId).
        await until(() => count(chain.proxy.logs(), "client certificate refused") > refusedBefore, `the refusal in the log (${label})`);
        const logs = chain.proxy.logs();
        assert.ok(!logs.includes(kmsRequestId), `${label}: the request was never read`);
        if (c.name === "wrong name") {
          assert.match(
            logs
              .split("\n")
              .filter((l) => l.includes("no allowed name"))
              .at(-1) ?? "",
            /"clientNames":\["someone-else"\]/,
          );
        }
      }
      const good = await curl(`${chain.url}${chain.uriPath}/health`, [
        ...curlTlsArgs(tls),
        `--tlsv${version}`,
        "--tls-max",
        version,
        ...signedHealthArgs(chain),
      ]);
      assert.equal(good.httpCode, "200", `TLS ${version}, good certificate: ${good.verbose.slice(-400)}`);
    }
  });

  test("the certificate is reloaded on SIGHUP under traffic: no request fails, new connections get the new certificate; a bad file is refused", async () => {
    const m = chain.tlsMaterial!;
    const oldPrint = certFingerprint(m.server.cert);
    assert.equal((await handshake(port, tls)).fingerprint256, oldPrint);
    const next = issueServerCert(m, "server-next");
    const newPrint = certFingerprint(next.cert);
    assert.notEqual(newPrint, oldPrint);

    // Traffic: four callers on new connections (one TLS handshake per request) and one on keep-alive connections.
    const creds = { accessKeyId: chain.accessKeyId, secretAccessKey: chain.secretAccessKey };
    const failures: string[] = [];
    let ok = 0;
    let stop = false;
    const record = (r: Resp | Error, what: string) => {
      if (r instanceof Error) failures.push(`${what}: ${r.message}`);
      else if (r.status !== 200) failures.push(`${what}: HTTP ${r.status} ${r.text}`);
      else ok++;
    };
    const fresh = async () => {
      while (!stop) {
        const r = await signedPost(chain.url, `${chain.uriPath}/health`, healthBody(), creds, { tls, agent: false }).catch((e: Error) => e);
        record(r, "health on a new connection");
      }
    };
    const kept = async () => {
      while (!stop) {
        const r = await chain.client
          .postRetrying(keyPath(chain.keys.default, "encrypt"), encryptBody(Buffer.from("x")))
          .catch((e: Error) => e);
        record(r, "encrypt on a keep-alive connection");
      }
    };
    const traffic = [fresh(), fresh(), fresh(), fresh(), kept()];
    try {
      await until(() => ok >= 20 || failures.length > 0, "traffic before the reload");
      const reloadsBefore = count(chain.proxy.logs(), "TLS certificate reloaded");
      copyFileSync(next.key, m.server.key);
      copyFileSync(next.cert, m.server.cert);
      chain.proxy.proc!.kill("SIGHUP");
      await until(() => count(chain.proxy.logs(), "TLS certificate reloaded") > reloadsBefore, "the reload");
      assert.equal((await handshake(port, tls)).fingerprint256, newPrint);
      const okAtReload = ok;
      await until(() => ok >= okAtReload + 20 || failures.length > 0, "traffic after the reload");
    } finally {
      stop = true;
      await Promise.all(traffic);
    }
    assert.deepEqual(failures, []);

    // A bad certificate file: the reload is refused with the problem logged, the running certificate stays.
    const rejectedBefore = count(chain.proxy.logs(), "reload rejected");
    writeFileSync(m.server.cert, "not a certificate\n");
    chain.proxy.proc!.kill("SIGHUP");
    await until(() => count(chain.proxy.logs(), "reload rejected") > rejectedBefore, "the refused reload");
    const line = chain.proxy
      .logs()
      .split("\n")
      .filter((l) => l.includes("reload rejected"))
      .at(-1)!;
    assert.match(line, /tls\.certificate: .*holds no PEM X\.509 certificate/);
    assert.equal((await handshake(port, tls)).fingerprint256, newPrint);
    assert.equal((await chain.client.post("health", healthBody())).status, 200);
    copyFileSync(next.cert, m.server.cert);

    // The private key never reaches the log.
    const logs = chain.proxy.logs();
    for (const k of [m.server.key, next.key]) {
      const body = readFileSync(k, "utf8").split("\n")[1];
      assert.ok(!logs.includes(body), "no key material in the proxy's log");
    }
  });

  test("GET /ready is 200 while the agent is healthy and 503 while it is down, unauthenticated; /ping stays 200", async () => {
    const get = (path: string, method = "GET") => send(chain.url, { method, path }, { tls });
    await chain.waitActive();
    const up = await get("/ready");
    assert.equal(up.status, 200, up.text);
    assert.deepEqual(up.json, { ready: true, agents: 1, usableAgents: 1 });
    // Not an XKS path: another method is the spec's unknown-path answer, never SigV4's 401.
    const post = await get("/ready", "POST");
    assert.equal(post.status, 404);
    assert.equal(post.json?.errorName, "InvalidUriPathException");

    await chain.agent.stop();
    let down: Resp | undefined;
    await until(
      async () => {
        down = await get("/ready");
        return down.status === 503;
      },
      "/ready to answer 503 with the agent stopped",
      GENEROUS_MS,
      100,
    );
    assert.deepEqual(down?.json, { ready: false, agents: 1, usableAgents: 0 });
    assert.equal((await get("/ping")).status, 200);

    chain.agent.start();
    await until(async () => (await get("/ready")).status === 200, "/ready to answer 200 with the agent back", GENEROUS_MS, 100);
  });
});
