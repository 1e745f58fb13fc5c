/**
 * The tutorial's approval workflow with @durin/sdk: it keeps its state where queries read
 * it (`is_cancelled`, `status`), then waits for a `cancel` signal raced against the
 * request's deadline, a durable timer. While it waits it holds nothing: the attempt
 * suspends, and Durin calls again when the signal or the deadline comes. Cancelled
 * (`POST /v1/workflows/approval/{id}/cancel`), the wait throws `Cancelled`: it records
 * that and ends cancelled.
 *
 *     npm run build
 *     node dist/examples/approval.js --port 9091 --durin http://127.0.0.1:8080
 *     curl -X POST $ADMIN/v1/deployments -H 'content-type: application/json' \
 *       -d '{"url": "http://127.0.0.1:9091", "services": [{"name": "approval", "handlers": [{"name": "run"}]}]}'
 *     curl -X POST $GW/v1/workflows/approval/req-1 -d '{"request": "req-1", "deadline": "1h"}'
 *     curl $GW/v1/workflows/approval/req-1/queries/status
 *     curl -X POST $GW/v1/workflows/approval/req-1/signals/cancel -d '"changed my mind"'
 */
import { parseArgs } from "node:util";
import { Cancelled, Endpoint, TerminalError } from "../src";

const { values: args } = parseArgs({
  options: {
    port: { type: "string", default: "9091" },
    durin: { type: "string", default: "http://127.0.0.1:8080" },
    egress: { type: "string" },
    "verify-key": { type: "string" },
  },
});

const app = new Endpoint({ durinUrl: args.durin!, egressUrl: args.egress, verifyKey: args["verify-key"] });

app.workflow("approval", async (ctx, input: { request: string; deadline: string }) => {
  if (typeof input?.request !== "string" || typeof input?.deadline !== "string") {
    throw new TerminalError(422, "request and deadline are required");
  }
  await ctx.setState("is_cancelled", false);
  await ctx.setState("status", "waiting for the deadline");
  let reason: unknown;
  try {
    reason = await ctx.signal("cancel", { timeout: input.deadline });
  } catch (error) {
    if (error instanceof Cancelled) {
      await ctx.setState("is_cancelled", true);
      await ctx.setState("status", "cancelled by an operator");
    }
    throw error; // uncaught Cancelled: the endpoint answers 409, the run ends cancelled
  }
  if (reason !== undefined) {
    // The cancel signal came before the deadline.
    await ctx.setState("is_cancelled", true);
    await ctx.setState("status", "cancelled");
    return `request ${input.request} cancelled: ${JSON.stringify(reason)}`;
  }
  await ctx.setState("status", "approved");
  return `request ${input.request} approved`;
});

app.listen(Number(args.port), "127.0.0.1").then((server) => {
  const address = server.address() as { port: number };
  console.log(`approval handler listening on http://127.0.0.1:${address.port}`);
});
