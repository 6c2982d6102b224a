/** A pino destination that keeps every line in memory, so tests can read what a daemon logged. */
import { Writable } from "node:stream";

export class LogCapture extends Writable {
  readonly lines: string[] = [];
  override _write(chunk: Buffer, _enc: BufferEncoding, cb: () => void): void {
    this.lines.push(...chunk.toString("utf8").split("\n").filter(Boolean));
    cb();
  }
  text(): string {
    return this.lines.join("\n");
  }
  json(): Array<Record<string, any>> {
    return this.lines.map((l) => JSON.parse(l) as Record<string, any>);
  }
  /** The proxy's per-request completion lines. */
  requests(): Array<Record<string, any>> {
    return this.json().filter((l) => l.msg === "request");
  }
}
