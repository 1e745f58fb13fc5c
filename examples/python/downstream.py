#!/usr/bin/env python3
"""A downstream service of the order example: payment, inventory or email.

Standard library only. Every POST is recorded; the payment role honours Idempotency-Key the
way payment APIs do (the same key gets the same answer and charges once). POST /refund and
/release undo (the order example's compensations). GET /stats tells
what happened, so that tests and people can check that nothing was charged twice.

    python3 downstream.py --role payment --port 9101
"""
import argparse
import json
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOCK = threading.Lock()
STATE = {"requests": 0, "effects": 0, "keys": {}, "answers": {}, "paths": {}}


def make_handler(role, hold_ms, fail_first):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def answer(self, status, body):
            data = json.dumps(body).encode()
            try:
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # The caller is gone; what happened is recorded all the same.

        def do_GET(self):
            if self.path != "/stats":
                return self.answer(404, {"error": "not found"})
            with LOCK:
                self.answer(200, {k: STATE[k] for k in ("requests", "effects", "keys", "paths")})

        def do_POST(self):
            length = int(self.headers.get("content-length") or 0)
            request = json.loads(self.rfile.read(length) or b"{}")
            key = self.headers.get("idempotency-key") or ""
            order_id = request.get("order_id", "?")
            with LOCK:
                STATE["requests"] += 1
                STATE["keys"][key] = STATE["keys"].get(key, 0) + 1
                STATE["paths"][self.path] = STATE["paths"].get(self.path, 0) + 1
                failing = STATE["requests"] <= fail_first
            if failing:
                # An outage: nothing happens, and the caller may try again.
                return self.answer(503, {"error": "temporarily unavailable"})
            with LOCK:
                seen = key in STATE["answers"]
                if not seen:
                    STATE["effects"] += 1
                    if self.path in ("/refund", "/release"):
                        answer = {"undone": self.path[1:], "order_id": order_id}
                    elif role == "payment":
                        answer = {"charge_id": f"charge_{order_id}", "amount_cents": request.get("amount_cents")}
                    elif role == "inventory":
                        answer = {"reservation_id": f"reservation_{order_id}"}
                    else:
                        answer = {"sent": True, "to": request.get("customer_id")}
                    STATE["answers"][key] = answer
                answer = STATE["answers"][key]
            if hold_ms and not seen:
                # The effect happened; the answer is late (a test kills Durin meanwhile).
                time.sleep(hold_ms / 1000)
            self.answer(200, answer)

    return Handler


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # A peer that vanished (a killed Durin) is expected here, not an error to print.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--role", choices=["payment", "inventory", "email"], required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--hold-ms", type=int, default=0, help="delay the first answer for each key")
    parser.add_argument("--fail-first", type=int, default=0, help="answer 503 to the first N requests")
    parser.add_argument("--tls-cert", help="serve HTTPS with this PEM certificate (and --tls-key)")
    parser.add_argument("--tls-key")
    args = parser.parse_args()
    server = Server(("127.0.0.1", args.port), make_handler(args.role, args.hold_ms, args.fail_first))
    scheme = "http"
    if args.tls_cert:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(args.tls_cert, args.tls_key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        scheme = "https"
    print(f"{args.role} listening on {scheme}://127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
