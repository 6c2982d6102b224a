/**
 * Round trips per operation, COUNTED on the wire. The delay line logs every
 * payload-carrying TCP segment of the tunnel (pure ACKs excluded) with its
 * direction and the time it entered the line. Segments are attributed to the
 * operation whose [send, done] window they fall in; within a window,
 * consecutive segments in one direction form a run, and every EC2→agent run
 * that is answered by an agent→EC2 run is one round trip (one wait for the
 * far side). A request and its response: exactly 1.
 *
 * A segment sent outside every window (keepalives, background health checks,
 * flow-control updates after an answer) is left out and counted as such.
 *
 * The same log splits each operation's time along the link (medians, ms):
 *   before:   window start → first request segment enters the line (generator, proxy, sshd)
 *   request:  first → last request segment
 *   agent:    last request segment out of the line → first response segment in (agent side)
 *   response: first → last response segment
 *   after:    last response segment out of the line → window end (sshd, proxy, generator)
 * so that before + request + agent + response + after + 2 × one-way = the latency.
 */
import { mean, median } from "../stats.ts";
import type { Segment } from "./delayline.ts";

export interface RoundTripCount {
  ops: number;
  /** Round trips per op. */
  median: number;
  /** Round trips in all windows together, and the windows' total length in s. */
  total: number;
  windowS: number;
  mean: number;
  max: number;
  /** How many ops had 0, 1, 2, … round trips. */
  histogram: Record<string, number>;
  /** Direction changes per op (runs − 1), mean. */
  directionChanges: number;
  /** Payload-carrying TCP segments per op, each way (mean). */
  segmentsToAgent: number;
  segmentsFromAgent: number;
  /** Segments outside every window (keepalives, health checks, window updates). */
  unattributed: number;
  /** Median split of an op's time along the link, ms (see the file comment). */
  split: { before: number; request: number; agent: number; response: number; after: number };
}

export function countRoundTrips(segments: Segment[], windows: Array<[bigint, bigint]>, oneWayMs: number): RoundTripCount {
  const sorted = [...windows].sort((x, y) => (x[0] < y[0] ? -1 : x[0] > y[0] ? 1 : 0));
  const perOp: Segment[][] = sorted.map(() => []);
  let unattributed = 0;
  let w = 0;
  for (const s of [...segments].sort((x, y) => (x.tNs < y.tNs ? -1 : x.tNs > y.tNs ? 1 : 0))) {
    while (w < sorted.length && sorted[w][1] < s.tNs) w++;
    if (w >= sorted.length || s.tNs < sorted[w][0]) unattributed++;
    else perOp[w].push(s);
  }

  const trips: number[] = [];
  const changes: number[] = [];
  const segTo: number[] = [];
  const segFrom: number[] = [];
  const split = { before: [] as number[], request: [] as number[], agent: [] as number[], response: [] as number[], after: [] as number[] };
  const ms = (ns: bigint) => Number(ns) / 1e6;
  perOp.forEach((segs, i) => {
    const runs: Array<{ dir: "a" | "b"; first: bigint; last: bigint }> = [];
    for (const s of segs) {
      const run = runs[runs.length - 1];
      if (run && run.dir === s.dir) run.last = s.tNs;
      else runs.push({ dir: s.dir, first: s.tNs, last: s.tNs });
    }
    let t = 0;
    for (let k = 0; k + 1 < runs.length; k++) if (runs[k].dir === "b" && runs[k + 1].dir === "a") t++;
    trips.push(t);
    changes.push(Math.max(0, runs.length - 1));
    segTo.push(segs.filter((s) => s.dir === "b").length);
    segFrom.push(segs.filter((s) => s.dir === "a").length);
    // The time split is meaningful for the plain shape only: one request run, then one response run.
    const req = runs.find((r) => r.dir === "b");
    const res = req && runs.find((r) => r.dir === "a" && r.first > req.last);
    if (t === 1 && req && res) {
      const [w0, w1] = sorted[i];
      split.before.push(ms(req.first - w0));
      split.request.push(ms(req.last - req.first));
      split.agent.push(ms(res.first - req.last) - oneWayMs);
      split.response.push(ms(res.last - res.first));
      split.after.push(ms(w1 - res.last) - oneWayMs);
    }
  });

  const histogram: Record<string, number> = {};
  for (const t of trips) histogram[t] = (histogram[t] ?? 0) + 1;
  return {
    ops: trips.length,
    median: median(trips),
    total: trips.reduce((a, b) => a + b, 0),
    windowS: sorted.reduce((sum, [a, b]) => sum + Number(b - a) / 1e9, 0),
    mean: mean(trips),
    max: Math.max(...trips),
    histogram,
    directionChanges: mean(changes),
    segmentsToAgent: mean(segTo),
    segmentsFromAgent: mean(segFrom),
    unattributed,
    split: {
      before: median(split.before),
      request: median(split.request),
      agent: median(split.agent),
      response: median(split.response),
      after: median(split.after),
    },
  };
}
