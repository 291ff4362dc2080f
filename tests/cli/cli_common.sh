# Sourced by the batch-job suites (tests/cli/test_*.sh) after they set `here` and `work`: Open
# MPI on one host, a fresh work folder, the pass/fail counters.
source "$here/../../deploy/mpi-env.sh"
# These suites check the CPU backend at its tolerances, also on a machine with a GPU (where
# backend=auto would pick cuda); the cuda backend's are tests/product/gpu_product.sh.
export EPMOE_BACKEND=cpu
rm -rf "$work" && mkdir -p "$work"
passed=0 failed=0
ok()   { echo "ok   $1"; passed=$((passed + 1)); }
fail() { echo "FAIL $1"; failed=$((failed + 1)); }
