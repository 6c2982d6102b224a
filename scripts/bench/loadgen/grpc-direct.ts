/**
 * The agent's gRPC service called directly on its Unix socket with the proxy's
 * token: no SSH tunnel, no HTTP, no SigV4. Closed loop: `concurrency` calls are
 * kept in flight for the duration (1 = sequential). Answers are checked like
 * the chain's: ciphertext length, 12-byte IV, 16-byte tag.
 */
import { randomBytes } from "node:crypto";
import { agentClient } from "../../../testbed/grpc-client.ts";
import { agentMetadata } from "../../../testbed/xks/metadata.ts";
import { summarize } from "../stats.ts";
import type { GrpcSpec, JobResult } from "./protocol.ts";

export async function grpcDirect(spec: GrpcSpec, onStarted: () => void): Promise<JobResult> {
  if (spec.case.op !== "Encrypt") throw new Error("grpc-direct measures Encrypt");
  const { call, close } = agentClient(`unix://${spec.socket}`, spec.token, {
    identity: spec.identities.proxy,
    agentIdentities: [spec.identities.agent],
  });
  const plaintext = randomBytes(spec.case.size);
  const aad = randomBytes(32);
  const errorKinds: JobResult["errorKinds"] = {};
  let errors = 0;
  const lat: number[] = [];
  const one = async (measure: boolean) => {
    const t0 = performance.now();
    let problem: string | undefined;
    try {
      const r = (await call("Encrypt", {
        metadata: agentMetadata("Encrypt", {}, spec.keyStore),
        keyId: spec.keyId,
        plaintext,
        aad,
        wantIntegrityValue: false,
      })) as {
        ciphertext: Buffer;
        iv: Buffer;
        tag: Buffer;
      };
      if (r.ciphertext.length !== plaintext.length || r.iv.length !== 12 || r.tag.length !== 16) problem = "malformed Encrypt answer";
    } catch (err) {
      problem = `gRPC ${(err as { code?: number }).code ?? "?"} ${(err as { reason?: string }).reason ?? ""}`.trim();
    }
    if (!measure) return;
    lat.push(performance.now() - t0);
    if (problem) {
      errors++;
      errorKinds[problem] ??= { count: 0, example: problem };
      errorKinds[problem].count++;
    }
  };
  try {
    for (let i = 0; i < 1500; i++) await one(false); // warm-up (JIT)
    onStarted();
    const start = performance.now();
    const end = start + spec.durationS * 1000;
    const worker = async () => {
      while (performance.now() < end) await one(true);
    };
    await Promise.all(Array.from({ length: spec.concurrency }, worker));
    const elapsedS = (performance.now() - start) / 1000;
    return { completed: lat.length, errors, errorKinds, latency: summarize(lat), elapsedS, achievedRate: lat.length / elapsedS };
  } finally {
    close();
  }
}
