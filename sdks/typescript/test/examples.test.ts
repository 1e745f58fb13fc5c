/**
 * The examples, run as their own processes (`node dist/examples/x.js`), against a real
 * Durin: a handler killed with SIGKILL mid-flow and restarted sends nothing twice; a
 * cancelled order is compensated; the approval workflow's signal, deadline and cancel; the
 * cart's updates (answered, refused, retried), raced with a signal and a timer.
 */
import { describe, it, before, after } from "node:test";
import * as assert from "node:assert/strict";
import { spawn, ChildProcess } from "node:child_process";
import * as path from "node:path";
import { Downstream, Durin, FAST_RETRY, readLines, register, request, start, startDurin, waitEnd, waitUntil } from "./harness";

const EXAMPLES = path.resolve(__dirname, "../examples");

/** Runs an example on `port` (0: any) and answers it with its URL once it listens. */
async function runExample(name: string, port: number, extra: string[]): Promise<{ child: ChildProcess; url: string; kill: () => Promise<void> }> {
  const child = spawn(process.execPath, [path.join(EXAMPLES, `${name}.js`), "--port", String(port), ...extra], { stdio: ["ignore", "pipe", "pipe"] });
  let stderr = "";
  child.stderr!.on("data", (d) => (stderr += d));
  const kill = async () => {
    if (child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise((r) => child.once("exit", r));
    child.kill("SIGKILL");
    await exited;
  };
  try {
    const { url } = await readLines(child, 10_000, { url: /listening on (http:\/\/127\.0\.0\.1:\d+)/ }, () => stderr);
    return { child, url, kill };
  } catch (error) {
    await kill();
    throw error;
  }
}

let durin: Durin;
let downstream: Downstream;
const running: { kill: () => Promise<void> }[] = [];

before(async () => {
  durin = await startDurin();
  downstream = await Downstream.start();
});

after(async () => {
  for (const r of running) await r.kill();
  await downstream?.close();
  await durin?.stop();
});

describe("order example", () => {
  let url = "";
  let args: string[] = [];
  let current: { url: string; kill: () => Promise<void> };

  before(async () => {
    args = ["--durin", durin.gw, "--egress", durin.egress, "--payment", downstream.url, "--inventory", downstream.url, "--email", downstream.url];
    current = await runExample("order", 0, args);
    running.push(current);
    url = current.url;
    await register(durin, url, [{ name: "order", handlers: [{ name: "process", retry_policy: FAST_RETRY }, { name: "order3", retry_policy: FAST_RETRY }] }]);
  });

  it("killed with SIGKILL between two egress calls, completes after a restart without sending anything twice", async () => {
    const order = { order_id: "o-1", customer_id: "c-1", amount_cents: 1299 };
    const held = downstream.hold("/reserve");
    const id = await start(durin, "order", "process", order);
    await held.arrived; // the charge is journaled; the reservation is out
    await current.kill();
    held.release();
    current = await runExample("order", Number(new URL(url).port), args);
    running.push(current);
    const inv = await waitEnd(durin, id);
    assert.equal(inv.status, "completed", JSON.stringify(inv));
    assert.equal(inv.output, "order o-1 complete charge ch_1 reservation rs_1");
    assert.equal(downstream.count("/charge"), 1, "the charge is answered from the journal, never sent again");
    assert.equal(downstream.effects("/reserve"), 1, "a reservation sent again carries the same Idempotency-Key");
    assert.equal(downstream.count("/send"), 1);
    assert.ok(inv.attempt >= 2, "the killed attempt was followed by another");
    const journal = (await request("GET", `${durin.admin}/v1/invocations/${id}/journal`)).json;
    const egress = journal.entries.filter((e: any) => e.kind === "egress").map((e: any) => e.name);
    assert.deepEqual(egress, ["/charge", "/reserve", "/send"].map((p) => `POST ${downstream.url}${p}`));
  });

  it("a cancelled order is compensated (release, refund) and ends cancelled with 409", async () => {
    const order = { order_id: "o-2", customer_id: "c-2", amount_cents: 500 };
    const before = { charge: downstream.count("/charge"), send: downstream.count("/send") };
    const held = downstream.hold("/reserve");
    const id = await start(durin, "order", "process", order);
    await held.arrived;
    const r = await request("POST", `${durin.gw}/v1/invocations/${id}/cancel`);
    assert.ok(r.status < 300, r.text);
    held.release();
    const inv = await waitEnd(durin, id);
    assert.equal(inv.status, "cancelled", JSON.stringify(inv));
    assert.equal(downstream.count("/charge") - before.charge, 1);
    assert.equal(downstream.count("/release"), 1);
    assert.equal(downstream.count("/refund"), 1);
    assert.equal(downstream.count("/send") - before.send, 0, "no email for a cancelled order");
  });

  it("order3: three steps, no egress", async () => {
    const r = await request("POST", `${durin.gw}/v1/call/order/order3`, { order_id: "o-3", customer_id: "c-3", amount_cents: 1 });
    assert.equal(r.status, 200, r.text);
    assert.match(r.json, /^order o-3 complete charge ch_[0-9a-f-]{36} reservation rs_[0-9a-f-]{36}$/);
  });

  it("an invalid order is a terminal 422", async () => {
    const r = await request("POST", `${durin.gw}/v1/call/order/process`, { order_id: 1 });
    assert.equal(r.status, 422);
    assert.equal(r.headers.get("durin-error-source"), "handler");
  });
});

describe("approval example", () => {
  before(async () => {
    const example = await runExample("approval", 0, ["--durin", durin.gw]);
    running.push(example);
    await register(durin, example.url, [{ name: "approval", handlers: [{ name: "run", retry_policy: FAST_RETRY }] }]);
  });

  const wf = (id: string, rest = "") => `${durin.gw}/v1/workflows/approval/${id}${rest}`;
  const suspended = (inv: any) => inv.status === "suspended";

  it("a cancel signal before the deadline", async () => {
    const started = await request("POST", wf("req-1"), { request: "req-1", deadline: "1h" });
    assert.equal(started.status, 202, started.text);
    await waitUntil(durin, started.json.invocation_id, suspended);
    assert.equal((await request("GET", wf("req-1", "/queries/is_cancelled"))).json, false);
    assert.equal((await request("GET", wf("req-1", "/queries/status"))).json, "waiting for the deadline");
    assert.ok((await request("POST", wf("req-1", "/signals/cancel"), "changed my mind")).status < 300);
    const done = await request("GET", wf("req-1"), undefined, { prefer: "wait=10" });
    assert.equal(done.json.output, 'request req-1 cancelled: "changed my mind"');
    assert.equal((await request("GET", wf("req-1", "/queries/is_cancelled"))).json, true);
  });

  it("the deadline first: approved", async () => {
    const r = await request("POST", wf("req-2"), { request: "req-2", deadline: "100ms" }, { prefer: "wait=10" });
    assert.equal(r.status, 200, r.text);
    assert.equal(r.json, "request req-2 approved");
    assert.equal((await request("GET", wf("req-2", "/queries/status"))).json, "approved");
  });

  it("cancelled by an operator: the wait throws Cancelled, the run ends cancelled", async () => {
    const started = await request("POST", wf("req-3"), { request: "req-3", deadline: "1h" });
    const id = started.json.invocation_id;
    await waitUntil(durin, id, suspended);
    assert.ok((await request("POST", wf("req-3", "/cancel"))).status < 300);
    const inv = await waitEnd(durin, id);
    assert.equal(inv.status, "cancelled", JSON.stringify(inv));
    assert.equal((await request("GET", wf("req-3", "/queries/is_cancelled"))).json, true);
    assert.equal((await request("GET", wf("req-3", "/queries/status"))).json, "cancelled by an operator");
  });
});

describe("cart example (updates)", () => {
  before(async () => {
    const example = await runExample("cart", 0, ["--durin", durin.gw]);
    running.push(example);
    await register(durin, example.url, [{ name: "cart", handlers: [{ name: "run", retry_policy: FAST_RETRY }] }]);
  });

  const wf = (id: string, rest = "") => `${durin.gw}/v1/workflows/cart/${id}${rest}`;
  const add = (id: string, body: unknown, headers: Record<string, string> = {}) =>
    request("POST", wf(id, "/updates/add"), body, { prefer: "wait=10", ...headers });

  it("adds items with updates, refuses a bad one, answers a retry once, ends at checkout", async () => {
    const started = await request("POST", wf("ann"), { idle: "1h" });
    assert.equal(started.status, 202, started.text);
    const id = started.json.invocation_id;

    const tea = await add("ann", { item: "tea", quantity: 2 }, { "idempotency-key": "ann-tea" });
    assert.equal(tea.status, 200, tea.text);
    assert.deepEqual(tea.json, { tea: 2 });
    const retry = await add("ann", { item: "tea", quantity: 2 }, { "idempotency-key": "ann-tea" });
    assert.equal(retry.status, 200, retry.text);
    assert.deepEqual(retry.json, { tea: 2 }, "the retry is answered, not added again");
    assert.equal(retry.headers.get("idempotent-replayed"), "true");

    const bad = await add("ann", { item: "tea", quantity: 0 });
    assert.equal(bad.status, 422, bad.text);
    assert.equal(bad.json.type, "urn:durin:problem:update-refused");

    const jam = await add("ann", { item: "jam", quantity: 1 });
    assert.deepEqual(jam.json, { tea: 2, jam: 1 });
    assert.deepEqual((await request("GET", wf("ann", "/queries/cart"))).json, { tea: 2, jam: 1 });

    await waitUntil(durin, id, (inv) => inv.status === "suspended");
    assert.ok((await request("POST", wf("ann", "/signals/checkout"), {})).status < 300);
    const inv = await waitEnd(durin, id);
    assert.deepEqual(inv.output, { status: "checked out", cart: { tea: 2, jam: 1 } });
    assert.equal((await request("GET", wf("ann", "/queries/status"))).json, "checked out");
  });

  it("abandoned when no update comes for a while", async () => {
    const r = await request("POST", wf("bob"), { idle: "100ms" }, { prefer: "wait=10" });
    assert.equal(r.status, 200, r.text);
    assert.deepEqual(r.json, { status: "abandoned", cart: {} });
  });
});
