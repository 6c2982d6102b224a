/**
 * Test helper: a REAL OpenSSH sshd (`/usr/sbin/sshd -D -e -f <generated config>`) on a free
 * loopback port, configured like the EC2 tunnel end (field-notes.md §5): public-key only,
 * remote forwards only, forced command `/usr/sbin/nologin`, `StreamLocalBindUnlink yes`,
 * short ClientAlive timers.
 *
 * Everything lives in a fresh temp dir (keys in a 0700 subdir); `stop()` kills the listener
 * and every session process under it, then removes the dir. sshd must run as root here
 * (it needs `/run/sshd` and privilege separation), which is how CI runs.
 */
import { spawn, execFileSync, type ChildProcess } from "node:child_process";
import { mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import net from "node:net";
import { tmpdir, userInfo } from "node:os";
import { join } from "node:path";

export const SSHD_BIN = "/usr/sbin/sshd";

export interface Sshd {
  /** Loopback TCP port sshd listens on (127.0.0.1). */
  port: number;
  /** The temp dir holding config, keys, pid file; a good parent for remote socket paths. */
  dir: string;
  /** Login name to use (the current user; sshd runs as that user, normally root). */
  user: string;
  /** `SHA256:…` of the host key, exactly as `ssh-keygen -lf` prints it. */
  hostKeyFingerprint: string;
  /** OpenSSH private key text of the authorized client key. */
  clientPrivateKey: string;
  clientKeyPath: string;
  /** Everything sshd wrote to stdout/stderr so far (across restarts). */
  logs(): string;
  /** PIDs of the sshd processes below the listener (one or more per connection), for kill tests. */
  sessionPids(): number[];
  /** Kills sessions and listener, removes the temp dir. Idempotent. */
  stop(): Promise<void>;
  /** Kills sessions and listener (a full sshd outage), waits `downMs`, starts again on the same port with the same keys. */
  restart(downMs?: number): Promise<void>;
}

export interface StartSshdOptions {
  /** Folder for config, keys and pid file (default: a new temp dir). Removed by stop(). */
  dir?: string;
  /** Extra sshd_config lines, appended last. */
  extraConfig?: string;
  /** Adds `permitlisten="<value>"` to the authorized_keys options (e.g. "127.0.0.1:7000"). */
  permitListen?: string;
  /** How long to wait for sshd to accept TCP (default 10 s). */
  startTimeoutMs?: number;
}

/** Asks the kernel for a free loopback TCP port (listen on 0, read it back, close). */
export async function freePort(): Promise<number> {
  const srv = net.createServer();
  await new Promise<void>((resolve, reject) => {
    srv.once("error", reject);
    srv.listen(0, "127.0.0.1", () => resolve());
  });
  const addr = srv.address();
  await new Promise<void>((resolve) => srv.close(() => resolve()));
  if (addr === null || typeof addr === "string") throw new Error("could not read the free port");
  return addr.port;
}

function keygen(path: string, comment: string): void {
  execFileSync("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path], { stdio: ["ignore", "ignore", "pipe"] });
}

/** Field 2 of `ssh-keygen -lf <pub>`: "256 SHA256:xxxx comment (ED25519)". */
function fingerprintFile(pubPath: string): string {
  const out = execFileSync("ssh-keygen", ["-lf", pubPath], { encoding: "utf8" });
  const fp = out.trim().split(/\s+/)[1];
  if (!fp || !fp.startsWith("SHA256:")) throw new Error(`unexpected ssh-keygen -lf output: ${out}`);
  return fp;
}

/** Direct children of `pid`, from /proc/<n>/stat (field 4 is the parent pid). */
function childrenOf(pid: number): number[] {
  const kids: number[] = [];
  for (const name of readdirSync("/proc")) {
    if (!/^\d+$/.test(name)) continue;
    let stat: string;
    try {
      stat = readFileSync(`/proc/${name}/stat`, "utf8");
    } catch {
      continue; // exited while we looked
    }
    // "pid (comm) state ppid ...": comm may contain spaces, so parse after the last ')'.
    const ppid = Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]);
    if (ppid === pid) kids.push(Number(name));
  }
  return kids;
}

function descendantsOf(pid: number): number[] {
  const out: number[] = [];
  const queue = [pid];
  while (queue.length > 0) {
    for (const kid of childrenOf(queue.shift()!)) {
      out.push(kid);
      queue.push(kid);
    }
  }
  return out;
}

/** True for sshd's own processes (not e.g. the forced command a session exec'd). */
function isSshdProcess(pid: number): boolean {
  try {
    return readFileSync(`/proc/${pid}/comm`, "utf8").trim() === "sshd";
  } catch {
    return false; // already gone
  }
}

function killQuietly(pid: number, signal: NodeJS.Signals): void {
  try {
    process.kill(pid, signal);
  } catch {
    // already gone
  }
}

async function canConnect(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const sock = net.connect({ host: "127.0.0.1", port });
    sock.once("connect", () => {
      sock.destroy();
      resolve(true);
    });
    sock.once("error", () => resolve(false));
  });
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/** Starts a real sshd; resolves once it accepts TCP connections on 127.0.0.1:port. */
export async function startSshd(opts: StartSshdOptions = {}): Promise<Sshd> {
  // sshd refuses to start without its privilege-separation directory.
  // Linux sshd refuses to start without its privilege-separation directory (macOS uses /var/empty).
  if (process.platform === "linux") {
    try {
      mkdirSync("/run/sshd", { recursive: true, mode: 0o755 });
    } catch (err) {
      throw new Error(`sshd needs /run/sshd; create it once with: sudo mkdir -p -m 0755 /run/sshd (${(err as Error).message})`);
    }
  }

  const dir = opts.dir ?? mkdtempSync(join(tmpdir(), "xks-sshd-"));
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const keys = join(dir, "keys");
  mkdirSync(keys, { mode: 0o700 });
  const hostKey = join(keys, "host_ed25519");
  const clientKeyPath = join(keys, "client_ed25519");
  const authorizedKeys = join(keys, "authorized_keys");
  const configPath = join(dir, "sshd_config");
  const port = await freePort();
  const user = userInfo().username;

  let child: ChildProcess | undefined;
  let output = "";
  let removed = false;

  try {
    keygen(hostKey, "xks-test-host");
    keygen(clientKeyPath, "xks-test-agent");
    const hostKeyFingerprint = fingerprintFile(`${hostKey}.pub`);
    const clientPub = readFileSync(`${clientKeyPath}.pub`, "utf8").trim();
    const keyOptions = ["restrict", "port-forwarding"];
    if (opts.permitListen) keyOptions.push(`permitlisten="${opts.permitListen}"`);
    keyOptions.push(`command="/usr/sbin/nologin"`);
    writeFileSync(authorizedKeys, `${keyOptions.join(",")} ${clientPub}\n`, { mode: 0o600 });

    writeFileSync(
      configPath,
      [
        `ListenAddress 127.0.0.1:${port}`,
        `HostKey ${hostKey}`,
        `PidFile ${join(dir, "sshd.pid")}`,
        `AuthorizedKeysFile ${authorizedKeys}`,
        "StrictModes no", // the temp dir sits under /tmp (1777), which StrictModes rejects
        "UsePAM no",
        "PermitRootLogin prohibit-password",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "AuthenticationMethods publickey",
        "PermitTTY no",
        "X11Forwarding no",
        "AllowAgentForwarding no",
        "PermitTunnel no",
        "AllowTcpForwarding remote", // must not be "no": that also kills streamlocal forwards
        "AllowStreamLocalForwarding remote",
        "GatewayPorts no",
        "StreamLocalBindUnlink yes",
        "StreamLocalBindMask 0177",
        "ClientAliveInterval 2",
        "ClientAliveCountMax 3",
        "LogLevel VERBOSE",
        opts.extraConfig ?? "",
        "",
      ].join("\n"),
    );
    const clientPrivateKey = readFileSync(clientKeyPath, "utf8");

    const launch = async (): Promise<void> => {
      const proc = spawn(SSHD_BIN, ["-D", "-e", "-f", configPath], { stdio: ["ignore", "pipe", "pipe"] });
      child = proc;
      proc.stdout!.setEncoding("utf8").on("data", (s: string) => (output += s));
      proc.stderr!.setEncoding("utf8").on("data", (s: string) => (output += s));
      let exited: string | undefined;
      proc.once("exit", (code, signal) => (exited = `code ${code} signal ${signal}`));
      proc.once("error", (err) => (exited = `spawn error: ${err.message}`));
      const deadline = Date.now() + (opts.startTimeoutMs ?? 10_000);
      for (;;) {
        if (exited !== undefined) throw new Error(`sshd exited early (${exited}):\n${output}`);
        if (await canConnect(port)) return;
        if (Date.now() > deadline) throw new Error(`sshd did not accept connections on 127.0.0.1:${port} in time:\n${output}`);
        await sleep(25);
      }
    };

    /** Full outage: every session process first (they outlive the listener), then the listener. */
    const halt = async (): Promise<void> => {
      const proc = child;
      child = undefined;
      if (!proc || proc.pid === undefined) return;
      for (const pid of descendantsOf(proc.pid)) killQuietly(pid, "SIGKILL");
      if (proc.exitCode !== null || proc.signalCode !== null) return;
      const gone = new Promise<void>((resolve) => proc.once("exit", () => resolve()));
      proc.kill("SIGTERM");
      const timer = setTimeout(() => proc.kill("SIGKILL"), 2000);
      await gone;
      clearTimeout(timer);
    };

    await launch();

    return {
      port,
      dir,
      user,
      hostKeyFingerprint,
      clientPrivateKey,
      clientKeyPath,
      logs: () => output,
      sessionPids: () => (child?.pid === undefined ? [] : descendantsOf(child.pid).filter(isSshdProcess)),
      async stop() {
        await halt();
        if (!removed) {
          removed = true;
          rmSync(dir, { recursive: true, force: true });
        }
      },
      async restart(downMs = 0) {
        await halt();
        if (downMs > 0) await sleep(downMs);
        await launch();
      },
    };
  } catch (err) {
    if (child?.pid !== undefined) {
      for (const pid of descendantsOf(child.pid)) killQuietly(pid, "SIGKILL");
      child.kill("SIGKILL");
    }
    rmSync(dir, { recursive: true, force: true });
    throw err;
  }
}
