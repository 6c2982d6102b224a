/**
 * `xks-agent token backup | restore | verify`: the SoftHSM token, kept safe.
 *
 * The agent makes its keys sensitive and never extractable, so the token's
 * files (SoftHSM's token folder, the key material encrypted under the PIN)
 * are the ONLY copy of the keys: lose them and every ciphertext KMS made under
 * those keys is lost for good. A backup is that folder in an encrypted archive:
 *
 *   header (64 bytes, authenticated as the AAD of the encryption):
 *     "XKS-TOKEN-BACKUP" (16 bytes) | version 1 (1 byte) | scrypt log2(N), r, p (1 byte each)
 *     | salt (32 bytes) | AES-GCM IV (12 bytes)
 *   AES-256-GCM(key = scrypt(passphrase, salt, N, r, p), IV, AAD = header) of a JSON payload
 *   | the 16-byte tag
 *
 * The payload holds the token folder's files and a manifest made with the
 * live token at backup time: the key check value of every key
 * (agent/hsm/key-check.ts) and, for every AES-256 key that may encrypt and
 * decrypt, a probe: a random plaintext's SHA-256 and its AES-GCM encryption
 * by that key. `restore` decrypts the archive (a wrong passphrase or any
 * altered byte fails authentication, before anything is written), refuses to
 * overwrite or duplicate a token, writes the folder, and then verifies it:
 * through a temporary softhsm2.conf pointing at the restored folder, the
 * restored token must decrypt every probe and give every key's check value.
 * `verify` does the same check of any token against an archive.
 *
 * The passphrase comes from a private file (--passphrase-file, mode 0600),
 * from standard input, or from a prompt without echo; never from the command
 * line, and it is never printed or logged. Restoring needs the token's user
 * PIN too (from the agent config), so the archive, its passphrase and the PIN
 * must be kept apart.
 */
import { createCipheriv, createDecipheriv, createHash, randomBytes, scrypt } from "node:crypto";
import {
  closeSync,
  existsSync,
  fstatSync,
  mkdirSync,
  mkdtempSync,
  openSync,
  readdirSync,
  readFileSync,
  renameSync,
  rmSync,
  writeFileSync,
  writeSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { basename, join, resolve } from "node:path";
import pkcs11js from "pkcs11js"; // NOT `import * as`: under ESM that loses every constant
import { readSecretFile } from "../shared/config.ts";
import { errorMessage } from "../shared/errors.ts";
import { createLogger } from "../shared/logging.ts";
import { KEY_BYTES, TAG_BYTES } from "../shared/xks-spec.ts";
import type { AgentConfig } from "./config.ts";
import { Hsm } from "./hsm/hsm.ts";
import { keyCheckValue, kcvMethod } from "./hsm/key-check.ts";
import { freshIv, gcmMechanism } from "./xks-crypto.ts";

const MAGIC = Buffer.from("XKS-TOKEN-BACKUP", "ascii");
const VERSION = 1;
const HEADER_BYTES = MAGIC.length + 4 + 32 + 12;
/** scrypt cost: N = 2^17, r = 8, p = 1 (128 MiB, about a second on a laptop). */
const SCRYPT = { log2N: 17, r: 8, p: 1 };
/** An archive larger than this is not one of ours (a SoftHSM token is kilobytes per key). */
const MAX_ARCHIVE_BYTES = 256 << 20;
export const MIN_PASSPHRASE_CHARS = 12;
const PROBE_AAD = Buffer.from("xks-agent token backup probe");

export const ONLY_COPY =
  "The token is the only copy of its keys: they were made non-extractable and exist nowhere else. " +
  "Keep this archive, its passphrase and the token's user PIN in three separate places: " +
  "the archive without the passphrase is useless, and so is a restored token without the PIN.";

/** What `token verify` compares a token with: made from the live token when the backup is taken. */
export interface Manifest {
  tokenLabel: string;
  tokenSerial: string;
  keys: Array<{ label: string; checkValue: string; problem: string }>;
  probes: Array<{ label: string; iv: string; ciphertext: string; tag: string; plaintextSha256: string }>;
}

interface Payload {
  format: "xks-token-backup";
  version: number;
  createdAt: string;
  /** The token's folder name under SoftHSM's directories.tokendir. */
  folder: string;
  /** SoftHSM's objectstore.backend of the original ("file" or "db"). */
  backend: string;
  files: Array<{ name: string; data: string }>;
  manifest: Manifest;
}

export class TokenBackupError extends Error {}

// ---------------------------------------------------------------- SoftHSM's files

/** SoftHSM's settings file: SOFTHSM2_CONF, or the first of the usual places that exists. */
export function softhsmConfFile(env: NodeJS.ProcessEnv = process.env): string {
  if (env.SOFTHSM2_CONF) return env.SOFTHSM2_CONF;
  const found = ["/opt/homebrew/etc/softhsm/softhsm2.conf", "/usr/local/etc/softhsm/softhsm2.conf", "/etc/softhsm/softhsm2.conf"].find(
    (p) => existsSync(p),
  );
  if (!found) throw new TokenBackupError("SOFTHSM2_CONF is not set and no softhsm2.conf was found in the usual places");
  return found;
}

/** A `key = value` setting of a softhsm2.conf (lines starting with # are comments). */
export function softhsmSetting(confText: string, key: string): string | undefined {
  for (const line of confText.split("\n")) {
    const m = /^\s*([^#=\s]+)\s*=\s*(.*?)\s*$/.exec(line);
    if (m && m[1] === key) return m[2];
  }
  return undefined;
}

function tokenDirOf(conf: string): { tokendir: string; backend: string } {
  let text: string;
  try {
    text = readFileSync(conf, "utf8");
  } catch (err) {
    throw new TokenBackupError(`cannot read SoftHSM's settings ${conf}: ${errorMessage(err)}`);
  }
  const tokendir = softhsmSetting(text, "directories.tokendir");
  if (!tokendir) throw new TokenBackupError(`${conf} has no directories.tokendir`);
  return { tokendir, backend: softhsmSetting(text, "objectstore.backend") ?? "file" };
}

/** The space-padded 32-byte label and the 16-character serial, as SoftHSM stores them in the token's own file. */
function tokenMarks(label: string, serial: string): Buffer[] {
  return [Buffer.from(label.padEnd(32, " "), "utf8"), Buffer.from(serial, "ascii")];
}

/** The token folders under `tokendir` whose token file carries this label and serial. */
function foldersOf(tokendir: string, label: string, serial: string): string[] {
  if (!existsSync(tokendir)) return [];
  const marks = tokenMarks(label, serial);
  return readdirSync(tokendir, { withFileTypes: true })
    .filter((d) => d.isDirectory() && !d.name.startsWith("."))
    .filter((d) =>
      ["token.object", "sqlite3.db"].some((f) => {
        const p = join(tokendir, d.name, f);
        if (!existsSync(p)) return false;
        const bytes = readFileSync(p);
        return marks.every((m) => bytes.includes(m));
      }),
    )
    .map((d) => d.name);
}

/** The token folders under `tokendir` whose token carries this label (any serial). */
function foldersLabelled(tokendir: string, label: string): string[] {
  if (!existsSync(tokendir)) return [];
  const mark = tokenMarks(label, "")[0];
  return readdirSync(tokendir, { withFileTypes: true })
    .filter((d) => d.isDirectory() && !d.name.startsWith("."))
    .filter((d) =>
      ["token.object", "sqlite3.db"].some(
        (f) => existsSync(join(tokendir, d.name, f)) && readFileSync(join(tokendir, d.name, f)).includes(mark),
      ),
    )
    .map((d) => d.name);
}

// ---------------------------------------------------------------- the manifest (live token)

function openHsm(config: AgentConfig): Hsm {
  const hsm = new Hsm(config.pkcs11, createLogger({ level: "warn", name: "xks-agent" }, process.stderr));
  hsm.open();
  return hsm;
}

function makeManifest(hsm: Hsm): Manifest {
  const token = hsm.tokenInfo();
  const keys: Manifest["keys"] = [];
  const probes: Manifest["probes"] = [];
  for (const k of hsm.listKeys()) {
    const method = kcvMethod(k);
    let checkValue = "";
    let problem = "";
    if (typeof method === "string") {
      try {
        checkValue = keyCheckValue(hsm, k.label);
      } catch (err) {
        problem = errorMessage(err);
      }
    } else problem = method.none;
    keys.push({ label: k.label, checkValue, problem });
    if (k.keyType === pkcs11js.CKK_AES && k.valueLen === KEY_BYTES && k.usage.encrypt && k.usage.decrypt) {
      const pt = randomBytes(32);
      const iv = freshIv();
      const out = hsm.runWithKey(
        "backup probe",
        k.label,
        () => {},
        (p11, s, key) => {
          p11.C_EncryptInit(s, gcmMechanism(iv, PROBE_AAD), key.handle);
          return Buffer.from(p11.C_Encrypt(s, pt, Buffer.alloc(pt.length + TAG_BYTES)));
        },
      );
      probes.push({
        label: k.label,
        iv: iv.toString("base64"),
        ciphertext: out.subarray(0, pt.length).toString("base64"),
        tag: out.subarray(pt.length).toString("base64"),
        plaintextSha256: createHash("sha256").update(pt).digest("hex"),
      });
    }
  }
  return { tokenLabel: token.label, tokenSerial: token.serial, keys, probes };
}

// ---------------------------------------------------------------- the archive

function deriveKey(passphrase: string, salt: Buffer, log2N: number, r: number, p: number): Promise<Buffer> {
  const N = 2 ** log2N;
  return new Promise((res, rej) =>
    scrypt(passphrase.normalize("NFC"), salt, 32, { N, r, p, maxmem: 256 * N * r + (1 << 20) }, (err, key) => (err ? rej(err) : res(key))),
  );
}

export async function sealArchive(payload: Payload, passphrase: string): Promise<Buffer> {
  const salt = randomBytes(32);
  const iv = randomBytes(12);
  const header = Buffer.concat([MAGIC, Buffer.from([VERSION, SCRYPT.log2N, SCRYPT.r, SCRYPT.p]), salt, iv]);
  const key = await deriveKey(passphrase, salt, SCRYPT.log2N, SCRYPT.r, SCRYPT.p);
  const c = createCipheriv("aes-256-gcm", key, iv);
  c.setAAD(header);
  const body = Buffer.concat([c.update(Buffer.from(JSON.stringify(payload), "utf8")), c.final()]);
  return Buffer.concat([header, body, c.getAuthTag()]);
}

/** Opens an archive; throws TokenBackupError before anything is used when it is not authentic. */
export async function openArchive(archive: Buffer, passphrase: string): Promise<Payload> {
  if (archive.length < HEADER_BYTES + TAG_BYTES || !archive.subarray(0, MAGIC.length).equals(MAGIC))
    throw new TokenBackupError("not an xks-agent token backup (no XKS-TOKEN-BACKUP header)");
  const [version, log2N, r, p] = archive.subarray(MAGIC.length, MAGIC.length + 4);
  if (version !== VERSION) throw new TokenBackupError(`backup format version ${version} is not supported (this agent reads ${VERSION})`);
  // Bounds keep a forged header from asking for unbounded memory or time.
  if (log2N < 14 || log2N > 20 || r < 1 || r > 16 || p < 1 || p > 4)
    throw new TokenBackupError("the archive's header is not valid (scrypt parameters out of range)");
  const header = archive.subarray(0, HEADER_BYTES);
  const salt = header.subarray(MAGIC.length + 4, MAGIC.length + 36);
  const iv = header.subarray(MAGIC.length + 36);
  const key = await deriveKey(passphrase, salt, log2N, r, p);
  const d = createDecipheriv("aes-256-gcm", key, iv);
  d.setAAD(header);
  d.setAuthTag(archive.subarray(archive.length - TAG_BYTES));
  let plain: Buffer;
  try {
    plain = Buffer.concat([d.update(archive.subarray(HEADER_BYTES, archive.length - TAG_BYTES)), d.final()]);
  } catch {
    throw new TokenBackupError("the archive cannot be opened: wrong passphrase, or the archive was altered or damaged");
  }
  const payload = JSON.parse(plain.toString("utf8")) as Payload;
  if (payload.format !== "xks-token-backup" || !Array.isArray(payload.files) || !payload.manifest)
    throw new TokenBackupError("the archive's content is not a token backup");
  return payload;
}

// ---------------------------------------------------------------- verification

export interface Verification {
  ok: boolean;
  lines: string[];
}

/**
 * Checks the token `config.pkcs11` names against `m`: label and serial, every
 * key's check value, every probe decrypted. With `conf`, SoftHSM is pointed at
 * that settings file for the check (SoftHSM reads SOFTHSM2_CONF at each
 * C_Initialize), and back afterwards.
 */
export function verifyToken(config: AgentConfig, m: Manifest, conf?: string): Verification {
  const before = process.env.SOFTHSM2_CONF;
  if (conf) process.env.SOFTHSM2_CONF = conf;
  const lines: string[] = [];
  let ok = true;
  const fail = (s: string) => {
    ok = false;
    lines.push(`✗ ${s}`);
  };
  let hsm: Hsm | undefined;
  try {
    hsm = openHsm(config);
    const t = hsm.tokenInfo();
    if (t.label !== m.tokenLabel || t.serial !== m.tokenSerial)
      fail(`token ${t.label} serial ${t.serial} is not the backed-up token ${m.tokenLabel} serial ${m.tokenSerial}`);
    else lines.push(`✓ token ${t.label} serial ${t.serial}`);
    for (const k of m.keys) {
      if (!k.checkValue) {
        try {
          hsm.key(k.label);
          lines.push(`✓ key ${k.label}: present (no check value: ${k.problem})`);
        } catch (err) {
          fail(`key ${k.label}: ${errorMessage(err)}`);
        }
        continue;
      }
      let now: string;
      try {
        now = keyCheckValue(hsm, k.label);
      } catch (err) {
        fail(`key ${k.label}: ${errorMessage(err)}`);
        continue;
      }
      if (now === k.checkValue) lines.push(`✓ key ${k.label}: check value ${now} as backed up`);
      else fail(`key ${k.label}: check value ${now}, backed up ${k.checkValue}: a different key`);
    }
    const extra = hsm.listKeys().filter((k) => !m.keys.some((b) => b.label === k.label));
    for (const k of extra) lines.push(`- key ${k.label}: on the token, not in the backup`);
    for (const p of m.probes) {
      const ct = Buffer.from(p.ciphertext, "base64");
      const tag = Buffer.from(p.tag, "base64");
      try {
        const pt = hsm.runWithKey(
          "backup probe",
          p.label,
          () => {},
          (p11, s, key) => {
            p11.C_DecryptInit(s, gcmMechanism(Buffer.from(p.iv, "base64"), PROBE_AAD), key.handle);
            return Buffer.from(p11.C_Decrypt(s, Buffer.concat([ct, tag]), Buffer.alloc(ct.length + TAG_BYTES)));
          },
          { inDecrypt: true },
        );
        if (createHash("sha256").update(pt).digest("hex") === p.plaintextSha256)
          lines.push(`✓ key ${p.label}: decrypts the ciphertext the original token made at backup time`);
        else fail(`key ${p.label}: decrypted the original's ciphertext to something else`);
      } catch (err) {
        fail(`key ${p.label}: cannot decrypt the original's ciphertext (${errorMessage(err)})`);
      }
    }
  } catch (err) {
    fail(`cannot open the token: ${errorMessage(err)}`);
  } finally {
    hsm?.close();
    if (conf) {
      if (before === undefined) delete process.env.SOFTHSM2_CONF;
      else process.env.SOFTHSM2_CONF = before;
    }
  }
  return { ok, lines };
}

/** A softhsm2.conf in a new temporary folder whose tokens are in `tokendir`; removed by the caller. */
function temporaryConf(tokendir: string, backend: string): { conf: string; dir: string } {
  const dir = mkdtempSync(join(tmpdir(), "xks-token-verify-"));
  const conf = join(dir, "softhsm2.conf");
  writeFileSync(conf, `directories.tokendir = ${resolve(tokendir)}\nobjectstore.backend = ${backend}\nlog.level = ERROR\n`, {
    mode: 0o600,
  });
  return { conf, dir };
}

// ---------------------------------------------------------------- commands

export interface TokenIo {
  out(line: string): void;
  err(line: string): void;
  /** The passphrase from standard input or a prompt; `confirm` asks twice at a prompt. */
  readPassphrase(prompt: string, confirm: boolean): Promise<string>;
}

async function passphraseOf(file: string | undefined, io: TokenIo, confirm: boolean): Promise<string> {
  if (file !== undefined) {
    const r = readSecretFile(file);
    if ("problem" in r) throw new TokenBackupError(r.problem);
    return r.value;
  }
  return io.readPassphrase("backup passphrase: ", confirm);
}

export async function backup(config: AgentConfig, outFile: string, passFile: string | undefined, io: TokenIo): Promise<number> {
  if (existsSync(outFile)) throw new TokenBackupError(`${outFile} exists already; a backup never overwrites a file`);
  const passphrase = await passphraseOf(passFile, io, true);
  if ([...passphrase].length < MIN_PASSPHRASE_CHARS)
    throw new TokenBackupError(`the passphrase must be at least ${MIN_PASSPHRASE_CHARS} characters`);
  const conf = softhsmConfFile();
  const { tokendir, backend } = tokenDirOf(conf);
  const hsm = openHsm(config);
  let manifest: Manifest;
  try {
    manifest = makeManifest(hsm);
  } finally {
    hsm.close();
  }
  const folders = foldersOf(tokendir, manifest.tokenLabel, manifest.tokenSerial);
  if (folders.length !== 1)
    throw new TokenBackupError(
      `expected one folder of token ${manifest.tokenLabel} (serial ${manifest.tokenSerial}) in ${tokendir} (from ${conf}), found ${folders.length}`,
    );
  const folder = join(tokendir, folders[0]);
  const files = readdirSync(folder, { withFileTypes: true })
    .filter((f) => f.isFile())
    .map((f) => ({ name: f.name, data: readFileSync(join(folder, f.name)).toString("base64") }));
  const archive = await sealArchive(
    { format: "xks-token-backup", version: VERSION, createdAt: new Date().toISOString(), folder: folders[0], backend, files, manifest },
    passphrase,
  );
  // Exclusive create, private from the first byte.
  const fd = openSync(outFile, "wx", 0o600);
  try {
    writeSync(fd, archive);
  } finally {
    closeSync(fd);
  }
  io.out(`backed up token ${manifest.tokenLabel} (serial ${manifest.tokenSerial}) from ${folder}`);
  io.out(
    `  ${files.length} files, ${manifest.keys.length} keys, ${manifest.probes.length} decrypt probes → ${outFile} (${archive.length} bytes, mode 0600)`,
  );
  for (const k of manifest.keys)
    io.out(`  key ${k.label}: ${k.checkValue ? `check value ${k.checkValue}` : `no check value (${k.problem})`}`);
  io.out(ONLY_COPY);
  io.out(`Test the archive now: xks-agent token verify --config ${config.file} --in ${outFile}`);
  return 0;
}

export async function restore(
  config: AgentConfig,
  inFile: string,
  toDir: string,
  passFile: string | undefined,
  io: TokenIo,
): Promise<number> {
  const archive = readArchive(inFile);
  const payload = await openArchive(archive, await passphraseOf(passFile, io, false));
  const m = payload.manifest;
  if (m.tokenLabel !== config.pkcs11.tokenLabel)
    throw new TokenBackupError(`the archive holds token ${m.tokenLabel}, the config names token ${config.pkcs11.tokenLabel}`);
  const target = join(toDir, payload.folder);
  if (existsSync(target)) throw new TokenBackupError(`${target} exists already; restore never overwrites a token`);
  const sameLabel = foldersLabelled(toDir, m.tokenLabel);
  if (sameLabel.length > 0)
    throw new TokenBackupError(
      `${toDir} already holds a token labelled ${m.tokenLabel} (${sameLabel.join(", ")}); restore never puts a second one beside it`,
    );
  for (const f of payload.files)
    if (basename(f.name) !== f.name || f.name.startsWith("."))
      throw new TokenBackupError(`the archive names a file ${JSON.stringify(f.name)}`);
  mkdirSync(toDir, { recursive: true, mode: 0o700 });
  const stage = mkdtempSync(join(toDir, ".xks-restore-"));
  try {
    for (const f of payload.files) writeFileSync(join(stage, f.name), Buffer.from(f.data, "base64"), { mode: 0o600, flag: "wx" });
    renameSync(stage, target);
  } catch (err) {
    rmSync(stage, { recursive: true, force: true });
    throw err;
  }
  io.out(
    `restored token ${m.tokenLabel} (serial ${m.tokenSerial}) to ${target} (${payload.files.length} files, backup of ${payload.createdAt})`,
  );
  const tmp = temporaryConf(toDir, payload.backend);
  let v: Verification;
  try {
    io.out(`verifying the restored token through a temporary softhsm2.conf (directories.tokendir = ${resolve(toDir)}):`);
    v = verifyToken(config, m, tmp.conf);
  } finally {
    rmSync(tmp.dir, { recursive: true, force: true });
  }
  for (const l of v.lines) io.out(`  ${l}`);
  if (!v.ok) {
    io.out(`VERIFICATION FAILED: do not use the token in ${target}`);
    return 1;
  }
  io.out(
    `verified: the restored token holds the same keys. Point SoftHSM at it (directories.tokendir = ${resolve(toDir)} in softhsm2.conf).`,
  );
  io.out(ONLY_COPY);
  return 0;
}

export async function verify(
  config: AgentConfig,
  inFile: string,
  tokenDir: string | undefined,
  passFile: string | undefined,
  io: TokenIo,
): Promise<number> {
  const payload = await openArchive(readArchive(inFile), await passphraseOf(passFile, io, false));
  const tmp = tokenDir !== undefined ? temporaryConf(tokenDir, payload.backend) : undefined;
  let v: Verification;
  try {
    io.out(
      `checking token ${config.pkcs11.tokenLabel}${tokenDir ? ` in ${resolve(tokenDir)}` : ""} against ${inFile} (backup of ${payload.createdAt}):`,
    );
    v = verifyToken(config, payload.manifest, tmp?.conf);
  } finally {
    if (tmp) rmSync(tmp.dir, { recursive: true, force: true });
  }
  for (const l of v.lines) io.out(`  ${l}`);
  io.out(v.ok ? "the token matches the backup" : "the token does NOT match the backup");
  return v.ok ? 0 : 1;
}

function readArchive(file: string): Buffer {
  let fd: number;
  try {
    fd = openSync(file, "r");
  } catch (err) {
    throw new TokenBackupError(`cannot open ${file}: ${(err as NodeJS.ErrnoException).code ?? errorMessage(err)}`);
  }
  try {
    if (fstatSync(fd).size > MAX_ARCHIVE_BYTES) throw new TokenBackupError(`${file} is larger than any token backup`);
  } finally {
    closeSync(fd);
  }
  return readFileSync(file);
}

// ---------------------------------------------------------------- passphrase input

/** Reads a passphrase: all of standard input (its first line) when it is not a terminal, else a prompt without echo on stderr. */
export function defaultIo(): TokenIo {
  return {
    out: (l) => process.stdout.write(`${l}\n`),
    err: (l) => process.stderr.write(`${l}\n`),
    readPassphrase: async (prompt, confirm) => {
      if (!process.stdin.isTTY) {
        const chunks: Buffer[] = [];
        for await (const c of process.stdin) chunks.push(c as Buffer);
        const first = Buffer.concat(chunks).toString("utf8").split(/\r?\n/)[0];
        if (!first) throw new TokenBackupError("no passphrase on standard input (or use --passphrase-file)");
        return first;
      }
      const a = await promptHidden(prompt);
      if (confirm && (await promptHidden("again: ")) !== a) throw new TokenBackupError("the two passphrases differ");
      return a;
    },
  };
}

function promptHidden(prompt: string): Promise<string> {
  return new Promise((resolveP, rejectP) => {
    const stdin = process.stdin;
    process.stderr.write(prompt);
    stdin.setRawMode(true);
    stdin.resume();
    let text = "";
    const done = (err?: Error) => {
      stdin.setRawMode(false);
      stdin.pause();
      stdin.off("data", onData);
      process.stderr.write("\n");
      if (err) rejectP(err);
      else resolveP(text);
    };
    const onData = (chunk: Buffer) => {
      for (const ch of chunk.toString("utf8")) {
        if (ch === "\r" || ch === "\n") return done();
        if (ch === "\u0003") return done(new TokenBackupError("cancelled"));
        if (ch === "\u007f" || ch === "\b") text = text.slice(0, -1);
        else text += ch;
      }
    };
    stdin.on("data", onData);
  });
}

/** The archive header's size (authenticated, not encrypted). */
export const ARCHIVE_HEADER_BYTES = HEADER_BYTES;
