#!/usr/bin/env bash
# Builds and runs the expert-parallel GPU suite (tests/gpu/test_gpu_engine.cu) under mpirun with
# P = 1, 2, 3, 4 ranks on however many GPUs the machine has, on the tiny preset and on
# gpt-oss-tiny (ranks share GPUs round-robin: NCCL
# when every rank has its own GPU, mpi-staged otherwise, both with 1 rank), then the watchdog
# demonstration (2 ranks: rank 1 hangs, or exits, after a good forward; rank 0 must report the
# timeout within collective_timeout_s and the job must exit non-zero), then a short a2a_bench.
#   bash deploy/gpu-mpi-test.sh
# Needs what deploy/gpu-test.sh needs, and NCCL for the nccl transport (deploy/gpu-env.sh finds
# it); 2+ GPUs for NCCL between GPUs. Logs go to $OUT (default ./out): build.log, tests.log
# (P = 1..4, one after the other), watchdog.log, a2a_bench.log, summary.txt. Exit status non-zero if the build or a suite
# run failed, or if the hang demonstration did not show the watchdog firing.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
BUILD="${EPMOE_GPU_BUILD_DIR:-build-mpi-device}"
ARCHS="${EPMOE_CUDA_ARCHS:-90a}"
source deploy/gpu-env.sh
t_start=$(date +%s)
{
  echo "== $(date -u) on $(hostname)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
  nvcc --version | tail -1
  mpirun --version | head -1
} 2>&1 | tee "$OUT/summary.txt"

echo "NCCL_ROOT hint: ${EPMOE_NCCL_ROOT:-(CUDA toolkit)}" | tee -a "$OUT/summary.txt"

if ! { cmake -S . -B "$BUILD" -DEPMOE_CUDA=ON -DEPMOE_CUDA_ARCHS="$ARCHS" -DEPMOE_SERVICE=OFF \
         -DCMAKE_BUILD_TYPE=RelWithDebInfo ${EPMOE_NCCL_ROOT:+-DNCCL_ROOT="$EPMOE_NCCL_ROOT"} &&
       cmake --build "$BUILD" -j16 --target test_gpu_engine a2a_bench; } >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  echo "BUILD FAILED (see build.log)" | tee -a "$OUT/summary.txt"
  exit 1
fi
grep -E "epmoe: NCCL" "$OUT/build.log" | tee -a "$OUT/summary.txt"
echo "build: $(( $(date +%s) - t_start )) s" | tee -a "$OUT/summary.txt"

LOGS=$(mktemp -d)
MPIRUN="mpirun --bind-to none -x NCCL_NVLS_ENABLE -x LD_LIBRARY_PATH"
status=0
# the tiny preset (DeepSeek's math, a hash layer, a shared expert), then gpt-oss's layers
for preset in tiny gpt-oss-tiny; do
  args=""
  [ "$preset" != tiny ] && args="--preset $preset"
  for P in 1 2 3 4; do
    t0=$(date +%s)
    log="$LOGS/p$P-$preset.log"
    timeout 90 $MPIRUN -np $P "$BUILD/tests/gpu/test_gpu_engine" $args >"$log" 2>&1
    rc=$?
    [ $rc -ne 0 ] && status=1
    { echo "======== P=$P $preset (rc=$rc)"; cat "$log"; } >>"$OUT/tests.log"
    grep -E "^FAIL" "$log" | head -10
    echo "P=$P $preset: rc=$rc, $(( $(date +%s) - t0 )) s, $(grep -E '^[0-9]+ passed' "$log" | tail -1)" |
      tee -a "$OUT/summary.txt"
  done
done

# Watchdog: with ranks sharing one GPU only mpi-staged can run (its per-peer MPI requests name
# the missing peer); on 2+ GPUs the NCCL communicator's abort path is shown as well.
n_gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
demo_transports="mpi-staged"
[ "$n_gpus" -ge 2 ] && demo_transports="mpi-staged nccl"
for tr in $demo_transports; do
  for how in hang exit; do
    t0=$(date +%s)
    timeout 60 $MPIRUN -np 2 "$BUILD/tests/gpu/test_gpu_engine" --watchdog-demo $how \
      --transport $tr --timeout 5 >"$LOGS/wd.log" 2>&1
    rc=$?
    took=$(( $(date +%s) - t0 ))
    { echo "======== watchdog $how, $tr (job rc=$rc, $took s)"; cat "$LOGS/wd.log"; } >>"$OUT/watchdog.log"
    verdict=$(grep -E "^WATCHDOG|did not finish" "$LOGS/wd.log" | head -2 | tr '\n' ' ')
    echo "watchdog $how ($tr): job rc=$rc after $took s; ${verdict:-no watchdog message}" |
      tee -a "$OUT/summary.txt"
    if [ "$how" = hang ]; then
      { [ $rc -ne 0 ] && grep -q "^WATCHDOG FIRED" "$LOGS/wd.log"; } || status=1
    else
      [ $rc -ne 0 ] || status=1 # a peer that exits must never leave a job that looks fine
    fi
  done
done

# A short benchmark pass (meaningful only on 2+ GPUs; it says so with 1).
timeout 60 $MPIRUN -np "$([ "$n_gpus" -ge 2 ] && echo "$n_gpus" || echo 1)" "$BUILD/bench/a2a_bench" \
  --tokens 4096 --decode-tokens 128 --iters 10 >"$OUT/a2a_bench.log" 2>&1
echo "a2a_bench: rc=$?" | tee -a "$OUT/summary.txt"
cat "$OUT/a2a_bench.log" | tail -12 | tee -a "$OUT/summary.txt"
echo "total: $(( $(date +%s) - t_start )) s, status $status" | tee -a "$OUT/summary.txt"
exit $status
