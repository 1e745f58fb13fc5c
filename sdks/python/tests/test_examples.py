"""The examples as separate processes: the order (durability across a SIGKILL, a cancel
with compensation, the three-step variant, a replay of its completed runs) and the
approval workflow."""
import os
import signal
import time
import unittest
import urllib.parse

from harness import FAST_RETRY, SDK, Downstream, Durin, request, start_process, stop_process

STEPS = os.path.join(SDK, "tests", "steps_handler.py")
COUNTING = os.path.join(SDK, "tests", "counting.py")
ORDER = os.path.join(SDK, "examples", "order.py")
APPROVAL = os.path.join(SDK, "examples", "approval.py")
AN_ORDER = {"order_id": "o1", "customer_id": "c1", "amount_cents": 1299}


class Order(unittest.TestCase):
    def setUp(self):
        self.d = Durin()
        self.addCleanup(self.d.stop)
        self.down = Downstream()
        self.addCleanup(self.down.stop)
        self.proc, self.url = self.start_handler(0)
        self.d.register({"url": self.url, "services": [{"name": "order", "handlers": [
            {"name": "process", "retry_policy": FAST_RETRY},
            {"name": "process3", "retry_policy": FAST_RETRY}]}]})

    def start_handler(self, port):
        proc, url = start_process([ORDER, "--port", str(port), "--durin", self.d.gw, "--egress", self.d.egress,
                                   "--payment", self.down.url, "--inventory", self.down.url,
                                   "--email", self.down.url])
        self.addCleanup(stop_process, proc)
        return proc, url

    def test_sigkill_between_two_egress_calls_runs_nothing_twice(self):
        # charge and reserve are done (journaled); the email is out and held; kill the handler
        self.down.hold("/send")
        inv = self.d.send("order", "process", AN_ORDER)
        self.down.wait_arrived("/send")
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.down.release("/send")
        time.sleep(0.3)                          # Durin retries against a dead port meanwhile
        self.start_handler(int(self.url.rsplit(":", 1)[1]))
        end = self.d.wait_end(inv, 30)
        self.assertEqual(end["status"], "completed", end)
        self.assertEqual(end["output"], "order o1 complete charge c1 reservation r1")
        self.assertGreaterEqual(end["attempt"], 2)
        self.assertEqual(self.down.count("/charge"), 1)   # answered from the journal after the restart
        self.assertEqual(self.down.count("/reserve"), 1)
        # the email was in flight: sent again at most, with the same Idempotency-Key
        self.assertEqual(len(set(self.down.keys("/send"))), 1, self.down.keys("/send"))

    def test_cancel_compensates_and_ends_cancelled(self):
        self.down.hold("/reserve")
        inv = self.d.send("order", "process", AN_ORDER)
        self.down.wait_arrived("/reserve")
        self.d.cancel(inv)
        end = self.d.wait_end(inv)
        self.down.release("/reserve")
        self.assertEqual(end["status"], "cancelled", end)
        self.assertEqual(self.down.count("/release"), 1)
        self.assertEqual(self.down.count("/refund"), 1)
        self.assertEqual(self.down.count("/send"), 0)

    def test_three_steps(self):
        status, _, body = request("POST", f"{self.d.gw}/v1/call/order/process3", AN_ORDER)
        self.assertEqual((status, body), (200, "order o1 complete charge charge_o1 reservation reservation_o1"))
        self.assertEqual(self.down.calls, [])


class OrderReplay(unittest.TestCase):
    def test_completed_orders_replay_with_nothing_run_again(self):
        """The order example's completed runs, exported from Durin and replayed against
        the deployment that recorded them (`POST /v1/replays`): both replay to their end,
        no downstream gets a call and no step body runs again."""
        d = Durin()
        self.addCleanup(d.stop)
        down = Downstream()
        self.addCleanup(down.stop)
        log = os.path.join(d.dir, "counted.log")
        proc, url = start_process([COUNTING, log, ORDER, "--port", "0", "--durin", d.gw, "--egress", d.egress,
                                   "--payment", down.url, "--inventory", down.url, "--email", down.url])
        self.addCleanup(stop_process, proc)
        d.register({"url": url, "services": [{"name": "order", "handlers": [
            {"name": "process", "retry_policy": FAST_RETRY},
            {"name": "process3", "retry_policy": FAST_RETRY}]}]})

        def counted():
            with open(log) as f:
                return f.read().splitlines()
        orders = [d.send("order", "process", AN_ORDER), d.send("order", "process3", AN_ORDER)]
        for inv in orders:
            end = d.wait_end(inv)
            self.assertEqual(end["status"], "completed", end)
        history = b""
        for inv in orders:
            status, headers, body = request("GET", f"{d.admin}/v1/invocations/{inv}/history", raw=True)
            self.assertEqual(status, 200, body)
            history += body
        calls, before = list(down.calls), counted()
        self.assertEqual(sorted(p for p, _, _ in calls), ["/charge", "/reserve", "/send"])
        self.assertEqual(sorted(line for line in before if line.startswith("step ")),
                         ["step charge", "step email", "step reserve"])
        self.assertNotIn("request replay=true", before)

        query = urllib.parse.urlencode({"deployment": url})
        status, _, report = request("POST", f"{d.admin}/v1/replays?{query}", history,
                                    headers={"content-type": "application/jsonl"})
        self.assertEqual(status, 200, report)
        self.assertEqual((report["replayed"], report["diverged"], report["failed"]), (2, 0, 0), report)
        for replayed in report["histories"]:
            self.assertEqual((replayed["result"], replayed.get("reached")), ("replayed", "end"), report)
        self.assertEqual(sorted(r["invocation_id"] for r in report["histories"]), sorted(orders))
        self.assertEqual(down.calls, calls, "a replay reached a downstream")
        new = counted()[len(before):]
        self.assertEqual(new, ["request replay=true"] * 2, "a replay ran a step body, or not through the handler")


class StepsAcrossSigkill(unittest.TestCase):
    def test_a_recorded_step_never_runs_again(self):
        d = Durin()
        self.addCleanup(d.stop)
        log, go = os.path.join(d.dir, "steps.log"), os.path.join(d.dir, "go")

        def start(port):
            proc, url = start_process([STEPS, "--port", str(port), "--durin", d.gw, "--log", log, "--go", go])
            self.addCleanup(stop_process, proc)
            return proc, url
        proc, url = start(0)
        d.register({"url": url, "services": [{"name": "k", "handlers": [{"name": "steps", "retry_policy": FAST_RETRY}]}]})
        inv = d.send("k", "steps", None)
        deadline = time.time() + 10
        def logged():
            if not os.path.exists(log):
                return ""
            with open(log) as f:
                return f.read()
        while "b-start" not in logged():
            self.assertLess(time.time(), deadline, "step b never started")
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)          # in the middle of step b
        proc.wait()
        open(go, "w").close()
        start(int(url.rsplit(":", 1)[1]))
        end = d.wait_end(inv, 30)
        self.assertEqual(end["output"], ["a", "b", "c"], end)
        with open(log) as f:
            # a was recorded before the kill: never run again; b, cut short, ran again
            self.assertEqual(f.read().split(), ["a", "b-start", "b-start", "b", "c"])


class Approval(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.d = Durin()
        try:
            cls.proc, url = start_process([APPROVAL, "--port", "0", "--durin", cls.d.gw])
            cls.d.register({"url": url, "services": [{"name": "approval", "handlers": [
                {"name": "run", "retry_policy": FAST_RETRY}]}]})
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def tearDownClass(cls):
        if getattr(cls, "proc", None):
            stop_process(cls.proc)
        cls.d.stop()

    def query(self, wid, key):
        return request("GET", f"{self.d.gw}/v1/workflows/approval/{wid}/queries/{key}")[2]

    def test_cancel_signal_before_the_deadline(self):
        inv = self.d.start_workflow("approval", "req-1", {"request": "req-1", "deadline": "1h"})
        self.d.wait_status(inv, ["suspended"])
        self.assertEqual(self.query("req-1", "is_cancelled"), False)
        status, _, _ = request("POST", f"{self.d.gw}/v1/workflows/approval/req-1/signals/cancel", "changed my mind")
        self.assertLess(status, 300)
        end = self.d.wait_end(inv)
        self.assertEqual(end["output"], 'request req-1 cancelled: "changed my mind"')
        self.assertEqual(self.query("req-1", "is_cancelled"), True)

    def test_deadline_approves(self):
        inv = self.d.start_workflow("approval", "req-2", {"request": "req-2", "deadline": "200ms"})
        end = self.d.wait_end(inv)
        self.assertEqual(end["output"], "request req-2 approved")
        self.assertEqual(self.query("req-2", "status"), "approved")

    def test_extend_the_deadline_with_an_update(self):
        inv = self.d.start_workflow("approval", "req-4", {"request": "req-4", "deadline": "2s"})
        self.d.wait_status(inv, ["suspended"])
        first_deadline = self.query("req-4", "deadline_ms")
        status, _, body = self.d.update("approval", "req-4", "extend", {"by": "1h"})
        self.assertEqual((status, body), (200, {"deadline_ms": first_deadline + 3_600_000}), body)
        self.assertEqual(self.query("req-4", "deadline_ms"), first_deadline + 3_600_000)
        for bad in ({"by": "soon"}, "1h", {"by": "400d"}):
            status, _, body = self.d.update("approval", "req-4", "extend", bad)
            self.assertEqual(status, 422, body)
            self.assertEqual(body["type"], "urn:durin:problem:update-refused")
        self.assertEqual(self.query("req-4", "deadline_ms"), first_deadline + 3_600_000)
        # the first deadline passes: its timer fires and changes nothing
        time.sleep(max(0, first_deadline / 1000 - time.time()) + 0.5)
        self.assertEqual(self.d.invocation(inv)["status"], "suspended")
        self.assertEqual(self.query("req-4", "status"), "waiting for the deadline")
        status, _, _ = request("POST", f"{self.d.gw}/v1/workflows/approval/req-4/signals/cancel", "too slow")
        self.assertLess(status, 300)
        end = self.d.wait_end(inv)
        self.assertEqual(end["output"], 'request req-4 cancelled: "too slow"')

    def test_operator_cancel(self):
        inv = self.d.start_workflow("approval", "req-3", {"request": "req-3", "deadline": "1h"})
        self.d.wait_status(inv, ["suspended"])
        status, _, _ = request("POST", f"{self.d.gw}/v1/workflows/approval/req-3/cancel")
        self.assertLess(status, 300)
        end = self.d.wait_end(inv)
        self.assertEqual(end["status"], "cancelled", end)
        self.assertEqual(self.query("req-3", "status"), "cancelled by an operator")


if __name__ == "__main__":
    unittest.main()
