/** A plain gRPC client for the agent, for tests: promisified calls, reason read from trailers. */
import * as grpc from "@grpc/grpc-js";
import { AGENT_TOKEN_METADATA_KEY, REASON_METADATA_KEY } from "../../shared/errors.ts";
import { XksAgentClient } from "../../shared/proto.ts";

export interface CallError {
  code: grpc.status;
  reason: string | undefined;
  details: string;
}

export type Call = (method: string, req: Record<string, unknown>, opts?: { token?: string | null; deadlineMs?: number }) => Promise<any>;

export function agentClient(target: string, token: string): { call: Call; close(): void; client: grpc.Client } {
  const client = new XksAgentClient(target, grpc.credentials.createInsecure());
  const call: Call = (method, req, opts = {}) =>
    new Promise((resolve, reject) => {
      const md = new grpc.Metadata();
      const tok = opts.token === undefined ? token : opts.token;
      if (tok !== null) md.set(AGENT_TOKEN_METADATA_KEY, tok);
      const fn = (client as unknown as Record<string, Function>)[method].bind(client);
      fn(req, md, { deadline: Date.now() + (opts.deadlineMs ?? 5000) }, (err: grpc.ServiceError | null, res: unknown) => {
        if (err) {
          const reason = err.metadata?.get(REASON_METADATA_KEY)[0];
          reject({ code: err.code, reason: typeof reason === "string" ? reason : undefined, details: err.details } satisfies CallError);
        } else resolve(res);
      });
    });
  return { call, close: () => client.close(), client };
}

export const sampleMetadata = (op: string) => ({
  awsPrincipalArn: "arn:aws:iam::123456789012:user/Alice",
  kmsKeyArn: "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab",
  kmsOperation: op,
  kmsRequestId: `req-${Math.random().toString(16).slice(2)}`,
  kmsViaService: "ebs",
  keyStore: "/test",
});
