/**
 * The errors a handler sees, and the ones the endpoint turns into answers to Durin.
 *
 * | thrown out of a handler | the endpoint answers                      | the invocation      |
 * |-------------------------|-------------------------------------------|---------------------|
 * | {@link TerminalError}   | its 4xx, with a problem+json body         | fails, not retried  |
 * | {@link Failure}         | its 4xx (422 unless the failure's is one) | fails, not retried  |
 * | {@link Cancelled}       | 409                                       | ends cancelled      |
 * | {@link Suspended}       | 202 + `Durin-Suspended: true`             | waits, then resumes |
 * | anything else           | 503, with a problem+json body             | retried             |
 */

/** A failure that retrying cannot fix: the endpoint answers `status` (a 4xx) and Durin does not retry. */
export class TerminalError extends Error {
  readonly status: number;
  /** `status` must be a 4xx other than 408 and 429 (those are retried); anything else becomes 422. */
  constructor(status: number, message: string) {
    super(message);
    this.name = "TerminalError";
    this.status = isTerminal(status) ? status : 422;
  }
}

/** True for the statuses Durin takes as a terminal failure of the handler. */
export function isTerminal(status: number): boolean {
  return status >= 400 && status < 500 && status !== 408 && status !== 429;
}

/** What Durin records for a failed child call or a rejected awakeable. */
export interface FailureInfo {
  status?: number;
  type?: string;
  message?: string;
  [more: string]: unknown;
}

/**
 * A recorded failure: a child call that failed (`ctx.call`) or an awakeable that was
 * rejected (`ctx.waitAwakeable`). It is in the journal, so every attempt sees it again:
 * uncaught, it fails the invocation (it is a {@link TerminalError}).
 */
export class Failure extends TerminalError {
  readonly failure: FailureInfo;
  constructor(what: string, failure: FailureInfo) {
    super(typeof failure.status === "number" ? failure.status : 422, `${what}: ${failure.message ?? failure.type ?? "failed"}`);
    this.name = "Failure";
    this.failure = failure;
  }
}

/**
 * The invocation was cancelled (`POST /v1/invocations/{id}/cancel`) before what a wait waits
 * for arrived. Catch it to compensate (steps, state and egress calls still work), then
 * rethrow it or return: uncaught, the endpoint answers 409 and the invocation ends cancelled.
 */
export class Cancelled extends Error {
  constructor(what = "the invocation was cancelled") {
    super(what);
    this.name = "Cancelled";
  }
}

/**
 * A wait has no result yet: Durin suspended this attempt and calls the handler again when
 * the result has arrived. The handler must stop; the endpoint answers 202 with
 * `Durin-Suspended: true`. Do not swallow it: the context remembers the suspension anyway
 * (every later call throws it again and the endpoint answers "suspended" whatever the
 * handler returns).
 */
export class Suspended extends Error {
  constructor(what: string) {
    super(`suspended at ${what}`);
    this.name = "Suspended";
  }
}

/**
 * Durin refused a call of this attempt (the attempt is stale or over, a bad request, the
 * database failed, the egress refused a target...). Uncaught it answers 503: Durin tries
 * the attempt again if the invocation is still running.
 */
export class DurinError extends Error {
  readonly status: number;
  readonly problem: unknown;
  constructor(what: string, status: number, problem: unknown) {
    const detail = problem && typeof problem === "object" ? (problem as any).detail ?? (problem as any).title : problem;
    super(`${what}: Durin answered ${status}${detail ? `: ${detail}` : ""}`);
    this.name = "DurinError";
    this.status = status;
    this.problem = problem;
  }
}

/** Thrown by `ctx.continueAsNew`: this run is over; the endpoint answers 200 `{"continued_as"}`. */
export class ContinuedAsNew extends Error {
  readonly continuedAs: string;
  constructor(continuedAs: string) {
    super(`continued as ${continuedAs}`);
    this.name = "ContinuedAsNew";
    this.continuedAs = continuedAs;
  }
}
