/**
 * The `requestMetadata` KMS sends with every request (XKS Proxy API spec
 * §1.3), and its gRPC form, built in one place.
 */
import { randomBytes } from "node:crypto";
import type { RequestMetadata } from "../../shared/proto.ts";
import { PREFIX } from "../configs.ts";

export const PRINCIPAL = "arn:aws:iam::123456789012:user/Alice";
export const KMS_KEY_ARN = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab";

/** A fresh KMS-looking request id (`req-` and 12 hex digits). */
export const newRequestId = () => `req-${randomBytes(6).toString("hex")}`;

/** requestMetadata as KMS sends it for `kmsOperation` (principal Alice, via EBS); `over` replaces or adds fields. */
export function requestMetadata(kmsOperation: string, over: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    awsPrincipalArn: PRINCIPAL,
    kmsKeyArn: KMS_KEY_ARN,
    kmsOperation,
    kmsRequestId: newRequestId(),
    kmsViaService: "ebs",
    ...over,
  };
}

/** requestMetadata of a KMS health check (GetHealthStatus carries only these two). */
export function healthMetadata(over: Record<string, unknown> = {}): Record<string, unknown> {
  return { kmsRequestId: newRequestId(), kmsOperation: "KmsHealthCheck", ...over };
}

/** The proto RequestMetadata the proxy sends the agent for the same request, arriving on key store `keyStore`. */
export function agentMetadata(kmsOperation: string, over: Partial<RequestMetadata> = {}, keyStore = PREFIX): RequestMetadata {
  return { awsSourceVpc: "", awsSourceVpce: "", keyStore, ...requestMetadata(kmsOperation), ...over } as RequestMetadata;
}
