/**
 * The agent's audit segments as tests read them: every segment's text, in
 * order, and the parsed lines. For small test logs only (everything in memory).
 */
import { readFileSync } from "node:fs";
import { listSegments } from "../agent/audit.ts";

/** Every segment's bytes, oldest first, as one string. */
export function auditText(dir: string): string {
  return listSegments(dir)
    .map((s) => readFileSync(s.path, "utf8"))
    .join("");
}

/** Every line that is JSON, parsed; `t` is the line's type ("seg", "op", "ev", "cp"). Damage is verify's to report. */
export function auditLines(dir: string): Array<Record<string, unknown> & { n: number; t: string }> {
  return auditText(dir)
    .split("\n")
    .filter(Boolean)
    .flatMap((l) => {
      try {
        return [JSON.parse(l)];
      } catch {
        return [];
      }
    });
}

/** The operation records (type "op"). */
export function auditOps(dir: string): Array<Record<string, string | number>> {
  return auditLines(dir).filter((l) => l.t === "op") as Array<Record<string, string | number>>;
}
