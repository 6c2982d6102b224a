/**
 * The error catalogue shared by both daemons.
 *
 * Three tables, one per boundary, each translated exactly once:
 *   - XKS_ERRORS:     XKS errorName -> HTTP status + fixed public message (XKS Proxy API spec §2),
 *                     and METHOD_NOT_ALLOWED, the spec's 405, which has no errorName
 *   - REASONS:        agent failure reason -> gRPC status code (agent side) and XKS errorName (proxy side)
 *   - (agent/hsm/ckr.ts) CK_RV -> agent failure reason
 */
import { status as GrpcStatus } from "@grpc/grpc-js";
import type { ErrorReason } from "./proto.ts";

/** Defined per XKS Proxy API spec §2 ("Error codes"). Messages are fixed, short, printable ASCII. */
export const XKS_ERRORS = {
  ValidationException: { status: 400, message: "One or more input parameters are invalid." },
  InvalidStateException: { status: 400, message: "The external key or key store is disabled or blocked." },
  InvalidCiphertextException: {
    status: 400,
    message: "The ciphertext, initialization vector, additional authenticated data or tag is invalid.",
  },
  InvalidKeyUsageException: { status: 400, message: "The external key does not support the requested operation." },
  AuthenticationFailedException: { status: 401, message: "The request signature could not be verified." },
  AccessDeniedException: { status: 403, message: "The request was denied by the key owner's policy." },
  KeyNotFoundException: { status: 404, message: "The external key was not found." },
  InvalidUriPathException: { status: 404, message: "The URI path is not valid." },
  ThrottlingException: { status: 429, message: "The request rate is too high." },
  InternalException: { status: 500, message: "An internal error occurred." },
  UnsupportedOperationException: { status: 501, message: "The operation or parameter size is not supported." },
  DependencyTimeoutException: { status: 503, message: "The key manager did not answer in time." },
} as const;

export type XksErrorName = keyof typeof XKS_ERRORS;

const METHOD_NOT_ALLOWED_MESSAGE = "Only POST is allowed on this URI.";

/**
 * The answer to any method but POST on an API URI: the spec requires 405
 * Method Not Allowed and defines no errorName for it, so the body carries the
 * fixed message only, and `Allow` names the one method that works.
 */
export const METHOD_NOT_ALLOWED = {
  status: 405,
  message: METHOD_NOT_ALLOWED_MESSAGE,
  /** The wire body: {"errorMessage":…}, no errorName. */
  body: { errorMessage: METHOD_NOT_ALLOWED_MESSAGE },
  headers: { allow: "POST" },
} as const;

/**
 * An error that has a public XKS name. `detail` and `cause` are for logs only;
 * the wire carries the name and the fixed message from XKS_ERRORS.
 */
export class XksError extends Error {
  readonly errorName: XksErrorName;
  constructor(errorName: XksErrorName, detail?: string, options?: { cause?: unknown }) {
    super(detail ?? errorName, options);
    this.name = "XksError";
    this.errorName = errorName;
  }
  get status(): number {
    return XKS_ERRORS[this.errorName].status;
  }
  /** The compact wire body: {"errorName":…,"errorMessage":…}. */
  toJSON(): { errorName: XksErrorName; errorMessage: string } {
    return { errorName: this.errorName, errorMessage: XKS_ERRORS[this.errorName].message };
  }
}

/**
 * Agent failure reasons (proto enum ErrorReason). The agent ends a failed call
 * with `grpc` as the status code and the reason name in trailing metadata
 * `xks-reason`; the proxy maps the reason name to `xks`. The keys are exactly
 * the enum's values other than ERROR_REASON_UNSPECIFIED (checked by the type
 * below and by test/unit/catalogue.test.ts).
 */
export const REASONS = {
  KEY_NOT_FOUND: { grpc: GrpcStatus.NOT_FOUND, xks: "KeyNotFoundException" },
  INVALID_KEY_USAGE: { grpc: GrpcStatus.FAILED_PRECONDITION, xks: "InvalidKeyUsageException" },
  INVALID_CIPHERTEXT: { grpc: GrpcStatus.INVALID_ARGUMENT, xks: "InvalidCiphertextException" },
  INVALID_STATE: { grpc: GrpcStatus.FAILED_PRECONDITION, xks: "InvalidStateException" },
  ACCESS_DENIED: { grpc: GrpcStatus.PERMISSION_DENIED, xks: "AccessDeniedException" },
  THROTTLING: { grpc: GrpcStatus.RESOURCE_EXHAUSTED, xks: "ThrottlingException" },
  INTERNAL: { grpc: GrpcStatus.INTERNAL, xks: "InternalException" },
  VALIDATION: { grpc: GrpcStatus.INVALID_ARGUMENT, xks: "ValidationException" },
  HSM_UNAVAILABLE: { grpc: GrpcStatus.UNAVAILABLE, xks: "DependencyTimeoutException" },
} as const satisfies Record<ErrorReason, { grpc: GrpcStatus; xks: XksErrorName }>;

export type Reason = keyof typeof REASONS;

/** Trailing-metadata key carrying the Reason of a failed agent call. */
export const REASON_METADATA_KEY = "xks-reason";
/** Metadata key carrying the proxy's credential on every agent call. */
export const AGENT_TOKEN_METADATA_KEY = "x-xks-agent-token";

export function isReason(value: unknown): value is Reason {
  return typeof value === "string" && Object.hasOwn(REASONS, value);
}

/** An agent-side failure with a machine-readable reason. `detail` is for logs only. */
export class AgentError extends Error {
  readonly reason: Reason;
  constructor(reason: Reason, detail?: string, options?: { cause?: unknown }) {
    super(detail ?? reason, options);
    this.name = "AgentError";
    this.reason = reason;
  }
}

/** Safe narrowing helpers for unknown throwables (after grpc-js src/error.ts). */
export function errorMessage(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
export function errorCode(err: unknown): unknown {
  return typeof err === "object" && err !== null && "code" in err ? (err as { code: unknown }).code : undefined;
}
