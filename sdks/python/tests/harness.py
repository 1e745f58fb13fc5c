"""Test harness: a real Durin process, downstream servers that count calls, HTTP helpers.

DURIN_BIN names the Durin binary (default: target/debug/durin of this repository).
"""
import atexit
import http.client
import json
import logging
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

logging.getLogger("durin").setLevel(logging.ERROR)  # the handlers' planned crashes
HERE = os.path.dirname(os.path.abspath(__file__))
SDK = os.path.dirname(HERE)
sys.path.insert(0, SDK)

DURIN_BIN = os.environ.get("DURIN_BIN") or os.path.normpath(
    os.path.join(SDK, "..", "..", "target", "debug", "durin"))
CRYPTOGRAPHY_MISSING = "cryptography is not installed: pip install cryptography"


def has_cryptography():
    try:
        import cryptography  # noqa: F401
        return True
    except ImportError:
        return False


def require_cryptography():
    """For setUpClass: skip the tests when `cryptography` is missing, or, with
    DURIN_REQUIRE_ALL=1 (CI; tests/sdks.rs passes it down), fail them, as the Rust tests
    do with a missing dependency."""
    if has_cryptography():
        return
    if os.environ.get("DURIN_REQUIRE_ALL") == "1":
        raise AssertionError(f"{CRYPTOGRAPHY_MISSING}; with DURIN_REQUIRE_ALL=1 that is a failure")
    raise unittest.SkipTest(f"{CRYPTOGRAPHY_MISSING}; set DURIN_REQUIRE_ALL=1 to fail instead")


# Stop what the tests started even when the run itself is stopped (SIGTERM, Ctrl-C).
_LIVE = []


def _stop_all():
    for stop in reversed(list(_LIVE)):
        stop()


def _terminated(*_):
    _stop_all()
    os._exit(143)


atexit.register(_stop_all)
signal.signal(signal.SIGTERM, _terminated)

FAST_RETRY = {"initial_interval": "50ms", "maximum_interval": "200ms", "maximum_attempts": 30}


# --- HTTP ----------------------------------------------------------------------------

def request(method, url, body=None, headers=None, raw=False, timeout=30):
    """(status, headers, body): JSON decoded unless raw (or not JSON)."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    h = dict(headers or {})
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    if data is not None and not any(k.lower() == "content-type" for k in h):
        h["content-type"] = "application/json"
    try:
        conn.request(method, u.path + (f"?{u.query}" if u.query else ""), body=data, headers=h)
        r = conn.getresponse()
        payload = r.read()
    finally:
        conn.close()
    if not raw and payload:
        try:
            payload = json.loads(payload)
        except ValueError:
            pass
    return r.status, r.headers, payload


# --- Durin ---------------------------------------------------------------------------

class Durin:
    """`durin serve` on ephemeral ports, with a fresh SQLite database."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="durin-py-")
        with open(os.path.join(self.dir, "stderr"), "wb") as stderr:
            self.proc = subprocess.Popen(
                [DURIN_BIN, "serve", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
                 "--egress-listen", "127.0.0.1:0", "--egress-allow", "127.0.0.1",
                 "--database", f"sqlite:{self.dir}/durin.db"],
                stdout=subprocess.PIPE, stderr=stderr, env={**os.environ, "DURIN_LOG": "warn"}, text=True)
        _LIVE.append(self.stop)
        try:
            lines = read_lines(self.proc, 3, 20, r"listening on")
            for line in lines:
                url = re.search(r"listening on (http://[0-9.:]+)", line).group(1)
                if line.startswith("durin admin"):
                    self.admin = url
                elif line.startswith("durin egress"):
                    self.egress = url
                else:
                    self.gw = url
        except BaseException:
            self.stop()
            raise

    def stop(self):
        if self.stop in _LIVE:
            _LIVE.remove(self.stop)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def stderr(self):
        with open(os.path.join(self.dir, "stderr"), errors="replace") as f:
            return f.read()

    def register(self, deployment):
        status, _, body = request("POST", f"{self.admin}/v1/deployments", deployment)
        assert status in (200, 201), (status, body)
        return body

    def signing_key(self):
        return request("GET", f"{self.admin}/v1/signing-key")[2]

    def send(self, service, handler, input):
        status, _, body = request("POST", f"{self.gw}/v1/send/{service}/{handler}", input)
        assert status == 202, (status, body)
        return body["invocation_id"]

    def start_workflow(self, workflow, workflow_id, input):
        status, headers, body = request("POST", f"{self.gw}/v1/workflows/{workflow}/{workflow_id}", input)
        assert status == 202, (status, body)
        return body.get("invocation_id") or headers["durin-invocation-id"]

    def invocation(self, inv):
        return request("GET", f"{self.gw}/v1/invocations/{inv}")[2]

    def wait_end(self, inv, timeout=20):
        """The invocation once it has ended (completed, failed, cancelled)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            status, _, body = request("GET", f"{self.gw}/v1/invocations/{inv}",
                                      headers={"prefer": f"wait={max(1, int(deadline - time.time()))}"})
            if status == 200 and body["status"] in ("completed", "failed", "cancelled", "terminated", "continued"):
                return body
        raise AssertionError(f"{inv} did not end in {timeout}s: {self.invocation(inv)}")

    def wait_status(self, inv, statuses, timeout=10):
        deadline = time.time() + timeout
        while time.time() < deadline:
            body = self.invocation(inv)
            if body["status"] in statuses:
                return body
            time.sleep(0.05)
        raise AssertionError(f"{inv} never reached {statuses}: {self.invocation(inv)}")

    def signal(self, inv, name, payload):
        status, _, body = request("POST", f"{self.gw}/v1/invocations/{inv}/signals/{name}", payload)
        assert status < 300, (status, body)

    def update(self, workflow, workflow_id, name, input, key=None, wait=10):
        """Send an update to a workflow's run: (status, headers, body)."""
        headers = {"prefer": f"wait={wait}", **({"idempotency-key": key} if key else {})}
        return request("POST", f"{self.gw}/v1/workflows/{workflow}/{workflow_id}/updates/{name}",
                       input, headers=headers, timeout=wait + 20)

    def cancel(self, inv):
        status, _, body = request("POST", f"{self.gw}/v1/invocations/{inv}/cancel")
        assert status < 300, (status, body)

    def journal(self, inv):
        return request("GET", f"{self.admin}/v1/invocations/{inv}/journal")[2]


def read_lines(proc, count, timeout, pattern):
    """The first `count` stdout lines of `proc` that match `pattern`, within `timeout`."""
    q = queue.Queue()

    def reader():
        for line in proc.stdout:
            q.put(line)
        q.put(None)
    threading.Thread(target=reader, daemon=True).start()
    found, deadline = [], time.time() + timeout
    while len(found) < count:
        try:
            line = q.get(timeout=max(0.01, deadline - time.time()))
        except queue.Empty:
            raise AssertionError(f"no {count} lines matching {pattern!r} in {timeout}s: {found}")
        if line is None:
            raise AssertionError(f"process exited ({proc.wait()}) after {found}")
        if re.search(pattern, line):
            found.append(line.strip())
    return found


def start_process(args, pattern="listening on", env=None):
    """A Python subprocess that prints `... listening on http://...`: (proc, url)."""
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    _LIVE.append(lambda: stop_process(proc))
    try:
        line = read_lines(proc, 1, 15, pattern)[0]
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, re.search(r"(http://[0-9.:]+)", line).group(1)


def stop_process(proc):
    """Kill and reap a process start_process started (again: harmless)."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    if proc.stdout:
        proc.stdout.close()


# --- Downstream ----------------------------------------------------------------------

class Downstream:
    """An HTTP server that records every call (path, Idempotency-Key), answers a key it has
    seen with the same answer (as payment APIs do), and can hold a path's calls until
    `release(path)`."""

    def __init__(self):
        self.lock = threading.Lock()
        self.calls = []            # (path, idempotency key, body)
        self.answers = {}
        self.gates = {}            # path -> threading.Event
        self.arrived = {}          # path -> threading.Event, set when a call arrives
        outer = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                key = self.headers.get("idempotency-key")
                with outer.lock:
                    outer.calls.append((self.path, key, body))
                    outer.arrived.setdefault(self.path, threading.Event()).set()
                    gate = outer.gates.get(self.path)
                if gate is not None:
                    gate.wait(30)
                with outer.lock:
                    answer = outer.answers.setdefault(key or object(), json.dumps(
                        {"path": self.path, "n": len(outer.calls), "id": f"id{len(outer.calls)}",
                         "charge_id": "c1", "reservation_id": "r1"}).encode())
                try:
                    self.send_response(200)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(answer)))
                    self.end_headers()
                    self.wfile.write(answer)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        class S(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, *a):
                pass

        self.server = S(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def hold(self, path):
        with self.lock:
            self.gates[path] = threading.Event()

    def release(self, path):
        with self.lock:
            gate = self.gates.pop(path, None)
        if gate:
            gate.set()

    def wait_arrived(self, path, timeout=15):
        with self.lock:
            event = self.arrived.setdefault(path, threading.Event())
        assert event.wait(timeout), f"no call to {path} in {timeout}s: {self.calls}"

    def count(self, path):
        with self.lock:
            return sum(1 for p, _, _ in self.calls if p == path)

    def keys(self, path):
        with self.lock:
            return [k for p, k, _ in self.calls if p == path]

    def stop(self):
        for path in list(self.gates):
            self.release(path)
        self.server.shutdown()
        self.server.server_close()
