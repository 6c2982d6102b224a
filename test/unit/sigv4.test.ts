/**
 * Unit tests of proxy/sigv4.ts against an independent signer
 * (@smithy/signature-v4, applyChecksum:false) and the AWS SigV4 test suite's
 * get-vanilla vector. Port-level and curl interop are in test/integration/proxy-http.test.ts.
 */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { describe, it } from "node:test";
import { XksError } from "../../shared/errors.ts";
import { canonicalQuery, verifySigV4, type SignedRequest } from "../../proxy/sigv4.ts";
import { CREDS } from "../../testbed/configs.ts";
import { type Creds, smithySign } from "../../testbed/xks/sign.ts";

const BASE = "http://127.0.0.1:8443";
const PATH = "/example/uri/path/prefix/kms/xks/v1/keys/foo/encrypt";
const A: Creds = CREDS.a;
const B: Creds = CREDS.b;
const BODY = JSON.stringify({ requestMetadata: { kmsRequestId: "1", kmsOperation: "Encrypt" }, plaintext: "AAAA" });
const NOW = Date.UTC(2024, 4, 15, 12, 0, 0);

interface Opts {
  creds?: Creds;
  body?: string;
  path?: string;
  headers?: Record<string, string>;
  date?: number;
  region?: string;
  service?: string;
}

/** Signs with smithy; returns the verifier's input plus the signed header map (editable). */
async function signed(o: Opts = {}): Promise<{ req: SignedRequest; headers: Record<string, string> }> {
  const body = o.body ?? BODY;
  const full = o.path ?? PATH;
  const headers = await smithySign(
    BASE,
    { method: "POST", path: full, headers: o.headers ?? { "content-type": "application/json" }, body },
    { ...(o.creds ?? A), date: new Date(o.date ?? NOW), region: o.region, service: o.service },
  );
  const [path, query = ""] = full.split("?");
  return { req: { method: "POST", path, query, rawHeaders: Object.entries(headers).flat(), body: Buffer.from(body) }, headers };
}

function withHeaders(req: SignedRequest, headers: Record<string, string>): SignedRequest {
  return { ...req, rawHeaders: Object.entries(headers).flat() };
}

function verify(req: SignedRequest, creds: Creds[] = [A, B], now = NOW) {
  return verifySigV4(req, { region: "us-east-1", credentials: creds, now });
}

function rejects(req: SignedRequest, detail: RegExp, creds: Creds[] = [A, B], now = NOW): void {
  assert.throws(
    () => verify(req, creds, now),
    (e: unknown) => e instanceof XksError && e.errorName === "AuthenticationFailedException" && e.status === 401 && detail.test(e.message),
  );
}

describe("SigV4 verifier vs smithy", () => {
  it("accepts a smithy signature over content-type;host;x-amz-date (curl's set)", async () => {
    const { req, headers } = await signed();
    assert.match(headers.authorization, /SignedHeaders=content-type;host;x-amz-date,/);
    assert.deepEqual(verify(req), { accessKeyId: A.accessKeyId });
  });

  it("accepts KMS's set host;x-amz-date with an unsigned content-type added afterwards", async () => {
    const { req, headers } = await signed({ headers: {} });
    assert.match(headers.authorization, /SignedHeaders=host;x-amz-date,/);
    assert.deepEqual(verify(withHeaders(req, { ...headers, "content-type": "application/json" })), { accessKeyId: A.accessKeyId });
  });

  it("rotation: both live credentials of the store verify; a credential of another store does not", async () => {
    assert.equal(verify((await signed({ creds: A })).req).accessKeyId, A.accessKeyId);
    assert.equal(verify((await signed({ creds: B })).req).accessKeyId, B.accessKeyId);
    rejects((await signed({ creds: B })).req, /unknown access key id/, [A]);
  });

  it("rejects an unknown access key id", async () => {
    rejects(
      (await signed({ creds: { accessKeyId: "ZZZZZZZZZZZZZZZZZZZZZZZZZZ", secretAccessKey: A.secretAccessKey } })).req,
      /unknown access key id/,
    );
  });

  it("rejects a wrong secret", async () => {
    rejects((await signed({ creds: { accessKeyId: A.accessKeyId, secretAccessKey: B.secretAccessKey } })).req, /signature mismatch/);
  });

  it("rejects a wrong region and a wrong service", async () => {
    rejects((await signed({ region: "eu-west-1" })).req, /wrong region/);
    rejects((await signed({ service: "kms" })).req, /wrong service/);
  });

  it("rejects dates more than 5 minutes in the past or the future, accepts within", async () => {
    rejects((await signed({ date: NOW - 5 * 60_000 - 1000 })).req, /more than 5 minutes/);
    rejects((await signed({ date: NOW + 5 * 60_000 + 1000 })).req, /more than 5 minutes/);
    assert.ok(verify((await signed({ date: NOW - 4 * 60_000 })).req));
    assert.ok(verify((await signed({ date: NOW + 4 * 60_000 })).req));
  });

  it("rejects a body changed after signing", async () => {
    const { req } = await signed();
    rejects({ ...req, body: Buffer.from(BODY.replace("AAAA", "BBBB")) }, /signature mismatch/);
    rejects({ ...req, body: Buffer.concat([req.body, Buffer.from(" ")]) }, /signature mismatch/);
  });

  it("never trusts x-amz-content-sha256: an injected (unsigned) one cannot cover a changed body", async () => {
    const { req, headers } = await signed();
    const hashOfSigned = createHash("sha256").update(BODY).digest("hex");
    const tampered = withHeaders({ ...req, body: Buffer.from('{"other":"body"}') }, { ...headers, "x-amz-content-sha256": hashOfSigned });
    rejects(tampered, /signature mismatch/);
  });

  it("a SIGNED x-amz-content-sha256 must equal the real body hash", async () => {
    const hashOfSigned = createHash("sha256").update(BODY).digest("hex");
    const { req, headers } = await signed({ headers: { "content-type": "application/json", "x-amz-content-sha256": hashOfSigned } });
    assert.match(headers.authorization, /x-amz-content-sha256/);
    assert.ok(verify(req)); // honest: header = real hash
    // smithy took the header as the payload hash; a verifier that did the same would accept this:
    rejects({ ...req, body: Buffer.from('{"other":"body"}') }, /x-amz-content-sha256 differs/);
    const { req: r2 } = await signed({ headers: { "content-type": "application/json", "x-amz-content-sha256": "UNSIGNED-PAYLOAD" } });
    rejects(r2, /x-amz-content-sha256 differs/);
  });

  it("rejects a signed header that is missing from the request, or changed", async () => {
    const { req, headers } = await signed();
    const { "content-type": _ct, ...noCt } = headers;
    rejects(withHeaders(req, noCt), /signed header content-type is missing/);
    rejects(withHeaders(req, { ...headers, "content-type": "text/plain" }), /signature mismatch/);
    rejects(withHeaders(req, { ...headers, host: "127.0.0.1:9999" }), /signature mismatch/);
  });

  it("rejects a header dropped from SignedHeaders, and a set without host or x-amz-date", async () => {
    const { req, headers } = await signed();
    const dropCt = headers.authorization.replace("SignedHeaders=content-type;host;x-amz-date", "SignedHeaders=host;x-amz-date");
    rejects(withHeaders(req, { ...headers, authorization: dropCt }), /signature mismatch/);
    const noHost = headers.authorization.replace("SignedHeaders=content-type;host;x-amz-date", "SignedHeaders=content-type;x-amz-date");
    rejects(withHeaders(req, { ...headers, authorization: noHost }), /must include host and x-amz-date/);
    const noDate = headers.authorization.replace("SignedHeaders=content-type;host;x-amz-date", "SignedHeaders=content-type;host");
    rejects(withHeaders(req, { ...headers, authorization: noDate }), /must include host and x-amz-date/);
    const unsorted = headers.authorization.replace(
      "SignedHeaders=content-type;host;x-amz-date",
      "SignedHeaders=host;content-type;x-amz-date",
    );
    rejects(withHeaders(req, { ...headers, authorization: unsorted }), /sorted/);
  });

  it("rejects a missing or repeated Authorization, and malformed ones", async () => {
    const { req, headers } = await signed();
    const { authorization, ...rest } = headers;
    rejects(withHeaders(req, rest), /missing Authorization/);
    rejects({ ...req, rawHeaders: [...req.rawHeaders, "Authorization", authorization] }, /more than one Authorization/);
    rejects(
      withHeaders(req, { ...rest, authorization: authorization.replace("AWS4-HMAC-SHA256", "AWS4-HMAC-SHA512") }),
      /unsupported algorithm/,
    );
    rejects(
      withHeaders(req, { ...rest, authorization: authorization.replace(/Signature=[0-9a-f]+/, "Signature=xyz") }),
      /malformed signature/,
    );
    rejects(withHeaders(req, { ...rest, authorization: `${authorization}, Extra=1` }), /exactly Credential, SignedHeaders and Signature/);
    rejects(
      withHeaders(req, { ...rest, authorization: authorization.replace("/aws4_request", "/aws4_request/x") }),
      /malformed credential scope/,
    );
  });

  it("checks the scope date against X-Amz-Date and the terminator", async () => {
    const { req, headers } = await signed();
    rejects(
      withHeaders(req, { ...headers, authorization: headers.authorization.replace("/20240515/", "/20240514/") }),
      /scope date differs/,
    );
    rejects(withHeaders(req, { ...headers, authorization: headers.authorization.replace("/aws4_request", "/aws5_request") }), /terminator/);
    const { "x-amz-date": _d, ...noDate } = headers;
    rejects(withHeaders(req, noDate), /X-Amz-Date header missing/);
    rejects(withHeaders(req, { ...headers, "x-amz-date": "20240515T126000Z" }), /invalid X-Amz-Date/);
  });

  it("verifies against the path as sent and canonicalizes the query string", async () => {
    const { req } = await signed({ path: `${PATH}?b=2&a=1&c=x%2Fy` });
    assert.equal(req.query, "b=2&a=1&c=x%2Fy");
    assert.ok(verify(req));
    rejects({ ...req, query: "" }, /signature mismatch/);
    rejects({ ...req, path: PATH.replace("foo", "bar") }, /signature mismatch/);
    assert.equal(canonicalQuery(""), "");
    assert.equal(canonicalQuery("b=2&a=1&a=0&x=a b"), "a=0&a=1&b=2&x=a%20b");
    assert.equal(canonicalQuery("k=!*'()"), "k=%21%2A%27%28%29");
  });

  it("matches the AWS SigV4 test suite vector get-vanilla", () => {
    const auth =
      "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders=host;x-amz-date, " +
      "Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31";
    const res = verifySigV4(
      {
        method: "GET",
        path: "/",
        query: "",
        body: Buffer.alloc(0),
        rawHeaders: ["Host", "example.amazonaws.com", "X-Amz-Date", "20150830T123600Z", "Authorization", auth],
      },
      {
        region: "us-east-1",
        service: "service",
        credentials: [{ accessKeyId: "AKIDEXAMPLE", secretAccessKey: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY" }],
        now: Date.UTC(2015, 7, 30, 12, 36, 0),
      },
    );
    assert.equal(res.accessKeyId, "AKIDEXAMPLE");
  });
});
