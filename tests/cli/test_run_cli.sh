#!/usr/bin/env bash
# The batch job end to end: bit-identical outputs for 1..4 ranks, and every bad input or
# setup rejected by rank 0 before any work, with a message naming what is wrong and a
# non-zero exit. Usage: test_run_cli.sh BUILD_DIR PYTHON WORK_DIR
set -uo pipefail
build=$1 py=$2 work=$3
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../../deploy/mpi-env.sh"
rm -rf "$work" && mkdir -p "$work"
passed=0 failed=0
ok()   { echo "ok   $1"; passed=$((passed + 1)); }
fail() { echo "FAIL $1"; failed=$((failed + 1)); }

"$build/epmoe-gen" --preset tiny --n_layers 2 --out "$work/ckpt" >/dev/null || { echo "gen failed"; exit 1; }
"$build/epmoe-gen" --preset tiny --input-out "$work/in.safetensors" --tokens 301 --dtype bf16 >/dev/null
"$py" "$here/st_write.py" "$work" 256 40 || exit 1

for np in 1 2 3 4; do
  mpirun -np $np "$build/epmoe-run" --checkpoint "$work/ckpt" --input "$work/in.safetensors" \
    --output "$work/out$np.safetensors" --quiet >"$work/log$np" 2>&1 || fail "np=$np run ($(tail -1 "$work/log$np"))"
done
for np in 2 3 4; do
  if cmp -s "$work/out1.safetensors" "$work/out$np.safetensors"; then ok "np=$np output bit-identical to np=1"
  else fail "np=$np output differs from np=1"; fi
done
mpirun -np 2 "$build/epmoe-run" --checkpoint "$work/ckpt" --input "$work/in.safetensors" \
  --output "$work/out_nocache.safetensors" --cpu_weight_cache_mib 0 --quiet >"$work/log_nc" 2>&1
if cmp -s "$work/out1.safetensors" "$work/out_nocache.safetensors"; then ok "no weight cache: bit-identical"
else fail "dequantizing per forward changes the output"; fi
mpirun -np 2 "$build/epmoe-run" --checkpoint "$work/ckpt" --input "$work/in.safetensors" \
  --output "$work/out_l1.safetensors" --layers 1:2 --quiet >"$work/log_l1" 2>&1 \
  && ok "--layers 1:2 runs" || fail "--layers 1:2 ($(tail -1 "$work/log_l1"))"

# expect_error NAME NP PATTERN ARGS...: non-zero exit and PATTERN in the output
expect_error() {
  local name=$1 np=$2 pattern=$3; shift 3
  local out rc
  out=$(mpirun -np "$np" "$build/epmoe-run" "$@" 2>&1); rc=$?
  if [ $rc -ne 0 ] && grep -q -- "$pattern" <<<"$out"; then ok "$name: rejected ($pattern)"
  else fail "$name: rc=$rc, output: $(head -c 400 <<<"$out")"; fi
}
c=(--checkpoint "$work/ckpt" --output "$work/bad_out.safetensors")
expect_error "wrong hidden size" 2 "expected \[T, 256\]" "${c[@]}" --input "$work/wrong_hidden.safetensors"
expect_error "wrong dtype"       2 "dtype I32"           "${c[@]}" --input "$work/wrong_dtype.safetensors"
expect_error "missing token ids" 2 "no token_ids"        "${c[@]}" --input "$work/no_ids.safetensors"
expect_error "NaN input"         3 "NaN/Inf"             "${c[@]}" --input "$work/nan.safetensors"
expect_error "token id range"    2 "outside the vocabulary" "${c[@]}" --input "$work/bad_ids.safetensors"
expect_error "bad layer range"   2 "outside the checkpoint" "${c[@]}" --input "$work/good.safetensors" --layers 1:5
expect_error "missing input"     2 "nonexistent"         "${c[@]}" --input "$work/nonexistent.safetensors"
"$build/epmoe-gen" --preset tiny --n_layers 1 --n_routed_experts 4 --top_k 2 --out "$work/ckpt4" >/dev/null
expect_error "more ranks than experts" 5 "5 ranks for 4 routed experts" --checkpoint "$work/ckpt4" \
  --output "$work/bad_out.safetensors" --input "$work/good.safetensors"
cp -r "$work/ckpt" "$work/ckpt_trunc"
f=$(ls "$work/ckpt_trunc"/*.safetensors | tail -1)
truncate -s 100000 "$f"
expect_error "truncated checkpoint" 2 "$(basename "$f")" --checkpoint "$work/ckpt_trunc" \
  --output "$work/bad_out.safetensors" --input "$work/good.safetensors"
[ ! -e "$work/bad_out.safetensors" ] && ok "no output written on errors" || fail "an output was written despite errors"

echo "$passed passed, $failed failed"
[ $failed -eq 0 ]
