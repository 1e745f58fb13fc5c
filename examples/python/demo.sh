#!/usr/bin/env bash
# The set-up of docs/without-sdk.md: builds durin, starts the payment, inventory and email
# services (127.0.0.1:9101, 9102, 9103), the Python order handler (127.0.0.1:9090; each
# call waits STEP_DELAY_MS, default 3000) and Durin (callers 127.0.0.1:8080, operators
# 127.0.0.1:9070, its egress 127.0.0.1:8081) with the handler declared inline
# (examples/python/durin.toml), and stays in the foreground until Ctrl-C, which stops them
# all. Uses the same ports as examples/order/demo.sh: run one of the two at a time.
#
# Each process id goes to a file in target/demo-python/ (payment.pid, inventory.pid,
# email.pid, order_handler.pid, durin.pid), so that the tutorial kills the handler by its
# id. When one ends, the script says so and keeps the others running; it ends once none
# runs. What you start again in another terminal is not this script's: stop it there.
# Durin's database is durin-plain.db in the repository's root (rm -f durin-plain.db* to
# start from nothing).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here/../.."

step_delay_ms=${STEP_DELAY_MS:-3000}
admin_listen=${DURIN_ADMIN_LISTEN:-127.0.0.1:9070}
run_dir=target/demo-python

say() { printf 'demo: %s\n' "$*"; }

for tool in curl python3; do
  if ! command -v "$tool" >/dev/null; then
    say "$tool is missing: this script needs it"
    exit 1
  fi
done

say "building durin (cargo build; the first time takes a few minutes)..."
cargo build -q -p durin
# The process keeping shared with the other demo: start, reap, still_running, stop_all.
source examples/demo-processes.sh
say "starting the payment, inventory and email services on 127.0.0.1:9101, 9102 and 9103"
start "the payment service" payment python3 examples/python/downstream.py --role payment --port 9101
start "the inventory service" inventory \
  python3 examples/python/downstream.py --role inventory --port 9102
start "the email service" email python3 examples/python/downstream.py --role email --port 9103
say "starting the Python order handler on http://127.0.0.1:9090 (each call waits $step_delay_ms ms)"
start "the order handler" order_handler \
  python3 examples/python/order_handler.py --port 9090 --egress http://127.0.0.1:8081 \
  --payment http://127.0.0.1:9101 --inventory http://127.0.0.1:9102 \
  --email http://127.0.0.1:9103 --step-delay-ms "$step_delay_ms"
say "starting Durin: callers on http://127.0.0.1:8080, operators on http://$admin_listen," \
  "its egress on http://127.0.0.1:8081, database durin-plain.db"
start "Durin" durin target/debug/durin serve --config examples/python/durin.toml
exec 2>/dev/null

# Ready once Durin lists the handler among its deployments (it declares it at start).
auth=()
if [[ -n ${DURIN_ADMIN_TOKEN:-} ]]; then auth=(-H "authorization: Bearer $DURIN_ADMIN_TOKEN"); fi
ready=""
for _ in $(seq 1 300); do
  if curl -sf ${auth[@]+"${auth[@]}"} "http://$admin_listen/v1/deployments" 2>/dev/null |
    grep -q "http://127.0.0.1:9090"; then
    ready=1
    break
  fi
  if ! reap; then
    say "could not start them all (see the messages above: a port in use?); stopping"
    exit 1
  fi
  sleep 0.2
done
if [[ -z $ready ]]; then
  say "Durin has not registered the handler within 60 s; going on anyway."
fi

say "ready: $(still_running) run; their ids are in $run_dir/."
say "follow docs/without-sdk.md in another terminal. Ctrl-C here stops them all."

while [[ -n $(still_running) ]]; do
  reap || true
  [[ -z $(still_running) ]] && break
  sleep 0.5
done
say "nothing this script started runs any more, so it ends; what you started in another" \
  "terminal still runs there."
