/**
 * One bare TCP round trip over the WAN link: an echo server on the agent's
 * side, a client here on the EC2 side sending 64 bytes and waiting for them
 * back, one at a time. This is the "1 RTT" every WAN figure is compared with.
 */
import { spawn } from "node:child_process";
import net from "node:net";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import { onCleanup } from "../cleanup.ts";
import { summarize, type LatencySummary } from "../stats.ts";
import type { WanLink } from "./link.ts";

const SERVER = fileURLToPath(new URL("./echo-server.ts", import.meta.url));

export interface EchoResult {
  latency: LatencySummary;
  /** [send, done] per measured ping, process.hrtime ns. */
  windows: Array<[bigint, bigint]>;
}

export async function measureEcho(link: WanLink, port: number, count: number, gapMs: number): Promise<EchoResult> {
  const [cmd, ...args] = link.agentSide([process.execPath, "--import", "tsx", SERVER, link.agentAddr, String(port)]);
  const server = spawn(cmd, args, { stdio: ["pipe", "pipe", "inherit"] });
  const stopServer = onCleanup("echo server", async () => {
    if (server.exitCode !== null) return;
    const exited = new Promise((r) => server.once("exit", r));
    server.stdin!.end();
    const t = setTimeout(() => server.kill("SIGKILL"), 2000);
    await exited;
    clearTimeout(t);
  });
  try {
    const first = await createInterface({ input: server.stdout! })[Symbol.asyncIterator]().next();
    if (first.value !== "listening") throw new Error("echo server did not start");
    const sock = net.connect(port, link.agentAddr);
    sock.setNoDelay(true);
    await new Promise<void>((resolve, reject) => sock.once("connect", resolve).once("error", reject));
    const payload = Buffer.alloc(64, 0x2a);
    const ping = () =>
      new Promise<void>((resolve) => {
        let got = 0;
        const onData = (b: Buffer) => {
          got += b.length;
          if (got >= payload.length) {
            sock.off("data", onData);
            resolve();
          }
        };
        sock.on("data", onData);
        sock.write(payload);
      });
    for (let i = 0; i < 10; i++) await ping(); // warm-up
    const lat: number[] = [];
    const windows: Array<[bigint, bigint]> = [];
    for (let i = 0; i < count; i++) {
      const t0 = process.hrtime.bigint();
      await ping();
      const t1 = process.hrtime.bigint();
      lat.push(Number(t1 - t0) / 1e6);
      windows.push([t0, t1]);
      if (gapMs > 0) await new Promise((r) => setTimeout(r, gapMs));
    }
    sock.destroy();
    return { latency: summarize(lat), windows };
  } finally {
    await stopServer();
  }
}
