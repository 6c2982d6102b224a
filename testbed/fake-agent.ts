/**
 * A FAKE agent for the proxy's tests: a real grpc-js server (same proto, same
 * token and `xks-reason` trailer conventions as the real agent) with an
 * in-memory AES-256-GCM key, steered by the key id so that every failure can
 * be provoked, which a real HSM cannot do on demand:
 *   - "reason-<REASON>" fails with that agent reason;
 *   - "status-internal" fails with a bare INTERNAL status (no reason);
 *   - "never" never answers (the proxy's deadline is then certain to pass);
 *   - "delay-<ms>" answers correctly after that many milliseconds;
 *   - "bad-answer" returns a malformed result.
 * `health.never = true` makes GetHealthStatus never answer either. It serves
 * mutual TLS like the real agent, with TEST_IDENTITIES.agent (or `identity`)
 * and accepting TEST_IDENTITIES.proxy. The real
 * agent on SoftHSM is what the integration and e2e tests use otherwise.
 */
import { createCipheriv, createDecipheriv, createHash, randomBytes } from "node:crypto";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import * as grpc from "@grpc/grpc-js";
import { AGENT_TOKEN_METADATA_KEY, isReason, REASON_METADATA_KEY, REASONS } from "../shared/errors.ts";
import {
  type DecryptRequest,
  type EncryptRequest,
  type GetHealthStatusResponse,
  type GetKeyMetadataRequest,
  type HealthState,
  type KeyCheck,
  XksAgentService,
} from "../shared/proto.ts";
import { type Identity, TEST_IDENTITIES } from "./identities.ts";

export interface FakeAgent {
  target: string;
  socketPath: string;
  token: string;
  /** Calls received per method (after the token check). */
  calls: Record<string, number>;
  /** Requests received (the proto messages), newest last; empty when started with `record: false`. */
  requests: Array<{ method: string; req: unknown }>;
  /** What GetHealthStatus answers; `keyChecks` are the key check values it reports (none by default). */
  health: { state: HealthState; agentId: string; never: boolean; keyChecks: KeyCheck[] };
  stop(): Promise<void>;
}

function hsmAad(aad: Buffer, cm: Buffer): Buffer {
  const a = Buffer.alloc(2);
  a.writeUInt16BE(aad.length);
  return Buffer.concat([a, aad, Buffer.from([cm.length]), cm]);
}

export interface FakeAgentOptions {
  dir?: string;
  token?: string;
  name?: string;
  identity?: Identity;
  /** Keep every request in `requests` (default true; a load test turns it off, or memory grows with every call). */
  record?: boolean;
}

export async function startFakeAgent(opts: FakeAgentOptions = {}): Promise<FakeAgent> {
  const dir = opts.dir ?? mkdtempSync(join(tmpdir(), "xks-fake-agent-"));
  const socketPath = join(dir, `${opts.name ?? "fake"}.sock`);
  const token = opts.token ?? randomBytes(24).toString("base64url");
  const key = randomBytes(32);
  const cm = Buffer.from("v1");
  const calls: Record<string, number> = {};
  const requests: FakeAgent["requests"] = [];
  const health: FakeAgent["health"] = { state: "ACTIVE", agentId: `fake-${opts.name ?? "agent"}`, never: false, keyChecks: [] };

  function wrap<Req extends { keyId?: string }>(method: string, run: (req: Req) => unknown): grpc.handleUnaryCall<Req, unknown> {
    return (call, cb) => {
      if (call.metadata.get(AGENT_TOKEN_METADATA_KEY)[0] !== token) {
        cb({ code: grpc.status.UNAUTHENTICATED, details: "missing or wrong agent token" });
        return;
      }
      calls[method] = (calls[method] ?? 0) + 1;
      if (opts.record !== false) requests.push({ method, req: call.request });
      const keyId = call.request.keyId ?? "";
      if (keyId === "never" || (method === "GetHealthStatus" && health.never)) return; // the callback is never called
      const delay = /^delay-(\d+)$/.exec(keyId);
      if (delay) {
        setTimeout(() => {
          try {
            cb(null, run(call.request));
          } catch (err) {
            cb({ code: grpc.status.INTERNAL, details: (err as Error).message });
          }
        }, Number(delay[1]));
        return;
      }
      const m = /^reason-([A-Z_]+)$/.exec(keyId);
      if (m && isReason(m[1])) {
        const md = new grpc.Metadata();
        md.set(REASON_METADATA_KEY, m[1]);
        cb({ code: REASONS[m[1]].grpc, details: m[1], metadata: md });
        return;
      }
      if (keyId === "status-internal") {
        cb({ code: grpc.status.INTERNAL, details: "boom /secret/path" });
        return;
      }
      try {
        cb(null, run(call.request));
      } catch (err) {
        const md = new grpc.Metadata();
        md.set(REASON_METADATA_KEY, "INVALID_CIPHERTEXT");
        cb({ code: grpc.status.INVALID_ARGUMENT, details: (err as Error).message, metadata: md });
      }
    };
  }

  const server = new grpc.Server();
  server.addService(XksAgentService, {
    GetHealthStatus: wrap(
      "GetHealthStatus",
      (): GetHealthStatusResponse => ({
        agentId: health.agentId,
        state: health.state,
        tokenManufacturer: "FakeHSM Inc.",
        tokenModel: "FakeHSM 1",
        tokenSerial: "0001",
        tokenLabel: "fake",
        detail: "",
        agentVersion: "0.0.0",
        paused: false,
        tunnels: [],
        auditHead: null,
        keyChecks: health.keyChecks,
      }),
    ),
    GetKeyMetadata: wrap("GetKeyMetadata", (req: GetKeyMetadataRequest) =>
      req.keyId === "bad-answer"
        ? { keySpec: "AES_256", keyUsage: ["ENCRYPT"], keyStatus: "MAYBE" }
        : { keySpec: "AES_256", keyUsage: ["ENCRYPT", "DECRYPT"], keyStatus: "ENABLED" },
    ),
    Encrypt: wrap("Encrypt", (req: EncryptRequest) => {
      const iv = randomBytes(12);
      const c = createCipheriv("aes-256-gcm", key, iv);
      c.setAAD(hsmAad(req.aad, cm));
      const ct = Buffer.concat([c.update(req.plaintext), c.final()]);
      const tag = c.getAuthTag();
      if (req.keyId === "bad-answer") return { ciphertext: ct, iv, tag: tag.subarray(0, 8), ciphertextMetadata: cm };
      const integrityValue = req.wantIntegrityValue
        ? createHash("sha256")
            .update(Buffer.concat([req.aad, cm, iv, ct, tag]))
            .digest()
        : Buffer.alloc(0);
      return { ciphertext: ct, iv, tag, ciphertextMetadata: cm, integrityValue };
    }),
    Decrypt: wrap("Decrypt", (req: DecryptRequest) => {
      const d = createDecipheriv("aes-256-gcm", key, req.iv);
      d.setAAD(hsmAad(req.aad, req.ciphertextMetadata));
      d.setAuthTag(req.tag);
      return { plaintext: Buffer.concat([d.update(req.ciphertext), d.final()]) };
    }),
  });
  await new Promise<void>((resolve, reject) =>
    server.bindAsync(`unix://${socketPath}`, fakeAgentCredentials(opts.identity ?? TEST_IDENTITIES.agent), (err) =>
      err ? reject(err) : resolve(),
    ),
  );
  return {
    target: `unix://${socketPath}`,
    socketPath,
    token,
    calls,
    requests,
    health,
    // Calls that were never answered would hold a graceful shutdown forever: cut them.
    stop: () =>
      new Promise<void>((resolve) => {
        server.tryShutdown(() => resolve());
        setTimeout(() => server.forceShutdown(), 200).unref();
      }),
  };
}

/** The agent side of the channel's mutual TLS: `identity`, accepting only TEST_IDENTITIES.proxy. */
export function fakeAgentCredentials(identity: Identity): grpc.ServerCredentials {
  return grpc.ServerCredentials.createSsl(
    Buffer.from(TEST_IDENTITIES.proxy.certificate),
    [{ private_key: Buffer.from(identity.key), cert_chain: Buffer.from(identity.certificate) }],
    true,
  );
}
