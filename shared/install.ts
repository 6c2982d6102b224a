/**
 * Writing rendered service files (`xks-proxy install`, `xks-agent install`):
 * every file is compared with what is on disk first, a file that differs is
 * refused unless forced, and nothing is written when any file is refused, so
 * a run either installs everything or changes nothing.
 */
import { chmodSync, existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { CommandFailure } from "./cli.ts";

export interface ServiceFile {
  /** Where it goes on this machine (absolute). */
  path: string;
  content: string;
  mode: number;
}

/** The path of `f` under `root` ("/" for the machine itself; another folder for an image or a test). */
export function underRoot(root: string, path: string): string {
  return root === "/" ? path : join(root, path);
}

/** How each file would be printed by --dry-run: a header naming the path, then the exact content. */
export function dryRunText(files: ServiceFile[]): string {
  return files.map((f) => `# ${f.path} (mode ${f.mode.toString(8).padStart(4, "0")})\n${f.content}`).join("\n");
}

/**
 * Writes the files under `root`; returns one line per file (written, replaced or unchanged).
 * Throws a CommandFailure naming every differing file when `force` is not set, before writing any.
 */
export function writeServiceFiles(files: ServiceFile[], o: { root: string; force: boolean }): string[] {
  const state = files.map((f) => {
    const at = underRoot(o.root, f.path);
    const before = existsSync(at) ? readFileSync(at, "utf8") : undefined;
    return { f, at, before };
  });
  const differing = state.filter((s) => s.before !== undefined && s.before !== s.f.content);
  if (differing.length > 0 && !o.force)
    throw new CommandFailure(
      `${differing.map((s) => s.at).join(", ")} exist${differing.length === 1 ? "s" : ""} with other content; ` +
        "nothing was written (compare with --dry-run, then --force to replace)",
    );
  return state.map(({ f, at, before }) => {
    if (before === f.content) return `unchanged ${at}`;
    mkdirSync(dirname(at), { recursive: true });
    writeFileSync(at, f.content, { mode: f.mode });
    chmodSync(at, f.mode); // `mode` applies only when the file is created
    return `${before === undefined ? "wrote" : "replaced"} ${at}`;
  });
}
