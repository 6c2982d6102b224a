/**
 * Identities of the two halves on their gRPC channel: each side has a P-256
 * key and a self-signed X.509 certificate carrying its public key; each side
 * pins the other's certificate(s). TLS (inside the forwarded SSH stream) then
 * authenticates both ends, whoever can bind the socket or port the stream
 * arrives on.
 *
 * A certificate is only the envelope TLS needs for a public key: it is
 * self-signed, never expires (RFC 5280's 99991231235959Z), and is trusted
 * only because the peer's config pins it. An identity is named by its
 * fingerprint, `SHA256:` + base64 (unpadded) of the SHA-256 of its
 * SubjectPublicKeyInfo, in the style of OpenSSH's key fingerprints.
 *
 * The certificate is written by a 60-line DER encoder below rather than a
 * library: the X.509 generators on npm either cannot make ECDSA certificates
 * or need a global Reflect polyfill and a dozen packages for the same fixed
 * structure. Its output is checked by Node's own X509Certificate parser and
 * by real TLS handshakes in the tests.
 */
import { X509Certificate, createHash, createPrivateKey, generateKeyPairSync, randomBytes, sign } from "node:crypto";
import { writeFileSync } from "node:fs";

/** `SHA256:<43 base64 characters>`. */
export const FINGERPRINT_RE = /^SHA256:[A-Za-z0-9+/]{43}$/;

/** A side's own identity: its private key (PEM, PKCS#8) and its certificate (PEM). */
export interface OwnIdentity {
  key: string;
  certificate: string;
}

/** A pinned peer identity: the certificate as configured, and its fingerprint. */
export interface PinnedIdentity {
  certificate: string;
  fingerprint: string;
}

/** The fingerprint of a public key in DER SubjectPublicKeyInfo form. */
export function spkiFingerprint(spkiDer: Buffer): string {
  return `SHA256:${createHash("sha256").update(spkiDer).digest("base64").replace(/=+$/, "")}`;
}

/** The fingerprint of the public key a PEM or DER certificate carries. Throws on anything that is not one certificate. */
export function certificateFingerprint(cert: string | Buffer): string {
  const x = new X509Certificate(cert);
  return spkiFingerprint(x.publicKey.export({ type: "spki", format: "der" }));
}

/** Parses a pinned certificate (PEM); the error says what is wrong, never echoes the input. */
export function parsePinned(pem: string): PinnedIdentity {
  let fingerprint: string;
  try {
    fingerprint = certificateFingerprint(pem);
  } catch {
    throw new Error("not a PEM X.509 certificate");
  }
  return { certificate: pem, fingerprint };
}

/** Checks that a private key (PEM) belongs to a certificate (PEM); returns the identity's fingerprint. */
export function checkOwnIdentity(id: OwnIdentity): string {
  let x: X509Certificate;
  try {
    x = new X509Certificate(id.certificate);
  } catch {
    throw new Error("the certificate is not a PEM X.509 certificate");
  }
  let ok: boolean;
  try {
    ok = x.checkPrivateKey(createPrivateKey(id.key));
  } catch {
    throw new Error("the key is not a PEM private key");
  }
  if (!ok) throw new Error("the key does not belong to the certificate");
  return certificateFingerprint(id.certificate);
}

// --- a minimal DER writer for one fixed certificate shape ------------------------------------

function der(tag: number, body: Buffer): Buffer {
  const n = body.length;
  const len = n < 0x80 ? Buffer.from([n]) : n < 0x100 ? Buffer.from([0x81, n]) : Buffer.from([0x82, n >> 8, n & 0xff]);
  if (n > 0xffff) throw new Error("DER value too long");
  return Buffer.concat([Buffer.from([tag]), len, body]);
}
const seq = (...items: Buffer[]) => der(0x30, Buffer.concat(items));
const set = (...items: Buffer[]) => der(0x31, Buffer.concat(items));

function oid(dotted: string): Buffer {
  const [a, b, ...rest] = dotted.split(".").map(Number);
  const bytes = [40 * a + b];
  for (const v of rest) {
    const groups = [v & 0x7f];
    for (let x = v >> 7; x > 0; x >>= 7) groups.unshift((x & 0x7f) | 0x80);
    bytes.push(...groups);
  }
  return der(0x06, Buffer.from(bytes));
}

/** A positive INTEGER from big-endian bytes (a leading 0x00 when the top bit is set). */
function positiveInteger(bytes: Buffer): Buffer {
  return der(0x02, bytes[0] & 0x80 ? Buffer.concat([Buffer.from([0]), bytes]) : bytes);
}

/** UTCTime before 2050, GeneralizedTime from 2050 on (RFC 5280 4.1.2.5). */
function time(d: Date): Buffer {
  const iso = d.toISOString().replace(/[-:T]/g, "").slice(0, 14); // YYYYMMDDhhmmss
  return d.getUTCFullYear() < 2050 ? der(0x17, Buffer.from(`${iso.slice(2)}Z`)) : der(0x18, Buffer.from(`${iso}Z`));
}

const ECDSA_WITH_SHA256 = seq(oid("1.2.840.10045.4.3.2"));
const NEVER_EXPIRES = new Date(Date.UTC(9999, 11, 31, 23, 59, 59));

/**
 * Makes a new identity: a P-256 key and a self-signed v1 certificate for it
 * with the common name `cn`. No extensions: the certificate is a pinned trust
 * anchor of its own, never a CA for anything else.
 */
export function generateIdentity(cn: string): OwnIdentity & { fingerprint: string } {
  const { privateKey, publicKey } = generateKeyPairSync("ec", { namedCurve: "P-256" });
  const spki = publicKey.export({ type: "spki", format: "der" });
  const name = seq(set(seq(oid("2.5.4.3"), der(0x0c, Buffer.from(cn, "utf8")))));
  // A positive serial in minimal DER: first byte 0x01..0x7f (a leading 0x00 would be a non-minimal INTEGER).
  const serial = randomBytes(16);
  serial[0] = 1 + (serial[0] % 0x7f);
  const notBefore = new Date(Math.floor(Date.now() / 1000) * 1000 - 60_000);
  const tbs = seq(positiveInteger(serial), ECDSA_WITH_SHA256, name, seq(time(notBefore), time(NEVER_EXPIRES)), name, spki);
  const signature = sign("sha256", tbs, { key: privateKey, dsaEncoding: "der" });
  const certDer = seq(tbs, ECDSA_WITH_SHA256, der(0x03, Buffer.concat([Buffer.from([0]), signature])));
  const b64 = certDer.toString("base64").replace(/.{64}/g, "$&\n");
  const certificate = `-----BEGIN CERTIFICATE-----\n${b64.replace(/\n$/, "")}\n-----END CERTIFICATE-----\n`;
  return {
    key: privateKey.export({ type: "pkcs8", format: "pem" }).toString(),
    certificate,
    fingerprint: spkiFingerprint(spki),
  };
}

/**
 * `identity new` of both CLIs: writes `<out>.key` (0600, never overwritten) and
 * `<out>.crt`, and returns the lines to print: the fingerprint and where each
 * file goes. `side` names this daemon, `peer` the one that pins it.
 */
export function writeNewIdentity(out: string, side: "agent" | "proxy", cn: string): string[] {
  const id = generateIdentity(cn);
  const keyFile = `${out}.key`;
  const crtFile = `${out}.crt`;
  writeFileSync(keyFile, id.key, { mode: 0o600, flag: "wx" });
  writeFileSync(crtFile, id.certificate, { mode: 0o644, flag: "wx" });
  const pinField = side === "agent" ? "proxy.json agents[].identities (this agent's entry)" : "agent.json proxyIdentities";
  return [
    `wrote ${keyFile} (private key, mode 0600) and ${crtFile} (certificate, public)`,
    `identity ${id.fingerprint}`,
    `this ${side}'s config: "identity": {"key": {"file": "${keyFile}"}, "certificate": "${crtFile}"}`,
    `the ${side === "agent" ? "proxy" : "agent"} pins it: copy ${crtFile} there and add its path to ${pinField}`,
    "(to rotate: pin the new certificate next to the old one, reload the peer with SIGHUP, switch this side, reload, then drop the old pin)",
  ];
}
