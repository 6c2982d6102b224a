/**
 * GetHealthStatus: POST [/<prefix>]/kms/xks/v1/health (XKS Proxy API spec §1.7).
 *
 * Answers from the agent pool's health cache (refreshed in the background,
 * never older than 60 s), so it returns within milliseconds even while every
 * agent is down. Not subject to secondary authorization; SigV4 still applies.
 */
import { VERSION } from "../../shared/version.ts";
import type { AgentHealth } from "../agent-client.ts";
import type { Limits } from "../config.ts";
import { parseRequestMetadata, type Json, type WireRequestMetadata } from "../validate.ts";
import type { HandlerContext } from "./context.ts";

/** Defined per XKS Proxy API spec §1.7 (request body). */
export interface GetHealthStatusWireRequest {
  requestMetadata: Pick<WireRequestMetadata, "kmsRequestId" | "kmsOperation">;
}

/** Defined per XKS Proxy API spec §1.7 (one ekmFleetDetails entry). */
export interface EkmFleetDetail {
  id: string;
  model: string;
  healthStatus: "ACTIVE" | "DEGRADED" | "UNAVAILABLE";
}

/** Defined per XKS Proxy API spec §1.7 (response body; all fields required). */
export interface GetHealthStatusWireResponse {
  xksProxyFleetSize: number;
  xksProxyVendor: string;
  xksProxyModel: string;
  ekmVendor: string;
  ekmFleetDetails: EkmFleetDetail[];
}

export interface GetHealthStatusInput {
  metadata: WireRequestMetadata;
}

export const PROXY_MODEL = `xks-proxy ${VERSION}`;

export function parseGetHealthStatusRequest(body: Json, _limits: Limits): GetHealthStatusInput {
  return { metadata: parseRequestMetadata(body, "GetHealthStatus") };
}

function modelOf(h: AgentHealth): string {
  const r = h.report;
  if (!r || (!r.tokenModel && !r.tokenSerial)) return "unknown";
  const model = r.tokenModel ? r.tokenModel.trim() : "token";
  const extras = [r.tokenSerial ? `serial ${r.tokenSerial.trim()}` : "", r.agentVersion ? `agent ${r.agentVersion}` : ""].filter(Boolean);
  return extras.length ? `${model} (${extras.join(", ")})` : model;
}

/** Builds the response from the cache; never waits for an agent. */
export function buildHealthResponse(
  health: AgentHealth[],
  ctx: Pick<HandlerContext, "fleetSize" | "vendor" | "ekmVendor">,
): GetHealthStatusWireResponse {
  const seen = new Set<string>();
  const ekmFleetDetails = health.map((h) => {
    let id = h.report?.agentId || h.id;
    if (seen.has(id)) id = h.id;
    if (seen.has(id)) id = `${h.id}#${seen.size}`;
    seen.add(id);
    return { id, model: modelOf(h), healthStatus: h.state };
  });
  const vendorFrom =
    health.find((h) => h.state !== "UNAVAILABLE" && h.report?.tokenManufacturer) ?? health.find((h) => h.report?.tokenManufacturer);
  return {
    xksProxyFleetSize: ctx.fleetSize,
    xksProxyVendor: ctx.vendor,
    xksProxyModel: PROXY_MODEL,
    ekmVendor: vendorFrom?.report?.tokenManufacturer.trim() || ctx.ekmVendor,
    ekmFleetDetails,
  };
}

export async function getHealthStatus(_input: GetHealthStatusInput, ctx: HandlerContext): Promise<GetHealthStatusWireResponse> {
  return buildHealthResponse(ctx.agents.healthSnapshot(), ctx);
}
