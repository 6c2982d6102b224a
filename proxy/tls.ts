/**
 * Direct TLS on the proxy's HTTP listener (no load balancer in front), and
 * optional mutual TLS: the config's `tls` section, checked once at start and
 * again on every SIGHUP, and the server side that applies it.
 *
 *   "tls": {
 *     "certificate": "server.crt",             // PEM: the server certificate, then its intermediates
 *     "key": { "file": "server.key" },         // secret reference to its PEM private key
 *     "clientCa": "client-ca.crt",             // optional (mutual TLS): PEM CA certificate(s) a client's must chain to
 *     "clientNames": ["cks.kms.us-east-1.amazonaws.com"]   // with clientCa: allowed client names, 1..10
 *   }
 *
 * Protocol: TLS 1.2 and 1.3 only; in TLS 1.2 only ECDHE key exchange with an
 * AEAD cipher (AES-GCM, ChaCha20-Poly1305); TLS 1.3's suites are all AEAD.
 * This includes the suites KMS requires of an XKS proxy
 * (TLS_ECDHE_{RSA,ECDSA}_WITH_AES_256_GCM_SHA384, TLS_AES_256_GCM_SHA384,
 * TLS_CHACHA20_POLY1305_SHA256).
 *
 * Mutual TLS: a client must present a certificate that chains to `clientCa`
 * and is within its validity, and its subject CN or one of its DNS
 * subjectAltNames must equal (ignoring case; no wildcard matching) a name in
 * `clientNames`; otherwise the connection is closed before any HTTP is read
 * or answered. Where the refusal happens on the wire is Node's (OpenSSL's
 * verify callback in Node accepts every chain and Node checks the result
 * once the handshake is done): no certificate is refused inside the
 * handshake (TLS 1.2 alert handshake_failure, TLS 1.3 certificate_required);
 * an untrusted, self-signed or expired certificate, and a trusted one whose
 * name is not allowed, complete the handshake and the connection is then
 * closed without an alert and without an HTTP answer.
 *
 * SIGHUP re-reads the files (the whole config is re-read and checked); a
 * valid set replaces the server's secure context for new connections, an
 * invalid one is refused and the running certificate stays. Turning TLS or
 * mutual TLS on or off needs a restart. The private key is never logged.
 */
import { X509Certificate, createPrivateKey } from "node:crypto";
import { readFileSync } from "node:fs";
import type { Server as HttpsServer } from "node:https";
import { createSecureContext, type TLSSocket } from "node:tls";
import type { Checker } from "../shared/config.ts";
import type { Logger } from "../shared/logging.ts";

/** TLS 1.2 suites: ECDHE key exchange and an AEAD cipher only, strongest first. TLS 1.3's own suites are all AEAD. */
export const TLS12_CIPHERS = [
  "ECDHE-ECDSA-AES256-GCM-SHA384",
  "ECDHE-RSA-AES256-GCM-SHA384",
  "ECDHE-ECDSA-CHACHA20-POLY1305",
  "ECDHE-RSA-CHACHA20-POLY1305",
  "ECDHE-ECDSA-AES128-GCM-SHA256",
  "ECDHE-RSA-AES128-GCM-SHA256",
].join(":");
export const TLS13_SUITES = ["TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256", "TLS_AES_128_GCM_SHA256"].join(":");

/** A client name on the allow-list: a DNS name (what KMS presents is `cks.kms.<region>.amazonaws.com`). */
const CLIENT_NAME_RE = /^[A-Za-z0-9_]([A-Za-z0-9._-]{0,251}[A-Za-z0-9_])?$/;

export interface TlsConfig {
  /** The certificate file as configured (for logs). */
  certificateFile: string;
  /** PEM: the server certificate and its intermediates. */
  certificate: string;
  /** PEM private key (a secret: never logged). */
  key: string;
  /** PEM CA certificate(s) for client certificates; mutual TLS when set. */
  clientCa?: string;
  clientCaFile?: string;
  /** Allowed client names (lower case), when clientCa is set. */
  clientNames: string[];
  /** The server certificate's SHA-256 fingerprint, subject and expiry (for logs). */
  fingerprint256: string;
  subject: string;
  validTo: string;
}

/** Node's TLS options for this config (also what a reload passes to setSecureContext). */
export function secureContextOptions(t: Readonly<TlsConfig>) {
  return {
    cert: t.certificate,
    key: t.key,
    ...(t.clientCa ? { ca: t.clientCa } : {}),
    minVersion: "TLSv1.2" as const,
    ciphers: `${TLS12_CIPHERS}:${TLS13_SUITES}`,
    honorCipherOrder: true,
  };
}

/** Splits a PEM bundle into certificates; undefined when it holds none or something else. */
function pemCertificates(text: string): X509Certificate[] | undefined {
  const blocks = text.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g);
  if (!blocks) return undefined;
  try {
    return blocks.map((b) => new X509Certificate(b));
  } catch {
    return undefined;
  }
}

/** The text of a public file (a certificate); undefined after reporting why it cannot be read. */
function readText(c: Checker, path: string, field: string): string | undefined {
  try {
    return readFileSync(path, "utf8");
  } catch (err) {
    c.problem(field, `cannot read ${path} (${(err as NodeJS.ErrnoException).code ?? "error"})`);
    return undefined;
  }
}

/** Reads and checks the `tls` section; undefined when absent or invalid (problems go to the Checker). */
export function parseTlsConfig(c: Checker, raw: unknown, env: NodeJS.ProcessEnv, now = Date.now(), f = "tls"): TlsConfig | undefined {
  if (raw === undefined) return undefined;
  const o = c.object(raw, f);
  c.noUnknown(o, f, ["certificate", "key", "clientCa", "clientNames"]);
  const certificateFile = c.path(o, "certificate", f);
  const key = c.secret(o, "key", f, env);
  const certificate = certificateFile === "" ? undefined : readText(c, certificateFile, `${f}.certificate`);
  let ok = key !== "" && certificate !== undefined;

  let leaf: X509Certificate | undefined;
  if (certificate !== undefined) {
    const chain = pemCertificates(certificate);
    if (!chain) {
      c.problem(`${f}.certificate`, `${certificateFile} holds no PEM X.509 certificate`);
      ok = false;
    } else {
      leaf = chain[0];
      if (Date.parse(leaf.validTo) < now) {
        c.problem(`${f}.certificate`, `the certificate in ${certificateFile} expired on ${leaf.validTo}`);
        ok = false;
      } else if (Date.parse(leaf.validFrom) > now) {
        c.problem(`${f}.certificate`, `the certificate in ${certificateFile} is not valid before ${leaf.validFrom}`);
        ok = false;
      }
    }
  }
  if (leaf && key !== "") {
    let belongs = false;
    try {
      belongs = leaf.checkPrivateKey(createPrivateKey(key));
      if (!belongs) c.problem(`${f}.key`, `the key does not belong to the certificate in ${certificateFile}`);
    } catch {
      c.problem(`${f}.key`, "is not a PEM private key");
    }
    ok &&= belongs;
  }

  let clientCa: string | undefined;
  let clientCaFile: string | undefined;
  if (o.clientCa !== undefined) {
    clientCaFile = c.path(o, "clientCa", f);
    const text = clientCaFile === "" ? undefined : readText(c, clientCaFile, `${f}.clientCa`);
    if (text !== undefined) {
      const cas = pemCertificates(text);
      if (!cas) c.problem(`${f}.clientCa`, `${clientCaFile} holds no PEM X.509 certificate`);
      else if (cas.some((x) => !x.ca)) c.problem(`${f}.clientCa`, `${clientCaFile} holds a certificate that is not a CA certificate`);
      else clientCa = text;
    }
    if (clientCa === undefined) ok = false;
  }
  const clientNames: string[] = [];
  if (o.clientNames !== undefined) {
    if (o.clientCa === undefined) c.problem(`${f}.clientNames`, "needs tls.clientCa (the CA client certificates must chain to)");
    const list = c.array(o, "clientNames", f, { min: 1 });
    if (list.length > 10) c.problem(`${f}.clientNames`, "must have at most 10 entries");
    list.forEach((n, i) => {
      if (typeof n !== "string" || !CLIENT_NAME_RE.test(n)) {
        c.problem(`${f}.clientNames[${i}]`, "must be a DNS name (letters, digits, '.', '-', '_'; no wildcard), at most 253 characters");
        return;
      }
      if (clientNames.includes(n.toLowerCase())) c.problem(`${f}.clientNames[${i}]`, `duplicate name "${n}"`);
      clientNames.push(n.toLowerCase());
    });
  } else if (o.clientCa !== undefined) {
    c.problem(`${f}.clientNames`, "is required with tls.clientCa: the client names allowed (subject CN or DNS subjectAltName)");
  }

  if (!ok || !leaf || certificate === undefined) return undefined;
  const t: TlsConfig = {
    certificateFile,
    certificate,
    key,
    ...(clientCa !== undefined ? { clientCa, clientCaFile } : {}),
    clientNames,
    fingerprint256: leaf.fingerprint256,
    subject: leaf.subject.replaceAll("\n", ", "),
    validTo: leaf.validTo,
  };
  try {
    createSecureContext(secureContextOptions(t));
  } catch (err) {
    // OpenSSL's reason (e.g. a key type it cannot use with these suites), never key material.
    c.problem(f, `the certificate and key cannot be used for TLS (${String((err as Error).message).slice(0, 200)})`);
    return undefined;
  }
  return t;
}

/** The names a client certificate carries: its subject CN(s) and DNS subjectAltNames, lower case. */
export function clientCertificateNames(cert: { subject?: object; subjectaltname?: string }): string[] {
  const names: string[] = [];
  // Node gives a repeated attribute as an array.
  const cn = (cert.subject as { CN?: string | string[] } | undefined)?.CN;
  for (const n of Array.isArray(cn) ? cn : cn !== undefined ? [cn] : []) names.push(n.toLowerCase());
  for (const entry of (cert.subjectaltname ?? "").split(", ")) {
    const m = /^DNS:([^"\s,]+)$/.exec(entry);
    if (m) names.push(m[1].toLowerCase());
  }
  return [...new Set(names)];
}

/** What the config log line says about TLS (no key material). */
export function describeTls(t: Readonly<TlsConfig> | undefined): Record<string, unknown> | undefined {
  if (!t) return undefined;
  return {
    certificate: t.certificateFile,
    subject: t.subject,
    fingerprint256: t.fingerprint256,
    validTo: t.validTo,
    mutual: t.clientCa !== undefined ? { clientCa: t.clientCaFile, clientNames: t.clientNames } : undefined,
  };
}

/** Node's server options for direct TLS (passed to https.createServer with the HTTP options). */
export function tlsServerOptions(t: Readonly<TlsConfig>, handshakeTimeoutMs: number) {
  const mutual = t.clientCa !== undefined;
  return {
    ...secureContextOptions(t),
    requestCert: mutual,
    rejectUnauthorized: mutual,
    // A client that opens a connection and never finishes the handshake is closed like one that never sends its headers.
    handshakeTimeout: handshakeTimeoutMs,
  };
}

/**
 * The running TLS listener's policy: the client-name allow-list on every new
 * connection, logs of refused handshakes, and reload.
 */
export class TlsListener {
  private current: Readonly<TlsConfig>;
  private names: Set<string>;

  constructor(
    private readonly server: HttpsServer,
    config: Readonly<TlsConfig>,
    private readonly log: Logger,
  ) {
    this.current = config;
    this.names = new Set(config.clientNames);
    // First, before the HTTP layer's own listener: a refused client's socket is closed before anything reads it.
    server.prependListener("secureConnection", (socket: TLSSocket) => this.admit(socket));
    server.on("tlsClientError", (err: NodeJS.ErrnoException, socket: TLSSocket) => this.refused(err, socket));
  }

  get mutual(): boolean {
    return this.current.clientCa !== undefined;
  }

  get config(): Readonly<TlsConfig> {
    return this.current;
  }

  private admit(socket: TLSSocket): void {
    if (!this.mutual) return;
    const cert = socket.getPeerCertificate();
    const names = clientCertificateNames(cert);
    if (names.some((n) => this.names.has(n))) return;
    this.log.warn(
      { remote: socket.remoteAddress, clientNames: names.slice(0, 10), clientFingerprint256: cert.fingerprint256 },
      "client certificate refused: no allowed name (tls.clientNames)",
    );
    socket.destroy();
  }

  private refused(err: NodeJS.ErrnoException, socket: TLSSocket): void {
    // Node closes a client whose certificate failed verification without an error of its own: its reason is on the socket.
    const why = socket.authorizationError ? String(socket.authorizationError) : undefined;
    if (why || err.code === "ERR_SSL_PEER_DID_NOT_RETURN_A_CERTIFICATE") {
      this.log.warn({ remote: socket.remoteAddress, code: why ?? err.code }, "client certificate refused");
    } else {
      this.log.debug({ remote: socket.remoteAddress, code: err.code, reason: String(err.message).slice(0, 160) }, "TLS handshake failed");
    }
  }

  /**
   * Applies a re-read `tls` section to new connections (existing ones keep
   * theirs). Returns a problem instead when the change needs a restart.
   */
  reload(next: Readonly<TlsConfig> | undefined): string | undefined {
    if (!next) return "tls was removed from the config: serving without TLS needs a restart; the running certificate stays";
    if ((next.clientCa !== undefined) !== this.mutual) {
      return "turning mutual TLS on or off (tls.clientCa) needs a restart; the running TLS settings stay";
    }
    try {
      this.server.setSecureContext(secureContextOptions(next));
    } catch (err) {
      return `the new certificate cannot be used (${String((err as Error).message).slice(0, 200)}); the running certificate stays`;
    }
    this.current = next;
    this.names = new Set(next.clientNames);
    return undefined;
  }
}
