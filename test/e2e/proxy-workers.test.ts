/**
 * The proxy with two worker processes (`workers: 2`, proxy/cluster.ts): the
 * real bin/xks-proxy.js in front of the test-bed's fake agent (a real grpc-js
 * server over mutual TLS that counts its calls), requests signed by smithy's
 * SigV4 signer. Which worker answered a request is read from its log line
 * (every worker's lines carry `worker`), matched by a unique kmsRequestId or
 * key id. Asserted: one health refresher for all workers, one quota for the
 * whole proxy (and not a static split), one scrape with every worker's counts,
 * a SIGHUP reload applied by every worker, and a SIGKILLed worker replaced
 * while the other keeps answering.
 */
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { Agent } from "node:http";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { PACKAGE_ROOT } from "../../shared/paths.ts";
import { CREDS, OTHER_PREFIX, PREFIX, testKeyStores, writeProxyConfig } from "../../testbed/configs.ts";
import type { Creds } from "../../testbed/xks/sign.ts";
import { type FakeAgent, startFakeAgent } from "../../testbed/fake-agent.ts";
import { freePort } from "../../testbed/ports.ts";
import { Daemon } from "../../testbed/procs.ts";
import { sampleSum, scrape } from "../../testbed/prometheus.ts";
import { GENEROUS_MS, sleep, until } from "../../testbed/wait.ts";
import { encryptBody, healthBody } from "../../testbed/xks/bodies.ts";
import { type Resp, retryBusy, signedPost } from "../../testbed/xks/client.ts";

const BIN_PROXY = join(PACKAGE_ROOT, "bin/xks-proxy.js");
const REFRESH_MS = 200;
const QUOTA = { rate: 20, burst: 10 };
const API = `${PREFIX}/kms/xks/v1`;
const OTHER_API = `${OTHER_PREFIX}/kms/xks/v1`;

interface Line {
  msg?: string;
  worker?: number;
  pid?: number;
  status?: number;
  kmsRequestId?: string;
  key?: string;
  applied?: number;
  workers?: number;
}

describe("proxy workers (workers: 2)", () => {
  let dir: string;
  let agent: FakeAgent;
  let proxy: Daemon;
  let url: string;
  let metricsUrl: string;
  let writeConfig: (credentials: Creds[]) => string;

  const lines = (): Line[] =>
    proxy
      .logs()
      .split("\n")
      .filter((l) => l.startsWith("{"))
      .map((l) => JSON.parse(l) as Line);
  /** The worker that logged the request with this kmsRequestId (or key id), once its line is written. */
  const workerOf = async (match: (l: Line) => boolean, what: string): Promise<number> => {
    let w: number | undefined;
    await until(() => {
      w = lines().find((l) => l.msg === "request" && match(l))?.worker;
      return w !== undefined;
    }, `the log line of ${what}`);
    return w!;
  };
  /** A signed Encrypt on a connection of its own (so cluster hands it to the next worker). */
  const encrypt = (path: string, creds: Creds, id: string, o: { agent?: Agent | false } = {}) =>
    signedPost(url, `${path}/keys/foo/encrypt`, encryptBody("hello", { metadata: { kmsRequestId: id } }), creds, {
      agent: o.agent ?? false,
    });

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), "xks-proxy-workers-"));
    agent = await startFakeAgent({ dir });
    const port = await freePort();
    const mport = await freePort();
    url = `http://127.0.0.1:${port}`;
    metricsUrl = `http://127.0.0.1:${mport}/metrics`;
    mkdirSync(join(dir, "proxy"));
    writeConfig = (credentials) =>
      writeProxyConfig(join(dir, "proxy"), {
        workers: 2,
        port,
        agents: [{ id: "fake", target: agent.target, token: agent.token }],
        keyStores: [
          { prefix: PREFIX, credentials, keys: ["foo"] },
          { ...testKeyStores()[1], quota: QUOTA },
        ],
        extra: { healthRefreshMs: REFRESH_MS, metrics: { port: mport }, log: { level: "info" } },
      });
    const file = writeConfig([CREDS.a]);
    proxy = new Daemon("proxy", [BIN_PROXY, "serve", "--config", file], process.env, join(dir, "proxy.log"));
    proxy.start();
    await until(
      () => lines().some((l) => l.msg === "xks-proxy listening" && l.worker === undefined),
      "the primary to report both workers listening",
    );
    await until(async () => {
      const r = await signedPost(url, `${API}/health`, healthBody(), CREDS.a, { agent: false }).catch(() => undefined);
      return r?.status === 200 && r.json?.ekmFleetDetails?.[0]?.healthStatus === "ACTIVE";
    }, "a worker to report the agent ACTIVE");
  });

  after(async () => {
    await proxy?.stop("SIGTERM", 10_000);
    await agent?.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  it("starts two workers, each logging with its index", () => {
    const started = lines().filter((l) => l.msg === "worker started");
    assert.deepEqual(started.map((l) => l.worker).sort(), [0, 1]);
    assert.equal(new Set(started.map((l) => l.pid)).size, 2, "two processes");
  });

  it("one health refresher: the agent sees one poll per refresh period, not one per worker", async () => {
    const c0 = agent.calls.GetHealthStatus ?? 0;
    const t0 = performance.now();
    // Twenty periods (the workers are idle: nothing asks for an extra refresh).
    await until(() => performance.now() - t0 >= 20 * REFRESH_MS, "twenty refresh periods", GENEROUS_MS, REFRESH_MS);
    const polls = (agent.calls.GetHealthStatus ?? 0) - c0;
    const periods = (performance.now() - t0) / REFRESH_MS;
    console.log(`# ${polls} health polls in ${periods.toFixed(1)} refresh periods with 2 workers`);
    assert.ok(polls >= 1, "the refresher polls");
    // One poller: at most one per period begun (+1 in flight), and at most one refresh a second asked
    // for by a worker. Two pollers would make about two per period.
    assert.ok(polls <= Math.floor(periods) + 1 + Math.ceil((periods * REFRESH_MS) / 1000), `${polls} polls in ${periods} periods`);
    // Every worker has the refresher's view.
    for (let i = 0; i < 4; i++) {
      const r = await signedPost(url, `${API}/health`, healthBody(), CREDS.a, { agent: false });
      assert.equal(r.json?.ekmFleetDetails?.[0]?.healthStatus, "ACTIVE");
    }
  });

  it("a quota holds across workers, and one worker alone can take more than half of it", async () => {
    // Many new connections: both workers serve; the sum admitted stays within burst + rate × elapsed.
    const ok: string[] = [];
    let refused = 0;
    const t0 = performance.now();
    let n = 0;
    while (performance.now() - t0 < 2000) {
      const wave = Array.from({ length: 6 }, () => `q1-${n++}`);
      const answers = await Promise.all(wave.map((id) => encrypt(OTHER_API, CREDS.other, id).then((r) => [id, r] as const)));
      for (const [id, r] of answers) {
        if (r.status === 200) ok.push(id);
        else {
          assert.equal(r.status, 429, r.text);
          refused++;
        }
      }
    }
    const elapsed = (performance.now() - t0) / 1000;
    const bound = QUOTA.burst + QUOTA.rate * elapsed;
    console.log(`# many connections: ${ok.length} admitted, ${refused} refused in ${elapsed.toFixed(2)} s (bound ${bound.toFixed(1)})`);
    assert.ok(ok.length <= bound, `${ok.length} admitted > burst + rate × ${elapsed.toFixed(2)} s = ${bound}`);
    assert.ok(refused > 0, "the quota was reached");
    const servedBy = new Set<number>();
    for (const id of ok) servedBy.add(await workerOf((l) => l.kmsRequestId === id && l.status === 200, id));
    assert.deepEqual([...servedBy].sort(), [0, 1], "both workers admitted requests");

    // One keep-alive connection: one worker. A static split would give it burst/2 + rate/2 × elapsed.
    const one = new Agent({ keepAlive: true, maxSockets: 1 });
    const ok2: string[] = [];
    const t1 = performance.now();
    while (performance.now() - t1 < 3000) {
      const id = `q2-${n++}`;
      const r = await encrypt(OTHER_API, CREDS.other, id, { agent: one });
      if (r.status === 200) ok2.push(id);
      else assert.equal(r.status, 429, r.text);
    }
    const elapsed2 = (performance.now() - t1) / 1000;
    one.destroy();
    const half = QUOTA.burst / 2 + (QUOTA.rate / 2) * elapsed2;
    console.log(`# one connection: ${ok2.length} admitted in ${elapsed2.toFixed(2)} s (a static split allows ${half.toFixed(1)})`);
    assert.ok(ok2.length > half, `one worker got ${ok2.length}, no more than a static half (${half})`);
    assert.ok(ok2.length <= QUOTA.burst + QUOTA.rate * elapsed2);
    const workers2 = new Set<number>();
    for (const id of ok2) workers2.add(await workerOf((l) => l.kmsRequestId === id && l.status === 200, id));
    assert.equal(workers2.size, 1, "one connection, one worker");
  });

  it("metrics: one scrape sums every worker's requests", async () => {
    const before = sampleSum((await scrape(metricsUrl)).families, "xks_proxy_requests_total");
    const ids = Array.from({ length: 8 }, (_, i) => `m-${i}-${randomBytes(4).toString("hex")}`);
    for (const id of ids) assert.equal((await retryBusy(() => encrypt(API, CREDS.a, id))).status, 200);
    const served = new Set<number>();
    for (const id of ids) served.add(await workerOf((l) => l.kmsRequestId === id, id));
    assert.deepEqual([...served].sort(), [0, 1], "both workers served");
    const counted = lines().filter((l) => l.msg === "request" && ids.includes(l.kmsRequestId ?? "")).length;
    await until(
      async () => sampleSum((await scrape(metricsUrl)).families, "xks_proxy_requests_total") - before === counted,
      `the scrape to count all ${counted} requests`,
    );
    const { families } = await scrape(metricsUrl);
    assert.equal(sampleSum(families, "xks_proxy_workers"), 2);
    assert.equal(sampleSum(families, "xks_proxy_agent_health", { agent: "fake", state: "ACTIVE" }), 1, "the shared health shown once");
  });

  it("SIGHUP: the primary validates once and every worker accepts the new credential and refuses the old", async () => {
    // A bad config first: refused, the running one kept everywhere.
    const bad = writeConfig([{ accessKeyId: "not valid", secretAccessKey: "x" }]);
    proxy.proc!.kill("SIGHUP");
    await until(() => lines().some((l) => l.msg === "reload rejected; keeping the running config"), "the bad reload's refusal");
    for (let i = 0; i < 4; i++) assert.equal((await encrypt(API, CREDS.a, `keep-${i}`)).status, 200);
    assert.equal(bad, writeConfig([CREDS.b]));
    const reloads = () => lines().filter((l) => l.msg?.startsWith("key stores and identities reloaded by"));
    proxy.proc!.kill("SIGHUP");
    await until(() => reloads().length === 1, "the reload line");
    assert.equal(reloads()[0].applied, 2);
    assert.equal(reloads()[0].workers, 2);
    const newOk = new Set<number>();
    const oldRefused = new Set<number>();
    let n = 0;
    const tryNew = async (id: string) => {
      assert.equal((await retryBusy(() => encrypt(API, CREDS.b, id))).status, 200);
      newOk.add(await workerOf((l) => l.kmsRequestId === id, id));
    };
    const tryOld = async (key: string) => {
      const r = await signedPost(url, `${API}/keys/${key}/encrypt`, encryptBody("x"), CREDS.a, { agent: false });
      assert.equal(r.status, 401, r.text);
      oldRefused.add(await workerOf((l) => l.key === key && l.status === 401, key));
    };
    await until(
      async () => {
        // Connections go to the workers in turn: alternate which kind goes first.
        const i = n++;
        if (i % 2 === 0) await tryNew(`new-${i}`).then(() => tryOld(`old-${i}`));
        else await tryOld(`old-${i}`).then(() => tryNew(`new-${i}`));
        return newOk.size === 2 && oldRefused.size === 2;
      },
      "both workers to answer with the reloaded credentials",
      GENEROUS_MS,
      0,
    );
  });

  it("a SIGKILLed worker is replaced while the other keeps answering", async () => {
    const starts = () => lines().filter((l) => l.msg === "worker started");
    const victim = starts()
      .filter((l) => l.worker === 0)
      .at(-1)!;
    // A KMS-like caller on new connections: busy answers and broken connections are retried.
    let stopLoad = false;
    let failures = 0;
    let answered = 0;
    const CONCURRENCY = 4;
    const loop = async (k: number) => {
      for (let j = 0; !stopLoad; j++) {
        let r: Resp | undefined;
        for (let attempt = 0; attempt < 10 && r?.status !== 200; attempt++) {
          r = await retryBusy(() => encrypt(API, CREDS.b, `kill-${k}-${j}-${attempt}`)).catch(() => {
            failures++;
            return undefined;
          });
          if (r === undefined) await sleep(20);
        }
        assert.equal(r?.status, 200, r?.text);
        answered++;
      }
    };
    const loops = Array.from({ length: CONCURRENCY }, (_, k) => loop(k));
    await until(() => answered >= 10, "traffic before the kill");
    process.kill(victim.pid!, "SIGKILL");
    await until(
      () => lines().some((l) => l.msg === "worker exited; replacing it" && l.worker === 0),
      "the primary to log the exit and the replacement",
    );
    await until(() => starts().filter((l) => l.worker === 0).length >= 2, "worker 0 to be replaced");
    const atReplace = answered;
    await until(() => answered >= atReplace + 10, "traffic after the replacement");
    stopLoad = true;
    await Promise.all(loops);
    const replacement = starts()
      .filter((l) => l.worker === 0)
      .at(-1)!;
    assert.notEqual(replacement.pid, victim.pid);
    console.log(`# ${answered} answered, ${failures} connections broken by the kill (at most ${CONCURRENCY} in flight)`);
    assert.ok(failures <= CONCURRENCY, `${failures} failed sends: more than the ${CONCURRENCY} in flight`);
    await until(
      async () => sampleSum((await scrape(metricsUrl)).families, "xks_proxy_workers") === 2,
      "the scrape to show 2 workers again",
    );
  });

  it("SIGTERM drains every worker and the primary exits 0", async () => {
    const exited = new Promise<number | null>((resolve) => proxy.proc!.once("exit", (code) => resolve(code)));
    proxy.proc!.kill("SIGTERM");
    assert.equal(await exited, 0);
    const stopped = lines().filter((l) => l.msg === "stopped");
    assert.deepEqual(
      stopped
        .map((l) => l.worker)
        .filter((w) => w !== undefined)
        .sort(),
      [0, 1],
    );
    assert.ok(
      stopped.some((l) => l.worker === undefined),
      "the primary's own line",
    );
  });
});

describe("proxy workers that keep dying", () => {
  it("stop the proxy with exit code 1 (for systemd) after more than 5 exits in 30 s", async () => {
    const dir = mkdtempSync(join(tmpdir(), "xks-proxy-crashloop-"));
    const agent = await startFakeAgent({ dir });
    const file = writeProxyConfig(join(dir), {
      workers: 2,
      agents: [{ id: "fake", target: agent.target, token: agent.token }],
      keyStores: testKeyStores(),
    });
    const proxy = new Daemon("proxy", [BIN_PROXY, "serve", "--config", file], process.env, join(dir, "proxy.log"));
    try {
      proxy.start();
      const exited = new Promise<number | null>((resolve) => proxy.proc!.once("exit", (code) => resolve(code)));
      let gone = false;
      void exited.then(() => {
        gone = true;
      });
      const killed = new Set<number>();
      const lines = () =>
        proxy
          .logs()
          .split("\n")
          .filter((l) => l.startsWith("{"))
          .map((l) => JSON.parse(l) as Line);
      await until(() => lines().some((l) => l.msg === "xks-proxy listening" && l.worker === undefined), "both workers to start");
      // Every worker is killed as soon as it reports started, until the primary gives up.
      await until(
        () => {
          for (const l of lines()) {
            if (l.msg === "worker started" && l.pid && !killed.has(l.pid)) {
              killed.add(l.pid);
              try {
                process.kill(l.pid, "SIGKILL");
              } catch {
                /* already gone */
              }
            }
          }
          return gone;
        },
        "the primary to stop",
        GENEROUS_MS * 2,
      );
      assert.equal(await exited, 1);
      assert.ok(killed.size > 5, `${killed.size} workers killed`);
      assert.ok(lines().some((l) => l.msg === "workers keep exiting; stopping the proxy"));
      assert.equal(lines().filter((l) => l.msg === "worker exited; replacing it").length, 5, "five replacements before giving up");
    } finally {
      await proxy.stop("SIGKILL");
      await agent.stop();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
