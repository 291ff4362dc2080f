#!/usr/bin/env bash
# gpt-oss end to end (docs/checkpoints.md, "gpt-oss"): the released layout (config.json, index,
# shards, stacked MXFP4 experts with BF16 biases) and the epmoe layout of the same seed, as
# epmoe-gen writes them at test size (gpt-oss-tiny: H 160, I 96, 32 experts, top-4), through
# epmoe-run on 1 and 4 ranks: bit-identical, bit-identical across layouts, within tolerance of
# the float64 reference computed from the checkpoint's own tensors (ref_check); skew; one layer
# at gpt-oss's real width (H = I = 2880, 4 experts); the service serving it bit-identical to
# epmoe-run; backend=cuda not refused for the model (it runs where there is a GPU); broken directories
# refused naming the file and the tensor.
# Usage: test_gptoss_cli.sh BIN_DIR PYTHON WORK_DIR REF_CHECK
set -uo pipefail
build=$1 py=$2 work=$3 ref_check=$4
here=$(cd "$(dirname "$0")" && pwd)
source "$here/cli_common.sh"
source "$here/../support/serve.sh"

gen() { # NAME ARGS...
  local name=$1; shift
  "$build/epmoe-gen" --preset gpt-oss-tiny --shard-mb 1 --out "$work/$name" "$@" \
    >"$work/gen_$name.log" 2>&1 || { echo "gen $name failed: $(tail -1 "$work/gen_$name.log")"; exit 1; }
}
gen released --layout gpt-oss
gen epmoe
gen skewed --layout gpt-oss --skew 8
"$build/epmoe-gen" --preset gpt-oss-tiny --input-out "$work/in.safetensors" --tokens 101 --dtype f32 >/dev/null
"$build/epmoe-gen" --preset gpt-oss-tiny --input-out "$work/in_bf16.safetensors" --tokens 37 --dtype bf16 \
  --seed 5 >/dev/null

run() { # CKPT NP OUT [ARGS...]
  local ckpt=$1 np=$2 out=$3; shift 3
  mpirun -np "$np" "$build/epmoe-run" --checkpoint "$work/$ckpt" --input "$work/in.safetensors" \
    --output "$work/$out" --quiet "$@" >"$work/$out.log" 2>&1
}

ls "$work/released"/model-00000-of-0000*.safetensors >/dev/null 2>&1 \
  && ok "released layout: shards named as the release names them (model-00000-of-NNNNN)" \
  || fail "released layout shard names: $(ls "$work/released")"

for d in released epmoe skewed; do
  run $d 1 "$d.np1.safetensors" || fail "$d np=1 ($(tail -1 "$work/$d.np1.safetensors.log"))"
  run $d 4 "$d.np4.safetensors" || fail "$d np=4 ($(tail -1 "$work/$d.np4.safetensors.log"))"
  if cmp -s "$work/$d.np1.safetensors" "$work/$d.np4.safetensors"; then ok "$d: 4 ranks bit-identical to 1"
  else fail "$d: 4 ranks differ from 1"; fi
  [ $d = skewed ] && continue # its reference check is per layer, below
  if out=$("$ref_check" "$work/$d" "$work/in.safetensors" "$work/$d.np1.safetensors"); then ok "$d: $out"
  else fail "$d: $out"; fi
done
# The skewed router crowds the keys of its favoured experts together, so a 4th/5th place near
# tie can go either way in fp32 and float64; chained over layers such a flip moves a token by
# its whole expert output. Layer by layer (each from the same input) the reference holds.
for r in 0:1 2:3; do
  run skewed 3 "skewed.$r.safetensors" --layers $r && out=$("$ref_check" "$work/skewed" \
    "$work/in.safetensors" "$work/skewed.$r.safetensors" $r) && ok "skewed: $out" || fail "skewed $r: ${out:-}"
done
cmp -s "$work/released.np1.safetensors" "$work/epmoe.np1.safetensors" \
  && ok "released layout bit-identical to the epmoe layout (same weights)" \
  || fail "released layout differs from the epmoe layout"

# skew: the router bias favours low expert ids; the expert counts say so, the layer is still
# dropless and right (checked above)
if out=$("$py" - "$work/skewed.np1.safetensors" "$work/released.np1.safetensors" <<'EOF'
import json, struct, sys
import numpy as np
def counts(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        h = json.loads(f.read(n))
        data = f.read()
    t = h["expert_counts"]
    a, b = t["data_offsets"]
    return np.frombuffer(data[a:b], dtype=np.int64).reshape(t["shape"])
skewed, plain = counts(sys.argv[1]), counts(sys.argv[2])
assert (skewed.sum(axis=1) == 101 * 4).all() and (plain.sum(axis=1) == 101 * 4).all()
# layer 0 sees the generated input; later layers see outputs large enough to drown the bias
low = skewed[0, :8].sum() / skewed[0].sum()
assert low > 0.6, f"skew 8: the 8 lowest experts got {low:.2f} of layer 0's pairs"
print(f"skew 8: the 8 lowest of 32 experts got {low:.0%} of layer 0's pairs (balanced: "
      f"{plain[0, :8].sum() / plain[0].sum():.0%}), every pair computed")
EOF
); then ok "$out"; else fail "skew: $out"; fi

# gpt-oss's real width, one layer: H = I = 2880 (90 x 32, not a multiple of 128), 4 experts
"$build/epmoe-gen" --preset gpt-oss-20b --layout gpt-oss --n-layers 1 --n_routed_experts 4 \
  --top_k 2 --vocab_size 64 --out "$work/wide" >"$work/gen_wide.log" 2>&1 \
  || fail "gen H=2880: $(tail -1 "$work/gen_wide.log")"
"$build/epmoe-gen" --preset gpt-oss-20b --vocab_size 64 --input-out "$work/wide_in.safetensors" \
  --tokens 12 >/dev/null
for np in 1 2; do
  mpirun -np $np "$build/epmoe-run" --checkpoint "$work/wide" --input "$work/wide_in.safetensors" \
    --output "$work/wide.np$np.safetensors" --quiet --cpu_weight_cache_mib 0 \
    >"$work/wide.np$np.log" 2>&1 || fail "H=2880 np=$np ($(tail -1 "$work/wide.np$np.log"))"
done
cmp -s "$work/wide.np1.safetensors" "$work/wide.np2.safetensors" \
  && out=$("$ref_check" "$work/wide" "$work/wide_in.safetensors" "$work/wide.np1.safetensors") \
  && ok "H = I = 2880: 2 ranks bit-identical to 1, $out" || fail "H = I = 2880: ${out:-outputs differ}"

# backend=cuda: gpt-oss runs on the GPU (tests/product/gpu_product.sh compares it with the cpu
# backend there). Where this build or machine has no GPU, the refusal names that, not the model.
rm -f "$work/cuda.safetensors"
run released 2 cuda.safetensors --backend cuda; rc=$?
if [ $rc -eq 0 ]; then
  out=$("$ref_check" "$work/released" "$work/in.safetensors" "$work/cuda.safetensors" 0:3 1e-3) \
    && ok "backend=cuda ran gpt-oss: $out" || fail "backend=cuda: ${out:-no reference}"
elif grep -q -e "this build has no CUDA code" -e "sees no CUDA device" "$work/cuda.safetensors.log" \
     && [ ! -e "$work/cuda.safetensors" ]; then
  ok "backend=cuda without a GPU: refused for that, not for the model, no output"
else fail "backend=cuda: rc=$rc, $(tail -2 "$work/cuda.safetensors.log")"; fi

# hidden_states of two files: same dtype (BF16), shape [37, 160] and bytes
same_bf16_rows() {
  "$py" - "$@" <<'EOF'
import json, struct, sys
def tensor(path, name):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        h = json.loads(f.read(n))
        data = f.read()
    t = h[name]
    a, b = t["data_offsets"]
    return t["dtype"], t["shape"], data[a:b]
served, batch = tensor(sys.argv[1], "hidden_states"), tensor(sys.argv[2], "hidden_states")
assert served[0] == "BF16" and served[1] == [37, 160], served[:2]
assert served == batch, "the served rows differ from epmoe-run's"
EOF
}

# the service: epmoe-serve on 2 ranks, epmoe-client's reply bit-identical to epmoe-run's (bf16
# rows in and out)
if [ -x "$build/epmoe-serve" ] && [ -x "$build/epmoe-client" ]; then
  mpirun -np 1 "$build/epmoe-run" --checkpoint "$work/released" --input "$work/in_bf16.safetensors" \
    --output "$work/batch_bf16.safetensors" --quiet >"$work/batch_bf16.log" 2>&1 \
    || fail "epmoe-run bf16: $(tail -1 "$work/batch_bf16.log")"
  if serve_start "$work/ready" "$work/serve.log" 120 \
       mpirun -np 2 "$build/epmoe-serve" --checkpoint "$work/released" --listen 127.0.0.1:0 \
       --ready-file "$work/ready"; then
    "$build/epmoe-client" --server "127.0.0.1:$serve_port" --info >"$work/info.log" 2>&1 \
      && grep -q "^hidden_size 160" "$work/info.log" && grep -q "^n_layers 3" "$work/info.log" \
      && ok "service Info: the gpt-oss-tiny model (hidden_size 160, 3 layers)" \
      || fail "service Info: $(cat "$work/info.log")"
    if "$build/epmoe-client" --server "127.0.0.1:$serve_port" --input "$work/in_bf16.safetensors" \
         --output "$work/served.safetensors" >"$work/client.log" 2>&1 \
       && same_bf16_rows "$work/served.safetensors" "$work/batch_bf16.safetensors"
    then ok "service: the reply is bit-identical to epmoe-run (37 rows, bf16)"
    else fail "service forward: $(tail -2 "$work/client.log")"; fi
    serve_stop && ok "service drained on SIGTERM, exit 0" \
      || fail "service: exit status $?, $(tail -3 "$work/serve.log")"
  else fail "service never ready: $(tail -3 "$work/serve.log")"; fi
else echo "skip service: this build has no epmoe-serve (EPMOE_SERVICE=OFF)"; fi

# broken directories: refused on 2 ranks, naming the file and the tensor, no output
expect_refused() { # NAME PATTERN CKPT
  local name=$1 pattern=$2 ckpt=$3 rc
  rm -f "$work/broken.safetensors"
  run "$ckpt" 2 broken.safetensors; rc=$?
  if [ $rc -ne 0 ] && grep -q -- "$pattern" "$work/broken.safetensors.log" && [ ! -e "$work/broken.safetensors" ]; then
    ok "$name: refused ($pattern)"
  else fail "$name: rc=$rc, $(tail -2 "$work/broken.safetensors.log")"; fi
}
blocks=model.layers.1.mlp.experts.gate_up_proj_blocks
shard=$("$py" -c "import json,sys; print(json.load(open(sys.argv[1]))['weight_map'][sys.argv[2]])" \
  "$work/released/model.safetensors.index.json" "$blocks")
"$py" "$here/ckpt_mutate.py" "$work/released" "$work/bad-shape" shape "$blocks" 32,192,80 >/dev/null
expect_refused "stacked blocks of the wrong shape" "$shard: $blocks: shape \[32, 192, 80\], expected \[32, 192, 5, 16\]" bad-shape
cp -r "$work/released" "$work/bad-config"
"$py" -c "import json,sys; p=sys.argv[1]; c=json.load(open(p)); c['intermediate_size']=128; json.dump(c, open(p,'w'))" \
  "$work/bad-config/config.json"
expect_refused "config.json disagreeing with the tensors" "config.json.*model.layers.0.mlp.experts.gate_up_proj_blocks" bad-config
cp -r "$work/released" "$work/bf16-copy"
"$py" -c "import json,sys; p=sys.argv[1]; c=json.load(open(p)); del c['quantization_config']; json.dump(c, open(p,'w'))" \
  "$work/bf16-copy/config.json"
expect_refused "experts not in MXFP4" "config.json: quantization_config.quant_method is missing" bf16-copy

echo "$passed passed, $failed failed"
[ $failed -eq 0 ]
