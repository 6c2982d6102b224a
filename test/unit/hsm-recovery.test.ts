/**
 * The HSM recovery policy (agent/hsm/hsm.ts + agent/hsm/ckr.ts) on an
 * in-memory PKCS#11 stub: which Cryptoki calls happen after each kind of
 * failure. No module, no clock, no timing: the stub records every call and
 * can make the next call(s) of a method fail with a given CK_RV.
 */
import { chmodSync, existsSync, mkdtempSync, readFileSync, renameSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { test } from "node:test";
import assert from "node:assert/strict";
import pkcs11js from "pkcs11js";
import { Hsm, OPEN_RETRY_MS } from "../../agent/hsm/hsm.ts";
import { Pkcs11Failure, type Handle, type Pkcs11Port, type Pkcs11TokenInfo } from "../../agent/hsm/port.ts";
import { decrypt } from "../../agent/ops/decrypt.ts";
import { encrypt } from "../../agent/ops/encrypt.ts";
import { AgentError, type Reason } from "../../shared/errors.ts";
import { createLogger } from "../../shared/logging.ts";
import { DIRECT_USE, directOpContext } from "../../testbed/hsm.ts";

const CKR_GENERAL_ERROR = 0x05;
const CKR_FUNCTION_FAILED = 0x06;
const CKR_ARGUMENTS_BAD = 0x07;
const CKR_FUNCTION_NOT_SUPPORTED = 0x54;
const CKR_ATTRIBUTE_TYPE_INVALID = 0x12;
const CKR_DEVICE_REMOVED = 0x32;
const CKR_ENCRYPTED_DATA_INVALID = 0x40;
const CKR_KEY_HANDLE_INVALID = 0x60;
const CKR_KEY_FUNCTION_NOT_PERMITTED = 0x68;
const CKR_OBJECT_HANDLE_INVALID = 0x82;
const CKR_OPERATION_ACTIVE = 0x90;
const CKR_OPERATION_NOT_INITIALIZED = 0x91;
const CKR_PIN_INCORRECT = 0xa0;
const CKR_SESSION_HANDLE_INVALID = 0xb3;
const CKR_SLOT_ID_INVALID = 0x03;
const CKR_TOKEN_NOT_PRESENT = 0xe0;
const CKR_USER_ALREADY_LOGGED_IN = 0x100;
const CKR_CRYPTOKI_NOT_INITIALIZED = 0x190;
const CKR_CRYPTOKI_ALREADY_INITIALIZED = 0x191;

const TOKEN = "stub-token";
const PIN = "1234";
const KEY = "k1";
const CKK_AES = 0x1f;
const SILENT = createLogger({ level: "silent" });
/** The stub's "GCM tag": fixed, so a flipped byte is a tag mismatch. */
const TAG = Buffer.alloc(16, 0xa5);

const handle = (n: number): Handle => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(BigInt(n));
  return b;
};
const num = (h: Handle): number => Number(h.readBigUInt64LE(0));
const ulong = (n: number): Buffer => handle(n);
const xor = (b: Buffer): Buffer => Buffer.from(b.map((x) => x ^ 0x5a));

interface StubKey {
  handle: number;
  label: string;
  keyType: number;
  valueLen: number;
  encrypt: boolean;
  decrypt: boolean;
}

interface StubSession {
  find?: number[];
  op?: "encrypt" | "decrypt";
  key?: StubKey;
}

type Method = keyof Pkcs11Port;

/**
 * One slot (1) holding one token, its sessions, its secret keys and a login
 * state, as a PKCS#11 module keeps them. Every call is recorded in `calls`
 * as "Method" or "Method sN" (N = the session it was made on).
 */
class StubPkcs11 implements Pkcs11Port {
  readonly calls: string[] = [];
  /** Whether C_GetSlotList(true) lists the token. */
  present = true;
  /** The token's CKF_* flags, as C_GetTokenInfo reports them. */
  flags = 0;
  private readonly failures = new Map<Method, number[]>();
  private initialized = false;
  private loggedIn = false;
  private readonly sessions = new Map<number, StubSession>();
  private nextSession = 1;
  private readonly keys: StubKey[] = [];
  private nextObject = 100;

  /** The next `times` calls of `method` fail with `ckr`, before the stub looks at their arguments. */
  failNext(method: Method, ckr: number, times = 1): void {
    const queue = this.failures.get(method) ?? [];
    for (let i = 0; i < times; i++) queue.push(ckr);
    this.failures.set(method, queue);
  }

  addKey(label: string, usage: { encrypt: boolean; decrypt: boolean } = { encrypt: true, decrypt: true }): void {
    this.keys.push({ handle: this.nextObject++, label, keyType: CKK_AES, valueLen: 32, ...usage });
  }

  count(call: string): number {
    return this.calls.filter((c) => c === call).length;
  }

  private enter(method: Method, session?: Handle): StubSession {
    this.calls.push(session === undefined ? method : `${method} s${num(session)}`);
    const s = session === undefined ? undefined : this.sessions.get(num(session));
    const injected = this.failures.get(method)?.shift();
    if (injected !== undefined) {
      // A failed C_Encrypt/C_Decrypt ends the operation.
      if (s && (method === "C_Encrypt" || method === "C_Decrypt")) s.op = undefined;
      throw new Pkcs11Failure(injected, method);
    }
    if (!this.initialized && method !== "load" && method !== "close" && method !== "C_Initialize") {
      throw new Pkcs11Failure(CKR_CRYPTOKI_NOT_INITIALIZED, method);
    }
    if (session !== undefined && !s) throw new Pkcs11Failure(CKR_SESSION_HANDLE_INVALID, method);
    return s!;
  }

  private slot(method: Method, slot: Handle): void {
    if (num(slot) !== 1 || !this.present) throw new Pkcs11Failure(CKR_SLOT_ID_INVALID, method);
  }

  private object(method: Method, h: Handle, missing: number): StubKey {
    const key = this.keys.find((k) => k.handle === num(h));
    if (!key) throw new Pkcs11Failure(missing, method);
    return key;
  }

  load(_modulePath: string): void {
    this.enter("load");
  }
  close(): void {
    this.enter("close");
  }
  C_Initialize(_options: { flags: number }): void {
    this.enter("C_Initialize");
    if (this.initialized) throw new Pkcs11Failure(CKR_CRYPTOKI_ALREADY_INITIALIZED, "C_Initialize");
    this.initialized = true;
  }
  C_Finalize(): void {
    this.enter("C_Finalize");
    this.sessions.clear();
    this.loggedIn = false;
    this.initialized = false;
  }
  C_GetSlotList(_tokenPresent: boolean): Handle[] {
    this.enter("C_GetSlotList");
    return this.present ? [handle(1)] : [];
  }
  C_GetTokenInfo(slot: Handle): Pkcs11TokenInfo {
    this.enter("C_GetTokenInfo");
    this.slot("C_GetTokenInfo", slot);
    return {
      label: TOKEN.padEnd(32),
      manufacturerID: "Stub".padEnd(32),
      model: "stub".padEnd(16),
      serialNumber: "0001".padEnd(16),
      flags: this.flags,
    };
  }
  C_OpenSession(slot: Handle, _flags: number): Handle {
    this.enter("C_OpenSession");
    this.slot("C_OpenSession", slot);
    const n = this.nextSession++;
    this.sessions.set(n, {});
    return handle(n);
  }
  C_CloseSession(session: Handle): void {
    this.enter("C_CloseSession", session);
    this.sessions.delete(num(session));
    // Closing the application's last session logs it out.
    if (this.sessions.size === 0) this.loggedIn = false;
  }
  C_Login(session: Handle, _userType: number, pin: string): void {
    this.enter("C_Login", session);
    if (this.loggedIn) throw new Pkcs11Failure(CKR_USER_ALREADY_LOGGED_IN, "C_Login");
    if (pin !== PIN) throw new Pkcs11Failure(CKR_PIN_INCORRECT, "C_Login");
    this.loggedIn = true;
  }
  C_FindObjectsInit(session: Handle, template: pkcs11js.Template): void {
    const s = this.enter("C_FindObjectsInit", session);
    if (s.find) throw new Pkcs11Failure(CKR_OPERATION_ACTIVE, "C_FindObjectsInit");
    const label = template.find((a) => a.type === pkcs11js.CKA_LABEL)?.value;
    s.find = this.keys.filter((k) => label === undefined || k.label === label).map((k) => k.handle);
  }
  C_FindObjects(session: Handle, maxObjectCount: number): Handle[] {
    const s = this.enter("C_FindObjects", session);
    if (!s.find) throw new Pkcs11Failure(CKR_OPERATION_NOT_INITIALIZED, "C_FindObjects");
    return s.find.splice(0, maxObjectCount).map(handle);
  }
  C_FindObjectsFinal(session: Handle): void {
    const s = this.enter("C_FindObjectsFinal", session);
    if (!s.find) throw new Pkcs11Failure(CKR_OPERATION_NOT_INITIALIZED, "C_FindObjectsFinal");
    s.find = undefined;
  }
  C_GetAttributeValue(session: Handle, object: Handle, template: pkcs11js.Template): pkcs11js.AttributeResult[] {
    this.enter("C_GetAttributeValue", session);
    const k = this.object("C_GetAttributeValue", object, CKR_OBJECT_HANDLE_INVALID);
    const values: Record<number, Buffer> = {
      [pkcs11js.CKA_LABEL]: Buffer.from(k.label),
      [pkcs11js.CKA_KEY_TYPE]: ulong(k.keyType),
      [pkcs11js.CKA_VALUE_LEN]: ulong(k.valueLen),
      [pkcs11js.CKA_ENCRYPT]: Buffer.from([k.encrypt ? 1 : 0]),
      [pkcs11js.CKA_DECRYPT]: Buffer.from([k.decrypt ? 1 : 0]),
      [pkcs11js.CKA_SIGN]: Buffer.from([0]),
      [pkcs11js.CKA_VERIFY]: Buffer.from([0]),
      [pkcs11js.CKA_WRAP]: Buffer.from([0]),
      [pkcs11js.CKA_UNWRAP]: Buffer.from([0]),
      [pkcs11js.CKA_DERIVE]: Buffer.from([0]),
      [pkcs11js.CKA_SENSITIVE]: Buffer.from([1]),
      [pkcs11js.CKA_EXTRACTABLE]: Buffer.from([0]),
    };
    return template.map(({ type }) => {
      const value = values[type];
      if (!value) throw new Pkcs11Failure(CKR_ATTRIBUTE_TYPE_INVALID, "C_GetAttributeValue");
      return { type, value };
    });
  }
  private init(method: Method, op: "encrypt" | "decrypt", session: Handle, key: Handle): void {
    const s = this.enter(method, session);
    const k = this.object(method, key, CKR_KEY_HANDLE_INVALID);
    if (!k[op]) throw new Pkcs11Failure(CKR_KEY_FUNCTION_NOT_PERMITTED, method);
    if (s.op) throw new Pkcs11Failure(CKR_OPERATION_ACTIVE, method);
    s.op = op;
    s.key = k;
  }
  private finish(method: Method, op: "encrypt" | "decrypt", session: Handle): StubSession {
    const s = this.enter(method, session);
    if (s.op !== op) throw new Pkcs11Failure(CKR_OPERATION_NOT_INITIALIZED, method);
    s.op = undefined;
    return s;
  }
  C_EncryptInit(session: Handle, _mechanism: pkcs11js.Mechanism, key: Handle): void {
    this.init("C_EncryptInit", "encrypt", session, key);
  }
  C_Encrypt(session: Handle, inData: Buffer, _outData: Buffer): Buffer {
    this.finish("C_Encrypt", "encrypt", session);
    return Buffer.concat([xor(inData), TAG]);
  }
  C_DecryptInit(session: Handle, _mechanism: pkcs11js.Mechanism, key: Handle): void {
    this.init("C_DecryptInit", "decrypt", session, key);
  }
  C_Decrypt(session: Handle, inData: Buffer, _outData: Buffer): Buffer {
    this.finish("C_Decrypt", "decrypt", session);
    if (inData.length < TAG.length || !inData.subarray(-TAG.length).equals(TAG))
      throw new Pkcs11Failure(CKR_ENCRYPTED_DATA_INVALID, "C_Decrypt");
    return xor(inData.subarray(0, -TAG.length));
  }
  C_GenerateKey(session: Handle, _mechanism: pkcs11js.Mechanism, template: pkcs11js.Template): Handle {
    this.enter("C_GenerateKey", session);
    const attr = (type: number) => template.find((a) => a.type === type)?.value;
    this.addKey(String(attr(pkcs11js.CKA_LABEL)), {
      encrypt: attr(pkcs11js.CKA_ENCRYPT) === true,
      decrypt: attr(pkcs11js.CKA_DECRYPT) === true,
    });
    return handle(this.nextObject - 1);
  }
  C_SignInit(session: Handle, _mechanism: pkcs11js.Mechanism, _key: Handle): void {
    this.enter("C_SignInit", session);
    throw new Pkcs11Failure(CKR_FUNCTION_NOT_SUPPORTED, "C_SignInit");
  }
  C_Sign(session: Handle, _inData: Buffer, _outData: Buffer): Buffer {
    this.enter("C_Sign", session);
    throw new Pkcs11Failure(CKR_FUNCTION_NOT_SUPPORTED, "C_Sign");
  }
}

// Expected call sequences, on session N.
const OPEN = (n: number) => ["C_GetSlotList", "C_GetTokenInfo", "C_GetTokenInfo", "C_OpenSession", `C_Login s${n}`];
const FIND_KEY = (n: number) => [
  `C_FindObjectsInit s${n}`,
  `C_FindObjects s${n}`,
  `C_FindObjectsFinal s${n}`,
  `C_GetAttributeValue s${n}`,
  `C_GetAttributeValue s${n}`,
];
const FIND_NONE = (n: number) => [`C_FindObjectsInit s${n}`, `C_FindObjects s${n}`, `C_FindObjectsFinal s${n}`];
const ENCRYPT = (n: number) => [`C_EncryptInit s${n}`, `C_Encrypt s${n}`];
const DECRYPT = (n: number) => [`C_DecryptInit s${n}`, `C_Decrypt s${n}`];

/**
 * A stub with key k1, an Hsm on it with a hand-turned clock (and the given PIN, from the given
 * file), and an AgentOpContext for the real encrypt/decrypt ops.
 */
function rig(o: { pin?: string; pinFile?: string; refusalMemoFile?: string } = {}) {
  const stub = new StubPkcs11();
  stub.addKey(KEY);
  const clock = { ms: 1_000_000 };
  const hsm = new Hsm({ module: "/stub/libpkcs11.so", tokenLabel: TOKEN, pin: o.pin ?? PIN, pinFile: o.pinFile }, SILENT, {
    port: () => stub,
    now: () => clock.ms,
    refusalMemoFile: o.refusalMemoFile,
  });
  const ctx = directOpContext(hsm, { ciphertextMetadata: Buffer.from("cm"), serve: [KEY], agentId: "unit" });
  const enc = (plaintext = Buffer.from("hello")) =>
    encrypt(ctx, { metadata: null, keyId: KEY, plaintext, aad: Buffer.alloc(0), wantIntegrityValue: false }, DIRECT_USE);
  const dec = (e: ReturnType<typeof enc>) =>
    decrypt(
      ctx,
      {
        metadata: null,
        keyId: KEY,
        ciphertext: e.ciphertext,
        iv: e.iv,
        tag: e.tag,
        aad: Buffer.alloc(0),
        ciphertextMetadata: e.ciphertextMetadata,
      },
      DIRECT_USE,
    ).plaintext;
  return { stub, clock, hsm, enc, dec };
}

/** rig() with session 1 open and k1 in the key cache, and the call record emptied. */
function warm() {
  const r = rig();
  r.hsm.open();
  r.enc();
  assert.deepEqual(r.stub.calls, ["load", "C_Initialize", ...OPEN(1), ...FIND_KEY(1), ...ENCRYPT(1)]);
  r.stub.calls.length = 0;
  return r;
}

function throwsReason(fn: () => unknown, reason: Reason, detail?: RegExp): void {
  assert.throws(fn, (err: unknown) => {
    assert.ok(err instanceof AgentError, `expected an AgentError, got ${String(err)}`);
    assert.equal(err.reason, reason, err.message);
    if (detail) assert.match(err.message, detail);
    return true;
  });
}

test("caller error: CKR_KEY_FUNCTION_NOT_PERMITTED is INVALID_KEY_USAGE, the session stays, no retry", () => {
  const { stub, hsm, enc } = warm();
  stub.failNext("C_EncryptInit", CKR_KEY_FUNCTION_NOT_PERMITTED);
  throwsReason(() => enc(), "INVALID_KEY_USAGE", /CKR_KEY_FUNCTION_NOT_PERMITTED/);
  assert.deepEqual(stub.calls, ["C_EncryptInit s1"]);
  stub.calls.length = 0;
  enc();
  assert.deepEqual(stub.calls, ENCRYPT(1), "the next call runs on the same session with the cached key");
  assert.equal(hsm.stats.sessionsOpened, 1);
});

test("caller error inside a decrypt: CKR_GENERAL_ERROR (SoftHSM 2.6 tag mismatch) is INVALID_CIPHERTEXT, the session stays", () => {
  const { stub, hsm, enc, dec } = warm();
  const e = enc(Buffer.from("secret"));
  stub.calls.length = 0;
  stub.failNext("C_Decrypt", CKR_GENERAL_ERROR);
  throwsReason(() => dec(e), "INVALID_CIPHERTEXT", /CKR_GENERAL_ERROR/);
  assert.deepEqual(stub.calls, DECRYPT(1));
  // CKR_ENCRYPTED_DATA_INVALID (SoftHSM 2.7), here from the stub's own tag check.
  stub.calls.length = 0;
  const badTag = Buffer.from(e.tag);
  badTag[0] ^= 1;
  throwsReason(() => dec({ ...e, tag: badTag }), "INVALID_CIPHERTEXT", /CKR_ENCRYPTED_DATA_INVALID/);
  assert.deepEqual(stub.calls, DECRYPT(1));
  stub.calls.length = 0;
  assert.deepEqual(dec(e), Buffer.from("secret"));
  assert.deepEqual(stub.calls, DECRYPT(1));
  assert.equal(hsm.stats.sessionsOpened, 1);
});

test("outside a decrypt the same CKR_GENERAL_ERROR is a session error: new session, one retry", () => {
  const { stub, enc } = warm();
  stub.failNext("C_Encrypt", CKR_GENERAL_ERROR);
  enc();
  assert.deepEqual(stub.calls, [...ENCRYPT(1), "C_CloseSession s1", ...OPEN(2), ...FIND_KEY(2), ...ENCRYPT(2)]);
});

for (const [code, name] of [
  [CKR_SESSION_HANDLE_INVALID, "CKR_SESSION_HANDLE_INVALID"],
  [CKR_OBJECT_HANDLE_INVALID, "CKR_OBJECT_HANDLE_INVALID"],
] as const) {
  test(`session error ${name}: the session and the key cache are dropped, one retry on a new session succeeds`, () => {
    const { stub, hsm, enc } = warm();
    stub.failNext("C_EncryptInit", code);
    enc();
    assert.deepEqual(stub.calls, ["C_EncryptInit s1", "C_CloseSession s1", ...OPEN(2), ...FIND_KEY(2), ...ENCRYPT(2)]);
    assert.equal(hsm.stats.sessionsOpened, 2);
  });

  test(`session error ${name} inside a decrypt is still a session error`, () => {
    const { stub, enc, dec } = warm();
    const e = enc(Buffer.from("x"));
    stub.calls.length = 0;
    stub.failNext("C_DecryptInit", code);
    assert.deepEqual(dec(e), Buffer.from("x"));
    assert.deepEqual(stub.calls, ["C_DecryptInit s1", "C_CloseSession s1", ...OPEN(2), ...FIND_KEY(2), ...DECRYPT(2)]);
  });
}

test("the same session error twice fails with the table's reason after exactly two attempts", () => {
  const { stub, hsm, enc } = warm();
  stub.failNext("C_EncryptInit", CKR_SESSION_HANDLE_INVALID, 2);
  throwsReason(() => enc(), "INTERNAL", /CKR_SESSION_HANDLE_INVALID/);
  assert.deepEqual(stub.calls, [
    "C_EncryptInit s1",
    "C_CloseSession s1",
    ...OPEN(2),
    ...FIND_KEY(2),
    "C_EncryptInit s2",
    "C_CloseSession s2",
  ]);
  assert.equal(stub.count("C_EncryptInit s1") + stub.count("C_EncryptInit s2"), 2);
  // The failure is not sticky: the next call opens a session and works.
  stub.calls.length = 0;
  enc();
  assert.deepEqual(stub.calls, [...OPEN(3), ...FIND_KEY(3), ...ENCRYPT(3)]);
  assert.equal(hsm.stats.sessionsOpened, 3);
});

test("device error CKR_DEVICE_REMOVED: C_Finalize, C_Initialize, login, one retry", () => {
  const { stub, enc } = warm();
  stub.failNext("C_Encrypt", CKR_DEVICE_REMOVED);
  enc();
  // No C_CloseSession (C_Finalize ends every session) and no second load of the module.
  assert.deepEqual(stub.calls, [...ENCRYPT(1), "C_Finalize", "C_Initialize", ...OPEN(2), ...FIND_KEY(2), ...ENCRYPT(2)]);
});

test("the same device error twice is HSM_UNAVAILABLE after exactly two attempts", () => {
  const { stub, enc } = warm();
  stub.failNext("C_Encrypt", CKR_DEVICE_REMOVED, 2);
  throwsReason(() => enc(), "HSM_UNAVAILABLE", /CKR_DEVICE_REMOVED/);
  assert.deepEqual(stub.calls, [...ENCRYPT(1), "C_Finalize", "C_Initialize", ...OPEN(2), ...FIND_KEY(2), ...ENCRYPT(2), "C_Finalize"]);
});

test("a failed open fails fast with HSM_UNAVAILABLE and initializes the module again only after the retry interval", () => {
  const { stub, clock, hsm, enc } = rig();
  const FAILED_OPEN = [...OPEN(1).slice(0, 4), "C_Finalize"];
  stub.failNext("C_OpenSession", CKR_TOKEN_NOT_PRESENT, 2);
  throwsReason(() => hsm.open(), "HSM_UNAVAILABLE", /CKR_TOKEN_NOT_PRESENT/);
  assert.deepEqual(stub.calls, ["load", "C_Initialize", ...FAILED_OPEN]);

  stub.calls.length = 0;
  throwsReason(() => enc(), "HSM_UNAVAILABLE");
  throwsReason(() => hsm.tokenInfo(), "HSM_UNAVAILABLE");
  clock.ms += OPEN_RETRY_MS - 1;
  throwsReason(() => enc(), "HSM_UNAVAILABLE");
  assert.deepEqual(stub.calls, [], "within the retry interval no call reaches the module");

  clock.ms += 1;
  throwsReason(() => enc(), "HSM_UNAVAILABLE", /CKR_TOKEN_NOT_PRESENT/);
  assert.deepEqual(stub.calls, ["C_Initialize", ...FAILED_OPEN], "one attempt once the interval has passed");

  stub.calls.length = 0;
  throwsReason(() => enc(), "HSM_UNAVAILABLE");
  assert.deepEqual(stub.calls, []);
  clock.ms += OPEN_RETRY_MS;
  enc();
  assert.deepEqual(stub.calls, ["C_Initialize", ...OPEN(1), ...FIND_KEY(1), ...ENCRYPT(1)]);
  assert.equal(hsm.stats.sessionsOpened, 1);
});

test("no token with the label: HSM_UNAVAILABLE, the module stays initialized and the next call lists the slots again", () => {
  const { stub, hsm, enc } = rig();
  stub.present = false;
  throwsReason(() => hsm.open(), "HSM_UNAVAILABLE", /no token labelled "stub-token"/);
  assert.deepEqual(stub.calls, ["load", "C_Initialize", "C_GetSlotList"]);
  stub.calls.length = 0;
  throwsReason(() => enc(), "HSM_UNAVAILABLE", /no token labelled/);
  assert.deepEqual(stub.calls, ["C_GetSlotList"], "no C_Finalize/C_Initialize per call");
  stub.present = true;
  stub.calls.length = 0;
  enc();
  assert.deepEqual(stub.calls, [...OPEN(1), ...FIND_KEY(1), ...ENCRYPT(1)]);
});

test("CKR_CRYPTOKI_ALREADY_INITIALIZED at C_Initialize and CKR_USER_ALREADY_LOGGED_IN at C_Login are accepted", () => {
  const { stub, hsm, enc } = rig();
  // Another PKCS#11 user in the same process has initialized the module and logged in on its own session.
  stub.C_Initialize({ flags: 0 });
  stub.C_Login(stub.C_OpenSession(handle(1), 0), pkcs11js.CKU_USER, PIN);
  stub.calls.length = 0;
  hsm.open();
  assert.deepEqual(stub.calls, ["load", "C_Initialize", ...OPEN(2)], "no C_CloseSession, no C_Finalize");
  assert.equal(hsm.stats.sessionsOpened, 1);
  stub.calls.length = 0;
  enc();
  assert.deepEqual(stub.calls, [...FIND_KEY(2), ...ENCRYPT(2)]);
  // The same two answers injected on a fresh stub's own state are accepted as well.
  const r = rig();
  r.stub.C_Initialize({ flags: 0 });
  r.stub.calls.length = 0;
  r.stub.failNext("C_Login", CKR_USER_ALREADY_LOGGED_IN);
  r.hsm.open();
  assert.deepEqual(r.stub.calls, ["load", "C_Initialize", ...OPEN(1)]);
});

test("any other C_Login failure closes the new session and finalizes, and is retried after the interval", () => {
  const { stub, clock, hsm, enc } = rig();
  stub.failNext("C_Login", CKR_DEVICE_REMOVED);
  throwsReason(() => hsm.open(), "HSM_UNAVAILABLE", /CKR_DEVICE_REMOVED/);
  assert.deepEqual(stub.calls, ["load", "C_Initialize", ...OPEN(1), "C_CloseSession s1", "C_Finalize"]);
  assert.equal(hsm.stats.sessionsOpened, 0);
  assert.equal(hsm.loginStopped(), undefined, "not a PIN refusal: logins go on");
  stub.calls.length = 0;
  clock.ms += OPEN_RETRY_MS;
  enc();
  assert.deepEqual(stub.calls, ["C_Initialize", ...OPEN(2), ...FIND_KEY(2), ...ENCRYPT(2)]);
});

const PIN_REFUSALS = [
  [0xa0, "CKR_PIN_INCORRECT"],
  [0xa1, "CKR_PIN_INVALID"],
  [0xa2, "CKR_PIN_LEN_RANGE"],
  [0xa3, "CKR_PIN_EXPIRED"],
  [0xa4, "CKR_PIN_LOCKED"],
] as const;

for (const [code, name] of PIN_REFUSALS) {
  test(`${name} from C_Login: one login, then none at all until the PIN changes, whatever the traffic and the clock`, () => {
    const { stub, clock, hsm, enc } = rig();
    const stops: Array<string | undefined> = [];
    hsm.on("login", (why: string | undefined) => stops.push(why));
    stub.failNext("C_Login", code);
    const why = new RegExp(`PIN refused by the token \\(${name}\\): fix the PIN; no further logins until it changes`);
    throwsReason(() => hsm.open(), "HSM_UNAVAILABLE", why);
    // The session is closed; the module stays initialized (nothing to re-initialize for a PIN).
    assert.deepEqual(stub.calls, ["load", "C_Initialize", ...OPEN(1), "C_CloseSession s1"]);
    stub.calls.length = 0;
    for (let i = 0; i < 50; i++) {
      throwsReason(() => enc(), "HSM_UNAVAILABLE", why);
      throwsReason(() => hsm.tokenInfo(), "HSM_UNAVAILABLE", why);
      clock.ms += OPEN_RETRY_MS * 10;
    }
    assert.deepEqual(stub.calls, [], "no call reaches the module, so no login either");
    assert.match(hsm.loginStopped() ?? "", why);
    assert.match(hsm.loginStopped() ?? "", /restart the agent once the PIN is fixed/, "no PIN file: a restart brings the new PIN");
    assert.equal(stops.length, 1, "one event for listeners (the dashboard)");
    assert.equal(hsm.stats.sessionsOpened, 0);
  });
}

test("a PIN refused later (the token's PIN changed under a running agent) stops logins too", () => {
  const { stub, clock, enc } = warm();
  stub.failNext("C_Encrypt", CKR_SESSION_HANDLE_INVALID);
  stub.failNext("C_Login", CKR_PIN_INCORRECT);
  throwsReason(() => enc(), "HSM_UNAVAILABLE", /PIN refused by the token \(CKR_PIN_INCORRECT\)/);
  assert.deepEqual(stub.calls, [...ENCRYPT(1), "C_CloseSession s1", ...OPEN(2), "C_CloseSession s2"]);
  stub.calls.length = 0;
  clock.ms += OPEN_RETRY_MS * 100;
  throwsReason(() => enc(), "HSM_UNAVAILABLE", /no further logins/);
  assert.deepEqual(stub.calls, []);
});

const CKF_USER_PIN_FINAL_TRY = 0x20000;
const CKF_USER_PIN_LOCKED = 0x40000;

for (const [flag, name, why] of [
  [CKF_USER_PIN_LOCKED, "CKF_USER_PIN_LOCKED", /user PIN is locked \(CKF_USER_PIN_LOCKED\)/],
  [CKF_USER_PIN_FINAL_TRY, "CKF_USER_PIN_FINAL_TRY", /one more PIN try \(CKF_USER_PIN_FINAL_TRY\)/],
] as const) {
  test(`${name} in the token's flags: no login at all, and none later`, () => {
    const { stub, clock, hsm, enc } = rig();
    stub.flags = flag;
    throwsReason(() => hsm.open(), "HSM_UNAVAILABLE", why);
    assert.deepEqual(stub.calls, ["load", "C_Initialize", "C_GetSlotList", "C_GetTokenInfo", "C_GetTokenInfo"], "no session, no C_Login");
    stub.calls.length = 0;
    clock.ms += OPEN_RETRY_MS * 10;
    throwsReason(() => enc(), "HSM_UNAVAILABLE", why);
    assert.deepEqual(stub.calls, []);
    assert.equal(stub.count("C_Login s1"), 0);
  });
}

/** A private (0600) PIN file in a fresh folder, and a way to rewrite it. */
function pinFile(value: string) {
  const dir = mkdtempSync(join(tmpdir(), "xks-pin-"));
  const file = join(dir, "pin");
  let n = 0;
  const write = (v: string, mode = 0o600) => {
    // A new file renamed over the old one, as editors and `install` do: a new inode every time.
    const tmp = join(dir, `pin.${n++}`);
    writeFileSync(tmp, `${v}\n`, { mode });
    chmodSync(tmp, mode);
    renameSync(tmp, file);
  };
  write(value);
  return { file, write, remove: () => rmSync(dir, { recursive: true, force: true }) };
}

test("with the PIN from a file: after a refusal the file is re-read when it changes, and a new PIN logs in once", (t) => {
  const f = pinFile("0000-wrong");
  t.after(f.remove);
  const { stub, hsm, enc } = rig({ pin: "0000-wrong", pinFile: f.file });
  const events: Array<string | undefined> = [];
  hsm.on("login", (why: string | undefined) => events.push(why));
  throwsReason(() => hsm.open(), "HSM_UNAVAILABLE", /CKR_PIN_INCORRECT.*the PIN file is re-read when it changes/);
  assert.equal(stub.count("C_Login s1"), 1);

  // Rewritten with the same wrong PIN: read again, still refused, no login.
  f.write("0000-wrong");
  throwsReason(() => enc(), "HSM_UNAVAILABLE", /CKR_PIN_INCORRECT/);
  // The right PIN in a file others may read: not used.
  f.write(PIN, 0o644);
  throwsReason(() => enc(), "HSM_UNAVAILABLE", /CKR_PIN_INCORRECT/);
  assert.equal(stub.calls.filter((c) => c.startsWith("C_Login")).length, 1, "still the one login");

  // The right PIN, private: one login, and service.
  f.write(PIN);
  stub.calls.length = 0;
  enc();
  assert.deepEqual(stub.calls, [...OPEN(2), ...FIND_KEY(2), ...ENCRYPT(2)]);
  assert.equal(hsm.loginStopped(), undefined);
  assert.equal(events.length, 2);
  assert.match(events[0] ?? "", /CKR_PIN_INCORRECT/);
  assert.equal(events[1], undefined, "listeners hear that logins resumed");
});

test("CKF_USER_PIN_FINAL_TRY: the last try is spent only on a PIN the owner changed after the stop", (t) => {
  const f = pinFile("0000-wrong");
  t.after(f.remove);
  const { stub, hsm, enc } = rig({ pin: "0000-wrong", pinFile: f.file });
  stub.flags = CKF_USER_PIN_FINAL_TRY;
  throwsReason(() => hsm.open(), "HSM_UNAVAILABLE", /CKF_USER_PIN_FINAL_TRY/);
  assert.equal(stub.calls.filter((c) => c.startsWith("C_Login")).length, 0);
  f.write(PIN);
  enc();
  assert.equal(stub.calls.filter((c) => c.startsWith("C_Login")).length, 1, "one login, with the new PIN");
});

test("C_FindObjectsFinal is called even when C_FindObjects fails", () => {
  const { stub, hsm } = warm();
  // A caller-scope failure: reported, the session stays, and it has no find operation left active.
  hsm.forgetKeys();
  stub.failNext("C_FindObjects", CKR_ARGUMENTS_BAD);
  throwsReason(() => hsm.key(KEY), "VALIDATION", /CKR_ARGUMENTS_BAD/);
  assert.deepEqual(stub.calls, FIND_NONE(1));
  stub.calls.length = 0;
  assert.equal(hsm.key(KEY).label, KEY);
  assert.deepEqual(stub.calls, FIND_KEY(1), "no CKR_OPERATION_ACTIVE on the next C_FindObjectsInit");

  // A session-scope failure: Final, then a new session and one retry.
  hsm.forgetKeys();
  stub.calls.length = 0;
  stub.failNext("C_FindObjects", CKR_FUNCTION_FAILED);
  assert.equal(hsm.key(KEY).label, KEY);
  assert.deepEqual(stub.calls, [...FIND_NONE(1), "C_CloseSession s1", ...OPEN(2), ...FIND_KEY(2)]);

  // listKeys too.
  stub.calls.length = 0;
  stub.failNext("C_FindObjects", CKR_ARGUMENTS_BAD);
  throwsReason(() => hsm.listKeys(), "VALIDATION");
  assert.deepEqual(stub.calls, FIND_NONE(2));
});

test("a key lookup finding no key is KEY_NOT_FOUND, finding two is INVALID_STATE; the session stays", () => {
  const { stub, hsm, enc } = warm();
  stub.addKey("twin");
  stub.addKey("twin");
  throwsReason(() => hsm.key("missing"), "KEY_NOT_FOUND", /"missing"/);
  assert.deepEqual(stub.calls, FIND_NONE(1));
  stub.calls.length = 0;
  throwsReason(() => hsm.key("twin"), "INVALID_STATE", /more than one/);
  assert.deepEqual(stub.calls, FIND_NONE(1));
  stub.calls.length = 0;
  enc();
  assert.deepEqual(stub.calls, ENCRYPT(1), "k1 is still cached on session 1");
  assert.equal(hsm.stats.sessionsOpened, 1);
});

test("a refused PIN file is remembered across restarts: the next process tries no login until the file changes", (t) => {
  const f = pinFile("0000-wrong");
  t.after(f.remove);
  const memo = join(dirname(f.file), "state", "pin-refused.json");
  const logins = (r: { stub: StubPkcs11 }) => r.stub.calls.filter((c) => c.startsWith("C_Login")).length;

  const first = rig({ pin: "0000-wrong", pinFile: f.file, refusalMemoFile: memo });
  throwsReason(() => first.hsm.open(), "HSM_UNAVAILABLE", /CKR_PIN_INCORRECT/);
  assert.equal(logins(first), 1);
  assert.equal(statSync(memo).mode & 0o777, 0o600);
  assert.ok(!readFileSync(memo, "utf8").includes("0000-wrong"), "the memo holds no PIN");

  // A restart (a new Hsm in a new process) with the same file: no login at all.
  const second = rig({ pin: "0000-wrong", pinFile: f.file, refusalMemoFile: memo });
  throwsReason(() => second.hsm.open(), "HSM_UNAVAILABLE", /CKR_PIN_INCORRECT.*has not changed since, so no login was tried/);
  assert.equal(logins(second), 0);
  assert.deepEqual(second.stub.calls, [], "not even the module is loaded");

  // The owner fixes the file: the next start logs in once, and the memo is gone.
  f.write(PIN);
  const third = rig({ pin: PIN, pinFile: f.file, refusalMemoFile: memo });
  third.hsm.open();
  assert.equal(logins(third), 1);
  assert.equal(existsSync(memo), false);

  // Without a PIN file (env, Keychain) nothing is remembered: a restart is the change.
  const env = rig({ pin: "0000-wrong", refusalMemoFile: memo });
  throwsReason(() => env.hsm.open(), "HSM_UNAVAILABLE", /restart the agent once the PIN is fixed/);
  assert.equal(existsSync(memo), false);
});
