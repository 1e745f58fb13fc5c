#!/usr/bin/env python3
"""The tutorial's approval workflow, with the durin SDK.

Started once per workflow id (`POST /v1/workflows/approval/req-7` with
`{"request": "req-7", "deadline": "1h"}`), it keeps `is_cancelled`, `status` and
`deadline_ms` where queries read them, then waits for the first of a `cancel` signal, the
deadline, and an `extend` update, holding nothing while it waits:

* `cancel` came first: the request is cancelled;
* the deadline came first: the request is approved;
* `POST /v1/workflows/approval/req-7/updates/extend` with `{"by": "2h"}` moves the deadline
  later and answers `{"deadline_ms": ...}`; an `extend` the validator does not accept (not
  a duration like `30s`, `2h`, `7d`; or more than a year ahead) gets `422`.

Cancelled by an operator (`POST .../cancel`), the wait raises durin.Cancelled: it records
that in its state and ends cancelled.

    python3 examples/approval.py --port 9091 --durin http://127.0.0.1:8080
"""
import argparse
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import durin  # noqa: E402

app = durin.Endpoint()
UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
MAX_AHEAD_MS = 365 * 86_400_000   # Durin's timers go at most a year and a day ahead


def now_ms():
    return int(time.time() * 1000)


def millis(text):
    """`30s`, `2h`, `7d` (a whole number and a unit) in milliseconds; None otherwise."""
    m = re.fullmatch(r"([0-9]{1,12})(ms|s|m|h|d)", text) if isinstance(text, str) else None
    return int(m.group(1)) * UNITS_MS[m.group(2)] if m else None


@app.workflow("approval")
def run(ctx, request):
    ctx.set_state("is_cancelled", False)
    ctx.set_state("status", "waiting for the deadline")
    if not isinstance(request, dict) or millis(request.get("deadline")) is None:
        raise durin.TerminalError(400, 'start with {"request": "...", "deadline": "1h"}')
    # the deadline as a time, fixed once: the clock is read in a step
    deadline = ctx.step("deadline", lambda: now_ms() + millis(request["deadline"]))
    ctx.set_state("deadline_ms", deadline)
    extensions = 0
    try:
        while True:
            won = ctx.first(ctx.signal_member("cancel"),
                            # one timer per deadline: a new deadline is a new timer
                            ctx.sleep_member(f"deadline-{deadline}", wake_at_ms=deadline),
                            # one wait per update: the next one needs another key
                            ctx.update_member("extend", key=f"extend-{extensions}"))
            if won.kind != "update":
                break
            extensions += 1
            update = won.update
            by = millis(update.input.get("by")) if isinstance(update.input, dict) else None
            if by is None:
                update.refuse(422, 'extend with {"by": "2h"}: a whole number of ms, s, m, h or d')
            elif deadline + by - ctx.step(f"extended-at-{extensions}", now_ms) > MAX_AHEAD_MS:
                update.refuse(422, "the deadline would be more than a year away")
            else:
                deadline += by
                ctx.set_state("deadline_ms", deadline)   # before the answer: the caller may query it
                update.answer({"deadline_ms": deadline})
    except durin.Cancelled:
        ctx.set_state("status", "cancelled by an operator")
        raise
    if won.kind == "sleep":
        ctx.set_state("status", "approved")
        return f"request {request['request']} approved"
    ctx.set_state("is_cancelled", True)
    ctx.set_state("status", "cancelled")
    return f"request {request['request']} cancelled: {json.dumps(won.value)}"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=9091)
    parser.add_argument("--durin", default="http://127.0.0.1:8080", help="Durin's gateway")
    parser.add_argument("--egress", help="Durin's egress (unused here)")
    args = parser.parse_args()
    app.configure(durin=args.durin, egress=args.egress)
    app.serve(port=args.port, announce="approval handler")


if __name__ == "__main__":
    main()
