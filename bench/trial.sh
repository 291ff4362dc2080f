#!/usr/bin/env bash
# A/B trial of changes that are not on main yet, in one device call (GPU machine, repo root,
# carry .carry): the tree as it is (A) and the tree with each patch applied on its own (B1, B2,
# ...; one build directory, so a patch costs an incremental build). Each variant is built and
# its GPU op and GEMM suites run; then the whole layer (both presets, decode sizes) and AUTO's
# GEMM at 8 and 16 rows (overlapped and serial launch) are timed for every variant in turn, on
# the same machine, in rounds (A B1 B2 .., then .. B2 B1 A). A change goes to main only with
# its B/A figures in bench/RESULTS.md.
#   bash bench/trial.sh <patch> [<patch> ...] [--reps N] [--gemm-rows 8,16] [--gemm-kernels 5]
# (--gemm-rows/--gemm-kernels: what gemm_bench times beside AUTO, e.g. prefill rows 768,3072
# and the WS kernels 9,10 for a change to the prefill kernels; --no-layer skips the whole-layer
# timing, for a change the GEMM timing alone decides; --layer-rows 8,32,96 its rows per expert;
# --no-test skips the suites, for the ablation patches, which break the output on purpose;
# --rounds N times every variant N times, the order reversed each round, because a variant timed
# after another ran 1-3% faster in v10: a no-op change measured "0.97-1.0x" that way)
# The patches wait in bench/trials/ (each says in its diff what it changes; RESULTS says why).
# Everything lands in $OUT/trial.tgz (plus a summary on stdout); variant Bi is the i-th patch.
set -uo pipefail
cd "$(dirname "$0")/.."
PATCHES=()
REPS=10
GEMM_ROWS=8,16
GEMM_KERNELS=5
LAYER=1
LAYER_ROWS=8,32,96
TEST=1
ROUNDS=2
while [ $# -gt 0 ]; do
  case "$1" in
    --reps) REPS="$2"; shift 2 ;;
    --gemm-rows) GEMM_ROWS="$2"; shift 2 ;;
    --gemm-kernels) GEMM_KERNELS="$2"; shift 2 ;;
    --no-layer) LAYER=0; shift ;;
    --layer-rows) LAYER_ROWS="$2"; shift 2 ;;
    --no-test) TEST=0; shift ;;
    --rounds) ROUNDS="$2"; shift 2 ;;
    *) [ -f "$1" ] || { echo "no patch file $1"; exit 2; }; PATCHES+=("$(realpath "$1")"); shift ;;
  esac
done
[ ${#PATCHES[@]} -ge 1 ] || { echo "usage: bash bench/trial.sh <patch> [<patch> ...] [--reps N]"; exit 2; }
source deploy/gpu-env.sh
FINAL_OUT="${OUT:-$PWD/out}"
mkdir -p "$FINAL_OUT"
R=/tmp/epmoe-trial
rm -rf "$R"; mkdir -p "$R"
BUILD=build-trial
pack() { tar -C /tmp -czf "$FINAL_OUT/trial.tgz" epmoe-trial; }
rc=0

# build and check the tree as it is now, as variant $1; its benchmarks are kept in $R/bin_$1
# (the libraries are static, so each copy is that variant alone)
variant() {
  local v="$1"
  { cmake -S . -B $BUILD -DEPMOE_CUDA=ON -DEPMOE_CUDA_ARCHS=90a -DEPMOE_SERVICE=OFF \
      -DCMAKE_BUILD_TYPE=Release && \
    cmake --build $BUILD -j"$(nproc)" --target test_gpu_ops test_gemm layer_bench gemm_bench; } \
    > "$R/build_$v.log" 2>&1 || { echo "$v: build failed"; tail -20 "$R/build_$v.log"; rc=1; return; }
  [ "$TEST" = 1 ] && for t in test_gpu_ops test_gemm; do
    timeout 600 ./$BUILD/tests/gpu/$t > "$R/${t}_$v.log" 2>&1 || rc=1
    echo "$v $t: $(tail -1 "$R/${t}_$v.log")"
  done
  mkdir -p "$R/bin_$v"
  cp $BUILD/bench/layer_bench $BUILD/bench/gemm_bench "$R/bin_$v/"
}

# time variant $1 once, as round $2 (files *_$1_r$2.*)
timing() {
  local v="$1" k="$2"
  [ "$LAYER" = 1 ] && for preset in dsv4-flash dsv4-pro; do
    "$R/bin_$v/layer_bench" --preset $preset --rows "$LAYER_ROWS" --reps "$REPS" \
      --json "$R/layer_${preset}_${v}_r$k.json" > "$R/layer_${preset}_${v}_r$k.txt" 2>&1 || rc=1
  done
  "$R/bin_$v/gemm_bench" --json "$R/gemm_${v}_r$k.json" --reps "$REPS" --rows "$GEMM_ROWS" \
    --kernels "$GEMM_KERNELS" --no-row-major --serial-too > "$R/gemm_${v}_r$k.log" 2>&1 || rc=1
}

variant A
VARIANTS=(A)
i=0
for PATCH in "${PATCHES[@]}"; do
  i=$((i + 1))
  echo "B$i = $(basename "$PATCH")" | tee -a "$R/variants.txt"
  patch -p1 < "$PATCH" > "$R/patch_B$i.log" 2>&1 || { echo "B$i does not apply:"; cat "$R/patch_B$i.log"; rc=1; continue; }
  variant "B$i"
  VARIANTS+=("B$i")
  patch -R -p1 < "$PATCH" > /dev/null 2>&1
done
pack

ORDER=("${VARIANTS[@]}")
for k in $(seq 1 "$ROUNDS"); do
  for v in "${ORDER[@]}"; do timing "$v" "$k"; done
  pack
  REV=(); for ((j = ${#ORDER[@]} - 1; j >= 0; j--)); do REV+=("${ORDER[j]}"); done
  ORDER=("${REV[@]}")
done

for k in $(seq 1 "$ROUNDS"); do
  for v in "${VARIANTS[@]}"; do
    echo "== $v round $k"
    [ "$LAYER" = 1 ] && grep -h -A4 "rows/exp" "$R"/layer_*_${v}_r$k.txt
    grep -E "^V4|decode stream|wgmma-ws" "$R/gemm_${v}_r$k.log"
  done
done
exit $rc
