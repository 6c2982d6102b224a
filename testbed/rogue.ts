/**
 * Impostors on the proxy's side of the tunnel, for the trust tests. Each one
 * answers whatever connects with a TLS server of its own identity (so a
 * client that does not pin identities would go on and send its requests)
 * and records every byte it receives, both as it arrived and after TLS
 * decryption, so a test can prove that nothing secret reached it.
 *   - `rogueForward`: another holder of an authorised tunnel key, which asks
 *     sshd for a remote forward on the agent's socket path (sshd's
 *     `StreamLocalBindUnlink yes` lets it replace the agent's socket);
 *   - `squatTcpPort`: a local user (`nobody` when the tests run as root)
 *     listening on the loopback port the agent's TCP forward uses.
 */
import { spawn } from "node:child_process";
import { Duplex } from "node:stream";
import { TLSSocket } from "node:tls";
import ssh2 from "ssh2";
import { newIdentity, type Identity } from "./identities.ts";
import type { Sshd } from "./sshd.ts";
import { until } from "./wait.ts";

export interface Capture {
  /** Connections accepted so far. */
  connections: number;
  /** Every byte received, as it arrived (TLS records included). */
  raw: Buffer;
  /** Every byte the rogue's TLS server decrypted. */
  cleartext: Buffer;
}

export interface Rogue {
  capture(): Capture;
  stop(): Promise<void>;
}

/** Serves TLS with `identity` over `stream`, recording raw and decrypted bytes into `c`. */
function impersonate(stream: Duplex, identity: Identity, c: { raw: Buffer[]; clear: Buffer[] }): void {
  const tee = new Duplex({
    read() {},
    write(chunk, _enc, cb) {
      stream.write(chunk, cb);
    },
    final(cb) {
      stream.end();
      cb();
    },
  });
  stream.on("data", (d: Buffer) => {
    c.raw.push(d);
    tee.push(d);
  });
  stream.on("end", () => tee.push(null));
  stream.on("error", () => tee.destroy());
  const tls = new TLSSocket(tee, {
    isServer: true,
    key: identity.key,
    cert: identity.certificate,
    requestCert: true,
    rejectUnauthorized: false,
    ALPNProtocols: ["h2"],
  });
  tls.on("data", (d: Buffer) => c.clear.push(d));
  tls.on("error", () => stream.destroy());
}

/** Another authorised key holder takes over `remoteSocket` through sshd; resolves once its forward is bound. */
export async function rogueForward(sshd: Sshd, remoteSocket: string, identity: Identity = newIdentity("rogue")): Promise<Rogue> {
  const privateKey = sshd.authorizeAnotherKey("rogue");
  const conn = new ssh2.Client();
  const rec = { raw: [] as Buffer[], clear: [] as Buffer[] };
  let connections = 0;
  conn.on("unix connection", (_info, accept) => {
    connections++;
    impersonate(accept() as unknown as Duplex, identity, rec);
  });
  await new Promise<void>((resolve, reject) => {
    conn.once("error", reject);
    conn.once("ready", () => conn.openssh_forwardInStreamLocal(remoteSocket, (err) => (err ? reject(err) : resolve())));
    conn.connect({ host: "127.0.0.1", port: sshd.port, username: sshd.user, privateKey, hostVerifier: () => true });
  });
  conn.on("error", () => {});
  const closed = new Promise<void>((resolve) => conn.once("close", () => resolve()));
  return {
    capture: () => ({ connections, raw: Buffer.concat(rec.raw), cleartext: Buffer.concat(rec.clear) }),
    stop: async () => {
      conn.end();
      const timer = setTimeout(() => conn.destroy(), 2000);
      await closed;
      clearTimeout(timer);
    },
  };
}

/**
 * The squatter's program, run with `node -e` as another user: the same
 * impersonation on 127.0.0.1:PORT; prints "listening", then on each
 * connection's data a JSON line with the totals so far (base64).
 */
const SQUATTER = `
const net = require("node:net"), tls = require("node:tls"), { Duplex } = require("node:stream");
const raw = [], clear = []; let connections = 0;
const report = () => process.stdout.write(JSON.stringify({ connections, raw: Buffer.concat(raw).toString("base64"), clear: Buffer.concat(clear).toString("base64") }) + "\\n");
const server = net.createServer((stream) => {
  connections++;
  const tee = new Duplex({ read() {}, write(c, e, cb) { stream.write(c, cb); }, final(cb) { stream.end(); cb(); } });
  stream.on("data", (d) => { raw.push(d); tee.push(d); report(); });
  stream.on("end", () => tee.push(null));
  stream.on("error", () => tee.destroy());
  const s = new tls.TLSSocket(tee, { isServer: true, key: process.env.KEY, cert: process.env.CERT, requestCert: true, rejectUnauthorized: false, ALPNProtocols: ["h2"] });
  s.on("data", (d) => { clear.push(d); report(); });
  s.on("error", () => stream.destroy());
  report();
});
server.listen(Number(process.env.PORT), "127.0.0.1", () => process.stdout.write("listening\\n"));
`;

/** Listens on 127.0.0.1:`port` as an unprivileged local user (uid 65534 when run as root); resolves once it listens. */
export async function squatTcpPort(port: number, identity: Identity = newIdentity("squatter")): Promise<Rogue & { uid: number }> {
  const asRoot = process.getuid?.() === 0;
  const uid = asRoot ? 65534 : (process.getuid?.() ?? 0);
  const child = spawn(process.execPath, ["-e", SQUATTER], {
    env: { PORT: String(port), KEY: identity.key, CERT: identity.certificate },
    stdio: ["ignore", "pipe", "pipe"],
    ...(asRoot ? { uid: 65534, gid: 65534 } : {}),
  });
  let out = "";
  let err = "";
  child.stdout.setEncoding("utf8").on("data", (s: string) => (out += s));
  child.stderr.setEncoding("utf8").on("data", (s: string) => (err += s));
  let exited = false;
  child.once("exit", () => (exited = true));
  await until(() => {
    if (exited) throw new Error(`the squatter exited: ${err}`);
    return out.startsWith("listening");
  }, `a squatter on 127.0.0.1:${port}`);
  return {
    uid,
    capture: () => {
      const last = out
        .trim()
        .split("\n")
        .filter((l) => l.startsWith("{"))
        .pop();
      if (!last) return { connections: 0, raw: Buffer.alloc(0), cleartext: Buffer.alloc(0) };
      const j = JSON.parse(last) as { connections: number; raw: string; clear: string };
      return { connections: j.connections, raw: Buffer.from(j.raw, "base64"), cleartext: Buffer.from(j.clear, "base64") };
    },
    stop: async () => {
      if (exited) return;
      const gone = new Promise<void>((resolve) => child.once("exit", () => resolve()));
      child.kill("SIGKILL");
      await gone;
    },
  };
}
