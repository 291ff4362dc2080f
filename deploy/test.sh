#!/usr/bin/env bash
# Runs every suite that can run on this machine:
#   1. setup (idempotent: packages, .venv oracles, Release build incl. CUDA code when nvcc exists)
#   2. all CPU suites (unit, MPI under mpiexec with 1-8 ranks, CLI, service) on the Release build
#   3. the unit suites again under AddressSanitizer + UndefinedBehaviorSanitizer
#   4. a line per suite that cannot run here (the GPU suite needs an NVIDIA GPU)
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
source deploy/mpi-env.sh
jobs=$(nproc)

echo "== CPU suites (build/)"
(cd build && ctest --output-on-failure -j "$jobs" --timeout 1500)
# a suite that could not run here says why (ctest only says "Skipped")
grep -h "^SKIPPED: " build/Testing/Temporary/LastTest.log 2>/dev/null | sort -u || true

echo "== unit suites under ASan+UBSan (build-asan/)"
cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DEPMOE_SANITIZE=ON \
  -DEPMOE_CUDA=OFF -DEPMOE_SERVICE=OFF >/dev/null
cmake --build build-asan -j "$jobs" >/dev/null
(cd build-asan && ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
   ctest --output-on-failure -j "$jobs" -R '^(oracle|unit)\.')

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "== GPU suite"
  bash deploy/gpu-test.sh
else
  if [ -d build/kernels/cuda ]; then  # the CUDA library was configured and built
    echo "SKIPPED: GPU suite (tests/gpu): CUDA code compiled for $(grep -o 'EPMOE_CUDA_ARCHS:STRING=.*' build/CMakeCache.txt | cut -d= -f2), but this machine has no NVIDIA GPU; run 'bash deploy/gpu-test.sh' on one"
  else
    echo "SKIPPED: GPU suite (tests/gpu): no CUDA compiler and no GPU on this machine"
  fi
fi
