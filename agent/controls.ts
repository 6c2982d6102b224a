/**
 * The owner's switches, kept on the owner's machine: a pause switch that cuts
 * KMS off at once, and per-key disable. Persisted to a small JSON state file
 * (written atomically) so they survive a restart of the agent.
 */
import { existsSync, mkdirSync, readFileSync, renameSync, unwatchFile, watchFile, writeFileSync } from "node:fs";
import { dirname } from "node:path";
import { EventEmitter } from "node:events";

export interface ControlState {
  paused: boolean;
  disabledKeys: string[];
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
    let raw: Partial<ControlState>;
    try {
      raw = JSON.parse(readFileSync(this.file, "utf8")) as Partial<ControlState>;
    } catch {
      return; // a half-written file is never seen (writes are atomic renames); ignore anything else
    }
    const next = { paused: raw.paused === true, disabledKeys: Array.isArray(raw.disabledKeys) ? raw.disabledKeys.map(String) : [] };
    if (JSON.stringify(next) === JSON.stringify(this.state)) return;
    this.state = next;
    this.emit("change", this.snapshot());
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
    return { paused: this.state.paused, disabledKeys: [...this.state.disabledKeys] };
  }

  setPaused(paused: boolean): void {
    this.update({ ...this.state, paused });
  }

  setKeyDisabled(label: string, disabled: boolean): void {
    const keys = new Set(this.state.disabledKeys);
    if (disabled) keys.add(label);
    else keys.delete(label);
    this.update({ ...this.state, disabledKeys: [...keys].sort() });
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
