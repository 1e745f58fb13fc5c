# The processes a demo script starts and keeps: sourced by examples/order/demo.sh and
# examples/python/demo.sh after they set `run_dir` (where the pid files go) and `say`.
# `start` runs a process in the background and writes its pid file; `reap` notes and says
# which ended; `still_running` lists the others; Ctrl-C (or the script's end) stops them.

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
