/**
 * The tutorial's order as a durable handler with @durin/sdk: three calls through Durin's
 * egress (charge, reserve, email), each sent once whatever crashes; a cancelled order is
 * compensated (release, then refund). Also `order3`: the same shape with three
 * `ctx.step`s and no egress (a benchmark of the context API).
 *
 *     npm run build
 *     node dist/examples/order.js --port 9080 --durin http://127.0.0.1:8080 --egress http://127.0.0.1:8081 \
 *       --payment http://127.0.0.1:9101 --inventory http://127.0.0.1:9102 --email http://127.0.0.1:9103
 *
 * Register it: POST {admin}/v1/deployments {"url": "http://127.0.0.1:9080", "services":
 * [{"name": "order", "handlers": [{"name": "process"}, {"name": "order3"}]}]}
 */
import { randomUUID } from "node:crypto";
import { parseArgs } from "node:util";
import { Cancelled, Context, Endpoint, TerminalError } from "../src";

const { values: args } = parseArgs({
  options: {
    port: { type: "string", default: "9080" },
    durin: { type: "string", default: "http://127.0.0.1:8080" },
    egress: { type: "string", default: "http://127.0.0.1:8081" },
    payment: { type: "string", default: "http://127.0.0.1:9101" },
    inventory: { type: "string", default: "http://127.0.0.1:9102" },
    email: { type: "string", default: "http://127.0.0.1:9103" },
    "verify-key": { type: "string" },
  },
});

interface Order {
  order_id: string;
  customer_id: string;
  amount_cents: number;
}

function validate(order: any): Order {
  if (!order || typeof order.order_id !== "string" || typeof order.customer_id !== "string" || !Number.isInteger(order.amount_cents)) {
    throw new TerminalError(422, "order_id, customer_id and amount_cents are required"); // 4xx: not retried
  }
  return order;
}

/** POSTs `body` to `url` through the egress; a downstream 4xx is final, anything else is retried. */
async function post(ctx: Context, url: string, body: unknown): Promise<any> {
  const response = await ctx.fetch(url, { method: "POST", json: body });
  if (response.ok) return response.json();
  if (response.status >= 400 && response.status < 500) throw new TerminalError(422, `${url} refused: ${response.text()}`);
  throw new Error(`${url} answered ${response.status}`); // 503: Durin tries the attempt again
}

const app = new Endpoint({ durinUrl: args.durin!, egressUrl: args.egress, verifyKey: args["verify-key"] });

app.handler("order", "process", async (ctx, input) => {
  const order = validate(input);
  if (ctx.cancelled) {
    // Someone cancelled the order: undo what may have happened, newest first. Each undo is
    // journaled too and harmless when there is nothing to undo; then end cancelled (409).
    await post(ctx, `${args.inventory}/release`, { order_id: order.order_id });
    await post(ctx, `${args.payment}/refund`, { order_id: order.order_id, amount_cents: order.amount_cents });
    throw new Cancelled(`order ${order.order_id} was cancelled and compensated`);
  }
  const charge = await post(ctx, `${args.payment}/charge`, { order_id: order.order_id, amount_cents: order.amount_cents });
  const reservation = await post(ctx, `${args.inventory}/reserve`, { order_id: order.order_id });
  await post(ctx, `${args.email}/send`, { order_id: order.order_id, customer_id: order.customer_id });
  return `order ${order.order_id} complete charge ${charge.charge_id} reservation ${reservation.reservation_id}`;
});

app.handler("order", "order3", async (ctx, input) => {
  const order = validate(input);
  const charge = await ctx.step("charge", () => ({ charge_id: `ch_${randomUUID()}` }));
  const reservation = await ctx.step("reserve", () => ({ reservation_id: `rs_${randomUUID()}` }));
  await ctx.step("email", () => ({ sent_to: order.customer_id }));
  return `order ${order.order_id} complete charge ${charge.charge_id} reservation ${reservation.reservation_id}`;
});

app.listen(Number(args.port), "127.0.0.1").then((server) => {
  const address = server.address() as { port: number };
  console.log(`order handler listening on http://127.0.0.1:${address.port}`);
});
