/**
 * The pieces both daemons build their config schemas from (zod). A schema is
 * the single source of a config file's shape: validation, the TypeScript type
 * (z.output), the defaults, and the reference page (`npm run gen:config-docs`
 * walks the schemas' JSON Schema and their `.describe()` texts).
 *
 * Problems keep the wording the hand-written checks had ("<field>: <problem>",
 * field paths like `keyStores[0].keys[2]`), every one reported at once, in
 * the order of the fields: unknown fields of an object first, then its fields
 * in declaration order, array entries by index.
 *
 * Reading a secret, a certificate or a relative path needs the config file's
 * folder and the environment, so schemas are built per load by a function of
 * a LoadContext; the reference page builds them with a placeholder context.
 */
import * as z from "zod";
import { Checker, ConfigError, readJsonFile } from "./config.ts";
import type { OwnIdentity, PinnedIdentity } from "./identity.ts";
import { availableParallelism } from "node:os";
import { isAbsolute, dirname, resolve } from "node:path";

export { z };

export interface LoadContext {
  /** The config file; relative paths resolve from its folder. */
  file: string;
  env: NodeJS.ProcessEnv;
}

/** The context the reference page builds schemas with (nothing is read). */
export const DOCS_CONTEXT: LoadContext = { file: "/config.json", env: {} };

type Path = PropertyKey[];

/** `a.b[0].c`; the root is "(root)". */
export function fieldName(path: Path): string {
  let s = "";
  for (const p of path) s += typeof p === "number" ? `[${p}]` : s === "" ? String(p) : `.${String(p)}`;
  return s === "" ? "(root)" : s;
}

/** Our wording for zod's built-in issues; a schema's own `error` text wins over it. */
const wording: z.core.$ZodErrorMap = (iss) => {
  switch (iss.code) {
    case "invalid_type": {
      // A missing array or object reads as before the schema: "must be an array" / "must be an object".
      if (iss.input === undefined && iss.expected !== "array" && iss.expected !== "object") return "is required";
      const what: Record<string, string> = {
        string: "must be a string",
        int: "must be an integer",
        // int() marks its schema an integer in its metadata.
        number: iss.inst && z.globalRegistry.get(iss.inst as z.ZodType)?.type === "integer" ? "must be an integer" : "must be a number",
        object: "must be an object",
        array: "must be an array",
        boolean: "must be true or false",
      };
      return what[iss.expected] ?? `must be ${iss.expected}`;
    }
    case "too_small":
      if (iss.origin === "string") return `must be at least ${iss.minimum} characters`;
      if (iss.origin === "array") return `must have at least ${iss.minimum} entries`;
      return iss.inclusive ? `must be >= ${iss.minimum}` : `must be > ${iss.minimum}`;
    case "too_big":
      if (iss.origin === "string") return `must be at most ${iss.maximum} characters`;
      if (iss.origin === "array") return `must have at most ${iss.maximum} entries`;
      return iss.inclusive ? `must be <= ${iss.maximum}` : `must be < ${iss.maximum}`;
    case "invalid_format":
      return iss.format === "regex" && "pattern" in iss ? `must match ${iss.pattern}` : `must be a ${iss.format}`;
    case "invalid_value":
      return `must be one of ${iss.values.map((v) => (typeof v === "string" ? v : JSON.stringify(v))).join(", ")}`;
    default:
      return undefined;
  }
};

/**
 * The problems of a failed parse, one line per problem, ordered like the
 * fields (see the header).
 */
export function problemsOf(issues: readonly z.core.$ZodIssue[]): string[] {
  // zod reports an object's fields in declaration order, depth first, and its unknown fields
  // after them: each unknown field moves to the front of its object's problems.
  const ordered: { path: Path; msg: string }[] = [];
  const within = (path: Path, obj: Path) => obj.every((p, i) => path[i] === p);
  for (const iss of issues) {
    if (iss.code !== "unrecognized_keys") {
      ordered.push({ path: iss.path, msg: iss.message });
      continue;
    }
    const first = ordered.findIndex((o) => within(o.path, iss.path));
    const unknown = iss.keys.map((k) => ({ path: [...iss.path, k], msg: "unknown field" }));
    ordered.splice(first < 0 ? ordered.length : first, 0, ...unknown);
  }
  // A tree of the paths in order of first mention, array indices sorted.
  interface Node {
    here: string[];
    kids: Map<PropertyKey, Node>;
  }
  const root: Node = { here: [], kids: new Map() };
  for (const { path, msg } of ordered) {
    let n = root;
    for (const p of path) {
      let k = n.kids.get(p);
      if (!k) {
        k = { here: [], kids: new Map() };
        n.kids.set(p, k);
      }
      n = k;
    }
    n.here.push(msg);
  }
  const out: string[] = [];
  const walk = (n: Node, path: Path) => {
    for (const m of n.here) out.push(`${fieldName(path)}: ${m}`);
    const keys = [...n.kids.keys()];
    if (keys.every((k) => typeof k === "number")) keys.sort((a, b) => (a as number) - (b as number));
    for (const k of keys) walk(n.kids.get(k) as Node, [...path, k]);
  };
  walk(root, []);
  return out;
}

/** Parses `raw` with `schema`; throws one ConfigError naming `file` with every problem. */
export function parseConfig<S extends z.ZodType>(schema: S, raw: unknown, file: string): z.output<S> {
  const r = schema.safeParse(raw, { error: wording });
  if (!r.success) throw new ConfigError(file, problemsOf(r.error.issues));
  return r.data;
}

/** Reads a JSON (with comments) config file and parses it with `schema`. */
export function loadConfig<S extends z.ZodType>(schema: S, file: string): z.output<S> {
  return parseConfig(schema, readJsonFile(file), file);
}

// ---- field builders ------------------------------------------------------

// A check's `when` (zod's $ZodCheckDef) runs it only on integers; the classic API's types omit it.
const whenInteger = { when: (p: { value: unknown }) => Number.isInteger(p.value) } as never;

/**
 * An integer in [min, max]. Not z.int(): its check stops every later check of
 * the whole file (a rule between fields would go unreported), and a fraction
 * gets one problem ("must be an integer"), not a range problem besides.
 */
export function int(min: number, max: number) {
  return z
    .number()
    .check(z.refine((v: number) => Number.isInteger(v), { error: "must be an integer" }))
    .min(min, whenInteger)
    .max(max, whenInteger)
    .meta({ type: "integer" });
}

/** A string matching `re`; a mismatch says `must match <hint>`. */
export function matching(re: RegExp, hint: string) {
  return z.string().regex(re, { error: `must match ${hint}` });
}

/** An object with these fields and no others; absent, it is `{}` (its fields' defaults). */
export function section<T extends z.core.$ZodLooseShape>(shape: T) {
  return z.strictObject(shape).prefault({} as never);
}

/**
 * Runs one of the Checker's readers (secrets, identities, pins) on a value,
 * turning its problems into issues at the value's path (and below it).
 */
export function viaChecker<T>(
  ctx: LoadContext,
  zc: z.core.$RefinementCtx,
  read: (c: Checker, holder: Record<string, unknown>) => T,
  v: unknown,
): T {
  const c = new Checker(ctx.file);
  const out = read(c, { v });
  for (const p of c.problems) {
    // Checker problems read "v<.sub.path>: message".
    const colon = p.indexOf(": ");
    const sub = [...p.slice(1, colon).matchAll(/\.([^.[]+)|\[(\d+)\]/g)].map((m) => (m[2] !== undefined ? Number(m[2]) : m[1]));
    zc.issues.push({ code: "custom", message: p.slice(colon + 2), input: v, path: sub });
  }
  return out;
}

/**
 * A secret reference ({"file": path} | {"env": NAME} | {"keychain": {"service", "account"}}),
 * read at load: the value and, for a file, the file it came from. Problems
 * name the field, never the value.
 */
export function secretRef(ctx: LoadContext) {
  return z
    .unknown()
    .transform((v, zc) => viaChecker(ctx, zc, (c, o) => c.secretRef(o, "v", "", ctx.env), v))
    .meta({ kind: "secret" });
}

/** A secret reference, read at load: the value. */
export function secret(ctx: LoadContext) {
  return z
    .unknown()
    .transform((v, zc) => viaChecker(ctx, zc, (c, o) => c.secret(o, "v", "", ctx.env), v))
    .meta({ kind: "secret" });
}

/** A path; relative to the config file's folder. */
export function path(ctx: LoadContext) {
  return z
    .string()
    .transform((p) => (p === "" || isAbsolute(p) ? p : resolve(dirname(ctx.file), p)))
    .meta({ kind: "path" });
}

/** This side's identity on the proxy↔agent channel: {"key": <secret reference>, "certificate": <path>}. */
export function identity(ctx: LoadContext) {
  return z
    .unknown()
    .transform(
      (v, zc): OwnIdentity & { fingerprint: string } =>
        viaChecker(ctx, zc, (c, o) => c.identity(o, "v", "", ctx.env), v) ?? { key: "", certificate: "", fingerprint: "" },
    )
    .meta({ kind: "identity" });
}

/** The peer certificates accepted: 1 or 2 paths to PEM certificates. */
export function pins(ctx: LoadContext) {
  return z
    .unknown()
    .transform((v, zc): PinnedIdentity[] => viaChecker(ctx, zc, (c, o) => c.pins(o, "v", ""), v))
    .meta({ kind: "pins" });
}

export const LOG_LEVELS = ["fatal", "error", "warn", "info", "debug", "trace", "silent"] as const;

/** `log`, the same for both daemons. */
export function logSection() {
  return section({
    level: z.enum(LOG_LEVELS).default("info").describe("the least severe level written"),
    format: z
      .enum(["json", "pretty"])
      .default("json")
      .describe(
        '"json" (one JSON object a line, for journald and log shippers) or "pretty" (one readable line an entry, for a terminal); LOG_FORMAT=pretty in the environment overrides it',
      ),
  }).describe("the operational log on stdout");
}

/** `metrics`: a Prometheus endpoint on a listener of its own; off when absent. */
export function metricsSection(defaultPort: number) {
  return z
    .strictObject({
      host: z
        .string()
        .min(1)
        .default("127.0.0.1")
        .describe("address the metrics listener binds (loopback unless a scraper elsewhere needs it)"),
      port: int(0, 65535).default(defaultPort).describe("its port; GET /metrics answers in the Prometheus text format"),
    })
    .optional()
    .describe("Prometheus metrics on a listener of their own; absent: no metrics listener");
}

/** An integer field that may be invalid (a rule between fields runs even when a field failed): its value if an integer, else the default. */
export function numOr(v: unknown, def: number): number {
  return Number.isInteger(v) ? (v as number) : def;
}

/** A daemon's `workers`: "auto" (one process per core) or 1..64 processes. */
export function workersField() {
  return z
    .union([z.literal("auto"), int(1, 64)], { error: 'must be "auto" or an integer from 1 to 64' })
    .meta({ kind: '`"auto"` or integer 1–64' });
}

/** How many processes `workers` means on a machine with `cores` cores. */
export function workerCount(workers: "auto" | number, cores: number = availableParallelism()): number {
  return workers === "auto" ? Math.max(1, Math.min(64, cores)) : workers;
}
