#!/usr/bin/env bash
# What each activation quantization costs in accuracy, on synthetic V4-Flash and V4-Pro layers
# (real H, I, top-k and routing; 32 experts so the float64 reference runs in minutes) with
# NVFP4 and MXFP4 weights: epmoe-run on the CPU backend (the GPU computes the same quantized
# values; tests/gpu holds it to that), then the relative L2 error against the float64
# reference of the same weights with UNquantized activations (ref_check ... high).
#   bash bench/quant-accuracy.sh [BUILD]       (default build-cpu; prints a markdown table)
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build-cpu}
source deploy/mpi-env.sh
export EPMOE_BACKEND=cpu
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "| layer | weights | act_quant | rel L2 vs float64, activations unquantized |"
echo "|---|---|---|---|"
for preset in dsv4-flash dsv4-pro; do
  for weights in nvfp4 mxfp4; do
    ck="$work/${preset}_$weights"
    # one scored layer (n_hash_layers 0), 32 experts, 64 tokens
    "$build/bin/epmoe-gen" --preset $preset --n_layers 1 --n_hash_layers 0 --n_routed_experts 32 \
      --weight_format $weights --out "$ck" >/dev/null 2>&1
    "$build/bin/epmoe-gen" --preset $preset --n_layers 1 --n_hash_layers 0 --n_routed_experts 32 \
      --input-out "$ck.in.safetensors" --tokens 64 >/dev/null 2>&1
    for act in nvfp4 fp8 high; do
      mpirun -np 2 "$build/bin/epmoe-run" --checkpoint "$ck" --input "$ck.in.safetensors" \
        --output "$ck.$act.safetensors" --quiet --act_quant $act >"$ck.$act.log" 2>&1
      rel=$("$build/tests/ref_check" "$ck" "$ck.in.safetensors" "$ck.$act.safetensors" 0:1 1 high |
        sed -n 's/.*rel L2 \([^ ]*\).*/\1/p')
      echo "| $preset | $weights | $act | $rel |"
    done
  done
done
