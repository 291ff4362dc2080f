#!/usr/bin/env bash
# One call on a GPU machine that does as much as a deadline allows, correctness first, then the
# figures (device time is scarce and a call is limited: every step gets what time is left, and a
# step cut short still leaves its logs):
#   bash deploy/gpu-session.sh [SECONDS]          (default 570; repository root)
#   EPMOE_SESSION_STEPS="tests layer-flash" bash deploy/gpu-session.sh   (those steps only)
#   EPMOE_SESSION_PACK=1 ...   (the logs in one tarball, $OUT/session-logs.tgz)
# Steps, in order: the GPU suite and the engine over 1-3 ranks (deploy/gpu-test.sh parts 1-2),
# the FP8 GEMM's check and its figures against torch, the V4-Pro, gpt-oss-120b and V4-Flash
# layers vs PyTorch (Flash also in W4A8), the product checks, the service on the cuda backend,
# the batch job and service end to end, the kernels at 16384 tokens, the long GEMM sweep.
# Output: $OUT/session.txt (one line a step) and one folder of logs a step.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
deadline=$(( $(date +%s) + ${1:-570} ))
T="$OUT/session.txt"
: >"$T"
STEPS="${EPMOE_SESSION_STEPS:-}" # names of the steps to run (default: all, in the order below)
step() { # name, most seconds, command...
  local name=$1 most=$2
  shift 2
  case " ${STEPS:-$name} " in *" $name "*) ;; *) return ;; esac
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
# what was least recently measured comes first (2026-12-07: the Flash layer, the product, the
# service and the batch job were measured; the FP8 GEMM's check, Pro and gpt-oss were not)
step tests 220 env EPMOE_GPU_TEST_PARTS="1 2" bash deploy/gpu-test.sh --quick
step test-gemm-fp8 90 env EPMOE_GT_ONLY=fp8 build-gpu/tests/gpu/test_gemm
step gemm-fp8 150 bash -c 'build-gpu/bench/gemm_bench --json "$OUT/gemm_fp8.json" --reps 10 \
  --rows 8,16,32,96,768,1536,3072 --kernels 9,10,11 --no-row-major --a-fp8 &&
  python3 bench/torch_grouped_mm.py --json "$OUT/torch.json" --reps 10 --rows 8,16,32,96,768,1536,3072 &&
  python3 bench/report.py "$OUT/gemm_fp8.json" "$OUT/torch.json" "$OUT/merged.json" >"$OUT/report.txt"'
step layer-pro 200 bash bench/layer-vs-torch.sh build-gpu --preset dsv4-pro
step layer-gptoss 200 bash bench/layer-vs-torch.sh build-gpu --preset gpt-oss-120b
step layer-flash 170 bash bench/layer-vs-torch.sh build-gpu --preset dsv4-flash
step layer-flash-fp8 120 env ACT_QUANT=fp8 TORCH_FROM="$OUT/layer-flash" bash bench/layer-vs-torch.sh build-gpu --preset dsv4-flash
step product 200 env EPMOE_GPU_TEST_PARTS=3 bash deploy/gpu-test.sh --quick
step service 150 env EPMOE_GPU_TEST_PARTS=4 bash deploy/gpu-test.sh --quick
step e2e 240 bash bench/e2e-vs-torch.sh build-gpu
step profile 100 bash bench/profile-layer.sh build-gpu dsv4-flash 16384
step test-gemm 300 build-gpu/tests/gpu/test_gemm
echo "== summaries"
cat "$OUT"/*/summary.txt 2>/dev/null | grep -vE "^--|^$" | head -40
grep -hE "rel L2|not run here|inexact" "$OUT"/test-gemm-fp8/stdout.log 2>/dev/null | head -20
cut -c1-150 "$OUT"/gemm-fp8/report.txt 2>/dev/null | head -30
for f in "$OUT"/*/layer_vs_torch.md "$OUT"/profile/profile_*.txt "$OUT"/e2e/e2e.md; do [ -f "$f" ] && cat "$f"; done
echo "== failing checks (the logs may not all come back from the device)"
grep -h -E "^FAIL|FAIL:|: FAILED" "$OUT"/*/*.log 2>/dev/null | cut -c1-300 | head -40
cat "$T"
# EPMOE_SESSION_PACK=1: the step folders go into one tarball, $OUT/session-logs.tgz (a device
# call brings back only a few files from $OUT)
if [ "${EPMOE_SESSION_PACK:-0}" = 1 ]; then
  (cd "$OUT" && tar czf session-logs.tgz --exclude=session-logs.tgz -- */ &&
     find . -mindepth 1 -maxdepth 1 -type d -exec rm -rf {} +)
fi
