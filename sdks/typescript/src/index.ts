/**
 * @durin/sdk: durable handlers for Durin's plain HTTP contract (openapi/plain-http.md),
 * with no runtime dependencies.
 *
 *     const app = new Endpoint({ durinUrl: "http://127.0.0.1:8080", egressUrl: "http://127.0.0.1:8081" });
 *     app.handler("greeter", "greet", async (ctx, input) => {
 *       const id = await ctx.step("id", () => crypto.randomUUID());
 *       return `hello ${input.name} (${id})`;
 *     });
 *     await app.listen(9080);
 */
export { Endpoint, verifyV3 } from "./endpoint";
export type { EndpointOptions, Handler, HandlerOptions } from "./endpoint";
export { Context, Member, Update } from "./context";
export type { Awakeable, CallOptions, Duration, EgressResponse, FetchInit, FirstMember, FirstResult, SleepResult, UpdateAnswer } from "./context";
export { Cancelled, ContinuedAsNew, DurinError, Failure, Suspended, TerminalError, isTerminal } from "./errors";
export type { FailureInfo } from "./errors";
