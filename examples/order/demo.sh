#!/usr/bin/env bash
# The set-up of README.md's walk-through: builds durin and the order example, starts the
# order service and Durin with the order service registered (examples/durin.toml), and
# stays in the foreground until Ctrl-C, which stops both. Each order step waits
# STEP_DELAY_MS (default 3000) first, so that there is time to kill things.
#
# Each process id goes to a file, target/demo/order.pid and target/demo/durin.pid, so that
# the walk-through kills what this script started by its id. When one of the two ends (the
# walk-through kills both), the script says so and keeps the other one running; it ends
# once neither runs. What you start again in another terminal is not this script's: stop
# it there.
#
# Addresses: the order service listens on ORDER_LISTEN (default 127.0.0.1:9080, the url
# examples/durin.toml registers: change both together); Durin on DURIN_LISTEN (callers,
# default 127.0.0.1:8080) and DURIN_ADMIN_LISTEN (operators, default 127.0.0.1:9070), which
# durin reads itself. Durin's database is durin.db in the repository's root: it survives
# the script; delete it (rm -f durin.db*) to start from nothing.
set -euo pipefail
cd "$(dirname "$0")/../.."

order_listen=${ORDER_LISTEN:-127.0.0.1:9080}
durin_listen=${DURIN_LISTEN:-127.0.0.1:8080}
admin_listen=${DURIN_ADMIN_LISTEN:-127.0.0.1:9070}
step_delay_ms=${STEP_DELAY_MS:-3000}
run_dir=target/demo

say() { printf 'demo: %s\n' "$*"; }

if ! command -v curl >/dev/null; then
  say "curl is missing: this script and the walk-through need it"
  exit 1
fi

say "building durin and the order example (cargo build; the first time takes a few minutes)..."
cargo build -q -p durin -p order-example
# The process keeping shared with the other demo: start, reap, still_running, stop_all.
source examples/demo-processes.sh
say "starting the order service on http://$order_listen (each step waits $step_delay_ms ms)"
start "the order service" order \
  target/debug/order --listen "$order_listen" --step-delay-ms "$step_delay_ms"
say "starting Durin: callers on http://$durin_listen, operators (admin API, web UI) on" \
  "http://$admin_listen, database durin.db"
start "Durin" durin target/debug/durin serve --config examples/durin.toml
exec 2>/dev/null

# Ready once Durin lists the order service among its deployments (it registers it at start).
auth=()
if [[ -n ${DURIN_ADMIN_TOKEN:-} ]]; then auth=(-H "authorization: Bearer $DURIN_ADMIN_TOKEN"); fi
ready=""
for _ in $(seq 1 300); do
  if curl -sf ${auth[@]+"${auth[@]}"} "http://$admin_listen/v1/deployments" 2>/dev/null |
    grep -q "http://$order_listen"; then
    ready=1
    break
  fi
  if ! reap; then
    say "could not start both (see the messages above: a port in use?); stopping"
    exit 1
  fi
  sleep 0.2
done
if [[ -z $ready ]]; then
  say "Durin has not registered http://$order_listen within 60 s: does the url in" \
    "examples/durin.toml match ORDER_LISTEN? Going on anyway."
fi

say "ready: $(still_running) run; their ids are in $run_dir/order.pid and $run_dir/durin.pid."
say "follow README.md's walk-through in another terminal. Ctrl-C here stops both."

while [[ -n $(still_running) ]]; do
  reap || true
  [[ -z $(still_running) ]] && break
  sleep 0.5
done
say "nothing this script started runs any more, so it ends; what you started in another" \
  "terminal still runs there."
