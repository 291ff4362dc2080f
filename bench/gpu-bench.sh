#!/usr/bin/env bash
# The one command (run on the GPU machine, from the repo root): build for sm_90a, run the GEMM
# test suite, then time our grouped NVFP4 GEMMs, cuBLAS bf16 and a device-to-device copy
# (bench/gemm_bench.cu) and torch._grouped_mm on bf16 weights (bench/torch_grouped_mm.py) at the
# DeepSeek-V4-Flash / V4-Pro slice shapes, and print one table. JSON goes to $OUT (or ./out).
#   bash bench/gpu-bench.sh [--rows 8,16,...] [--reps N] [--kernels 4,6,...] [--no-row-major]
#                           [--no-torch] [--no-test]
set -uo pipefail
cd "$(dirname "$0")/.."
source deploy/gpu-env.sh
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
ROWS=8,16,32,64,96,768,1536,3072
REPS=20
TORCH=1
TEST=1
KERNEL_ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --rows) ROWS="$2"; shift 2 ;;
    --reps) REPS="$2"; shift 2 ;;
    --kernels) KERNEL_ARGS+=(--kernels "$2"); shift 2 ;;
    --no-row-major) KERNEL_ARGS+=(--no-row-major); shift ;;
    --no-torch) TORCH=0; shift ;;
    --no-test) TEST=0; shift ;;
    *) echo "unknown argument $1"; exit 2 ;;
  esac
done
BUILD=build-gemm-dev
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,power.limit --format=csv,noheader | tee "$OUT/gpu.txt"
cmake -S . -B $BUILD -DEPMOE_CUDA=ON -DEPMOE_CUDA_ARCHS=90a -DEPMOE_SERVICE=OFF \
      -DCMAKE_BUILD_TYPE=Release > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
cmake --build $BUILD -j16 --target test_gemm test_slab_bits test_stream_schedule gemm_bench wgmma_probe >> "$OUT/build.log" 2>&1 || { grep -E "error" -A3 "$OUT/build.log" | head -40; exit 1; }
# SASS check (no disassembler on the build machine): tensor-core and copy instructions, spills
# (the SASS goes into one archive, $OUT/sass.tgz)
mkdir -p /tmp/epmoe-sass
for O in $(find $BUILD -name "gemm_sm90*.cu.o"); do
  S="/tmp/epmoe-sass/$(basename "$O" .cu.o).sass"
  echo "SASS instruction counts, $(basename "$O"):"
  cuobjdump --dump-sass "$O" > "$S" 2>&1 && \
    grep -oE "UBLKCP[.A-Z0-9]*|SYNCS[.A-Z0-9]*|HMMA[.A-Z0-9]*|HGMMA[.A-Z0-9_]*|WARPGROUP[.A-Z]*|LDGSTS[.A-Z0-9]*|LDS[.A-Z0-9]*|LDL|STL|HMUL2[.A-Z0-9_]*" "$S" | sort | uniq -c
done
tar -C /tmp -czf "$OUT/sass.tgz" epmoe-sass
rc=0
if [ $TEST = 1 ]; then
  # a hung kernel traps after 10 s (mbar_wait); the timeout is the last resort
  ./$BUILD/tests/gpu/test_slab_bits 2>&1 | tail -1 | tee "$OUT/test_slab_bits.log" || rc=1
  ./$BUILD/tests/gpu/test_stream_schedule 2>&1 | tail -1 | tee "$OUT/test_stream_schedule.log" || rc=1
  timeout 600 ./$BUILD/tests/gpu/test_gemm 2>&1 | tee "$OUT/test_gemm.log" || rc=1
fi
# the tensor cores' rate for our MMA pattern alone (register A vs shared A, per-slice fences)
./$BUILD/bench/wgmma_probe | tee "$OUT/wgmma_probe.txt"
./$BUILD/bench/gemm_bench --json "$OUT/ours.json" --reps "$REPS" --rows "$ROWS" "${KERNEL_ARGS[@]}" || exit 1
if [ $TORCH = 1 ]; then
  PYTHONUNBUFFERED=1 python3 bench/torch_grouped_mm.py --json "$OUT/torch.json" --reps "$REPS" --rows "$ROWS" || exit 1
  python3 bench/report.py "$OUT/ours.json" "$OUT/torch.json" "$OUT/bench.json"
fi
exit $rc
