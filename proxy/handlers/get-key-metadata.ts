/**
 * GetKeyMetadata: POST [/<prefix>]/kms/xks/v1/keys/<externalKeyId>/metadata
 * (XKS Proxy API spec §1.4).
 */
import { XksError } from "../../shared/errors.ts";
import type { Limits } from "../config.ts";
import { parseRequestMetadata, type Json, type WireRequestMetadata } from "../validate.ts";
import { toProtoMetadata, type HandlerContext } from "./context.ts";

/** Defined per XKS Proxy API spec §1.4 (request body). */
export interface GetKeyMetadataWireRequest {
  requestMetadata: WireRequestMetadata;
}

/** Defined per XKS Proxy API spec §1.4 (response body; all fields required). */
export interface GetKeyMetadataWireResponse {
  keySpec: string;
  keyUsage: string[];
  keyStatus: string;
}

export interface GetKeyMetadataInput {
  metadata: WireRequestMetadata;
}

export function parseGetKeyMetadataRequest(body: Json, _limits: Limits): GetKeyMetadataInput {
  return { metadata: parseRequestMetadata(body, "GetKeyMetadata") };
}

export async function getKeyMetadata(input: GetKeyMetadataInput, ctx: HandlerContext): Promise<GetKeyMetadataWireResponse> {
  const { response, agentId } = await ctx.agents.call("GetKeyMetadata", {
    metadata: toProtoMetadata(input.metadata, ctx.keyStore),
    keyId: ctx.keyId,
  });
  ctx.served(agentId);
  const keyUsage = [...(response.keyUsage ?? [])];
  if (!response.keySpec || keyUsage.length > 10 || (response.keyStatus !== "ENABLED" && response.keyStatus !== "DISABLED")) {
    throw new XksError("InternalException", `agent ${agentId}: malformed GetKeyMetadata answer`);
  }
  return { keySpec: response.keySpec, keyUsage, keyStatus: response.keyStatus };
}
