#!/usr/bin/env bash
# deploy/slurm/*.sbatch under a real Slurm (ctest label `slurm`): a one-host cluster started by
# this test as its own processes (munged, slurmctld, slurmd, with a slurm.conf generated under
# WORK_DIR and ports of their own), then
#   - batch.sbatch through sbatch --wait: its output bit-identical to epmoe-run under mpirun;
#   - serve.sbatch through sbatch: the service answers epmoe-client with the rows epmoe-run
#     computes, and scancel (SIGTERM) drains and ends it;
# and everything it started is stopped on every path (trap). Installs Debian's slurmctld,
# slurmd, slurm-client and munge when missing (root with apt-get, as on CI); where it cannot
# (no root, no apt, no pmix plugin) it exits 77, which ctest reports as skipped, saying why.
# Usage: test_slurm.sh SOURCE_DIR BIN_DIR PYTHON WORK_DIR
set -uo pipefail
src=$1 bin=$2 py=$3 work=$4
SKIP=77
export PATH="$PATH:/usr/sbin:/sbin"
rm -rf "$work" && mkdir -p "$work"
skip() { echo "SKIPPED: Slurm suite (tests/slurm): $*"; exit $SKIP; }
passed=0 failed=0
ok()   { echo "ok   $1"; passed=$((passed + 1)); }
fail() { echo "FAIL $1"; failed=$((failed + 1)); }

# ---- Slurm and munge, installed if missing -------------------------------------------------------
tools=(slurmctld slurmd srun sbatch squeue scancel scontrol sinfo munged mungekey)
have_tools() { local t; for t in "${tools[@]}"; do command -v "$t" >/dev/null || return 1; done; }
if ! have_tools; then
  [ "$(id -u)" -eq 0 ] || skip "slurm-wlm and munge are not installed and this is not root (apt-get install slurmctld slurmd slurm-client munge)"
  command -v apt-get >/dev/null || skip "slurm-wlm and munge are not installed and there is no apt-get"
  echo "installing slurmctld slurmd slurm-client munge (apt-get; log in $work/apt.log)"
  export DEBIAN_FRONTEND=noninteractive
  pkgs=(slurmctld slurmd slurm-client munge)
  apt-get install -y -q --no-install-recommends "${pkgs[@]}" >"$work/apt.log" 2>&1 ||
    { apt-get update -q >>"$work/apt.log" 2>&1 && apt-get install -y -q --no-install-recommends "${pkgs[@]}" >>"$work/apt.log" 2>&1; } ||
    skip "apt-get install ${pkgs[*]} failed: $(tail -2 "$work/apt.log" | tr '\n' ' ')"
  have_tools || skip "installed, but still missing one of: ${tools[*]}"
fi

# ---- the cluster: our own munged, slurmctld, slurmd ----------------------------------------------
pids=()
stop_everything() { # on every path: jobs first (their steps), then the daemons, by pid
  if [ -n "${SLURM_CONF:-}" ] && [ -n "${ctld_pid:-}" ] && kill -0 "$ctld_pid" 2>/dev/null; then
    local jobs
    jobs=$(squeue -h -o %i 2>/dev/null)
    if [ -n "$jobs" ]; then
      scancel $jobs 2>/dev/null
      for _ in $(seq 1 40); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.5; done
    fi
  fi
  local p
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
  for _ in $(seq 1 20); do
    local alive=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ $alive -eq 0 ] && break
    sleep 0.25
  done
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null; done
  # a step daemon outliving slurmd (it never should once the jobs are gone)
  for p in $(pgrep -f "slurmstepd: \[" 2>/dev/null); do
    grep -qF "$work" "/proc/$p/environ" 2>/dev/null && kill -KILL "$p" 2>/dev/null
  done
  return 0
}
trap stop_everything EXIT

free_port() { "$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ctld_port=$(free_port) slurmd_port=$(free_port)
while [ "$slurmd_port" = "$ctld_port" ]; do slurmd_port=$(free_port); done

mkdir -p "$work/state" "$work/spool" "$work/jobs"
mungekey --create --keyfile="$work/munge.key" >/dev/null 2>&1 || dd if=/dev/urandom of="$work/munge.key" bs=1 count=1024 2>/dev/null
chmod 600 "$work/munge.key"
munged -F -f --socket="$work/munge.sock" --key-file="$work/munge.key" --pid-file="$work/munged.pid" \
  --log-file="$work/munged.log" --seed-file="$work/munged.seed" >"$work/munged.out" 2>&1 &
pids+=($!)
for _ in $(seq 1 40); do [ -S "$work/munge.sock" ] && break; sleep 0.25; done
[ -S "$work/munge.sock" ] || { echo "munged did not start: $(tail -3 "$work/munged.out")"; exit 1; }

# The node claims 8 CPUs (config_overrides) so that 4 ranks fit on a 2-core CI machine;
# proctrack/linuxproc and task/none need no cgroups (containers).
cat >"$work/slurm.conf" <<EOF
ClusterName=epmoetest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=$(id -un)
SlurmdUser=$(id -un)
AuthType=auth/munge
AuthInfo=socket=$work/munge.sock
CredType=cred/munge
StateSaveLocation=$work/state
SlurmdSpoolDir=$work/spool
SlurmctldPidFile=$work/slurmctld.pid
SlurmdPidFile=$work/slurmd.pid
SlurmctldLogFile=$work/slurmctld.log
SlurmdLogFile=$work/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=10
InactiveLimit=0
MinJobAge=300
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
NodeName=epmoenode NodeHostname=localhost NodeAddr=127.0.0.1 CPUs=8 RealMemory=1000 State=UNKNOWN
PartitionName=epmoe Nodes=epmoenode Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
export SLURM_CONF="$work/slurm.conf"
slurmctld -D -i -f "$SLURM_CONF" >"$work/slurmctld.out" 2>&1 &
ctld_pid=$!
pids+=($ctld_pid)
slurmd -D -N epmoenode -f "$SLURM_CONF" >"$work/slurmd.out" 2>&1 &
pids+=($!)
state=""
for _ in $(seq 1 120); do
  state=$(sinfo -h -o %T 2>/dev/null | head -1)
  [ "$state" = idle ] && break
  sleep 0.5
done
[ "$state" = idle ] && ok "one-host Slurm up (slurmctld :$ctld_port, slurmd :$slurmd_port, node idle)" \
  || { fail "the node did not come up (state '$state'): $(tail -3 "$work/slurmctld.out" "$work/slurmd.out")"; exit 1; }

srun --mpi=list 2>&1 | grep -qw pmix || skip "Slurm has no pmix MPI plugin (srun --mpi=list: $(srun --mpi=list 2>&1 | tr '\n' ' '))"

# ---- the batch job -------------------------------------------------------------------------------
source "$src/deploy/mpi-env.sh"
"$bin/epmoe-gen" --preset tiny --n_layers 2 --out "$work/ckpt" >/dev/null || { echo "gen failed"; exit 1; }
"$bin/epmoe-gen" --preset tiny --input-out "$work/in.safetensors" --tokens 300 --dtype bf16 >/dev/null
mpirun -np 4 "$bin/epmoe-run" --checkpoint "$work/ckpt" --input "$work/in.safetensors" \
  --output "$work/mpirun_out.safetensors" --quiet >"$work/mpirun.log" 2>&1 \
  || { echo "epmoe-run under mpirun failed: $(tail -3 "$work/mpirun.log")"; exit 1; }

cd "$src" # the scripts run from the submit directory (the repository root)
timeout -k 10 300 sbatch --wait --ntasks=4 --cpus-per-task=1 --output="$work/jobs/batch-%j.out" \
  --export=ALL,CKPT="$work/ckpt",IN="$work/in.safetensors",OUT="$work/slurm_out.safetensors",EPMOE_BIN="$bin" \
  deploy/slurm/batch.sbatch >"$work/sbatch_batch.log" 2>&1
rc=$?
[ $rc -eq 0 ] && ok "batch.sbatch: sbatch --wait exit 0 (4 tasks, srun --mpi=pmix)" \
  || fail "batch.sbatch: exit $rc: $(cat "$work/sbatch_batch.log"; tail -5 "$work"/jobs/batch-*.out 2>/dev/null)"
grep -q "on 4 ranks" "$work"/jobs/batch-*.out 2>/dev/null && ok "batch.sbatch: epmoe-run ran on 4 ranks" \
  || fail "batch.sbatch: not 4 ranks: $(tail -5 "$work"/jobs/batch-*.out 2>/dev/null)"
cmp -s "$work/mpirun_out.safetensors" "$work/slurm_out.safetensors" \
  && ok "batch.sbatch: output bit-identical to epmoe-run under mpirun" \
  || fail "batch.sbatch: output differs from (or is missing next to) epmoe-run under mpirun"

# ---- the service ---------------------------------------------------------------------------------
if [ -x "$bin/epmoe-serve" ] && [ -x "$bin/epmoe-client" ]; then
  port=$(free_port) metrics_port=$(free_port)
  job=$(sbatch --parsable --ntasks=2 --cpus-per-task=1 --output="$work/jobs/serve-%j.out" \
          --export=ALL,CKPT="$work/ckpt",LISTEN=127.0.0.1:$port,METRICS_LISTEN=127.0.0.1:$metrics_port,EPMOE_BIN="$bin" \
          deploy/slurm/serve.sbatch 2>"$work/sbatch_serve.log")
  serving=0
  for _ in $(seq 1 240); do
    [ -n "$job" ] && [ -n "$(squeue -h -j "$job" -o %i 2>/dev/null)" ] || break
    "$bin/epmoe-client" --server 127.0.0.1:$port --health --timeout 2 >/dev/null 2>&1 && { serving=1; break; }
    sleep 0.5
  done
  [ $serving -eq 1 ] && ok "serve.sbatch: job $job serving on 127.0.0.1:$port" \
    || fail "serve.sbatch: not serving: $(cat "$work/sbatch_serve.log"; tail -5 "$work"/jobs/serve-*.out 2>/dev/null)"
  if [ $serving -eq 1 ]; then
    "$bin/epmoe-client" --server 127.0.0.1:$port --input "$work/in.safetensors" \
      --output "$work/service_out.safetensors" --timeout 120 >"$work/client.log" 2>&1 \
      && "$py" - "$work/mpirun_out.safetensors" "$work/service_out.safetensors" <<'EOF' \
      && ok "serve.sbatch: the service's rows bit-identical to epmoe-run's" \
      || fail "serve.sbatch: the service's answer differs: $(tail -3 "$work/client.log")"
import sys
sys.path.insert(0, __import__("os").environ["EPMOE_SOURCE_DIR"] + "/tests/cli")
from st_write import read
a, b = read(sys.argv[1])["hidden_states"], read(sys.argv[2])["hidden_states"]
same = a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()
print(f"epmoe-run {a.dtype}{list(a.shape)} vs service {b.dtype}{list(b.shape)}: {'identical' if same else 'DIFFERENT'}")
sys.exit(0 if same else 1)
EOF
  fi
  if [ -n "$job" ]; then
    scancel "$job" # SIGTERM: the service drains and exits
    ended=0
    for _ in $(seq 1 120); do
      [ -z "$(squeue -h -j "$job" -o %i 2>/dev/null)" ] && { ended=1; break; }
      sleep 0.5
    done
    [ $ended -eq 1 ] && ok "serve.sbatch: scancel ended the job ($(scontrol show job "$job" 2>/dev/null | grep -o 'JobState=[A-Z]*'))" \
      || fail "serve.sbatch: job $job still running after scancel"
  fi
else
  echo "SKIPPED: serve.sbatch part (epmoe-serve/epmoe-client not built: no gRPC)"
fi

echo "$passed passed, $failed failed"
[ $failed -eq 0 ]
