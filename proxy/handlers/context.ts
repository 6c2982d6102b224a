/**
 * What every operation handler gets besides its validated input, and the
 * wire → proto mapping of `requestMetadata` shared by all of them.
 */
import type { RequestMetadata } from "../../shared/proto.ts";
import type { AgentApi } from "../agent-client.ts";
import type { Limits } from "../config.ts";
import type { WireRequestMetadata } from "../validate.ts";

export interface HandlerContext {
  agents: AgentApi;
  /** The key store's URI path prefix ("" = none). */
  keyStore: string;
  /** The externalKeyId from the path ("" for GetHealthStatus). */
  keyId: string;
  limits: Limits;
  /** Static health fields from config. */
  fleetSize: number;
  vendor: string;
  ekmVendor: string;
  /** Records which agent served the call, for the request's log line. */
  served(agentId: string): void;
}

/** requestMetadata (wire, spec §1.3) → RequestMetadata message, plus the key store it arrived on. */
export function toProtoMetadata(m: WireRequestMetadata, keyStore: string): RequestMetadata {
  return {
    awsPrincipalArn: m.awsPrincipalArn,
    kmsKeyArn: m.kmsKeyArn,
    kmsOperation: m.kmsOperation,
    kmsRequestId: m.kmsRequestId,
    kmsViaService: m.kmsViaService,
    awsSourceVpc: m.awsSourceVpc,
    awsSourceVpce: m.awsSourceVpce,
    keyStore,
  };
}

/** Base64 (standard, padded) of a proto bytes field, which may arrive as Buffer or Uint8Array. */
export function b64(bytes: Uint8Array | undefined): string {
  return bytes ? Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString("base64") : "";
}

export function len(bytes: Uint8Array | undefined): number {
  return bytes ? bytes.byteLength : 0;
}
