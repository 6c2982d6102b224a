/**
 * Waiting for things to happen, never for time to pass. Every wait has a cap,
 * generous on purpose: it only turns "never" into a clear failure, and a slow
 * or busy machine must not reach it. A test that needs a figure (how fast,
 * how soon) belongs in `npm run bench`.
 */
import type { EventEmitter } from "node:events";

/** The cap for waits on things that take milliseconds on an idle machine. */
export const GENEROUS_MS = 30_000;

export const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/**
 * Polls `cond` until it holds; resolves with performance.now() at that
 * moment. Throws, naming `what`, if it still does not hold after `capMs`.
 */
export async function until(cond: () => boolean | Promise<boolean>, what: string, capMs = GENEROUS_MS, stepMs = 10): Promise<number> {
  const deadline = performance.now() + capMs;
  for (;;) {
    if (await cond()) return performance.now();
    if (performance.now() > deadline) throw new Error(`timed out after ${capMs} ms waiting for ${what}`);
    await sleep(stepMs);
  }
}

/**
 * The first `event` on `emitter` whose argument satisfies `pred`, or the
 * `current` value if it already does. Throws, naming `what`, after `capMs`.
 */
export function nextEvent<T>(
  emitter: EventEmitter,
  event: string,
  pred: (value: T) => boolean,
  what: string,
  opts: { current?: T; capMs?: number } = {},
): Promise<T> {
  if (opts.current !== undefined && pred(opts.current)) return Promise.resolve(opts.current);
  const capMs = opts.capMs ?? GENEROUS_MS;
  return new Promise((resolve, reject) => {
    const on = (value: T) => {
      if (!pred(value)) return;
      clearTimeout(timer);
      emitter.off(event, on);
      resolve(value);
    };
    const timer = setTimeout(() => {
      emitter.off(event, on);
      reject(new Error(`timed out after ${capMs} ms waiting for ${what}`));
    }, capMs);
    emitter.on(event, on);
  });
}
