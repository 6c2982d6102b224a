/**
 * One bare TCP round trip: an echo server in its own process (on the agent's
 * side of the WAN link, or on loopback), a client here sending 64 bytes and
 * waiting for them back, one at a time. Over the WAN this is the "1 RTT"
 * every WAN figure is compared with; on loopback it shows what waking two
 * idle processes costs on this machine.
 */
import { spawn } from "node:child_process";
import net from "node:net";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import { onCleanup } from "./cleanup.ts";
import { summarize, type LatencySummary } from "./stats.ts";

const SERVER = fileURLToPath(new URL("./echo-server.ts", import.meta.url));

export interface EchoResult {
  latency: LatencySummary;
  /** [send, done] per measured ping, process.hrtime ns. */
  windows: Array<[bigint, bigint]>;
}

export interface EchoOptions {
  host: string;
  port: number;
  count: number;
  /** Pause between pings, ms (0 = back to back). */
  gapMs: number;
  /** Wraps the server's argv, e.g. to run it in another network namespace. */
  wrap?: (argv: string[]) => string[];
}

export async function measureEcho(o: EchoOptions): Promise<EchoResult> {
  const argv = [process.execPath, "--import", "tsx", SERVER, o.host, String(o.port)];
  const [cmd, ...args] = o.wrap ? o.wrap(argv) : argv;
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
    const sock = net.connect(o.port, o.host);
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
    for (let i = 0; i < o.count; i++) {
      const t0 = process.hrtime.bigint();
      await ping();
      const t1 = process.hrtime.bigint();
      lat.push(Number(t1 - t0) / 1e6);
      windows.push([t0, t1]);
      if (o.gapMs > 0) await new Promise((r) => setTimeout(r, o.gapMs));
    }
    sock.destroy();
    return { latency: summarize(lat), windows };
  } finally {
    await stopServer();
  }
}
