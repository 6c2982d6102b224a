/**
 * XKS request bodies, signed with AWS's own signer (@smithy/signature-v4 via
 * test/helpers/sigv4.ts), each with its own kmsRequestId; and the checks every
 * answer must pass: a Decrypt gives back exactly the known plaintext; an
 * Encrypt gives a ciphertext as long as the plaintext, a 12-byte IV and a
 * 16-byte tag (a sample of them is decrypted back afterwards).
 */
import { randomBytes } from "node:crypto";
import { smithySign } from "../../../test/helpers/sigv4.ts";
import type { Answer, HttpClient, OutgoingRequest } from "./http.ts";
import type { Case, Target } from "./protocol.ts";

export interface SignedRequest extends OutgoingRequest {
  case: Case;
}

/** The fields of an Encrypt answer a Decrypt needs. */
export interface Ciphertext {
  ciphertext: string;
  initializationVector: string;
  authenticationTag: string;
  ciphertextMetadata?: string;
}

const RUN_ID = randomBytes(4).toString("hex");
const AAD_B64 = Buffer.from("bench: encryption context of 32 B").toString("base64");
/** How many distinct ciphertexts Decrypt requests cycle through, per size. */
const CIPHERTEXTS_PER_SIZE = 32;

export class XksRequests {
  private readonly plaintexts = new Map<number, Buffer>();
  private readonly ciphertexts = new Map<number, Ciphertext[]>();
  private seq = 0;
  /** Prefix of the kmsRequestIds signed from now on, so a job's requests can be found in the daemons' logs. */
  tag = "prep";

  constructor(private readonly target: Target) {}

  /** The known plaintext of a size (random bytes, fixed for the run). */
  plaintext(size: number): Buffer {
    let p = this.plaintexts.get(size);
    if (!p) this.plaintexts.set(size, (p = randomBytes(size)));
    return p;
  }

  private metadata(op: string) {
    return {
      awsPrincipalArn: "arn:aws:iam::123456789012:user/bench",
      kmsKeyArn: "arn:aws:kms:us-east-1:123456789012:key/bench",
      kmsOperation: op,
      kmsRequestId: `bench-${RUN_ID}-${this.tag}-${++this.seq}`,
      kmsViaService: "ebs",
    };
  }

  encryptBody(size: number): object {
    return {
      requestMetadata: this.metadata("Encrypt"),
      plaintext: this.plaintext(size).toString("base64"),
      additionalAuthenticatedData: AAD_B64,
      encryptionAlgorithm: "AES_GCM",
    };
  }

  decryptBody(c: Ciphertext): object {
    return {
      requestMetadata: this.metadata("Decrypt"),
      ...c,
      additionalAuthenticatedData: AAD_B64,
      encryptionAlgorithm: "AES_GCM",
    };
  }

  async signBody(c: Case, body: object): Promise<SignedRequest> {
    const t = this.target;
    const path = `${t.uriPath}/keys/${t.keyId}/${c.op === "Encrypt" ? "encrypt" : "decrypt"}`;
    const raw = Buffer.from(JSON.stringify(body));
    const headers = await smithySign(t.url, { path, headers: { "content-type": "application/json" }, body: raw }, t);
    headers["content-length"] = String(raw.length); // not signed, as KMS does not sign it either
    return { case: c, path, headers, body: raw };
  }

  /** A fresh signed request of case `c` (Decrypt cycles through the prepared ciphertexts). */
  sign(c: Case): Promise<SignedRequest> {
    if (c.op === "Encrypt") return this.signBody(c, this.encryptBody(c.size));
    const list = this.ciphertexts.get(c.size);
    if (!list) throw new Error(`no ciphertexts prepared for ${c.size} B`);
    return this.signBody(c, this.decryptBody(list[this.seq % list.length]));
  }

  /** Makes the ciphertexts Decrypt requests use, by encrypting through the chain (checked). */
  async prepare(cases: Case[], http: HttpClient): Promise<void> {
    for (const c of cases) {
      if (c.op !== "Decrypt" || this.ciphertexts.has(c.size)) continue;
      const list: Ciphertext[] = [];
      for (let i = 0; i < CIPHERTEXTS_PER_SIZE; i++) {
        const enc: Case = { op: "Encrypt", size: c.size };
        const ans = await http.post(await this.sign(enc));
        const problem = this.check(enc, ans);
        if (problem) throw new Error(`preparing ciphertexts: ${problem}`);
        list.push(encryptAnswer(ans));
      }
      this.ciphertexts.set(c.size, list);
    }
  }

  /** Why an answer is wrong, or undefined when it is right. */
  check(c: Case, ans: Answer): string | undefined {
    if (ans.status !== 200) {
      let name = "";
      try {
        name = String((JSON.parse(ans.body.toString("utf8")) as { errorName?: string }).errorName ?? "");
      } catch {
        /* not JSON */
      }
      return `HTTP ${ans.status} ${name}`.trim();
    }
    let json: Record<string, unknown>;
    try {
      json = JSON.parse(ans.body.toString("utf8")) as Record<string, unknown>;
    } catch {
      return "answer is not JSON";
    }
    const bytes = (field: string) => (typeof json[field] === "string" ? Buffer.from(json[field] as string, "base64") : undefined);
    if (c.op === "Decrypt") {
      const pt = bytes("plaintext");
      if (!pt) return "Decrypt answer without plaintext";
      return pt.equals(this.plaintext(c.size)) ? undefined : "Decrypt answer is not the plaintext";
    }
    const ct = bytes("ciphertext");
    if (!ct || ct.length !== c.size) return `ciphertext is ${ct?.length ?? "missing"} B for ${c.size} B`;
    if (bytes("initializationVector")?.length !== 12) return "IV is not 12 bytes";
    if (bytes("authenticationTag")?.length !== 16) return "tag is not 16 bytes";
    return undefined;
  }

  /** Decrypts Encrypt answers back through the chain; returns how many failed. */
  async decryptBack(size: number, answers: Ciphertext[], http: HttpClient): Promise<number> {
    let failed = 0;
    const c: Case = { op: "Decrypt", size };
    for (const a of answers) {
      const ans = await http.post(await this.signBody(c, this.decryptBody(a)));
      if (this.check(c, ans)) failed++;
    }
    return failed;
  }
}

export function encryptAnswer(ans: Answer): Ciphertext {
  const j = JSON.parse(ans.body.toString("utf8")) as Ciphertext;
  return {
    ciphertext: j.ciphertext,
    initializationVector: j.initializationVector,
    authenticationTag: j.authenticationTag,
    ...(j.ciphertextMetadata ? { ciphertextMetadata: j.ciphertextMetadata } : {}),
  };
}
