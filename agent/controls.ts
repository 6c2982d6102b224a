/**
 * The owner's switches, kept on the owner's machine: a pause switch that cuts
 * KMS off at once, and per-key disable. Persisted to a small JSON state file
 * (written atomically) so they survive a restart of the agent.
 *
 * A state file that exists but cannot be read, is not JSON or does not have
 * the shape below fails closed: the agent is paused (keeping the keys it
 * knew to be disabled), `problem` says why, and "damaged" is emitted. Writing
 * the file again (`xks-agent pause|resume`, the dashboard) repairs it. No file
 * at all is the fresh state: not paused, no key disabled.
 */
import { existsSync, mkdirSync, readFileSync, renameSync, unwatchFile, watchFile, writeFileSync } from "node:fs";
import { dirname } from "node:path";
import { EventEmitter } from "node:events";

export interface ControlState {
  paused: boolean;
  disabledKeys: string[];
  /** Set while the state file is damaged: why (the agent is paused meanwhile). */
  problem?: string;
}

/** The state file's content, or why it is not a valid one. */
function parseState(text: string): ControlState | string {
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (err) {
    return `not valid JSON (${(err as Error).message})`;
  }
  if (typeof raw !== "object" || raw === null || Array.isArray(raw)) return "not a JSON object";
  const o = raw as Record<string, unknown>;
  if (typeof o.paused !== "boolean") return '"paused" is missing or not true/false';
  if (!Array.isArray(o.disabledKeys) || !o.disabledKeys.every((k) => typeof k === "string"))
    return '"disabledKeys" is missing or not an array of key labels';
  return { paused: o.paused, disabledKeys: [...(o.disabledKeys as string[])] };
}

export class Controls extends EventEmitter {
  private state: ControlState = { paused: false, disabledKeys: [] };

  constructor(private readonly file?: string) {
    super();
    this.reload();
  }

  /** Re-reads the state file (another process, e.g. `xks-agent pause`, may have changed it). */
  reload(): void {
    if (!this.file || !existsSync(this.file)) return;
    let parsed: ControlState | string;
    try {
      parsed = parseState(readFileSync(this.file, "utf8"));
    } catch (err) {
      parsed = `cannot be read (${(err as NodeJS.ErrnoException).code ?? (err as Error).message})`;
    }
    // Our own writes are atomic renames, so a half-written file is never seen; anything else that
    // is not a valid state is damage, and damage pauses.
    const next: ControlState =
      typeof parsed === "string"
        ? { paused: true, disabledKeys: this.state.disabledKeys, problem: `the owner controls file ${this.file} is damaged: ${parsed}` }
        : parsed;
    if (JSON.stringify(next) === JSON.stringify(this.state)) return;
    const newlyDamaged = next.problem !== undefined && next.problem !== this.state.problem;
    this.state = next;
    this.emit("change", this.snapshot());
    if (newlyDamaged) this.emit("damaged", next.problem);
  }

  /** Why the state file is damaged (the agent is paused meanwhile), or undefined. */
  get problem(): string | undefined {
    return this.state.problem;
  }

  /** Follows changes made by other processes (polls the file's mtime every `intervalMs`). */
  watch(intervalMs = 200): () => void {
    if (!this.file) return () => {};
    const file = this.file;
    const onChange = () => this.reload();
    watchFile(file, { interval: intervalMs, persistent: false }, onChange);
    return () => unwatchFile(file, onChange);
  }

  get paused(): boolean {
    return this.state.paused;
  }

  isKeyDisabled(label: string): boolean {
    return this.state.disabledKeys.includes(label);
  }

  snapshot(): ControlState {
    const { paused, disabledKeys, problem } = this.state;
    return { paused, disabledKeys: [...disabledKeys], ...(problem !== undefined ? { problem } : {}) };
  }

  setPaused(paused: boolean): void {
    this.update({ paused, disabledKeys: this.state.disabledKeys });
  }

  setKeyDisabled(label: string, disabled: boolean): void {
    const keys = new Set(this.state.disabledKeys);
    if (disabled) keys.add(label);
    else keys.delete(label);
    this.update({ paused: this.state.paused, disabledKeys: [...keys].sort() });
  }

  private update(next: ControlState): void {
    if (this.file) {
      mkdirSync(dirname(this.file), { recursive: true, mode: 0o700 });
      const tmp = `${this.file}.tmp`;
      writeFileSync(tmp, `${JSON.stringify(next)}\n`, { mode: 0o600 });
      renameSync(tmp, this.file);
    }
    this.state = next;
    this.emit("change", this.snapshot());
  }
}

/** How the owner repairs a damaged controls file. */
export function controlsFix(configFile: string): string {
  return `Check the file, then run \`xks-agent resume --config ${configFile}\` to rewrite it (un-paused, no keys disabled; disable keys again if needed).`;
}
