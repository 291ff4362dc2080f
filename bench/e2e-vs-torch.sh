#!/usr/bin/env bash
# The product end to end on one GPU, next to PyTorch, in one call:
#   bash bench/e2e-vs-torch.sh [BUILD_DIR]      (after deploy/gpu-test.sh built BUILD_DIR)
#  1. epmoe-gen writes a synthetic 4-layer DeepSeek-V4-Flash checkpoint (size, MB/s)
#  2. the batch job: epmoe-run --backend cuda, 4096 and 16384 tokens (bf16 in and out) through
#     the 4 layers: load GB/s, forward tokens/s (input on the host to output on the host),
#     next to the same 4 layers in PyTorch bf16 (bench/torch_layer.py --chain 4)
#  3. the service on the GPU: epmoe-serve, p50/p99 latency of a Forward of 1, 8 and 64 tokens
#     through 1 layer and through 4 layers (one stream), requests/s at 16 streams
# Needs a CUDA GPU with ~20 GB free, ~16 GB of disk for the checkpoint (EPMOE_BENCH_WORK,
# default /tmp/epmoe-e2e), Open MPI, python3 with torch. Output: $OUT/e2e.md and logs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
BUILD="${1:-${EPMOE_GPU_BUILD_DIR:-build-gpu}}"
source deploy/gpu-env.sh
source tests/support/serve.sh
W="${EPMOE_BENCH_WORK:-/tmp/epmoe-e2e}"
mkdir -p "$W"
bin=$BUILD/bin
R="$OUT/e2e.md"
L="$OUT/e2e.log"
: >"$L"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
echo "# End to end on one $gpu ($(date -u +%Y-%m-%d))" >"$R"

# 1. the checkpoint
t0=$(date +%s.%N)
if ! timeout 400 "$bin/epmoe-gen" --preset dsv4-flash --n_layers 4 --n_hash_layers 1 \
    --out "$W/flash4" >>"$L" 2>&1; then
  echo "epmoe-gen failed or took over 400 s: see e2e.log" | tee -a "$R"
  exit 1
fi
t1=$(date +%s.%N)
bytes=$(du -sb "$W/flash4" | cut -f1)
python3 -c "print(f'epmoe-gen: {$bytes/1e9:.2f} GB in {$t1-$t0:.1f} s = {$bytes/1e6/($t1-$t0):.0f} MB/s on $(nproc) cores')" | tee -a "$R"

# 2. the batch job
echo -e "\n| tokens | epmoe-run forward ms | tokens/s | PyTorch bf16 4 layers ms | tokens/s | ratio |\n|---:|---:|---:|---:|---:|---:|" >>"$R"
python3 bench/torch_layer.py --preset dsv4-flash --chain 4 --tokens 4096,16384 --reps 12 \
  --json "$OUT/torch_chain.json" >>"$L" 2>&1
for T in 4096 16384; do
  "$bin/epmoe-gen" --preset dsv4-flash --input-out "$W/in_$T.safetensors" --tokens $T \
    --dtype bf16 --seed $T >>"$L" 2>&1
  best=""
  for rep in 1 2; do # the first run pays for cold caches and clocks: take the better
    EPMOE_BACKEND=cuda mpirun -np 1 "$bin/epmoe-run" --checkpoint "$W/flash4" \
      --input "$W/in_$T.safetensors" --output "$W/out_$T.safetensors" --quiet \
      --max_tokens_per_rank 16384 >"$W/run_$T.log" 2>&1 || { cat "$W/run_$T.log" >>"$L"; continue; }
    cat "$W/run_$T.log" >>"$L"
    f=$(grep -o "forward [0-9.]* s" "$W/run_$T.log" | awk '{print $2}')
    best=$(python3 -c "print(min(x for x in [$f, ${best:-1e9}]))")
  done
  python3 - "$OUT/torch_chain.json" "$T" "${best:-nan}" <<'EOF' >>"$R"
import json, sys
recs = {r["tokens"]: r for r in json.load(open(sys.argv[1]))["records"]}
T, ours = int(sys.argv[2]), float(sys.argv[3]) * 1e3
t = recs.get(T, {}).get("forward_ms", float("nan"))
print(f"| {T} | {ours:.1f} | {T / ours * 1e3:.0f} | {t:.1f} | {T / t * 1e3:.0f} | {t / ours:.2f}x |")
EOF
done
grep -h "loaded .* GB/s" "$L" | tail -1 | sed 's/^/load: /' | tee -a "$R"

# 3. the service
if serve_start "$W/ready" "$W/serve.log" 180 env EPMOE_BACKEND=cuda mpirun -np 1 "$bin/epmoe-serve" \
     --checkpoint "$W/flash4" --listen 127.0.0.1:0 --ready-file "$W/ready" --max-queue 4096; then
  echo -e "\n| request | layers | streams | requests/s | p50 ms | p99 ms |\n|---|---|---:|---:|---:|---:|" >>"$R"
  for layers in 1:2 0:4; do
    for n in 1 8 64; do
      "$bin/epmoe-client" --server "127.0.0.1:$serve_port" --load --streams 1 --requests 20 \
        --tokens-min $n --tokens-max $n --layers $layers --dtype bf16 >/dev/null 2>&1 # warm-up
      "$bin/epmoe-client" --server "127.0.0.1:$serve_port" --load --streams 1 --requests 200 \
        --tokens-min $n --tokens-max $n --layers $layers --dtype bf16 >"$W/load.txt" 2>&1
      cat "$W/load.txt" >>"$L"
      l2=$(sed -n 2p "$W/load.txt")
      echo "| $n tokens | $layers | 1 | $(echo "$l2" | awk '{print $2}') | $(echo "$l2" | awk '{print $7}') | $(echo "$l2" | awk '{print $10}') |" >>"$R"
    done
  done
  "$bin/epmoe-client" --server "127.0.0.1:$serve_port" --load --streams 16 --requests 100 \
    --tokens-min 1 --tokens-max 64 --layers 0:4 --dtype bf16 >"$W/load.txt" 2>&1
  cat "$W/load.txt" >>"$L"
  l2=$(sed -n 2p "$W/load.txt")
  echo "| 1-64 tokens | 0:4 | 16 | $(echo "$l2" | awk '{print $2}') | $(echo "$l2" | awk '{print $7}') | $(echo "$l2" | awk '{print $10}') |" >>"$R"
  serve_stop || echo "epmoe-serve exit status $?: see serve.log" | tee -a "$R"
else
  echo "epmoe-serve did not start: see serve.log" | tee -a "$R"
fi
cat "$W/serve.log" >>"$L"
cat "$R"
