/**
 * The config schemas (shared/schema.ts, proxy/config.ts, agent/config.ts) at
 * their edges: comments in config files, the prefix pasted with /kms/xks/v1,
 * unknown fields, the order and names of the field paths, the defaults, and
 * the reference page generated from the schemas.
 */
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { loadAgentConfig, parseAgentConfig } from "../../agent/config.ts";
import { loadProxyConfig, parseProxyConfig } from "../../proxy/config.ts";
import { agentConfigSchema } from "../../agent/config.ts";
import { proxyConfigSchema } from "../../proxy/config.ts";
import { configReference } from "../../shared/config-docs.ts";
import { DOCS_CONTEXT } from "../../shared/schema.ts";
import { ConfigError } from "../../shared/config.ts";
import { stripJsonComments } from "../../shared/jsonc.ts";
import { CREDS, minimalAgentConfig, secretFile } from "../../testbed/configs.ts";
import { TEST_IDENTITIES, writeIdentity, writePins } from "../../testbed/identities.ts";

function problems(fn: () => unknown): string[] {
  try {
    fn();
  } catch (e) {
    assert.ok(e instanceof ConfigError, `a ConfigError, got ${e}`);
    return e.problems;
  }
  assert.fail("accepted");
}

describe("JSONC: comments outside strings", () => {
  test("line and block comments are removed; strings that look like comments are kept", () => {
    const text = [
      "{ // the proxy",
      '  "a": "http://x//y", /* block',
      '     over lines */ "b": "/* not a comment */",',
      '  "c": "quote \\" // still a string", "d": 1 // end',
      "}",
    ].join("\n");
    assert.deepEqual(JSON.parse(stripJsonComments(text)), {
      a: "http://x//y",
      b: "/* not a comment */",
      c: 'quote " // still a string',
      d: 1,
    });
  });

  test("positions are kept: a JSON error after a comment names the same line and column", () => {
    const text = '{\n  /* x */ "a": 1,\n  "b": ,\n}';
    const stripped = stripJsonComments(text);
    assert.equal(stripped.length, text.length);
    assert.equal(stripped.split("\n").length, text.split("\n").length);
    assert.equal(stripped.indexOf('"b": ,'), text.indexOf('"b": ,'));
  });

  test("nothing else is relaxed: trailing commas and an unclosed block stay errors", () => {
    assert.throws(() => JSON.parse(stripJsonComments('{"a": 1,}')));
    assert.throws(() => JSON.parse(stripJsonComments('{"a": 1} /* open')));
    assert.equal(stripJsonComments('"//"'), '"//"');
    assert.equal(stripJsonComments(""), "");
  });
});

describe("config files with comments, and the schema's edges", () => {
  let dir: string;
  before(() => {
    dir = mkdtempSync(join(tmpdir(), "xks-schema-"));
  });
  after(() => rmSync(dir, { recursive: true, force: true }));

  const proxyRaw = (over: Record<string, unknown> = {}) => ({
    region: "us-east-1",
    identity: writeIdentity(dir, "proxy-identity", TEST_IDENTITIES.proxy),
    agents: [
      {
        id: "mac-1",
        target: "127.0.0.1:7000",
        token: secretFile(dir, "token", "0123456789abcdef0123"),
        identities: writePins(dir, "agent", [TEST_IDENTITIES.agent]),
      },
    ],
    keyStores: [
      {
        uriPathPrefix: "/example/prefix",
        credentials: [{ accessKeyId: CREDS.a.accessKeyId, secretAccessKey: secretFile(dir, "a.secret", CREDS.a.secretAccessKey) }],
        keys: ["k1"],
      },
    ],
    ...over,
  });

  test("both daemons load a config file with comments", () => {
    const proxyFile = join(dir, "proxy.jsonc");
    const json = JSON.stringify(proxyRaw(), null, 2).replace('"region"', '// where the key stores live\n  "region"');
    writeFileSync(proxyFile, `/* the proxy's config */\n${json}\n// end\n`);
    const proxy = loadProxyConfig(proxyFile, {});
    assert.equal(proxy.region, "us-east-1");
    assert.equal(proxy.keyStores[0].credentials[0].secretAccessKey, CREDS.a.secretAccessKey);

    const agentFile = join(dir, "agent.json");
    writeFileSync(agentFile, `{ // the agent\n${JSON.stringify(minimalAgentConfig(dir)).slice(1)}`);
    assert.equal(loadAgentConfig(agentFile, {}).pkcs11.pin, "s3cret-pin-value");
  });

  test("a JSON error names the file", () => {
    const file = join(dir, "broken.json");
    writeFileSync(file, '{ "region": "us-east-1", }');
    assert.throws(
      () => loadProxyConfig(file, {}),
      (e: Error) => e instanceof ConfigError && e.message.includes(file) && /not valid JSON/.test(e.message),
    );
  });

  test("a prefix pasted with /kms/xks/v1 is refused with the hint, by the proxy and by the agent", () => {
    const file = join(dir, "p.json");
    for (const prefix of ["/example/prefix/kms/xks/v1", "/kms/xks/v1", "/example/prefix/kms/xks/v1/"]) {
      const raw = proxyRaw();
      (raw.keyStores[0] as Record<string, unknown>).uriPathPrefix = prefix;
      assert.deepEqual(
        problems(() => parseProxyConfig(raw, file, {})),
        ['keyStores[0].uriPathPrefix: must not end with "/kms/xks/v1": give the prefix without /kms/xks/v1 (KMS appends it)'],
      );
    }
    assert.deepEqual(
      problems(() =>
        parseAgentConfig(minimalAgentConfig(dir, { keyStores: [{ keyStore: "/example/prefix/kms/xks/v1", keys: ["k1"] }] }), file, {}),
      ),
      [
        "keyStores[0].keyStore: must not end with \"/kms/xks/v1\": give the prefix without /kms/xks/v1 (KMS appends it) (the key store's uriPathPrefix in the proxy's config)",
      ],
    );
  });

  test("unknown fields at every depth, each named, before the object's other problems; paths in field order", () => {
    const file = join(dir, "p.json");
    const raw = proxyRaw({
      regoin: "typo",
      listen: { port: "8443", hots: "x" },
      limits: { maxBodyBytes: 1.5 },
      metrics: { port: 70000, path: "/m" },
      log: { level: "loud", format: "xml" },
    });
    (raw.keyStores[0].credentials[0] as Record<string, unknown>).sessionToken = "x";
    assert.deepEqual(
      problems(() => parseProxyConfig(raw, file, {})),
      [
        "regoin: unknown field",
        "listen.hots: unknown field",
        "listen.port: must be an integer",
        "limits.maxBodyBytes: must be an integer",
        "keyStores[0].credentials[0].sessionToken: unknown field",
        "metrics.path: unknown field",
        "metrics.port: must be <= 65535",
        "log.level: must be one of fatal, error, warn, info, debug, trace, silent",
        "log.format: must be one of json, pretty",
      ],
    );
  });

  test("a non-object config, a missing section and a secret given inline", () => {
    assert.deepEqual(
      problems(() => parseProxyConfig([], "x.json", {})),
      ["(root): must be an object"],
    );
    const agent = minimalAgentConfig(dir, { proxyToken: "inline-token-0123456789" });
    delete agent.pkcs11;
    const p = problems(() => parseAgentConfig(agent, join(dir, "a.json"), {}));
    assert.deepEqual(p, [
      "pkcs11: must be an object",
      'proxyToken: must reference a secret ({"file": …}, {"env": …} or {"keychain": …}), not hold it inline',
    ]);
  });

  test("the defaults: an absent section is its fields' defaults; metrics is off unless given", () => {
    const p = parseProxyConfig(proxyRaw(), join(dir, "p.json"), {});
    assert.deepEqual(p.listen, { host: "127.0.0.1", port: 8443 });
    assert.deepEqual(p.admission, { maxInFlightPerAgent: 128, queueTargetMs: 100 });
    assert.deepEqual(p.http, { headersTimeoutMs: 10_000, requestTimeoutMs: 15_000, keepAliveTimeoutMs: 65_000, maxConnections: 4096 });
    assert.deepEqual(p.log, { level: "info", format: "json" });
    assert.equal(p.metrics, undefined);
    assert.deepEqual(parseProxyConfig(proxyRaw({ metrics: {} }), join(dir, "p.json"), {}).metrics, { host: "127.0.0.1", port: 9464 });

    const a = parseAgentConfig(minimalAgentConfig(dir), join(dir, "a.json"), {});
    assert.equal(a.stateFile, join(dir, "state/controls.json"), "a default path resolves from the config's folder");
    assert.deepEqual(a.audit, {
      dir: join(dir, "state/audit"),
      key: "xks-audit",
      segmentBytes: 65536 * 1024,
      checkpointMs: 250,
      fsync: "checkpoint",
    });
    assert.equal(a.healthKey, "xks-health");
    assert.equal(a.maxQueued, 256);
    assert.deepEqual(a.tunnels, []);
    assert.equal(a.ciphertextMetadata.toString(), "xks-agent/1");
    assert.equal(a.metrics, undefined);
    assert.deepEqual(parseAgentConfig(minimalAgentConfig(dir, { metrics: {} }), join(dir, "a.json"), {}).metrics, {
      host: "127.0.0.1",
      port: 9465,
    });
  });
});

test("deploy/CONFIG.md is the page the schemas generate, and names every field", () => {
  const page = configReference(proxyConfigSchema(DOCS_CONTEXT), agentConfigSchema(DOCS_CONTEXT));
  assert.equal(readFileSync(new URL("../../deploy/CONFIG.md", import.meta.url), "utf8"), page, "run npm run gen:config-docs");
  for (const f of [
    "`keyStores[].credentials[].secretAccessKey`",
    "`tunnels[].remoteTcp.port`",
    "`audit.keepGiB`",
    "`metrics.port`",
    "`log.format`",
  ])
    assert.ok(page.includes(f), f);
});
