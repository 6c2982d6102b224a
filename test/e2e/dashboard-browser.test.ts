/**
 * The owner's dashboard in a real headless Chromium (Debian's `chromium`,
 * driven by playwright-core, which downloads no browser) on the real chain:
 * signed HTTP → proxy → sshd → agent's tunnel → agent → SoftHSM, each its own
 * process; the page is the agent's own, opened with the URL the agent wrote.
 *
 * The browser is /usr/bin/chromium, or XKS_CHROMIUM (e.g. Google Chrome on
 * macOS). Every wait is for something on the page or an answer, capped by
 * GENEROUS_MS. The screenshot goes to .test-output/dashboard.png.
 */
import assert from "node:assert/strict";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { createServer, type Server } from "node:http";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { type BrowserContext, chromium, type Page } from "playwright-core";
import { PACKAGE_ROOT } from "../../shared/paths.ts";
import { type Chain, DENIED_PRINCIPAL, startChain } from "../../testbed/chain.ts";
import { freePort } from "../../testbed/ports.ts";
import { GENEROUS_MS, until } from "../../testbed/wait.ts";
import { decryptBody, encryptBody, keyPath, metadataBody } from "../../testbed/xks/bodies.ts";

const MAC_CHROME = "/Applications/Google Chrome.app/Contents/MacOS/Google Chrome";
const BROWSER = process.env.XKS_CHROMIUM ?? (process.platform === "darwin" ? MAC_CHROME : "/usr/bin/chromium");
/** Flags for a closed network: no background connections, no sandbox (root in CI), a software renderer. */
const BROWSER_ARGS = [
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  // A DNS name that resolves to 127.0.0.1, as a rebinding attacker's would.
  "--host-resolver-rules=MAP rebound.test 127.0.0.1",
];
const OUTPUT_DIR = join(PACKAGE_ROOT, ".test-output");
const SCREENSHOT = join(OUTPUT_DIR, "dashboard.png");
const REBOUND = "rebound.test";
/** HTML that a metadata string may carry (KMS passes caller-influenced strings through). */
const PRINCIPAL_HTML = `arn:aws:iam::123456789012:user/<img src=x onerror="window.__xss='img';document.title='pwned'">`;
const KEY_ARN_HTML = `arn:aws:kms:us-east-1:123456789012:key/<script>window.__xss='script'</script>`;

// On macOS without Chrome (and without XKS_CHROMIUM) the suite is skipped; on Linux a missing browser fails it.
const skip = !existsSync(BROWSER) && process.platform === "darwin" ? `no browser at ${BROWSER}: set XKS_CHROMIUM` : false;

describe("the dashboard in a real browser", { skip }, () => {
  let chain: Chain;
  let ctx: BrowserContext;
  let page: Page;
  let url: string;
  let profile: string;
  let attacker: Server | undefined;
  const pageErrors: string[] = [];

  before(async () => {
    if (!existsSync(BROWSER))
      throw new Error(`no browser at ${BROWSER}: apt-get install chromium (scripts/setup.sh does), or set XKS_CHROMIUM`);
    chain = await startChain();
    await chain.waitActive();
    const urlFile = join(chain.dir, "agent", "state", "dashboard-url");
    await until(() => existsSync(urlFile), "the agent's dashboard-url file");
    url = readFileSync(urlFile, "utf8").trim();
    profile = mkdtempSync(join(tmpdir(), "xks-chromium-"));
    ctx = await chromium.launchPersistentContext(profile, {
      executablePath: BROWSER,
      headless: true,
      args: BROWSER_ARGS,
      viewport: { width: 1360, height: 1000 },
      timeout: GENEROUS_MS,
    });
    ctx.setDefaultTimeout(GENEROUS_MS);
    page = ctx.pages()[0] ?? (await ctx.newPage());
    page.on("pageerror", (err) => pageErrors.push(err.message));
    page.on("console", (m) => {
      if (m.type() === "error") pageErrors.push(m.text());
    });
    page.on("dialog", (d) => {
      pageErrors.push(`dialog: ${d.message()}`);
      void d.dismiss();
    });
  });

  after(async () => {
    await ctx?.close();
    if (profile) rmSync(profile, { recursive: true, force: true });
    await new Promise<void>((resolve) => (attacker ? attacker.close(() => resolve()) : resolve()));
    await chain?.stop();
  });

  /** Waits until the text of the first element matching `selector` satisfies `re`; returns it. */
  async function textMatches(selector: string, re: RegExp): Promise<string> {
    await page.waitForFunction(([sel, src, flags]) => new RegExp(src, flags).test(document.querySelector(sel)?.textContent ?? ""), [
      selector,
      re.source,
      re.flags,
    ] as const);
    return (await page.textContent(selector)) ?? "";
  }
  /**
   * The cells of the newest operations row of one KMS request id whose result cell is `result`, once it is on the
   * page (a request retried after a busy answer may have earlier rows).
   */
  async function row(requestId: string, result: string): Promise<{ cells: string[]; className: string }> {
    const found = await page.waitForFunction(
      ([id, want]) => {
        for (const tr of document.querySelectorAll("#ops tr")) {
          const el = tr as HTMLElement;
          if (el.dataset.requestId !== id) continue;
          const cells = [...el.querySelectorAll("td")].map((td) => td.textContent ?? "");
          if (cells[7] === want) return { cells, className: el.className };
        }
        return false;
      },
      [requestId, result] as const,
    );
    return (await found.jsonValue()) as { cells: string[]; className: string };
  }
  // The operations table's columns.
  const COL = { time: 0, operation: 1, kmsOperation: 2, key: 3, principal: 4, keyArn: 5, via: 6, result: 7, ms: 8, id: 9 };
  // Requests that need a definite answer retry the spec's busy answers (429, 503) like KMS: the machine may be loaded.
  const encrypt = (id: string, metadata: Record<string, unknown> = {}, key = chain.keys.default) =>
    chain.client.postRetrying(
      keyPath(key, "encrypt"),
      encryptBody("dashboard browser test", { metadata: { kmsRequestId: id, ...metadata } }),
    );
  const metadata = (id: string) =>
    chain.client.postRetrying(keyPath(chain.keys.default, "metadata"), metadataBody("DescribeKey", { kmsRequestId: id }));

  test("the page loads: connected, the tunnel up, the HSM logging in, the keys with their switches", async () => {
    const res = await page.goto(url);
    assert.equal(res?.status(), 200);
    assert.equal(await page.title(), "xks-agent");
    await textMatches("#conn", /^connected$/);
    await textMatches("#state", /^allowed$/);
    await textMatches("#tunnels", /local-sshd\s*up/);
    await textMatches("#hsm", /^logins allowed$/);
    // Background health refreshes (every second in the chain) show as the indicator…
    await textMatches("#health", /^ACTIVE at \d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}, [\d.]+ ms; \d+ checks since start$/);
    await textMatches("#clock", /^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \(.+\)$/);
    const keys = await page.locator("#keys tr").evaluateAll((trs) => trs.map((tr) => (tr as HTMLElement).dataset.key));
    assert.deepEqual(keys, ["demo-decrypt-only", "demo-encrypt-only", "demo-key", "demo-no-usage"]);
  });

  test("a signed request through the chain appears as a row (local time with date), and health refreshes never do", async () => {
    const r = await encrypt("req-browser-1");
    assert.equal(r.status, 200, r.text);
    const { cells, className } = await row("req-browser-1", "OK");
    assert.match(cells[COL.time], /^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}$/);
    assert.equal(cells[COL.operation], "Encrypt");
    assert.equal(cells[COL.key], chain.keys.default);
    assert.equal(className, "op-ok");
    await textMatches(`#keys tr[data-key="${chain.keys.default}"] td:nth-child(9)`, /OK$/);
    assert.equal(await page.locator("#ops td", { hasText: "GetHealthStatus" }).count(), 0);
    // The audit head: the records sealed so far (this Encrypt among them), shown with the next health refresh.
    await textMatches("#audit", /^[1-9]\d* records, head [0-9a-f]{16}… \(sealed in the HSM\)$/);
  });

  test("pause from the page: the next request fails with InvalidStateException and its row shows the refusal; resume restores", async () => {
    await page.click("#pause");
    await textMatches("#state", /^PAUSED/);
    await textMatches("#health", /^UNAVAILABLE \(paused by the owner\)/);
    const refused = await encrypt("req-browser-paused");
    assert.equal(refused.status, 400, refused.text);
    assert.equal(refused.json.errorName, "InvalidStateException");
    const { cells, className } = await row("req-browser-paused", "INVALID_STATE (paused by the owner)");
    assert.equal(cells[COL.operation], "Encrypt");
    assert.equal(className, "op-denied");

    await page.click("#pause");
    await textMatches("#state", /^allowed$/);
    const ok = await encrypt("req-browser-resumed");
    assert.equal(ok.status, 200, ok.text);
    await row("req-browser-resumed", "OK");
  });

  test("per-key disable from the page: GetKeyMetadata says DISABLED, Encrypt is refused; enable restores", async () => {
    const keyRow = `#keys tr[data-key="${chain.keys.default}"]`;
    await page.click(`${keyRow} button`);
    await textMatches(`${keyRow} td:nth-child(2)`, /^DISABLED$/);
    const m = await metadata("req-browser-meta-disabled");
    assert.equal(m.status, 200, m.text);
    assert.equal(m.json.keyStatus, "DISABLED");
    const refused = await encrypt("req-browser-key-disabled");
    assert.equal(refused.json?.errorName, "InvalidStateException", refused.text);
    assert.equal((await row("req-browser-key-disabled", "INVALID_STATE (key disabled by the owner)")).className, "op-denied");

    await page.click(`${keyRow} button`);
    await textMatches(`${keyRow} td:nth-child(2)`, /^enabled$/);
    assert.equal((await metadata("req-browser-meta-enabled")).json.keyStatus, "ENABLED");
  });

  test("the page as the owner sees it (screenshot saved)", async (t) => {
    for (let i = 0; i < 12; i++) {
      const e = await encrypt(`req-shot-${i}`);
      assert.equal(e.status, 200, e.text);
      const d = await chain.client.postRetrying(
        keyPath(chain.keys.default, "decrypt"),
        decryptBody(e.json, { metadata: { kmsRequestId: `req-shot-d${i}` } }),
      );
      assert.equal(d.status, 200, d.text);
    }
    // The demo's policy denies this principal: the row names the rule.
    const blocked = await encrypt("req-shot-policy", { awsPrincipalArn: DENIED_PRINCIPAL });
    assert.equal(blocked.json?.errorName, "AccessDeniedException", blocked.text);
    assert.equal((await row("req-shot-policy", "ACCESS_DENIED (policy rule deny-blocked-users)")).className, "op-denied");
    const denied = await encrypt("req-shot-usage", {}, chain.keys.decryptOnly);
    assert.equal(denied.json?.errorName, "InvalidKeyUsageException", denied.text);
    assert.equal((await row("req-shot-usage", "INVALID_KEY_USAGE")).className, "op-denied");
    // The health indicator has seen a refresh since the resume.
    await textMatches("#health", /^ACTIVE /);
    mkdirSync(OUTPUT_DIR, { recursive: true });
    await page.screenshot({ path: SCREENSHOT });
    t.diagnostic(`screenshot: ${SCREENSHOT}`);
    assert.ok(existsSync(SCREENSHOT));
  });

  test("metadata strings with HTML or script are shown as text and run nothing", async () => {
    const r = await encrypt("req-browser-html", { awsPrincipalArn: PRINCIPAL_HTML, kmsKeyArn: KEY_ARN_HTML });
    assert.equal(r.status, 200, r.text);
    const { cells } = await row("req-browser-html", "OK");
    assert.equal(cells[COL.principal], PRINCIPAL_HTML);
    assert.equal(cells[COL.keyArn], KEY_ARN_HTML);
    assert.equal(await page.locator("#ops img, #ops script").count(), 0);
    assert.equal(await page.evaluate(() => (window as unknown as { __xss?: string }).__xss), undefined);
    assert.equal(await page.title(), "xks-agent");
  });

  test("a page from another origin, or on another Host name, gets nothing", async () => {
    const feed = url.replace("http://", "ws://").replace("/?", "/feed?");
    const dashPort = new URL(url).port;
    /** What a WebSocket to the feed opened from `p` saw: "open", messages, and how it ended. */
    const tryFeed = (p: Page, target: string) =>
      p.evaluate(
        (u) =>
          new Promise<string[]>((resolve) => {
            const seen: string[] = [];
            const ws = new WebSocket(u);
            ws.onopen = () => seen.push("open");
            ws.onmessage = (e) => seen.push(`message ${String(e.data).slice(0, 40)}`);
            ws.onclose = (e) => resolve([...seen, `close ${e.code}`]);
          }),
        target,
      );

    // Another origin (another port on 127.0.0.1) that even knows the token: the handshake is refused.
    attacker = createServer((_req, res) =>
      res.writeHead(200, { "content-type": "text/html" }).end("<!doctype html><title>elsewhere</title>"),
    );
    const attackerPort = await freePort();
    await new Promise<void>((resolve) => attacker!.listen(attackerPort, "127.0.0.1", resolve));
    const other = await ctx.newPage();
    await other.goto(`http://127.0.0.1:${attackerPort}/`);
    assert.deepEqual(await tryFeed(other, feed), ["close 1006"]);

    // The dashboard's own port under a DNS name that resolves to 127.0.0.1: the page is 403…
    const rebound = await other.goto(`http://${REBOUND}:${dashPort}/?token=${new URL(url).searchParams.get("token")}`);
    assert.equal(rebound?.status(), 403);
    assert.doesNotMatch((await rebound?.text()) ?? "", /xks-agent/);
    // …and a page the attacker served under that name before it was rebound (origin = the rebound name and
    // the dashboard's port) cannot open the feed either.
    await other.route(`http://${REBOUND}:${dashPort}/attack`, (r) =>
      r.fulfill({ status: 200, contentType: "text/html", body: "<!doctype html><title>rebound</title>" }),
    );
    await other.goto(`http://${REBOUND}:${dashPort}/attack`);
    assert.deepEqual(await tryFeed(other, feed.replace("127.0.0.1", REBOUND)), ["close 1006"]);
    await other.close();
  });

  test("messages from the page that are not switches change nothing and the agent keeps serving", async () => {
    const feed = url.replace("http://", "ws://").replace("/?", "/feed?");
    const closed = await page.evaluate(
      (u) =>
        new Promise<number>((resolve) => {
          const ws = new WebSocket(u);
          ws.onopen = () => {
            for (const m of ["null", "42", "[]", "{}", "not json", '{"type":"setPaused"}', '{"type":"nope","paused":true}']) ws.send(m);
            ws.send(new Blob(['{"type":"setPaused","paused":true}']));
            ws.send("x".repeat(1 << 20)); // over the limit: closes this connection only
          };
          ws.onclose = (e) => resolve(e.code);
        }),
      feed,
    );
    assert.equal(closed, 1009);
    assert.ok(chain.agent.running);
    await textMatches("#state", /^allowed$/);
    await textMatches("#conn", /^connected$/);
    const r = await encrypt("req-browser-after-junk");
    assert.equal(r.status, 200, r.text);
    await row("req-browser-after-junk", "OK");
    assert.deepEqual(pageErrors, []);
  });

  // Last: it takes "EC2" away.
  test("a tunnel that goes down shows its state, last error and next attempt", async () => {
    await chain.sshd.stop();
    // The state alternates between down and connecting while the agent retries: the row is read in one go once down.
    const down = await page.waitForFunction(() => {
      const cells = [...document.querySelectorAll("#tunnels tr:first-child td")].map((td) => td.textContent ?? "");
      return cells[0] === "local-sshd" && cells[1] === "down" && cells[4] !== "" ? cells : false;
    });
    const cells = (await down.jsonValue()) as string[];
    assert.notEqual(cells[3], "", "the last error");
    assert.match(cells[4], /^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}$/, "the next attempt, in local time");
    assert.ok(chain.agent.running);
  });
});
