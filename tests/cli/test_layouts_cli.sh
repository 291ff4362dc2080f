#!/usr/bin/env bash
# Every checkpoint layout through epmoe-run (docs/checkpoints.md): epmoe-gen's own (NVFP4 and
# MXFP4 experts), DeepSeek's release and NVIDIA's NVFP4 re-quantization, tiny shapes with an
# MTP layer. Each on 1 and 4 ranks: bit-identical outputs, within tolerance of the float64
# reference computed from the checkpoint's own tensors (ref_check), and a real-layout
# directory bit-identical to the epmoe layout of the same weights. Then MXFP4 blocks the plain
# conversion refused (all-zero at 2^-127, 20 binades down), a --layers range, and broken
# directories refused before any output is written.
# Usage: test_layouts_cli.sh BIN_DIR PYTHON WORK_DIR REF_CHECK
set -uo pipefail
build=$1 py=$2 work=$3 ref_check=$4
here=$(cd "$(dirname "$0")" && pwd)
source "$here/cli_common.sh"

gen() { # NAME ARGS...
  local name=$1; shift
  "$build/epmoe-gen" --preset tiny --n-layers 3 --n_mtp_layers 1 --shard-mb 2 --out "$work/$name" \
    "$@" >"$work/gen_$name.log" 2>&1 || { echo "gen $name failed: $(tail -1 "$work/gen_$name.log")"; exit 1; }
}
gen epmoe-nv --weight_format nvfp4
gen epmoe-mx --weight_format mxfp4
gen deepseek --layout deepseek
gen nvidia --layout nvidia-nvfp4
"$build/epmoe-gen" --preset tiny --input-out "$work/in.safetensors" --tokens 101 --dtype f32 >/dev/null

run() { # CKPT NP OUT [ARGS...]
  local ckpt=$1 np=$2 out=$3; shift 3
  mpirun -np "$np" "$build/epmoe-run" --checkpoint "$work/$ckpt" --input "$work/in.safetensors" \
    --output "$work/$out" --quiet "$@" >"$work/$out.log" 2>&1
}

for d in epmoe-nv epmoe-mx deepseek nvidia; do
  run $d 1 "$d.np1.safetensors" || fail "$d np=1 ($(tail -1 "$work/$d.np1.safetensors.log"))"
  run $d 4 "$d.np4.safetensors" || fail "$d np=4 ($(tail -1 "$work/$d.np4.safetensors.log"))"
  if cmp -s "$work/$d.np1.safetensors" "$work/$d.np4.safetensors"; then ok "$d: 4 ranks bit-identical to 1"
  else fail "$d: 4 ranks differ from 1"; fi
  if out=$("$ref_check" "$work/$d" "$work/in.safetensors" "$work/$d.np1.safetensors"); then ok "$d: $out"
  else fail "$d: $out"; fi
done
for pair in "deepseek epmoe-mx" "nvidia epmoe-nv"; do
  set -- $pair
  if cmp -s "$work/$1.np1.safetensors" "$work/$2.np1.safetensors"; then ok "$1 bit-identical to $2 (same weights)"
  else fail "$1 differs from $2"; fi
done

# A layer range: layer 1 and the MTP layer (2), on 2 ranks.
run deepseek 2 range.safetensors --layers 1:3 && out=$("$ref_check" "$work/deepseek" "$work/in.safetensors" \
  "$work/range.safetensors" 1:3) && ok "deepseek --layers 1:3: $out" || fail "deepseek --layers 1:3"

# MXFP4 the plain conversion refused: every layer-1 expert's w1 and w2 get an all-zero block at
# 2^-127 and a block 20 binades below the rest.
cp -r "$work/deepseek" "$work/mx-edge"
"$py" "$here/mx_edge.py" "$work/mx-edge" 'layers.1.ffn.experts.*.w[12]' >/dev/null || fail "mx_edge.py"
run mx-edge 1 mx-edge.np1.safetensors && run mx-edge 3 mx-edge.np3.safetensors \
  && cmp -s "$work/mx-edge.np1.safetensors" "$work/mx-edge.np3.safetensors" \
  && out=$("$ref_check" "$work/mx-edge" "$work/in.safetensors" "$work/mx-edge.np1.safetensors") \
  && ok "MXFP4 zero blocks and a 20-binade span: loads, 3 ranks = 1, $out" \
  || fail "MXFP4 zero blocks and wide span ($(tail -1 "$work/mx-edge.np1.safetensors.log"))"
cmp -s "$work/mx-edge.np1.safetensors" "$work/deepseek.np1.safetensors" \
  && fail "the edited weights changed nothing" || ok "the edited weights change the output"

# Broken directories: refused on every rank count, naming the file and the tensor, no output.
expect_refused() { # NAME PATTERN CKPT
  local name=$1 pattern=$2 ckpt=$3 rc
  rm -f "$work/broken.safetensors"
  run "$ckpt" 2 broken.safetensors; rc=$?
  if [ $rc -ne 0 ] && grep -q -- "$pattern" "$work/broken.safetensors.log" && [ ! -e "$work/broken.safetensors" ]; then
    ok "$name: refused ($pattern)"
  else fail "$name: rc=$rc, $(tail -2 "$work/broken.safetensors.log")"; fi
}
cp -r "$work/nvidia" "$work/no-shard"
shard=$("$py" -c "import json,sys; print(json.load(open(sys.argv[1]))['weight_map']['layers.1.ffn.experts.200.w2.weight'])" \
  "$work/no-shard/model.safetensors.index.json")
rm "$work/no-shard/$shard"
expect_refused "missing shard" "$shard.*No such file\|No such file.*$shard" no-shard
cp -r "$work/deepseek" "$work/bad-config"
"$py" -c "import json,sys; p=sys.argv[1]; c=json.load(open(p)); c['moe_intermediate_size']=256; json.dump(c, open(p,'w'))" \
  "$work/bad-config/config.json"
expect_refused "config.json disagreeing with the tensors" "config.json.*layers.0.ffn.experts.0.w1.weight" bad-config

# epmoe-gen counts layers with --n-layers; --layers (epmoe-run's range) is refused, not guessed.
out=$("$build/epmoe-gen" --preset tiny --layers 2 --out "$work/never" 2>&1); rc=$?
if [ $rc -ne 0 ] && grep -q -- "--n-layers" <<<"$out" && [ ! -e "$work/never" ]; then ok "epmoe-gen --layers refused, pointing to --n-layers"
else fail "epmoe-gen --layers: rc=$rc, $out"; fi
grep -q "GiB in .* files" "$work/gen_deepseek.log" && ok "epmoe-gen prints the size and an estimate first" \
  || fail "epmoe-gen did not print its plan: $(head -2 "$work/gen_deepseek.log")"

echo "$passed passed, $failed failed"
[ $failed -eq 0 ]
