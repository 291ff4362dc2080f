#!/usr/bin/env bash
# Everything issue 5 measures, in one run (on a GPU machine, from the repository root; needs
# what deploy/gpu-test.sh needs, plus PyTorch for the torch anchor): the GEMM benchmark with
# its test suite and the wgmma probe (bench/gpu-bench.sh), AUTO's decode kernels launched
# beside their pre-pass and after it (the overlap, side by side), (with --ncu) the streaming
# kernel's per-instruction stalls at 8 rows (Nsight Compute), (with --clocks) SM clock and
# power sampled while our prefill kernel runs, the whole GPU suite (deploy/gpu-test.sh) and
# the whole-layer benchmark (bench/layer-bench.sh).
# Everything lands in one archive, $OUT/all.tgz (default ./out); bench.json, the test summary
# (and the clock samples) also lie beside it.
#   bash bench/gpu-all.sh [--reps N] [--clocks] [--ncu]
set -uo pipefail
cd "$(dirname "$0")/.."
REPS=10
CLOCKS=0
NCU=0
while [ $# -gt 0 ]; do
  case "$1" in
    --reps) REPS="$2"; shift 2 ;;
    --clocks) CLOCKS=1; shift ;;
    --ncu) NCU=1; shift ;;
    *) echo "unknown argument $1"; exit 2 ;;
  esac
done
FINAL_OUT="${OUT:-$PWD/out}"
export OUT=/tmp/epmoe-all
rm -rf "$OUT"; mkdir -p "$OUT"
rc=0
# packed again after every step, so that a run cut short (a time limit) still leaves what it
# measured
pack() { tar -C /tmp -czf "$FINAL_OUT/all.tgz" epmoe-all; }
# the whole GPU suite first: what the code computes matters before how fast
bash deploy/gpu-test.sh > "$OUT/gpu_test.log" 2>&1 || rc=1
pack
bash bench/gpu-bench.sh --reps "$REPS" --kernels 1,4,5,6,7,8,9 --no-row-major > "$OUT/gpu_bench.log" 2>&1 || rc=1
pack
# the kernels AUTO picks up to 96 rows, each launched beside its pre-pass (default) and only after
# it (serial launch): what the programmatic dependent launch saves, in one run
./build-gemm-dev/bench/gemm_bench --json "$OUT/overlap.json" --reps "$REPS" --rows 8,16,32,96 \
  --kernels 5,7,9 --no-row-major --serial-too > "$OUT/overlap.log" 2>&1 || rc=1
pack
# clocks under load: bash bench/gpu-all.sh --clocks (optional: docs/perf-history.md §1)
if [ "$CLOCKS" = 1 ]; then
  nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw --format=csv,noheader -lms 50 > "$OUT/clocks.txt" &
  smi=$!
  ./build-gemm-dev/bench/gemm_bench --json "$OUT/clock_bench.json" --reps 300 --rows 768 --kernels 9 \
    --no-row-major > "$OUT/clock_bench.log" 2>&1 || rc=1
  kill $smi
fi
bash bench/layer-bench.sh --reps "$REPS" > "$OUT/layer_bench.log" 2>&1 || rc=1
pack
# (--ncu) where the streaming kernel's warps wait, per instruction, at 8 rows per expert
[ "$NCU" = 1 ] && { OUT="$OUT" bash bench/ncu-source.sh grouped_gemm_stream_kernel 8 5 ncu_stream_8 \
  > "$OUT/ncu_stream_8_top.txt" 2>&1 || rc=1; pack; }
cp "$OUT/bench.json" "$OUT/summary.txt" "$OUT/clocks.txt" "$FINAL_OUT/" 2>/dev/null
cat "$OUT/summary.txt" "$OUT/wgmma_probe.txt"
grep -E "^V4|decode stream|wgmma-ws MT=(32|128)|DIFFERS" "$OUT/overlap.log"
[ "$NCU" = 1 ] && head -40 "$OUT/ncu_stream_8_top.txt"
grep -A60 "^model .*x torch" "$OUT/gpu_bench.log" | grep -E "^V4"
grep -hE "^ *(V4|rows|preset)|tokens/s" "$OUT"/layer_dsv4-*.txt | head -30
exit $rc
