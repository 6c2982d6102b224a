/**
 * The simulated WAN between "the owner's Mac" and "EC2", built only from
 * things this bench creates and removes again:
 *
 *   netns xks-bench-wan                         root namespace
 *   ┌──────────────────────────┐               ┌─────────────────────────────┐
 *   │ agent (ssh2 client)      │               │ sshd, proxy, load generator │
 *   │ xkbw-agent 198.18.0.1 ───┼── delayline ──┼── xkbw-ec2 198.18.0.2       │
 *   └──────────────────────────┘  RTT/2 each   └─────────────────────────────┘
 *                                  way, ACKs too
 *
 * 198.18.0.0/15 is the benchmarking range (RFC 2544): point-to-point /32
 * routes on our own TUN devices, reaching nothing else. These kernels have no
 * sch_netem (`netemAvailable()` checks and the report says so); the userspace
 * line is used either way, because it also logs every segment, which is how
 * round trips are counted.
 */
import { execFileSync } from "node:child_process";
import { onCleanup } from "../cleanup.ts";
import { buildDelayLine, DelayLine } from "./delayline.ts";

export const WAN_NETNS = "xks-bench-wan";
export const AGENT_ADDR = "198.18.0.1";
export const EC2_ADDR = "198.18.0.2";
const TUN_AGENT = "xkbw-agent";
const TUN_EC2 = "xkbw-ec2";

function ip(...args: string[]): void {
  execFileSync("ip", args, { stdio: ["ignore", "ignore", "pipe"] });
}

function quietly(fn: () => void): void {
  try {
    fn();
  } catch {
    /* not there */
  }
}

/** True when `tc ... netem` works on this kernel (tried on a throw-away namespace's loopback). */
export function netemAvailable(): boolean {
  const ns = `${WAN_NETNS}-probe`;
  try {
    ip("netns", "add", ns);
    execFileSync("ip", ["netns", "exec", ns, "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"], { stdio: "ignore" });
    return true;
  } catch {
    return false;
  } finally {
    quietly(() => ip("netns", "del", ns));
  }
}

/** Removes what an interrupted earlier run may have left. */
function removeLeftovers(): void {
  quietly(() => ip("netns", "del", WAN_NETNS));
  quietly(() => ip("link", "del", TUN_EC2));
}

export interface WanLink {
  netns: string;
  agentAddr: string;
  ec2Addr: string;
  rttMs: number;
  line: DelayLine;
  /** argv prefix that runs a command on the agent's side of the link. */
  agentSide(argv: string[]): string[];
  stop(): Promise<void>;
}

export async function startWanLink(o: { rttMs: number; binDir: string }): Promise<WanLink> {
  removeLeftovers();
  const bin = buildDelayLine(o.binDir);
  ip("netns", "add", WAN_NETNS);
  const removeNetns = onCleanup("network namespace", () => quietly(() => ip("netns", "del", WAN_NETNS)));
  // The TUN devices exist while the delay line runs (not persistent): stopping it removes them.
  const line = await DelayLine.start(bin, TUN_AGENT, TUN_EC2, (o.rttMs * 1000) / 2);
  const stopLine = onCleanup("delay line", () => line.stop());
  try {
    ip("link", "set", TUN_AGENT, "netns", WAN_NETNS);
    ip("-n", WAN_NETNS, "link", "set", "lo", "up");
    ip("-n", WAN_NETNS, "addr", "add", AGENT_ADDR, "peer", EC2_ADDR, "dev", TUN_AGENT);
    ip("-n", WAN_NETNS, "link", "set", TUN_AGENT, "up");
    ip("addr", "add", EC2_ADDR, "peer", AGENT_ADDR, "dev", TUN_EC2);
    ip("link", "set", TUN_EC2, "up");
  } catch (err) {
    await stopLine();
    await removeNetns();
    throw new Error(`setting up the WAN link: ${(err as Error).message}`);
  }
  return {
    netns: WAN_NETNS,
    agentAddr: AGENT_ADDR,
    ec2Addr: EC2_ADDR,
    rttMs: o.rttMs,
    line,
    agentSide: (argv) => ["ip", "netns", "exec", WAN_NETNS, ...argv],
    stop: async () => {
      await stopLine();
      await removeNetns();
    },
  };
}
