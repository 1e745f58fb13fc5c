#!/usr/bin/env python3
"""The tutorial's order workflow as a plain HTTP handler: no SDK, standard library only.

Durin calls POST /order/process with the order and the headers Durin-Invocation-Id,
Durin-Attempt and Durin-Attempt-Token (the attempt's secret). Every side effect is an
outbound HTTP call sent through Durin's egress (in proxy form, with the three headers), so
Durin journals it: when Durin calls this handler again after a crash, calls that already
happened are answered from the journal and only the missing ones go out. A cancelled order
(Durin calls again with Durin-Cancelled: true) is compensated: release, then refund.

    python3 order_handler.py --port 9080 --egress http://127.0.0.1:8081 \\
        --payment http://127.0.0.1:9101 --inventory http://127.0.0.1:9102 --email http://127.0.0.1:9103
"""
import argparse
import http.client
import json
import sys
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ARGS = None


class DownstreamError(Exception):
    def __init__(self, status, body):
        super().__init__(f"downstream answered {status}: {body[:200]!r}")
        self.status = status


def call(url, body, invocation_id, attempt, token):
    """POST url through the egress, in proxy form (the absolute URL is the request target)."""
    egress = urllib.parse.urlsplit(ARGS.egress)
    connection = http.client.HTTPConnection(egress.hostname, egress.port, timeout=60)
    try:
        connection.request(
            "POST",
            url,
            body=json.dumps(body),
            headers={
                "content-type": "application/json",
                "durin-invocation-id": invocation_id,
                "durin-attempt": attempt,
                # The attempt's secret: the egress carries only calls of the running attempt.
                "durin-attempt-token": token,
            },
        )
        response = connection.getresponse()
        data = response.read()
    finally:
        connection.close()
    if response.status >= 300:
        raise DownstreamError(response.status, data)
    return json.loads(data)


def process(order, invocation_id, attempt, token):
    def step(url, body):
        time.sleep(ARGS.step_delay_ms / 1000)
        return call(url, body, invocation_id, attempt, token)

    charge_request = {"order_id": order["order_id"], "amount_cents": order["amount_cents"]}
    if ARGS.charge_note:
        charge_request["note"] = ARGS.charge_note
    charge = step(ARGS.payment + "/charge", charge_request)
    reservation = step(ARGS.inventory + "/reserve", {"order_id": order["order_id"]})
    step(ARGS.email + "/send", {"order_id": order["order_id"], "customer_id": order["customer_id"]})
    return f"order {order['order_id']} complete charge {charge['charge_id']} reservation {reservation['reservation_id']}"


def compensate(order, invocation_id, attempt, token):
    """The saga's other half, after a cancellation: undo what may have started, newest
    first. Each undo goes through the egress too (journaled, answered from the journal on a
    retry) and is harmless when there is nothing to undo."""
    call(ARGS.inventory + "/release", {"order_id": order["order_id"]}, invocation_id, attempt, token)
    call(ARGS.payment + "/refund", {"order_id": order["order_id"], "amount_cents": order["amount_cents"]},
         invocation_id, attempt, token)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, status, body, content_type="application/json"):
        data = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            # The Durin that called us is gone; it (or its successor) will call again.
            pass

    def do_POST(self):
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length)
        if self.path != "/order/process":
            return self.answer(404, {"title": "no such handler"}, "application/problem+json")
        try:
            order = json.loads(body)
            order["order_id"], order["customer_id"], int(order["amount_cents"])
        except (ValueError, KeyError, TypeError) as error:
            # 4xx: a terminal failure; Durin does not retry it.
            return self.answer(422, {"title": "invalid order", "status": 422, "detail": str(error)},
                               "application/problem+json")
        ids = (self.headers["durin-invocation-id"], self.headers["durin-attempt"],
               self.headers["durin-attempt-token"])
        if self.headers.get("durin-cancelled") == "true":
            # Someone cancelled the order (POST /v1/invocations/{id}/cancel): compensate, then
            # answer a 4xx, which ends the invocation as cancelled.
            try:
                compensate(order, *ids)
            except (DownstreamError, OSError) as error:
                # Not undone yet: a 5xx makes Durin try again.
                return self.answer(503, {"title": "compensation failed", "status": 503, "detail": str(error)},
                                   "application/problem+json")
            return self.answer(409, {"title": "order cancelled", "status": 409,
                                     "detail": f"order {order['order_id']} was cancelled and compensated"},
                               "application/problem+json")
        try:
            output = process(order, *ids)
        except DownstreamError as error:
            # A refusal (4xx) is final; anything else is worth another attempt (5xx).
            status = 422 if 400 <= error.status < 500 else 503
            return self.answer(status, {"title": "downstream failed", "status": status, "detail": str(error)},
                               "application/problem+json")
        except OSError as error:
            return self.answer(503, {"title": "egress unreachable", "status": 503, "detail": str(error)},
                               "application/problem+json")
        self.answer(200, output)


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # A peer that vanished (a killed Durin) is expected here, not an error to print.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


def main():
    global ARGS
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=9080)
    parser.add_argument("--egress", required=True, help="Durin's egress, e.g. http://127.0.0.1:8081")
    parser.add_argument("--payment", required=True)
    parser.add_argument("--inventory", required=True)
    parser.add_argument("--email", required=True)
    parser.add_argument("--step-delay-ms", type=int, default=0)
    parser.add_argument("--charge-note", default="", help="added to the charge request (changing it "
                        "between attempts shows Durin's non-determinism check)")
    ARGS = parser.parse_args()
    server = Server(("127.0.0.1", ARGS.port), Handler)
    print(f"order handler listening on http://127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
