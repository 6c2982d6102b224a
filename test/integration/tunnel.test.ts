/**
 * The agent's reverse tunnel against a REAL OpenSSH sshd (testbed/sshd.ts), real sockets, no
 * stubs. A line-echo server on a Unix socket in a 0700 temp dir stands in for the agent's gRPC
 * socket; a "far side" client connects to the forward that sshd opened, as the proxy would.
 *
 * Echo protocol: the far side sends `<mode>:<payload>\n`; the server answers `echo:<payload>\n`,
 * in ONE write for mode 1 and in TWO writes ~1 ms apart for mode 2. The far side likewise sends a
 * mode-2 request in two writes ~1 ms apart. Split messages are what Nagle + delayed ACK turn into
 * ~40 ms stalls when either end of the SSH connection lacks TCP_NODELAY: a split exchange then takes
 * tens of milliseconds longer than a plain one, which is what the Nagle tests compare.
 */
import { after, before, describe, type TestContext, test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { performance } from "node:perf_hooks";
import { parseAgentConfig } from "../../agent/config.ts";
import { MAX_FORWARDED_CHANNELS, Tunnel, TunnelSet, fingerprintOf, type TunnelState, type TunnelTarget } from "../../agent/tunnel.ts";
import { ConfigError } from "../../shared/config.ts";
import { createLogger, type Logger } from "../../shared/logging.ts";
import { minimalAgentConfig, secretFile } from "../../testbed/configs.ts";
import { findLeaks, LogCapture } from "../../testbed/logs.ts";
import { killQuietly } from "../../testbed/procs.ts";
import { freePort } from "../../testbed/ports.ts";
import { type Sshd, type StartSshdOptions, startSshd } from "../../testbed/sshd.ts";
import { nextEvent, sleep, until } from "../../testbed/wait.ts";
import { rogueForward } from "../../testbed/rogue.ts";

/** A logger whose lines the test can read back. */
function captureLog(): { log: Logger; lines: string[] } {
  const capture = new LogCapture();
  return { log: createLogger({ level: "debug" }, capture), lines: capture.lines };
}

interface EchoServer {
  path: string;
  connections: () => number;
  /** Connections open now. */
  open: () => number;
  close: () => Promise<void>;
}

/** The local stand-in for the agent's gRPC socket, in a fresh 0700 dir. */
async function startEchoServer(): Promise<EchoServer> {
  const dir = mkdtempSync(join(tmpdir(), "xks-agent-")); // mkdtemp creates it 0700
  const path = join(dir, "agent.sock");
  const socks = new Set<net.Socket>();
  let connections = 0;
  const server = net.createServer((sock) => {
    connections++;
    socks.add(sock);
    sock.on("close", () => socks.delete(sock)).on("error", () => {});
    sock.setEncoding("utf8");
    let buf = "";
    sock.on("data", (d: string) => {
      buf += d;
      for (let i = buf.indexOf("\n"); i >= 0; i = buf.indexOf("\n")) {
        const line = buf.slice(0, i);
        buf = buf.slice(i + 1);
        const payload = line.slice(2);
        if (line.startsWith("2:")) {
          sock.write("echo:");
          setTimeout(() => sock.write(`${payload}\n`), 1);
        } else {
          sock.write(`echo:${payload}\n`);
        }
      }
    });
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(path, () => resolve());
  });
  return {
    path,
    connections: () => connections,
    open: () => socks.size,
    close: async () => {
      for (const s of socks) s.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** The far side (the proxy's view): a line-oriented client on the forwarded socket. */
class FarClient {
  private buf = "";
  private readonly ready: string[] = [];
  private readonly waiters: Array<{ resolve: (l: string) => void; reject: (e: Error) => void }> = [];
  private closedWith: Error | undefined;

  private constructor(readonly sock: net.Socket) {
    sock.setEncoding("utf8");
    sock.on("data", (d: string) => {
      this.buf += d;
      for (let i = this.buf.indexOf("\n"); i >= 0; i = this.buf.indexOf("\n")) {
        const line = this.buf.slice(0, i);
        this.buf = this.buf.slice(i + 1);
        const w = this.waiters.shift();
        if (w) w.resolve(line);
        else this.ready.push(line);
      }
    });
    const fail = (err?: Error) => {
      this.closedWith ??= err ?? new Error("far-side connection closed");
      for (const w of this.waiters.splice(0)) w.reject(this.closedWith);
    };
    sock.on("error", fail).on("close", () => fail());
  }

  static connect(opts: net.NetConnectOpts): Promise<FarClient> {
    return new Promise((resolve, reject) => {
      const sock = net.connect(opts);
      sock.once("connect", () => {
        sock.off("error", reject);
        resolve(new FarClient(sock));
      });
      sock.once("error", reject);
    });
  }

  next(): Promise<string> {
    const l = this.ready.shift();
    if (l !== undefined) return Promise.resolve(l);
    if (this.closedWith) return Promise.reject(this.closedWith);
    return new Promise((resolve, reject) => this.waiters.push({ resolve, reject }));
  }

  /** One write, one reply; returns the reply line. */
  async ask(payload: string): Promise<string> {
    this.sock.write(`1:${payload}\n`);
    return this.next();
  }

  /**
   * A two-piece request (two writes ~1 ms apart) answered by a two-piece reply. Returns the ms
   * from the request's second write to the complete reply.
   */
  async askSplit(payload: string): Promise<number> {
    this.sock.write(`2:${payload.slice(0, 3)}`);
    await sleep(1);
    const t0 = performance.now();
    this.sock.write(`${payload.slice(3)}\n`);
    const reply = await this.next();
    const ms = performance.now() - t0;
    assert.equal(reply, `echo:${payload}`);
    return ms;
  }

  close(): void {
    this.sock.destroy();
  }
}

/** Records every state a tunnel reports. */
function watch(tunnel: Tunnel): TunnelState[] {
  const history: TunnelState[] = [];
  tunnel.on("state", (s: TunnelState) => history.push(s));
  return history;
}

/** The first state (current or future) matching `pred`. */
function waitForState(tunnel: Tunnel, pred: (s: TunnelState) => boolean, what: string): Promise<TunnelState> {
  return nextEvent(tunnel, "state", pred, `the tunnel to be ${what} (now ${JSON.stringify(tunnel.state())})`, { current: tunnel.state() });
}

function targetFor(sshd: Sshd, over: Partial<TunnelTarget>): TunnelTarget {
  return {
    name: "ec2-test",
    host: "127.0.0.1",
    port: sshd.port,
    username: sshd.user,
    privateKey: sshd.clientPrivateKey,
    hostKeyFingerprint: sshd.hostKeyFingerprint,
    keepaliveIntervalMs: 1000,
    backoff: { initialMs: 100, maxMs: 1000 },
    ...over,
  };
}

/**
 * A real sshd, the echo server, a captured log and a tunnel between them
 * (recording every state it reports, not started yet), all stopped when the
 * test ends. `over` sets the tunnel target's fields, e.g. the remote forward.
 */
async function tunnelRig(t: TestContext, over: (sshd: Sshd) => Partial<TunnelTarget>, sshdOptions: StartSshdOptions = {}) {
  const sshd = await startSshd(sshdOptions);
  const echo = await startEchoServer();
  const { log, lines } = captureLog();
  const tunnel = new Tunnel(targetFor(sshd, over(sshd)), echo.path, log);
  const history = watch(tunnel);
  t.after(async () => {
    await tunnel.stop();
    await echo.close();
    await sshd.stop();
  });
  return { sshd, echo, lines, tunnel, history };
}

const socketIn = (sshd: Sshd) => join(sshd.dir, "xks.sock");

/** No log line may carry the private key (or any piece of its body). */
function assertNoKeyInLogs(lines: string[], sshd: Sshd): void {
  const keyBody = sshd.clientPrivateKey.split("\n").filter((l) => l && !l.startsWith("-----"));
  for (const line of lines) {
    assert.ok(!line.includes("PRIVATE KEY"), `log line carries key material: ${line}`);
    for (const part of keyBody) assert.ok(!line.includes(part), "log line carries a piece of the private key");
  }
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

/**
 * `n` plain and `n` split exchanges, interleaved so that whatever else the
 * machine is doing weighs on both alike; returns their medians (ms).
 */
async function compareSplitToPlain(far: FarClient, n: number): Promise<{ plain: number; split: number }> {
  for (let i = 0; i < 50; i++) await far.ask(`warm-${i}`);
  const plain: number[] = [];
  const split: number[] = [];
  for (let i = 0; i < n; i++) {
    const t0 = performance.now();
    assert.equal(await far.ask(`p-${i}`), `echo:p-${i}`);
    plain.push(performance.now() - t0);
    split.push(await far.askSplit(`req-${i}-abcdefgh`));
  }
  return { plain: median(plain), split: median(split) };
}

/**
 * With Nagle on at either end of the SSH connection (or on the far side's own
 * socket), nearly every split exchange waits for a delayed ACK, ~40 ms: its
 * median then exceeds the plain median by about that. Without it the split
 * exchange costs the server's 1 ms gap more.
 */
const NAGLE_STALL_MS = 40;
function assertNoNagleStalls(t: { diagnostic(s: string): void }, m: { plain: number; split: number }): void {
  t.diagnostic(`median plain exchange ${m.plain.toFixed(3)} ms, split exchange ${m.split.toFixed(3)} ms`);
  assert.ok(
    m.split - m.plain < NAGLE_STALL_MS / 2,
    `split exchanges take ${(m.split - m.plain).toFixed(1)} ms longer than plain ones: Nagle/delayed-ACK stalls`,
  );
}

describe("tunnel over the streamlocal (Unix socket) remote forward", () => {
  let sshd: Sshd;
  let echo: EchoServer;
  let tunnel: Tunnel;
  let remoteSocket: string;
  const { log, lines } = captureLog();

  before(async () => {
    sshd = await startSshd();
    echo = await startEchoServer();
    remoteSocket = join(sshd.dir, "xks.sock");
    tunnel = new Tunnel(targetFor(sshd, { remoteSocket }), echo.path, log);
    tunnel.start();
    await waitForState(tunnel, (s) => s.state === "up", "up");
  });

  after(async () => {
    await tunnel?.stop();
    await echo?.close();
    await sshd?.stop();
  });

  test("a client of the remote socket reaches the local server and gets the right bytes", async () => {
    const far = await FarClient.connect({ path: remoteSocket });
    try {
      assert.equal(await far.ask("hello"), "echo:hello");
      assert.equal(await far.ask("second message"), "echo:second message");
      // Larger than one SSH channel window, so flow control is exercised both ways.
      const big = "abcdefghijklmnopqrstuvwxyz0123456789".repeat(90_000);
      assert.equal(await far.ask(big), `echo:${big}`);
      // Several concurrent far-side connections are independent channels.
      const others = await Promise.all([1, 2, 3].map(() => FarClient.connect({ path: remoteSocket })));
      const replies = await Promise.all(others.map((c, i) => c.ask(`conn-${i}`)));
      assert.deepEqual(replies, ["echo:conn-0", "echo:conn-1", "echo:conn-2"]);
      for (const c of others) c.close();
    } finally {
      far.close();
    }
    assertNoKeyInLogs(lines, sshd);
    assert.ok(
      lines.some((l) => l.includes('"tunnel up"')),
      "an 'up' log line",
    );
  });

  test("the connection ran its exec so sshd has TCP_NODELAY on", () => {
    const s = tunnel.state();
    assert.equal(s.state, "up");
    assert.equal(s.nodelayExec, true);
    assert.equal(s.connects, 1);
    assert.equal(s.name, "ec2-test");
    assert.ok(!Number.isNaN(Date.parse(s.since)));
    assert.ok(
      lines.some((l) => l.includes("TCP_NODELAY")),
      "the exec is logged",
    );
    // The forced command ran (nologin) and was the only exec: sshd logged one session.
    assert.match(sshd.logs(), /Accepted publickey for/);
  });

  test("split request/replies cost no more than plain ones: no Nagle stall at either end", async (t) => {
    const far = await FarClient.connect({ path: remoteSocket });
    t.after(() => far.close());
    assertNoNagleStalls(t, await compareSplitToPlain(far, 500));
  });
});

test("fingerprintOf matches ssh-keygen -lf", async (t) => {
  const sshd = await startSshd();
  t.after(() => sshd.stop());
  const blob = Buffer.from(readFileSync(join(sshd.dir, "keys", "host_ed25519.pub"), "utf8").split(" ")[1], "base64");
  assert.equal(fingerprintOf(blob), sshd.hostKeyFingerprint);
});

test("the loopback TCP remote forward carries traffic too", async (t) => {
  const remotePort = await freePort();
  const { sshd, lines, tunnel } = await tunnelRig(t, () => ({ remoteTcp: { host: "127.0.0.1", port: remotePort } }), {
    permitListen: `127.0.0.1:${remotePort}`,
  });
  tunnel.start();
  const up = await waitForState(tunnel, (s) => s.state === "up", "up");
  assert.equal(up.nodelayExec, true);

  // Like grpc-js (transport.ts calls setNoDelay), the far side disables Nagle on its own TCP
  // socket: without it, its split writes stall ~40 ms before they even reach sshd.
  const far = await FarClient.connect({ host: "127.0.0.1", port: remotePort, noDelay: true });
  t.after(() => far.close());
  assert.equal(await far.ask("over tcp"), "echo:over tcp");
  assertNoNagleStalls(t, await compareSplitToPlain(far, 200));
  assertNoKeyInLogs(lines, sshd);
});

test("a remote forward that cannot bind yet is retried until it binds", async (t) => {
  const remotePort = await freePort();
  // Something already holds the port on the sshd host, as a half-dead old session of the agent would.
  const squatter = net.createServer();
  await new Promise<void>((resolve) => squatter.listen(remotePort, "127.0.0.1", () => resolve()));
  t.after(() => squatter.close());
  const { lines, tunnel } = await tunnelRig(t, () => ({ remoteTcp: { host: "127.0.0.1", port: remotePort } }), {
    permitListen: `127.0.0.1:${remotePort}`,
  });
  tunnel.start();
  const failing = await waitForState(tunnel, (s) => /remote forward .* failed/.test(s.lastError ?? ""), "a failed forward");
  assert.equal(failing.state, "connecting");
  assert.equal(failing.connects, 1);
  await until(() => lines.some((l) => l.includes("tunnel remote forward still failing")), "a retry of the forward");
  assert.equal(tunnel.state().state, "connecting", "still connecting while the port is held");

  await new Promise<void>((resolve) => squatter.close(() => resolve()));
  await waitForState(tunnel, (s) => s.state === "up", "up once the port is free");
  assert.equal(tunnel.state().connects, 1, "same SSH connection, only the forward was retried");
  const far = await FarClient.connect({ host: "127.0.0.1", port: remotePort, noDelay: true });
  t.after(() => far.close());
  assert.equal(await far.ask("bound"), "echo:bound");
});

/** sshd's log line for every TCP connection it accepts (LogLevel VERBOSE). */
const connectionsSeen = (sshd: Sshd) => (sshd.logs().match(/Connection from 127\.0\.0\.1 port/g) ?? []).length;

/** The slow backoff's first step: 30 s ±20 %, so at least 24 s before a second attempt. */
function assertWaitsMinutesStep(s: TunnelState, failure: string): void {
  assert.equal(s.failure, failure);
  assert.ok(s.retryInMs !== undefined && s.retryInMs >= 24_000 && s.retryInMs <= 36_000, `retryInMs ${s.retryInMs}`);
  assert.equal(Date.parse(s.nextAttemptAt ?? "") - Date.parse(s.since), s.retryInMs, "nextAttemptAt = since + retryInMs");
}

test("during a host-key change either pin is accepted: the new key as nextHostKeyFingerprint brings the tunnel up", async (t) => {
  // The pinned (current) fingerprint is a key the host no longer has; the next one is the host's real key.
  const old = fingerprintOf(randomBytes(51));
  const { sshd, tunnel } = await tunnelRig(t, (sshd) => ({
    remoteSocket: socketIn(sshd),
    hostKeyFingerprint: old,
    nextHostKeyFingerprint: sshd.hostKeyFingerprint,
  }));
  tunnel.start();
  await waitForState(tunnel, (s) => s.state === "up", "up");
  assert.equal(existsSync(socketIn(sshd)), true, "the forward exists");
  // Neither pin the host's key: refused, and the message names both pins.
  const other = new Tunnel(
    targetFor(sshd, {
      name: "ec2-neither",
      remoteSocket: socketIn(sshd),
      hostKeyFingerprint: old,
      nextHostKeyFingerprint: fingerprintOf(randomBytes(51)),
    }),
    "/tmp/unused.sock",
    captureLog().log,
  );
  t.after(() => other.stop());
  other.start();
  const down = await waitForState(other, (s) => s.state === "down", "down");
  assert.ok(down.lastError?.includes(`expected ${old} or SHA256:`), down.lastError);
  assert.throws(
    () => new Tunnel(targetFor(sshd, { nextHostKeyFingerprint: "MD5:aa:bb" }), "/tmp/unused.sock", captureLog().log),
    /nextHostKeyFingerprint/,
  );
});

test("a wrong pinned host key is refused: never up, no forward, clear log, next attempt in minutes", async (t) => {
  // A real but different key, as after a host-key change.
  const wrongFor = (sshd: Sshd) => fingerprintOf(Buffer.from(readFileSync(`${sshd.clientKeyPath}.pub`, "utf8").split(" ")[1], "base64"));
  const { sshd, echo, lines, tunnel, history } = await tunnelRig(t, (sshd) => ({
    remoteSocket: socketIn(sshd),
    hostKeyFingerprint: wrongFor(sshd),
  }));
  const remoteSocket = socketIn(sshd);
  const wrong = wrongFor(sshd);
  assert.notEqual(wrong, sshd.hostKeyFingerprint);
  // startSshd's readiness probe was one connection already.
  await until(() => connectionsSeen(sshd) >= 1, "sshd to log its readiness probe");
  const probes = connectionsSeen(sshd);
  tunnel.start();

  const down = await waitForState(tunnel, (s) => s.state === "down", "down");
  assert.match(down.lastError ?? "", /host key verification failed/);
  assert.ok(down.lastError!.includes(wrong) && down.lastError!.includes(sshd.hostKeyFingerprint), down.lastError);
  // One attempt, and the next one is scheduled at least 24 s later (the fast backoff would be 100 ms).
  assertWaitsMinutesStep(down, "hostkey");
  await until(() => connectionsSeen(sshd) > probes, "sshd to log the connection");
  assert.equal(connectionsSeen(sshd), probes + 1, "one connection to sshd");
  assert.deepEqual(
    history.map((s) => s.state),
    ["connecting", "down"],
  );
  assert.equal(tunnel.state().connects, 0);
  assert.equal(tunnel.state().nodelayExec, false);
  assert.equal(existsSync(remoteSocket), false, "no forward was created");
  assert.doesNotMatch(sshd.logs(), /Accepted publickey/, "the client never authenticated");

  const json = lines.map((l) => JSON.parse(l) as Record<string, unknown>);
  const refusal = json.find((l) => l.msg === "tunnel refused: host key does not match the pinned fingerprint");
  assert.ok(refusal, "a refusal log line");
  assert.equal(refusal.expected, wrong);
  assert.equal(refusal.seen, sshd.hostKeyFingerprint);
  assert.equal(refusal.level, "error");
  const waiting = json.find((l) => l.msg === "tunnel refused; waiting before the next attempt");
  assert.equal(waiting?.retryInMs, down.retryInMs);
  assert.equal(waiting?.nextAttemptAt, down.nextAttemptAt);
  assertNoKeyInLogs(lines, sshd);
  assert.equal(echo.connections(), 0);
});

/** A fresh ed25519 key that no sshd authorizes; its private key text and public key line. */
function strayKey(t: TestContext, passphrase = ""): { privateKey: string; publicKey: string; path: string } {
  const dir = mkdtempSync(join(tmpdir(), "xks-stray-key-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const path = join(dir, "id_ed25519");
  execFileSync("ssh-keygen", ["-q", "-t", "ed25519", "-N", passphrase, "-C", "stray", "-f", path], { stdio: ["ignore", "ignore", "pipe"] });
  return { privateKey: readFileSync(path, "utf8"), publicKey: readFileSync(`${path}.pub`, "utf8").trim(), path };
}

test("a key the server refuses: one attempt, the next one minutes later, the reason in the state", async (t) => {
  const stray = strayKey(t);
  const { sshd, lines, tunnel, history } = await tunnelRig(t, (sshd) => ({ remoteSocket: socketIn(sshd), privateKey: stray.privateKey }));
  // startSshd's readiness probe was one connection already.
  await until(() => connectionsSeen(sshd) >= 1, "sshd to log its readiness probe");
  const probes = connectionsSeen(sshd);
  tunnel.start();
  const down = await waitForState(tunnel, (s) => s.state === "down", "down");
  assert.match(down.lastError ?? "", new RegExp(`authentication refused by 127\\.0\\.0\\.1:${sshd.port} for user ${sshd.user}`));
  assertWaitsMinutesStep(down, "auth");
  await until(() => connectionsSeen(sshd) > probes, "sshd to log the connection");
  assert.equal(connectionsSeen(sshd), probes + 1, "one connection to sshd");
  assert.deepEqual(
    history.map((s) => s.state),
    ["connecting", "down"],
  );
  assert.ok(
    lines.some((l) => l.includes('"failure":"auth"') && l.includes('"level":"error"')),
    "an error line with the failure kind",
  );
  const body = stray.privateKey.split("\n").filter((l) => l && !l.startsWith("-----"));
  for (const l of lines) for (const part of body) assert.ok(!l.includes(part), "no key material in the log");
});

test("refusals back off exponentially to a cap, network failures stay fast, and a handshake resets the count", async (t) => {
  const stray = strayKey(t);
  const refusalBackoff = { initialMs: 200, maxMs: 800 };
  const { sshd, tunnel, history } = await tunnelRig(t, (sshd) => ({
    remoteSocket: socketIn(sshd),
    privateKey: stray.privateKey,
    refusalBackoff,
  }));
  tunnel.start();
  await until(() => history.filter((s) => s.state === "down").length >= 4, "four refused attempts");
  const delays = history.filter((s) => s.state === "down").map((s) => s.retryInMs!);
  // Bases 200, 400, 800, 800 (capped), each ±20 %, never above the cap.
  for (const [i, base] of [200, 400, 800, 800].entries()) {
    assert.ok(delays[i] >= base * 0.8 && delays[i] <= Math.min(800, base * 1.2), `refusal ${i + 1}: ${delays[i]} ms for base ${base}`);
  }
  assert.ok(history.filter((s) => s.state === "down").every((s) => s.failure === "auth"));

  // The owner authorizes the key: the next attempt gets in, which resets the refusal count.
  const authorized = join(sshd.dir, "keys", "authorized_keys");
  const before = readFileSync(authorized, "utf8");
  writeFileSync(authorized, `${before}restrict,port-forwarding,command="/usr/sbin/nologin" ${stray.publicKey}\n`);
  await waitForState(tunnel, (s) => s.state === "up", "up with the key authorized");
  writeFileSync(authorized, before);
  const seen = history.length;
  for (const pid of sshd.sessionPids()) killQuietly(pid, "SIGKILL");
  const again = await nextEvent<TunnelState>(
    tunnel,
    "state",
    (s) => s.state === "down" && s.failure === "auth",
    "a refusal after the key was withdrawn",
  );
  assert.ok(again.retryInMs! <= 200 * 1.2, `the count restarted: ${again.retryInMs} ms`);
  // Between them, the cut session was a network failure, retried fast.
  const cut = history.slice(seen).find((s) => s.state === "down");
  assert.equal(cut?.failure, "network");
  assert.ok(cut!.retryInMs! <= 1000, `network failure retried in ${cut!.retryInMs} ms`);
});

test("nothing listening: a network failure, reconnected with the fast backoff (default 250 ms → 2 s)", async (t) => {
  const echo = await startEchoServer();
  t.after(() => echo.close());
  const { log } = captureLog();
  const port = await freePort();
  const tunnel = new Tunnel(
    {
      name: "nowhere",
      host: "127.0.0.1",
      port,
      username: "u",
      privateKey: "",
      hostKeyFingerprint: `SHA256:${"A".repeat(43)}`,
      remoteSocket: "/tmp/nowhere.sock",
    },
    echo.path,
    log,
  );
  const history = watch(tunnel);
  t.after(() => tunnel.stop());
  tunnel.start();
  await until(() => history.filter((s) => s.state === "down").length >= 3, "three refused dials");
  for (const s of history.filter((s) => s.state === "down")) {
    assert.equal(s.failure, "network");
    assert.match(s.lastError ?? "", /ECONNREFUSED/);
    assert.ok(s.retryInMs! <= 2000, `${s.retryInMs}`);
  }
});

test("a passphrase-protected private key connects with its passphrase", async (t) => {
  const sshd0 = await startSshd();
  const stops: Array<() => unknown> = [];
  // Tunnel before echo server before sshd.
  t.after(async () => {
    for (const stop of stops.reverse()) await stop();
    await sshd0.stop();
  });
  // The authorized key, re-encrypted under a passphrase (same key pair).
  const dir = mkdtempSync(join(tmpdir(), "xks-enc-key-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const encrypted = join(dir, "id_ed25519");
  writeFileSync(encrypted, sshd0.clientPrivateKey, { mode: 0o600 });
  const passphrase = "tunnel-passphrase-4711";
  execFileSync("ssh-keygen", ["-q", "-p", "-f", encrypted, "-P", "", "-N", passphrase], { stdio: ["ignore", "ignore", "pipe"] });
  const privateKey = readFileSync(encrypted, "utf8");
  assert.match(privateKey, /BEGIN OPENSSH PRIVATE KEY/);
  assert.ok(!privateKey.includes(sshd0.clientPrivateKey.split("\n")[2]), "re-encrypted");

  const echo = await startEchoServer();
  stops.push(() => echo.close());
  const capture = new LogCapture();
  const tunnel = new Tunnel(
    targetFor(sshd0, { remoteSocket: socketIn(sshd0), privateKey, passphrase }),
    echo.path,
    createLogger({ level: "debug" }, capture),
  );
  stops.push(() => tunnel.stop());
  tunnel.start();
  await waitForState(tunnel, (s) => s.state === "up", "up");
  const far = await FarClient.connect({ path: socketIn(sshd0) });
  stops.push(() => far.close());
  assert.equal(await far.ask("through an encrypted key"), "echo:through an encrypted key");
  assert.deepEqual(findLeaks(capture.text(), { passphrase, "private key": privateKey.split("\n")[1] }), []);

  // In the agent's config: the passphrase is a secret reference; missing or wrong is a config error at start.
  const cfgDir = mkdtempSync(join(tmpdir(), "xks-enc-cfg-"));
  t.after(() => rmSync(cfgDir, { recursive: true, force: true }));
  const file = join(cfgDir, "agent.json");
  const raw = (tunnel: Record<string, unknown>) =>
    minimalAgentConfig(cfgDir, {
      tunnels: [
        {
          host: "127.0.0.1",
          port: sshd0.port,
          username: sshd0.user,
          hostKeyFingerprint: sshd0.hostKeyFingerprint,
          remoteSocket: socketIn(sshd0),
          privateKey: secretFile(cfgDir, "id_ed25519", privateKey),
          ...tunnel,
        },
      ],
    });
  const problems = (tunnel: Record<string, unknown>): string[] => {
    try {
      parseAgentConfig(raw(tunnel), file, {});
      return [];
    } catch (err) {
      assert.ok(err instanceof ConfigError);
      assert.deepEqual(findLeaks(err.message, { passphrase, "wrong passphrase": "not-the-passphrase" }), []);
      return err.problems;
    }
  };
  const ok = parseAgentConfig(raw({ privateKeyPassphrase: secretFile(cfgDir, "passphrase", passphrase) }), file, {});
  assert.equal(ok.tunnels[0].passphrase, passphrase);
  assert.deepEqual(problems({}), [
    'tunnels[0].privateKeyPassphrase: the private key is passphrase-protected: give "privateKeyPassphrase" (a secret reference)',
  ]);
  assert.deepEqual(problems({ privateKeyPassphrase: { env: "XKS_TEST_PASSPHRASE_UNSET" } }), [
    "tunnels[0].privateKeyPassphrase: environment variable XKS_TEST_PASSPHRASE_UNSET is not set",
  ]);
  assert.deepEqual(problems({ privateKeyPassphrase: secretFile(cfgDir, "wrong", "not-the-passphrase") }), [
    "tunnels[0].privateKeyPassphrase: cannot decrypt the private key with this passphrase (wrong passphrase?)",
  ]);
  assert.deepEqual(problems({ privateKey: secretFile(cfgDir, "id.pub", readFileSync(`${sshd0.clientKeyPath}.pub`, "utf8")) }), [
    "tunnels[0].privateKey: is a public key, not a private key: give the private key file (e.g. id_ed25519, not id_ed25519.pub)",
  ]);
});

test("kill -9 of the sshd session: down, back up by itself, traffic flows again", async (t) => {
  const { sshd, lines, tunnel, history } = await tunnelRig(t, (sshd) => ({
    remoteSocket: socketIn(sshd),
    backoff: { initialMs: 250, maxMs: 5000 },
  }));
  const remoteSocket = socketIn(sshd);
  tunnel.start();
  await waitForState(tunnel, (s) => s.state === "up", "up");
  const old = await FarClient.connect({ path: remoteSocket });
  t.after(() => old.close());
  assert.equal(await old.ask("before"), "echo:before");

  const t0 = performance.now();
  let killed = 0;
  for (const pid of sshd.sessionPids()) {
    try {
      process.kill(pid, "SIGKILL");
      killed++;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "ESRCH") throw err; // a process that was exiting anyway
    }
  }
  assert.ok(killed >= 1, "killed the sshd session process");

  await waitForState(tunnel, (s) => s.state === "down", "down");
  const down = performance.now() - t0;
  const up = await waitForState(tunnel, (s) => s.state === "up" && s.connects === 2, "up again");
  const back = performance.now() - t0;
  t.diagnostic(`down after ${down.toFixed(0)} ms, up again after ${back.toFixed(0)} ms`);
  assert.equal(up.nodelayExec, true);
  await assert.rejects(old.next(), "the old far-side connection was cut");

  const again = await FarClient.connect({ path: remoteSocket });
  t.after(() => again.close());
  assert.equal(await again.ask("after"), "echo:after");
  assert.deepEqual(
    history.map((s) => s.state),
    ["connecting", "up", "down", "connecting", "up"],
  );
  assert.ok(
    lines.some((l) => l.includes('"tunnel down"')),
    "a 'down' log line",
  );
});

test("sshd stopped and restarted: the tunnel comes back by itself", async (t) => {
  const { sshd, tunnel, history } = await tunnelRig(t, (sshd) => ({ remoteSocket: socketIn(sshd) }));
  const remoteSocket = socketIn(sshd);
  tunnel.start();
  await waitForState(tunnel, (s) => s.state === "up", "up");

  const restarting = sshd.restart(1000); // a full outage of ~1 s
  await waitForState(tunnel, (s) => s.state === "down", "down");
  await restarting;
  const t0 = performance.now();
  await waitForState(tunnel, (s) => s.state === "up" && s.connects === 2, "up after the restart");
  t.diagnostic(`up ${(performance.now() - t0).toFixed(0)} ms after sshd accepted connections again`);
  // While sshd was down, reconnect attempts were refused and reported.
  assert.ok(
    history.some((s) => s.state === "down" && /ECONNREFUSED/.test(s.lastError ?? "")),
    JSON.stringify(history),
  );

  const far = await FarClient.connect({ path: remoteSocket });
  t.after(() => far.close());
  assert.equal(await far.ask("after restart"), "echo:after restart");

  // stop(): unforward, close, no reconnect afterwards.
  await tunnel.stop();
  assert.equal(tunnel.state().state, "stopped");
  const stoppedAt = history.length;
  await sleep(300);
  assert.equal(history.length, stoppedAt, "no state change after stop");
  await until(() => sshd.sessionPids().length === 0, "the sshd session to end");
});

test("TunnelSet runs one tunnel per target and reports each state", async (t) => {
  const [a, b] = await Promise.all([startSshd(), startSshd()]);
  const echo = await startEchoServer();
  const { log } = captureLog();
  const set = new TunnelSet(
    [
      targetFor(a, { name: "ec2-a", remoteSocket: join(a.dir, "xks.sock") }),
      targetFor(b, { name: "ec2-b", remoteSocket: join(b.dir, "xks.sock") }),
    ],
    echo.path,
    log,
  );
  t.after(async () => {
    await set.stop();
    await echo.close();
    await Promise.all([a.stop(), b.stop()]);
  });
  set.start();
  await Promise.all(set.list().map((tun) => waitForState(tun, (s) => s.state === "up", "up")));
  assert.deepEqual(
    set.states().map((s) => [s.name, s.state]),
    [
      ["ec2-a", "up"],
      ["ec2-b", "up"],
    ],
  );
  for (const sshd of [a, b]) {
    const far = await FarClient.connect({ path: join(sshd.dir, "xks.sock") });
    assert.equal(await far.ask(sshd.dir), `echo:${sshd.dir}`);
    far.close();
  }
  await set.stop();
  assert.deepEqual(
    set.states().map((s) => s.state),
    ["stopped", "stopped"],
  );
});

test("a target without a valid pinned fingerprint or with two remotes is rejected up front", () => {
  const { log } = captureLog();
  const base: TunnelTarget = {
    name: "x",
    host: "127.0.0.1",
    port: 22,
    username: "u",
    privateKey: "",
    hostKeyFingerprint: `SHA256:${"A".repeat(43)}`,
    remoteSocket: "/tmp/x.sock",
  };
  assert.doesNotThrow(() => new Tunnel(base, "/tmp/agent.sock", log));
  assert.throws(() => new Tunnel({ ...base, hostKeyFingerprint: "" }, "/tmp/agent.sock", log), /hostKeyFingerprint/);
  assert.throws(() => new Tunnel({ ...base, hostKeyFingerprint: "MD5:aa:bb" }, "/tmp/agent.sock", log), /hostKeyFingerprint/);
  assert.throws(() => new Tunnel({ ...base, remoteTcp: { host: "127.0.0.1", port: 7000 } }, "/tmp/agent.sock", log), /exactly one/);
  assert.throws(() => new Tunnel({ ...base, remoteSocket: undefined }, "/tmp/agent.sock", log), /exactly one/);
});

test(`past ${MAX_FORWARDED_CHANNELS} open forwarded channels, new ones are refused and the burst is logged once`, async (t) => {
  const { sshd, echo, lines, tunnel } = await tunnelRig(t, (sshd) => ({ remoteSocket: socketIn(sshd) }));
  tunnel.start();
  await waitForState(tunnel, (s) => s.state === "up", "up");
  const open: FarClient[] = [];
  t.after(() => {
    for (const c of open) c.close();
  });
  for (let i = 0; i < MAX_FORWARDED_CHANNELS; i++) {
    const far = await FarClient.connect({ path: socketIn(sshd) });
    open.push(far);
    assert.equal(await far.ask(`c${i}`), `echo:c${i}`);
  }
  assert.equal(echo.open(), MAX_FORWARDED_CHANNELS);

  // Past the cap: sshd accepts each connection, the agent refuses its channel, sshd closes it.
  const refused = nextEvent<number>(tunnel, "refused", (n) => n === 5, "five refused channels");
  for (let i = 0; i < 5; i++) {
    const far = await FarClient.connect({ path: socketIn(sshd) });
    await assert.rejects(far.ask("over the cap"), "closed without an answer");
    far.close();
  }
  await refused;
  assert.equal(echo.open(), MAX_FORWARDED_CHANNELS, "no local socket for a refused channel");
  assert.equal(echo.connections(), MAX_FORWARDED_CHANNELS);
  assert.equal(lines.filter((l) => l.includes("forwarded-channel cap reached")).length, 1, "one line for the burst");
  assert.equal(tunnel.state().state, "up");

  // One closes: the next channel is accepted, and the burst's count is logged.
  open.shift()!.close();
  await until(() => echo.open() < MAX_FORWARDED_CHANNELS, "the closed channel's local socket to close");
  const again = await FarClient.connect({ path: socketIn(sshd) });
  open.push(again);
  assert.equal(await again.ask("back"), "echo:back");
  const resumed = lines.find((l) => l.includes("accepting forwarded channels again"));
  assert.ok(resumed, "the end of the burst is logged");
  assert.equal(JSON.parse(resumed).refused, 5);
});

test("a socket path taken over by another session is taken back once nothing arrives through the forward", async (t) => {
  const { sshd, echo, lines, tunnel } = await tunnelRig(t, (sshd) => ({ remoteSocket: socketIn(sshd), reassertAfterMs: 1000 }));
  tunnel.start();
  await waitForState(tunnel, (s) => s.state === "up", "up");
  const path = socketIn(sshd);
  /** Which side a fresh connection to the remote path reaches. */
  const reach = async (): Promise<"agent" | "rogue"> => {
    const [agentBefore, rogueBefore] = [echo.connections(), rogue.capture().connections];
    const sock = net.connect({ path });
    sock.on("error", () => {});
    sock.write("1:who\n");
    try {
      let side: "agent" | "rogue" | undefined;
      await until(() => {
        if (echo.connections() > agentBefore) side = "agent";
        else if (rogue.capture().connections > rogueBefore) side = "rogue";
        return side !== undefined;
      }, "the connection to land on one side");
      return side!;
    } finally {
      sock.destroy();
    }
  };
  // Another holder of an authorised key binds the same path (sshd unlinks ours first). A re-assert of
  // the tunnel's own may land in between; then the rogue binds again until a connection reaches it.
  let rogue = await rogueForward(sshd, path);
  t.after(() => rogue.stop());
  while ((await reach()) === "agent") {
    await rogue.stop();
    rogue = await rogueForward(sshd, path);
  }
  const before = tunnel.state().reasserts;
  await waitForState(tunnel, (s) => s.reasserts > before && s.state === "up", "re-asserted and up again");
  assert.equal(await reach(), "agent", "the path is the agent's again");
  assert.ok(
    lines.some((l) => l.includes("re-asserting the forward")),
    "the log says why",
  );
  assert.match(tunnel.state().lastError ?? "", /another session took .*re-asserting the forward/);
});
