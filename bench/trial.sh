#!/usr/bin/env bash
# A/B comparison of two or more versions of the code on one GPU machine, in one run: each
# version is built in its own build directory, its GPU op and GEMM suites run, then the whole
# layer (both presets, decode sizes) and the GEMMs are timed for every version in turn, in
# rounds whose order is reversed each round (A B1 B2 .., then .. B2 B1 A), because a version
# timed right after another runs 1-3% faster (docs/perf-history.md §1).
#
#   bash bench/trial.sh <A> <B1> [<B2> ...] [--reps N] [--rounds N] [--gemm-rows 8,16]
#                       [--gemm-kernels 5] [--no-layer] [--layer-rows 8,32,96] [--no-test]
#
# Each version is a git revision of this repository (a commit, branch or tag; exported with
# `git archive`, so uncommitted changes are not part of it) or a directory holding a source
# tree (for a machine without the repository's history: export the trees beforehand with
# `git archive <rev> | tar -x -C <dir>`). The first is the baseline A; every ratio is Bi / A.
# Options: --gemm-rows/--gemm-kernels: what gemm_bench times beside AUTO (e.g. prefill rows
# 768,3072 and the WS kernel 9 for a change to the prefill kernels); --no-layer skips the
# whole-layer timing; --layer-rows its rows per expert; --no-test skips the suites (for
# timing-only ablations that break the output on purpose); --rounds N (default 2). A no-op
# change measures 0.97-1.01x this way: effects under ~2% are not resolved by one run.
#
# Needs: a CUDA GPU (sm_90), the CUDA toolkit, CMake and MPI, and git when revisions are given.
# Output: $OUT/trial.tgz (default ./out; every log, JSON and a variants.txt naming each version)
# and a summary on stdout. B/A tables: python3 bench/trial_table.py <unpacked epmoe-trial>.
set -uo pipefail
VERSIONS=()
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
    --*) echo "unknown option $1"; exit 2 ;;
    *) if [ -d "$1" ]; then VERSIONS+=("$(realpath "$1")"); else VERSIONS+=("$1"); fi; shift ;;
  esac
done
[ ${#VERSIONS[@]} -ge 2 ] || {
  echo "usage: bash bench/trial.sh <A> <B1> [<B2> ...] [options]  (git revisions or source directories)"
  exit 2
}
cd "$(dirname "$0")/.."
source deploy/gpu-env.sh
FINAL_OUT="${OUT:-$PWD/out}"
mkdir -p "$FINAL_OUT"
R=/tmp/epmoe-trial
rm -rf "$R"; mkdir -p "$R"
pack() { tar -C /tmp -czf "$FINAL_OUT/trial.tgz" epmoe-trial; }
rc=0

# the source tree of version $2 into $R/src_$1
export_tree() {
  local v="$1" what="$2"
  mkdir -p "$R/src_$v"
  if [ -d "$what" ]; then
    cp -a "$what/." "$R/src_$v/"
  elif git rev-parse --verify --quiet "$what^{commit}" > /dev/null; then
    git archive "$what" | tar -x -C "$R/src_$v"
  else
    echo "$v: '$what' is neither a directory nor a git revision"; return 1
  fi
}

# a program of build directory $1: programs land in bin/ (older trees: bench/, tests/gpu/)
find_bin() {
  local d
  for d in bin bench tests/gpu; do [ -x "$1/$d/$2" ] && { echo "$1/$d/$2"; return 0; }; done
  echo "$1/bin/$2"
}

# build and check version $1; its benchmarks are kept in $R/bin_$1 (the libraries are static,
# so each copy is that version alone)
variant() {
  local v="$1" src="$R/src_$1" build="$R/build_$1"
  { cmake -S "$src" -B "$build" -DEPMOE_CUDA=ON -DEPMOE_CUDA_ARCHS=90a -DEPMOE_SERVICE=OFF \
      -DCMAKE_BUILD_TYPE=Release && \
    cmake --build "$build" -j"$(nproc)" --target test_gpu_ops test_gemm layer_bench gemm_bench; } \
    > "$R/build_$v.log" 2>&1 || { echo "$v: build failed"; tail -20 "$R/build_$v.log"; rc=1; return 1; }
  [ "$TEST" = 1 ] && for t in test_gpu_ops test_gemm; do
    timeout 600 "$(find_bin "$build" $t)" > "$R/${t}_$v.log" 2>&1 || rc=1
    echo "$v $t: $(tail -1 "$R/${t}_$v.log")"
  done
  mkdir -p "$R/bin_$v"
  cp "$(find_bin "$build" layer_bench)" "$(find_bin "$build" gemm_bench)" "$R/bin_$v/"
}

# time version $1 once, as round $2 (files *_$1_r$2.*)
timing() {
  local v="$1" k="$2"
  [ "$LAYER" = 1 ] && for preset in dsv4-flash dsv4-pro; do
    "$R/bin_$v/layer_bench" --preset $preset --rows "$LAYER_ROWS" --reps "$REPS" \
      --json "$R/layer_${preset}_${v}_r$k.json" > "$R/layer_${preset}_${v}_r$k.txt" 2>&1 || rc=1
  done
  "$R/bin_$v/gemm_bench" --json "$R/gemm_${v}_r$k.json" --reps "$REPS" --rows "$GEMM_ROWS" \
    --kernels "$GEMM_KERNELS" --no-row-major --serial-too > "$R/gemm_${v}_r$k.log" 2>&1 || rc=1
}

VARIANTS=()
for i in "${!VERSIONS[@]}"; do
  v=A; [ "$i" -gt 0 ] && v="B$i"
  what="${VERSIONS[$i]}"
  desc="$what"
  [ -d "$what" ] || desc="$what ($(git rev-parse --short "$what^{commit}" 2>/dev/null))"
  echo "$v = $desc"
  export_tree "$v" "$what" || { rc=1; continue; }
  variant "$v" && { VARIANTS+=("$v"); echo "$v = $desc" >> "$R/variants.txt"; }
  rm -rf "$R/src_$v" "$R/build_$v"
done
pack
[ "${VARIANTS[0]:-}" = A ] || { echo "the baseline A did not build"; exit 1; }

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
