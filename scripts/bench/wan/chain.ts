/**
 * The chain with its agent on the far side of the WAN link. It is the normal
 * chain (scripts/lib/chain.ts: token, keys, proxy, agent config) rewired:
 * the agent started there is replaced by one running in the link's network
 * namespace, which dials a second sshd that also listens on the EC2 end of the
 * link. Everything else (proxy, remote socket, tokens) is unchanged.
 *
 * What startChain would need to do this itself: an `sshdExtraConfig` (or
 * `sshdListen`) option, a `tunnelHost`/`tunnelPort` override for the agent's
 * tunnel, and an `agentCommandPrefix` (e.g. ["ip","netns","exec",ns]).
 */
import { spawn, type ChildProcess } from "node:child_process";
import { createWriteStream, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { PACKAGE_ROOT } from "../../../shared/paths.ts";
import { freePort, startSshd, type Sshd } from "../../../test/helpers/sshd.ts";
import { DAEMON_NODE_FLAGS, startChain, type Chain } from "../../lib/chain.ts";
import { onCleanup, trackSshdSessions } from "../cleanup.ts";
import type { WanLink } from "./link.ts";

export interface WanChain {
  chain: Chain;
  sshd: Sshd;
  /** sshd's port on the EC2 end of the link (the port the delay line filters on). */
  wanPort: number;
  /** The WAN sshd's session processes (remembered for cleanup). */
  sshdSessions(): number[];
  agentPid(): number | undefined;
  agentLogFile: string;
  stop(): Promise<void>;
}

export async function startWanChain(o: { dir: string; link: WanLink; logLevel?: string }): Promise<WanChain> {
  const chain = await startChain({ dir: o.dir, logLevel: o.logLevel });
  const stopChain = onCleanup("WAN chain", () => chain.stop());
  await chain.agent.stop();

  const wanPort = await freePort();
  const sshd = await startSshd({ dir: join(o.dir, "ssh-wan"), extraConfig: `ListenAddress ${o.link.ec2Addr}:${wanPort}` });
  const sessions = trackSshdSessions(sshd, "WAN");
  const stopSshd = onCleanup("WAN sshd", () => sshd.stop());
  await chain.sshd.stop(); // the loopback-only one is not used any more

  // Same agent config, but the tunnel goes to the new sshd across the link.
  const cfg = JSON.parse(readFileSync(chain.agentConfigFile, "utf8")) as { tunnels: Array<Record<string, unknown>> };
  const keyFile = join(o.dir, "agent", "id_ed25519_wan");
  writeFileSync(keyFile, sshd.clientPrivateKey, { mode: 0o600 });
  cfg.tunnels = cfg.tunnels.map((t) => ({ ...t, host: o.link.ec2Addr, port: wanPort, hostKeyFingerprint: sshd.hostKeyFingerprint, privateKey: { file: keyFile } }));
  writeFileSync(chain.agentConfigFile, JSON.stringify(cfg, null, 2));

  // XKS_NODE_ARGS (e.g. --cpu-prof) applies here as in the chain's own Daemon.
  const nodeArgs = (process.env.XKS_NODE_ARGS ?? "").split(" ").filter(Boolean);
  const argv = o.link.agentSide([process.execPath, ...DAEMON_NODE_FLAGS, ...nodeArgs, join(PACKAGE_ROOT, "bin/xks-agent.js"), "run", "--config", chain.agentConfigFile]);
  const agentLogFile = join(o.dir, "logs", "agent-wan.log");
  const log = createWriteStream(agentLogFile, { flags: "a" });
  const agent: ChildProcess = spawn(argv[0], argv.slice(1), { env: { ...process.env, ...chain.softhsm.env }, stdio: ["ignore", "pipe", "pipe"] });
  agent.stdout!.pipe(log, { end: false });
  agent.stderr!.pipe(log, { end: false });
  const agentExited = new Promise<void>((resolve) => agent.once("exit", () => resolve()));
  const stopAgent = onCleanup("WAN agent", async () => {
    if (agent.exitCode !== null || agent.signalCode !== null) return;
    agent.kill("SIGTERM");
    const t = setTimeout(() => agent.kill("SIGKILL"), 3000);
    await agentExited;
    clearTimeout(t);
  });

  return {
    chain,
    sshd,
    wanPort,
    sshdSessions: sessions.pids,
    agentPid: () => agent.pid,
    agentLogFile,
    stop: async () => {
      await stopAgent();
      await stopSshd();
      await stopChain();
    },
  };
}
