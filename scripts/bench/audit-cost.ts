/**
 * The audit log's cost per operation: AuditLog.append() of a typical record
 * (agent/audit.ts) on a fresh SoftHSM token with the audit key, timed back to
 * back under each durability policy, plus a checkpoint (HMAC-SHA256 in the HSM,
 * a line, and with the default policy an fdatasync). Checkpoints are made
 * inline every `checkpointMs` of the loop, as the agent's timer would.
 * Runs after the floor (SoftHSM has one PKCS#11 library state per process).
 */
import { rmSync } from "node:fs";
import { join } from "node:path";
import { AuditLog } from "../../agent/audit.ts";
import { Hsm } from "../../agent/hsm/hsm.ts";
import { createAuditKey } from "../../agent/keys.ts";
import type { OperationRecord } from "../../agent/server.ts";
import { createLogger } from "../../shared/logging.ts";
import { createSoftHsmToken } from "../../testbed/hsm.ts";
import { summarize, type LatencySummary } from "./stats.ts";

export interface AuditCost {
  fsync: "checkpoint" | "record";
  records: number;
  /** Wall time of one append, in ms (synchronous: CPU and the write/fdatasync it waits for). */
  append: LatencySummary;
  /** One checkpoint (HSM HMAC + line + fdatasync with "checkpoint"), in ms. */
  checkpoint: LatencySummary;
  /** Appends and checkpoints together, per record, in µs. */
  perRecordUs: number;
}

const KEY = "bench-audit";
const CHECKPOINT_MS = 250;

const REC: OperationRecord = {
  time: "2026-01-01T00:00:00.000Z",
  operation: "Encrypt",
  kmsRequestId: "b9b5d4a4-5d0c-4bd5-8d4f-1b7c8f0a4e21",
  kmsOperation: "Encrypt",
  keyId: "demo-key",
  principal: "arn:aws:iam::123456789012:user/bench",
  kmsKeyArn: "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab",
  viaService: "ebs",
  sourceVpc: "vpc-0123456789abcdef0",
  sourceVpce: "vpce-0123456789abcdef0",
  keyStore: "/xks-demo",
  result: "OK",
  latencyMs: 0.123,
};

export function measureAuditCost(dir: string, secondsEach: number): AuditCost[] {
  const token = createSoftHsmToken({ dir: join(dir, "hsm"), tokenLabel: "xks-bench-audit" });
  const hsm = new Hsm({ module: token.module, tokenLabel: token.tokenLabel, pin: token.pin }, createLogger({ level: "silent" }));
  try {
    hsm.open();
    createAuditKey(hsm, KEY);
    const out: AuditCost[] = [];
    for (const fsync of ["checkpoint", "record"] as const) {
      const logDir = join(dir, `log-${fsync}`);
      rmSync(logDir, { recursive: true, force: true });
      const log = new AuditLog(
        { dir: logDir, key: KEY, segmentBytes: 64 << 20, checkpointMs: 60_000, fsync },
        { seal: (d) => hsm.hmacSha256(KEY, d), log: createLogger({ level: "silent" }) },
      );
      const appends: number[] = [];
      const cps: number[] = [];
      const start = performance.now();
      const end = start + secondsEach * 1000;
      let nextCp = start + CHECKPOINT_MS;
      let t = start;
      while (t < end) {
        log.append(REC);
        const t2 = performance.now();
        appends.push(t2 - t);
        t = t2;
        if (t >= nextCp) {
          log.checkpoint();
          const t3 = performance.now();
          cps.push(t3 - t);
          t = t3;
          nextCp = t + CHECKPOINT_MS;
        }
      }
      log.close();
      out.push({
        fsync,
        records: appends.length,
        append: summarize(appends),
        checkpoint: summarize(cps),
        perRecordUs: ((t - start) / appends.length) * 1000,
      });
      rmSync(logDir, { recursive: true, force: true });
    }
    return out;
  } finally {
    hsm.close();
    rmSync(join(dir, "hsm"), { recursive: true, force: true });
  }
}
