/**
 * The agent's PKCS#11 session owner: loads the module through a Pkcs11Port
 * (agent/hsm/port.ts; pkcs11js unless told otherwise), finds the token by
 * label, logs in, keeps one session and a cache of key handles, and recovers
 * from failures according to agent/hsm/ckr.ts.
 *
 * Calls are synchronous on purpose. SoftHSM answers EncryptInit+Encrypt in
 * tens of microseconds, and pkcs11js's async variants have an open
 * use-after-free report (pkcs11js#121). With sync calls the JS thread
 * serialises every operation, so one session is enough and CKR_OPERATION_ACTIVE
 * cannot happen between callers.
 *
 * The PIN is never spent blindly: before C_Login the token's flags are read
 * (CKF_USER_PIN_LOCKED, CKF_USER_PIN_FINAL_TRY), and once the token refuses
 * the PIN (ckr.ts pinRefused) no login is tried again until the PIN changes:
 * a new process, or the PIN's secret file changing on disk (re-read when its
 * size, times or inode change; used when its content differs). With a
 * `refusalMemoFile`, a refusal of a PIN read from a file is remembered across
 * restarts (the file's path and stamp, nothing derived from the PIN), so a
 * supervisor that restarts the agent does not spend a try per restart on a
 * PIN file that has not changed.
 */
import { EventEmitter } from "node:events";
import { mkdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { dirname } from "node:path";
import pkcs11js from "pkcs11js"; // NOT `import * as`: under ESM that loses every constant
import { readSecretFile } from "../../shared/config.ts";
import { AgentError } from "../../shared/errors.ts";
import type { Logger } from "../../shared/logging.ts";
import { classifyCkr, refusesPin } from "./ckr.ts";
import { ckrOf, type Handle, type Pkcs11Port, pkcs11jsPort } from "./port.ts";

export interface HsmConfig {
  /** Path of the PKCS#11 module, e.g. /usr/lib/softhsm/libsofthsm2.so */
  module: string;
  /** Label of the token (slot IDs change on SoftHSM; never use a slot number). */
  tokenLabel: string;
  /** The user PIN. Never logged. */
  pin: string;
  /** The file the PIN was read from, if it came from a file: re-read after a refusal when it changes. */
  pinFile?: string;
}

/**
 * Where opening the HSM failed: loading or initializing the module, finding the token (listing
 * slots, the label, opening a session) or logging in. `permanent` failures cannot heal by
 * themselves (no such module file, no token with the label, the PIN refused): a daemon that meets
 * one at start stops with its message instead of serving errors forever.
 */
export type OpenStage = "module" | "token" | "login";

export class HsmOpenError extends AgentError {
  constructor(
    readonly stage: OpenStage,
    readonly permanent: boolean,
    detail: string,
    options?: { cause?: unknown },
  ) {
    super("HSM_UNAVAILABLE", detail, options);
    this.name = "HsmOpenError";
  }
}

export interface KeyInfo {
  label: string;
  handle: Handle;
  keyType: number;
  /** Key length in bytes (CKA_VALUE_LEN). */
  valueLen: number;
  usage: { encrypt: boolean; decrypt: boolean; sign: boolean; verify: boolean; wrap: boolean; unwrap: boolean; derive: boolean };
  /** CKA_SENSITIVE: the value can never be read in the clear. */
  sensitive: boolean;
  /** CKA_EXTRACTABLE: the value can be wrapped out of the token. */
  extractable: boolean;
}

export interface TokenInfo {
  label: string;
  manufacturer: string;
  model: string;
  serial: string;
}

const CKR_USER_ALREADY_LOGGED_IN = 0x100;
const CKF_USER_PIN_FINAL_TRY = 0x20000;
const CKF_USER_PIN_LOCKED = 0x40000;
const CKR_CRYPTOKI_ALREADY_INITIALIZED = 0x191;
/**
 * After an open that failed with a PKCS#11 error, calls fail fast with HSM_UNAVAILABLE for this long
 * before the module is initialized again. (No token with the label is not such a failure: the next
 * call lists the slots again, on the module as it is.)
 */
export const OPEN_RETRY_MS = 100;

function flag(attr: pkcs11js.Attribute | undefined): boolean {
  const v = attr?.value;
  return Buffer.isBuffer(v) ? v.length > 0 && v[0] !== 0 : v === true;
}

function ulong(attr: pkcs11js.Attribute | undefined): number {
  const v = attr?.value;
  if (!Buffer.isBuffer(v) || v.length === 0) return -1;
  // CK_ULONG in host byte order; 8 bytes on 64-bit, 4 on 32-bit.
  return v.length >= 8 ? Number(v.readBigUInt64LE(0)) : v.readUInt32LE(0);
}

export interface HsmDeps {
  /** Makes the port for one load of the module; pkcs11jsPort by default. */
  port?: () => Pkcs11Port;
  /** The clock for the retry interval after a failed open, in ms; Date.now by default. */
  now?: () => number;
  /** Where a refusal of a PIN read from a file is remembered across restarts (written 0600). */
  refusalMemoFile?: string;
}

/** What the refusal memo holds: which PIN file version was refused, why and when. Never the PIN. */
interface RefusalMemo {
  pinFile: string;
  pinStamp: string;
  why: string;
  at: string;
}

/** What identifies one version of a file on disk, without reading it. */
function fileStamp(path: string): string | undefined {
  try {
    const st = statSync(path);
    return `${st.dev}:${st.ino}:${st.size}:${st.mtimeMs}:${st.ctimeMs}`;
  } catch {
    return undefined;
  }
}

/**
 * Emits "login" with the reason logins are stopped (a string), or undefined
 * once they may be tried again.
 */
export class Hsm extends EventEmitter {
  private p11: Pkcs11Port | undefined;
  private initialized = false;
  private session: Handle | undefined;
  private slot: Handle | undefined;
  private readonly keys = new Map<string, KeyInfo>();
  private token: TokenInfo | undefined;
  /** After an open that failed with a PKCS#11 error, calls fail fast until this time instead of re-initializing the module per call. */
  private retryOpenAt = 0;
  /** The PIN logins use; replaced when the PIN file changes after a refusal. */
  private pin: string;
  /** Set while logins are stopped: why, and the PIN file's stamp when it was last looked at. */
  private loginStop: { detail: string; pinStamp: string | undefined } | undefined;
  /** The PIN was changed by the owner after logins were stopped: one login may be tried with it despite CKF_USER_PIN_FINAL_TRY. */
  private pinIsNew = false;
  /** Whether the refusal memo was consulted (once, before the first open). */
  private memoRead = false;
  private readonly memoFile: string | undefined;
  /**
   * Counters for tests and metrics: sessionsOpened counts sessions opened and logged in;
   * reinitializations counts finalizations of an initialized module after a device-scope failure.
   */
  readonly stats = { sessionsOpened: 0, reinitializations: 0 };
  private readonly newPort: () => Pkcs11Port;
  private readonly now: () => number;

  constructor(
    private readonly cfg: HsmConfig,
    private readonly log: Logger,
    deps: HsmDeps = {},
  ) {
    super();
    this.newPort = deps.port ?? pkcs11jsPort;
    this.now = deps.now ?? Date.now;
    this.pin = cfg.pin;
    this.memoFile = cfg.pinFile !== undefined ? deps.refusalMemoFile : undefined;
  }

  /** Why logins are stopped (the token refused the PIN, or its flags forbid a try), or undefined. */
  loginStopped(): string | undefined {
    return this.loginStop?.detail;
  }

  /** Opens the module, the token and a logged-in session. Throws AgentError(HSM_UNAVAILABLE) on failure. */
  open(): void {
    this.ensureSession();
  }

  /** Closes the session, logs out and finalizes the module. Safe to call twice. */
  close(): void {
    this.dropSession();
    if (this.p11 && this.initialized) {
      try {
        this.p11.C_Finalize();
      } catch {
        /* already gone */
      }
    }
    this.initialized = false;
    try {
      this.p11?.close();
    } catch {
      /* already closed */
    }
    this.p11 = undefined;
  }

  tokenInfo(): TokenInfo {
    this.ensureSession();
    return this.token!;
  }

  /**
   * Runs `fn` on the session. A PKCS#11 failure is classified once by
   * classifyCkr (ckr.ts), as inside a decrypt when `opts.inDecrypt` is set:
   * caller errors keep the session, session errors drop it (and the key cache),
   * device errors re-initialize the module. After a session or device failure
   * the operation is tried once more on a fresh session, since a cached handle
   * or a session that went bad is not the caller's fault.
   */
  run<T>(what: string, fn: (p11: Pkcs11Port, session: Handle) => T, opts: { inDecrypt?: boolean } = {}): T {
    return this.attempt(
      what,
      () => {
        const session = this.ensureSession();
        return fn(this.p11!, session);
      },
      opts,
    );
  }

  /**
   * Like run(), for an operation on a key: the key is looked up (from the
   * cache) on every attempt, so a retry after a dropped session never uses a
   * handle from before. `check` vets the key before the HSM is touched.
   */
  runWithKey<T>(
    what: string,
    label: string,
    check: (key: KeyInfo) => void,
    fn: (p11: Pkcs11Port, session: Handle, key: KeyInfo) => T,
    opts: { inDecrypt?: boolean } = {},
  ): T {
    return this.attempt(
      what,
      () => {
        const key = this.key(label);
        check(key);
        return fn(this.p11!, this.ensureSession(), key);
      },
      opts,
    );
  }

  private attempt<T>(what: string, body: () => T, opts: { inDecrypt?: boolean }): T {
    for (let attempt = 1; ; attempt++) {
      try {
        return body();
      } catch (err) {
        if (err instanceof AgentError) throw err;
        const code = ckrOf(err);
        if (code === undefined) throw new AgentError("INTERNAL", `${what}: ${(err as Error).message}`, { cause: err });
        const { name, scope, reason } = classifyCkr(code, opts.inDecrypt);
        if (scope === "caller") throw new AgentError(reason, `${what}: ${name}`);
        this.log.warn({ what, ckr: name, scope, attempt }, "PKCS#11 failure; recovering");
        if (scope === "device") this.reinitialize();
        else this.dropSession();
        if (attempt >= 2) throw new AgentError(reason, `${what}: ${name}`);
      }
    }
  }

  /** Finds a secret key by label (= XKS externalKeyId), reading its attributes once and caching them. */
  key(label: string): KeyInfo {
    const cached = this.keys.get(label);
    if (cached) return cached;
    const info = this.run("find key", (p11, s) => {
      p11.C_FindObjectsInit(s, [
        { type: pkcs11js.CKA_CLASS, value: pkcs11js.CKO_SECRET_KEY },
        { type: pkcs11js.CKA_TOKEN, value: true },
        { type: pkcs11js.CKA_LABEL, value: label },
      ]);
      let found: Handle[];
      try {
        found = p11.C_FindObjects(s, 2);
      } finally {
        // Without C_FindObjectsFinal SoftHSM answers CKR_OPERATION_ACTIVE to the next call.
        p11.C_FindObjectsFinal(s);
      }
      if (found.length === 0) throw new AgentError("KEY_NOT_FOUND", `no secret key labelled ${JSON.stringify(label)}`);
      if (found.length > 1) throw new AgentError("INVALID_STATE", `more than one secret key labelled ${JSON.stringify(label)}`);
      return this.readKey(p11, s, label, found[0]);
    });
    this.keys.set(label, info);
    return info;
  }

  /** Lists every secret key on the token (for `xks-agent keys list`). */
  listKeys(): KeyInfo[] {
    return this.run("list keys", (p11, s) => {
      p11.C_FindObjectsInit(s, [{ type: pkcs11js.CKA_CLASS, value: pkcs11js.CKO_SECRET_KEY }]);
      const handles: Handle[] = [];
      try {
        for (let batch = p11.C_FindObjects(s, 64); batch.length > 0; batch = p11.C_FindObjects(s, 64)) handles.push(...batch);
      } finally {
        p11.C_FindObjectsFinal(s);
      }
      return handles.map((h) => {
        const [l] = p11.C_GetAttributeValue(s, h, [{ type: pkcs11js.CKA_LABEL }]);
        return this.readKey(p11, s, Buffer.isBuffer(l.value) ? l.value.toString("utf8") : String(l.value ?? ""), h);
      });
    });
  }

  /**
   * HMAC-SHA256 of `data` with the secret key `label` (CKM_SHA256_HMAC), which
   * must be a generic secret key that may sign, is sensitive and is never
   * extractable: the audit log's checkpoint key. The key never leaves the token.
   */
  hmacSha256(label: string, data: Buffer): Buffer {
    return this.runWithKey(
      "audit seal",
      label,
      (key) => {
        if (key.keyType !== pkcs11js.CKK_GENERIC_SECRET || !key.usage.sign || !key.sensitive || key.extractable)
          throw new AgentError(
            "INVALID_STATE",
            `key ${label} is not an audit key (a sensitive, non-extractable generic secret that may sign; xks-agent keys create --type audit)`,
          );
      },
      (p11, s, key) => {
        p11.C_SignInit(s, { mechanism: pkcs11js.CKM_SHA256_HMAC }, key.handle);
        return Buffer.from(p11.C_Sign(s, data, Buffer.alloc(32)));
      },
    );
  }

  /** Forgets cached key handles (after a key was created or deleted). */
  forgetKeys(): void {
    this.keys.clear();
  }

  private readKey(p11: Pkcs11Port, s: Handle, label: string, handle: Handle): KeyInfo {
    const attrs = p11.C_GetAttributeValue(s, handle, [
      { type: pkcs11js.CKA_KEY_TYPE },
      { type: pkcs11js.CKA_ENCRYPT },
      { type: pkcs11js.CKA_DECRYPT },
      { type: pkcs11js.CKA_SIGN },
      { type: pkcs11js.CKA_VERIFY },
      { type: pkcs11js.CKA_WRAP },
      { type: pkcs11js.CKA_UNWRAP },
      { type: pkcs11js.CKA_DERIVE },
      { type: pkcs11js.CKA_SENSITIVE },
      { type: pkcs11js.CKA_EXTRACTABLE },
    ]);
    let valueLen = -1;
    try {
      valueLen = ulong(p11.C_GetAttributeValue(s, handle, [{ type: pkcs11js.CKA_VALUE_LEN }])[0]);
    } catch (err) {
      // Keys without CKA_VALUE_LEN (e.g. DES3) answer CKR_ATTRIBUTE_TYPE_INVALID: not an AES key anyway.
      if (ckrOf(err) === undefined) throw err;
    }
    return {
      label,
      handle,
      keyType: ulong(attrs[0]),
      valueLen,
      usage: {
        encrypt: flag(attrs[1]),
        decrypt: flag(attrs[2]),
        sign: flag(attrs[3]),
        verify: flag(attrs[4]),
        wrap: flag(attrs[5]),
        unwrap: flag(attrs[6]),
        derive: flag(attrs[7]),
      },
      sensitive: flag(attrs[8]),
      extractable: flag(attrs[9]),
    };
  }

  private ensureSession(): Handle {
    if (this.session !== undefined) return this.session;
    this.recallRefusal();
    const stopped = this.stillStopped();
    if (stopped !== undefined) throw new HsmOpenError("login", true, stopped);
    if (this.now() < this.retryOpenAt)
      throw new AgentError("HSM_UNAVAILABLE", "the HSM could not be opened a moment ago; retrying shortly");
    let stage: OpenStage = "module";
    try {
      if (!this.p11) {
        const p11 = this.newPort();
        try {
          p11.load(this.cfg.module);
        } catch (err) {
          // No such file, or not a PKCS#11 module: nothing that retrying fixes.
          throw new HsmOpenError("module", true, `cannot load the PKCS#11 module ${this.cfg.module}: ${(err as Error).message}`, {
            cause: err,
          });
        }
        this.p11 = p11;
      }
      if (!this.initialized) {
        try {
          // CKF_OS_LOCKING_OK: without it SoftHSM runs without mutexes.
          this.p11.C_Initialize({ flags: pkcs11js.CKF_OS_LOCKING_OK });
        } catch (err) {
          if (ckrOf(err) !== CKR_CRYPTOKI_ALREADY_INITIALIZED) throw err;
        }
        this.initialized = true;
      }
      const p11 = this.p11;
      stage = "token";
      const labels: string[] = [];
      this.slot = p11.C_GetSlotList(true).find((slot) => {
        const label = p11.C_GetTokenInfo(slot).label.trim();
        if (label !== "") labels.push(JSON.stringify(label)); // SoftHSM keeps one empty, uninitialized token
        return label === this.cfg.tokenLabel;
      });
      if (this.slot === undefined)
        throw new HsmOpenError(
          "token",
          true,
          `no token labelled ${JSON.stringify(this.cfg.tokenLabel)} (tokens present: ${labels.join(", ") || "none"})`,
        );
      const ti = p11.C_GetTokenInfo(this.slot);
      this.token = {
        label: ti.label.trim(),
        manufacturer: ti.manufacturerID.trim(),
        model: ti.model.trim(),
        serial: ti.serialNumber.trim(),
      };
      stage = "login";
      // Read before every login: a locked PIN or a last try is never spent on a PIN that failed before.
      if ((ti.flags & CKF_USER_PIN_LOCKED) !== 0) {
        throw this.stopLogins(
          "the token's user PIN is locked (CKF_USER_PIN_LOCKED): unblock it with the SO PIN; no login is tried until the PIN changes",
        );
      }
      if ((ti.flags & CKF_USER_PIN_FINAL_TRY) !== 0 && !this.pinIsNew) {
        throw this.stopLogins(
          "the token allows one more PIN try (CKF_USER_PIN_FINAL_TRY): check the PIN; no login is tried until the PIN changes",
        );
      }
      stage = "token";
      const session = p11.C_OpenSession(this.slot, pkcs11js.CKF_SERIAL_SESSION | pkcs11js.CKF_RW_SESSION);
      stage = "login";
      try {
        this.pinIsNew = false;
        p11.C_Login(session, pkcs11js.CKU_USER, this.pin);
      } catch (err) {
        if (ckrOf(err) !== CKR_USER_ALREADY_LOGGED_IN) {
          try {
            p11.C_CloseSession(session);
          } catch {
            /* ignore */
          }
          const code = ckrOf(err);
          if (code !== undefined && refusesPin(code)) {
            const name = classifyCkr(code).name;
            throw this.stopLogins(`PIN refused by the token (${name}): fix the PIN; no further logins until it changes`);
          }
          throw err;
        }
      }
      this.session = session;
      this.stats.sessionsOpened++;
      if (this.memoFile) rmSync(this.memoFile, { force: true });
      this.log.info({ tokenLabel: this.token.label, serial: this.token.serial }, "HSM session open");
      return session;
    } catch (err) {
      if (err instanceof AgentError) throw err;
      const code = ckrOf(err);
      const detail = code === undefined ? (err as Error).message : classifyCkr(code).name;
      // A failed open may leave the module half-initialized: start from scratch next time,
      // but not before OPEN_RETRY_MS, so a dead HSM costs each call microseconds, not a C_Initialize.
      this.reinitialize();
      this.retryOpenAt = this.now() + OPEN_RETRY_MS;
      throw new HsmOpenError(stage, false, `cannot open the HSM: ${detail}`, { cause: err });
    }
  }

  /** Stops logins until the PIN changes; logs why once and tells listeners. Returns the error to throw. */
  private stopLogins(why: string, remembered?: string): HsmOpenError {
    const detail = `${why}${this.cfg.pinFile ? " (the PIN file is re-read when it changes)" : " (restart the agent once the PIN is fixed)"}${remembered ?? ""}`;
    const pinStamp = this.cfg.pinFile ? fileStamp(this.cfg.pinFile) : undefined;
    this.loginStop = { detail, pinStamp };
    if (this.memoFile && pinStamp !== undefined && remembered === undefined) {
      const memo: RefusalMemo = { pinFile: this.cfg.pinFile!, pinStamp, why, at: new Date().toISOString() };
      try {
        mkdirSync(dirname(this.memoFile), { recursive: true, mode: 0o700 });
        writeFileSync(this.memoFile, `${JSON.stringify(memo)}\n`, { mode: 0o600 });
      } catch (err) {
        this.log.warn({ memoFile: this.memoFile, err: (err as Error).message }, "cannot remember the PIN refusal across restarts");
      }
    }
    this.log.error({ tokenLabel: this.cfg.tokenLabel, pinFile: this.cfg.pinFile }, `HSM logins stopped: ${detail}`);
    this.log.flush();
    this.emit("login", detail);
    return new HsmOpenError("login", true, detail);
  }

  /**
   * Once, before the first open: a refusal remembered from an earlier run for this very version of
   * the PIN file stops logins at once. A memo for another file or version is removed.
   */
  private recallRefusal(): void {
    if (this.memoRead || !this.memoFile) return;
    this.memoRead = true;
    let memo: RefusalMemo;
    try {
      memo = JSON.parse(readFileSync(this.memoFile, "utf8")) as RefusalMemo;
    } catch {
      return; // none (or unreadable: then a login may be tried, as without a memo)
    }
    if (memo.pinFile !== this.cfg.pinFile || memo.pinStamp !== fileStamp(this.cfg.pinFile!)) {
      rmSync(this.memoFile, { force: true });
      return;
    }
    this.stopLogins(
      String(memo.why),
      `; refused at ${String(memo.at)} and the PIN file has not changed since, so no login was tried (if the token's PIN was changed to match the file instead: touch the file)`,
    );
  }

  /**
   * While logins are stopped: whether they still are. When the PIN came from a file whose stamp
   * changed, the file is read again (it must still be private); a different PIN resumes logins.
   */
  private stillStopped(): string | undefined {
    const stop = this.loginStop;
    if (stop === undefined) return undefined;
    const file = this.cfg.pinFile;
    if (file === undefined) return stop.detail;
    const stamp = fileStamp(file);
    if (stamp === stop.pinStamp) return stop.detail;
    stop.pinStamp = stamp;
    const read = readSecretFile(file);
    if ("problem" in read) {
      this.log.error({ pinFile: file, problem: read.problem }, "the PIN file changed but cannot be used; logins stay stopped");
      return stop.detail;
    }
    if (read.value === this.pin) return stop.detail;
    this.pin = read.value;
    this.pinIsNew = true;
    this.loginStop = undefined;
    if (this.memoFile) rmSync(this.memoFile, { force: true });
    this.log.warn({ pinFile: file }, "the PIN file changed: logging in again");
    this.emit("login", undefined);
    return undefined;
  }

  private dropSession(): void {
    this.keys.clear();
    const s = this.session;
    this.session = undefined;
    if (s === undefined || !this.p11) return;
    try {
      this.p11.C_CloseSession(s);
    } catch {
      /* the session may already be gone */
    }
  }

  /** C_Finalize and forget everything; the next call initializes the module again. */
  private reinitialize(): void {
    this.keys.clear();
    this.session = undefined;
    if (this.p11 && this.initialized) {
      this.stats.reinitializations++;
      try {
        this.p11.C_Finalize();
      } catch {
        /* ignore */
      }
    }
    this.initialized = false;
  }
}
