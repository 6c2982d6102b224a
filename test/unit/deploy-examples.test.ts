/**
 * deploy/proxy.example.json and deploy/agent.example.json as shipped: each is
 * copied next to the files it references (made as the guide makes them: keys
 * 0600, certificates, an ed25519 SSH key) and loaded by the real config
 * loaders, the proxy's also by `xks-proxy check`. They must agree with each
 * other and with the CloudFormation template (key store, socket, tunnel user,
 * port), listen where an ALB can reach them, and mark every placeholder.
 */
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { copyFileSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import ssh2 from "ssh2";
import { loadAgentConfig } from "../../agent/config.ts";
import { loadProxyConfig } from "../../proxy/config.ts";
import { secretFile } from "../../testbed/configs.ts";
import { TEST_IDENTITIES, writeIdentity } from "../../testbed/identities.ts";

const ROOT = new URL("../..", import.meta.url).pathname;
const proxyExample = JSON.parse(readFileSync(`${ROOT}deploy/proxy.example.json`, "utf8"));
const agentExample = JSON.parse(readFileSync(`${ROOT}deploy/agent.example.json`, "utf8"));
const template = JSON.parse(readFileSync(`${ROOT}deploy/cloudformation/xks-proxy.json`, "utf8"));

describe("deploy/*.example.json", () => {
  let dir: string;
  before(() => {
    dir = mkdtempSync(join(tmpdir(), "xks-examples-"));
  });
  after(() => rmSync(dir, { recursive: true, force: true }));

  it("proxy.example.json loads with the files it names, and `xks-proxy check` passes it", () => {
    const d = mkdtempSync(join(dir, "proxy-"));
    const file = join(d, "proxy.json");
    copyFileSync(`${ROOT}deploy/proxy.example.json`, file);
    writeIdentity(d, "proxy-identity", TEST_IDENTITIES.proxy);
    writeFileSync(join(d, "agent-ownermac.crt"), TEST_IDENTITIES.agent.certificate);
    secretFile(d, "agent-token-ownermac", "0123456789abcdef0123456789abcdef");
    secretFile(d, "store1.secret", Buffer.alloc(32, 7).toString("base64"));
    const cfg = loadProxyConfig(file, {});
    assert.equal(cfg.listen.host, "0.0.0.0", "reachable by the ALB (the default 127.0.0.1 is not)");
    assert.equal(cfg.listen.port, template.Parameters.ProxyPort.Default, "the template's proxy port");
    assert.equal(cfg.fleetSize, 2, "two proxies in the template");
    const check = spawnSync(process.execPath, [`${ROOT}bin/xks-proxy.js`, "check", "--config", file], { encoding: "utf8" });
    assert.equal(check.status, 0, check.stderr);
    assert.equal(check.stdout.split("\n")[0], `${file}: OK`);
    // No agent is reachable here: reported, and not a failure (its tunnel is dialled from the owner's machine).
    assert.match(check.stdout, /agent ownermac: not reached/);
  });

  it("agent.example.json loads with the files it names", () => {
    const d = mkdtempSync(join(dir, "agent-"));
    const file = join(d, "agent.json");
    copyFileSync(`${ROOT}deploy/agent.example.json`, file);
    secretFile(d, "softhsm-pin", "a-pin-of-the-owner");
    secretFile(d, "agent-token", "0123456789abcdef0123456789abcdef");
    writeIdentity(d, "agent-identity", TEST_IDENTITIES.agent);
    writeFileSync(join(d, "proxy-identity.crt"), TEST_IDENTITIES.proxy.certificate);
    const key = ssh2.utils.generateKeyPairSync("ed25519");
    writeFileSync(join(d, "id_ed25519"), key.private, { mode: 0o600 });
    const cfg = loadAgentConfig(file, {});
    assert.equal(cfg.tunnels.length, 2, "one tunnel per proxy instance");
    assert.deepEqual(
      cfg.keyStores.map((s) => s.keyStore),
      ["/xks/store1"],
    );
  });

  it("the two examples and the template agree", () => {
    const agentEntry = proxyExample.agents[0];
    assert.equal(agentExample.agentId, agentEntry.id);
    const name = template.Parameters.AgentName.Default;
    assert.equal(agentEntry.id, name);
    for (const t of agentExample.tunnels) {
      assert.equal(t.username, `xks-t-${name}`, "the tunnel user the template (and deploy/EC2.md) makes");
      assert.equal(t.remoteSocket, `/run/xks/${name}/agent.sock`);
      assert.equal(agentEntry.target, `unix://${t.remoteSocket}`);
      assert.equal(t.port, 22);
    }
    assert.deepEqual(
      agentExample.keyStores.map((s: any) => [s.keyStore, s.keys]),
      proxyExample.keyStores.map((s: any) => [s.uriPathPrefix, s.keys]),
      "the agent allow-lists what the proxy serves",
    );
    assert.deepEqual(agentExample.proxyIdentities, ["proxy-identity.crt"]);
    assert.deepEqual(agentEntry.identities, ["agent-ownermac.crt"]);
    // The guide's KMS command names the examples' key store and the template's health check.
    const guide = readFileSync(`${ROOT}deploy/README.md`, "utf8");
    assert.ok(guide.includes(`--xks-proxy-uri-path ${proxyExample.keyStores[0].uriPathPrefix}/kms/xks/v1`));
    assert.ok(guide.includes(`--xks-key-id ${proxyExample.keyStores[0].keys[0]}`));
    assert.ok(guide.includes(`health check is \`GET ${template.Resources.TargetGroup.Properties.HealthCheckPath}\``));
  });

  it("every placeholder is marked", () => {
    assert.match(proxyExample.keyStores[0].credentials[0].accessKeyId, /^REPLACE/);
    for (const t of agentExample.tunnels) {
      assert.match(t.hostKeyFingerprint, /^SHA256:REPLACE\//);
      assert.match(t.host, /^203\.0\.113\.\d+$/, "TEST-NET-3 (RFC 5737), never a real address");
    }
    assert.notEqual(agentExample.tunnels[0].hostKeyFingerprint, agentExample.tunnels[1].hostKeyFingerprint, "each host has its own key");
  });
});
