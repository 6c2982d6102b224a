/**
 * The load generator, in its own process so that it never shares an event
 * loop with the bench's bookkeeping and its CPU can be read on its own.
 * Driven over IPC (protocol.ts) by loadgen/generator.ts.
 */
import { grpcDirect } from "./grpc-direct.ts";
import { HttpClient } from "./http.ts";
import { burst, kmsLoad } from "./kms.ts";
import type { ChildMessage, ParentMessage, Target } from "./protocol.ts";
import { XksRequests } from "./requests.ts";
import { openLoop, sequential } from "./runners.ts";

let target: Target | undefined;
let http: HttpClient | undefined;
let reqs: XksRequests | undefined;

const send = (m: ChildMessage) => process.send!(m);

async function handle(m: ParentMessage): Promise<unknown> {
  if (m.type === "init") {
    http?.close();
    target = m.target;
    http = new HttpClient(target.url, target.sockets);
    reqs = new XksRequests(target);
    return undefined;
  }
  const started = () => send({ id: m.id, type: "started" });
  if (m.type === "kms") {
    if (!target || !reqs) throw new Error("not initialised");
    return m.spec.kind === "kms" ? kmsLoad(m.spec, reqs, target.url, started) : burst(m.spec, reqs, target.url, started);
  }
  const spec = m.spec;
  if (spec.kind === "grpc") return grpcDirect(spec, started);
  if (!http || !reqs) throw new Error("not initialised");
  return spec.kind === "openLoop" ? openLoop(spec, reqs, http, started) : sequential(spec, reqs, http, started);
}

process.on("message", (m: ParentMessage) => {
  handle(m).then(
    (result) => send({ id: m.id, type: "done", result }),
    (err: Error) => send({ id: m.id, type: "failed", message: err.stack ?? err.message }),
  );
});
// The parent going away closes the IPC channel: leave with it.
process.on("disconnect", () => process.exit(0));
