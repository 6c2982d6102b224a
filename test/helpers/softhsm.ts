/**
 * A real SoftHSM v2 token in a fresh temp dir, for tests and the demo.
 * Sets SOFTHSM2_CONF in this process's environment (pkcs11js reads it at
 * C_Initialize) and returns it for child processes too.
 */
import { execFileSync } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

export const SOFTHSM_MODULE_CANDIDATES = [
  "/usr/lib/softhsm/libsofthsm2.so",
  "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
  "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
  "/opt/homebrew/lib/softhsm/libsofthsm2.so",
  "/usr/local/lib/softhsm/libsofthsm2.so",
];

export function findSoftHsmModule(): string {
  const found = SOFTHSM_MODULE_CANDIDATES.find((p) => existsSync(p));
  if (!found) throw new Error(`SoftHSM v2 not found (looked in ${SOFTHSM_MODULE_CANDIDATES.join(", ")}); install softhsm2`);
  return found;
}

export interface SoftHsmToken {
  dir: string;
  conf: string;
  module: string;
  tokenLabel: string;
  pin: string;
  soPin: string;
  env: Record<string, string>;
}

export function createSoftHsmToken(opts: { dir?: string; tokenLabel?: string; pin?: string } = {}): SoftHsmToken {
  const dir = opts.dir ?? mkdtempSync(join(tmpdir(), "xks-softhsm-"));
  const tokens = join(dir, "tokens");
  mkdirSync(tokens, { recursive: true, mode: 0o700 });
  const conf = join(dir, "softhsm2.conf");
  writeFileSync(
    conf,
    [
      `directories.tokendir = ${tokens}`,
      "objectstore.backend = file",
      "log.level = ERROR",
      "slots.removable = false",
      "slots.mechanisms = ALL",
      "library.reset_on_fork = false",
      "",
    ].join("\n"),
  );
  const tokenLabel = opts.tokenLabel ?? "xks-test";
  const pin = opts.pin ?? "1234-test-pin";
  const soPin = "5678-so-pin";
  const env = { SOFTHSM2_CONF: conf };
  execFileSync("softhsm2-util", ["--init-token", "--free", "--label", tokenLabel, "--so-pin", soPin, "--pin", pin], {
    env: { ...process.env, ...env },
    stdio: ["ignore", "ignore", "pipe"],
  });
  process.env.SOFTHSM2_CONF = conf;
  return { dir, conf, module: findSoftHsmModule(), tokenLabel, pin, soPin, env };
}
