/**
 * A gRPC client of the agent for tests and the bench: promisified calls with
 * the proxy's token (or another, or none), the failure reason read from the
 * `xks-reason` trailer.
 */
import * as grpc from "@grpc/grpc-js";
import { AGENT_TOKEN_METADATA_KEY, REASON_METADATA_KEY } from "../shared/errors.ts";
import { agentChannelCredentials } from "../proxy/agent-client.ts";
import { XksAgentClient } from "../shared/proto.ts";
import { type Identity, pinOf, TEST_IDENTITIES } from "./identities.ts";
import { GENEROUS_MS } from "./wait.ts";

export interface CallError {
  code: grpc.status;
  reason: string | undefined;
  details: string;
}

export interface CallOptions {
  /** The token to present: default the client's, `null` for none. */
  token?: string | null;
  deadlineMs?: number;
}

export type AgentMethodName = "GetHealthStatus" | "GetKeyMetadata" | "Encrypt" | "Decrypt";

type UnaryByName = (
  req: object,
  md: grpc.Metadata,
  opts: grpc.CallOptions,
  cb: (err: grpc.ServiceError | null, res?: unknown) => void,
) => grpc.ClientUnaryCall;

export interface AgentTestClient {
  call(method: AgentMethodName, req: Record<string, unknown>, opts?: CallOptions): Promise<any>;
  client: grpc.Client;
  close(): void;
}

/**
 * A client of the agent at `target` (e.g. `unix:///path/agent.sock`) presenting `token`, over the
 * channel's mutual TLS as the proxy makes it: presenting `identity` (default TEST_IDENTITIES.proxy)
 * and accepting only `agentIdentities` (default [TEST_IDENTITIES.agent]). Rejections are {@link CallError}s.
 * With `ownConnection`, the client opens a connection of its own (the agent's workers each serve whole connections).
 */
export function agentClient(
  target: string,
  token: string,
  ids: { identity?: Identity; agentIdentities?: Identity[] } = {},
  channel: { ownConnection?: boolean } = {},
): AgentTestClient {
  const creds = agentChannelCredentials(ids.identity ?? TEST_IDENTITIES.proxy, (ids.agentIdentities ?? [TEST_IDENTITIES.agent]).map(pinOf));
  // grpc-js shares one connection between clients of the same target and options unless each has its own pool.
  const client = new XksAgentClient(target, creds, channel.ownConnection ? { "grpc.use_local_subchannel_pool": 1 } : {});
  const call: AgentTestClient["call"] = (method, req, opts = {}) =>
    new Promise((resolve, reject) => {
      const md = new grpc.Metadata();
      const tok = opts.token === undefined ? token : opts.token;
      if (tok !== null) md.set(AGENT_TOKEN_METADATA_KEY, tok);
      // Tests send partial and malformed requests on purpose: the request is not typed per method.
      const fn = client[method].bind(client) as unknown as UnaryByName;
      fn(req, md, { deadline: Date.now() + (opts.deadlineMs ?? GENEROUS_MS) }, (err: grpc.ServiceError | null, res: unknown) => {
        if (err) {
          const reason = err.metadata?.get(REASON_METADATA_KEY)[0];
          reject({ code: err.code, reason: typeof reason === "string" ? reason : undefined, details: err.details } satisfies CallError);
        } else resolve(res);
      });
    });
  return { call, client, close: () => client.close() };
}
