/**
 * The error catalogue (shared/errors.ts) against its two sources of truth:
 * the .proto's ErrorReason enum and the XKS Proxy API spec's error list (§2),
 * copied out literally below.
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import { METHOD_NOT_ALLOWED, REASONS, XKS_ERRORS } from "../../shared/errors.ts";
import { LOADER_OPTIONS, PROTO_FILE, PROTO_ROOT } from "../../shared/proto.ts";

/** The XKS Proxy API spec's error codes (§2), written out by hand: errorName → HTTP status. */
const SPEC_ERRORS: Record<string, number> = {
  ValidationException: 400,
  InvalidStateException: 400,
  InvalidCiphertextException: 400,
  InvalidKeyUsageException: 400,
  AuthenticationFailedException: 401,
  AccessDeniedException: 403,
  KeyNotFoundException: 404,
  InvalidUriPathException: 404,
  ThrottlingException: 429,
  InternalException: 500,
  UnsupportedOperationException: 501,
  DependencyTimeoutException: 503,
};
/** The spec's answer to a non-POST method on an API URI: 405, with no errorName. */
const SPEC_METHOD_NOT_ALLOWED_STATUS = 405;

const PRINTABLE_UNDER_512 = /^[\x20-\x7e]{1,511}$/;

/** The ErrorReason values as the .proto declares them, in order. */
function protoErrorReasons(): string[] {
  const def = protoLoader.loadSync(PROTO_FILE, { includeDirs: [PROTO_ROOT], ...LOADER_OPTIONS })["xks.agent.v1.ErrorReason"];
  assert.equal(def?.format, "Protocol Buffer 3 EnumDescriptorProto");
  return (def.type as { value: Array<{ name: string; number: number }> }).value.map((v) => v.name);
}

describe("error catalogue", () => {
  it("REASONS has exactly one row per proto ErrorReason (ERROR_REASON_UNSPECIFIED excepted)", () => {
    const fromProto = protoErrorReasons();
    assert.equal(fromProto[0], "ERROR_REASON_UNSPECIFIED");
    assert.deepEqual(Object.keys(REASONS).sort(), fromProto.slice(1).sort());
  });

  it("the .proto's comment on each ErrorReason names the status and XKS error REASONS maps it to", () => {
    const text = readFileSync(join(PROTO_ROOT, PROTO_FILE), "utf8");
    const body = /enum ErrorReason \{([^}]*)\}/.exec(text)?.[1];
    assert.ok(body, "enum ErrorReason not found in the .proto");
    const comments = new Map(
      [...body.matchAll(/^\s*([A-Z_]+) = \d+;\s*\/\/ -> (\d{3}) ([A-Za-z]+)/gm)].map((m) => [m[1], { status: Number(m[2]), xks: m[3] }]),
    );
    for (const [reason, row] of Object.entries(REASONS)) {
      assert.deepEqual(comments.get(reason), { status: XKS_ERRORS[row.xks].status, xks: row.xks }, reason);
    }
  });

  it("XKS_ERRORS is the spec's error list: the same names with the same statuses", () => {
    const ours = Object.fromEntries(Object.entries(XKS_ERRORS).map(([name, e]) => [name, e.status]));
    assert.deepEqual(ours, SPEC_ERRORS);
  });

  it("the non-POST answer is its own entry: 405, Allow: POST, a body with the fixed message and no errorName", () => {
    for (const [name, e] of Object.entries(XKS_ERRORS)) assert.notEqual(e.status, SPEC_METHOD_NOT_ALLOWED_STATUS, name);
    assert.equal(METHOD_NOT_ALLOWED.status, SPEC_METHOD_NOT_ALLOWED_STATUS);
    assert.deepEqual(METHOD_NOT_ALLOWED.headers, { allow: "POST" });
    assert.deepEqual(METHOD_NOT_ALLOWED.body, { errorMessage: METHOD_NOT_ALLOWED.message });
  });

  it("every REASONS row maps to a real gRPC status (not OK) and an XKS errorName", () => {
    for (const [reason, row] of Object.entries(REASONS)) {
      assert.equal(typeof grpc.status[row.grpc], "string", `${reason}: ${row.grpc} is not a gRPC status`);
      assert.notEqual(row.grpc, grpc.status.OK, reason);
      assert.ok(Object.hasOwn(SPEC_ERRORS, row.xks), `${reason}: ${row.xks} is not an XKS errorName`);
    }
  });

  it("every fixed message is printable ASCII, under 512 characters", () => {
    for (const [name, e] of Object.entries(XKS_ERRORS)) assert.match(e.message, PRINTABLE_UNDER_512, name);
    assert.match(METHOD_NOT_ALLOWED.message, PRINTABLE_UNDER_512);
  });
});
