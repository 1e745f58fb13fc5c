#!/usr/bin/env bash
# Starts the payment, inventory and email services, the Python order handler (each call
# waits STEP_DELAY_MS, default 3000) and Durin with its egress. Ctrl-C stops them all.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here/../.."
cargo build -q -p durin
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
python3 "$here/downstream.py" --role payment --port 9101 & pids+=($!)
python3 "$here/downstream.py" --role inventory --port 9102 & pids+=($!)
python3 "$here/downstream.py" --role email --port 9103 & pids+=($!)
python3 "$here/order_handler.py" --port 9090 --egress http://127.0.0.1:8081 \
  --payment http://127.0.0.1:9101 --inventory http://127.0.0.1:9102 --email http://127.0.0.1:9103 \
  --step-delay-ms "${STEP_DELAY_MS:-3000}" & pids+=($!)
target/debug/durin serve --config examples/python/durin.toml
