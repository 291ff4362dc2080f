#!/usr/bin/env bash
# The batch job end to end: bit-identical outputs for 1..4 ranks; every program's --help and
# --version; --print-config without a job; and the bad-input catalogue: every bad argument,
# output path, checkpoint or input rejected with the exact exit code and a message naming the
# argument, file or tensor, the early ones by rank 0 before any rank loads weights.
# Usage: test_run_cli.sh BIN_DIR PYTHON WORK_DIR VERSION
set -uo pipefail
build=$1 py=$2 work=$3 version=${4:-}
here=$(cd "$(dirname "$0")" && pwd)
source "$here/cli_common.sh"

"$build/epmoe-gen" --preset tiny --n_layers 2 --out "$work/ckpt" >/dev/null || { echo "gen failed"; exit 1; }
"$build/epmoe-gen" --preset tiny --input-out "$work/in.safetensors" --tokens 301 --dtype bf16 >/dev/null
# no clamp, no hash layer: outputs grow with the inputs (the F16 overflow cases)
"$build/epmoe-gen" --preset tiny --n_layers 1 --n_hash_layers 0 --swiglu_limit 0 \
  --out "$work/ckpt_noclamp" >/dev/null
"$py" "$here/st_write.py" "$work" 256 40 || exit 1

# ---- bit identity over rank counts -------------------------------------------------------------
for np in 1 2 3 4; do
  mpirun -np $np "$build/epmoe-run" --checkpoint "$work/ckpt" --input "$work/in.safetensors" \
    --output "$work/out$np.safetensors" --quiet >"$work/log$np" 2>&1 || fail "np=$np run ($(tail -1 "$work/log$np"))"
done
for np in 2 3 4; do
  if cmp -s "$work/out1.safetensors" "$work/out$np.safetensors"; then ok "np=$np output bit-identical to np=1"
  else fail "np=$np output differs from np=1"; fi
done
# hosts emulated on one: shared memory off, every byte over TCP (loopback)
OMPI_MCA_btl=self,tcp OMPI_MCA_btl_tcp_if_include=lo mpirun -np 3 "$build/epmoe-run" \
  --checkpoint "$work/ckpt" --input "$work/in.safetensors" --output "$work/out_tcp.safetensors" \
  --quiet >"$work/log_tcp" 2>&1
if cmp -s "$work/out1.safetensors" "$work/out_tcp.safetensors"; then ok "np=3 over TCP (no shared memory): bit-identical"
else fail "np=3 over TCP differs from np=1 ($(tail -1 "$work/log_tcp"))"; fi
mpirun -np 2 "$build/epmoe-run" --checkpoint "$work/ckpt" --input "$work/in.safetensors" \
  --output "$work/out_nocache.safetensors" --cpu_weight_cache_mib 0 --quiet >"$work/log_nc" 2>&1
if cmp -s "$work/out1.safetensors" "$work/out_nocache.safetensors"; then ok "no weight cache: bit-identical"
else fail "dequantizing per forward changes the output"; fi
mpirun -np 2 "$build/epmoe-run" --checkpoint "$work/ckpt" --input "$work/in.safetensors" \
  --output "$work/out_l1.safetensors" --layers 1:2 --quiet >"$work/log_l1" 2>&1 \
  && ok "--layers 1:2 runs" || fail "--layers 1:2 ($(tail -1 "$work/log_l1"))"
# an existing regular file is replaced (the one kind of existing path an output may be)
cp "$work/out_l1.safetensors" "$work/replace_me.safetensors"
mpirun -np 1 "$build/epmoe-run" --checkpoint "$work/ckpt" --input "$work/in.safetensors" \
  --output "$work/replace_me.safetensors" --quiet >/dev/null 2>&1 \
  && cmp -s "$work/out1.safetensors" "$work/replace_me.safetensors" \
  && ok "an existing regular output file is replaced" || fail "replacing a regular output file"

# ---- --help, --version, --print-config ---------------------------------------------------------
for prog in epmoe-run epmoe-gen epmoe-serve epmoe-client; do
  [ -x "$build/$prog" ] || { echo "skip $prog (not built)"; continue; }
  for flag in -h --help; do
    out=$("$build/$prog" $flag 2>&1); rc=$?
    [ $rc -eq 0 ] && grep -q "usage: .*$prog" <<<"$out" && ok "$prog $flag: usage, exit 0" \
      || fail "$prog $flag: rc=$rc: $(head -c 200 <<<"$out")"
  done
  out=$("$build/$prog" --version 2>&1); rc=$?
  [ $rc -eq 0 ] && [ "$out" = "$prog ${version}" ] && ok "$prog --version: '$out'" \
    || fail "$prog --version: rc=$rc: '$out' (expected '$prog $version')"
done
out=$("$build/epmoe-run" --print-config 2>&1); rc=$?
[ $rc -eq 0 ] && grep -q "^max_tokens_per_rank *= 4096 .*\[1\.\.1048576\]" <<<"$out" \
  && ok "--print-config alone: prints, exits 0, integer bounds as integers" \
  || fail "--print-config alone: rc=$rc: $(head -c 300 <<<"$out")"
out=$(mpirun -np 2 "$build/epmoe-run" --print-config --checkpoint "$work/ckpt" \
        --max-tokens-per-rank 64 2>&1); rc=$?
[ $rc -eq 0 ] && grep -q "^n_layers *= 2 " <<<"$out" && grep -q "^max_tokens_per_rank *= 64 " <<<"$out" \
  && ! grep -q "loaded layer" <<<"$out" \
  && ok "--print-config --checkpoint: the checkpoint's model settings, no job" \
  || fail "--print-config --checkpoint: rc=$rc: $(head -c 300 <<<"$out")"

# ---- the bad-input catalogue -------------------------------------------------------------------
# expect NAME NP CODE PATTERN ARGS...: exit code CODE and PATTERN in the output, and no source
# location ("run_main.c:136: ": those are for developers, EPMOE_ERROR_LOCATIONS=1). An exit
# code 2 is an error found by rank 0 before loading: no rank may have loaded a layer.
source_location='[A-Za-z0-9_]+\.(c|cu|h):[0-9]+: '
expect() {
  local name=$1 np=$2 code=$3 pattern=$4; shift 4
  local out rc
  out=$(mpirun -np "$np" "$build/epmoe-run" "$@" 2>&1); rc=$?
  if [ $rc -ne "$code" ]; then fail "$name: exit $rc, expected $code: $(head -c 400 <<<"$out")"
  elif ! grep -qF -- "$pattern" <<<"$out"; then fail "$name: no '$pattern' in: $(head -c 400 <<<"$out")"
  elif grep -qE -- "$source_location" <<<"$out"; then fail "$name: a source location in: $(head -c 400 <<<"$out")"
  elif [ "$code" -eq 2 ] && grep -q "loaded layer" <<<"$out"; then fail "$name: weights loaded before the error"
  else ok "$name: exit $code, names '$pattern'"; fi
}
out=$(EPMOE_ERROR_LOCATIONS=1 mpirun -np 1 -x EPMOE_ERROR_LOCATIONS "$build/epmoe-run" 2>&1)
grep -qE -- "$source_location--checkpoint, --input and --output are required" <<<"$out" \
  && ok "EPMOE_ERROR_LOCATIONS=1: the message keeps its source location" \
  || fail "EPMOE_ERROR_LOCATIONS=1: no source location in: $(head -c 300 <<<"$out")"
ck=(--checkpoint "$work/ckpt")
io=(--input "$work/good.safetensors" --output "$work/bad_out.safetensors")
c=("${ck[@]}" --output "$work/bad_out.safetensors")
# arguments
expect "no arguments"            2 2 "--checkpoint, --input and --output are required"
expect "unknown argument"        2 2 "'--bogus'"               "${ck[@]}" "${io[@]}" --bogus
expect "value missing"           2 2 "'--input'"               "${ck[@]}" --output "$work/bad_out.safetensors" --input
expect "--layers trailing junk"  2 2 "--layers '0:2x'"         "${ck[@]}" "${io[@]}" --layers 0:2x
expect "--layers one number"     2 2 "--layers '1'"            "${ck[@]}" "${io[@]}" --layers 1
expect "--layers negative"       2 2 "--layers '-1:2'"         "${ck[@]}" "${io[@]}" --layers -1:2
expect "--layers empty range"    2 2 "--layers 1:1 outside"    "${ck[@]}" "${io[@]}" --layers 1:1
expect "--layers past the end"   2 2 "--layers 1:5 outside the checkpoint's 2 layers" "${ck[@]}" "${io[@]}" --layers 1:5
expect "integer setting junk"    2 2 "setting max_tokens_per_rank: '12abc'" "${ck[@]}" "${io[@]}" --max_tokens_per_rank 12abc
expect "integer setting spaced"  2 2 "setting seed: ' 5'"      "${ck[@]}" "${io[@]}" --seed " 5"
expect "number setting junk"     2 2 "setting collective_timeout_s: '5s'" "${ck[@]}" "${io[@]}" --collective_timeout_s 5s
expect "setting out of bounds"   2 2 "max_tokens_per_rank: 0 outside [1, 1048576]" "${ck[@]}" "${io[@]}" --max_tokens_per_rank=0
expect "enum setting"            2 2 "setting act_quant: 'int8' is not one of nvfp4|high|fp8" "${ck[@]}" "${io[@]}" --act-quant int8
expect "model setting"           2 2 "'top_k' is a model setting" "${ck[@]}" "${io[@]}" --top_k 4
expect "model setting, = form"   2 2 "'hidden_size' is a model setting" "${ck[@]}" "${io[@]}" --hidden-size=512
expect "preset"                  2 2 "'preset' is a model setting" "${ck[@]}" "${io[@]}" --preset dsv3
# output paths (issue 24, defects 4 and 5): refused before loading, nothing replaced
ln -sfn "$work/link_target" "$work/link.safetensors"
mkdir -p "$work/a_directory"
expect "output /dev/null"        2 2 "output /dev/null is a character device" "${ck[@]}" --input "$work/good.safetensors" --output /dev/null
[ -c /dev/null ] && ok "/dev/null is still a character device" || fail "/dev/null was replaced"
expect "output symlink"          2 2 "link.safetensors is a symbolic link" "${ck[@]}" --input "$work/good.safetensors" --output "$work/link.safetensors"
[ -L "$work/link.safetensors" ] && [ ! -e "$work/link_target" ] && ok "the symlink is intact, its target not created" \
  || fail "the output symlink was replaced or followed"
expect "output directory"        2 2 "a_directory is a directory" "${ck[@]}" --input "$work/good.safetensors" --output "$work/a_directory"
expect "output empty"            2 2 "output path is empty" "${ck[@]}" --input "$work/good.safetensors" --output ""
expect "output dir missing"      2 2 "directory $work/no_such_dir" "${ck[@]}" --input "$work/good.safetensors" --output "$work/no_such_dir/out.safetensors"
# checkpoints
mkdir -p "$work/not_a_ckpt"
expect "checkpoint missing"      2 2 "$work/nonexistent_ckpt" --checkpoint "$work/nonexistent_ckpt" "${io[@]}"
expect "checkpoint empty dir"    2 2 "$work/not_a_ckpt"     --checkpoint "$work/not_a_ckpt" "${io[@]}"
cp -r "$work/ckpt" "$work/ckpt_trunc"
f=$(ls "$work/ckpt_trunc"/*.safetensors | tail -1)
truncate -s 100000 "$f"
expect "truncated checkpoint"    2 2 "$(basename "$f")"     --checkpoint "$work/ckpt_trunc" "${io[@]}"
# damaged checkpoints (tests/cli/ckpt_mutate.py edits headers and bytes); metadata is read by
# rank 0 before loading (exit 2), tensors by the rank that owns them while loading (exit 1)
mutate() { "$py" "$here/ckpt_mutate.py" "$work/ckpt" "$work/ckpt_bad" "$@" || fail "ckpt_mutate $*"; }
mutate meta epmoe.hidden_size -
expect "metadata missing"        2 2 "metadata epmoe.hidden_size is missing" --checkpoint "$work/ckpt_bad" "${io[@]}"
mutate meta epmoe.format_version 2
expect "format version"          2 2 "checkpoint format version 2" --checkpoint "$work/ckpt_bad" "${io[@]}"
mutate meta epmoe.top_k 7x
expect "metadata not a number"   2 2 "metadata epmoe.top_k" --checkpoint "$work/ckpt_bad" "${io[@]}"
mutate drop layers.1.ffn.experts.200.w2.weight
expect "expert tensor missing"   2 1 "tensor layers.1.ffn.experts.200.w2.weight not found" --checkpoint "$work/ckpt_bad" "${io[@]}"
mutate dtype layers.1.ffn.experts.200.w1.weight_scale U8
expect "scale dtype"             2 1 "layers.1.ffn.experts.200.w1.weight_scale: dtype U8, expected F8_E4M3" --checkpoint "$work/ckpt_bad" "${io[@]}"
mutate shape layers.1.ffn.gate.weight 128,512
expect "gate shape"              2 1 "layers.1.ffn.gate.weight: shape [128, 512], expected [256, 256]" --checkpoint "$work/ckpt_bad" "${io[@]}"
mutate nan layers.0.ffn.gate.weight
expect "NaN in a weight"         2 1 "layers.0.ffn.gate.weight: element 0 is nan" --checkpoint "$work/ckpt_bad" "${io[@]}"
"$build/epmoe-gen" --preset tiny --n_layers 1 --n_routed_experts 4 --top_k 2 --out "$work/ckpt4" >/dev/null
expect "more ranks than experts" 5 2 "5 ranks for 4 routed experts" --checkpoint "$work/ckpt4" "${io[@]}"
# inputs
expect "input missing"           2 2 "nonexistent.safetensors" "${c[@]}" --input "$work/nonexistent.safetensors"
expect "input not safetensors"   2 2 "not_safetensors.bin"  "${c[@]}" --input "$work/not_safetensors.bin"
expect "input truncated"         2 2 "truncated.safetensors" "${c[@]}" --input "$work/truncated.safetensors"
expect "no hidden_states"        2 2 "no tensor 'hidden_states'" "${c[@]}" --input "$work/no_hidden.safetensors"
expect "wrong hidden size"       2 2 "expected [T, 256]"    "${c[@]}" --input "$work/wrong_hidden.safetensors"
expect "wrong dtype"             2 2 "hidden_states dtype I32" "${c[@]}" --input "$work/wrong_dtype.safetensors"
expect "token_ids float"         2 2 "token_ids must be I32 or I64" "${c[@]}" --input "$work/ids_float.safetensors"
expect "token_ids short"         2 2 "token_ids must be I32 or I64 of shape [40]" "${c[@]}" --input "$work/ids_short.safetensors"
expect "token id negative"       2 2 "token_ids[4] = -1 outside the vocabulary" "${c[@]}" --input "$work/ids_negative.safetensors"
expect "token id too large"      2 2 "token_ids[2] = 5000 outside the vocabulary" "${c[@]}" --input "$work/bad_ids.safetensors"
expect "missing token ids"       2 2 "no token_ids, but layer 0 is hash-routed" "${c[@]}" --input "$work/no_ids.safetensors"
expect "NaN input"               3 1 "hidden_states: element [3, 5] is nan" "${c[@]}" --input "$work/nan.safetensors"
expect "Inf input"               2 1 "hidden_states: element [7, 9] is inf" "${c[@]}" --input "$work/inf.safetensors"
# an output its dtype cannot hold (issue 24, defect 10): F16 fails naming the element, BF16 runs
expect "F16 output overflow"     2 1 "does not fit F16 (largest finite 65504)" --checkpoint "$work/ckpt_noclamp" \
  --input "$work/f16_big.safetensors" --output "$work/bad_out.safetensors"
grep -q "output element \[[0-9]*, [0-9]*\]" <<<"$(mpirun -np 1 "$build/epmoe-run" --checkpoint "$work/ckpt_noclamp" \
  --input "$work/f16_big.safetensors" --output "$work/bad_out.safetensors" 2>&1)" \
  && ok "F16 overflow message names the element [row, column]" || fail "F16 overflow message names no element"
out=$(mpirun -np 2 "$build/epmoe-run" --checkpoint "$work/ckpt_noclamp" --input "$work/bf16_big.safetensors" \
        --output "$work/bf16_big_out.safetensors" --quiet 2>&1); rc=$?
if [ $rc -eq 0 ] && "$py" "$here/st_write.py" finite "$work/bf16_big_out.safetensors"; then
  ok "the same rows in BF16: exit 0, every output finite"
else fail "BF16 rows beyond F16's range: rc=$rc $(tail -2 <<<"$out")"; fi
[ ! -e "$work/bad_out.safetensors" ] && ok "no output written on errors" || fail "an output was written despite errors"
ls "$work"/*.tmp >/dev/null 2>&1 && fail "temporary files left behind: $(ls "$work"/*.tmp)" || ok "no temporary files left"

echo "$passed passed, $failed failed"
[ $failed -eq 0 ]
