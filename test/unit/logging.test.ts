/** The operational log's format (shared/logging.ts): levels as words, the pretty mode, redaction in both. */
import assert from "node:assert/strict";
import { test } from "node:test";
import { createLogger, logFormat, prettyLine } from "../../shared/logging.ts";

function capture(format: "json" | "pretty") {
  const lines: string[] = [];
  const log = createLogger({ level: "debug", name: "xks-test", format }, { write: (l: string) => void lines.push(l) });
  return { log, lines };
}

test("levels are written as words", () => {
  const { log, lines } = capture("json");
  log.debug("d");
  log.info({ agent: "a" }, "i");
  log.warn("w");
  log.error("e");
  assert.deepEqual(
    lines.map((l) => JSON.parse(l).level),
    ["debug", "info", "warn", "error"],
  );
});

test("pretty: one readable line an entry, with the same fields, secrets still redacted", () => {
  const { log, lines } = capture("pretty");
  log.warn({ agent: "mac-1", detail: "two words", n: 3, token: "hunter2-secret" }, "agent down");
  assert.equal(lines.length, 1);
  assert.match(
    lines[0],
    /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z WARN {2}xks-test: agent down agent=mac-1 detail="two words" n=3 token="\[redacted\]"\n$/,
  );
  assert.ok(!lines[0].includes("hunter2"));
  assert.equal(prettyLine("not json"), "not json\n");
});

test("LOG_FORMAT in the environment overrides the config", () => {
  assert.equal(logFormat("json", { LOG_FORMAT: "pretty" }), "pretty");
  assert.equal(logFormat("pretty", { LOG_FORMAT: "json" }), "json");
  assert.equal(logFormat("pretty", { LOG_FORMAT: "xml" }), "pretty");
  assert.equal(logFormat(undefined, {}), "json");
});
