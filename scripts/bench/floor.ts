/**
 * The floor: the agent's own encrypt()/decrypt() (agent/ops) on an Hsm, called
 * in this process with no transport at all, on a fresh SoftHSM token. Each
 * call is timed, so the floor has a per-op latency as well as a rate.
 * Must run before (or after) any other Hsm in this process: SoftHSM has one
 * PKCS#11 library state per process.
 */
import { rmSync } from "node:fs";
import { join } from "node:path";
import { Hsm } from "../../agent/hsm/hsm.ts";
import { createKey } from "../../agent/keys.ts";
import { decrypt } from "../../agent/ops/decrypt.ts";
import { encrypt } from "../../agent/ops/encrypt.ts";
import { createLogger } from "../../shared/logging.ts";
import type { RequestMetadata } from "../../shared/proto.ts";
import { createSoftHsmToken, DIRECT_USE, directOpContext } from "../../testbed/hsm.ts";
import { summarize, type LatencySummary } from "./stats.ts";

export interface FloorResult {
  op: "Encrypt" | "Decrypt";
  size: number;
  opsPerSec: number;
  latency: LatencySummary;
}

const KEY = "bench-floor";
const AAD = Buffer.alloc(32, 0x61);
const META: RequestMetadata = {
  awsPrincipalArn: "arn:aws:iam::123456789012:user/bench",
  kmsKeyArn: "arn:aws:kms:us-east-1:123456789012:key/bench",
  kmsOperation: "Encrypt",
  kmsRequestId: "bench-floor",
  kmsViaService: "",
  awsSourceVpc: "",
  awsSourceVpce: "",
  keyStore: DIRECT_USE.keyStore,
};

/** Times `fn` back to back for `seconds` (after a short warm-up). */
function timeLoop(seconds: number, fn: () => void): { opsPerSec: number; latency: LatencySummary } {
  for (let i = 0; i < 2000; i++) fn();
  const lat: number[] = [];
  const start = performance.now();
  const end = start + seconds * 1000;
  let t = start;
  while (t < end) {
    fn();
    const t2 = performance.now();
    lat.push(t2 - t);
    t = t2;
  }
  return { opsPerSec: lat.length / ((t - start) / 1000), latency: summarize(lat) };
}

export function measureFloor(dir: string, sizes: number[], secondsEach: number): FloorResult[] {
  const token = createSoftHsmToken({ dir: join(dir, "hsm"), tokenLabel: "xks-bench-floor" });
  const hsm = new Hsm({ module: token.module, tokenLabel: token.tokenLabel, pin: token.pin }, createLogger({ level: "silent" }));
  try {
    hsm.open();
    createKey(hsm, KEY, ["encrypt", "decrypt"]);
    const ctx = directOpContext(hsm, { serve: [KEY], agentId: "bench-floor" });
    const out: FloorResult[] = [];
    for (const size of sizes) {
      const plaintext = Buffer.alloc(size, 0x42);
      const enc = timeLoop(secondsEach, () => {
        encrypt(ctx, { metadata: META, keyId: KEY, plaintext, aad: AAD, wantIntegrityValue: false }, DIRECT_USE);
      });
      out.push({ op: "Encrypt", size, ...enc });
      const e = encrypt(ctx, { metadata: META, keyId: KEY, plaintext, aad: AAD, wantIntegrityValue: false }, DIRECT_USE);
      const req = {
        metadata: { ...META, kmsOperation: "Decrypt" },
        keyId: KEY,
        ciphertext: e.ciphertext,
        iv: e.iv,
        tag: e.tag,
        aad: AAD,
        ciphertextMetadata: e.ciphertextMetadata,
      };
      if (!decrypt(ctx, req, DIRECT_USE).plaintext.equals(plaintext)) throw new Error("floor: decrypt did not give the plaintext back");
      const dec = timeLoop(secondsEach, () => {
        decrypt(ctx, req, DIRECT_USE);
      });
      out.push({ op: "Decrypt", size, ...dec });
    }
    return out;
  } finally {
    hsm.close();
    rmSync(join(dir, "hsm"), { recursive: true, force: true });
  }
}
