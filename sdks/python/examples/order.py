#!/usr/bin/env python3
"""The tutorial's order, with the durin SDK.

`order/process` charges, reserves and emails through Durin's egress: each call is
journaled, so after a crash the calls already made are answered from the journal and only
the missing ones go out (with the same Idempotency-Key). A cancelled order is compensated
(release, then refund) and ends cancelled. `order/process3` does three `ctx.step`s and no
egress (a benchmark of the SDK's own cost).

    python3 examples/order.py --port 9080 --durin http://127.0.0.1:8080 --egress http://127.0.0.1:8081 \\
        --payment http://127.0.0.1:9101 --inventory http://127.0.0.1:9102 --email http://127.0.0.1:9103
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import durin  # noqa: E402

ARGS = None
app = durin.Endpoint()


def post(ctx, url, body):
    return ctx.http("POST", url, json=body).raise_for_status().json()


@app.handler("order", "process")
def process(ctx, order):
    if ctx.cancelled:  # someone cancelled the order: undo, newest first, then end cancelled
        post(ctx, ARGS.inventory + "/release", {"order_id": order["order_id"]})
        post(ctx, ARGS.payment + "/refund", {"order_id": order["order_id"], "amount_cents": order["amount_cents"]})
        raise durin.Cancelled(f"order {order['order_id']} was cancelled and compensated")
    charge = post(ctx, ARGS.payment + "/charge", {"order_id": order["order_id"], "amount_cents": order["amount_cents"]})
    reservation = post(ctx, ARGS.inventory + "/reserve", {"order_id": order["order_id"]})
    post(ctx, ARGS.email + "/send", {"order_id": order["order_id"], "customer_id": order["customer_id"]})
    return (f"order {order['order_id']} complete charge {charge['charge_id']} "
            f"reservation {reservation['reservation_id']}")


@app.handler("order", "process3")
def process3(ctx, order):
    charge = ctx.step("charge", lambda: {"charge_id": f"charge_{order['order_id']}"})
    reservation = ctx.step("reserve", lambda: {"reservation_id": f"reservation_{order['order_id']}"})
    ctx.step("email", lambda: {"sent": True})
    return (f"order {order['order_id']} complete charge {charge['charge_id']} "
            f"reservation {reservation['reservation_id']}")


def main():
    global ARGS
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=9080)
    parser.add_argument("--durin", default="http://127.0.0.1:8080", help="Durin's gateway")
    parser.add_argument("--egress", default="http://127.0.0.1:8081", help="Durin's egress")
    parser.add_argument("--payment", default="http://127.0.0.1:9101")
    parser.add_argument("--inventory", default="http://127.0.0.1:9102")
    parser.add_argument("--email", default="http://127.0.0.1:9103")
    parser.add_argument("--verify-key", help="Durin's public key (base64): check signatures")
    ARGS = parser.parse_args()
    app.configure(durin=ARGS.durin, egress=ARGS.egress, verify_key=ARGS.verify_key)
    app.serve(port=ARGS.port, announce="order handler")


if __name__ == "__main__":
    main()
