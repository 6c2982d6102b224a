import { randomBytes } from "node:crypto";
import { AgentError, errorMessage } from "../../shared/errors.ts";
import type { GetHealthStatusResponse, KeyCheck } from "../../shared/proto.ts";
import { VERSION } from "../../shared/version.ts";
import { decrypt } from "./decrypt.ts";
import { encrypt } from "./encrypt.ts";
import type { TokenInfo } from "../hsm/hsm.ts";
import { keyChecks } from "../hsm/key-check.ts";
import type { AgentOpContext } from "./context.ts";

const NO_METADATA = null;

/**
 * Deep health (spec §1.7): a real encrypt + decrypt on the dedicated health
 * key, so ACTIVE means an immediately following crypto call would work.
 * A token that answers but whose health key is unusable is DEGRADED; an HSM
 * that cannot be reached is UNAVAILABLE.
 */
export function getHealthStatus(ctx: AgentOpContext): GetHealthStatusResponse {
  const audit = ctx.audit?.();
  const auditHead = audit
    ? { records: audit.head?.records ?? 0, hash: audit.head?.hash ?? "", mac: audit.head?.mac ?? "", problem: audit.problem ?? "" }
    : null;
  const base = {
    agentId: ctx.agentId,
    agentVersion: VERSION,
    paused: false,
    tunnels: ctx.tunnels(),
    auditHead,
    keyChecks: [] as KeyCheck[],
  };
  let token: TokenInfo;
  try {
    token = ctx.hsm.tokenInfo();
  } catch (err) {
    return { ...base, state: "UNAVAILABLE", tokenManufacturer: "", tokenModel: "", tokenSerial: "", tokenLabel: "", detail: short(err) };
  }
  // The check value of every key KMS may use (made once per key as read from the token, then cached),
  // for the proxy to compare between agents.
  base.keyChecks = keyChecks(ctx.hsm, servedLabels(ctx));
  const tokenFields = {
    tokenManufacturer: token.manufacturer,
    tokenModel: token.model,
    tokenSerial: token.serial,
    tokenLabel: token.label,
  };
  try {
    const probe = randomBytes(32);
    const aad = Buffer.from("xks-agent health check");
    const enc = encrypt(
      ctx,
      { metadata: NO_METADATA, keyId: ctx.healthKey, plaintext: probe, aad, wantIntegrityValue: false },
      "health-check",
    );
    const dec = decrypt(
      ctx,
      {
        metadata: NO_METADATA,
        keyId: ctx.healthKey,
        ciphertext: enc.ciphertext,
        iv: enc.iv,
        tag: enc.tag,
        aad,
        ciphertextMetadata: enc.ciphertextMetadata,
      },
      "health-check",
    );
    if (!dec.plaintext.equals(probe)) return { ...base, ...tokenFields, state: "DEGRADED", detail: "health round trip mismatch" };
    // Key operations are refused while their audit records cannot be written.
    if (audit?.refusing) return { ...base, ...tokenFields, state: "UNAVAILABLE", detail: (audit.problem ?? "").slice(0, 200) };
    return { ...base, ...tokenFields, state: "ACTIVE", detail: "" };
  } catch (err) {
    const unavailable = err instanceof AgentError && err.reason === "HSM_UNAVAILABLE";
    return { ...base, ...tokenFields, state: unavailable ? "UNAVAILABLE" : "DEGRADED", detail: short(err) };
  }
}

/** Every label allow-listed for some key store, once each, in config order. */
function servedLabels(ctx: AgentOpContext): Set<string> {
  const out = new Set<string>();
  for (const keys of ctx.keyStores.values()) for (const k of keys) out.add(k);
  return out;
}

function short(err: unknown): string {
  return errorMessage(err)
    .replace(/[^\x20-\x7e]/g, "?")
    .slice(0, 200);
}
