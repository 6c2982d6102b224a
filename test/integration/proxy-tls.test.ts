/**
 * The proxy config's `tls` section (proxy/tls.ts), checked once at start
 * with every problem named by its field, on real certificate files made by
 * openssl (testbed/tls.ts); the client-name parsing of a peer certificate;
 * and one in-process HTTPS listener without mutual TLS, reached by curl.
 */
import assert from "node:assert/strict";
import { chmodSync, copyFileSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { parseProxyConfig } from "../../proxy/config.ts";
import { serve } from "../../proxy/main.ts";
import { clientCertificateNames } from "../../proxy/tls.ts";
import { createLogger } from "../../shared/logging.ts";
import { TEST_IDENTITIES, writeIdentity, writePins } from "../../testbed/identities.ts";
import { LogCapture } from "../../testbed/logs.ts";
import { issue, makeTlsMaterial, type TlsMaterial } from "../../testbed/tls.ts";
import { runCurl as curl, send } from "../../testbed/xks/client.ts";

describe("proxy config: tls", () => {
  let dir: string;
  let m: TlsMaterial;
  let file: string;
  before(() => {
    dir = mkdtempSync(join(tmpdir(), "xks-proxy-tls-"));
    m = makeTlsMaterial(join(dir, "tls"));
    file = join(dir, "proxy.json");
  });
  after(() => rmSync(dir, { recursive: true, force: true }));

  const env = { T: "0123456789abcdef", S: "c2VjcmV0LWEtc2VjcmV0LWEtc2VjcmV0LWEtc2VjcmV0LWE=" };
  const base = (tls: unknown) => ({
    region: "us-east-1",
    listen: { port: 0 },
    identity: writeIdentity(dir, "proxy-identity", TEST_IDENTITIES.proxy),
    agents: [{ id: "a", target: "127.0.0.1:1", token: { env: "T" }, identities: writePins(dir, "agent", [TEST_IDENTITIES.agent]) }],
    keyStores: [
      { uriPathPrefix: "", credentials: [{ accessKeyId: "AAAAAAAAAAAAAAAAAAAAAAAAAA", secretAccessKey: { env: "S" } }], keys: ["foo"] },
    ],
    ...(tls === undefined ? {} : { tls }),
  });
  const problems = (tls: unknown): string => {
    try {
      parseProxyConfig(base(tls), file, env);
    } catch (err) {
      return (err as Error).message;
    }
    return "";
  };

  it("absent: plain HTTP; present: the certificate, its key, and mutual TLS when clientCa is set", () => {
    assert.equal(parseProxyConfig(base(undefined), file, env).tls, undefined);
    const plain = parseProxyConfig(base({ certificate: m.server.cert, key: { file: m.server.key } }), file, env).tls!;
    assert.equal(plain.clientCa, undefined);
    assert.match(plain.subject, /CN=localhost/);
    const mutual = parseProxyConfig(
      base({
        certificate: m.server.cert,
        key: { file: m.server.key },
        clientCa: m.clientCa.cert,
        clientNames: ["Cks.Kms.US-East-1.amazonaws.com"],
      }),
      file,
      env,
    ).tls!;
    assert.ok(mutual.clientCa?.includes("BEGIN CERTIFICATE"));
    assert.deepEqual(mutual.clientNames, ["cks.kms.us-east-1.amazonaws.com"]);
  });

  it("every problem is named by its field, and the key's content never appears", () => {
    const other = issue(m.serverCa, m.dir, "other-server", { cn: "localhost", san: ["DNS:localhost"], use: "server" });
    const expired = issue(m.serverCa, m.dir, "expired-server", { cn: "localhost", san: ["DNS:localhost"], use: "server", days: -1 });
    const cases: Array<[unknown, string[]]> = [
      ["x", ["tls: must be an object"]],
      [{}, ["tls.certificate: is required", "tls.key: must be an object"]],
      [{ certificate: m.server.cert, key: { file: other.key } }, ["tls.key: the key does not belong to the certificate"]],
      [{ certificate: expired.cert, key: { file: expired.key } }, ["tls.certificate: the certificate in", "expired on"]],
      [{ certificate: join(dir, "missing.crt"), key: { file: m.server.key } }, ["tls.certificate: cannot read", "ENOENT"]],
      [{ certificate: m.server.key, key: { file: m.server.key } }, ["tls.certificate: ", "holds no PEM X.509 certificate"]],
      [{ certificate: m.server.cert, key: m.server.key }, ["tls.key: must reference a secret"]],
      [
        { certificate: m.server.cert, key: { file: m.server.key }, clientCa: m.clients.good.cert, clientNames: ["a"] },
        ["tls.clientCa: ", "not a CA certificate"],
      ],
      [
        { certificate: m.server.cert, key: { file: m.server.key }, clientCa: m.clientCa.cert },
        ["tls.clientNames: is required with tls.clientCa"],
      ],
      [{ certificate: m.server.cert, key: { file: m.server.key }, clientNames: ["a"] }, ["tls.clientNames: needs tls.clientCa"]],
      [
        { certificate: m.server.cert, key: { file: m.server.key }, clientCa: m.clientCa.cert, clientNames: ["*.example.com", "a", "A"] },
        ["tls.clientNames[0]: must be a DNS name", 'tls.clientNames[2]: duplicate name "A"'],
      ],
      [
        { certificate: m.server.cert, key: { file: m.server.key }, clientCa: m.clientCa.cert, clientNames: [] },
        ["tls.clientNames: must have at least 1"],
      ],
      [{ certificate: m.server.cert, key: { file: m.server.key }, ciphers: "RC4" }, ["tls.ciphers: unknown field"]],
    ];
    for (const [tls, expected] of cases) {
      const msg = problems(tls);
      for (const e of expected) assert.ok(msg.includes(e), `${JSON.stringify(tls)}: expected "${e}" in:\n${msg}`);
      assert.ok(!msg.includes("PRIVATE KEY"), "no key material in the message");
    }
    // A key file others may read is refused like every secret file.
    const loose = join(dir, "loose.key");
    copyFileSync(m.server.key, loose);
    chmodSync(loose, 0o644);
    assert.match(problems({ certificate: m.server.cert, key: { file: loose } }), /tls\.key: .*chmod 600/);
  });

  it("a client certificate's names: subject CN and DNS subjectAltNames, lower case, once each", () => {
    assert.deepEqual(
      clientCertificateNames({ subject: { CN: "Client-A" }, subjectaltname: "DNS:client-a, DNS:b.example, IP Address:127.0.0.1" }),
      ["client-a", "b.example"],
    );
    assert.deepEqual(clientCertificateNames({ subject: { CN: ["x", "y"] } }), ["x", "y"]);
    assert.deepEqual(clientCertificateNames({ subjectaltname: 'DNS:"odd, name", URI:https://x' }), []);
    assert.deepEqual(clientCertificateNames({}), []);
  });

  it("HTTPS without mutual TLS: curl with --cacert alone is served (/ping, /ready), plain HTTP on that port gets no answer", async () => {
    const cfg = parseProxyConfig(base({ certificate: m.server.cert, key: { file: m.server.key } }), file, env);
    const logs = new LogCapture();
    const proxy = await serve(cfg, createLogger({ level: "info" }, logs));
    try {
      assert.match(proxy.url, /^https:\/\/127\.0\.0\.1:\d+$/);
      const ping = await curl(["--cacert", m.serverCa.cert, `${proxy.url}/ping`]);
      assert.equal(ping.code, 0, ping.stderr);
      assert.match(ping.stdout, /^pong from xks-proxy/);
      // The agent at 127.0.0.1:1 never answers: not ready, answered at once without any credential.
      const ready = await send(proxy.url, { method: "GET", path: "/ready" }, { tls: { caFile: m.serverCa.cert } });
      assert.equal(ready.status, 503);
      assert.deepEqual(ready.json, { ready: false, agents: 1, usableAgents: 0 });
      const plain = await curl(["-w", "%{http_code}", `http://127.0.0.1:${proxy.port}/ping`]);
      assert.notEqual(plain.code, 0);
      assert.equal(plain.stdout, "000");
      assert.ok(!logs.text().includes("PRIVATE KEY"));
    } finally {
      await proxy.close(100);
    }
  });
});
