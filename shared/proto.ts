/**
 * Loads the agent's gRPC contract (proto/xks/agent/v1/agent.proto) for both
 * daemons, typed by the generated types in shared/generated/ (`npm run
 * gen:proto`; `npm run check:proto` fails when they are out of date).
 */
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import { join } from "node:path";
import { PACKAGE_ROOT } from "./paths.ts";
import type { ProtoGrpcType } from "./generated/agent.ts";
import type { DecryptRequest__Output } from "./generated/xks/agent/v1/DecryptRequest.ts";
import type { DecryptResponse__Output } from "./generated/xks/agent/v1/DecryptResponse.ts";
import type { EncryptRequest__Output } from "./generated/xks/agent/v1/EncryptRequest.ts";
import type { EncryptResponse__Output } from "./generated/xks/agent/v1/EncryptResponse.ts";
import type { ErrorReason__Output } from "./generated/xks/agent/v1/ErrorReason.ts";
import type { GetHealthStatusRequest__Output } from "./generated/xks/agent/v1/GetHealthStatusRequest.ts";
import type { GetHealthStatusResponse__Output } from "./generated/xks/agent/v1/GetHealthStatusResponse.ts";
import type { GetKeyMetadataRequest__Output } from "./generated/xks/agent/v1/GetKeyMetadataRequest.ts";
import type { GetKeyMetadataResponse__Output } from "./generated/xks/agent/v1/GetKeyMetadataResponse.ts";
import type { HealthState__Output } from "./generated/xks/agent/v1/HealthState.ts";
import type { KeyCheck__Output } from "./generated/xks/agent/v1/KeyCheck.ts";
import type { RequestMetadata__Output } from "./generated/xks/agent/v1/RequestMetadata.ts";
import type { TunnelStatus__Output } from "./generated/xks/agent/v1/TunnelStatus.ts";
import type { XksAgentClient as GeneratedXksAgentClient } from "./generated/xks/agent/v1/XksAgent.ts";

export type { XksAgentDefinition, XksAgentHandlers } from "./generated/xks/agent/v1/XksAgent.ts";

export const PROTO_ROOT = join(PACKAGE_ROOT, "proto");
export const PROTO_FILE = "xks/agent/v1/agent.proto";

/** The loader options the generated types assume (scripts/gen-proto.ts passes the same ones). */
export const LOADER_OPTIONS = {
  keepCase: false,
  longs: Number,
  enums: String,
  defaults: true,
  oneofs: true,
} as const satisfies protoLoader.Options;

const definition = protoLoader.loadSync(PROTO_FILE, { includeDirs: [PROTO_ROOT], ...LOADER_OPTIONS });

// loadPackageDefinition is untyped; ProtoGrpcType is its generated shape for this .proto.
const pkg = grpc.loadPackageDefinition(definition) as unknown as ProtoGrpcType;

/** The client constructor; its instances are `XksAgentClient`s. */
export const XksAgentClient = pkg.xks.agent.v1.XksAgent;
/** A client of the XksAgent service (generated: one typed method per RPC). */
export type XksAgentClient = GeneratedXksAgentClient;
export const XksAgentService = XksAgentClient.service;

/*
 * The messages, as both daemons build and read them: the generated `__Output`
 * forms, in which every field is present (proto-loader fills absent ones with
 * defaults:true), bytes are Buffers and enums are their names. A complete
 * message is also a valid argument wherever grpc-js takes the permissive input
 * form (optional fields, bytes as Buffer | Uint8Array | string).
 */
export type RequestMetadata = RequestMetadata__Output;
export type GetKeyMetadataRequest = GetKeyMetadataRequest__Output;
export type GetKeyMetadataResponse = GetKeyMetadataResponse__Output;
export type EncryptRequest = EncryptRequest__Output;
export type EncryptResponse = EncryptResponse__Output;
export type DecryptRequest = DecryptRequest__Output;
export type DecryptResponse = DecryptResponse__Output;
export type GetHealthStatusRequest = GetHealthStatusRequest__Output;
export type GetHealthStatusResponse = GetHealthStatusResponse__Output;
export type TunnelStatus = TunnelStatus__Output;
export type KeyCheck = KeyCheck__Output;
/** The states an agent reports (HealthState without its proto3 zero value). */
export type HealthState = Exclude<HealthState__Output, "HEALTH_STATE_UNSPECIFIED">;
/** The failure reasons an agent sends in `xks-reason` (ErrorReason without its proto3 zero value). */
export type ErrorReason = Exclude<ErrorReason__Output, "ERROR_REASON_UNSPECIFIED">;
