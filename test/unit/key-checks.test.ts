/** The proxy's comparison of the agents' key check values (proxy/key-checks.ts), on its own. */
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { KeyCheckBook } from "../../proxy/key-checks.ts";
import { createLogger } from "../../shared/logging.ts";
import { LogCapture } from "../../testbed/logs.ts";

const kc = (keyId: string, checkValue: string) => ({ keyId, checkValue, problem: checkValue ? "" : "none" });

function book(): { book: KeyCheckBook; logs: LogCapture } {
  const logs = new LogCapture();
  return { book: new KeyCheckBook(createLogger({ level: "debug" }, logs)), logs };
}

describe("key check values across agents", () => {
  it("agreeing agents: nothing refused, nothing logged", () => {
    const { book: b, logs } = book();
    b.report("a", [kc("k1", "aes-ecb:010203"), kc("k2", "aes-ecb-dec:aabbcc")]);
    b.report("b", [kc("k1", "aes-ecb:010203"), kc("k2", "aes-ecb-dec:aabbcc")]);
    assert.equal(b.refusal("k1"), undefined);
    assert.equal(b.problemOf("a"), undefined);
    assert.equal(b.agreeing(), 2);
    assert.deepEqual(logs.lines, []);
  });

  it("a key only one agent holds, or without a value, is routed", () => {
    const { book: b } = book();
    b.report("a", [kc("k1", "aes-ecb:010203"), kc("k3", "")]);
    b.report("b", [kc("k2", "aes-ecb:999999"), kc("k3", "")]);
    for (const k of ["k1", "k2", "k3"]) assert.equal(b.refusal(k), undefined, k);
    assert.equal(b.agreeing(), 0);
  });

  it("values that differ: the key is refused, one error per change naming agents (grouped) but no value; agreeing again is logged", () => {
    const { book: b, logs } = book();
    b.report("a", [kc("k1", "aes-ecb:010203"), kc("k2", "aes-ecb:0a0b0c")]);
    b.report("b", [kc("k1", "aes-ecb:ffeedd"), kc("k2", "aes-ecb:0a0b0c")]);
    b.report("c", [kc("k1", "aes-ecb:010203")]);
    assert.match(b.refusal("k1") ?? "", /key k1 is not routed: its key check values differ between agents \[a, c\] vs \[b\]/);
    assert.equal(b.refusal("k2"), undefined);
    assert.match(b.problemOf("b") ?? "", /k1 \(\[a, c\] vs \[b\]\)/);
    // Reports that change nothing log nothing.
    for (let i = 0; i < 5; i++) b.report("b", [kc("k1", "aes-ecb:ffeedd"), kc("k2", "aes-ecb:0a0b0c")]);
    const errors = logs.json().filter((l) => l.level === "error");
    assert.equal(errors.length, 2, "one line when a, b disagree, one when c joins a's group");
    assert.deepEqual(errors.at(-1)?.agentGroups, [["a", "c"], ["b"]]);
    for (const v of ["010203", "ffeedd", "0a0b0c"]) assert.ok(!logs.text().includes(v), "no check value in the log");
    assert.deepEqual(
      b.list().map((m) => m.keyId),
      ["k1"],
    );
    b.report("b", [kc("k1", "aes-ecb:010203"), kc("k2", "aes-ecb:0a0b0c")]);
    assert.equal(b.refusal("k1"), undefined);
    assert.equal(b.problemOf("b"), undefined);
    assert.match(logs.json().at(-1)?.msg ?? "", /key check values of key k1 agree again/);
  });

  it("the same key with different usage counts as different", () => {
    const { book: b } = book();
    b.report("a", [kc("k1", "aes-ecb:010203")]);
    b.report("b", [kc("k1", "aes-ecb-dec:440011")]);
    assert.notEqual(b.refusal("k1"), undefined);
  });
});
