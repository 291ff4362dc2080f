#!/usr/bin/env bash
# Issue 6's benchmarks on the GPU machine (2+ GPUs for meaningful figures), from the repo root:
#   bash bench/ep-scaling.sh
# Needs what deploy/gpu-mpi-test.sh needs, on one host with 2 or more GPUs.
# 1. bench/a2a_bench on every GPU: dispatch/combine at prefill size (4096 tokens/rank) next to a
#    raw NCCL all-to-all of the same bytes, both wire formats; decode latency at 128 tokens/rank
#    (graph-replayed), DeepSeek-V4-Flash and V4-Pro widths.
# 2. bench/ep_layer_bench (V4-Flash, whole layer): 1 GPU at 4096 and 8192 tokens, N GPUs at 4096
#    tokens per rank: weak scaling (same tokens per GPU) and strong scaling (same total).
# Logs under $OUT: ep_build.log, a2a_bench.log, ep_layer.log, ep_summary.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
BUILD="${EPMOE_GPU_BUILD_DIR:-build-mpi-device}"
source deploy/gpu-env.sh
{ cmake -S . -B "$BUILD" -DEPMOE_CUDA=ON -DEPMOE_CUDA_ARCHS="${EPMOE_CUDA_ARCHS:-90a}" \
    -DEPMOE_SERVICE=OFF -DCMAKE_BUILD_TYPE=Release ${EPMOE_NCCL_ROOT:+-DNCCL_ROOT="$EPMOE_NCCL_ROOT"} &&
  cmake --build "$BUILD" -j"$(nproc)" --target a2a_bench ep_layer_bench; } >"$OUT/ep_build.log" 2>&1 ||
  { tail -30 "$OUT/ep_build.log"; echo "BUILD FAILED"; exit 1; }
n_gpus=$(nvidia-smi -L | wc -l)
MPIRUN="mpirun --bind-to none -x NCCL_NVLS_ENABLE -x LD_LIBRARY_PATH"
S="$OUT/ep_summary.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$S"
nvidia-smi topo -m 2>/dev/null | head -6 | tee -a "$S"
timeout 240 $MPIRUN -np "$n_gpus" "$BUILD/bench/a2a_bench" --tokens 4096 --decode-tokens 128 \
  --iters 20 >"$OUT/a2a_bench.log" 2>&1
echo "a2a_bench rc=$?" | tee -a "$S"
grep -v "^$" "$OUT/a2a_bench.log" | tee -a "$S"
: >"$OUT/ep_layer.log"
for run in "1 4096" "1 8192" "$n_gpus 4096"; do
  set -- $run
  timeout 240 $MPIRUN -np "$1" "$BUILD/bench/ep_layer_bench" --preset dsv4-flash --tokens "$2" \
    --iters 10 >>"$OUT/ep_layer.log" 2>&1
  echo "ep_layer_bench np=$1 tokens=$2 rc=$?" | tee -a "$S"
done
grep -E "^(ep_layer_bench|RESULT)" "$OUT/ep_layer.log" | tee -a "$S"
python3 - "$OUT/ep_layer.log" "$n_gpus" <<'PY' | tee -a "$S"
import re, sys
runs = {}
for line in open(sys.argv[1]):
    m = re.match(r"RESULT ranks=(\d+) tokens_per_rank=(\d+) layer_ms=([\d.]+) tokens_per_s=([\d.]+)", line)
    if m: runs[(int(m[1]), int(m[2]))] = float(m[4])
n = int(sys.argv[2])
one, one2, many = runs.get((1, 4096)), runs.get((1, 8192)), runs.get((n, 4096))
if one and many:
    print(f"weak scaling (4096 tokens per GPU): {many / one:.2f}x tokens/s on {n} GPUs vs 1")
if one2 and many and n == 2:
    print(f"strong scaling (8192 tokens in all): {many / one2:.2f}x tokens/s on 2 GPUs vs 1")
PY
