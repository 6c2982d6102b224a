/**
 * Channel identities for tests, the demo and the bench: one agent identity and
 * one proxy identity per process (made once; a P-256 key takes a millisecond),
 * which every config the test-bed writes pins by default, and files holding
 * them as an operator would have them (key 0600, certificate public).
 */
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { generateIdentity, type OwnIdentity, type PinnedIdentity, parsePinned } from "../shared/identity.ts";

export type Identity = OwnIdentity & { fingerprint: string };

export const TEST_IDENTITIES: { agent: Identity; proxy: Identity } = {
  agent: generateIdentity("xks-agent test"),
  proxy: generateIdentity("xks-proxy test"),
};

/** A fresh identity, e.g. the next one in a rotation or a rogue's. */
export function newIdentity(cn = "xks test"): Identity {
  return generateIdentity(cn);
}

/** As a peer pins it. */
export function pinOf(id: OwnIdentity): PinnedIdentity {
  return parsePinned(id.certificate);
}

/** Writes `dir/<name>.key` (0600) and `dir/<name>.crt`; returns the config's `identity` value. */
export function writeIdentity(dir: string, name: string, id: OwnIdentity): { key: { file: string }; certificate: string } {
  writeFileSync(join(dir, `${name}.key`), id.key, { mode: 0o600 });
  writeFileSync(join(dir, `${name}.crt`), id.certificate);
  return { key: { file: `${name}.key` }, certificate: `${name}.crt` };
}

/** Writes each certificate to `dir/<name>-<i>.crt`; returns the config's list of pinned certificate files. */
export function writePins(dir: string, name: string, ids: readonly OwnIdentity[]): string[] {
  return ids.map((id, i) => {
    writeFileSync(join(dir, `${name}-${i}.crt`), id.certificate);
    return `${name}-${i}.crt`;
  });
}
