/** Channel identities: the certificate writer, fingerprints, key/certificate checks and the CLI that makes them. */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { X509Certificate } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { fromSecurityOutput } from "../../shared/config.ts";
import {
  certificateFingerprint,
  checkOwnIdentity,
  FINGERPRINT_RE,
  generateIdentity,
  parsePinned,
  writeNewIdentity,
} from "../../shared/identity.ts";

test("a new identity is a P-256 key and a self-signed certificate that Node's and OpenSSL's parsers accept", () => {
  const id = generateIdentity("xks-agent unit");
  const x = new X509Certificate(id.certificate);
  assert.equal(x.subject, "CN=xks-agent unit");
  assert.equal(x.issuer, x.subject);
  assert.ok(x.verify(x.publicKey), "the signature verifies with its own key");
  assert.equal(x.publicKey.asymmetricKeyDetails?.namedCurve, "prime256v1");
  assert.equal(new Date(x.validTo).getUTCFullYear(), 9999, "never expires: pinning, not expiry, decides trust");
  assert.ok(new Date(x.validFrom).getTime() <= Date.now());
  assert.match(id.fingerprint, FINGERPRINT_RE);
  assert.equal(certificateFingerprint(id.certificate), id.fingerprint);
  assert.equal(checkOwnIdentity(id), id.fingerprint);
  const text = execFileSync("openssl", ["x509", "-noout", "-text"], { input: id.certificate, encoding: "utf8" });
  assert.match(text, /Signature Algorithm: ecdsa-with-SHA256/);
  assert.notEqual(generateIdentity("xks-agent unit").fingerprint, id.fingerprint, "a fresh key each time");
});

test("a key that does not belong to the certificate, and text that is no certificate, are refused without echoing them", () => {
  const a = generateIdentity("a");
  const b = generateIdentity("b");
  assert.throws(() => checkOwnIdentity({ key: a.key, certificate: b.certificate }), /the key does not belong to the certificate/);
  assert.throws(() => checkOwnIdentity({ key: "not a key", certificate: a.certificate }), /the key is not a PEM private key$/);
  assert.throws(
    () => parsePinned("hello"),
    (e: Error) => e.message === "not a PEM X.509 certificate",
  );
  assert.equal(parsePinned(a.certificate).fingerprint, a.fingerprint);
});

test("identity new writes the key 0600 and never over an existing file", () => {
  const dir = mkdtempSync(join(tmpdir(), "xks-identity-"));
  try {
    const out = join(dir, "agent-identity");
    const lines = writeNewIdentity(out, "agent", "xks-agent");
    assert.equal(statSync(`${out}.key`).mode & 0o777, 0o600);
    const fp = certificateFingerprint(readFileSync(`${out}.crt`));
    assert.ok(lines.some((l) => l === `identity ${fp}`));
    assert.ok(
      lines.every((l) => !l.includes("PRIVATE KEY")),
      "the key is not printed",
    );
    assert.throws(
      () => writeNewIdentity(out, "agent", "xks-agent"),
      (e: NodeJS.ErrnoException) => e.code === "EEXIST",
    );
    assert.equal(certificateFingerprint(readFileSync(`${out}.crt`)), fp, "the first identity is intact");
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("a PEM key kept in the macOS Keychain is read back although `security -w` prints it as hex", () => {
  const id = generateIdentity("keychain");
  assert.equal(fromSecurityOutput(Buffer.from(id.key).toString("hex")), id.key);
  assert.equal(fromSecurityOutput("0123456789abcdef"), "0123456789abcdef", "a hex-looking PIN stays as it is");
  assert.equal(fromSecurityOutput("s3cret"), "s3cret");
});

test("every generated certificate is valid DER (serial numbers are minimal positive INTEGERs)", () => {
  for (let i = 0; i < 2000; i++) {
    const id = generateIdentity("many");
    assert.equal(certificateFingerprint(id.certificate), id.fingerprint, `certificate ${i} does not parse`);
  }
});
