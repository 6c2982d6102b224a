import { startTestAgent } from "./testbed/in-process.ts";
import { agentClient } from "./testbed/grpc-client.ts";
process.env.GRPC_TRACE = "server,subchannel,transport";
const t = await startTestAgent();
const c = agentClient(t.target, t.token);
try {
  console.log(await c.call("GetHealthStatus", {}));
} catch (e) {
  console.log("ERR", e);
}
await t.destroy();
process.exit(0);
