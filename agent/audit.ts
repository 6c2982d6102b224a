/**
 * The owner's record of every key operation: an append-only JSON-lines file,
 * hash-chained so that editing or deleting a line is detectable
 * (`xks-agent audit verify`). Each line holds the operation record (request
 * metadata, key, result, latency — never plaintext, ciphertext or AAD), the
 * previous line's hash, and its own hash = SHA-256(prev || canonical record).
 *
 * Lines are written with a synchronous append so that nothing acknowledged is
 * lost if the agent dies; a write costs a few microseconds.
 */
import { hash } from "node:crypto";
import { closeSync, existsSync, mkdirSync, openSync, readFileSync, writeSync } from "node:fs";
import { dirname } from "node:path";
import type { OperationRecord } from "./server.ts";

const GENESIS = "0".repeat(64);

function lineHash(prev: string, body: string): string {
  return hash("sha256", `${prev}\n${body}`, "hex");
}

export class AuditLog {
  private fd: number;
  private prev: string;

  constructor(readonly file: string) {
    mkdirSync(dirname(file), { recursive: true, mode: 0o700 });
    this.prev = existsSync(file) ? lastHash(file) : GENESIS;
    this.fd = openSync(file, "a", 0o600);
  }

  append(rec: OperationRecord): void {
    const body = JSON.stringify(rec);
    const hash = lineHash(this.prev, body);
    writeSync(this.fd, `{"rec":${body},"prev":"${this.prev}","hash":"${hash}"}\n`);
    this.prev = hash;
  }

  close(): void {
    closeSync(this.fd);
  }
}

function lastHash(file: string): string {
  const lines = readFileSync(file, "utf8").split("\n").filter(Boolean);
  if (lines.length === 0) return GENESIS;
  return (JSON.parse(lines[lines.length - 1]) as { hash: string }).hash;
}

/** Checks the whole chain; returns the number of records or the first broken line (1-based). */
export function verifyAuditLog(file: string): { ok: true; records: number } | { ok: false; line: number; why: string } {
  const lines = readFileSync(file, "utf8").split("\n").filter(Boolean);
  let prev = GENESIS;
  for (let i = 0; i < lines.length; i++) {
    let entry: { rec: unknown; prev: string; hash: string };
    try {
      entry = JSON.parse(lines[i]);
    } catch {
      return { ok: false, line: i + 1, why: "not JSON" };
    }
    if (entry.prev !== prev) return { ok: false, line: i + 1, why: "chain broken (previous hash differs)" };
    if (lineHash(prev, JSON.stringify(entry.rec)) !== entry.hash) return { ok: false, line: i + 1, why: "record altered" };
    prev = entry.hash;
  }
  return { ok: true, records: lines.length };
}
