/**
 * Everything the bench starts registers how to undo it here (processes, the
 * chain, network namespaces, TUN devices). `runAll()` undoes it in reverse
 * order, once; Ctrl-C and SIGTERM run it too before the process exits.
 */
import { commandOf, killQuietly } from "../../testbed/procs.ts";

type Undo = () => void | Promise<void>;

const steps: Array<{ what: string; undo: Undo }> = [];
let running: Promise<void> | undefined;

/** Registers an undo step; returns a function that runs it early (and removes it). */
export function onCleanup(what: string, undo: Undo): () => Promise<void> {
  const step = { what, undo };
  steps.push(step);
  return async () => {
    const i = steps.indexOf(step);
    if (i < 0) return;
    steps.splice(i, 1);
    await undo();
  };
}

/** Runs every registered step, last registered first. Failures are reported and do not stop the rest. */
export function runAll(): Promise<void> {
  running ??= (async () => {
    while (steps.length > 0) {
      const step = steps.pop()!;
      try {
        await step.undo();
      } catch (err) {
        console.error(`cleanup: ${step.what}: ${(err as Error).message}`);
      }
    }
  })();
  return running;
}

/** On Ctrl-C / SIGTERM: clean up, then exit 130 / 143. A second Ctrl-C exits at once. */
export function cleanupOnSignals(): void {
  let interrupted = false;
  const handler = (signal: NodeJS.Signals, code: number) => {
    if (interrupted) process.exit(code);
    interrupted = true;
    console.error(`\n${signal}: stopping everything the bench started…`);
    void runAll().finally(() => process.exit(code));
  };
  process.on("SIGINT", () => handler("SIGINT", 130));
  process.on("SIGTERM", () => handler("SIGTERM", 143));
}

/**
 * sshd's session processes outlive their listener. On a terminal Ctrl-C the
 * listener (same process group) dies at once and its sessions are re-parented,
 * so the sshd helper can no longer find them to stop them. This remembers
 * every session pid seen and, at cleanup (after the chain's own stop), ends
 * those still running, by pid, if they are still sshd processes.
 */
export function trackSshdSessions(sshd: { sessionPids(): number[] }, what: string): { pids(): number[] } {
  const seen = new Set<number>();
  const pids = () => {
    const now = sshd.sessionPids();
    for (const pid of now) seen.add(pid);
    return now;
  };
  onCleanup(`${what} sshd sessions`, () => {
    for (const pid of seen) if (/sshd/.test(commandOf(pid) ?? "")) killQuietly(pid);
  });
  return { pids };
}
