/**
 * A strict reader for the XML property lists launchd reads (plutil is macOS-only): the XML
 * declaration, the DOCTYPE, comments, and <plist version="1.0"> holding one value of dict, array,
 * string, integer, true or false. Anything else (an unknown tag, a stray text, a "--" inside a
 * comment, a dict key without a value, an unclosed tag) throws, naming where.
 */
import { execFileSync } from "node:child_process";

type PlistValue = string | number | boolean | PlistValue[] | { [k: string]: PlistValue };

const unescapeXml = (s: string) =>
  s.replace(/&(lt|gt|amp|quot|apos);/g, (_, e: string) => ({ lt: "<", gt: ">", amp: "&", quot: '"', apos: "'" })[e]!);

export function parsePlist(xml: string): PlistValue {
  let i = 0;
  const fail = (what: string): never => {
    throw new Error(`plist: ${what} at offset ${i}: ${JSON.stringify(xml.slice(i, i + 40))}`);
  };
  const skip = () => {
    for (;;) {
      const before = i;
      while (i < xml.length && /\s/.test(xml[i])) i++;
      if (xml.startsWith("<!--", i)) {
        const end = xml.indexOf("-->", i + 4);
        if (end < 0) fail("unclosed comment");
        if (xml.slice(i + 4, end).includes("--")) fail('"--" inside a comment');
        i = end + 3;
      }
      if (i === before) return;
    }
  };
  const tag = (): { name: string; close: boolean; empty: boolean } => {
    skip();
    const m = /^<(\/?)([a-z]+)((?:\s+[a-z]+="[^"]*")*)\s*(\/?)>/.exec(xml.slice(i));
    if (!m) return fail("expected a tag");
    i += m[0].length;
    return { name: m[2], close: m[1] === "/", empty: m[4] === "/" };
  };
  const text = (name: string): string => {
    const end = xml.indexOf(`</${name}>`, i);
    if (end < 0) fail(`unclosed <${name}>`);
    const t = xml.slice(i, end);
    if (t.includes("<")) fail(`markup inside <${name}>`);
    i = end + name.length + 3;
    return unescapeXml(t);
  };
  const value = (t: { name: string; close: boolean; empty: boolean }): PlistValue => {
    if (t.close) fail(`unexpected </${t.name}>`);
    switch (t.name) {
      case "true":
      case "false":
        if (!t.empty) fail(`<${t.name}> must be empty`);
        return t.name === "true";
      case "string":
        return t.empty ? "" : text("string");
      case "integer": {
        const s = text("integer").trim();
        if (!/^-?\d+$/.test(s)) fail("not an integer");
        return Number(s);
      }
      case "array": {
        const out: PlistValue[] = [];
        if (t.empty) return out;
        for (let n = tag(); !(n.close && n.name === "array"); n = tag()) out.push(value(n));
        return out;
      }
      case "dict": {
        const out: Record<string, PlistValue> = {};
        if (t.empty) return out;
        for (let n = tag(); !(n.close && n.name === "dict"); n = tag()) {
          if (n.name !== "key" || n.close) fail("expected <key> in a dict");
          const k = text("key");
          if (k in out) fail(`duplicate key ${k}`);
          out[k] = value(tag());
        }
        return out;
      }
      default:
        return fail(`unknown tag <${t.name}>`);
    }
  };
  if (!xml.startsWith('<?xml version="1.0" encoding="UTF-8"?>')) fail("no XML declaration");
  i = xml.indexOf("?>") + 2;
  skip();
  const doctype = '<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">';
  if (!xml.startsWith(doctype, i)) fail("no plist DOCTYPE");
  i += doctype.length;
  const open = tag();
  if (open.name !== "plist" || open.close) fail("expected <plist>");
  const root = value(tag());
  const close = tag();
  if (close.name !== "plist" || !close.close) fail("expected </plist>");
  skip();
  if (i !== xml.length) fail("text after </plist>");
  return root;
}

/** python3 plistlib's reading of `xml` (as JSON), or undefined where python3 is not installed. */
export function plistlib(xml: string): unknown {
  try {
    execFileSync("python3", ["-c", "import plistlib"], { stdio: "ignore" });
  } catch {
    return undefined;
  }
  const script = "import json,plistlib,sys; print(json.dumps(plistlib.loads(sys.stdin.buffer.read())))";
  return JSON.parse(execFileSync("python3", ["-c", script], { input: xml, encoding: "utf8" }));
}
