/**
 * Throwaway TLS material for the proxy's direct TLS and mutual TLS, made with
 * the `openssl` command line as an operator would: a server CA and a server
 * certificate for localhost and 127.0.0.1, a client CA and client
 * certificates (one allowed name, one other name, one expired, one
 * self-signed). Keys are P-256, written 0600; certificates are PEM.
 */
import { execFileSync } from "node:child_process";
import { X509Certificate, randomBytes } from "node:crypto";
import { chmodSync, mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";

/** The client name the test-bed's proxy allows (subject CN and DNS SAN of the good client certificate). */
export const TLS_CLIENT_NAME = "xks-test-client";

export interface CertFiles {
  cert: string;
  key: string;
}

export interface TlsMaterial {
  dir: string;
  /** Issues the server certificates; what a client trusts (`--cacert`). */
  serverCa: CertFiles;
  /** localhost / 127.0.0.1, issued by serverCa. */
  server: CertFiles;
  /** Issues the client certificates the proxy accepts (its `tls.clientCa`). */
  clientCa: CertFiles;
  clients: {
    /** Subject CN and DNS SAN TLS_CLIENT_NAME, issued by clientCa: accepted. */
    good: CertFiles;
    /** Issued by clientCa, but for a name not on the allow-list. */
    wrongName: CertFiles;
    /** TLS_CLIENT_NAME, issued by clientCa, expired. */
    expired: CertFiles;
    /** TLS_CLIENT_NAME, signed by its own key. */
    selfSigned: CertFiles;
  };
}

function openssl(args: string[], cwd: string): void {
  execFileSync("openssl", args, { cwd, stdio: ["ignore", "ignore", "pipe"] });
}

const EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];

function privateFile(path: string): void {
  chmodSync(path, 0o600);
}

/** A self-signed certificate (a CA, or a client nobody issued). */
function selfSigned(dir: string, name: string, cn: string, ca: boolean): CertFiles {
  const files = { cert: join(dir, `${name}.crt`), key: join(dir, `${name}.key`) };
  const ext = ca
    ? ["-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"]
    : ["-addext", `subjectAltName=DNS:${cn}`, "-addext", "extendedKeyUsage=clientAuth"];
  openssl(["req", "-x509", ...EC, "-keyout", files.key, "-out", files.cert, "-days", "825", "-subj", `/CN=${cn}`, ...ext], dir);
  privateFile(files.key);
  return files;
}

/**
 * A leaf certificate issued by `ca`: subject CN `cn`, the given SANs
 * (`DNS:…`, `IP:…`), for server or client use, valid for `days` (a negative
 * number makes one that has already expired).
 */
export function issue(
  ca: CertFiles,
  dir: string,
  name: string,
  o: { cn: string; san: string[]; use: "server" | "client"; days?: number },
): CertFiles {
  const files = { cert: join(dir, `${name}.crt`), key: join(dir, `${name}.key`) };
  const csr = join(dir, `${name}.csr`);
  const ext = join(dir, `${name}.ext`);
  openssl(["req", "-new", ...EC, "-keyout", files.key, "-out", csr, "-subj", `/CN=${o.cn}`], dir);
  privateFile(files.key);
  writeFileSync(
    ext,
    [
      "basicConstraints=critical,CA:FALSE",
      "keyUsage=critical,digitalSignature",
      `extendedKeyUsage=${o.use === "server" ? "serverAuth" : "clientAuth"}`,
      `subjectAltName=${o.san.join(",")}`,
      "",
    ].join("\n"),
  );
  openssl(
    [
      "x509",
      "-req",
      "-in",
      csr,
      "-CA",
      ca.cert,
      "-CAkey",
      ca.key,
      "-set_serial",
      `0x${randomBytes(12).toString("hex")}`,
      "-days",
      String(o.days ?? 90),
      "-extfile",
      ext,
      "-out",
      files.cert,
    ],
    dir,
  );
  rmSync(csr);
  rmSync(ext);
  return files;
}

/** A new server certificate for localhost and 127.0.0.1 from the material's server CA (a renewal, for reload tests). */
export function issueServerCert(m: TlsMaterial, name: string): CertFiles {
  return issue(m.serverCa, m.dir, name, { cn: "localhost", san: ["DNS:localhost", "IP:127.0.0.1"], use: "server" });
}

/** Makes the whole set in `dir` (created; files there of the same names are replaced). */
export function makeTlsMaterial(dir: string): TlsMaterial {
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const serverCa = selfSigned(dir, "server-ca", "xks throwaway server CA", true);
  const clientCa = selfSigned(dir, "client-ca", "xks throwaway client CA", true);
  const m: TlsMaterial = {
    dir,
    serverCa,
    server: issue(serverCa, dir, "server", { cn: "localhost", san: ["DNS:localhost", "IP:127.0.0.1"], use: "server" }),
    clientCa,
    clients: {
      good: issue(clientCa, dir, "client", { cn: TLS_CLIENT_NAME, san: [`DNS:${TLS_CLIENT_NAME}`], use: "client" }),
      wrongName: issue(clientCa, dir, "client-wrong-name", { cn: "someone-else", san: ["DNS:someone-else"], use: "client" }),
      expired: issue(clientCa, dir, "client-expired", { cn: TLS_CLIENT_NAME, san: [`DNS:${TLS_CLIENT_NAME}`], use: "client", days: -1 }),
      selfSigned: selfSigned(dir, "client-self-signed", TLS_CLIENT_NAME, false),
    },
  };
  return m;
}

/** The SHA-256 fingerprint of a PEM certificate file, as Node's getPeerCertificate().fingerprint256 prints it. */
export function certFingerprint(certFile: string): string {
  return new X509Certificate(readFileSync(certFile)).fingerprint256;
}
