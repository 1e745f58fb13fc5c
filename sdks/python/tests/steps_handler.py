#!/usr/bin/env python3
"""A handler process for the step durability test: every step's function appends its name
to --log; step `b` then waits until the file --go exists (the test kills us meanwhile)."""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import durin  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--port", type=int, default=0)
parser.add_argument("--durin", required=True)
parser.add_argument("--log", required=True)
parser.add_argument("--go", required=True)
ARGS = parser.parse_args()
app = durin.Endpoint(durin=ARGS.durin)


def record(name):
    with open(ARGS.log, "a") as f:
        f.write(name + "\n")
    return name


def slow_b():
    record("b-start")
    while not os.path.exists(ARGS.go):
        time.sleep(0.02)
    return record("b")


@app.handler("k", "steps")
def steps(ctx, input):
    return [ctx.step("a", lambda: record("a")), ctx.step("b", slow_b), ctx.step("c", lambda: record("c"))]


app.serve(port=ARGS.port, announce="steps handler")
