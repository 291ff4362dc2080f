#!/usr/bin/env bash
# The main job on the embedded default: a tiny-preset synthetic checkpoint (256 experts),
# 4 MPI ranks on this host, all layers; then the same input on 1 rank, compared bit for bit.
#   bash deploy/demo.sh [RANKS] [TOKENS]
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/mpi-env.sh
ranks=${1:-4}
tokens=${2:-1024}
build=${EPMOE_BUILD_DIR:-build}
mkdir -p out
if [ ! -d out/tiny-ckpt ]; then
  "$build/bin/epmoe-gen" --preset tiny --out out/tiny-ckpt
fi
"$build/bin/epmoe-gen" --preset tiny --input-out out/tiny-input.safetensors --tokens "$tokens" --dtype bf16 >/dev/null
echo "== mpirun -np $ranks epmoe-run (tiny preset, $tokens tokens, bf16 in/out)"
mpirun -np "$ranks" "$build/bin/epmoe-run" --checkpoint out/tiny-ckpt \
  --input out/tiny-input.safetensors --output out/tiny-output-np$ranks.safetensors
echo "== the same on 1 rank"
mpirun -np 1 "$build/bin/epmoe-run" --checkpoint out/tiny-ckpt --quiet \
  --input out/tiny-input.safetensors --output out/tiny-output-np1.safetensors >/dev/null
if cmp -s out/tiny-output-np$ranks.safetensors out/tiny-output-np1.safetensors; then
  echo "demo: outputs of $ranks ranks and 1 rank are bit-identical"
else
  echo "demo: outputs of $ranks ranks and 1 rank DIFFER" >&2
  exit 1
fi
