"""Every primitive of the SDK through a real Durin, the handlers served in this process."""
import collections
import threading
import time
import unittest

from harness import FAST_RETRY, Downstream, Durin, request

import durin

COUNTS = collections.Counter()         # (invocation id, what) -> times run
ANSWERS = collections.defaultdict(list)  # invocation id -> [(status, headers)] answered to Durin
LOCK = threading.Lock()


def count(ctx, what):
    with LOCK:
        COUNTS[(ctx.invocation_id, what)] += 1
        return COUNTS[(ctx.invocation_id, what)]


class Recording(durin.Endpoint):
    """Keeps what each attempt answered, to check the endpoint's side of the contract."""

    def handle(self, method, path, headers, body):
        answer = super().handle(method, path, headers, body)
        inv = {k.lower(): v for k, v in headers}.get("durin-invocation-id")
        with LOCK:
            ANSWERS[inv].append((answer[0], dict(answer[1])))
        return answer


app = Recording()
opts = {"retry_policy": FAST_RETRY}


@app.handler("t", "echo", **opts)
def echo(ctx, input):
    return input


@app.handler("t", "step", **opts)
def step(ctx, input):
    a = ctx.step("a", lambda: {"ran": count(ctx, "a")})
    if ctx.attempt == 1:
        raise RuntimeError("crash after step a")   # 503: retried; step a is not run again
    b = ctx.step("b", lambda: {"ran": count(ctx, "b")})
    return {"a": a, "b": b, "attempt": ctx.attempt}


@app.handler("t", "egress", **opts)
def egress(ctx, input):
    one = ctx.http("POST", input["url"] + "/one", json={"n": 1})
    if ctx.attempt == 1:
        raise RuntimeError("crash between two egress calls")
    two = ctx.http("POST", input["url"] + "/two", body=b"raw", headers={"x-test": "yes"})
    return {"one": one.json(), "one_replayed": one.replayed, "two": two.json(),
            "two_replayed": two.replayed, "status": two.status}


@app.handler("t", "sleep", **opts)
def sleep(ctx, input):
    fired = ctx.sleep("nap", input["duration"])
    return {"fired": fired, "attempt": ctx.attempt}


@app.handler("t", "signal", **opts)
def signal(ctx, input):
    first = ctx.signal("go")
    second = ctx.signal("go", key="go-2")
    return [first, second]


@app.handler("t", "race", **opts)
def race(ctx, input):
    value = ctx.signal("cancel", timeout=input["timeout"])
    return {"timed_out": value is durin.TIMED_OUT, "value": None if value is durin.TIMED_OUT else value}


@app.handler("t", "first", **opts)
def first(ctx, input):
    token = ctx.awakeable("cb").token
    ctx.set_state("token", token)
    members = [ctx.signal_member("approve"), ctx.awakeable_member("cb"),
               ctx.sleep_member("deadline", input["deadline"])]
    if input.get("child") is not None:
        members.append(ctx.call_member("child", "t", "echo", input["child"]))
    won = ctx.first(*members)
    return {"index": won.index, "kind": won.kind, "name": won.name, "value": won.value,
            "failure": won.failure and [won.failure.status, won.failure.message],
            "child": won.invocation_id}


@app.handler("t", "awakeable", **opts)
def awakeable(ctx, input):
    a = ctx.awakeable("cb")
    ctx.set_state("awakeable", {"token": a.token, "resolve_url": a.resolve_url, "reject_url": a.reject_url})
    try:
        return {"value": ctx.wait_awakeable("cb")}
    except durin.Failure as failure:
        return {"failure": [failure.status, failure.message]}


@app.handler("t", "state", **opts)
def state(ctx, input):
    ctx.set_state("kept", {"n": 1})
    ctx.set_state("gone", "soon")
    ctx.clear_state("gone")
    ctx.signal("done")
    ctx.set_state("kept", {"n": 2})
    return "ok"


@app.handler("t", "parent", **opts)
def parent(ctx, input):
    value = ctx.call("c", "t", "echo", {"x": 1})
    sent = ctx.send("s", "t", "echo", {"y": 2})
    later = ctx.send("later", "t", "echo", {"z": 3}, delay=0.3)
    try:
        ctx.call("bad", "t", "terminal", None)
        failure = None
    except durin.Failure as f:
        failure = [f.status, f.message]
    return {"value": value, "sent": sent, "later": later, "failure": failure}


@app.handler("t", "terminal", **opts)
def terminal(ctx, input):
    raise durin.TerminalError(422, "not a valid thing")


@app.handler("t", "heartbeat", **opts)
def heartbeat(ctx, input):
    last = ctx.last_heartbeat()
    if ctx.attempt == 1:
        ctx.heartbeat({"done": 3})
        raise RuntimeError("crash after a heartbeat")
    return {"last": last}


@app.handler("t", "cancel", **opts)
def cancel(ctx, input):
    ctx.http("POST", input["url"] + "/reserve", json={"order": 1})
    try:
        ctx.sleep("long", "1h")
    except durin.Cancelled:
        ctx.http("POST", input["url"] + "/undo", json={"order": 1})
        ctx.set_state("compensated", True)
        raise
    return "not cancelled"


@app.workflow("loop", **opts)
def loop(ctx, input):
    ctx.set_state("n", input["n"])
    if input["n"] < 2:
        ctx.continue_as_new({"n": input["n"] + 1})
    return {"final": input["n"]}


@app.workflow("counter", **opts)
def counter(ctx, input):
    """Adds what `add` updates bring to `total` until the signal `done`: every update is
    validated (a positive whole number), 13 fails, the rest is added in a step."""
    total = input["start"]
    ctx.set_state("total", total)
    n = 0
    while True:
        won = ctx.first(ctx.signal_member("done"), ctx.update_member("add", key=f"add-{n}"))
        if won.kind == "signal":
            return {"total": total, "updates": n, "winner": [won.index, won.kind, won.name, won.value]}
        n += 1
        update = won.update
        if not isinstance(update.input, int) or update.input <= 0:
            update.refuse(422, f"add a positive whole number, not {update.input!r}")
            continue
        if update.input == 13:
            update.fail(409, "13 is unlucky")
            continue

        def add():
            count(ctx, ("add", update.update_id))   # the update's work: once per update
            return total + update.input
        total = ctx.step(f"add-{n}", add)
        ctx.set_state("total", total)
        update.answer({"total": total, "winner": [won.index, won.kind, won.name]})


@app.workflow("ask", **opts)
def ask(ctx, input):
    """Takes one update with ctx.update, after a signal: an update sent before stays pending."""
    ctx.signal("go")
    question = ctx.update("question")
    answered = question.answer({"you asked": question.input, "id": question.update_id})
    return {"answered": answered}


@app.workflow("who", **opts)
def who(ctx, input):
    return {"workflow_id": ctx.workflow_id, "invocation_id": ctx.invocation_id}


@app.handler("t", "who", **opts)
def who_not_workflow(ctx, input):
    return {"workflow_id": ctx.workflow_id}


D = None
SERVER = None
DOWN = None


def setUpModule():
    global D, SERVER, DOWN
    D = Durin()
    try:
        SERVER = app.start()
        app.configure(durin=D.gw, egress=D.egress)
        D.register(app.deployment(f"http://127.0.0.1:{SERVER.server_address[1]}"))
        DOWN = Downstream()
    except BaseException:
        tearDownModule()
        raise


def tearDownModule():
    if SERVER:
        SERVER.shutdown()
        SERVER.server_close()
    if DOWN:
        DOWN.stop()
    if D:
        D.stop()


def query(inv, key):
    return request("GET", f"{D.gw}/v1/invocations/{inv}/queries/{key}")


class Primitives(unittest.TestCase):
    def completed(self, inv, timeout=20):
        end = D.wait_end(inv, timeout)
        self.assertEqual(end["status"], "completed", end)
        return end["output"]

    def test_step_records_once_and_reads_back(self):
        inv = D.send("t", "step", {})
        out = self.completed(inv)
        self.assertEqual(out, {"a": {"ran": 1}, "b": {"ran": 1}, "attempt": 2})
        self.assertEqual(COUNTS[(inv, "a")], 1)

    def test_egress_passes_the_key_and_replays_from_the_journal(self):
        inv = D.send("t", "egress", {"url": DOWN.url})
        out = self.completed(inv)
        self.assertTrue(out["one_replayed"])          # attempt 2 got it from the journal
        self.assertFalse(out["two_replayed"])
        self.assertEqual(out["status"], 200)
        self.assertEqual(DOWN.count("/one"), 1)
        self.assertTrue(DOWN.keys("/one")[0].startswith("durin-"), DOWN.keys("/one"))
        key = DOWN.keys("/two")[0]
        with DOWN.lock:
            self.assertIn(("/two", key, b"raw"), DOWN.calls)

    def test_sleep_suspends_then_continues(self):
        inv = D.send("t", "sleep", {"duration": 0.3})
        out = self.completed(inv)
        self.assertGreaterEqual(out["attempt"], 2)
        self.assertGreaterEqual(out["fired"]["fired_at_ms"], out["fired"]["wake_at_ms"])
        first_answer = ANSWERS[inv][0]
        self.assertEqual(first_answer[0], 202)
        self.assertEqual(first_answer[1].get("durin-suspended"), "true")

    def test_suspended_answer_is_logged_as_a_suspension(self):
        inv = D.send("t", "sleep", {"duration": "1h"})
        body = D.wait_status(inv, ["suspended"])
        self.assertNotIn("last_error", body)   # not taken as a failure
        request("POST", f"{D.admin}/v1/invocations/{inv}/terminate")

    def test_signal_wait_and_keyed_second_signal(self):
        inv = D.send("t", "signal", {})
        D.wait_status(inv, ["suspended"])
        D.signal(inv, "go", {"n": 1})
        D.signal(inv, "go", {"n": 2})
        self.assertEqual(self.completed(inv), [{"n": 1}, {"n": 2}])

    def test_signal_raced_against_a_timer(self):
        timed = D.send("t", "race", {"timeout": 0.2})
        self.assertEqual(self.completed(timed), {"timed_out": True, "value": None})
        signalled = D.send("t", "race", {"timeout": "1h"})
        D.wait_status(signalled, ["suspended"])
        D.signal(signalled, "cancel", "changed my mind")
        self.assertEqual(self.completed(signalled), {"timed_out": False, "value": "changed my mind"})

    def token_of(self, inv, key):
        deadline = time.time() + 10
        while time.time() < deadline:
            status, _, body = query(inv, key)
            if status == 200 and body:
                return body
            time.sleep(0.05)
        self.fail(f"no state {key} on {inv}")

    def test_first_signal_wins(self):
        inv = D.send("t", "first", {"deadline": "1h"})
        D.wait_status(inv, ["suspended"])
        D.signal(inv, "approve", {"ok": True})
        out = self.completed(inv)
        self.assertEqual((out["index"], out["kind"], out["name"], out["value"]), (0, "signal", "approve", {"ok": True}))

    def test_first_awakeable_wins_resolved_and_rejected(self):
        inv = D.send("t", "first", {"deadline": "1h"})
        token = self.token_of(inv, "token")
        D.wait_status(inv, ["suspended"])
        status, _, body = request("POST", f"{D.gw}/v1/awakeables/{token}/resolve", 42)
        self.assertLess(status, 300, body)
        out = self.completed(inv)
        self.assertEqual((out["index"], out["kind"], out["value"]), (1, "awakeable", 42))
        inv = D.send("t", "first", {"deadline": "1h"})
        token = self.token_of(inv, "token")
        request("POST", f"{D.gw}/v1/awakeables/{token}/reject", {"message": "no", "status": 422})
        out = self.completed(inv)
        self.assertEqual((out["kind"], out["failure"]), ("awakeable", [422, "no"]))

    def test_first_sleep_wins(self):
        out = self.completed(D.send("t", "first", {"deadline": 0.2}))
        self.assertEqual((out["index"], out["kind"], out["name"]), (2, "sleep", "deadline"))
        self.assertIn("fired_at_ms", out["value"])

    def test_first_call_wins(self):
        out = self.completed(D.send("t", "first", {"deadline": "1h", "child": {"c": 1}}))
        self.assertEqual((out["index"], out["kind"], out["value"]), (3, "call", {"c": 1}))
        self.assertTrue(out["child"].startswith("inv_"))

    def test_awakeable_resolved(self):
        inv = D.send("t", "awakeable", {})
        a = self.token_of(inv, "awakeable")
        D.wait_status(inv, ["suspended"])
        url = a["resolve_url"] if a["resolve_url"].startswith("http") else D.gw + a["resolve_url"]
        status, _, body = request("POST", url, {"paid": True})
        self.assertLess(status, 300, body)
        self.assertEqual(self.completed(inv), {"value": {"paid": True}})

    def test_awakeable_rejected(self):
        inv = D.send("t", "awakeable", {})
        a = self.token_of(inv, "awakeable")
        request("POST", f"{D.gw}/v1/awakeables/{a['token']}/reject", {"message": "declined", "status": 402})
        self.assertEqual(self.completed(inv), {"failure": [402, "declined"]})

    def test_state_read_by_a_query(self):
        inv = D.send("t", "state", {})
        D.wait_status(inv, ["suspended"])
        self.assertEqual(query(inv, "kept")[2], {"n": 1})
        status, _, body = query(inv, "gone")
        self.assertEqual(status, 200)
        self.assertIn(body, (None, b""))
        self.assertEqual(query(inv, "never")[0], 404)
        D.signal(inv, "done", None)
        self.completed(inv)
        self.assertEqual(query(inv, "kept")[2], {"n": 2})

    def test_child_call_send_and_failure(self):
        out = self.completed(D.send("t", "parent", {}))
        self.assertEqual(out["value"], {"x": 1})
        self.assertEqual(out["failure"][0], 422)
        self.assertIn("not a valid thing", out["failure"][1])
        self.assertEqual(self.completed(out["sent"]), {"y": 2})
        self.assertEqual(self.completed(out["later"]), {"z": 3})

    def test_terminal_error_fails_without_retry(self):
        inv = D.send("t", "terminal", {})
        end = D.wait_end(inv)
        self.assertEqual(end["status"], "failed")
        self.assertEqual(end["attempt"], 1)
        self.assertEqual(ANSWERS[inv][0][0], 422)

    def test_heartbeat_seen_by_the_next_attempt(self):
        inv = D.send("t", "heartbeat", {})
        self.assertEqual(self.completed(inv), {"last": {"done": 3}})
        self.assertEqual(ANSWERS[inv][0][0], 503)  # the crash: retried

    def test_cancel_raises_in_the_wait_and_compensates(self):
        inv = D.send("t", "cancel", {"url": DOWN.url})
        D.wait_status(inv, ["suspended"])
        D.cancel(inv)
        end = D.wait_end(inv)
        self.assertEqual(end["status"], "cancelled", end)
        self.assertEqual(ANSWERS[inv][-1][0], 409)
        self.assertEqual(query(inv, "compensated")[2], True)
        self.assertEqual(DOWN.count("/undo"), 1)
        self.assertEqual(DOWN.count("/reserve"), 1)   # replayed in the cancelled attempt

    def test_continue_as_new(self):
        first = D.start_workflow("loop", "loop-1", {"n": 0})
        end = D.wait_end(first)
        self.assertEqual(end["status"], "continued", end)
        deadline = time.time() + 20
        while time.time() < deadline:
            _, _, run = request("GET", f"{D.gw}/v1/workflows/loop/loop-1", headers={"prefer": "wait=5"})
            if run.get("status") == "completed":
                break
        self.assertEqual(run.get("output"), {"final": 2}, run)
        self.assertNotEqual(run["id"], first)

    @staticmethod
    def adds(inv):
        """How many times each update's work ran in the counter run `inv`."""
        with LOCK:
            return [c for (i, what), c in COUNTS.items() if i == inv and isinstance(what, tuple)]

    def test_updates_answered_refused_retried_and_raced_with_a_signal(self):
        inv = D.start_workflow("counter", "c-1", {"start": 10})
        D.wait_status(inv, ["suspended"])
        # answered with the handler's value; the state it changed is read by a query
        status, headers, body = D.update("counter", "c-1", "add", 5, key="add-five")
        self.assertEqual((status, body), (200, {"total": 15, "winner": [1, "update", "add"]}), body)
        self.assertEqual(request("GET", f"{D.gw}/v1/workflows/counter/c-1/queries/total")[2], 15)
        # refused by the validator: the caller gets its 4xx, nothing changes
        status, _, body = D.update("counter", "c-1", "add", "six")
        self.assertEqual(status, 422, body)
        self.assertEqual(body["type"], "urn:durin:problem:update-refused")
        self.assertIn("positive whole number", body["detail"])
        # failed by the handler after it accepted it
        status, _, body = D.update("counter", "c-1", "add", 13)
        self.assertEqual(status, 409, body)
        self.assertEqual(body["type"], "urn:durin:problem:update-failed")
        # a retry with the same Idempotency-Key: the same answer, and the update ran once
        status, headers, body = D.update("counter", "c-1", "add", 5, key="add-five")
        self.assertEqual((status, body), (200, {"total": 15, "winner": [1, "update", "add"]}), body)
        self.assertEqual(headers.get("idempotent-replayed"), "true")
        self.assertEqual(self.adds(inv), [1])
        self.assertEqual(D.update("counter", "c-1", "add", 2)[::2], (200, {"total": 17, "winner": [1, "update", "add"]}))
        self.assertEqual(request("GET", f"{D.gw}/v1/workflows/counter/c-1/queries/total")[2], 17)
        # the signal wins the same `first` once it comes
        D.signal(inv, "done", "that's all")
        out = self.completed(inv)
        self.assertEqual(out, {"total": 17, "updates": 4, "winner": [0, "signal", "done", "that's all"]})
        self.assertEqual(self.adds(inv), [1, 1])
        # the run has ended: no more updates
        self.assertEqual(D.update("counter", "c-1", "add", 1)[0], 409)

    def test_update_pending_until_the_handler_waits_for_it(self):
        inv = D.start_workflow("ask", "ask-1", {})
        D.wait_status(inv, ["suspended"])
        status, headers, body = D.update("ask", "ask-1", "question", "why?", wait=1)
        self.assertEqual(status, 202, body)
        self.assertEqual(body["status"], "pending", body)
        location = body["location"] if body["location"].startswith("http") else D.gw + body["location"]
        D.signal(inv, "go", None)
        status, _, answer = request("GET", location, headers={"prefer": "wait=10"})
        self.assertEqual((status, answer), (200, {"you asked": "why?", "id": body["update_id"]}), answer)
        self.assertEqual(self.completed(inv), {"answered": {"value": answer}})

    def test_workflow_id_header(self):
        inv = D.start_workflow("who", "who-7", {})
        self.assertEqual(self.completed(inv), {"workflow_id": "who-7", "invocation_id": inv})
        self.assertEqual(self.completed(D.send("t", "who", {})), {"workflow_id": None})


if __name__ == "__main__":
    unittest.main()
