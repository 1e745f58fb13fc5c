#!/usr/bin/env bash
# Starts the order example (each step waits STEP_DELAY_MS, default 3000, so that there is
# time to kill things) and Durin with the order service registered. Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build -q -p durin -p order-example
target/debug/order --listen 127.0.0.1:9080 --step-delay-ms "${STEP_DELAY_MS:-3000}" &
order_pid=$!
trap 'kill $order_pid 2>/dev/null || true' EXIT
target/debug/durin serve --config examples/durin.toml
