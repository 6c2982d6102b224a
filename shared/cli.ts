/**
 * The command-line convention both binaries follow. A program is a table of
 * commands; a command is its words ("keys create"), a one-line summary, its
 * options (node:util parseArgs, strict), examples and a run function, so
 * adding a subcommand is adding one entry to the table.
 *
 *   PROG --version | -V | version     the package version
 *   PROG --help | -h | help           every command with its summary, and the exit codes
 *   PROG CMD --help                   the command's usage, options and examples; never runs it
 *   PROG CMD [options]                runs it
 *
 * Exit codes, for every command of both binaries:
 *   0  done
 *   1  a runtime failure (the HSM, the network, a check that failed, a file that exists)
 *   2  a usage or config error (unknown command or option, a missing or bad value, an invalid config file)
 *
 * An unknown option, a missing value or a stray argument is refused with exit
 * 2 and names the option. Errors are one message on stderr, never a stack trace.
 */
import { parseArgs } from "node:util";
import { ConfigError } from "./config.ts";
import { errorMessage } from "./errors.ts";

export const EXIT = { ok: 0, failure: 1, usage: 2 } as const;

/** The exit code table, as the help and the README print it. */
export const EXIT_CODES_HELP = `exit codes:
  0  done
  1  runtime failure (HSM, network, a failed check, a file that exists already)
  2  usage or config error (unknown command or option, missing or bad value, invalid config file)`;

/** A usage error: the command line is wrong (exit 2). */
export class UsageError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "UsageError";
  }
}

/** A runtime failure the command has explained (exit 1, the message on stderr). */
export class CommandFailure extends Error {
  constructor(message: string) {
    super(message);
    this.name = "CommandFailure";
  }
}

export interface OptionSpec {
  type: "string" | "boolean";
  short?: string;
  /** The value's placeholder in the help (FILE, LABEL…). */
  arg?: string;
  description: string;
  required?: boolean;
  default?: string;
}

type ValueOf<O extends OptionSpec> = O["type"] extends "boolean"
  ? boolean
  : O extends { required: true }
    ? string
    : O extends { default: string }
      ? string
      : string | undefined;

export type Values<O extends Record<string, OptionSpec>> = { [K in keyof O]: ValueOf<O[K]> };

export interface Command<O extends Record<string, OptionSpec> = Record<string, OptionSpec>> {
  /** The command's words, e.g. "keys create". */
  name: string;
  summary: string;
  options: O;
  /** More text for the help, after the options. */
  details?: string;
  /** Complete command lines, shown in the help. */
  examples: string[];
  run(values: Values<O>): number | Promise<number>;
}

/** Declares a command with its option values typed from its option table. */
export function command<const O extends Record<string, OptionSpec>>(c: Command<O>): Command {
  return c as unknown as Command;
}

export interface Program {
  name: string;
  version: string;
  summary: string;
  commands: Command[];
}

const HELP_OPTION: OptionSpec = { type: "boolean", short: "h", description: "this help; nothing else is done" };

function optionLine(name: string, o: OptionSpec): [string, string] {
  const left = `${o.short ? `-${o.short}, ` : "    "}--${name}${o.type === "string" ? ` ${o.arg ?? "VALUE"}` : ""}`;
  const extra = o.required ? " (required)" : o.default !== undefined ? ` (default ${JSON.stringify(o.default)})` : "";
  return [left, `${o.description}${extra}`];
}

function table(rows: Array<[string, string]>, indent = "  "): string {
  const w = Math.max(...rows.map(([l]) => l.length));
  return rows.map(([l, r]) => `${indent}${l.padEnd(w)}  ${r}`).join("\n");
}

function synopsis(p: Program, c: Command): string {
  const parts = Object.entries(c.options).map(([n, o]) => {
    const s = `--${n}${o.type === "string" ? ` ${o.arg ?? "VALUE"}` : ""}`;
    return o.required ? s : `[${s}]`;
  });
  return `${p.name} ${c.name}${parts.length ? ` ${parts.join(" ")}` : ""}`;
}

export function commandHelp(p: Program, c: Command): string {
  const opts = Object.entries({ ...c.options, help: HELP_OPTION }).map(([n, o]) => optionLine(n, o));
  return [
    `${p.name} ${c.name}: ${c.summary}`,
    "",
    `usage: ${synopsis(p, c)}`,
    "",
    "options:",
    table(opts),
    ...(c.details ? ["", c.details] : []),
    "",
    c.examples.length === 1 ? "example:" : "examples:",
    ...c.examples.map((e) => `  ${e}`),
    "",
    EXIT_CODES_HELP,
  ].join("\n");
}

export function programHelp(p: Program, only?: Command[]): string {
  const cmds = only ?? p.commands;
  return [
    `${p.name} ${p.version}: ${p.summary}`,
    "",
    "commands:",
    table(cmds.map((c) => [c.name, c.summary])),
    "",
    `${p.name} COMMAND --help shows a command's options and an example; ${p.name} --version prints the version.`,
    "",
    EXIT_CODES_HELP,
  ].join("\n");
}

/** The command named by the first words of argv (the longest match), and the arguments after its name. */
function findCommand(p: Program, argv: string[]): { cmd?: Command; rest: string[]; group: Command[] } {
  let best: Command | undefined;
  for (const c of p.commands) {
    const words = c.name.split(" ");
    if (words.every((w, i) => argv[i] === w) && (!best || words.length > best.name.split(" ").length)) best = c;
  }
  if (best) return { cmd: best, rest: argv.slice(best.name.split(" ").length), group: [] };
  return { rest: argv, group: p.commands.filter((c) => c.name.split(" ")[0] === argv[0]) };
}

/** Whether the arguments ask for help (`--help`/`-h` as an option, not as another option's value). */
function asksForHelp(c: Command, args: string[]): boolean {
  const { tokens } = parseArgs({
    args,
    options: { ...optionsFor(c), help: { type: "boolean", short: "h" } },
    strict: false,
    allowPositionals: true,
    tokens: true,
  });
  return tokens.some((t) => t.kind === "option" && t.name === "help");
}

function optionsFor(c: Command): Record<string, { type: "string" | "boolean"; short?: string; default?: string }> {
  return Object.fromEntries(
    Object.entries(c.options).map(([n, o]) => [
      n,
      { type: o.type, ...(o.short ? { short: o.short } : {}), ...(o.default !== undefined ? { default: o.default } : {}) },
    ]),
  );
}

/** Runs the program on argv (without node and the script); resolves with the exit code. */
export async function runProgram(p: Program, argv: string[]): Promise<number> {
  const err = (s: string) => process.stderr.write(`${s}\n`);
  const first = argv[0];
  if (first === "--version" || first === "-V" || (first === "version" && argv.length === 1)) {
    process.stdout.write(`${p.name} ${p.version}\n`);
    return EXIT.ok;
  }
  if (first === "--help" || first === "-h" || first === "help") {
    const topic = first === "help" ? findCommand(p, argv.slice(1)) : undefined;
    process.stdout.write(`${topic?.cmd ? commandHelp(p, topic.cmd) : programHelp(p, topic?.group.length ? topic.group : undefined)}\n`);
    return EXIT.ok;
  }
  if (first === undefined) {
    err(programHelp(p));
    return EXIT.usage;
  }
  const { cmd, rest, group } = findCommand(p, argv);
  if (!cmd) {
    if (group.length > 0) {
      const helpOnly = argv.length === 2 && (argv[1] === "--help" || argv[1] === "-h");
      if (helpOnly) {
        process.stdout.write(`${programHelp(p, group)}\n`);
        return EXIT.ok;
      }
      const what = argv.length === 1 || argv[1].startsWith("-") ? `'${first}' needs a command` : `unknown command '${first} ${argv[1]}'`;
      err(`${p.name}: ${what}; the ${first} commands are: ${group.map((c) => c.name).join(", ")}`);
    } else {
      err(`${p.name}: unknown command '${first}'; ${p.name} --help lists the commands`);
    }
    return EXIT.usage;
  }
  if (asksForHelp(cmd, rest)) {
    process.stdout.write(`${commandHelp(p, cmd)}\n`);
    return EXIT.ok;
  }
  const usage = (msg: string) => {
    err(`${p.name} ${cmd.name}: ${msg}\nusage: ${synopsis(p, cmd)}\n(${p.name} ${cmd.name} --help for more)`);
    return EXIT.usage;
  };
  let values: Record<string, string | boolean | undefined>;
  try {
    values = parseArgs({ args: rest, options: optionsFor(cmd), strict: true, allowPositionals: false }).values;
  } catch (e) {
    const m = errorMessage(e)
      .split("\n")[0]
      .replace(/\. This command does not take positional arguments$/, "");
    return usage(m.charAt(0).toLowerCase() + m.slice(1));
  }
  for (const [n, o] of Object.entries(cmd.options)) {
    if (o.required && (values[n] === undefined || values[n] === "")) return usage(`--${n} ${o.arg ?? "VALUE"} is required`);
  }
  for (const n of Object.keys(cmd.options)) if (cmd.options[n].type === "boolean") values[n] ??= false;
  try {
    return await cmd.run(values as never);
  } catch (e) {
    if (e instanceof UsageError) return usage(e.message);
    if (e instanceof ConfigError) {
      err(e.message);
      return EXIT.usage;
    }
    err(`${p.name} ${cmd.name}: ${errorMessage(e)}`);
    return EXIT.failure;
  }
}
