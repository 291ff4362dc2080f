#!/usr/bin/env bash
# The product on a GPU: epmoe-run with --backend cuda against --backend cpu, and against itself
# over rank counts. Needs a CUDA GPU, the programs of a CUDA build, MPI, python3 with numpy.
#   bash tests/product/gpu_product.sh BUILD_DIR WORK_DIR
# Checks (each a PASS/FAIL line; exit 1 if any failed):
#  - one layer at a time (each fed the cpu backend's input for it), NVFP4 and MXFP4 checkpoints,
#    hash layer 0 included: the GPU's routing equals the CPU's (expert_counts of every layer and
#    expert) and its output is within TOL_LAYER of the CPU's. The tolerance: the GPU rounds the
#    shared expert's activations to bf16 (2^-9) where the CPU keeps fp32, ~5e-3 measured on the
#    layer (tests/gpu/test_gpu_layer.cu); the routed NVFP4 path alone differs by fp32
#    accumulation order (~1e-6).
#  - every input dtype (f32/bf16/f16) through a layer: within TOL_LAYER of the CPU.
#  - four layers chained on the device: bit-identical to the four run one at a time.
#  - 1, 2 and 3 ranks on the GPU(s) (ranks sharing a GPU use the mpi-staged transport):
#    bit-identical outputs.
#  - skew (every token routed toward the lowest experts, so onto rank 0): nothing dropped (the
#    routing equals the CPU's, whose per-expert counts add up to tokens x top_k).
#  - a NaN in the input: non-zero exit, the message names its row.
#  - gpt-oss (checkpoints in OpenAI's released layout: interleaved gate/up, expert biases,
#    topk_softmax, the gptoss SwiGLU, no shared expert): gpt-oss-tiny (H 160) and the real width
#    (H = I = 2880, not a multiple of the GEMMs' 128-wide k step), each layer cuda vs cpu within
#    TOL_ROUTED with the same routing, a chain equal to its layers one at a time, 1/2/3 ranks
#    bit-identical, skew, W4A16, and backend=auto choosing cuda; gpt-oss-20b and -120b at full
#    size (one layer each) cuda vs cpu, and the 120b layer through epmoe-serve bit-identical
#    to epmoe-run.
set -uo pipefail
cd "$(dirname "$0")/../.."
build=${1:?build dir}
work=${2:?work dir}
bin=$build/bin
source tests/support/serve.sh
cmp="python3 tests/product/compare_outputs.py"
TOL_LAYER=1e-2
TOL_ROUTED=1e-3 # no shared expert: the routed NVFP4 path alone (fp32 accumulation order)
GPU=${EPMOE_PRODUCT_GPU_BACKEND:-cuda} # cpu: checks this script's own logic on a machine without a GPU
mkdir -p "$work"
fail=0
note() { echo "$*"; }
check() { "$@" || fail=1; }

run() { # backend np ckpt in out [args...]
  local backend=$1 np=$2 ckpt=$3 in=$4 out=$5
  shift 5
  if ! EPMOE_BACKEND=$backend mpirun -np "$np" "$bin/epmoe-run" --checkpoint "$ckpt" \
      --input "$in" --output "$out" --quiet "$@" >"$out.log" 2>&1; then
    echo "FAIL: epmoe-run backend=$backend np=$np $in -> $out $*"
    tail -5 "$out.log"
    fail=1
    return 1
  fi
}

"$bin/epmoe-gen" --preset tiny --n_layers 4 --out "$work/nvfp4" >/dev/null || exit 1
"$bin/epmoe-gen" --preset tiny --n_layers 4 --weight_format mxfp4 --out "$work/mxfp4" >/dev/null || exit 1
"$bin/epmoe-gen" --preset tiny --n_layers 2 --n_hash_layers 0 --skew 20 --out "$work/skew" >/dev/null || exit 1
for dt in f32 bf16 f16; do
  "$bin/epmoe-gen" --preset tiny --input-out "$work/in_$dt.safetensors" --tokens 300 --dtype "$dt" \
    --seed 77 >/dev/null || exit 1
done

for fmt in nvfp4 mxfp4; do
  ck=$work/$fmt
  # one layer at a time, each fed the CPU's input
  in=$work/in_bf16.safetensors
  for l in 0 1 2 3; do
    run cpu 1 "$ck" "$in" "$work/${fmt}_cpu_l$l.safetensors" --layers $l:$((l + 1)) &&
      run $GPU 1 "$ck" "$in" "$work/${fmt}_gpu_l$l.safetensors" --layers $l:$((l + 1)) &&
      check $cmp "$work/${fmt}_gpu_l$l.safetensors" "$work/${fmt}_cpu_l$l.safetensors" \
        --tol $TOL_LAYER --routing --what "$fmt layer $l: cuda vs cpu"
    in=$work/${fmt}_cpu_l$l.safetensors
  done
  # every input dtype through one layer (the conversions on the device), cuda vs cpu
  for dt in f32 bf16 f16; do
    run cpu 1 "$ck" "$work/in_$dt.safetensors" "$work/${fmt}_${dt}_cpu1.safetensors" --layers 1:2 &&
      run $GPU 1 "$ck" "$work/in_$dt.safetensors" "$work/${fmt}_${dt}_gpu_l1.safetensors" --layers 1:2 &&
      check $cmp "$work/${fmt}_${dt}_gpu_l1.safetensors" "$work/${fmt}_${dt}_cpu1.safetensors" \
        --tol $TOL_LAYER --routing --what "$fmt $dt input, layer 1: cuda vs cpu"
  done
  # four layers chained on the device equal the same four layers run one at a time (fp32
  # between them): the chaining adds nothing. (A chain is not compared across backends: this
  # synthetic model amplifies any difference - on the CPU alone, rounding to bf16 between the
  # layers moves the 4-layer output by 0.75 relative L2 - so only single layers are.)
  in=$work/in_f32.safetensors
  for l in 0 1 2 3; do
    run $GPU 1 "$ck" "$in" "$work/${fmt}_gpu_step$l.safetensors" --layers $l:$((l + 1))
    in=$work/${fmt}_gpu_step$l.safetensors
  done
  run $GPU 1 "$ck" "$work/in_f32.safetensors" "$work/${fmt}_f32_gpu1.safetensors" &&
    check $cmp "$work/${fmt}_f32_gpu1.safetensors" "$work/${fmt}_gpu_step3.safetensors" --identical \
      --what "$fmt 4 layers chained on the device vs one at a time" --no-routing
  # rank counts: bit-identical, every dtype
  for dt in f32 bf16 f16; do
    in=$work/in_$dt.safetensors
    [ $dt = f32 ] || run $GPU 1 "$ck" "$in" "$work/${fmt}_${dt}_gpu1.safetensors" || continue
    for np in 2 3; do
      run $GPU $np "$ck" "$in" "$work/${fmt}_${dt}_gpu$np.safetensors" &&
        check $cmp "$work/${fmt}_${dt}_gpu$np.safetensors" "$work/${fmt}_${dt}_gpu1.safetensors" \
          --identical --what "$fmt $dt 4 layers: cuda $np ranks vs 1 rank"
    done
  done
done

# real checkpoint layouts (model directories): DeepSeek's release (MXFP4 experts, FP8 shared
# expert) and NVIDIA's NVFP4 re-quantization, each layer cuda vs cpu
for layout in deepseek nvidia-nvfp4; do
  "$bin/epmoe-gen" --preset tiny --layout $layout --n-layers 2 --out "$work/$layout" >/dev/null || {
    echo "FAIL: epmoe-gen --layout $layout"; fail=1; continue; }
  for l in 0 1; do
    run cpu 1 "$work/$layout" "$work/in_bf16.safetensors" "$work/${layout}_cpu_l$l.safetensors" --layers $l:$((l + 1)) &&
      run $GPU 1 "$work/$layout" "$work/in_bf16.safetensors" "$work/${layout}_gpu_l$l.safetensors" --layers $l:$((l + 1)) &&
      check $cmp "$work/${layout}_gpu_l$l.safetensors" "$work/${layout}_cpu_l$l.safetensors" \
        --tol $TOL_LAYER --routing --what "$layout directory, layer $l: cuda vs cpu"
  done
done

# W4A16 (act_quant = high): bf16 activations on the GPU, fp32 on the CPU
run cpu 1 "$work/nvfp4" "$work/in_bf16.safetensors" "$work/high_cpu.safetensors" --layers 1:2 --act_quant high &&
  run $GPU 1 "$work/nvfp4" "$work/in_bf16.safetensors" "$work/high_gpu.safetensors" --layers 1:2 --act_quant high &&
  check $cmp "$work/high_gpu.safetensors" "$work/high_cpu.safetensors" --tol $TOL_LAYER --routing \
    --what "act_quant=high layer 1: cuda vs cpu"

# W4A8 (act_quant = fp8) on MXFP4 weights, over 2 GPU ranks: the same E4M3 codes on both backends
run cpu 1 "$work/mxfp4" "$work/in_bf16.safetensors" "$work/fp8_cpu.safetensors" --layers 1:2 --act_quant fp8 &&
  run $GPU 2 "$work/mxfp4" "$work/in_bf16.safetensors" "$work/fp8_gpu.safetensors" --layers 1:2 --act_quant fp8 &&
  check $cmp "$work/fp8_gpu.safetensors" "$work/fp8_cpu.safetensors" --tol $TOL_LAYER --routing \
    --what "act_quant=fp8 MXFP4 layer 1: cuda 2 ranks vs cpu"

# skew: tokens pile onto the lowest experts (rank 0's slice)
run cpu 1 "$work/skew" "$work/in_f32.safetensors" "$work/skew_cpu.safetensors" --layers 0:1 &&
  run $GPU 1 "$work/skew" "$work/in_f32.safetensors" "$work/skew_gpu1.safetensors" --layers 0:1 &&
  run $GPU 3 "$work/skew" "$work/in_f32.safetensors" "$work/skew_gpu3.safetensors" --layers 0:1 &&
  check $cmp "$work/skew_gpu1.safetensors" "$work/skew_cpu.safetensors" --tol $TOL_LAYER --routing \
    --what "skewed routing: cuda vs cpu" &&
  check $cmp "$work/skew_gpu3.safetensors" "$work/skew_gpu1.safetensors" --identical \
    --what "skewed routing: cuda 3 ranks vs 1"
python3 - "$work/skew_cpu.safetensors" <<'EOF' || fail=1
import sys
sys.path.insert(0, "tests/product")
from compare_outputs import read
counts = read(sys.argv[1])["expert_counts"][1]
busiest = int(counts.max())
print(f"skew: busiest expert got {busiest} of 300 tokens; pairs {int(counts.sum())} = 300 x 6:",
      "PASS" if counts.sum() == 300 * 6 and busiest >= 150 else "FAIL")
sys.exit(0 if counts.sum() == 300 * 6 and busiest >= 150 else 1)
EOF

# gpt-oss, from checkpoints in the released layout
oss=$work/gptoss
"$bin/epmoe-gen" --preset gpt-oss-tiny --layout gpt-oss --shard-mb 1 --out "$oss" >/dev/null || exit 1
"$bin/epmoe-gen" --preset gpt-oss-tiny --layout gpt-oss --skew 8 --out "${oss}_skew" >/dev/null || exit 1
"$bin/epmoe-gen" --preset gpt-oss-20b --layout gpt-oss --n-layers 1 --n_routed_experts 8 \
  --vocab_size 64 --out "${oss}_wide" >/dev/null || exit 1
for dt in f32 bf16; do
  "$bin/epmoe-gen" --preset gpt-oss-tiny --input-out "$work/oss_in_$dt.safetensors" --tokens 300 \
    --dtype $dt --seed 78 >/dev/null || exit 1
done
"$bin/epmoe-gen" --preset gpt-oss-20b --vocab_size 64 --input-out "$work/oss_wide_in.safetensors" \
  --tokens 96 --dtype bf16 --seed 79 >/dev/null || exit 1
in=$work/oss_in_bf16.safetensors
for l in 0 1 2; do
  run cpu 1 "$oss" "$in" "$work/oss_cpu_l$l.safetensors" --layers $l:$((l + 1)) &&
    run $GPU 1 "$oss" "$in" "$work/oss_gpu_l$l.safetensors" --layers $l:$((l + 1)) &&
    check $cmp "$work/oss_gpu_l$l.safetensors" "$work/oss_cpu_l$l.safetensors" \
      --tol $TOL_ROUTED --routing --what "gpt-oss-tiny layer $l: cuda vs cpu"
  in=$work/oss_cpu_l$l.safetensors
done
run cpu 1 "${oss}_wide" "$work/oss_wide_in.safetensors" "$work/oss_wide_cpu.safetensors" &&
  run $GPU 1 "${oss}_wide" "$work/oss_wide_in.safetensors" "$work/oss_wide_gpu1.safetensors" &&
  check $cmp "$work/oss_wide_gpu1.safetensors" "$work/oss_wide_cpu.safetensors" --tol $TOL_ROUTED \
    --routing --what "gpt-oss H = I = 2880 (K padded to 3072): cuda vs cpu" &&
  run $GPU 2 "${oss}_wide" "$work/oss_wide_in.safetensors" "$work/oss_wide_gpu2.safetensors" &&
  check $cmp "$work/oss_wide_gpu2.safetensors" "$work/oss_wide_gpu1.safetensors" --identical \
    --what "gpt-oss H = 2880: cuda 2 ranks vs 1"
in=$work/oss_in_f32.safetensors
for l in 0 1 2; do
  run $GPU 1 "$oss" "$in" "$work/oss_gpu_step$l.safetensors" --layers $l:$((l + 1))
  in=$work/oss_gpu_step$l.safetensors
done
run $GPU 1 "$oss" "$work/oss_in_f32.safetensors" "$work/oss_gpu1.safetensors" &&
  check $cmp "$work/oss_gpu1.safetensors" "$work/oss_gpu_step2.safetensors" --identical \
    --what "gpt-oss-tiny 3 layers chained on the device vs one at a time" --no-routing
for np in 2 3; do
  run $GPU $np "$oss" "$work/oss_in_f32.safetensors" "$work/oss_gpu$np.safetensors" &&
    check $cmp "$work/oss_gpu$np.safetensors" "$work/oss_gpu1.safetensors" --identical \
      --what "gpt-oss-tiny 3 layers: cuda $np ranks vs 1 rank"
done
run cpu 1 "${oss}_skew" "$work/oss_in_f32.safetensors" "$work/oss_skew_cpu.safetensors" --layers 0:1 &&
  run $GPU 2 "${oss}_skew" "$work/oss_in_f32.safetensors" "$work/oss_skew_gpu2.safetensors" --layers 0:1 &&
  check $cmp "$work/oss_skew_gpu2.safetensors" "$work/oss_skew_cpu.safetensors" --tol $TOL_ROUTED \
    --routing --what "gpt-oss-tiny skewed routing: cuda 2 ranks vs cpu"
run cpu 1 "$oss" "$work/oss_in_bf16.safetensors" "$work/oss_high_cpu.safetensors" --layers 1:2 --act_quant high &&
  run $GPU 1 "$oss" "$work/oss_in_bf16.safetensors" "$work/oss_high_gpu.safetensors" --layers 1:2 --act_quant high &&
  check $cmp "$work/oss_high_gpu.safetensors" "$work/oss_high_cpu.safetensors" --tol $TOL_LAYER \
    --routing --what "gpt-oss-tiny act_quant=high layer 1: cuda vs cpu"
run cpu 1 "$oss" "$work/oss_in_bf16.safetensors" "$work/oss_fp8_cpu.safetensors" --layers 1:2 --act_quant fp8 &&
  run $GPU 1 "$oss" "$work/oss_in_bf16.safetensors" "$work/oss_fp8_gpu.safetensors" --layers 1:2 --act_quant fp8 &&
  check $cmp "$work/oss_fp8_gpu.safetensors" "$work/oss_fp8_cpu.safetensors" --tol $TOL_ROUTED \
    --routing --what "gpt-oss-tiny act_quant=fp8 layer 1: cuda vs cpu"
if [ "$GPU" = cuda ]; then
  run auto 1 "$oss" "$work/oss_in_bf16.safetensors" "$work/oss_auto.safetensors" --layers 0:1 &&
    if grep -q "cpu, not cuda" "$work/oss_auto.safetensors.log"; then
      echo "gpt-oss backend=auto: FAIL (ran on the cpu: $(grep -m1 'not cuda' "$work/oss_auto.safetensors.log"))"
      fail=1
    else
      check $cmp "$work/oss_auto.safetensors" "$work/oss_gpu_l0.safetensors" --identical \
        --what "gpt-oss backend=auto: the cuda backend's output"
    fi
fi

# gpt-oss at full size, one layer each in the released layout (20b: 32 experts, 120b: 128;
# H = I = 2880): cuda vs cpu, then the 120b layer served by epmoe-serve on the same backend,
# its reply bit-identical to the batch job's
for p in gpt-oss-20b gpt-oss-120b; do
  d=$work/${p}_full
  if ! "$bin/epmoe-gen" --preset $p --layout gpt-oss --n-layers 1 --vocab_size 64 --out "$d" >/dev/null ||
     ! "$bin/epmoe-gen" --preset $p --vocab_size 64 --input-out "$work/${p}_in.safetensors" \
         --tokens 64 --dtype bf16 --seed 81 >/dev/null; then
    echo "FAIL: epmoe-gen $p"; fail=1; continue
  fi
  run cpu 1 "$d" "$work/${p}_in.safetensors" "$work/${p}_cpu.safetensors" &&
    run $GPU 1 "$d" "$work/${p}_in.safetensors" "$work/${p}_gpu.safetensors" &&
    check $cmp "$work/${p}_gpu.safetensors" "$work/${p}_cpu.safetensors" --tol $TOL_ROUTED --routing \
      --what "$p full size, released layout: cuda vs cpu"
done
if [ -x "$bin/epmoe-serve" ] && [ -e "$work/gpt-oss-120b_gpu.safetensors" ]; then
  if serve_start "$work/oss_ready" "$work/oss_serve.log" 180 \
       env EPMOE_BACKEND=$GPU mpirun -np 1 "$bin/epmoe-serve" --checkpoint "$work/gpt-oss-120b_full" \
       --listen 127.0.0.1:0 --ready-file "$work/oss_ready"; then
    trap 'kill $serve_pid 2>/dev/null' EXIT
    if "$bin/epmoe-client" --server "127.0.0.1:$serve_port" --input "$work/gpt-oss-120b_in.safetensors" \
         --output "$work/oss120_served.safetensors" >"$work/oss_client.log" 2>&1; then
      check $cmp "$work/oss120_served.safetensors" "$work/gpt-oss-120b_gpu.safetensors" --identical \
        --no-routing --what "gpt-oss-120b served by epmoe-serve ($GPU) vs epmoe-run"
    else
      echo "FAIL: epmoe-client on gpt-oss-120b: $(tail -2 "$work/oss_client.log")"; fail=1
    fi
    serve_stop || { echo "FAIL: epmoe-serve gpt-oss-120b exit status $?"; fail=1; }
    trap - EXIT
  else
    echo "FAIL: epmoe-serve gpt-oss-120b never ready: $(tail -3 "$work/oss_serve.log")"; fail=1
  fi
fi

# a NaN in row 123 of a bf16 input: refused, naming the row, on 2 ranks
python3 - "$work/in_bf16.safetensors" "$work/nan.safetensors" <<'EOF'
import json, struct, sys
blob = bytearray(open(sys.argv[1], "rb").read())
n = struct.unpack("<Q", blob[:8])[0]
hdr = json.loads(blob[8:8 + n])
t = hdr["hidden_states"]
H = t["shape"][1]
off = 8 + n + t["data_offsets"][0] + (123 * H + 5) * 2
blob[off:off + 2] = struct.pack("<H", 0x7fc0)  # bf16 NaN
open(sys.argv[2], "wb").write(blob)
EOF
if EPMOE_BACKEND=$GPU mpirun -np 2 "$bin/epmoe-run" --checkpoint "$work/nvfp4" \
    --input "$work/nan.safetensors" --output "$work/nan_out.safetensors" >"$work/nan.log" 2>&1; then
  echo "nan input: FAIL (exit 0)"
  fail=1
elif grep -q "\[123, 5\]" "$work/nan.log"; then
  echo "nan input: PASS ($(grep -m1 -o 'hidden_states: element[^(]*' "$work/nan.log"))"
else
  echo "nan input: FAIL (message does not name row 123)"
  tail -3 "$work/nan.log"
  fail=1
fi
echo "product tests: $([ $fail = 0 ] && echo PASSED || echo FAILED)"
exit $fail
