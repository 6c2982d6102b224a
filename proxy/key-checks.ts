/**
 * The key check values (KCVs) the agents report in their health answers,
 * compared per key id. Agents behind one proxy must hold clones of one token:
 * then every agent reports the same value for a key. Two agents that report
 * different values for the same key id hold different keys under that label
 * (or the same key with different usage), and an answer would depend on which
 * agent a request reaches: a Decrypt that lands on the other agent fails as if
 * the ciphertext were corrupt. Such a key is not routed to any agent until the
 * values agree again:
 *
 *   - every GetKeyMetadata, Encrypt and Decrypt for it is answered 400
 *     InvalidStateException ("the external key is disabled or blocked"), which
 *     the spec allows for every operation. KMS turns it into
 *     XksKeyInvalidConfigurationException on CreateKey and
 *     KMSInvalidStateException on crypto operations: a state the key owner
 *     must fix, not a transient failure (503 DependencyTimeoutException or 429
 *     would have callers retry into an answer that cannot change by waiting,
 *     and 500 InternalException says the proxy itself is broken);
 *   - the agents involved are reported DEGRADED (they still serve their other
 *     keys), with the key named in the reason;
 *   - one error line per change names the key id and the agents, grouped by
 *     equal value; the values themselves never leave the proxy (a 3-byte KCV
 *     reveals nothing useful, but it has no business in KMS's answers or logs).
 *
 * A key that only one agent reports, or whose value an agent cannot make
 * (empty check value), is routed as before. An agent's last reported values
 * count until it reports again, also while it is down.
 */
import type { Logger } from "../shared/logging.ts";
import type { KeyCheck } from "../shared/proto.ts";

/** A key whose agents disagree: the agents grouped by equal check value (each group sorted, groups by first agent). */
export interface KeyMismatch {
  keyId: string;
  groups: string[][];
}

function sameValues(a: ReadonlyMap<string, string>, b: ReadonlyMap<string, string>): boolean {
  if (a.size !== b.size) return false;
  for (const [k, v] of a) if (b.get(k) !== v) return false;
  return true;
}

function describeGroups(groups: string[][]): string {
  return groups.map((g) => `[${g.join(", ")}]`).join(" vs ");
}

export class KeyCheckBook {
  /** agent id → key id → check value (non-empty values only). */
  private readonly byAgent = new Map<string, ReadonlyMap<string, string>>();
  private readonly mismatches = new Map<string, KeyMismatch>();

  constructor(private readonly log: Logger) {}

  /** Takes an agent's latest check values; logs each key whose agreement changed. */
  report(agent: string, checks: readonly KeyCheck[]): void {
    const next = new Map<string, string>();
    for (const c of checks) if (c.checkValue) next.set(c.keyId, c.checkValue);
    const before = this.byAgent.get(agent);
    if (before && sameValues(before, next)) return;
    this.byAgent.set(agent, next);
    for (const keyId of new Set([...(before?.keys() ?? []), ...next.keys()])) this.recompute(keyId);
  }

  private recompute(keyId: string): void {
    const byValue = new Map<string, string[]>();
    for (const [agent, values] of this.byAgent) {
      const v = values.get(keyId);
      if (v === undefined) continue;
      const group = byValue.get(v);
      if (group) group.push(agent);
      else byValue.set(v, [agent]);
    }
    const before = this.mismatches.get(keyId);
    if (byValue.size > 1) {
      const groups = [...byValue.values()].map((g) => g.sort()).sort((a, b) => a[0].localeCompare(b[0]));
      if (before && describeGroups(before.groups) === describeGroups(groups)) return;
      this.mismatches.set(keyId, { keyId, groups });
      this.log.error(
        { keyId, agentGroups: groups },
        `key check values of key ${keyId} differ between agents ${describeGroups(groups)}: the agents hold different keys under this label ` +
          "(or the same key with different usage); the key is refused (InvalidStateException) until they agree. " +
          "Agents behind one proxy must hold clones of one token (xks-agent token backup / restore).",
      );
    } else if (before) {
      this.mismatches.delete(keyId);
      this.log.warn(
        { keyId, agents: [...byValue.values()].flat().sort() },
        `key check values of key ${keyId} agree again: the key is routed again`,
      );
    }
  }

  /** Why `keyId` must not be routed to any agent now (for logs; no check value in it), or undefined. */
  refusal(keyId: string): string | undefined {
    const m = this.mismatches.get(keyId);
    return m && `key ${keyId} is not routed: its key check values differ between agents ${describeGroups(m.groups)}`;
  }

  /** Takes another book's mismatches as they are (a proxy worker, from its primary's refresher); logs nothing. */
  adopt(mismatches: readonly KeyMismatch[]): void {
    this.mismatches.clear();
    for (const m of mismatches) this.mismatches.set(m.keyId, { keyId: m.keyId, groups: m.groups.map((g) => [...g]) });
  }

  /** Every key whose agents disagree now, by key id. */
  list(): KeyMismatch[] {
    return [...this.mismatches.values()].sort((a, b) => a.keyId.localeCompare(b.keyId));
  }

  /** Why `agent` is DEGRADED: the keys it holds that another agent holds differently; undefined when none. */
  problemOf(agent: string): string | undefined {
    const keys = this.list().filter((m) => m.groups.some((g) => g.includes(agent)));
    if (keys.length === 0) return undefined;
    return `key check values differ from other agents for ${keys.map((m) => `${m.keyId} (${describeGroups(m.groups)})`).join(", ")}: not routed`;
  }

  /** How many keys more than one agent reports, all agreeing (for `xks-proxy check`). */
  agreeing(): number {
    const holders = new Map<string, number>();
    for (const values of this.byAgent.values()) for (const k of values.keys()) holders.set(k, (holders.get(k) ?? 0) + 1);
    return [...holders].filter(([k, n]) => n > 1 && !this.mismatches.has(k)).length;
  }
}
