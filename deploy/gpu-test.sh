#!/usr/bin/env bash
# Builds and runs the GPU suite on the GPU machine, from the repository root:
#   bash deploy/gpu-test.sh
# Needs an NVIDIA GPU (sm_90 by default; EPMOE_CUDA_ARCHS), the CUDA toolkit, CMake and MPI;
# jansson and Check from the system or as .debs in .carry/debs (deploy/gpu-deps.sh makes them,
# deploy/gpu-env.sh unpacks them). Logs go to $OUT (default ./out): build.log, one <test>.log
# per suite program, summary.txt.
# Exit status: non-zero if the build or any suite program failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
BUILD="${EPMOE_GPU_BUILD_DIR:-build-gpu-device}"
ARCHS="${EPMOE_CUDA_ARCHS:-90a}"

source deploy/gpu-env.sh
{
  echo "== $(date -u) on $(hostname)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
  nvcc --version | tail -1
} 2>&1 | tee "$OUT/summary.txt"

tests=()
for src in tests/gpu/test_*.cu; do tests+=("$(basename "$src" .cu)"); done

start=$(date +%s)
if ! { cmake -S . -B "$BUILD" -DEPMOE_CUDA=ON -DEPMOE_CUDA_ARCHS="$ARCHS" -DEPMOE_SERVICE=OFF \
         -DCMAKE_BUILD_TYPE=RelWithDebInfo &&
       cmake --build "$BUILD" -j"$(nproc)" --target "${tests[@]}"; } >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  echo "BUILD FAILED (see build.log)" | tee -a "$OUT/summary.txt"
  exit 1
fi
echo "build: $(( $(date +%s) - start )) s for ${tests[*]}" | tee -a "$OUT/summary.txt"

status=0
for t in "${tests[@]}"; do
  t0=$(date +%s)
  "$BUILD/tests/gpu/$t" >"$OUT/$t.log" 2>&1
  rc=$?
  [ $rc -ne 0 ] && status=1
  grep -E "^FAIL" "$OUT/$t.log" | head -20
  echo "$t: rc=$rc, $(( $(date +%s) - t0 )) s, $(tail -1 "$OUT/$t.log")" | tee -a "$OUT/summary.txt"
done
exit $status
