/**
 * Every primitive of the context, end to end: a real Durin calls handlers served by this
 * SDK (in this process); downstream servers count what reaches them.
 */
import { describe, it, before, after } from "node:test";
import * as assert from "node:assert/strict";
import type { AddressInfo } from "node:net";
import type { Server } from "node:http";
import { Endpoint, Member, Cancelled, Failure, TerminalError, Context } from "../src";
import { Downstream, Durin, FAST_RETRY, register, request, start, startDurin, waitEnd, waitUntil } from "./harness";

/** What each attempt saw, by invocation id (for checks on replay). */
const seen = new Map<string, any[]>();
function note(ctx: Context, what: unknown) {
  const list = seen.get(ctx.invocationId) ?? [];
  list.push(what);
  seen.set(ctx.invocationId, list);
}
/** How many times a step's function ran, by invocation id. */
const stepRuns = new Map<string, number>();
/** How many times an update's work ran, by update id. */
const updateRuns = new Map<string, number>();

let durin: Durin;
let downstream: Downstream;
let server: Server;

function app(): Endpoint {
  const app = new Endpoint({ durinUrl: durin.gw, egressUrl: durin.egress });

  app.handler("t", "steps", async (ctx) => {
    const id = await ctx.step("id", () => {
      stepRuns.set(ctx.invocationId, (stepRuns.get(ctx.invocationId) ?? 0) + 1);
      return { random: Math.random() };
    });
    note(ctx, id);
    await ctx.sleep("between", 20); // a second attempt, which reads the step back
    const nothing = await ctx.step("nothing", () => undefined);
    return { id, nothing };
  });

  app.handler("t", "egress", async (ctx) => {
    const a = await ctx.fetch(`${downstream.url}/a`, { json: { n: 1 } });
    const b = await ctx.fetch(`${downstream.url}/b?q=1`, { method: "PUT", body: "raw", form: "explicit" });
    note(ctx, { a: a.replayed, b: b.replayed });
    await ctx.sleep("between", 20);
    return { a: a.json(), b: b.json(), status: b.status };
  });

  app.handler("t", "sleep", async (ctx, input) => ctx.sleep("nap", input.ms));

  app.handler("t", "signal", async (ctx) => {
    const first = await ctx.signal("approve");
    const second = await ctx.signal("approve", { key: "approve-2" });
    return { first, second };
  });

  app.handler("t", "race", async (ctx, input) => {
    const payload = await ctx.signal("cancel", { timeout: input.timeout });
    return payload === undefined ? { timedOut: true } : { timedOut: false, payload };
  });

  app.handler("t", "first", async (ctx, input: { kinds: string[] }) => {
    const token = (await ctx.awakeable("cb")).token;
    await ctx.setState("token", token);
    const members = input.kinds.map((kind) => {
      switch (kind) {
        case "signal": return Member.signal("go");
        case "awakeable": return Member.awakeable("cb");
        case "sleep": return Member.sleep("deadline", 50);
        case "long-sleep": return Member.sleep("deadline", "1h");
        case "call": return Member.call("child", "t", "echo", { x: 1 });
        default: throw new TerminalError(400, `unknown kind ${kind}`);
      }
    });
    return ctx.first(members);
  });

  app.handler("t", "awakeable", async (ctx) => {
    const a = await ctx.awakeable("cb");
    await ctx.setState("token", a.token);
    try {
      return { value: await ctx.waitAwakeable("cb") };
    } catch (error) {
      if (error instanceof Failure) return { rejected: error.failure };
      throw error;
    }
  });

  app.handler("t", "state", async (ctx) => {
    await ctx.setState("status", "one");
    await ctx.setState("count", 1);
    await ctx.setState("gone", "soon");
    await ctx.clearState("gone");
    await ctx.signal("done");
    await ctx.setState("status", "two");
    return "ok";
  });

  app.handler("t", "echo", async (ctx, input) => ({ echo: input, id: ctx.invocationId }));
  app.handler("t", "fail", async () => {
    throw new TerminalError(418, "I am a teapot");
  });

  app.handler("t", "parent", async (ctx) => {
    const called = await ctx.call<any>("c", "t", "echo", { x: 1 });
    const sent = await ctx.send("s", "t", "echo", { y: 2 }, { delayMs: 10 });
    let failure: unknown;
    try {
      await ctx.call("bad", "t", "fail", {});
    } catch (error) {
      if (!(error instanceof Failure)) throw error;
      failure = { status: error.status, failure: error.failure };
    }
    return { called, sent: sent.invocationId, failure };
  });

  app.handler("t", "heartbeat", async (ctx) => {
    const last = await ctx.lastHeartbeat();
    await ctx.heartbeat({ attempt: ctx.attempt });
    if (ctx.attempt === 1) throw new Error("crash after a heartbeat");
    return { last };
  });

  app.handler("t", "cancel", async (ctx) => {
    await ctx.fetch(`${downstream.url}/charge`, { json: { amount: 5 } });
    try {
      await ctx.signal("ship");
    } catch (error) {
      if (error instanceof Cancelled) {
        await ctx.fetch(`${downstream.url}/refund`, { json: { amount: 5 } });
        await ctx.setState("compensated", true);
      }
      throw error;
    }
    return "shipped";
  });

  app.handler("t", "retry", async (ctx) => {
    if (ctx.attempt < 3) throw new Error(`attempt ${ctx.attempt} fails`);
    return { attempt: ctx.attempt };
  });

  app.handler("t", "who", async (ctx) => ({ workflowId: ctx.workflowId ?? null }));
  app.workflow("wf", async (ctx) => ({ workflowId: ctx.workflowId ?? null, invocationId: ctx.invocationId }));

  // Takes `add` updates (a positive number; 13 fails) until the signal `done` comes first.
  app.workflow("counter", async (ctx) => {
    let total = 0;
    for (let n = 1; ; n++) {
      const won = await ctx.first([Member.update("add", { key: `add-${n}` }), Member.signal("done")]);
      if (won.kind === "signal") return { total, done: won.value };
      const update = won.update!;
      note(ctx, { n, kind: won.kind, name: won.name, index: won.index, updateId: update.updateId, input: update.input });
      const amount = update.input;
      if (typeof amount !== "number" || amount <= 0) {
        await update.refuse(422, "add takes a positive number");
        continue;
      }
      if (amount === 13) {
        await update.fail(412, "unlucky");
        continue;
      }
      await ctx.step(`apply-${update.updateId}`, () => {
        updateRuns.set(update.updateId, (updateRuns.get(update.updateId) ?? 0) + 1);
        return amount;
      });
      total += amount;
      await ctx.setState("total", total);
      await update.answer({ total });
    }
  });

  // One update wait at a time with ctx.update: refused until it has a name.
  app.workflow("rename", async (ctx) => {
    for (let n = 1; ; n++) {
      const update = await ctx.update<{ name?: string }>("rename", { key: `rename-${n}` });
      if (typeof update.input?.name !== "string") {
        await update.refuse(400, "name is required");
        continue;
      }
      await ctx.setState("name", update.input.name);
      const answered = await update.answer(`renamed to ${update.input.name}`);
      const again = await update.answer("a second answer changes nothing");
      return { name: update.input.name, answered, again, waits: n };
    }
  });

  app.workflow("loop", async (ctx, input: { n: number }) => {
    if (input.n < 2) await ctx.continueAsNew({ n: input.n + 1 });
    return { n: input.n };
  });
  return app;
}

before(async () => {
  durin = await startDurin();
  downstream = await Downstream.start();
  const endpoint = app();
  server = await endpoint.listen(0);
  const url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  await register(durin, url, endpoint.services({ retry_policy: FAST_RETRY }));
});

after(async () => {
  server?.closeAllConnections();
  server?.close();
  await downstream?.close();
  await durin?.stop();
});

const suspended = (inv: any) => inv.status === "suspended";
const signal = (id: string, name: string, body: unknown) => request("POST", `${durin.gw}/v1/invocations/${id}/signals/${name}`, body);
const query = (id: string, key: string) => request("GET", `${durin.gw}/v1/invocations/${id}/queries/${key}`);

describe("steps", () => {
  it("records a value and reads it back on the next attempt", async () => {
    const id = await start(durin, "t", "steps", {});
    const inv = await waitEnd(durin, id);
    assert.equal(inv.status, "completed", inv.last_error);
    const attempts = seen.get(id)!;
    assert.ok(attempts.length >= 2, "the sleep made a second attempt");
    assert.deepEqual(attempts[1], attempts[0]);
    assert.deepEqual(inv.output, { id: attempts[0], nothing: null });
  });

  it("runs the function only when the step is not recorded", async () => {
    const id = await start(durin, "t", "steps", {});
    assert.equal((await waitEnd(durin, id)).status, "completed");
    assert.equal(stepRuns.get(id), 1);
  });
});

describe("egress", () => {
  it("sends each call once with an Idempotency-Key and replays it from the journal", async () => {
    const before = downstream.calls.length;
    const id = await start(durin, "t", "egress", {});
    const inv = await waitEnd(durin, id);
    assert.equal(inv.status, "completed", inv.last_error);
    const calls = downstream.calls.slice(before);
    assert.deepEqual(calls.map((c) => `${c.method} ${c.path}`), ["POST /a", "PUT /b?q=1"]);
    for (const call of calls) assert.match(call.key ?? "", /^durin-[0-9a-f]{40}$/);
    assert.equal(calls[1].body, "raw");
    assert.deepEqual(seen.get(id), [{ a: false, b: false }, { a: true, b: true }]);
    assert.deepEqual(inv.output.a.body, { n: 1 });
    assert.equal(inv.output.status, 200);
  });
});

describe("waits", () => {
  it("sleeps on a durable timer", async () => {
    const id = await start(durin, "t", "sleep", { ms: 100 });
    const inv = await waitEnd(durin, id);
    assert.equal(inv.status, "completed", inv.last_error);
    assert.ok(inv.output.firedAtMs >= inv.output.wakeAtMs);
  });

  it("waits for signals, by name and key", async () => {
    const id = await start(durin, "t", "signal", {});
    await waitUntil(durin, id, suspended);
    assert.equal((await signal(id, "approve", { by: "ann" })).status < 300, true);
    assert.equal((await signal(id, "approve", { by: "bob" })).status < 300, true);
    const inv = await waitEnd(durin, id);
    assert.deepEqual(inv.output, { first: { by: "ann" }, second: { by: "bob" } });
  });

  it("races a signal against a timer: the timer first", async () => {
    const id = await start(durin, "t", "race", { timeout: "100ms" });
    assert.deepEqual((await waitEnd(durin, id)).output, { timedOut: true });
  });

  it("races a signal against a timer: the signal first", async () => {
    const id = await start(durin, "t", "race", { timeout: "1h" });
    await waitUntil(durin, id, suspended);
    assert.ok((await signal(id, "cancel", "changed my mind")).status < 300);
    assert.deepEqual((await waitEnd(durin, id)).output, { timedOut: false, payload: "changed my mind" });
  });

  it("answers 202 + Durin-Suspended when it suspends, taken as a suspension", async () => {
    const id = await start(durin, "t", "race", { timeout: "1h" });
    const inv = await waitUntil(durin, id, suspended);
    assert.equal(inv.last_error, undefined);
    await signal(id, "cancel", 1);
    assert.equal((await waitEnd(durin, id)).status, "completed");
  });
});

describe("first", () => {
  it("a signal wins over a long sleep", async () => {
    const id = await start(durin, "t", "first", { kinds: ["long-sleep", "signal"] });
    await waitUntil(durin, id, suspended);
    await signal(id, "go", { ok: 1 });
    const out = (await waitEnd(durin, id)).output;
    assert.equal(out.index, 1);
    assert.equal(out.kind, "signal");
    assert.equal(out.name, "go");
    assert.deepEqual(out.value, { ok: 1 });
  });

  it("a sleep wins when nothing else arrives", async () => {
    const id = await start(durin, "t", "first", { kinds: ["signal", "awakeable", "sleep"] });
    const out = (await waitEnd(durin, id)).output;
    assert.equal(out.kind, "sleep");
    assert.equal(out.index, 2);
    assert.ok(out.value.firedAtMs >= out.value.wakeAtMs);
  });

  it("an awakeable wins when resolved", async () => {
    const id = await start(durin, "t", "first", { kinds: ["signal", "awakeable", "long-sleep"] });
    await waitUntil(durin, id, suspended);
    const token = (await query(id, "token")).json;
    assert.ok((await request("POST", `${durin.gw}/v1/awakeables/${token}/resolve`, { paid: true })).status < 300);
    const out = (await waitEnd(durin, id)).output;
    assert.equal(out.kind, "awakeable");
    assert.deepEqual(out.value, { paid: true });
  });

  it("a child call wins with its output and invocation id", async () => {
    const id = await start(durin, "t", "first", { kinds: ["signal", "call"] });
    const out = (await waitEnd(durin, id)).output;
    assert.equal(out.kind, "call");
    assert.equal(out.name, "child");
    assert.deepEqual(out.value.echo, { x: 1 });
    assert.equal(out.invocationId, out.value.id);
  });
});

describe("awakeables", () => {
  it("resolve", async () => {
    const id = await start(durin, "t", "awakeable", {});
    await waitUntil(durin, id, suspended);
    const token = (await query(id, "token")).json;
    assert.ok((await request("POST", `${durin.gw}/v1/awakeables/${token}/resolve`, { v: 42 })).status < 300);
    assert.deepEqual((await waitEnd(durin, id)).output, { value: { v: 42 } });
  });

  it("reject", async () => {
    const id = await start(durin, "t", "awakeable", {});
    await waitUntil(durin, id, suspended);
    const token = (await query(id, "token")).json;
    const r = await request("POST", `${durin.gw}/v1/awakeables/${token}/reject`, { message: "no stock", status: 409, type: "OutOfStock" });
    assert.ok(r.status < 300, r.text);
    const out = (await waitEnd(durin, id)).output;
    assert.equal(out.rejected.message, "no stock");
    assert.equal(out.rejected.status, 409);
  });
});

describe("state", () => {
  it("is read by queries, cleared to null, 404 when never set", async () => {
    const id = await start(durin, "t", "state", {});
    await waitUntil(durin, id, suspended);
    assert.equal((await query(id, "status")).json, "one");
    assert.equal((await query(id, "count")).json, 1);
    const gone = await query(id, "gone");
    assert.equal(gone.status, 200);
    assert.equal(gone.json, null);
    assert.equal((await query(id, "never")).status, 404);
    await signal(id, "done", null);
    assert.equal((await waitEnd(durin, id)).status, "completed");
    assert.equal((await query(id, "status")).json, "two");
  });
});

describe("children", () => {
  it("calls a child, sends another, and reads a child's failure", async () => {
    const id = await start(durin, "t", "parent", {});
    const inv = await waitEnd(durin, id);
    assert.equal(inv.status, "completed", inv.last_error);
    assert.deepEqual(inv.output.called.echo, { x: 1 });
    assert.equal(inv.output.failure.status, 418);
    const sent = await waitEnd(durin, inv.output.sent);
    assert.deepEqual(sent.output.echo, { y: 2 });
    assert.equal(sent.parent_invocation_id, id);
  });
});

describe("heartbeat", () => {
  it("the next attempt reads the last heartbeat", async () => {
    const id = await start(durin, "t", "heartbeat", {});
    const inv = await waitEnd(durin, id);
    assert.equal(inv.status, "completed", inv.last_error);
    assert.deepEqual(inv.output, { last: { attempt: 1 } });
  });
});

describe("cancellation", () => {
  it("the wait throws Cancelled, the compensation runs, the invocation ends cancelled with 409", async () => {
    const id = await start(durin, "t", "cancel", {});
    await waitUntil(durin, id, suspended);
    const r = await request("POST", `${durin.gw}/v1/invocations/${id}/cancel`);
    assert.ok(r.status < 300, r.text);
    const inv = await waitEnd(durin, id);
    assert.equal(inv.status, "cancelled", JSON.stringify(inv));
    assert.equal(downstream.effects("/charge"), 1);
    assert.equal(downstream.count("/charge"), 1, "the charge is replayed, not sent again");
    assert.equal(downstream.count("/refund"), 1);
    assert.equal((await query(id, "compensated")).json, true);
    const call = await request("GET", `${durin.gw}/v1/invocations/${id}`);
    assert.equal(call.json.status, "cancelled");
  });
});

describe("answers", () => {
  it("an ordinary error answers 503 and is retried", async () => {
    const id = await start(durin, "t", "retry", {});
    const inv = await waitEnd(durin, id);
    assert.equal(inv.status, "completed", inv.last_error);
    assert.deepEqual(inv.output, { attempt: 3 });
  });

  it("a TerminalError answers its 4xx, not retried", async () => {
    const r = await request("POST", `${durin.gw}/v1/call/t/fail`, {});
    assert.equal(r.status, 418);
    assert.equal(r.headers.get("durin-error-source"), "handler");
    assert.equal(r.json.detail, "I am a teapot");
  });
});

describe("workflows", () => {
  it("continue-as-new starts the next run under the same workflow id", async () => {
    const r = await request("POST", `${durin.gw}/v1/workflows/loop/l-1`, { n: 0 }, { prefer: "wait=20" });
    assert.equal(r.status, 200, r.text);
    const runs = await request("GET", `${durin.gw}/v1/workflows/loop/l-1/runs`);
    const last = await request("GET", `${durin.gw}/v1/workflows/loop/l-1`, undefined, { prefer: "wait=10" });
    assert.deepEqual(last.json.output, { n: 2 }, `${r.text} ${runs.text}`);
  });

  it("a workflow's run gets its workflow id; other invocations none", async () => {
    const r = await request("POST", `${durin.gw}/v1/workflows/wf/order-7`, {}, { prefer: "wait=20" });
    assert.equal(r.status, 200, r.text);
    assert.equal(r.json.workflowId, "order-7");
    assert.match(r.json.invocationId, /^inv_/);
    const plain = await request("POST", `${durin.gw}/v1/call/t/who`, {});
    assert.deepEqual(plain.json, { workflowId: null });
  });
});

describe("updates", () => {
  const wf = (name: string, id: string, rest = "") => `${durin.gw}/v1/workflows/${name}/${id}${rest}`;
  const update = (name: string, id: string, update: string, body: unknown, headers: Record<string, string> = {}) =>
    request("POST", wf(name, id, `/updates/${update}`), body, { prefer: "wait=10", ...headers });

  it("answered with the handler's value, refused with the validator's 4xx, a retry answered once, raced with a signal", async () => {
    const started = await request("POST", wf("counter", "c-1"), {});
    assert.equal(started.status, 202, started.text);
    const id = started.json.invocation_id;

    // Sent at once: it waits (pending) until the run reaches its update wait.
    const five = await update("counter", "c-1", "add", 5, { "idempotency-key": "add-five" });
    assert.equal(five.status, 200, five.text);
    assert.deepEqual(five.json, { total: 5 });

    const again = await update("counter", "c-1", "add", 5, { "idempotency-key": "add-five" });
    assert.equal(again.status, 200, again.text);
    assert.deepEqual(again.json, { total: 5 });
    assert.equal(again.headers.get("idempotent-replayed"), "true");

    const refused = await update("counter", "c-1", "add", -1);
    assert.equal(refused.status, 422, refused.text);
    assert.equal(refused.json.type, "urn:durin:problem:update-refused");
    assert.match(refused.json.detail, /add takes a positive number/);

    const failed = await update("counter", "c-1", "add", 13);
    assert.equal(failed.status, 412, failed.text);
    assert.equal(failed.json.type, "urn:durin:problem:update-failed");
    assert.match(failed.json.detail, /unlucky/);

    assert.equal((await request("GET", wf("counter", "c-1", "/queries/total"))).json, 5);

    const two = await update("counter", "c-1", "add", 2);
    assert.equal(two.status, 200, two.text);
    assert.deepEqual(two.json, { total: 7 });
    assert.equal((await request("GET", wf("counter", "c-1", "/queries/total"))).json, 7);

    await waitUntil(durin, id, suspended);
    assert.ok((await request("POST", wf("counter", "c-1", "/signals/done"), "bye")).status < 300);
    const inv = await waitEnd(durin, id);
    assert.equal(inv.status, "completed", JSON.stringify(inv));
    assert.deepEqual(inv.output, { total: 7, done: "bye" });

    // Each wait received one update, the same on every attempt; the retry reached no wait.
    const waits = new Map<number, any>();
    for (const w of seen.get(id) ?? []) {
      if (waits.has(w.n)) assert.deepEqual(w, waits.get(w.n), "the same update at the same wait on a replay");
      waits.set(w.n, w);
    }
    assert.deepEqual([...waits.values()].map((w) => w.input), [5, -1, 13, 2]);
    for (const w of waits.values()) {
      assert.match(w.updateId, /^upd_[0-9a-f]{32}$/);
      assert.deepEqual([w.kind, w.name, w.index], ["update", "add", 0]);
    }
    const applied = [waits.get(1).updateId, waits.get(4).updateId];
    assert.deepEqual(applied.map((u) => updateRuns.get(u)), [1, 1], "each update's work ran once");
    assert.equal(updateRuns.get(waits.get(2).updateId), undefined, "a refused update runs nothing");
    assert.equal((await request("GET", wf("counter", "c-1", "/queries/total"))).json, 7);
  });

  it("ctx.update: one wait at a time, a refusal then an answer, a second answer changes nothing", async () => {
    const started = await request("POST", wf("rename", "r-1"), {});
    assert.equal(started.status, 202, started.text);
    const id = started.json.invocation_id;
    await waitUntil(durin, id, suspended);

    const refused = await update("rename", "r-1", "rename", {});
    assert.equal(refused.status, 400, refused.text);
    assert.equal(refused.json.type, "urn:durin:problem:update-refused");

    const renamed = await update("rename", "r-1", "rename", { name: "ann" });
    assert.equal(renamed.status, 200, renamed.text);
    assert.equal(renamed.json, "renamed to ann");

    const inv = await waitEnd(durin, id);
    assert.equal(inv.status, "completed", JSON.stringify(inv));
    assert.deepEqual(inv.output, {
      name: "ann",
      answered: { value: "renamed to ann", replayed: false },
      again: { value: "renamed to ann", replayed: true },
      waits: 2,
    });
    assert.equal((await request("GET", wf("rename", "r-1", "/queries/name"))).json, "ann");
  });
});
