#!/usr/bin/env python3
"""Runs a handler script unchanged, with what it does counted: `counting.py LOG SCRIPT
ARGS...` runs `SCRIPT ARGS...` as its `__main__` and appends one line to LOG for each
request Durin sends it (`request replay=true` on a replay, `request replay=false`
otherwise) and each `ctx.step` body that runs (`step NAME`). A test reads LOG to see that a
replay reached the handler and ran no step body again."""
import os
import runpy
import sys
import threading

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import durin  # noqa: E402  (the same module the script imports)

LOG, SCRIPT = sys.argv[1], sys.argv[2]
LOCK = threading.Lock()


def note(line):
    with LOCK, open(LOG, "a") as f:
        f.write(line + "\n")


handle, step = durin.Endpoint.handle, durin.Context.step


def counted_handle(self, method, path, headers, body):
    pairs = list(headers.items() if hasattr(headers, "items") else headers)
    replay = any(k.lower() == "durin-replay" and v == "true" for k, v in pairs)
    note(f"request replay={str(replay).lower()}")
    return handle(self, method, path, pairs, body)


def counted_step(self, name, fn):
    def body():
        note(f"step {name}")
        return fn()
    return step(self, name, body)


durin.Endpoint.handle, durin.Context.step = counted_handle, counted_step
sys.argv = sys.argv[2:]
runpy.run_path(SCRIPT, run_name="__main__")
