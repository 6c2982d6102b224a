/**
 * Config loading helpers used by both daemons: read a JSON file once, check
 * every field, report every problem at once (file + field), freeze the result.
 * Secrets come from a file, an environment variable or (macOS) the Keychain,
 * never inline in the config, and are never echoed back in errors or logs.
 */
import { readFileSync, statSync } from "node:fs";
import { execFileSync } from "node:child_process";
import { dirname, isAbsolute, resolve } from "node:path";
import { stripJsonComments } from "./jsonc.ts";
import { checkOwnIdentity, type OwnIdentity, type PinnedIdentity, parsePinned } from "./identity.ts";

export class ConfigError extends Error {
  readonly problems: string[];
  constructor(file: string, problems: string[]) {
    super(`invalid config ${file}:\n  - ${problems.join("\n  - ")}`);
    this.name = "ConfigError";
    this.problems = problems;
  }
}

type Obj = Record<string, unknown>;

/**
 * Why a secret file must not be used, or undefined when it is private: like
 * OpenSSH for private keys, a file that any other user may access (a group or
 * other permission bit set) or that another user owns is refused. The answer
 * names the file and the fix, never its content.
 */
export function secretFileProblem(path: string): string | undefined {
  let st: ReturnType<typeof statSync>;
  try {
    st = statSync(path);
  } catch (err) {
    return `cannot read the secret file ${path} (${(err as NodeJS.ErrnoException).code ?? "error"})`;
  }
  if (!st.isFile()) return `the secret file ${path} is not a regular file`;
  const uid = typeof process.getuid === "function" ? process.getuid() : undefined;
  if (uid !== undefined && st.uid !== uid) {
    return `the secret file ${path} is owned by uid ${st.uid}, not by the user running this (uid ${uid}): chown it to that user and chmod 600 ${path}`;
  }
  const mode = st.mode & 0o777;
  if ((mode & 0o077) !== 0) {
    return `the secret file ${path} has mode 0${mode.toString(8)}, so other users may read it: run chmod 600 ${path}`;
  }
  return undefined;
}

/** Reads a secret file after secretFileProblem() found it private; drops one trailing newline. */
export function readSecretFile(path: string): { value: string } | { problem: string } {
  const problem = secretFileProblem(path);
  if (problem !== undefined) return { problem };
  try {
    return { value: readFileSync(path, "utf8").replace(/\r?\n$/, "") };
  } catch (err) {
    return { problem: `cannot read the secret file ${path} (${(err as NodeJS.ErrnoException).code ?? "error"})` };
  }
}

/** Collects problems while reading typed fields out of an untyped object. */
export class Checker {
  readonly problems: string[] = [];
  constructor(readonly file: string) {}

  problem(field: string, msg: string): void {
    this.problems.push(`${field}: ${msg}`);
  }

  object(v: unknown, field: string): Obj {
    if (typeof v === "object" && v !== null && !Array.isArray(v)) return v as Obj;
    this.problem(field, "must be an object");
    return {};
  }

  /** Reports keys that no reader asked for (a typo must not silently fall back to a default). */
  noUnknown(o: Obj, field: string, known: string[]): void {
    for (const k of Object.keys(o)) if (!known.includes(k)) this.problem(field ? `${field}.${k}` : k, "unknown field");
  }

  string(
    o: Obj,
    key: string,
    field: string,
    opts: { default?: string; pattern?: RegExp; min?: number; max?: number; hint?: string } = {},
  ): string {
    const v = o[key];
    const f = field ? `${field}.${key}` : key;
    if (v === undefined) {
      if (opts.default !== undefined) return opts.default;
      this.problem(f, "is required");
      return "";
    }
    if (typeof v !== "string") {
      this.problem(f, "must be a string");
      return "";
    }
    if (opts.min !== undefined && v.length < opts.min) this.problem(f, `must be at least ${opts.min} characters`);
    if (opts.max !== undefined && v.length > opts.max) this.problem(f, `must be at most ${opts.max} characters`);
    if (opts.pattern && !opts.pattern.test(v)) this.problem(f, `must match ${opts.hint ?? opts.pattern}`);
    return v;
  }

  optionalString(o: Obj, key: string, field: string): string | undefined {
    return o[key] === undefined ? undefined : this.string(o, key, field);
  }

  int(o: Obj, key: string, field: string, opts: { default?: number; min?: number; max?: number } = {}): number {
    const v = o[key];
    const f = field ? `${field}.${key}` : key;
    if (v === undefined) {
      if (opts.default !== undefined) return opts.default;
      this.problem(f, "is required");
      return 0;
    }
    if (typeof v !== "number" || !Number.isInteger(v)) {
      this.problem(f, "must be an integer");
      return opts.default ?? 0;
    }
    if (opts.min !== undefined && v < opts.min) this.problem(f, `must be >= ${opts.min}`);
    if (opts.max !== undefined && v > opts.max) this.problem(f, `must be <= ${opts.max}`);
    return v;
  }

  bool(o: Obj, key: string, field: string, def: boolean): boolean {
    const v = o[key];
    if (v === undefined) return def;
    if (typeof v !== "boolean") this.problem(field ? `${field}.${key}` : key, "must be true or false");
    return v === true;
  }

  array(o: Obj, key: string, field: string, opts: { min?: number; optional?: boolean } = {}): unknown[] {
    const v = o[key];
    const f = field ? `${field}.${key}` : key;
    if (v === undefined && opts.optional) return [];
    if (!Array.isArray(v)) {
      this.problem(f, "must be an array");
      return [];
    }
    if (opts.min !== undefined && v.length < opts.min) this.problem(f, `must have at least ${opts.min} entries`);
    return v;
  }

  /** A path; relative paths are taken from the config file's folder. */
  path(o: Obj, key: string, field: string, def?: string): string {
    const p = this.string(o, key, field, def === undefined ? {} : { default: def });
    return p === "" ? p : isAbsolute(p) ? p : resolve(dirname(this.file), p);
  }

  /**
   * A secret reference: {"file": path} | {"env": NAME} | {"keychain": {"service", "account"}}.
   * Returns the secret's value; problems name the field, never the value.
   */
  secret(o: Obj, key: string, field: string, env: NodeJS.ProcessEnv = process.env): string {
    return this.secretRef(o, key, field, env).value;
  }

  /** Like secret(), for an optional field: undefined when the field is absent. */
  optionalSecret(o: Obj, key: string, field: string, env: NodeJS.ProcessEnv = process.env): string | undefined {
    return o[key] === undefined ? undefined : this.secret(o, key, field, env);
  }

  /**
   * Like secret(), and also says which file the secret came from (when it is a
   * {"file": …} reference), so that the caller can read it again later. A file
   * must be private (secretFileProblem).
   */
  secretRef(o: Obj, key: string, field: string, env: NodeJS.ProcessEnv = process.env): { value: string; file?: string } {
    const f = field ? `${field}.${key}` : key;
    const ref = o[key];
    if (typeof ref === "string") {
      this.problem(f, 'must reference a secret ({"file": …}, {"env": …} or {"keychain": …}), not hold it inline');
      return { value: "" };
    }
    const r = this.object(ref, f);
    const kinds = ["file", "env", "keychain"].filter((k) => r[k] !== undefined);
    if (kinds.length !== 1) {
      this.problem(f, 'must have exactly one of "file", "env", "keychain"');
      return { value: "" };
    }
    try {
      if (r.file !== undefined) {
        const p = this.path(r, "file", f);
        if (p === "") return { value: "" };
        const read = readSecretFile(p);
        if ("problem" in read) {
          this.problem(f, read.problem);
          return { value: "", file: p };
        }
        return { value: read.value, file: p };
      }
      if (r.env !== undefined) {
        const name = this.string(r, "env", f);
        const v = env[name];
        if (v === undefined || v === "") this.problem(f, `environment variable ${name} is not set`);
        return { value: v ?? "" };
      }
      const kc = this.object(r.keychain, `${f}.keychain`);
      const service = this.string(kc, "service", `${f}.keychain`);
      const account = this.string(kc, "account", `${f}.keychain`);
      if (process.platform !== "darwin") {
        this.problem(`${f}.keychain`, "the Keychain is only available on macOS");
        return { value: "" };
      }
      const printed = execFileSync("/usr/bin/security", ["find-generic-password", "-a", account, "-s", service, "-w"], {
        encoding: "utf8",
        stdio: ["ignore", "pipe", "ignore"],
      }).replace(/\n$/, "");
      return { value: fromSecurityOutput(printed) };
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      this.problem(f, `cannot read the secret (${code ?? "lookup failed"})`);
      return { value: "" };
    }
  }

  /**
   * This side's identity on the proxy↔agent channel: {"key": <secret reference to the PEM private key>,
   * "certificate": <path to its PEM certificate>}. The key must belong to the certificate.
   */
  identity(o: Obj, key: string, field: string, env: NodeJS.ProcessEnv = process.env): (OwnIdentity & { fingerprint: string }) | undefined {
    const f = field ? `${field}.${key}` : key;
    const io = this.object(o[key], f);
    this.noUnknown(io, f, ["key", "certificate"]);
    const pem = this.secret(io, "key", f, env);
    const certificate = this.textFile(io, "certificate", f);
    if (pem === "" || certificate === undefined) return undefined;
    try {
      return { key: pem, certificate, fingerprint: checkOwnIdentity({ key: pem, certificate }) };
    } catch (err) {
      this.problem(f, (err as Error).message);
      return undefined;
    }
  }

  /** The peer identities this side accepts: 1 or 2 paths to PEM certificates (two while one is being rotated). */
  pins(o: Obj, key: string, field: string): PinnedIdentity[] {
    const f = field ? `${field}.${key}` : key;
    const list = this.array(o, key, field, { min: 1 });
    if (list.length > 2) this.problem(f, "must have 1 or 2 entries (the current identity and, while rotating, the next)");
    const pins: PinnedIdentity[] = [];
    list.forEach((v, i) => {
      const fi = `${f}[${i}]`;
      if (typeof v !== "string" || v === "") {
        this.problem(fi, "must be the path of a PEM certificate");
        return;
      }
      const text = this.readText(isAbsolute(v) ? v : resolve(dirname(this.file), v), fi);
      if (text === undefined) return;
      try {
        const pin = parsePinned(text);
        if (pins.some((p) => p.fingerprint === pin.fingerprint)) this.problem(fi, "the same identity is pinned twice");
        pins.push(pin);
      } catch (err) {
        this.problem(fi, (err as Error).message);
      }
    });
    return pins;
  }

  /** The text of a (public) file named by a path field; undefined after reporting a problem. */
  private textFile(o: Obj, key: string, field: string): string | undefined {
    const p = this.path(o, key, field);
    return p === "" ? undefined : this.readText(p, `${field}.${key}`);
  }

  private readText(path: string, field: string): string | undefined {
    try {
      return readFileSync(path, "utf8");
    } catch (err) {
      this.problem(field, `cannot read ${path} (${(err as NodeJS.ErrnoException).code ?? "error"})`);
      return undefined;
    }
  }

  /** Throws one ConfigError listing every problem, if any. */
  done(): void {
    if (this.problems.length > 0) throw new ConfigError(this.file, this.problems);
  }
}

/**
 * `security find-generic-password -w` prints a value that holds a newline (a
 * PEM key, say) as hex instead of text; such output is decoded back when it is
 * all hex and decodes to a PEM block.
 */
export function fromSecurityOutput(printed: string): string {
  if (/^(?:[0-9a-f]{2})+$/i.test(printed)) {
    const text = Buffer.from(printed, "hex").toString("utf8");
    if (text.startsWith("-----BEGIN ")) return text;
  }
  return printed;
}

/** Reads and parses a JSON config file (comments allowed: shared/jsonc.ts); a read or parse failure is a ConfigError. */
export function readJsonFile(file: string): unknown {
  let text: string;
  try {
    text = readFileSync(file, "utf8");
  } catch (err) {
    throw new ConfigError(file, [`cannot read file (${(err as NodeJS.ErrnoException).code ?? "error"})`]);
  }
  try {
    return JSON.parse(stripJsonComments(text));
  } catch (err) {
    throw new ConfigError(file, [`not valid JSON (${(err as Error).message})`]);
  }
}

export function deepFreeze<T>(o: T): T {
  if (typeof o === "object" && o !== null && !ArrayBuffer.isView(o) && !Object.isFrozen(o)) {
    Object.freeze(o);
    for (const v of Object.values(o)) deepFreeze(v);
  }
  return o;
}
