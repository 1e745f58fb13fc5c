"""Signature v3: requests Durin signed are accepted; changed or forged ones get 401."""
import base64
import http.client
import os
import subprocess
import sys
import threading
import time
import unittest
from unittest import mock

from harness import HERE, FAST_RETRY, Durin, require_cryptography

import durin
from durin.signature import raw_key

CAPTURED = []
LOCK = threading.Lock()


class Capturing(durin.Endpoint):
    """Keeps every request as received, to replay it changed through `handle`."""

    def handle(self, method, path, headers, body):
        headers = list(headers)
        answer = super().handle(method, path, headers, body)
        with LOCK:
            CAPTURED.append((method, path, headers, body, answer[0]))
        return answer


def serve(app, d):
    @app.handler("sig", "echo", retry_policy={**FAST_RETRY, "maximum_attempts": 2})
    def echo(ctx, input):
        return {"input": input, "attempt": ctx.attempt}
    server = app.start()
    d.register(app.deployment(f"http://127.0.0.1:{server.server_address[1]}"))
    return server


class Signatures(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        require_cryptography()  # skipped without it; failed with DURIN_REQUIRE_ALL=1
        cls.d = Durin()
        cls.app = Capturing(durin=cls.d.gw, verify_key=cls.d.signing_key()["jwk"])
        try:
            cls.server = serve(cls.app, cls.d)
        except BaseException:
            cls.d.stop()
            raise

    @classmethod
    def tearDownClass(cls):
        cls.server.shutdown()
        cls.server.server_close()
        cls.d.stop()

    def signed_request(self):
        inv = self.d.send("sig", "echo", {"a": 1})
        end = self.d.wait_end(inv)
        self.assertEqual(end["status"], "completed", end)
        self.assertEqual(end["output"], {"input": {"a": 1}, "attempt": 1})
        with LOCK:
            return next(c for c in CAPTURED if dict((k.lower(), v) for k, v in c[2])["durin-invocation-id"] == inv)

    def replay(self, method, path, headers, body):
        return self.app.handle(method, path, headers, body)[0]

    def test_good_request_accepted_and_replayable_unchanged(self):
        method, path, headers, body, status = self.signed_request()
        self.assertEqual(status, 200)
        self.assertEqual(self.replay(method, path, headers, body), 200)

    def test_tampered_requests_refused(self):
        method, path, headers, body, _ = self.signed_request()

        def changed(name, value):
            return [(k, value if k.lower() == name else v) for k, v in headers]
        self.assertEqual(self.replay(method, path, headers, body + b" "), 401)
        self.assertEqual(self.replay(method, path, headers, b'{"a": 2}'), 401)
        self.assertEqual(self.replay(method, path, changed("durin-attempt", "2"), body), 401)
        self.assertEqual(self.replay(method, path, changed("durin-attempt-token", "0" * 32), body), 401)
        self.assertEqual(self.replay(method, path, headers + [("Durin-Cancelled", "true")], body), 401)
        self.assertEqual(self.replay(method, path, headers + [("Durin-Attempt", "1")], body), 401)
        self.assertEqual(self.replay(method, "/sig/other", headers, body), 404)
        no_v3 = changed("durin-signature", ",".join(
            p for p in dict((k.lower(), v) for k, v in headers)["durin-signature"].split(",") if not p.startswith("v3=")))
        self.assertEqual(self.replay(method, path, no_v3, body), 401)
        # unsigned headers may change
        self.assertEqual(self.replay(method, path, headers + [("X-Other", "1")], body), 200)

    def test_over_http(self):
        method, path, headers, body, _ = self.signed_request()

        def send(extra, body):
            conn = http.client.HTTPConnection("127.0.0.1", self.server.server_address[1], timeout=10)
            try:
                conn.putrequest(method, path, skip_accept_encoding=True)
                for k, v in headers + extra:
                    if k.lower() not in ("content-length", "accept-encoding"):
                        conn.putheader(k, v)
                conn.putheader("content-length", str(len(body)))
                conn.endheaders(body)
                return conn.getresponse().status
            finally:
                conn.close()
        self.assertEqual(send([], body), 200)
        self.assertEqual(send([], body.replace(b"1", b"2")), 401)
        self.assertEqual(send([("Durin-Attempt-Token", "x")], body), 401)   # a durin-* header twice

    def test_old_signature_refused(self):
        method, path, headers, body, _ = self.signed_request()
        verifier = durin.Verifier(self.d.signing_key()["public_key"])
        verifier.verify(path, headers, body)
        with self.assertRaises(durin.SignatureError):
            verifier.verify(path, headers, body, now_ms=int(time.time() * 1000) + 6 * 60 * 1000)

    def test_wrong_key_refuses_durin(self):
        other = Durin()
        try:
            app = durin.Endpoint(durin=other.gw, verify_key=bytes(32 * [7]))
            server = serve(app, other)
            try:
                inv = other.send("sig", "echo", {})
                end = other.wait_end(inv)
                self.assertEqual(end["status"], "failed", end)
                self.assertEqual(end["failure"]["status"], 401, end)
            finally:
                server.shutdown()
                server.server_close()
        finally:
            other.stop()

    def test_key_forms(self):
        key = self.d.signing_key()
        raw = raw_key(key["jwk"])
        self.assertEqual(raw_key(key["public_key"]), raw)
        self.assertEqual(raw_key("ed25519:" + key["public_key"]), raw)
        self.assertEqual(raw_key(key), raw)
        self.assertEqual(raw_key(base64.urlsafe_b64encode(raw).decode().rstrip("=")), raw)
        with self.assertRaises(ValueError):
            raw_key(b"short")


class WithoutCryptography(unittest.TestCase):
    def test_clear_error_when_cryptography_is_missing(self):
        blocked = {name: None for name in ("cryptography", "cryptography.hazmat.primitives.asymmetric.ed25519",
                                           "cryptography.exceptions")}
        with mock.patch.dict(sys.modules, blocked):
            with self.assertRaisesRegex(RuntimeError, "cryptography"):
                durin.Endpoint(verify_key=bytes(32))

    def test_the_signature_tests_skip_without_it_unless_all_are_required(self):
        # The Signatures tests in a Python that cannot import cryptography.
        run = ("import sys, unittest; sys.modules['cryptography'] = None; "
               "unittest.main(module=None, argv=['signatures', '-v', 'test_signature.Signatures'])")

        def signatures(require_all):
            env = {**os.environ, "DURIN_REQUIRE_ALL": require_all, "PYTHONDONTWRITEBYTECODE": "1"}
            return subprocess.run([sys.executable, "-c", run], cwd=HERE, env=env,
                                  capture_output=True, text=True, timeout=60)
        skipped = signatures("0")
        self.assertEqual(skipped.returncode, 0, skipped.stderr)
        self.assertIn("skipped=1", skipped.stderr)
        self.assertIn("set DURIN_REQUIRE_ALL=1 to fail instead", skipped.stderr)
        failed = signatures("1")
        self.assertNotEqual(failed.returncode, 0, failed.stderr)
        self.assertIn("with DURIN_REQUIRE_ALL=1 that is a failure", failed.stderr)


if __name__ == "__main__":
    unittest.main()
