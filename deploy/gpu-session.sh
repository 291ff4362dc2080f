#!/usr/bin/env bash
# One call on a GPU machine that does as much as a deadline allows, correctness first, then the
# figures (device time is scarce and a call is limited: every step gets what time is left, and a
# step cut short still leaves its logs):
#   bash deploy/gpu-session.sh [SECONDS]          (default 570; repository root)
# Steps, in order: the GPU suite and the engine over 1-3 ranks (deploy/gpu-test.sh parts 1-2),
# the V4-Flash layer vs PyTorch (NVFP4 activations, then FP8), the FP8 GEMM vs torch, its kernels at 16384 tokens, the service on the cuda backend, the product checks, the batch
# job and service end to end, the V4-Pro and gpt-oss-120b layers, the long GEMM sweep.
# Output: $OUT/session.txt (one line a step) and one folder of logs a step.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
deadline=$(( $(date +%s) + ${1:-570} ))
T="$OUT/session.txt"
: >"$T"
step() { # name, most seconds, command...
  local name=$1 most=$2
  shift 2
  local t=$(( deadline - $(date +%s) ))
  [ $t -gt "$most" ] && t=$most
  if [ $t -lt 30 ]; then
    echo "$name: SKIPPED (no time left)" | tee -a "$T"
    return
  fi
  local t0
  t0=$(date +%s)
  mkdir -p "$OUT/$name"
  OUT="$OUT/$name" timeout -k 5 "$t" "$@" >"$OUT/$name/stdout.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc$([ $rc = 124 ] && echo ' (cut at the time limit)'), $(( $(date +%s) - t0 )) s" |
    tee -a "$T"
}
step tests 220 env EPMOE_GPU_TEST_PARTS="1 2" bash deploy/gpu-test.sh --quick
step layer-flash 170 bash bench/layer-vs-torch.sh build-gpu --preset dsv4-flash
step layer-flash-fp8 120 env ACT_QUANT=fp8 TORCH_FROM="$OUT/layer-flash" bash bench/layer-vs-torch.sh build-gpu --preset dsv4-flash
step gemm-fp8 150 bash -c 'build-gpu/bench/gemm_bench --json "$OUT/gemm_fp8.json" --reps 10 \
  --rows 32,96,768,1536,3072 --kernels 9,11 --no-row-major --a-fp8 &&
  python3 bench/torch_grouped_mm.py --json "$OUT/torch.json" --reps 10 --rows 32,96,768,1536,3072'
step profile 100 bash bench/profile-layer.sh build-gpu dsv4-flash 16384
step service 150 env EPMOE_GPU_TEST_PARTS=4 bash deploy/gpu-test.sh --quick
step product 200 env EPMOE_GPU_TEST_PARTS=3 bash deploy/gpu-test.sh --quick
step e2e 240 bash bench/e2e-vs-torch.sh build-gpu
step layer-pro 200 bash bench/layer-vs-torch.sh build-gpu --preset dsv4-pro
step layer-gptoss 200 bash bench/layer-vs-torch.sh build-gpu --preset gpt-oss-120b
step test-gemm 300 build-gpu/tests/gpu/test_gemm
echo "== summaries"
cat "$OUT"/*/summary.txt 2>/dev/null | grep -vE "^--|^$" | head -40
for f in "$OUT"/*/layer_vs_torch.md "$OUT"/profile/profile_*.txt "$OUT"/e2e/e2e.md; do [ -f "$f" ] && cat "$f"; done
echo "== failing checks (the logs may not all come back from the device)"
grep -h -E "^FAIL|FAIL:|: FAILED" "$OUT"/*/*.log 2>/dev/null | cut -c1-300 | head -40
cat "$T"
