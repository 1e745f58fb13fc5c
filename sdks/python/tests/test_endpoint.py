"""The endpoint's answers without a Durin: routing, refusals, the deployment body."""
import json
import unittest

import harness  # noqa: F401  (puts the SDK on sys.path)
import durin

app = durin.Endpoint(durin="http://127.0.0.1:1")
HEADERS = {"Durin-Invocation-Id": "inv_" + "0" * 32, "Durin-Attempt": "1", "Durin-Attempt-Token": "t"}


@app.handler("s", "h", retry_policy={"maximum_attempts": 3})
def h(ctx, input):
    if input == "terminal":
        raise durin.TerminalError(418, "teapot")
    if input == "crash":
        raise KeyError("x")
    return {"got": input, "attempt": ctx.attempt, "workflow_id": ctx.workflow_id}


class Endpoint(unittest.TestCase):
    def test_answers(self):
        self.assertEqual(app.handle("POST", "/s/h", HEADERS, b'"hi"')[::2],
                         (200, json.dumps({"got": "hi", "attempt": 1, "workflow_id": None}).encode()))
        self.assertEqual(app.handle("POST", "/s/h", HEADERS, b"")[0], 200)          # empty input: None
        self.assertEqual(app.handle("POST", "/s/other", HEADERS, b"")[0], 404)
        self.assertEqual(app.handle("GET", "/s/h", HEADERS, b"")[0], 405)
        self.assertEqual(app.handle("POST", "/s/h", {}, b"")[0], 400)               # not from Durin
        self.assertEqual(app.handle("POST", "/s/h", HEADERS, b"{not json")[0], 400)
        self.assertEqual(app.handle("POST", "/s/h", HEADERS, b'"terminal"')[0], 418)
        status, headers, body = app.handle("POST", "/s/h", HEADERS, b'"crash"')
        self.assertEqual((status, dict(headers)["content-type"]), (503, "application/problem+json"))
        self.assertIn("KeyError", json.loads(body)["detail"])

    def test_terminal_error_must_be_terminal(self):
        for status in (408, 429, 500, 200):
            with self.assertRaises(ValueError):
                durin.TerminalError(status, "no")
        self.assertEqual(durin.Failure(500, "child failed").answer_status, 424)
        self.assertEqual(durin.Failure(402, "declined").answer_status, 402)

    def test_deployment(self):
        self.assertEqual(app.deployment("http://127.0.0.1:9"), {"url": "http://127.0.0.1:9", "services": [
            {"name": "s", "handlers": [{"name": "h", "path": "/s/h", "retry_policy": {"maximum_attempts": 3}}]}]})


if __name__ == "__main__":
    unittest.main()
