#!/usr/bin/env bash
# Nsight Compute per-instruction (SASS) stall sampling of one grouped-GEMM launch (run on the
# GPU machine, repo root):   bash bench/ncu-source.sh <kernel-regex> <rows> <kernel-id> <name>
# Profiles the 4th launch of the matching kernel in gemm_bench (--kernels <kernel-id>, slab
# weights only), V4-Flash W13 at <rows> rows per expert; writes $OUT/<name>.csv (the source
# page, SASS with its sampled stall reasons) and summarizes it (bench/ncu_source_top.py).
set -uo pipefail
cd "$(dirname "$0")/.."
source deploy/gpu-env.sh
OUT="${OUT:-$PWD/out}"
BUILD=build-gemm-dev
[ -x $BUILD/bench/gemm_bench ] || { cmake -S . -B $BUILD -DEPMOE_CUDA=ON -DEPMOE_CUDA_ARCHS=90a \
  -DEPMOE_SERVICE=OFF -DCMAKE_BUILD_TYPE=Release >/dev/null && cmake --build $BUILD -j16 --target gemm_bench >/dev/null; }
NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
timeout 300 "$NCU" --clock-control none --kernel-name-base mangled --kernel-name "regex:$1" \
  --launch-skip 3 --launch-count 1 --section SourceCounters --section WarpStateStats \
  --page source --print-source sass --csv \
  ./$BUILD/bench/gemm_bench --json /tmp/ncu_src.json --reps 1 --rows "$2" --kernels "$3" --no-row-major \
  > "$OUT/$4.csv" 2>&1
python3 bench/ncu_source_top.py "$OUT/$4.csv" 25
