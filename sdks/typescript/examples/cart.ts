/**
 * A shopping cart as a workflow with @durin/sdk, to show updates: a caller adds an item
 * with an update and gets the cart back (or the validator's 422), the cart is state that
 * queries read, and the run ends at the `checkout` signal or after a while with no update
 * (a durable timer, new at each wait). While it waits it holds nothing.
 *
 *     npm run build
 *     node dist/examples/cart.js --port 9092 --durin http://127.0.0.1:8080
 *     curl -X POST $ADMIN/v1/deployments -H 'content-type: application/json' \
 *       -d '{"url": "http://127.0.0.1:9092", "services": [{"name": "cart", "handlers": [{"name": "run"}]}]}'
 *     curl -X POST $GW/v1/workflows/cart/ann -d '{"idle": "1h"}'
 *     curl -X POST $GW/v1/workflows/cart/ann/updates/add -H 'Idempotency-Key: add-1' -d '{"item": "tea", "quantity": 2}'
 *     curl -X POST $GW/v1/workflows/cart/ann/updates/add -d '{"item": "tea", "quantity": 0}'     # 422
 *     curl $GW/v1/workflows/cart/ann/queries/cart
 *     curl -X POST $GW/v1/workflows/cart/ann/signals/checkout -d '{}'
 */
import { parseArgs } from "node:util";
import { Endpoint, Member, Update } from "../src";

const { values: args } = parseArgs({
  options: {
    port: { type: "string", default: "9092" },
    durin: { type: "string", default: "http://127.0.0.1:8080" },
    "verify-key": { type: "string" },
  },
});

const app = new Endpoint({ durinUrl: args.durin!, verifyKey: args["verify-key"] });

type Item = { item: string; quantity: number };

app.workflow("cart", async (ctx, input: { idle?: string } | null) => {
  const cart: Record<string, number> = {};
  await ctx.setState("status", "open");
  // Each wait has its own key (an update wait, like a signal wait, takes one update) and its own timer.
  for (let n = 1; ; n++) {
    const won = await ctx.first([
      Member.update("add", { key: `add-${n}` }),
      Member.signal("checkout"),
      Member.sleep(`idle-${n}`, input?.idle ?? "1h"),
    ]);
    if (won.kind !== "update") {
      const status = won.kind === "signal" ? "checked out" : "abandoned";
      await ctx.setState("status", status);
      return { status, cart };
    }
    const add = won.update as Update<Item>;
    // Validate: a refused update is not journaled; its caller gets the 4xx.
    const { item, quantity } = (add.input ?? {}) as Partial<Item>;
    if (typeof item !== "string" || !item || !Number.isInteger(quantity) || quantity! <= 0) {
      await add.refuse(422, "add takes {item, quantity}, quantity a positive integer");
      continue;
    }
    // Run it (state, steps, calls are journaled as usual) and answer: the caller gets the cart.
    cart[item] = (cart[item] ?? 0) + quantity!;
    await ctx.setState("cart", cart);
    await add.answer(cart);
  }
});

app.listen(Number(args.port), "127.0.0.1").then((server) => {
  const address = server.address() as { port: number };
  console.log(`cart handler listening on http://127.0.0.1:${address.port}`);
});
