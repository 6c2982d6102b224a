/**
 * The step search for capacity: the highest offered rate (open loop) with
 * p99 < 100 ms, no errors and the answers keeping up. Each step's CPU per
 * role is kept, so that CPU per request can be read at the capacity found.
 */
import type { Case } from "./loadgen/protocol.ts";
import { startCpuMeter } from "./procstat.ts";
import { int, ms, progress, type StepSearch } from "./report.ts";
import { caseName, openLoop, type Rig, waitForQuiet } from "./rig.ts";

const sleep = (msec: number) => new Promise((r) => setTimeout(r, msec));

/**
 * Grows the rate by 30 % from `hint` until a step fails, then bisects (7 rates at most, stop
 * within 8 %). A failing step is run once more before the rate counts as failed: everything
 * above the first failure is never tried again, so one transient in a 3 s step (a GC pause,
 * another process, the first step after a warm-up) could otherwise cap the result (measured:
 * the proxy alone with two workers gave 1,476 and 1,636 req/s in runs whose first step failed,
 * 3,553 in one whose first step passed).
 */
export async function stepSearch(rig: Rig, c: Case, hint: number, stepS: number, indent = "   "): Promise<StepSearch> {
  const steps: StepSearch["steps"] = [];
  const step = async (rate: number): Promise<boolean> => {
    await waitForQuiet(rig);
    let meter: ReturnType<typeof startCpuMeter> | undefined;
    const res = await rig.gen.run(openLoop(c, rate, stepS), () => (meter = startCpuMeter(rig.procs)));
    const w = meter?.stop();
    const otherCores = w?.otherCores ?? NaN;
    const ok = res.errors === 0 && res.latency.p99 < 100 && res.achievedRate >= 0.97 * rate;
    steps.push({
      rate,
      pass: ok,
      p99: res.latency.p99,
      errors: res.errors,
      achieved: res.achievedRate,
      otherCores,
      completed: res.completed,
      cpuS: w?.byRole,
    });
    progress(
      `${indent}${caseName(c)} step ${int(rate)}/s: p99 ${ms(res.latency.p99)} ms, ${res.errors} errors, other load ${otherCores.toFixed(2)} → ${ok ? "pass" : "fail"}`,
    );
    return ok;
  };
  let pass = 0;
  let fail = Infinity;
  let rate = Math.max(50, Math.round(hint));
  for (let i = 0; i < 7; i++) {
    let ok = await step(rate);
    if (!ok) {
      await sleep(1000); // let queues drain, then try the rate once more
      ok = await step(rate);
    }
    if (ok) pass = Math.max(pass, rate);
    else fail = Math.min(fail, rate);
    if (fail === Infinity) rate = Math.round(rate * 1.3);
    else if (pass === 0) rate = Math.round(rate / 1.6);
    else if ((fail - pass) / pass <= 0.08) break;
    else rate = Math.round((pass + fail) / 2);
    if (rate < 20) break;
    await sleep(1000); // let queues drain
  }
  return { case: c, maxRate: pass, steps };
}
