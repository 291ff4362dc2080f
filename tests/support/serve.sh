# Start epmoe-serve in the background and wait until it is ready; stop it so that it drains.
# Sourced by the test and benchmark scripts that talk to a live service (one place for the
# launch, the wait and the shutdown, so none of them can hang on a server that died or hung).
#
#   serve_start READY_FILE LOG TIMEOUT_S COMMAND...
#       runs COMMAND (an mpirun of epmoe-serve given --ready-file READY_FILE) with its output in
#       LOG; returns 0 once READY_FILE exists, with serve_pid (the launcher), serve_port and
#       serve_rank0 (the pid that drains on SIGTERM) set. Returns 1 if the server exited or was
#       not ready within TIMEOUT_S seconds; it is then stopped and waited for.
#   serve_stop
#       SIGTERM to rank 0 (the service finishes its requests and every rank exits), then waits;
#       returns the launcher's exit status.
# The ready file is written by rename, so it is never seen half written.

serve_start() {
  local ready=$1 log=$2 timeout_s=$3
  shift 3
  rm -f "$ready"
  serve_port='' serve_rank0=''
  "$@" >"$log" 2>&1 &
  serve_pid=$!
  local deadline=$(($(date +%s) + timeout_s))
  while [ ! -e "$ready" ]; do
    if ! kill -0 "$serve_pid" 2>/dev/null || [ "$(date +%s)" -ge "$deadline" ]; then
      kill -TERM "$serve_pid" 2>/dev/null
      wait "$serve_pid" 2>/dev/null
      return 1
    fi
    sleep 0.1
  done
  read -r serve_port _ serve_rank0 <"$ready"
}

serve_stop() {
  [ -n "${serve_rank0:-}" ] && kill -TERM "$serve_rank0" 2>/dev/null
  wait "$serve_pid"
}
