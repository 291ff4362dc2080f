#!/usr/bin/env bash
# The whole MoE layer on one GPU against the PyTorch anchor (bench/torch_layer.py), in one call,
# for DeepSeek-V4-Flash and V4-Pro (or the presets named) with every routed expert on the GPU:
#   bash bench/layer-vs-torch.sh [BUILD_DIR] [--preset P]...   (after deploy/gpu-test.sh built
#                                                               BUILD_DIR)
#   bash bench/layer-vs-torch.sh build-gpu --preset gpt-oss-120b
#   ACT_QUANT=fp8 bash bench/layer-vs-torch.sh ...   (epmoe's activation mode; PyTorch stays bf16)
#   TORCH_FROM=DIR ...   (take PyTorch's figures from an earlier run's DIR on the same GPU)
# Presets: dsv4-flash, dsv4-pro, gpt-oss-20b, gpt-oss-120b (gpt-oss: its routing, activation
# and expert biases, no shared expert, on both sides).
#  - epmoe graph-replayed: bench/layer_bench (each stage and the whole layer as CUDA graphs)
#  - epmoe throughput mode: bench/ep_layer_bench on one rank (the engine the cuda backend runs)
#  - PyTorch bf16: eager and CUDA-graph-replayed, the better is the anchor
#  - the copy bandwidth, for the NVFP4 weight floor
# Needs a CUDA GPU, Open MPI, python3 with torch. Output: $OUT/layer_vs_torch.md (the table),
# the JSON and logs beside it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
BUILD="${EPMOE_GPU_BUILD_DIR:-build-gpu}"
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then BUILD="$1"; shift; fi
presets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --preset) presets+=("$2"); shift 2 ;;
    *) echo "usage: bench/layer-vs-torch.sh [BUILD_DIR] [--preset P]..." >&2; exit 2 ;;
  esac
done
[ ${#presets[@]} -eq 0 ] && presets=(dsv4-flash dsv4-pro)
source deploy/gpu-env.sh
TOKENS="${TOKENS:-1,8,32,128,512,4096,16384}"
ACT_QUANT="${ACT_QUANT:-nvfp4}"
python3 bench/torch_layer.py --copy-only --json "$OUT/copy.json" | tee "$OUT/layer_vs_torch.log"
for preset in "${presets[@]}"; do
  case $preset in # routed experts
    dsv4-flash) E=256 ;;
    dsv4-pro) E=384 ;;
    gpt-oss-20b) E=32 ;;
    gpt-oss-120b) E=128 ;;
    *) echo "unknown preset $preset" >&2; exit 2 ;;
  esac
  timeout 300 "$BUILD/bench/layer_bench" --preset $preset --local-experts $E --tokens "$TOKENS" \
    --reps 10 --act-quant "$ACT_QUANT" --json "$OUT/layer_$preset.json" 2>&1 | tee -a "$OUT/layer_vs_torch.log"
  timeout 300 mpirun -np 1 "$BUILD/bench/ep_layer_bench" --preset $preset --tokens "$TOKENS" \
    --iters 10 --act-quant "$ACT_QUANT" 2>&1 | tee -a "$OUT/layer_vs_torch.log" | grep -E "^RESULT" |
    sed "s/^RESULT/RESULT preset=$preset/" >>"$OUT/throughput_$preset.txt"
  if [ -n "${TORCH_FROM:-}" ] && [ -f "$TORCH_FROM/torch_$preset.json" ]; then
    cp "$TORCH_FROM/torch_$preset.json" "$OUT/" # the same machine's PyTorch run, minutes ago
  else
    timeout 600 python3 bench/torch_layer.py --preset $preset --tokens "$TOKENS" --reps 10 \
      --json "$OUT/torch_$preset.json" 2>&1 | tee -a "$OUT/layer_vs_torch.log"
  fi
done
{ echo "epmoe act_quant = $ACT_QUANT"; python3 bench/layer_table.py "$OUT"; } | tee "$OUT/layer_vs_torch.md"
