#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine for epmoe and builds it. Idempotent: run it again at will.
#   - Debian packages: compiler, CMake, Open MPI, jansson, Check, protobuf-c, gRPC, clang with
#     libFuzzer (the fuzz suite)
#   - a Python virtualenv (.venv) with the test oracles (ml_dtypes, numpy) and the stock
#     gRPC client used by the client tests (grpcio, grpcio-tools), matplotlib for bench plots
#   - a Release build in build/ (CUDA kernels too when nvcc is present)
# Environment: EPMOE_SKIP_APT=1 skips apt (no root), EPMOE_BUILD_DIR (default build).
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(build-essential cmake pkg-config git python3 python3-venv
          libopenmpi-dev openmpi-bin libjansson-dev check
          libprotobuf-c-dev protobuf-c-compiler libgrpc-dev
          clang libclang-rt-14-dev)  # libFuzzer (tests/fuzz); without it fuzz.run is skipped

if [ "${EPMOE_SKIP_APT:-0}" != 1 ]; then
  missing=()
  for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import ml_dtypes, numpy, grpc, grpc_tools, matplotlib" 2>/dev/null; then
  echo "setup: installing Python test oracles into .venv"
  .venv/bin/pip install -q --disable-pip-version-check -r deploy/requirements.txt
fi

# The CUDA toolkit installs outside the default PATH; CMake finds nvcc through PATH.
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH="/usr/local/cuda/bin:$PATH"
fi

build_dir=${EPMOE_BUILD_DIR:-build}
cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=Release ${EPMOE_CMAKE_ARGS:-} >/dev/null
cmake --build "$build_dir" -j "$(nproc)"
echo "setup: built into $build_dir"
