/**
 * What the daemons log, captured for tests, and the one check that nothing
 * secret reached it.
 */
import { Writable } from "node:stream";

/** A pino destination that keeps every line in memory, so tests can read what a daemon logged. */
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

/**
 * Which of the labelled secrets occur in `text` (empty values are skipped).
 * Labels name what leaked, never the value, so a failure message does not
 * repeat the secret either.
 */
export function findLeaks(text: string, secrets: Record<string, string | undefined>): string[] {
  return Object.entries(secrets)
    .filter(([, value]) => value !== undefined && value !== "" && text.includes(value))
    .map(([label]) => label);
}

/** What a request that went through SigV4 leaves behind if anything logs its Authorization header. */
export const AUTHORIZATION_MARKERS = {
  "SigV4 algorithm": "AWS4-HMAC-SHA256",
  "SigV4 signature": "Signature=",
  "SigV4 credential": "Credential=",
};

/** `label`, `label (Base64)` and `label (hex)` for a byte value, as it could appear in a log. */
export function encodings(label: string, value: Buffer | string): Record<string, string> {
  const b = Buffer.from(value);
  return { [label]: b.toString("utf8"), [`${label} (Base64)`]: b.toString("base64"), [`${label} (hex)`]: b.toString("hex") };
}
