/**
 * Fixtures for the proxy's port-level tests:
 *  - a FAKE agent: a real grpc-js server (same proto, same token and
 *    `xks-reason` trailer conventions as the real agent) with an in-memory
 *    AES-256-GCM key, whose behaviour is steered by the key id
 *    ("reason-<REASON>" fails with that reason, "slow" answers after 1 s,
 *    "bad-answer" returns a malformed result). Used where a failure cannot be
 *    provoked on a real HSM; the real agent is exercised in proxy-agent.test.ts;
 *  - a config writer (secrets in files, as in production) and a proxy starter
 *    that listens on 127.0.0.1:0 and captures the proxy's log lines.
 */
import { createCipheriv, createDecipheriv, createHash, randomBytes } from "node:crypto";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import * as grpc from "@grpc/grpc-js";
import { AGENT_TOKEN_METADATA_KEY, REASON_METADATA_KEY, REASONS, isReason } from "../../shared/errors.ts";
import { LogCapture } from "./logs.ts";
import { createLogger } from "../../shared/logging.ts";
import {
  XksAgentService,
  type DecryptRequest,
  type EncryptRequest,
  type GetHealthStatusResponse,
  type GetKeyMetadataRequest,
  type HealthState,
} from "../../shared/proto.ts";
import { loadProxyConfig, type ProxyConfig } from "../../proxy/config.ts";
import { serve, type RunningProxy } from "../../proxy/main.ts";
import type { Creds } from "./sigv4.ts";


export interface FakeAgent {
  target: string;
  socketPath: string;
  token: string;
  /** Calls received per method (after the token check). */
  calls: Record<string, number>;
  /** Requests received (the proto messages), newest last. */
  requests: Array<{ method: string; req: unknown }>;
  health: { state: HealthState; agentId: string };
  stop(): Promise<void>;
}

/** hsmAAD = u16be(len AAD) || AAD || u8(len CM) || CM (architecture.md). */
function hsmAad(aad: Buffer, cm: Buffer): Buffer {
  const a = Buffer.alloc(2);
  a.writeUInt16BE(aad.length);
  return Buffer.concat([a, aad, Buffer.from([cm.length]), cm]);
}

export async function startFakeAgent(opts: { dir?: string; token?: string; name?: string } = {}): Promise<FakeAgent> {
  const dir = opts.dir ?? mkdtempSync(join(tmpdir(), "xks-fake-agent-"));
  const socketPath = join(dir, `${opts.name ?? "fake"}.sock`);
  const token = opts.token ?? randomBytes(24).toString("base64url");
  const key = randomBytes(32);
  const cm = Buffer.from("v1");
  const calls: Record<string, number> = {};
  const requests: FakeAgent["requests"] = [];
  const health = { state: "ACTIVE" as HealthState, agentId: `fake-${opts.name ?? "agent"}` };

  function wrap<Req extends { keyId?: string }>(method: string, run: (req: Req) => unknown): grpc.handleUnaryCall<Req, unknown> {
    return (call, cb) => {
      if (call.metadata.get(AGENT_TOKEN_METADATA_KEY)[0] !== token) {
        cb({ code: grpc.status.UNAUTHENTICATED, details: "missing or wrong agent token" });
        return;
      }
      calls[method] = (calls[method] ?? 0) + 1;
      requests.push({ method, req: call.request });
      const keyId = call.request.keyId ?? "";
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
      if (keyId === "slow") {
        setTimeout(() => cb(null, run(call.request)), 1000);
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
    GetHealthStatus: wrap("GetHealthStatus", (): GetHealthStatusResponse => ({
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
    })),
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
        ? createHash("sha256").update(Buffer.concat([req.aad, cm, iv, ct, tag])).digest()
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
    server.bindAsync(`unix://${socketPath}`, grpc.ServerCredentials.createInsecure(), (err) => (err ? reject(err) : resolve())),
  );
  return {
    target: `unix://${socketPath}`,
    socketPath,
    token,
    calls,
    requests,
    health,
    stop: () =>
      new Promise<void>((resolve) => {
        server.tryShutdown(() => resolve());
        setTimeout(() => server.forceShutdown(), 200).unref();
      }),
  };
}

/** Two credentials for the main store (rotation), one for the second store. */
export const CREDS = {
  a: { accessKeyId: "AAAAAAAAAAAAAAAAAAAAAAAAAA", secretAccessKey: "c2VjcmV0LWEtc2VjcmV0LWEtc2VjcmV0LWEtc2VjcmV0LWE=" },
  b: { accessKeyId: "BBBBBBBBBBBBBBBBBBBBBBBB22", secretAccessKey: "c2VjcmV0LWItc2VjcmV0LWItc2VjcmV0LWItc2VjcmV0LWI=" },
  other: { accessKeyId: "CCCCCCCCCCCCCCCCCCCCCCCC77", secretAccessKey: "c2VjcmV0LWMtc2VjcmV0LWMtc2VjcmV0LWMtc2VjcmV0LWM=" },
} satisfies Record<string, Creds>;

export const PREFIX = "/example/uri/path/prefix";
export const OTHER_PREFIX = "/tenant-two/xks";

export interface ProxyFixtureOptions {
  agents: Array<{ id: string; target: string; token: string }>;
  keys?: string[];
  extra?: Record<string, unknown>;
}

/** Writes secrets to files and a config that references them; returns the config file. */
export function writeProxyConfig(dir: string, o: ProxyFixtureOptions): string {
  const secret = (name: string, value: string) => {
    writeFileSync(join(dir, name), `${value}\n`, { mode: 0o600 });
    return { file: name };
  };
  const cfg = {
    listen: { host: "127.0.0.1", port: 0 },
    region: "us-east-1",
    vendor: "xks-pair tests",
    agents: o.agents.map((a, i) => ({ id: a.id, target: a.target, token: secret(`agent-token-${i}`, a.token) })),
    agentDeadlineMs: 200,
    healthRefreshMs: 300,
    healthDeadlineMs: 500,
    keyStores: [
      {
        uriPathPrefix: PREFIX,
        credentials: [
          { accessKeyId: CREDS.a.accessKeyId, secretAccessKey: secret("a.secret", CREDS.a.secretAccessKey) },
          { accessKeyId: CREDS.b.accessKeyId, secretAccessKey: secret("b.secret", CREDS.b.secretAccessKey) },
        ],
        keys: o.keys ?? ["foo"],
      },
      {
        uriPathPrefix: OTHER_PREFIX,
        credentials: [{ accessKeyId: CREDS.other.accessKeyId, secretAccessKey: secret("c.secret", CREDS.other.secretAccessKey) }],
        keys: ["foo"],
      },
    ],
    log: { level: "debug" },
    ...o.extra,
  };
  const file = join(dir, "proxy.json");
  writeFileSync(file, JSON.stringify(cfg, null, 2));
  return file;
}

export interface ProxyFixture {
  dir: string;
  config: Readonly<ProxyConfig>;
  proxy: RunningProxy;
  url: string;
  logs: LogCapture;
  close(): Promise<void>;
}

export async function startProxy(o: ProxyFixtureOptions & { dir?: string }): Promise<ProxyFixture> {
  const dir = o.dir ?? mkdtempSync(join(tmpdir(), "xks-proxy-"));
  const config = loadProxyConfig(writeProxyConfig(dir, o), {});
  const logs = new LogCapture();
  const log = createLogger({ level: "debug", name: "xks-proxy" }, logs);
  const proxy = await serve(config, log);
  return {
    dir,
    config,
    proxy,
    url: proxy.url,
    logs,
    close: async () => {
      await proxy.close(500);
      if (!o.dir) rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** Polls until `fn` returns true or `ms` passes. */
export async function until(fn: () => boolean | Promise<boolean>, ms = 3000, stepMs = 25): Promise<boolean> {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (await fn()) return true;
    await new Promise((r) => setTimeout(r, stepMs));
  }
  return fn();
}

/** requestMetadata as KMS sends it. */
export function md(kmsOperation: string, extra: Record<string, string> = {}): Record<string, string> {
  return {
    awsPrincipalArn: "arn:aws:iam::123456789012:user/Alice",
    kmsKeyArn: "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab",
    kmsOperation,
    kmsRequestId: `req-${randomBytes(6).toString("hex")}`,
    kmsViaService: "ebs",
    ...extra,
  };
}

export { LogCapture };
