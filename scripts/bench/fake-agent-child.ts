/**
 * The test-bed's fake agent (testbed/fake-agent.ts) in a process of its own,
 * for the bench's proxy-only mode: it answers at once (Encrypt with a real
 * AES-256-GCM key in memory, a few microseconds), records no requests, and
 * its CPU is read apart from the proxy's. Started by proxy-only.ts with the
 * folder for its socket as the argument; sends `{ target, token, identities }`
 * over IPC once it listens (the channel identities are made per process: the
 * proxy's config must present and pin this process's) and leaves when the IPC
 * channel closes.
 */
import { startFakeAgent } from "../../testbed/fake-agent.ts";
import { TEST_IDENTITIES } from "../../testbed/identities.ts";

const dir = process.argv[2];
if (!dir) throw new Error("usage: fake-agent-child.ts <dir>");
const agent = await startFakeAgent({ dir, name: "fake-agent", record: false });
process.send!({ target: agent.target, token: agent.token, identities: TEST_IDENTITIES });
process.on("disconnect", () => {
  void agent.stop().finally(() => process.exit(0));
});
