import * as grpc from "@grpc/grpc-js";
import { X509Certificate } from "node:crypto";
import { generateIdentity, certificateFingerprint } from "./shared/identity.ts";
import { XksAgentService, XksAgentClient } from "./shared/proto.ts";
const agent = generateIdentity("xks-agent a"),
  proxy = generateIdentity("xks-proxy p"),
  rogue = generateIdentity("rogue");
console.log(
  new X509Certificate(agent.certificate).toString().slice(0, 200),
  agent.fingerprint === certificateFingerprint(agent.certificate),
);
async function serve(id, pinClient, path) {
  const s = new grpc.Server();
  s.addService(XksAgentService, {
    GetHealthStatus: (c, cb) => cb(null, { state: "ACTIVE" }),
    GetKeyMetadata() {},
    Encrypt() {},
    Decrypt() {},
  } as any);
  const creds = grpc.ServerCredentials.createSsl(
    Buffer.from(pinClient),
    [{ private_key: Buffer.from(id.key), cert_chain: Buffer.from(id.certificate) }],
    true,
  );
  await new Promise<void>((res, rej) => s.bindAsync(`unix://${path}`, creds, (e) => (e ? rej(e) : res())));
  return s;
}
function client(path, id, pinServer) {
  const creds = grpc.credentials.createSsl(Buffer.from(pinServer), Buffer.from(id.key), Buffer.from(id.certificate), {
    checkServerIdentity: (host, cert) => {
      console.log("checkServerIdentity", host, cert.fingerprint256?.slice(0, 10));
      return undefined;
    },
  });
  return new XksAgentClient(`unix://${path}`, creds, { "grpc.initial_reconnect_backoff_ms": 100 });
}
const call = (c) =>
  new Promise((res) =>
    c.GetHealthStatus({}, new grpc.Metadata(), { deadline: Date.now() + 2000 }, (e, r) => res(e ? `ERR ${e.code} ${e.details}` : r.state)),
  );
const s1 = await serve(agent, proxy.certificate, "/tmp/exp1.sock");
console.log("good:", await call(client("/tmp/exp1.sock", proxy, agent.certificate)));
console.log("client pins other:", await call(client("/tmp/exp1.sock", proxy, rogue.certificate)));
console.log("client not pinned by server:", await call(client("/tmp/exp1.sock", rogue, agent.certificate)));
const s2 = await serve(rogue, proxy.certificate, "/tmp/exp2.sock");
console.log("rogue server:", await call(client("/tmp/exp2.sock", proxy, agent.certificate)));
console.log("two pins:", await call(client("/tmp/exp1.sock", proxy, rogue.certificate + agent.certificate)));
process.exit(0);
