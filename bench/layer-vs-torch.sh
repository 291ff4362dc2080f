#!/usr/bin/env bash
# The whole MoE layer on one GPU against the PyTorch anchor (bench/torch_layer.py), in one call,
# for DeepSeek-V4-Flash and V4-Pro with every routed expert on the GPU:
#   bash bench/layer-vs-torch.sh [BUILD_DIR]      (after deploy/gpu-test.sh built BUILD_DIR)
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
BUILD="${1:-${EPMOE_GPU_BUILD_DIR:-build-gpu}}"
source deploy/gpu-env.sh
TOKENS="${TOKENS:-128,512,4096,16384}"
python3 bench/torch_layer.py --copy-only --json "$OUT/copy.json" | tee "$OUT/layer_vs_torch.log"
for preset in dsv4-flash dsv4-pro; do
  E=256; [ $preset = dsv4-pro ] && E=384
  rows=$(python3 -c "print(','.join(str(max(1, int(t) * 6 // $E)) for t in '$TOKENS'.split(',')))")
  timeout 300 "$BUILD/bench/layer_bench" --preset $preset --local-experts $E --rows "$rows" \
    --reps 10 --json "$OUT/layer_$preset.json" 2>&1 | tee -a "$OUT/layer_vs_torch.log"
  for T in ${TOKENS//,/ }; do
    timeout 300 mpirun -np 1 "$BUILD/bench/ep_layer_bench" --preset $preset --tokens "$T" \
      --iters 10 2>&1 | tee -a "$OUT/layer_vs_torch.log" | grep -E "^RESULT" |
      sed "s/^RESULT/RESULT preset=$preset/" >>"$OUT/throughput_$preset.txt"
  done
  timeout 600 python3 bench/torch_layer.py --preset $preset --tokens "$TOKENS" --reps 10 \
    --json "$OUT/torch_$preset.json" 2>&1 | tee -a "$OUT/layer_vs_torch.log"
done
python3 bench/layer_table.py "$OUT" | tee "$OUT/layer_vs_torch.md"
