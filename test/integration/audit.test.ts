/**
 * The audit log (agent/audit.ts, agent/audit/) on a real SoftHSM token with a
 * real CKM_SHA256_HMAC key: start-up cost independent of history, streamed
 * verification in bounded memory, every tamper named, writes whole or refused,
 * torn tails quarantined, a deleted open segment noticed, the proxy's witness.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createHash } from "node:crypto";
import {
  closeSync,
  cpSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  openSync,
  readdirSync,
  readFileSync,
  renameSync,
  rmSync,
  statSync,
  truncateSync,
  unlinkSync,
  writeFileSync,
  writeSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { basename, join } from "node:path";
import { after, before, describe, test } from "node:test";
import { AuditLog, type AuditSettings, listSegments, TAIL_WINDOW_BYTES } from "../../agent/audit.ts";
import { type Fields, GENESIS, type LineType, makeLine, parseLine, segmentName } from "../../agent/audit/format.ts";
import { searchAudit, tailAudit } from "../../agent/audit/read.ts";
import { verifyAudit, witnessesFromProxyLog } from "../../agent/audit/verify.ts";
import type { OperationRecord } from "../../agent/server.ts";
import { parseAgentConfig } from "../../agent/config.ts";
import type { ConfigError } from "../../shared/config.ts";
import { createLogger } from "../../shared/logging.ts";
import { minimalAgentConfig } from "../../testbed/configs.ts";
import { auditLines, auditOps, auditText } from "../../testbed/audit.ts";
import { AUDIT_KEY, TEST_KEYS } from "../../testbed/hsm.ts";
import { agentClient } from "../../testbed/grpc-client.ts";
import { startProxy, startTestAgent, type TestAgent } from "../../testbed/in-process.ts";
import { findLeaks } from "../../testbed/logs.ts";
import { nextEvent, until } from "../../testbed/wait.ts";
import { agentMetadata } from "../../testbed/xks/metadata.ts";

const SILENT = createLogger({ level: "silent" });
/** SHA-256 of a line's bytes before `,"hash":"`: what anyone who can write the files can recompute. */
const sha256 = (s: string) => createHash("sha256").update(s).digest("hex");
// One real agent on a SoftHSM token with the test keys and the audit key; its HSM seals every log made here.
// (A process has one PKCS#11 library instance: a second token in this file would share, and finalize, it.)
let t: TestAgent;
let root: string;
const seal = (data: Buffer) => t.agent.hsm.hmacSha256(AUDIT_KEY, data);

function settings(dir: string, over: Partial<AuditSettings> = {}): AuditSettings {
  return { dir, key: AUDIT_KEY, segmentBytes: 64 << 20, checkpointMs: 250, fsync: "checkpoint", ...over };
}

let seq = 0;
function record(i: number, over: Partial<OperationRecord> = {}): OperationRecord {
  return {
    time: new Date(Date.UTC(2026, 0, 1, 0, 0, i)).toISOString(),
    operation: "Encrypt",
    kmsRequestId: `req-${i}`,
    kmsOperation: "Encrypt",
    keyId: "foo",
    principal: i % 2 ? "arn:aws:iam::123456789012:user/Alice" : "arn:aws:iam::123456789012:user/Bob",
    kmsKeyArn: "arn:aws:kms:us-east-1:123456789012:key/k",
    viaService: "",
    sourceVpc: "",
    sourceVpce: "",
    keyStore: "/p",
    result: i % 5 === 0 ? "ACCESS_DENIED" : "OK",
    latencyMs: 0.123,
    ...over,
  };
}

/** A closed log of `records` operations in several 16 KiB segments, with a checkpoint every 10 records. */
function makeLog(records = 200, over: Partial<AuditSettings> = {}): string {
  const dir = join(root, `log-${++seq}`);
  const log = new AuditLog(settings(dir, { segmentBytes: 16 * 1024, ...over }), { seal, log: SILENT });
  for (let i = 1; i <= records; i++) {
    log.append(record(i));
    if (i % 10 === 0) log.checkpoint();
  }
  log.close();
  return dir;
}

function copyLog(dir: string): string {
  const to = join(root, `copy-${++seq}`);
  cpSync(dir, to, { recursive: true });
  return to;
}

const segPath = (dir: string, n: number) => join(dir, segmentName(n));
const readLines = (path: string) => readFileSync(path, "utf8").split("\n").filter(Boolean);
const writeLines = (path: string, lines: string[]) => writeFileSync(path, `${lines.join("\n")}\n`);

async function problemsOf(dir: string): Promise<string[]> {
  const r = await verifyAudit(dir, { mac: seal });
  assert.equal(r.ok, r.problems.length === 0);
  return r.problems.map((p) => `${p.segment}:${p.line}: ${p.why}`);
}

before(async () => {
  root = mkdtempSync(join(tmpdir(), "xks-audit-"));
  t = await startTestAgent();
});

after(async () => {
  await t?.destroy();
  rmSync(root, { recursive: true, force: true });
});

describe("format and keyed chain", () => {
  test("the audit key is a sensitive, non-extractable generic secret; its HMAC is deterministic and keyed", () => {
    const hsm = t.agent.hsm;
    const k = hsm.key(AUDIT_KEY);
    assert.equal(k.sensitive, true);
    assert.equal(k.extractable, false);
    assert.equal(k.usage.sign, true);
    assert.equal(k.usage.encrypt, false);
    assert.deepEqual(seal(Buffer.from("a")), seal(Buffer.from("a")));
    assert.notDeepEqual(seal(Buffer.from("a")), seal(Buffer.from("b")));
    assert.equal(seal(Buffer.from("a")).length, 32);
    // An AES key is not an audit key.
    assert.throws(() => hsm.hmacSha256(TEST_KEYS.default, Buffer.from("a")), /not an audit key/);
  });

  test("a log across segments verifies: chain, headers, checkpoint MACs checked with the HSM", async () => {
    const dir = makeLog(200);
    const r = await verifyAudit(dir, { mac: seal });
    assert.deepEqual(r.problems, []);
    assert.ok(r.ok);
    assert.ok(r.segments >= 3, `${r.segments} segments`);
    assert.ok(r.checkpoints >= 20);
    assert.equal(r.unsealed, 0, "the stop is sealed");
    assert.equal(auditOps(dir).length, 200);
    const last = auditLines(dir).at(-1)!;
    assert.equal(last.t, "cp");
  });

  test("a line is its exact canonical bytes: whitespace, reordering, duplicate members refused even with a recomputed hash", () => {
    const { bytes } = makeLine(1, "op", record(1) as unknown as Fields, GENESIS);
    const good = bytes.subarray(0, -1);
    assert.ok(!("why" in parseLine(good)));
    const rehash = (text: string) => {
      // What a writer without the key can do: recompute the line's own SHA-256.
      const prefix = text.slice(0, text.lastIndexOf(',"hash":"'));
      return Buffer.from(`${prefix},"hash":"${sha256(prefix)}"}`);
    };
    const text = good.toString();
    const dup = rehash(text.replace('"latencyMs"', '"result":"ACCESS_DENIED","latencyMs"'));
    const spaced = rehash(text.replace('"n":1,', '"n": 1,'));
    const reordered = rehash(text.replace('"t":"op","time":', '"time":').replace(',"operation"', ',"t":"op","operation"'));
    for (const [what, line] of [
      ["duplicate member", dup],
      ["whitespace", spaced],
      ["reordered", reordered],
    ] as const) {
      const p = parseLine(line);
      assert.ok("why" in p, what);
      if ("why" in p) assert.match(p.why, /not canonical/, what);
    }
  });
});

/** Rewrites every line from index `from` on with a recomputed chain (SHA-256 only: what a file writer can do). */
function recomputeChain(dir: string, edit: (lines: Array<{ n: number; t: LineType; fields: Fields }>) => void): void {
  const segs = listSegments(dir);
  const all = segs.map((s) => readLines(s.path).map((l) => parseLine(Buffer.from(l)) as { n: number; t: LineType; fields: Fields }));
  for (const lines of all) edit(lines);
  let prev = GENESIS;
  segs.forEach((s, i) => {
    const out: string[] = [];
    for (const l of all[i]) {
      const { bytes, hash } = makeLine(l.n, l.t, l.fields, prev);
      out.push(bytes.toString("utf8").trimEnd());
      prev = hash;
    }
    writeLines(s.path, out);
  });
}

describe("every tamper is detected and named", () => {
  let base: string;
  before(() => {
    base = makeLog(200);
  });

  const cases: Array<[string, (dir: string) => void, RegExp]> = [
    [
      "tail truncated (the newest segment cut mid-line)",
      (d) => {
        const p = listSegments(d).at(-1)!.path;
        truncateSync(p, statSync(p).size - 30);
      },
      /no line end/,
    ],
    [
      "tail truncated (whole lines cut from an older segment)",
      (d) => writeLines(segPath(d, 1), readLines(segPath(d, 1)).slice(0, -3)),
      /chain broken|follows record/,
    ],
    [
      "head truncated (first lines removed)",
      (d) => writeLines(segPath(d, 1), readLines(segPath(d, 1)).slice(3)),
      /does not start with its header/,
    ],
    ["file emptied", (d) => truncateSync(segPath(d, 2), 0), /empty/],
    ["file deleted (a middle segment)", (d) => unlinkSync(segPath(d, 2)), /segment\(s\) 2–2 missing/],
    ["segment deleted (the first)", (d) => unlinkSync(segPath(d, 1)), /missing and no retention record/],
    [
      "two records swapped",
      (d) => {
        const l = readLines(segPath(d, 1));
        [l[3], l[4]] = [l[4], l[3]];
        writeLines(segPath(d, 1), l);
      },
      /follows record|chain broken/,
    ],
    [
      "a record edited with every later SHA-256 hash recomputed",
      (d) =>
        recomputeChain(d, (lines) => {
          const op = lines.find((l) => l.t === "op" && l.fields.result === "ACCESS_DENIED");
          if (op) op.fields.result = "OK";
        }),
      /MAC does not match/,
    ],
    [
      "a duplicated member (with the chain recomputed)",
      (d) => {
        const l = readLines(segPath(d, 1));
        const i = l.findIndex((x) => x.includes('"result":"OK"'));
        const prefix = l[i].slice(0, l[i].lastIndexOf(',"hash":"')).replace('"result":"OK"', '"result":"OK","result":"ACCESS_DENIED"');
        l[i] = `${prefix},"hash":"${sha256(prefix)}"}`;
        writeLines(segPath(d, 1), l);
      },
      /not canonical/,
    ],
    ["a replayed older segment (segment 2 copied over segment 3)", (d) => cpSync(segPath(d, 2), segPath(d, 3)), /header names segment 2/],
  ];
  for (const [name, tamper, why] of cases) {
    test(name, async () => {
      const dir = copyLog(base);
      assert.deepEqual(await problemsOf(dir), [], "intact before");
      tamper(dir);
      const problems = await problemsOf(dir);
      assert.ok(problems.length > 0, "detected");
      assert.ok(
        problems.some((p) => why.test(p)),
        `named: ${problems.join(" | ")}`,
      );
    });
  }

  test("records after the last checkpoint are counted as not yet authenticated", async () => {
    const dir = join(root, `unsealed-${++seq}`);
    const log = new AuditLog(settings(dir, { checkpointMs: 1000 }), { seal, log: SILENT });
    log.append(record(1));
    log.append(record(2));
    const r = await verifyAudit(dir, { mac: seal });
    assert.ok(r.ok);
    assert.equal(r.unsealed, 2);
    log.close();
    assert.equal((await verifyAudit(dir, { mac: seal })).unsealed, 0);
  });
});

describe("start and verify do not grow with history", () => {
  /** A log whose newest segment is the same as `dir`'s, with `olderBytes` of (sparse) older segments before it. */
  function withOlder(olderBytes: number): string {
    const dir = join(root, `start-${++seq}`);
    mkdirSync(dir);
    const src = makeLog(30);
    const newest = listSegments(src).at(-1)!;
    const count = olderBytes === 0 ? 0 : 8;
    for (let i = 1; i <= count; i++) {
      const fd = openSync(segPath(dir, i), "w");
      closeSync(fd);
      truncateSync(segPath(dir, i), olderBytes / count);
    }
    cpSync(newest.path, segPath(dir, count + 1));
    return dir;
  }

  test("start reads the same bytes and opens the same files with 1 GiB of older segments as with none", () => {
    const measure = (dir: string) => {
      const log = new AuditLog(settings(dir), { seal, log: SILENT });
      const s = { ...log.startStats };
      log.close();
      return s;
    };
    const none = measure(withOlder(0));
    const gib = measure(withOlder(1 << 30));
    console.log(`start with no history: ${JSON.stringify(none)}; with 1 GiB of older segments: ${JSON.stringify(gib)}`);
    assert.deepEqual(gib, none);
    assert.ok(none.bytesRead <= TAIL_WINDOW_BYTES && none.filesOpened <= 3);
  });

  test("start reads at most the tail window of a 1 GiB newest segment", () => {
    const dir = join(root, `bignewest-${++seq}`);
    mkdirSync(dir);
    const src = readFileSync(listSegments(makeLog(30)).at(-1)!.path);
    const p = segPath(dir, 1);
    writeFileSync(p, "");
    truncateSync(p, 1 << 30);
    const fd = openSync(p, "a");
    writeSync(fd, Buffer.concat([Buffer.from("\n"), src]));
    closeSync(fd);
    const log = new AuditLog(settings(dir), { seal, log: SILENT });
    const s = { ...log.startStats };
    log.close();
    assert.ok(s.bytesRead <= TAIL_WINDOW_BYTES, `${s.bytesRead} bytes read`);
  });

  test("verify streams 1 GiB of segments in a child process whose peak RSS stays under 200 MB", async () => {
    // 1 GiB of valid records: events with ~1 MiB details, in 64 MiB segments.
    const dir = join(root, `gib-${++seq}`);
    const log = new AuditLog(settings(dir, { segmentBytes: 64 << 20, checkpointMs: 1000 }), { seal, log: SILENT });
    const detail = "x".repeat(1000 * 1000);
    for (let i = 0; i < 1080; i++) {
      log.event("filler", detail);
      if (i % 64 === 0) log.checkpoint();
    }
    log.close();
    const total = listSegments(dir).reduce((a, s) => a + statSync(s.path).size, 0);
    assert.ok(total >= 1 << 30, `${total} bytes`);
    const script = `
      import { verifyAudit } from ${JSON.stringify(join(process.cwd(), "agent/audit/verify.ts"))};
      const r = await verifyAudit(${JSON.stringify(dir)});
      console.log(JSON.stringify({ ok: r.ok, problems: r.problems, bytes: r.bytes, maxRssKiB: process.resourceUsage().maxRSS }));
    `;
    const out = await new Promise<string>((resolve, reject) => {
      const p = spawn(process.execPath, ["--import", "tsx", "--input-type=module", "-e", script], { stdio: ["ignore", "pipe", "inherit"] });
      let text = "";
      p.stdout.on("data", (d) => {
        text += d;
      });
      p.on("error", reject);
      p.on("exit", () => resolve(text));
    });
    const r = JSON.parse(out.trim().split("\n").at(-1)!);
    console.log(`verify over ${(r.bytes / 2 ** 30).toFixed(2)} GiB: peak RSS ${(r.maxRssKiB / 1024).toFixed(0)} MiB`);
    assert.deepEqual(r.problems, []);
    assert.equal(r.bytes, total);
    assert.ok(r.maxRssKiB * 1024 < 200e6, `peak RSS ${r.maxRssKiB} KiB`);
    rmSync(dir, { recursive: true, force: true });
  });
});

describe("never torn", () => {
  test("a torn tail found at start is quarantined and recorded; the agent's log starts and verifies", async () => {
    const dir = makeLog(20);
    const newest = listSegments(dir).at(-1)!.path;
    const torn = '{"n":99,"t":"op","time":"2026-';
    writeFileSync(newest, readFileSync(newest, "utf8") + torn);
    const log = new AuditLog(settings(dir), { seal, log: SILENT });
    log.append(record(21));
    log.close();
    const q = readdirSync(dir).filter((f) => f.startsWith("quarantine-"));
    assert.equal(q.length, 1);
    assert.equal(readFileSync(join(dir, q[0]), "utf8"), torn);
    const ev = auditLines(dir).find((l) => l.t === "ev" && l.event === "quarantine");
    assert.ok(ev, "recorded");
    assert.match(String(ev.detail), /30 bytes/);
    assert.deepEqual(await problemsOf(dir), []);
  });

  test("an empty newest segment (a crash right after it was made) is reused and the chain continues", async () => {
    const dir = makeLog(20);
    const last = listSegments(dir).at(-1)!.segment;
    writeFileSync(segPath(dir, last + 1), "");
    const log = new AuditLog(settings(dir), { seal, log: SILENT });
    log.append(record(21));
    log.close();
    assert.deepEqual(await problemsOf(dir), []);
  });

  test("a file-size limit: the record that does not fit refuses the operation, leaves no torn line, and health says why", async () => {
    // The real agent in a child process under RLIMIT_FSIZE (prlimit): writes past the limit come up short, then EFBIG.
    // Same token and keys as the in-process agent; its own socket and audit directory.
    const raw = JSON.parse(readFileSync(t.configFile, "utf8"));
    Object.assign(raw, { socket: "run-fsize/agent.sock", audit: { dir: "state/audit-fsize" } });
    const configFile = join(t.dir, "agent-fsize.json");
    writeFileSync(configFile, JSON.stringify(raw));
    const auditDir = join(t.dir, "state", "audit-fsize");
    const limit = 6000;
    const child = spawn(
      "prlimit",
      [
        `--fsize=${limit}`,
        process.execPath,
        "--import",
        "tsx",
        "--input-type=module",
        "-e",
        `import { main } from ${JSON.stringify(join(process.cwd(), "agent/cli.ts"))}; process.exitCode = await main(["run", "--config", ${JSON.stringify(configFile)}]);`,
      ],
      { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, ...t.softhsm.env } },
    );
    let out = "";
    child.stdout.on("data", (d) => {
      out += d;
    });
    child.stderr.on("data", (d) => {
      out += d;
    });
    const exited = new Promise((r) => child.once("exit", r));
    const c = agentClient(`unix://${join(t.dir, "run-fsize", "agent.sock")}`, t.token);
    try {
      await until(() => out.includes('"listening"'), "the agent to listen");
      let refused: { reason?: string } | undefined;
      let ok = 0;
      for (let i = 0; i < 100 && !refused; i++) {
        try {
          await c.call("Encrypt", {
            metadata: agentMetadata("Encrypt", { kmsRequestId: `fsize-${i}` }),
            keyId: t.keys.default,
            plaintext: Buffer.from("x"),
          });
          ok++;
        } catch (err) {
          refused = err as { reason?: string };
        }
      }
      assert.ok(refused, "an operation is refused once the record cannot be written");
      assert.equal(refused.reason, "INVALID_STATE");
      assert.ok(ok > 0);
      const h = await c.call("GetHealthStatus", { kmsRequestId: "", kmsOperation: "t" });
      assert.equal(h.state, "UNAVAILABLE");
      assert.match(h.detail, /audit record not written \((EFBIG|short write)/);
      assert.match(h.auditHead.problem, /audit record not written/);
      const bytes = readFileSync(listSegments(auditDir)[0].path);
      assert.ok(bytes.length <= limit);
      assert.equal(bytes.at(-1), 0x0a, "the segment ends with a whole line");
      const r = await verifyAudit(auditDir, { mac: seal });
      assert.deepEqual(r.problems, []);
      // Every answered operation is in the file; the refused one is not.
      const ids = auditOps(auditDir).map((o) => o.kmsRequestId);
      assert.equal(ids.length, ok);
      assert.ok(!ids.includes(`fsize-${ok}`));
      await until(() => out.includes("audit record not written"), "the agent's log to say why");
    } finally {
      c.close();
      child.kill("SIGTERM");
      await exited;
    }
  });
});

describe("the running agent", () => {
  test("the open segment deleted while the agent runs: noticed, recorded in a new segment, serving continues, verify names the loss", async () => {
    const c = agentClient(t.target, t.token);
    try {
      const enc = (id: string) =>
        c.call("Encrypt", { metadata: agentMetadata("Encrypt", { kmsRequestId: id }), keyId: t.keys.default, plaintext: Buffer.from("x") });
      await enc("before-delete");
      const open = t.agent.audit.state().path;
      const lost = nextEvent<string>(t.agent.audit, "lost", () => true, "the agent to notice the deleted segment");
      unlinkSync(open);
      assert.equal(await lost, segmentName(1));
      await enc("after-delete");
      const lines = auditLines(t.config.audit.dir);
      const ev = lines.find((l) => l.t === "ev" && l.event === "segment-lost");
      assert.ok(ev);
      assert.match(String(ev.detail), /audit-000001\.log was deleted while open/);
      assert.ok(lines.some((l) => l.t === "op" && l.kmsRequestId === "after-delete"));
      const problems = (await verifyAudit(t.config.audit.dir, { mac: seal })).problems;
      assert.ok(
        problems.some((p) => /missing and no retention record/.test(p.why)),
        JSON.stringify(problems),
      );
    } finally {
      c.close();
    }
  });

  test("the open segment replaced by another file, then the whole directory removed: both noticed, serving continues", async () => {
    const c = agentClient(t.target, t.token);
    try {
      const enc = (id: string) =>
        c.call("Encrypt", { metadata: agentMetadata("Encrypt", { kmsRequestId: id }), keyId: t.keys.default, plaintext: Buffer.from("x") });
      await enc("before-replace");
      const open = t.agent.audit.state().path;
      const replaced = nextEvent<string>(t.agent.audit, "lost", () => true, "the agent to notice the replaced segment");
      writeFileSync(`${open}.new`, "forged\n");
      renameSync(`${open}.new`, open);
      assert.equal(await replaced, basename(open));
      await enc("after-replace");
      const lines = auditLines(t.config.audit.dir);
      assert.ok(lines.some((l) => l.t === "ev" && l.event === "segment-lost" && /was replaced while open/.test(String(l.detail))));
      const gone = nextEvent<string>(t.agent.audit, "lost", () => true, "the agent to notice the removed directory");
      rmSync(t.config.audit.dir, { recursive: true, force: true });
      await gone;
      await enc("after-rmdir");
      assert.ok(auditOps(t.config.audit.dir).some((o) => o.kmsRequestId === "after-rmdir"));
    } finally {
      c.close();
    }
  });

  test("calls refused at the door are counted and sampled at the next checkpoint, not written one by one", async () => {
    const c = agentClient(t.target, t.token);
    try {
      const before = auditLines(t.config.audit.dir).length;
      for (let i = 0; i < 5; i++)
        await c
          .call(
            "Encrypt",
            {
              metadata: agentMetadata("Encrypt", { kmsRequestId: `door-${i}`, kmsKeyArn: "A".repeat(2000) }),
              keyId: "foo",
              plaintext: Buffer.from("x"),
            },
            { token: "not-the-token" },
          )
          .catch(() => {});
      t.agent.audit.checkpoint();
      const added = auditLines(t.config.audit.dir).slice(before);
      assert.ok(!added.some((l) => l.t === "op" && l.result === "UNAUTHENTICATED"), "no record per refused call");
      const counted = added.filter((l) => l.t === "ev" && l.event === "unauthenticated").map((l) => JSON.parse(String(l.detail)));
      assert.equal(
        counted.reduce((a, x) => a + x.count, 0),
        5,
      );
      assert.match(counted[0].sample.kmsRequestId, /^door-/);
      for (const l of added) assert.ok(JSON.stringify(l).length < 2000, "no attacker-sized field");
    } finally {
      c.close();
    }
  });

  test("the proxy logs the audit head; verify --against finds a rollback of the owner's files", async () => {
    const proxy = await startProxy({ agents: [{ id: "owner-mac", target: t.target, token: t.token }] });
    const c = agentClient(t.target, t.token);
    try {
      const enc = (id: string) =>
        c.call("Encrypt", { metadata: agentMetadata("Encrypt", { kmsRequestId: id }), keyId: t.keys.default, plaintext: Buffer.from("x") });
      await enc("w-1");
      t.agent.audit.checkpoint();
      const early = copyLog(t.config.audit.dir);
      for (let i = 2; i <= 5; i++) await enc(`w-${i}`);
      t.agent.audit.checkpoint();
      const head = t.agent.audit.head()!;
      await until(() => witnessesFromProxyLog(proxy.logs.text()).some((w) => w.records === head.records), "the proxy to log the head");
      const line = proxy.logs.json().find((l) => l.msg === "agent audit head" && l.auditRecords === head.records);
      assert.ok(line);
      assert.equal(line.auditHash, head.hash);
      assert.equal(line.auditMac, head.mac);
      const witnesses = witnessesFromProxyLog(proxy.logs.text());
      const mac = seal;
      const now = await verifyAudit(t.config.audit.dir, { mac, against: witnesses });
      // (The deletion test above left a gap in this agent's log; the witnesses all match what remains.)
      assert.ok(
        now.problems.every((p) => !/proxy/.test(p.why)),
        JSON.stringify(now.problems),
      );
      assert.ok(now.witnessesChecked > 0);
      // The owner's files rolled back to the earlier copy: consistent on their own, not with what EC2 saw.
      const alone = await verifyAudit(early, { mac });
      assert.ok(
        alone.problems.every((p) => !/proxy/.test(p.why)),
        "no witness, no rollback found",
      );
      const against = await verifyAudit(early, { mac, against: witnesses });
      assert.ok(
        against.problems.some((p) => /rolled back: the proxy saw record/.test(p.why)),
        JSON.stringify(against.problems),
      );
      // Nothing secret in the witness lines or the audit files.
      const secrets = { PIN: t.softhsm.pin, "proxy token": t.token };
      assert.deepEqual(findLeaks(proxy.logs.text(), secrets), []);
      assert.deepEqual(findLeaks(auditText(t.config.audit.dir), secrets), []);
    } finally {
      c.close();
      await proxy.close();
    }
  });
});

describe("segments and retention", () => {
  test("a segment is closed at the end of each UTC day; the chain continues into the next", async () => {
    const dir = join(root, `days-${++seq}`);
    let now = new Date("2026-03-01T23:59:59.000Z");
    const log = new AuditLog(settings(dir), { seal, log: SILENT, now: () => now });
    log.append(record(1));
    now = new Date("2026-03-02T00:00:01.000Z");
    log.append(record(2));
    log.close();
    const segs = listSegments(dir);
    assert.equal(segs.length, 2);
    assert.ok(readFileSync(segs[1].path, "utf8").includes('"kmsRequestId":"req-2"'));
    assert.deepEqual(await problemsOf(dir), []);
  });

  test("retention removes the oldest segments after recording it; what remains verifies; a further deletion does not", async () => {
    const dir = makeLog(400, { keepBytes: 40 * 1024 });
    const segs = listSegments(dir);
    assert.ok(segs[0].segment > 1, "old segments were removed");
    const ev = auditLines(dir).filter((l) => l.t === "ev" && l.event === "retention");
    assert.ok(ev.length > 0, "the removal is recorded");
    const r = await verifyAudit(dir, { mac: seal });
    assert.deepEqual(r.problems, []);
    const total = segs.reduce((a, x) => a + statSync(x.path).size, 0);
    assert.ok(total <= 40 * 1024 + 16 * 1024 + 4096, `${total} bytes kept`);
    // Someone deletes the oldest remaining segment too: no retention record covers it.
    unlinkSync(segs[0].path);
    const problems = await problemsOf(dir);
    assert.ok(
      problems.some((p) => /no retention record/.test(p)),
      problems.join(" | "),
    );
  });

  test("config: every audit field is checked and named with the file", () => {
    const dir = join(root, `cfg-${++seq}`);
    mkdirSync(dir);
    const file = join(dir, "agent.json");
    const bad = minimalAgentConfig(dir, {
      healthKey: "xks-health",
      audit: { key: "xks-health", fsync: "always", segmentKiB: 1, checkpointMs: 5000, keepGiB: -1, color: "red" },
      keyStores: [{ keyStore: "/example/prefix", keys: ["k1", "xks-audit"] }],
    });
    assert.throws(
      () => parseAgentConfig(bad, file, {}),
      (err: ConfigError) => {
        const text = err.message;
        for (const field of ["audit.key", "audit.fsync", "audit.segmentKiB", "audit.checkpointMs", "audit.keepGiB", "audit.color"])
          assert.ok(text.includes(field), `${field} named in: ${text}`);
        assert.ok(text.includes(file));
        return true;
      },
    );
    const legacy = parseAgentConfig(minimalAgentConfig(dir, { auditLog: "old/audit" }), file, {});
    assert.equal(legacy.audit.dir, join(dir, "old/audit"));
    assert.equal(legacy.audit.key, "xks-audit");
    assert.equal(legacy.audit.fsync, "checkpoint");
    const listed = parseAgentConfig.bind(null, minimalAgentConfig(dir, { keyStores: [{ keyStore: "/p", keys: ["xks-audit"] }] }), file, {});
    assert.throws(listed, /keyStores\[0\]\.keys\[0\]: is the audit key/);
  });
});

describe("reading", () => {
  test("tail, search and export work across segments, on the exact lines", async () => {
    const dir = makeLog(200);
    assert.ok(listSegments(dir).length >= 3);
    const tail = await tailAudit(dir, 5);
    assert.equal(tail.length, 5);
    assert.equal(JSON.parse(tail.at(-1)!.toString()).t, "cp");
    const found: Buffer[] = [];
    for await (const l of searchAudit(dir, { requestId: "req-7" })) found.push(Buffer.from(l));
    assert.equal(found.length, 1);
    for await (const l of searchAudit(dir, { result: "ACCESS_DENIED", principal: "arn:aws:iam::123456789012:user/Bob" })) found.push(l);
    assert.equal(found.length, 1 + 20, "i % 10 === 0: refused and Bob");
    const inRange: Buffer[] = [];
    for await (const l of searchAudit(dir, { requestId: undefined, since: "2026-01-01T00:00:10.000Z", until: "2026-01-01T00:00:19.999Z" }))
      if (JSON.parse(l.toString()).t === "op") inRange.push(l);
    assert.equal(inRange.length, 10);
    assert.ok(existsSync(dir));
  });
});
