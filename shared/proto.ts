/** Loads the agent's gRPC contract (proto/xks/agent/v1/agent.proto) for both daemons. */
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import { join } from "node:path";
import { PACKAGE_ROOT } from "./paths.ts";

export const PROTO_ROOT = join(PACKAGE_ROOT, "proto");
export const PROTO_FILE = "xks/agent/v1/agent.proto";

const definition = protoLoader.loadSync(PROTO_FILE, {
  includeDirs: [PROTO_ROOT],
  keepCase: false,
  longs: Number,
  enums: String,
  defaults: true,
  oneofs: true,
});

type GrpcPackage = { xks: { agent: { v1: { XksAgent: grpc.ServiceClientConstructor } } } };
const pkg = grpc.loadPackageDefinition(definition) as unknown as GrpcPackage;

export const XksAgentClient = pkg.xks.agent.v1.XksAgent;
export const XksAgentService = XksAgentClient.service;

/** Wire shapes (proto-loader with keepCase:false, defaults:true, bytes as Buffer, enums as strings). */
export interface RequestMetadata {
  awsPrincipalArn: string;
  kmsKeyArn: string;
  kmsOperation: string;
  kmsRequestId: string;
  kmsViaService: string;
  awsSourceVpc: string;
  awsSourceVpce: string;
  keyStore: string;
}
export interface GetKeyMetadataRequest { metadata: RequestMetadata | null; keyId: string }
export interface GetKeyMetadataResponse { keySpec: string; keyUsage: string[]; keyStatus: string }
export interface EncryptRequest {
  metadata: RequestMetadata | null;
  keyId: string;
  plaintext: Buffer;
  aad: Buffer;
  wantIntegrityValue: boolean;
}
export interface EncryptResponse {
  ciphertext: Buffer;
  iv: Buffer;
  tag: Buffer;
  ciphertextMetadata: Buffer;
  integrityValue: Buffer;
}
export interface DecryptRequest {
  metadata: RequestMetadata | null;
  keyId: string;
  ciphertext: Buffer;
  iv: Buffer;
  tag: Buffer;
  aad: Buffer;
  ciphertextMetadata: Buffer;
}
export interface DecryptResponse { plaintext: Buffer }
export interface GetHealthStatusRequest { kmsRequestId: string; kmsOperation: string }
export type HealthState = "ACTIVE" | "DEGRADED" | "UNAVAILABLE";
export interface GetHealthStatusResponse {
  agentId: string;
  state: HealthState;
  tokenManufacturer: string;
  tokenModel: string;
  tokenSerial: string;
  tokenLabel: string;
  detail: string;
  agentVersion: string;
  paused: boolean;
  tunnels?: TunnelStatus[];
}
export interface TunnelStatus {
  name: string;
  state: string;
  since: string;
  lastError: string;
  connects: number;
  nodelayExec: boolean;
}
