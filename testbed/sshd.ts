/**
 * A real OpenSSH sshd (`sshd -D -e -f <generated config>`) on a free port,
 * configured like the EC2 end of the agent's tunnel: public-key only, remote
 * forwards only, forced command `/usr/sbin/nologin`, `StreamLocalBindUnlink
 * yes`, short ClientAlive timers.
 *
 * Everything lives in one folder (keys in a 0700 subfolder); `stop()` kills
 * the listener and every session process under it, then removes the folder.
 * On Linux sshd needs root and `/run/sshd` (its privilege-separation folder),
 * which is how CI runs it.
 */
import { execFileSync, spawn, type ChildProcess } from "node:child_process";
import { appendFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir, userInfo } from "node:os";
import { join } from "node:path";
import { descendantsOf, killQuietly } from "./procs.ts";
import { canConnect, freePort } from "./ports.ts";
import { sleep, until } from "./wait.ts";

export const SSHD_BIN = "/usr/sbin/sshd";

export interface Sshd {
  /** The TCP port sshd listens on, on 127.0.0.1 and on every `listenHosts` address. */
  port: number;
  /** The folder holding config, keys, pid file; a good parent for remote socket paths. */
  dir: string;
  /** Login name to use (the current user; sshd runs as that user, normally root). */
  user: string;
  /** `SHA256:…` of the host key, exactly as `ssh-keygen -lf` prints it. */
  hostKeyFingerprint: string;
  /** OpenSSH private key text of the authorized client key. */
  clientPrivateKey: string;
  clientKeyPath: string;
  /**
   * Authorises one more client key for the same user with the same options
   * (another holder of a tunnel key, e.g. a rogue); returns its private key text.
   */
  authorizeAnotherKey(comment: string): string;
  /** Everything sshd wrote to stdout/stderr so far (across restarts). */
  logs(): string;
  /** PIDs of the sshd processes below the listener (one or more per connection; `sshd-session` from OpenSSH 9.8 on), for kill tests. */
  sessionPids(): number[];
  /** Kills sessions and listener, removes the folder. Idempotent. */
  stop(): Promise<void>;
  /** Kills sessions and listener (a full sshd outage), waits `downMs`, starts again on the same port with the same keys. */
  restart(downMs?: number): Promise<void>;
}

export interface StartSshdOptions {
  /** Folder for config, keys and pid file (default: a new temp folder). Removed by stop(). */
  dir?: string;
  /** More addresses to listen on, besides 127.0.0.1 (same port), e.g. the EC2 end of a simulated WAN link. */
  listenHosts?: string[];
  /** Extra sshd_config lines, appended last. */
  extraConfig?: string;
  /** Adds `permitlisten="<value>"` to the authorized_keys options (e.g. "127.0.0.1:7000"). */
  permitListen?: string;
}

function keygen(path: string, comment: string): void {
  execFileSync("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path], { stdio: ["ignore", "ignore", "pipe"] });
}

/** Field 2 of `ssh-keygen -lf <pub>`: "256 SHA256:xxxx comment (ED25519)". */
function fingerprintFile(pubPath: string): string {
  const out = execFileSync("ssh-keygen", ["-lf", pubPath], { encoding: "utf8" });
  const fp = out.trim().split(/\s+/)[1];
  if (!fp?.startsWith("SHA256:")) throw new Error(`unexpected ssh-keygen -lf output: ${out}`);
  return fp;
}

/** Starts a real sshd; resolves once it accepts TCP connections on 127.0.0.1:port. */
export async function startSshd(opts: StartSshdOptions = {}): Promise<Sshd> {
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
    let extraKeys = 0;
    const authorizeAnotherKey = (comment: string): string => {
      const path = join(keys, `extra_${extraKeys++}_ed25519`);
      keygen(path, comment);
      appendFileSync(authorizedKeys, `${keyOptions.join(",")} ${readFileSync(`${path}.pub`, "utf8").trim()}\n`);
      return readFileSync(path, "utf8");
    };

    writeFileSync(
      configPath,
      [
        ...["127.0.0.1", ...(opts.listenHosts ?? [])].map((h) => `ListenAddress ${h}:${port}`),
        `HostKey ${hostKey}`,
        `PidFile ${join(dir, "sshd.pid")}`,
        `AuthorizedKeysFile ${authorizedKeys}`,
        "StrictModes no", // the temp folder sits under /tmp (1777), which StrictModes rejects
        "UsePAM no",
        "PermitRootLogin prohibit-password",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "AuthenticationMethods publickey",
        "PermitTTY no",
        "X11Forwarding no",
        "AllowAgentForwarding no",
        "PermitTunnel no",
        "AllowTcpForwarding remote", // must not be "no": that also refuses streamlocal forwards
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
      // Started once sshd accepts connections, failed once it exits: whichever comes first.
      await until(async () => {
        if (exited !== undefined) throw new Error(`sshd exited early (${exited}):\n${output}`);
        return canConnect(port);
      }, `sshd to accept connections on 127.0.0.1:${port}`);
    };

    /** Full outage: every session process first (they outlive the listener), then the listener. */
    const halt = async (): Promise<void> => {
      const proc = child;
      child = undefined;
      if (!proc || proc.pid === undefined) return;
      for (const p of descendantsOf(proc.pid)) killQuietly(p.pid, "SIGKILL");
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
      authorizeAnotherKey,
      logs: () => output,
      sessionPids: () =>
        child?.pid === undefined
          ? []
          : descendantsOf(child.pid)
              .filter((p) => /^sshd/.test(p.comm))
              .map((p) => p.pid),
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
      for (const p of descendantsOf(child.pid)) killQuietly(p.pid, "SIGKILL");
      child.kill("SIGKILL");
    }
    rmSync(dir, { recursive: true, force: true });
    throw err;
  }
}
