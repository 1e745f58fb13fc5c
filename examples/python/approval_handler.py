#!/usr/bin/env python3
"""The tutorial's approval workflow as a plain HTTP handler: no SDK, standard library only.

Durin runs it as the workflow `approval` (handler `run`), once per workflow id:

    curl -X POST localhost:8080/v1/workflows/approval/req-7 -d '{"request": "req-7", "deadline": "1h"}'

It keeps its state where queries read it (`is_cancelled`, `status`), then waits for a
`cancel` signal with the deadline as a durable timer. Waiting is a call to Durin's context
API: while the result has not arrived, Durin answers 409 with `Durin-Suspended: true`, this
handler stops, and the workflow holds nothing (no connection, no thread) until the signal
or the deadline; then Durin calls the handler again from the top, and every context call up
to there answers from the journal. Cancelled (`POST /v1/workflows/approval/req-7/cancel`),
its wait answers the `cancelled` problem and it ends cancelled.

    python3 approval_handler.py --port 9091
"""
import argparse
import http.client
import json
import sys
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Suspended(Exception):
    """Durin suspended this attempt: stop; Durin calls again when the result is there."""


class Cancelled(Exception):
    """Someone cancelled the workflow (POST .../cancel) before the wait's result arrived."""


class Context:
    """The calls of one attempt on Durin's context API, with the attempt's secret token."""

    def __init__(self, headers):
        self.invocation_id = headers["durin-invocation-id"]
        self.attempt = headers["durin-attempt"]
        self.token = headers["durin-attempt-token"]
        # Durin's address as it reached us; a real deployment would configure it.
        self.durin = urllib.parse.urlsplit(ARGS.durin)

    def call(self, method, path, body=None):
        connection = http.client.HTTPConnection(self.durin.hostname, self.durin.port, timeout=60)
        try:
            connection.request(
                method,
                f"/v1/contexts/{self.invocation_id}/{path}",
                body=None if body is None else json.dumps(body),
                headers={
                    "content-type": "application/json",
                    "durin-attempt": self.attempt,
                    "durin-attempt-token": self.token,
                },
            )
            response = connection.getresponse()
            data = response.read()
        finally:
            connection.close()
        if response.getheader("durin-suspended") == "true":
            raise Suspended()
        if response.status == 409 and b"urn:durin:problem:cancelled" in data:
            raise Cancelled()
        if response.status >= 300:
            raise RuntimeError(f"{method} {path}: Durin answered {response.status}: {data[:300]!r}")
        return response.status, (json.loads(data) if data else None)

    def set(self, key, value):
        self.call("PUT", f"state/{key}", value)

    def wait_signal(self, name, timeout):
        """The payload of the next signal `name`, or None when `timeout` passed first."""
        status, payload = self.call("POST", f"signals/{name}?timeout={urllib.parse.quote(timeout)}")
        return None if status == 204 else payload


def run(ctx, request):
    ctx.set("is_cancelled", False)
    ctx.set("status", "waiting for the deadline")
    reason = ctx.wait_signal("cancel", timeout=request["deadline"])
    if reason is not None:
        ctx.set("is_cancelled", True)
        ctx.set("status", "cancelled")
        return f"request {request['request']} cancelled: {json.dumps(reason)}"
    ctx.set("status", "approved")
    return f"request {request['request']} approved"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, status, body, content_type="application/json", headers=()):
        data = json.dumps(body).encode()
        try:
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_POST(self):
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length)
        if self.path != "/approval/run":
            return self.answer(404, {"title": "no such handler"}, "application/problem+json")
        try:
            request = json.loads(body)
            str(request["request"]), str(request["deadline"])
        except (ValueError, KeyError, TypeError) as error:
            return self.answer(422, {"title": "invalid request", "status": 422, "detail": str(error)},
                               "application/problem+json")
        try:
            output = run(Context(self.headers), request)
        except Suspended:
            # The documented answer of a suspended attempt: Durin logs it as a suspension.
            return self.answer(202, None, headers=[("durin-suspended", "true")])
        except Cancelled:
            # Nothing to undo here; a 4xx after a cancellation ends the workflow cancelled.
            return self.answer(409, {"title": "cancelled", "status": 409}, "application/problem+json")
        except (OSError, RuntimeError) as error:
            return self.answer(503, {"title": "Durin unreachable", "status": 503, "detail": str(error)},
                               "application/problem+json")
        self.answer(200, output)


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


ARGS = None


def main():
    global ARGS
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=9091)
    parser.add_argument("--durin", default="http://127.0.0.1:8080", help="Durin's address")
    ARGS = parser.parse_args()
    server = Server(("127.0.0.1", ARGS.port), Handler)
    print(f"approval handler listening on http://127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
