/**
 * XKS request bodies (the test-bed's builders), signed with AWS's own signer
 * (@smithy/signature-v4), each with its own kmsRequestId; every answer is
 * judged by the test-bed's oracle: a Decrypt gives back exactly the known
 * plaintext; an Encrypt gives a ciphertext as long as the plaintext, a 12- or
 * 16-byte IV and a 16-byte tag (a sample of them is decrypted back afterwards).
 */
import { randomBytes } from "node:crypto";
import { decryptBody, type EncryptAnswer, encryptBody } from "../../../testbed/xks/bodies.ts";
import { decryptProblem, encryptProblem } from "../../../testbed/xks/oracle.ts";
import { smithySign } from "../../../testbed/xks/sign.ts";
import type { Answer, HttpClient, OutgoingRequest } from "./http.ts";
import type { Case, Target } from "./protocol.ts";

export interface SignedRequest extends OutgoingRequest {
  case: Case;
}

/** The fields of an Encrypt answer a Decrypt needs. */
export type Ciphertext = EncryptAnswer;

const RUN_ID = randomBytes(4).toString("hex");
const AAD = Buffer.from("bench: encryption context of 32 B");
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
    if (!p) {
      p = randomBytes(size);
      this.plaintexts.set(size, p);
    }
    return p;
  }

  /** The bench's principal and key ARN, and a kmsRequestId that carries the job's tag. */
  private metadata() {
    return {
      awsPrincipalArn: "arn:aws:iam::123456789012:user/bench",
      kmsKeyArn: "arn:aws:kms:us-east-1:123456789012:key/bench",
      kmsRequestId: `bench-${RUN_ID}-${this.tag}-${++this.seq}`,
    };
  }

  encryptBody(size: number): object {
    return encryptBody(this.plaintext(size), { aad: AAD, metadata: this.metadata() });
  }

  decryptBody(c: Ciphertext): object {
    return decryptBody(c, { aad: AAD, metadata: this.metadata() });
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

  /** Why an answer is wrong, or undefined when it is right (the test-bed's oracle). */
  check(c: Case, ans: Answer): string | undefined {
    const a = { status: ans.status, text: ans.body.toString("utf8") };
    return c.op === "Decrypt" ? decryptProblem(a, this.plaintext(c.size)) : encryptProblem(a, { plaintext: c.size, aad: AAD });
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
