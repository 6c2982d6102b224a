/**
 * SigV4 credentials for a KMS external key store: minted by the proxy (the
 * spec lets the proxy choose them), with the KMS console's "proxy
 * configuration file" that hands them to KMS.
 *
 * `xks-proxy credentials new` (credentialsCommand) writes the secret to a new
 * private file and prints what the operator needs next: the proxy config
 * entry and the exact `aws kms create-custom-key-store` /
 * `update-custom-key-store` commands. Those commands take the secret by
 * reference (`$(cat FILE)`), so the secret itself never reaches the terminal,
 * its scrollback or a captured log unless the operator asks for it
 * (`--show-secret`) or for the console's file (`--console-file`, 0600 too).
 */
import { closeSync, fchmodSync, fsyncSync, openSync, unlinkSync, writeSync } from "node:fs";
import { randomBytes } from "node:crypto";
import { resolve } from "node:path";
import { UsageError } from "../shared/cli.ts";
import { prefixProblem } from "../shared/xks-spec.ts";
import { API_BASE } from "./routes.ts";

const BASE32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

/** RFC 4648 base32 without padding. */
export function base32(bytes: Uint8Array): string {
  let out = "";
  let bits = 0;
  let value = 0;
  for (const b of bytes) {
    value = (value << 8) | b;
    bits += 8;
    while (bits >= 5) {
      out += BASE32[(value >>> (bits - 5)) & 31];
      bits -= 5;
    }
  }
  if (bits > 0) out += BASE32[(value << (5 - bits)) & 31];
  return out;
}

export interface NewCredential {
  accessKeyId: string;
  secretAccessKey: string;
  /** The KMS console's "proxy configuration file" for CreateCustomKeyStore. */
  proxyConfigurationFile: {
    XksProxyUriPath: string;
    XksProxyAuthenticationCredential: { AccessKeyId: string; RawSecretAccessKey: string };
  };
}

/**
 * A fresh credential: access key id = base32 of 16 random bytes (26 chars of
 * A-Z2-7, spec: 20–30), secret = base64 of 32 random bytes (44 chars, 256 bits,
 * spec: 43–64 of a-zA-Z0-9/+=).
 */
export function newCredential(prefix = ""): NewCredential {
  const accessKeyId = base32(randomBytes(16));
  const secretAccessKey = randomBytes(32).toString("base64");
  return {
    accessKeyId,
    secretAccessKey,
    proxyConfigurationFile: {
      XksProxyUriPath: `${prefix}${API_BASE}`,
      XksProxyAuthenticationCredential: { AccessKeyId: accessKeyId, RawSecretAccessKey: secretAccessKey },
    },
  };
}

/** KMS's rule for XksProxyUriEndpoint (CreateCustomKeyStore): `https://` and a host name, no port or path. */
export const XKS_ENDPOINT_RE = /^https:\/\/[a-zA-Z0-9.-]+$/;
/** KMS's rule for XksProxyUriPath. */
export const XKS_URI_PATH_RE = /^(\/[a-zA-Z0-9/_-]+\/kms\/xks\/v\d{1,2})$|^(\/kms\/xks\/v\d{1,2})$/;
/** KMS's rule for CustomKeyStoreName (1-256 characters); kept to characters that need no shell quoting. */
const KEY_STORE_NAME_RE = /^[A-Za-z0-9._:/=+@-]{1,256}$/;
const REGION_RE = /^[a-z]{2,}(?:-[a-z0-9]+)+$/;
/** A VPC endpoint service name, e.g. com.amazonaws.vpce.us-east-1.vpce-svc-0123456789abcdef0. */
const VPCE_SERVICE_RE = /^com\.amazonaws\.vpce\.[a-z0-9-]+\.vpce-svc-[0-9a-f]{8,17}$/;
/** Characters a path may hold and still be pasted into a shell command unquoted. */
const SHELL_SAFE_PATH_RE = /^[A-Za-z0-9._/+@:-]+$/;

/** What `credentials new` does, for its help text. */
export const CREDENTIALS_DETAILS = `Mints a SigV4 credential for one key store (the proxy's keyStores entry with
this uriPathPrefix). The secret goes into --secret-out, created with mode 0600
(never over an existing file); run this as the proxy's user so that the proxy
may read it. Printed: the access key id, the keyStores entry for the proxy's
config, and the aws CLI commands that create the KMS custom key store with it
or switch an existing one to it, reading the secret from the file. Every
argument is checked before anything is minted or written.`;

/** The options of `credentials new`, after parsing. */
export interface CredentialsNewOptions {
  "secret-out": string;
  endpoint: string;
  region: string;
  prefix: string;
  name: string;
  connectivity: string;
  "vpc-endpoint-service-name"?: string;
  "console-file"?: string;
  "show-secret": boolean;
}

export interface CredentialsIo {
  out(line: string): void;
  err(line: string): void;
}

/** Creates `path` with mode 0600 and writes `text`; never replaces an existing file (EEXIST). */
export function writeNewPrivateFile(path: string, text: string): void {
  const fd = openSync(path, "wx", 0o600);
  let ok = false;
  try {
    fchmodSync(fd, 0o600); // the umask may have taken bits away; it never adds any, but be exact
    writeSync(fd, text);
    fsyncSync(fd);
    ok = true;
  } finally {
    closeSync(fd);
    if (!ok) unlinkSync(path);
  }
}

export interface KmsCommandOptions {
  accessKeyId: string;
  /** Absolute path of the secret file; the commands read it with $(cat …). */
  secretFile: string;
  prefix: string;
  endpoint: string;
  region: string;
  name: string;
  connectivity: "PUBLIC_ENDPOINT" | "VPC_ENDPOINT_SERVICE";
  vpcEndpointServiceName?: string;
}

/**
 * The aws CLI commands for KMS, one argument per line. The secret is read
 * from its file when the command runs; nothing else in them is secret.
 */
export function kmsCommands(o: KmsCommandOptions): { create: string; update: string; keyStoreId: string } {
  const credential = `--xks-proxy-authentication-credential "AccessKeyId=${o.accessKeyId},RawSecretAccessKey=$(cat ${o.secretFile})"`;
  const vpce = o.connectivity === "VPC_ENDPOINT_SERVICE" ? [`--xks-proxy-vpc-endpoint-service-name ${o.vpcEndpointServiceName}`] : [];
  const create = [
    `aws kms create-custom-key-store --region ${o.region}`,
    `--custom-key-store-name ${o.name}`,
    "--custom-key-store-type EXTERNAL_KEY_STORE",
    `--xks-proxy-connectivity ${o.connectivity}`,
    `--xks-proxy-uri-endpoint ${o.endpoint}`,
    `--xks-proxy-uri-path ${o.prefix}${API_BASE}`,
    ...vpce,
    credential,
  ].join(" \\\n    ");
  const keyStoreId = `KEY_STORE_ID=$(aws kms describe-custom-key-stores --region ${o.region} --custom-key-store-name ${o.name} --query 'CustomKeyStores[0].CustomKeyStoreId' --output text)`;
  const update = [`aws kms update-custom-key-store --region ${o.region}`, '--custom-key-store-id "$KEY_STORE_ID"', credential].join(
    " \\\n    ",
  );
  return { create, update, keyStoreId };
}

/**
 * `xks-proxy credentials new`, its options parsed. Returns the exit code: 0
 * done, 1 a file could not be written; a bad argument is a UsageError (exit 2).
 */
export function credentialsNew(v: CredentialsNewOptions, io: CredentialsIo): number {
  const problems: string[] = [];
  const prefix = v.prefix ?? "";
  const pp = prefixProblem(prefix);
  if (pp) problems.push(`--prefix ${pp}`);
  if (!v["secret-out"]) problems.push("--secret-out FILE is required (the secret is written there, 0600)");
  else if (!SHELL_SAFE_PATH_RE.test(resolve(v["secret-out"]))) problems.push("--secret-out must be a path of [A-Za-z0-9._/+@:-]");
  if (!v.endpoint) problems.push("--endpoint https://HOST is required (the name KMS calls, e.g. https://xks.example.com)");
  else if (!XKS_ENDPOINT_RE.test(v.endpoint) || v.endpoint.length < 10 || v.endpoint.length > 128) {
    problems.push("--endpoint must be https:// and a DNS name, 10-128 characters, no port and no path (KMS always uses 443)");
  }
  if (!v.region) problems.push("--region is required (the proxy's region; KMS signs with the key store's region)");
  else if (!REGION_RE.test(v.region)) problems.push("--region must be an AWS region name such as us-east-1");
  if (!KEY_STORE_NAME_RE.test(v.name ?? "")) problems.push("--name must be 1-256 characters of [A-Za-z0-9._:/=+@-]");
  const connectivity = v.connectivity;
  if (connectivity !== "PUBLIC_ENDPOINT" && connectivity !== "VPC_ENDPOINT_SERVICE") {
    problems.push("--connectivity must be PUBLIC_ENDPOINT or VPC_ENDPOINT_SERVICE");
  }
  const vpce = v["vpc-endpoint-service-name"];
  if (connectivity === "VPC_ENDPOINT_SERVICE" && !vpce)
    problems.push("--connectivity VPC_ENDPOINT_SERVICE needs --vpc-endpoint-service-name");
  if (connectivity !== "VPC_ENDPOINT_SERVICE" && vpce)
    problems.push("--vpc-endpoint-service-name is for --connectivity VPC_ENDPOINT_SERVICE only");
  if (vpce && !VPCE_SERVICE_RE.test(vpce)) problems.push("--vpc-endpoint-service-name must look like com.amazonaws.vpce.REGION.vpce-svc-…");
  const consoleFile = v["console-file"];
  if (consoleFile !== undefined && resolve(consoleFile) === resolve(v["secret-out"] ?? "")) {
    problems.push("--console-file must differ from --secret-out");
  }
  if (problems.length > 0) throw new UsageError(`\n  - ${problems.join("\n  - ")}`);

  const secretFile = resolve(v["secret-out"]!);
  const c = newCredential(prefix);
  try {
    writeNewPrivateFile(secretFile, `${c.secretAccessKey}\n`);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    io.err(
      code === "EEXIST"
        ? `${secretFile} exists already; it is never overwritten (a key store may still use it). Choose another file.`
        : `cannot create ${secretFile} (${code ?? (e as Error).message})`,
    );
    return 1;
  }
  if (consoleFile !== undefined) {
    try {
      writeNewPrivateFile(consoleFile, `${JSON.stringify(c.proxyConfigurationFile)}\n`);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      unlinkSync(secretFile); // nothing half-made stays behind
      io.err(
        code === "EEXIST"
          ? `${consoleFile} exists already; it is never overwritten.`
          : `cannot create ${consoleFile} (${code ?? (e as Error).message})`,
      );
      return 1;
    }
  }

  const cmd = kmsCommands({
    accessKeyId: c.accessKeyId,
    secretFile,
    prefix,
    endpoint: v.endpoint!,
    region: v.region!,
    name: v.name!,
    connectivity: connectivity as KmsCommandOptions["connectivity"],
    ...(vpce ? { vpcEndpointServiceName: vpce } : {}),
  });
  io.out(`AccessKeyId: ${c.accessKeyId}`);
  io.out(`Secret:      written to ${secretFile} (mode 0600)`);
  io.out("");
  io.out(
    `The proxy's config: add this to "credentials" of the key store with "uriPathPrefix": ${JSON.stringify(prefix)}, then reload (systemctl reload xks-proxy):`,
  );
  io.out(`  {"accessKeyId":"${c.accessKeyId}","secretAccessKey":{"file":"${secretFile}"}}`);
  io.out("");
  io.out(`KMS, a new custom key store (run where ${secretFile} is readable; the secret is read from the file).`);
  io.out("AWS CLI v2; v1 would fetch the https:// value as a URL unless `aws configure set cli_follow_urlparam false`:");
  io.out(cmd.create);
  io.out("");
  io.out("KMS, an existing custom key store switched to this credential (rotation: only once the proxy accepts it):");
  io.out(cmd.keyStoreId);
  io.out(cmd.update);
  io.out("");
  if (consoleFile !== undefined)
    io.out(`KMS console: its "proxy configuration file" is ${resolve(consoleFile)} (mode 0600; it holds the secret).`);
  else io.out('KMS console: --console-file FILE writes its "proxy configuration file" (it holds the secret).');
  if (v["show-secret"]) {
    io.out("");
    io.out(`SecretAccessKey: ${c.secretAccessKey}`);
    io.out(`KMS console's proxy configuration file: ${JSON.stringify(c.proxyConfigurationFile)}`);
  }
  return 0;
}
