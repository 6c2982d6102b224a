/**
 * The agent's reverse tunnel: an ssh2 client that dials OpenSSH sshd on the proxy host, asks it
 * for a remote forward (a Unix socket by default, loopback TCP as an option) and pipes every
 * forwarded connection into the agent's local socket. It moves bytes only and knows nothing of
 * gRPC.
 *
 * What must hold:
 * - The host key is pinned: anything but the configured `SHA256:` fingerprint is refused.
 * - Nagle is off at BOTH ends. `setNoDelay(true)` covers our socket; sshd only sets TCP_NODELAY on a
 *   connection once a session channel executes something, so we run one `exec` per connection
 *   (the key's forced command, e.g. /usr/sbin/nologin, exiting 1 is fine). Without it every
 *   request written in two pieces stalls ~40 ms on sshd's side.
 * - The forward request is retried every ~500 ms while the connection is up: a half-dead old
 *   session can hold the TCP port, and the socket path needs sshd `StreamLocalBindUnlink yes`.
 * - Any close or error → state `down`, reconnect with jittered exponential backoff, reset by a
 *   successful handshake. A refusal that retrying cannot fix (the server refused our key, or its
 *   host key is not the pinned one) backs off to minutes instead (30 s doubling to 10 min), so
 *   that the owner's address does not look like a password guesser to fail2ban and the like.
 * - The forward is re-asserted when nothing has arrived through it for `reassertAfterMs`: the
 *   proxy's health checks and HTTP/2 keepalive pings cross it every few seconds, so silence means
 *   the proxy is down or another session (a second holder of an authorised key, with
 *   `StreamLocalBindUnlink`) has bound the socket path. Cancelling and requesting the forward again
 *   takes the path back; the proxy's next connection reaches this agent again (and its channel's
 *   mutual TLS would have refused the other listener anyway).
 */
import { createHash, timingSafeEqual } from "node:crypto";
import { EventEmitter } from "node:events";
import net from "node:net";
import type { Logger } from "pino";
import ssh2 from "ssh2";
import type { Channel, ClientChannel } from "ssh2";

export interface TunnelTarget {
  /** Short name for logs and state, e.g. "ec2-a". */
  name: string;
  host: string;
  port: number;
  username: string;
  /** OpenSSH private key text. Never logged. */
  privateKey: Buffer | string;
  /** The private key's passphrase, when it is passphrase-protected. Never logged. */
  passphrase?: string;
  /** Pinned host key, `SHA256:<base64 without padding>` as `ssh-keygen -lf` prints it. Required. */
  hostKeyFingerprint: string;
  /** A second accepted host key while the host's key is being replaced (either one is accepted). */
  nextHostKeyFingerprint?: string;
  /** Remote Unix socket path (OpenSSH streamlocal forward). Set exactly one of remoteSocket / remoteTcp. */
  remoteSocket?: string;
  /** Remote loopback TCP forward. The host string must match sshd's `permitlisten` exactly. */
  remoteTcp?: { host: string; port: number };
  /** ssh2 keepalive interval, default 5000 ms. */
  keepaliveIntervalMs?: number;
  /** Unanswered keepalives before the connection is dropped, default 3. */
  keepaliveCountMax?: number;
  /** Handshake + auth timeout, default 10000 ms. */
  readyTimeoutMs?: number;
  /** Reconnect backoff, default 250 ms doubling to 2000 ms, ±20 % jitter (a refused dial is cheap; KMS wants the path back fast). */
  backoff?: { initialMs: number; maxMs: number };
  /** Silence through the forward after which it is re-asserted, default 30000 ms (three of the proxy's default health periods). */
  reassertAfterMs?: number;
  /** Backoff after an authentication or host-key refusal, default 30 s doubling to 10 min, ±20 % jitter. */
  refusalBackoff?: { initialMs: number; maxMs: number };
}

/** Why the last connection failed: the network (fast reconnect), or a refusal that needs the owner (slow). */
export type TunnelFailure = "network" | "auth" | "hostkey";

export const NETWORK_BACKOFF = { initialMs: 250, maxMs: 2000 } as const;
export const REFUSAL_BACKOFF = { initialMs: 30_000, maxMs: 600_000 } as const;

export type TunnelStateName = "connecting" | "up" | "down" | "stopped";

export interface TunnelState {
  name: string;
  state: TunnelStateName;
  /** ISO time of the last state change. */
  since: string;
  /** The most recent connection or forward error; kept after recovery. */
  lastError?: string;
  /** Successful handshakes so far. */
  connects: number;
  /** Whether the current connection ran its exec, so sshd has TCP_NODELAY on. */
  nodelayExec: boolean;
  /** Times the forward was re-asserted after silence (possible takeover of the remote socket). */
  reasserts: number;
  /** While down: what kind of failure it was. */
  failure?: TunnelFailure;
  /** While down: the delay chosen before the next attempt, in ms. */
  retryInMs?: number;
  /** While down: ISO time of the next attempt. */
  nextAttemptAt?: string;
}

const FORWARD_RETRY_MS = 500;
/**
 * Forwarded channels open at once per tunnel. Each one costs a local socket
 * (two file handles with the channel); the proxy keeps one gRPC connection per
 * agent, so a handful covers it, reconnects overlapping included. Past the cap
 * sshd is told the channel is refused, and the far side's connection closes.
 */
export const MAX_FORWARDED_CHANNELS = 32;
const STOP_STEP_TIMEOUT_MS = 2000;
const FINGERPRINT_RE = /^SHA256:[A-Za-z0-9+/]{43}$/;

/** `SHA256:<base64, no padding>` of a raw SSH public key blob, as `ssh-keygen -lf` prints it. */
export function fingerprintOf(hostKey: Buffer): string {
  return `SHA256:${createHash("sha256").update(hostKey).digest("base64").replace(/=+$/, "")}`;
}

/** Constant-time string equality (hashing first makes the lengths equal). */
export function sameFingerprint(a: string, b: string): boolean {
  const h = (s: string) => createHash("sha256").update(s).digest();
  return timingSafeEqual(h(a), h(b));
}

/** Whether `seen` is one of the tunnel's pinned host keys. */
export function pinnedHostKey(t: Pick<TunnelTarget, "hostKeyFingerprint" | "nextHostKeyFingerprint">, seen: string): boolean {
  // Both compared, always: the time taken does not say which pin matched.
  const current = sameFingerprint(seen, t.hostKeyFingerprint);
  const next = t.nextHostKeyFingerprint !== undefined && sameFingerprint(seen, t.nextHostKeyFingerprint);
  return current || next;
}

/** The pins, for messages: "A" or "A or B". */
export function pinsText(t: Pick<TunnelTarget, "hostKeyFingerprint" | "nextHostKeyFingerprint">): string {
  return t.nextHostKeyFingerprint === undefined ? t.hostKeyFingerprint : `${t.hostKeyFingerprint} or ${t.nextHostKeyFingerprint}`;
}

function describe(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

/** Where and as whom a tunnel logs in (the tunnel and `xks-agent check` dial alike). */
export function sshLogin(t: TunnelTarget): Pick<ssh2.ConnectConfig, "host" | "port" | "username" | "privateKey" | "passphrase"> {
  return {
    host: t.host,
    port: t.port,
    username: t.username,
    privateKey: t.privateKey,
    ...(t.passphrase !== undefined ? { passphrase: t.passphrase } : {}),
  };
}

/** ssh2 marks the failure of every authentication method with level "client-authentication". */
export function isAuthFailure(err: unknown): boolean {
  return (err as { level?: unknown } | undefined)?.level === "client-authentication";
}

/**
 * One reverse tunnel to one sshd, reconnecting until `stop()`. Emits `"state"` with a
 * {@link TunnelState}, and `"refused"` with the burst's count when a forwarded channel is refused.
 */
export class Tunnel extends EventEmitter {
  private readonly target: TunnelTarget;
  private readonly localSocketPath: string;
  private readonly log: Logger;
  private readonly remote: string;
  private current: TunnelState;
  private conn: ssh2.Client | undefined;
  private forwarded = false;
  private stopped = true;
  private stopping: Promise<void> | undefined;
  private attempt = 0;
  /** Refusals in a row (authentication or host key), for the slow backoff. */
  private refusals = 0;
  private reconnectTimer: NodeJS.Timeout | undefined;
  private forwardTimer: NodeJS.Timeout | undefined;
  private quietTimer: NodeJS.Timeout | undefined;
  /** When something last arrived through the forward (or the forward was (re)established). */
  private lastInboundAt = 0;
  /** Consecutive re-asserts with nothing arriving in between (the first is logged as a warning). */
  private silentRun = 0;
  private readonly pipes = new Set<net.Socket>();
  /** Channels refused since the cap was last reached (logged once per burst). */
  private refusedInBurst = 0;

  constructor(target: TunnelTarget, localSocketPath: string, log: Logger) {
    super();
    if (!FINGERPRINT_RE.test(target.hostKeyFingerprint)) {
      throw new Error(`tunnel ${target.name}: hostKeyFingerprint must look like "SHA256:<43 base64 chars>" (ssh-keygen -lf)`);
    }
    if (target.nextHostKeyFingerprint !== undefined && !FINGERPRINT_RE.test(target.nextHostKeyFingerprint)) {
      throw new Error(`tunnel ${target.name}: nextHostKeyFingerprint must look like "SHA256:<43 base64 chars>" (ssh-keygen -lf)`);
    }
    if ((target.remoteSocket === undefined) === (target.remoteTcp === undefined)) {
      throw new Error(`tunnel ${target.name}: set exactly one of remoteSocket or remoteTcp`);
    }
    this.target = target;
    this.localSocketPath = localSocketPath;
    this.remote = target.remoteSocket ?? `${target.remoteTcp!.host}:${target.remoteTcp!.port}`;
    this.log = log.child({ tunnel: target.name });
    this.current = {
      name: target.name,
      state: "stopped",
      since: new Date().toISOString(),
      connects: 0,
      nodelayExec: false,
      reasserts: 0,
    };
  }

  state(): TunnelState {
    return { ...this.current };
  }

  start(): void {
    if (!this.stopped) return;
    this.stopped = false;
    this.stopping = undefined;
    this.attempt = 0;
    this.refusals = 0;
    this.connect();
  }

  /** Cancels the forward, ends the connection and stops reconnecting; resolves once the connection is closed. */
  stop(): Promise<void> {
    if (!this.stopped) {
      this.stopped = true;
      this.stopping = this.shutdown();
    }
    return this.stopping ?? Promise.resolve();
  }

  private async shutdown(): Promise<void> {
    clearTimeout(this.reconnectTimer);
    clearTimeout(this.forwardTimer);
    clearInterval(this.quietTimer);
    const conn = this.conn;
    this.conn = undefined;
    if (conn) {
      const closed = new Promise<void>((resolve) => conn.once("close", () => resolve()));
      if (this.forwarded) await withTimeout(new Promise<void>((resolve) => this.unforward(conn, () => resolve())));
      this.forwarded = false;
      conn.end();
      if (!(await withTimeout(closed))) {
        conn.destroy();
        await withTimeout(closed);
      }
    }
    for (const sock of this.pipes) sock.destroy();
    this.pipes.clear();
    this.setState("stopped");
    this.log.info("tunnel stopped");
  }

  private setState(state: TunnelStateName, lastError?: string, retry?: { failure: TunnelFailure; retryInMs: number }): void {
    const { failure: _f, retryInMs: _r, nextAttemptAt: _n, ...rest } = this.current;
    const now = Date.now();
    this.current = {
      ...rest,
      state,
      since: new Date(now).toISOString(),
      ...(lastError !== undefined ? { lastError } : {}),
      ...(retry ? { ...retry, nextAttemptAt: new Date(now + retry.retryInMs).toISOString() } : {}),
    };
    this.emit("state", this.state());
  }

  private connect(): void {
    const t = this.target;
    const conn = new ssh2.Client();
    this.conn = conn;
    this.forwarded = false;
    this.current.nodelayExec = false;
    this.setState("connecting");
    this.log.info({ host: t.host, port: t.port, user: t.username, remote: this.remote, attempt: this.attempt }, "tunnel connecting");

    // A host-key refusal surfaces from ssh2 as "Host denied (verification failed)"; keep our clearer message.
    let refusal: string | undefined;
    let failure: string | undefined;
    let kind: TunnelFailure = "network";

    conn.on("ready", () => {
      if (this.conn !== conn) return;
      this.attempt = 0;
      this.refusals = 0;
      this.current.connects++;
      conn.setNoDelay(true);
      this.log.info({ connects: this.current.connects }, "tunnel ssh connection ready");
      this.turnOnRemoteNodelay(conn);
    });
    conn.on("unix connection", (_info, accept, reject) => this.onForwarded(conn, accept, reject));
    conn.on("tcp connection", (_info, accept, reject) => this.onForwarded(conn, accept, reject));
    conn.on("error", (err) => {
      if (refusal !== undefined) kind = "hostkey";
      else if (isAuthFailure(err)) kind = "auth";
      failure =
        refusal ??
        (kind === "auth" ? `authentication refused by ${t.host}:${t.port} for user ${t.username} (${describe(err)})` : describe(err));
    });
    conn.on("close", () => {
      if (this.conn !== conn) return; // stop() or a superseded connection
      this.conn = undefined;
      this.forwarded = false;
      clearTimeout(this.forwardTimer);
      clearInterval(this.quietTimer);
      const msg = failure ?? "connection closed";
      this.scheduleReconnect(msg, kind);
    });

    try {
      conn.connect({
        ...sshLogin(t),
        hostVerifier: (key: Buffer): boolean => {
          const seen = fingerprintOf(key);
          if (pinnedHostKey(t, seen)) return true;
          refusal = `host key verification failed: expected ${pinsText(t)}, seen ${seen}`;
          this.log.error(
            { host: t.host, port: t.port, expected: pinsText(t), seen },
            "tunnel refused: host key does not match the pinned fingerprint",
          );
          this.log.flush(); // state changes reach the log at once (lines are otherwise batched)
          return false;
        },
        keepaliveInterval: t.keepaliveIntervalMs ?? 5000,
        keepaliveCountMax: t.keepaliveCountMax ?? 3,
        readyTimeout: t.readyTimeoutMs ?? 10_000,
      });
    } catch (err) {
      // Synchronous config errors (e.g. an unparsable private key): no "close" will follow.
      this.conn = undefined;
      this.scheduleReconnect(describe(err), "auth");
    }
  }

  /**
   * sshd turns TCP_NODELAY on only when a session runs something; one exec does it for the whole
   * connection. Its output and exit status (nologin exits 1) don't matter. The forward is
   * requested afterwards either way.
   */
  private turnOnRemoteNodelay(conn: ssh2.Client): void {
    conn.exec("true", (err, stream) => {
      if (this.conn !== conn) return;
      if (err) {
        this.log.warn({ err: err.message }, "tunnel exec for sshd TCP_NODELAY failed; small requests may stall ~40 ms");
      } else {
        this.current.nodelayExec = true;
        this.log.info("tunnel exec done: sshd has TCP_NODELAY on this connection");
        this.log.flush(); // state changes reach the log at once (lines are otherwise batched)
        stream.on("error", () => {}).resume();
        stream.stderr.resume();
      }
      this.requestForward(conn, 0);
    });
  }

  private requestForward(conn: ssh2.Client, failures: number): void {
    const done = (err: Error | null | undefined) => {
      if (this.conn !== conn) return;
      if (err) {
        this.current.lastError = `remote forward ${this.remote} failed: ${err.message}`;
        // Report the first failure; the retries of a stuck bind would flood the log and the listeners.
        if (failures === 0) {
          this.log.warn({ remote: this.remote, err: err.message }, "tunnel remote forward failed; retrying");
          this.emit("state", this.state());
        } else {
          this.log.debug({ remote: this.remote, err: err.message, failures: failures + 1 }, "tunnel remote forward still failing");
        }
        this.forwardTimer = setTimeout(() => this.requestForward(conn, failures + 1), FORWARD_RETRY_MS);
        return;
      }
      this.forwarded = true;
      this.lastInboundAt = Date.now();
      this.setState("up");
      this.log.info({ remote: this.remote, nodelayExec: this.current.nodelayExec, retries: failures }, "tunnel up");
      this.log.flush(); // state changes reach the log at once (lines are otherwise batched)
      this.watchForSilence(conn);
    };
    const t = this.target;
    if (t.remoteSocket !== undefined) conn.openssh_forwardInStreamLocal(t.remoteSocket, (err) => done(err));
    else conn.forwardIn(t.remoteTcp!.host, t.remoteTcp!.port, (err) => done(err));
  }

  /** Re-asserts the forward whenever nothing has arrived through it for `reassertAfterMs`. */
  private watchForSilence(conn: ssh2.Client): void {
    const quietMs = this.target.reassertAfterMs ?? 30_000;
    clearInterval(this.quietTimer);
    this.quietTimer = setInterval(
      () => {
        if (this.conn !== conn || !this.forwarded) return;
        const silentMs = Date.now() - this.lastInboundAt;
        if (silentMs < quietMs) return;
        this.current.reasserts++;
        const why = `nothing arrived through the forward for ${Math.round(silentMs / 1000)} s: the proxy is down, or another session took ${this.remote}; re-asserting the forward`;
        this.current.lastError = why;
        // The first of a run of silent periods is a warning; while it stays silent (proxy down), a debug line.
        this.silentRun++;
        if (this.silentRun === 1) this.log.warn({ remote: this.remote, reasserts: this.current.reasserts }, why);
        else this.log.debug({ remote: this.remote, reasserts: this.current.reasserts }, why);
        this.log.flush();
        this.setState("connecting", why); // "up" again once sshd has bound the forward anew
        this.lastInboundAt = Date.now();
        this.forwarded = false;
        clearInterval(this.quietTimer);
        this.unforward(conn, () => {
          if (this.conn === conn) this.requestForward(conn, 0);
        });
      },
      Math.max(100, Math.floor(quietMs / 4)),
    );
    this.quietTimer.unref();
  }

  private unforward(conn: ssh2.Client, cb: () => void): void {
    const t = this.target;
    const done = (err: Error | null | undefined) => {
      if (err) this.log.warn({ remote: this.remote, err: err.message }, "tunnel unforward failed");
      cb();
    };
    try {
      if (t.remoteSocket !== undefined) conn.openssh_unforwardInStreamLocal(t.remoteSocket, done);
      else conn.unforwardIn(t.remoteTcp!.host, t.remoteTcp!.port, done);
    } catch (err) {
      // ssh2 throws "Not connected" when the connection died before its close event was handled.
      done(err as Error);
    }
  }

  /**
   * Pipes one forwarded channel into a fresh connection to the local socket, both ways; past
   * MAX_FORWARDED_CHANNELS open ones, refuses it. A burst of refusals is logged twice: when the
   * cap is reached, and with the count when a channel is accepted again.
   */
  private onForwarded(conn: ssh2.Client, accept: () => ClientChannel | Channel, reject: () => void): void {
    if (this.conn !== conn) {
      reject();
      return;
    }
    if (this.pipes.size >= MAX_FORWARDED_CHANNELS) {
      if (this.refusedInBurst === 0) {
        this.log.warn(
          { open: this.pipes.size, max: MAX_FORWARDED_CHANNELS },
          "tunnel forwarded-channel cap reached; refusing new channels",
        );
        this.log.flush();
      }
      this.refusedInBurst++;
      this.emit("refused", this.refusedInBurst);
      reject();
      return;
    }
    if (this.refusedInBurst > 0) {
      this.log.info({ refused: this.refusedInBurst, max: MAX_FORWARDED_CHANNELS }, "tunnel accepting forwarded channels again");
      this.refusedInBurst = 0;
    }
    const ch = accept();
    this.lastInboundAt = Date.now();
    this.silentRun = 0;
    ch.on("data", () => {
      this.lastInboundAt = Date.now();
    });
    const sock = net.connect(this.localSocketPath);
    this.pipes.add(sock);
    let finished = false;
    const done = (err?: Error) => {
      if (finished) return;
      finished = true;
      this.pipes.delete(sock);
      if (err) this.log.debug({ err: err.message }, "tunnel forwarded connection failed");
      sock.destroy();
      ch.destroy();
    };
    ch.pipe(sock).pipe(ch);
    sock.on("error", done).on("close", () => done());
    ch.on("error", done).on("close", () => done());
  }

  /**
   * Goes `down` and schedules the next attempt: a network failure after the fast backoff, a refusal
   * (authentication, host key, an unusable key) after the slow one, whose step count only a
   * successful handshake resets.
   */
  private scheduleReconnect(reason: string, failure: TunnelFailure): void {
    const refused = failure !== "network";
    const { initialMs, maxMs } = refused ? (this.target.refusalBackoff ?? REFUSAL_BACKOFF) : (this.target.backoff ?? NETWORK_BACKOFF);
    const step = refused ? this.refusals++ : this.attempt;
    const base = Math.min(maxMs, initialMs * 2 ** step);
    const delay = Math.round(Math.min(maxMs, base * (0.8 + 0.4 * Math.random())));
    this.attempt++;
    this.setState("down", reason, this.stopped ? undefined : { failure, retryInMs: delay });
    if (this.stopped) return;
    const log = refused ? this.log.error.bind(this.log) : this.log.warn.bind(this.log);
    log(
      { err: reason, failure, retryInMs: delay, nextAttemptAt: this.current.nextAttemptAt, attempt: this.attempt },
      refused ? "tunnel refused; waiting before the next attempt" : "tunnel down",
    );
    this.log.flush(); // state changes reach the log at once (lines are otherwise batched)
    clearTimeout(this.reconnectTimer);
    this.reconnectTimer = setTimeout(() => {
      if (!this.stopped) this.connect();
    }, delay);
  }
}

/** Resolves true if `p` settles within the stop step timeout, false otherwise. */
async function withTimeout(p: Promise<void>): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  const timedOut = new Promise<boolean>((resolve) => {
    timer = setTimeout(() => resolve(false), STOP_STEP_TIMEOUT_MS);
  });
  try {
    return await Promise.race([p.then(() => true), timedOut]);
  } finally {
    clearTimeout(timer);
  }
}

/** One tunnel per proxy host, all into the same local socket. */
export class TunnelSet {
  private readonly tunnels: Tunnel[];

  constructor(targets: TunnelTarget[], localSocketPath: string, log: Logger) {
    this.tunnels = targets.map((t) => new Tunnel(t, localSocketPath, log));
  }

  /** The individual tunnels, e.g. to subscribe to their "state" events. */
  list(): readonly Tunnel[] {
    return this.tunnels;
  }

  start(): void {
    for (const t of this.tunnels) t.start();
  }

  async stop(): Promise<void> {
    await Promise.all(this.tunnels.map((t) => t.stop()));
  }

  states(): TunnelState[] {
    return this.tunnels.map((t) => t.state());
  }
}
