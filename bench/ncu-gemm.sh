#!/usr/bin/env bash
# Nsight Compute profile of one grouped-GEMM launch (run on the GPU machine, repo root):
#   bash bench/ncu-gemm.sh [kernel-regex] [rows]      (defaults: the wgmma kernel, 768 rows)
#   BENCH_ARGS="--kernels 9 --no-row-major" bash bench/ncu-gemm.sh ...   (fewer kernels run)
# Profiles the 4th launch of the kernel whose mangled name matches (e.g. ILi256 picks a template
# configuration) in gemm_bench (past its warm-up), V4-Flash
# W13 at the given rows per expert; report in $OUT/ncu_<regex>_<rows>.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
source deploy/gpu-env.sh
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
KERNEL="${1:-grouped_gemm_wgmma}"
ROWS="${2:-768}"
BUILD=build-gemm-dev
cmake -S . -B $BUILD -DEPMOE_CUDA=ON -DEPMOE_CUDA_ARCHS=90a -DEPMOE_SERVICE=OFF \
      -DCMAKE_BUILD_TYPE=Release > "$OUT/cmake.log" 2>&1 || { tail -30 "$OUT/cmake.log"; exit 1; }
cmake --build $BUILD -j16 --target gemm_bench > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
"$NCU" --kernel-name-base mangled --kernel-name "regex:$KERNEL" --launch-skip 3 --launch-count 1 \
  --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
  --section Occupancy --section SchedulerStats --section WarpStateStats --section LaunchStats \
  --section InstructionStats --section SourceCounters --print-details all \
  ./$BUILD/bench/gemm_bench --json "$OUT/ncu_bench.json" --reps 1 --rows "$ROWS" ${BENCH_ARGS:-} \
  > "$OUT/ncu_${KERNEL}_${ROWS}.txt" 2>&1
grep -iE "Duration|SM Frequency|Throughput|Pipe|Issue|Eligible|Stall|Warp Cycles|Executed Ipc" \
  "$OUT/ncu_${KERNEL}_${ROWS}.txt" | head -120
