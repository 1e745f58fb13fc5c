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
mkdir -p "$run_dir"

# The processes this script started: a label, a pid file name, the command, and the pid
# (emptied once the process has ended).
labels=() files=() commands=() pids=()

# start LABEL FILE COMMAND...: runs COMMAND in the background and writes its pid to FILE.
start() {
  local label=$1 file=$2
  shift 2
  "$@" 2>&3 &
  labels+=("$label")
  files+=("$file")
  commands+=("$*")
  pids+=("$!")
  echo "$!" >"$run_dir/$file.pid"
}

# What an exit status means: "exit status N" or "killed by SIGNAME".
how() {
  if (($1 > 128)); then
    echo "killed by SIG$(kill -l $(($1 - 128)) 2>/dev/null || echo "nal $(($1 - 128))")"
  else
    echo "exit status $1"
  fi
}

# The processes still running, as "the order service (pid N), ..." (empty when none).
still_running() {
  local i out=""
  for i in "${!pids[@]}"; do
    [[ -n ${pids[$i]} ]] && out+="${out:+, }${labels[$i]} (pid ${pids[$i]})"
  done
  echo "$out"
}

# On the way out (Ctrl-C, or a failure): stop what still runs and wait for it.
stop_all() {
  local i pid
  for i in "${!pids[@]}"; do
    pid=${pids[$i]}
    [[ -z $pid ]] && continue
    kill "$pid" 2>/dev/null || true
  done
  for i in "${!pids[@]}"; do
    pid=${pids[$i]}
    [[ -z $pid ]] && continue
    wait "$pid" 2>/dev/null || true
    rm -f "$run_dir/${files[$i]}.pid"
    pids[$i]=""
  done
}
trap stop_all EXIT
trap 'echo; say "stopping $(still_running)..."; stop_all; say "stopped"; exit 0' INT TERM

# Notes the processes that have ended since the last look; fails when one had.
reap() {
  local i pid status ended=0
  for i in "${!pids[@]}"; do
    pid=${pids[$i]}
    [[ -z $pid ]] && continue
    kill -0 "$pid" 2>/dev/null && continue
    status=0
    wait "$pid" 2>/dev/null || status=$?
    pids[$i]=""
    rm -f "$run_dir/${files[$i]}.pid"
    ended=1
    say "${labels[$i]} (pid $pid) has ended: $(how "$status")."
    if [[ -n $(still_running) ]]; then
      say "still running: $(still_running)."
      say "to start ${labels[$i]} again, in another terminal: ${commands[$i]} &"
    fi
  done
  return $ended
}

# The children write to the terminal's stderr (fd 3); the script's own stderr goes nowhere
# once they run, so that bash's note of a killed child ("line N: PID Killed") does not
# repeat what the script says about it in its words.
exec 3>&2
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
