#!/usr/bin/env bash
# The SASS of one CUDA file, on a machine with the CUDA toolkit and no GPU: compiles it for
# sm_90a with ptxas's resource report and dumps its SASS with cuobjdump/nvdisasm from NVIDIA's
# pip wheels (toolkits without them exist), unpacked once into .sass-tools/ (ignored by git).
#   bash bench/sass-local.sh kernels/cuda/gemm_sm90_ws.cu [out.sass]
# Prints ptxas's registers/spills per kernel and any C7513 (serialized wgmma) warning, then
# the instruction counts that matter for the GEMMs; the whole SASS goes to out.sass.
set -euo pipefail
cd "$(dirname "$0")/.."
SRC="${1:?usage: bash bench/sass-local.sh <file.cu> [out.sass]}"
OUT_SASS="${2:-/tmp/$(basename "$SRC" .cu).sass}"
TOOLS=.sass-tools
if [ ! -x "$TOOLS/nvidia/cu13/bin/nvdisasm" ]; then
  mkdir -p "$TOOLS/wheels"
  python3 -m pip download --quiet --no-deps -d "$TOOLS/wheels" nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm
  for w in "$TOOLS"/wheels/*.whl; do python3 -m zipfile -e "$w" "$TOOLS"; done
  chmod +x "$TOOLS"/nvidia/cu13/bin/*
fi
export PATH="$PWD/$TOOLS/nvidia/cu13/bin:$PATH"
OBJ=$(mktemp --suffix=.o)
nvcc -std=c++17 -O3 -arch=sm_90a -I. -c "$SRC" -o "$OBJ" -Xptxas -v 2>&1 |
  grep -E "Compiling entry|registers|spill|C7513|warning|error" | sed 's/ptxas info    : //'
cuobjdump --dump-sass "$OBJ" > "$OUT_SASS"
rm -f "$OBJ"
echo "SASS in $OUT_SASS; instruction counts:"
grep -oE "HGMMA[.A-Z0-9_x]*|WARPGROUP[.A-Z]*|SYNCS[.A-Z0-9]*|UBLKCP[.A-Z0-9]*|LDS[.A-Z0-9]*|LDL|STL" "$OUT_SASS" |
  sort | uniq -c
