#!/usr/bin/env bash
# Whole-layer graph-replayed timing on the GPU machine (run from the repo root, after or
# without deploy/gpu-test.sh; reuses its build dir): DeepSeek-V4-Flash and V4-Pro EP=8 slices.
#   bash bench/layer-bench.sh [--reps N]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
BUILD="${EPMOE_GPU_BUILD_DIR:-build-gpu-device}"
source deploy/gpu-env.sh
cmake -S . -B "$BUILD" -DEPMOE_CUDA=ON -DEPMOE_CUDA_ARCHS=90a -DEPMOE_SERVICE=OFF \
      -DCMAKE_BUILD_TYPE=Release >"$OUT/layer_cmake.log" 2>&1 &&
  cmake --build "$BUILD" -j"$(nproc)" --target layer_bench >"$OUT/layer_build.log" 2>&1 ||
  { tail -30 "$OUT/layer_build.log"; exit 1; }
for preset in dsv4-flash dsv4-pro; do
  "$BUILD/bench/layer_bench" --preset "$preset" --rows 8,32,96,768,3072 "$@" \
    --json "$OUT/layer_$preset.json" | tee "$OUT/layer_$preset.txt"
done
