#!/usr/bin/env bash
# Builds everything with CUDA and runs every GPU suite, from the repository root of a machine
# with an NVIDIA GPU (CUDA toolkit, CMake, Open MPI, python3 with numpy):
#   bash deploy/gpu-test.sh [--quick]
# Packages such a machine may lack (jansson, Check, protobuf-c, gRPC) come from .carry/debs
# (deploy/gpu-deps.sh fetches them on a machine with apt; deploy/gpu-env.sh unpacks them).
#  1. the GPU suite programs (tests/gpu: kernels, GEMMs, the layer, the engine on one rank)
#  2. the engine over 1-3 ranks sharing the GPUs (mpi-staged; nccl where ranks have their own)
#  3. the product: epmoe-run --backend cuda against --backend cpu (tests/product/gpu_product.sh)
#  4. the service end to end on the cuda backend (tests/service, EPMOE_BACKEND=cuda)
# --quick runs 1 without the long GEMM sweep. EPMOE_GPU_TEST_PARTS picks parts by number (e.g.
# "1 2"; default all four). Logs go to $OUT (default ./out): build.log, one
# log per suite, summary.txt. Exit status non-zero if the build or any suite failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
BUILD="${EPMOE_GPU_BUILD_DIR:-build-gpu}"
ARCHS="${EPMOE_CUDA_ARCHS:-90a}"
source deploy/gpu-env.sh
S="$OUT/summary.txt"
{
  echo "== $(date -u) on $(hostname)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  nvcc --version | tail -1
  mpirun --version | head -1
} 2>&1 | tee "$S"

start=$(date +%s)
if ! { cmake -S . -B "$BUILD" -DEPMOE_CUDA=ON -DEPMOE_CUDA_ARCHS="$ARCHS" \
         -DCMAKE_BUILD_TYPE=Release -DEPMOE_PYTHON="$(command -v python3)" \
         ${EPMOE_NCCL_ROOT:+-DNCCL_ROOT="$EPMOE_NCCL_ROOT"} &&
       cmake --build "$BUILD" -j"$(nproc)"; } >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  echo "BUILD FAILED (see build.log)" | tee -a "$S"
  exit 1
fi
grep -E "^-- epmoe:" "$OUT/build.log" | tee -a "$S"
echo "build: $(( $(date +%s) - start )) s" | tee -a "$S"

status=0
PARTS="${EPMOE_GPU_TEST_PARTS:-1 2 3 4}"
part() { case " $PARTS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
# 1. the GPU suite
part 1 && for src in tests/gpu/test_*.cu; do
  t=$(basename "$src" .cu)
  t0=$(date +%s)
  if [ "${1:-}" = --quick ] && [ "$t" = test_gemm ]; then continue; fi
  timeout 600 "$BUILD/tests/gpu/$t" >"$OUT/$t.log" 2>&1
  rc=$?
  [ $rc -ne 0 ] && status=1
  grep -E "^FAIL" "$OUT/$t.log" | head -20
  echo "$t: rc=$rc, $(( $(date +%s) - t0 )) s, $(tail -1 "$OUT/$t.log")" | tee -a "$S"
done

# 2. the engine over ranks
MPIRUN="mpirun --bind-to none -x NCCL_NVLS_ENABLE -x LD_LIBRARY_PATH"
part 2 && for preset in tiny gpt-oss-tiny; do
  args=""
  [ "$preset" != tiny ] && args="--preset $preset"
  for P in 2 3; do
    t0=$(date +%s)
    log="$OUT/engine_p$P-$preset.log"
    timeout 120 $MPIRUN -np $P "$BUILD/tests/gpu/test_gpu_engine" $args >"$log" 2>&1
    rc=$?
    [ $rc -ne 0 ] && status=1
    grep -E "^FAIL" "$log" | head -10
    echo "test_gpu_engine P=$P $preset: rc=$rc, $(( $(date +%s) - t0 )) s, $(grep -E '^[0-9]+ passed' \
      "$log" | tail -1)" | tee -a "$S"
  done
done

# 3. the product
if part 3; then
t0=$(date +%s)
timeout 900 bash tests/product/gpu_product.sh "$BUILD" /tmp/epmoe-product >"$OUT/product.log" 2>&1
rc=$?
[ $rc -ne 0 ] && status=1
grep -E "FAIL" "$OUT/product.log" | head -20
echo "product (tests/product/gpu_product.sh): rc=$rc, $(( $(date +%s) - t0 )) s, \
$(grep -c ': PASS' "$OUT/product.log") checks passed, $(grep -c 'FAIL' "$OUT/product.log") failed" | tee -a "$S"
fi

# 4. the service on the cuda backend
if ! part 4; then
  :
elif [ -x "$BUILD/bin/epmoe-serve" ]; then
  t0=$(date +%s)
  (cd "$BUILD" && EPMOE_BACKEND=cuda timeout 900 ctest -R 'service\.(checkpoint|units|e2e)' \
     --output-on-failure -V) >"$OUT/service.log" 2>&1
  rc=$?
  [ $rc -ne 0 ] && tar czf "$OUT/service-logs.tgz" -C "$BUILD/tests" service-data 2>/dev/null
  [ $rc -ne 0 ] && status=1
  echo "service suites on cuda: rc=$rc, $(( $(date +%s) - t0 )) s, \
$(grep -E 'tests passed' "$OUT/service.log")" | tee -a "$S"
else
  echo "SKIPPED: service suites (epmoe-serve not built: see build.log)" | tee -a "$S"
  status=1
fi
echo "gpu-test: $([ $status = 0 ] && echo PASSED || echo FAILED)" | tee -a "$S"
exit $status
