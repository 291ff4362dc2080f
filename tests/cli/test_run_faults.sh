#!/usr/bin/env bash
# Faults on the batch job (issue 24, defect 9): a follower of `mpirun -np 3 epmoe-run` is
#   - killed (SIGKILL): Open MPI ends the job at once and names the rank that died; the
#     surviving ranks say what they were running (they get SIGTERM from the launcher);
#   - stopped (SIGSTOP, a hung node): Open MPI sees nothing; the watchdog ends the wait after
#     collective_timeout_s, a surviving rank asks every other rank whether it is alive and names
#     rank 1 as the one that did not answer, the job exits non-zero.
# Either way no output is written and nothing the test started is left running. The bound on
# each job (timeout) only stops a hang from stalling CI; the assertions are not about time.
# Usage: test_run_faults.sh BIN_DIR WORK_DIR
set -uo pipefail
build=$1 work=$2
here=$(cd "$(dirname "$0")" && pwd)
source "$here/cli_common.sh"

timeout_s=10 # collective_timeout_s of the hung-rank case
"$build/epmoe-gen" --preset tiny --n_layers 4 --out "$work/ckpt" >/dev/null || { echo "gen failed"; exit 1; }
"$build/epmoe-gen" --preset tiny --input-out "$work/in.safetensors" --tokens 16384 --dtype bf16 >/dev/null

job_pid=""
# The ranks of the job writing $1 (their command lines name it; mpirun's environment has no rank).
ranks_of() { pgrep -f -- "--output $1" || true; }
rank_pid() { # OUTPUT RANK -> pid
  local p
  for p in $(ranks_of "$1"); do
    tr '\0' '\n' <"/proc/$p/environ" 2>/dev/null | grep -qx "OMPI_COMM_WORLD_RANK=$2" && { echo "$p"; return; }
  done
}
stop_everything() { # every process this test started, on every path
  local out p
  for out in "$work"/fault_*.safetensors; do
    for p in $(ranks_of "$out"); do kill -CONT "$p" 2>/dev/null; kill -KILL "$p" 2>/dev/null; done
  done
  [ -n "$job_pid" ] && kill -KILL "$job_pid" 2>/dev/null
  return 0
}
trap stop_everything EXIT

# run_with_fault NAME SIGNAL: starts the job, sends SIGNAL to rank 1 once every rank has loaded
# its weights (the first forward runs for seconds after), waits for the job; sets rc and log.
run_with_fault() {
  local name=$1 sig=$2 out="$work/fault_$1.safetensors" victim="" waited=0
  log="$work/log_$name"
  timeout -k 10 240 mpirun -np 3 "$build/epmoe-run" --checkpoint "$work/ckpt" \
    --input "$work/in.safetensors" --output "$out" --collective_timeout_s $timeout_s >"$log" 2>&1 &
  job_pid=$!
  until [ "$(grep -c "backend cpu" "$log")" -ge 3 ] || ! kill -0 $job_pid 2>/dev/null || [ $waited -ge 1200 ]; do
    sleep 0.1; waited=$((waited + 1))
  done
  victim=$(rank_pid "$out" 1)
  if [ -z "$victim" ]; then
    wait $job_pid; rc=$?; job_pid=""
    fail "$name: rank 1 not found (job ended with $rc before the fault): $(tail -3 "$log")"
    return 1
  fi
  local t0=$SECONDS
  kill -s "$sig" "$victim"
  wait $job_pid; rc=$?; job_pid=""
  echo "     ($name: job ended $((SECONDS - t0)) s after SIG$sig to rank 1, exit $rc)"
  [ ! -e "$out" ] && ok "$name: no output written" || fail "$name: an output was written"
  [ -z "$(ranks_of "$out")" ] && ok "$name: no rank left running" || fail "$name: ranks left: $(ranks_of "$out")"
  return 0
}

# ---- a follower killed ----------------------------------------------------------------------------
if run_with_fault killed KILL; then
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && ok "killed: the job ended, exit $rc" || fail "killed: exit $rc"
  grep -q "process rank 1 .*exited on signal 9" "$log" \
    && ok "killed: the launcher names rank 1" || fail "killed: rank 1 not named: $(tail -5 "$log")"
  grep -q "epmoe-run: rank [02]: .*ended by SIGTERM from the launcher" "$log" \
    && ok "killed: a surviving rank says what it was running" \
    || fail "killed: no word from the surviving ranks: $(tail -8 "$log")"
fi

# ---- a follower stopped (hung) ---------------------------------------------------------------------
if run_with_fault stopped STOP; then
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && ok "stopped: the watchdog ended the job, exit $rc" \
    || fail "stopped: exit $rc (124: still hung at the test's bound)"
  grep -q "PEER_LOST: .*collective_timeout_s = $timeout_s" "$log" \
    && ok "stopped: a rank reports the lost peer (PEER_LOST after collective_timeout_s)" \
    || fail "stopped: no PEER_LOST: $(tail -8 "$log")"
  # rank 1 among the silent (on a loaded host a slow live rank could be listed too)
  grep -Eq "epmoe-run: rank [02]: lost peer: rank ([0-9]+, )*1(, [0-9]+)* did not answer" "$log" \
    && ok "stopped: a surviving rank names rank 1" \
    || fail "stopped: rank 1 not named: $(tail -8 "$log")"
fi

echo "$passed passed, $failed failed"
[ $failed -eq 0 ]
