/**
 * Secrets and failures that cannot heal by themselves, on a real SoftHSM token: a PIN the token
 * refuses is tried once and then not again until the PIN file changes (counted at the real
 * module's C_Login), health and the dashboard say why; a damaged owner-controls file pauses the
 * agent and says why.
 */
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { EventEmitter } from "node:events";
import { mkdirSync, mkdtempSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import WebSocket from "ws";
import { Controls } from "../../agent/controls.ts";
import { startDashboard } from "../../agent/dashboard.ts";
import { Hsm } from "../../agent/hsm/hsm.ts";
import { type Pkcs11Port, pkcs11jsPort } from "../../agent/hsm/port.ts";
import { encrypt } from "../../agent/ops/encrypt.ts";
import { getHealthStatus } from "../../agent/ops/get-health-status.ts";
import { TunnelSet } from "../../agent/tunnel.ts";
import { AgentError } from "../../shared/errors.ts";
import { createLogger } from "../../shared/logging.ts";
import { agentClient, type CallError } from "../../testbed/grpc-client.ts";
import { createKeySet, createSoftHsmToken, DIRECT_USE, directOpContext, type SoftHsmToken, TEST_KEYS } from "../../testbed/hsm.ts";
import { startTestAgent, type TestAgent } from "../../testbed/in-process.ts";
import { findLeaks, LogCapture } from "../../testbed/logs.ts";
import { GENEROUS_MS, nextEvent, until } from "../../testbed/wait.ts";
import { agentMetadata } from "../../testbed/xks/metadata.ts";

describe("a PIN the token refuses", () => {
  let dir: string;
  let token: SoftHsmToken;

  before(() => {
    dir = mkdtempSync(join(tmpdir(), "xks-pin-"));
    token = createSoftHsmToken({ dir: join(dir, "hsm") });
    createKeySet(token, TEST_KEYS);
  });
  after(() => rmSync(dir, { recursive: true, force: true }));

  /** Writes the PIN file the way an editor does (a new private file renamed over the old one). */
  let n = 0;
  const writePin = (file: string, pin: string) => {
    const tmp = `${file}.${n++}`;
    writeFileSync(tmp, `${pin}\n`, { mode: 0o600 });
    renameSync(tmp, file);
  };

  test("under traffic: one C_Login in all; health and the dashboard say why; a new PIN file logs in again", async (t) => {
    const pinFile = join(dir, "pin");
    const wrong = "0000-wrong-pin-value";
    writePin(pinFile, wrong);
    // The real pkcs11js port, with its C_Login calls counted.
    let logins = 0;
    const countingPort = (): Pkcs11Port => {
      const real = pkcs11jsPort();
      return new Proxy(real, {
        get(target, prop, receiver) {
          const v = Reflect.get(target, prop, receiver);
          if (typeof v !== "function") return v;
          if (prop === "C_Login")
            return (...args: unknown[]) => {
              logins++;
              return (v as (...a: unknown[]) => unknown).apply(target, args);
            };
          return v.bind(target);
        },
      });
    };
    const logs = new LogCapture();
    const log = createLogger({ level: "debug", name: "xks-agent" }, logs);
    const hsm = new Hsm({ module: token.module, tokenLabel: token.tokenLabel, pin: wrong, pinFile }, log, { port: countingPort });
    t.after(() => hsm.close());
    const ctx = directOpContext(hsm, { healthKey: TEST_KEYS.health, serve: [TEST_KEYS.default] });

    // The owner's dashboard on this HSM.
    const controls = new Controls(join(dir, "state", "controls.json"));
    mkdirSync(join(dir, "state"), { recursive: true });
    const dashboard = await startDashboard({
      host: "127.0.0.1",
      port: 0,
      stateFile: join(dir, "state", "controls.json"),
      controls,
      tunnels: new TunnelSet([], join(dir, "none.sock"), log),
      hsm,
      events: new EventEmitter(),
      log,
    });
    t.after(() => dashboard.close());
    const feed = new WebSocket(`${dashboard.url.replace("http://", "ws://").replace("/?", "/feed?")}`);
    const messages: Array<Record<string, any>> = [];
    feed.on("message", (d) => messages.push(JSON.parse(String(d))));
    t.after(() => feed.terminate());
    await until(() => messages.some((m) => m.type === "snapshot"), "the dashboard's snapshot");
    assert.deepEqual(messages[0].hsm, { loginStopped: null });

    const why = /PIN refused by the token \(CKR_PIN_INCORRECT\): fix the PIN; no further logins until it changes/;
    // Traffic: many Encrypt calls and health checks.
    for (let i = 0; i < 300; i++) {
      assert.throws(
        () =>
          encrypt(
            ctx,
            {
              metadata: null,
              keyId: TEST_KEYS.default,
              plaintext: randomBytes(32),
              aad: Buffer.alloc(0),
              wantIntegrityValue: false,
            },
            DIRECT_USE,
          ),
        (err: unknown) => err instanceof AgentError && err.reason === "HSM_UNAVAILABLE" && why.test(err.message),
      );
      if (i % 10 === 0) {
        const h = getHealthStatus(ctx);
        assert.equal(h.state, "UNAVAILABLE");
        assert.match(h.detail, why);
        assert.match(h.detail, /the PIN file is re-read when it changes/);
      }
      // Let timers run, as a server between calls would.
      if (i % 50 === 0) await new Promise((r) => setImmediate(r));
    }
    assert.equal(logins, 1, "one C_Login at the module, whatever the traffic");
    await until(() => messages.some((m) => m.type === "hsm" && typeof m.hsm.loginStopped === "string"), "the dashboard to say why");
    assert.match(messages.find((m) => m.type === "hsm")?.hsm.loginStopped ?? "", why);

    // The same wrong PIN written again: read again, no login.
    writePin(pinFile, wrong);
    assert.throws(() => hsm.key(TEST_KEYS.default), why);
    assert.equal(logins, 1);

    // The owner fixes the PIN file: one more login, and service.
    writePin(pinFile, token.pin);
    const e = encrypt(
      ctx,
      {
        metadata: null,
        keyId: TEST_KEYS.default,
        plaintext: Buffer.from("back"),
        aad: Buffer.alloc(0),
        wantIntegrityValue: false,
      },
      DIRECT_USE,
    );
    assert.equal(e.ciphertext.length, 4);
    assert.equal(getHealthStatus(ctx).state, "ACTIVE");
    assert.equal(logins, 2);
    await until(() => messages.some((m) => m.type === "hsm" && m.hsm.loginStopped === null), "the dashboard to clear it");

    log.flush();
    assert.match(logs.text(), /HSM logins stopped: PIN refused by the token \(CKR_PIN_INCORRECT\)/);
    assert.match(logs.text(), /the PIN file changed: logging in again/);
    assert.deepEqual(findLeaks(logs.text(), { "wrong PIN": wrong, PIN: token.pin, "SO PIN": token.soPin }), []);
    assert.deepEqual(findLeaks(JSON.stringify(messages), { "wrong PIN": wrong, PIN: token.pin }), []);
  });
});

describe("a damaged owner-controls file fails closed", () => {
  let a: TestAgent;
  before(async () => {
    a = await startTestAgent();
  });
  after(() => a?.destroy());

  for (const [what, content, problem] of [
    ["not JSON", "{ paused: fal", /is damaged: not valid JSON/],
    ["the wrong shape", JSON.stringify({ paused: "no", disabledKeys: [] }), /is damaged: "paused" is missing or not true\/false/],
    ["keys not a list", JSON.stringify({ paused: false, disabledKeys: "foo" }), /is damaged: "disabledKeys" is missing/],
    ["not an object", "[]", /is damaged: not a JSON object/],
  ] as const) {
    test(`${what}: a Controls reading it is paused and says why`, () => {
      const d = mkdtempSync(join(tmpdir(), "xks-controls-"));
      try {
        const file = join(d, "controls.json");
        writeFileSync(file, content, { mode: 0o600 });
        const c = new Controls(file);
        assert.equal(c.paused, true);
        assert.match(c.problem ?? "", problem);
        assert.ok(c.problem!.includes(file), "names the file");
        // Writing it again (what `xks-agent resume` does) repairs it.
        c.setPaused(false);
        assert.equal(c.paused, false);
        assert.equal(c.problem, undefined);
        assert.deepEqual(new Controls(file).snapshot(), { paused: false, disabledKeys: [] });
      } finally {
        rmSync(d, { recursive: true, force: true });
      }
    });
  }

  test("unreadable (a folder where the file should be): paused", () => {
    const d = mkdtempSync(join(tmpdir(), "xks-controls-"));
    try {
      mkdirSync(join(d, "controls.json"));
      const c = new Controls(join(d, "controls.json"));
      assert.equal(c.paused, true);
      assert.match(c.problem ?? "", /cannot be read \(EISDIR\)/);
    } finally {
      rmSync(d, { recursive: true, force: true });
    }
  });

  test("a running agent whose file gets damaged pauses, logs it loudly, health says why; resume repairs it", async () => {
    const c = agentClient(a.target, a.token);
    try {
      assert.equal((await c.call("GetHealthStatus", {})).state, "ACTIVE");
      a.agent.controls.setKeyDisabled(a.keys.encryptOnly, true);
      const damaged = nextEvent<string>(a.agent.controls, "damaged", () => true, "the agent to see the damage");
      writeFileSync(a.config.stateFile, "{ truncated", { mode: 0o600 });
      await damaged;
      const h = await c.call("GetHealthStatus", {});
      assert.equal(h.state, "UNAVAILABLE");
      assert.equal(h.paused, true);
      assert.match(h.detail, /^paused \(fix: xks-agent resume\): the owner controls file .* is damaged: not valid JSON/);
      await assert.rejects(
        c.call("Encrypt", { metadata: agentMetadata("Encrypt"), keyId: a.keys.default, plaintext: Buffer.from("x") }),
        (e: CallError) => e.reason === "INVALID_STATE",
      );
      // The keys it knew to be disabled stay disabled.
      assert.equal(a.agent.controls.isKeyDisabled(a.keys.encryptOnly), true);
      await until(() => a.logs.text().includes("OWNER CONTROLS FILE DAMAGED"), "the loud log line");
      const line = a.logs.json().find((l) => String(l.msg).includes("OWNER CONTROLS FILE DAMAGED"))!;
      assert.equal(line.level, "error");
      assert.match(line.msg, /the agent is PAUSED.*xks-agent resume --config .*agent\.json/);

      // `xks-agent resume` writes the file afresh (another process, as the CLI is).
      const resumed = nextEvent<{ paused: boolean }>(a.agent.controls, "change", (s) => !s.paused, "the agent to resume", {
        capMs: GENEROUS_MS,
      });
      new Controls(a.config.stateFile).setPaused(false);
      await resumed;
      assert.equal(a.agent.controls.problem, undefined);
      assert.equal((await c.call("GetHealthStatus", {})).state, "ACTIVE");
    } finally {
      c.close();
    }
  });

  test("an agent that starts with a damaged file starts paused", async () => {
    writeFileSync(a.config.stateFile, "not json at all", { mode: 0o600 });
    await a.restart();
    assert.equal(a.agent.controls.paused, true);
    assert.match(a.agent.controls.problem ?? "", /not valid JSON/);
    const c = agentClient(a.target, a.token);
    try {
      const h = await c.call("GetHealthStatus", {});
      assert.equal(h.paused, true);
      assert.match(h.detail, /is damaged/);
    } finally {
      c.close();
      a.agent.controls.setPaused(false);
    }
  });
});
