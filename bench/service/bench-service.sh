#!/usr/bin/env bash
# Service benchmark on the tiny preset: requests/s and p50/p99 latency versus concurrency
# through epmoe-serve (gRPC on loopback), and the cost of the gRPC path over a direct batch run
# of the same tokens (epmoe-run, whose forward time excludes loading).
#
#   bench/service/bench-service.sh [BUILD_DIR] [RANKS] [OUT.md]
#
# Env: REQUESTS (per stream, default 50), TOKENS_MAX (request sizes 1..TOKENS_MAX, default 16),
#      CONCURRENCY (default "1 2 4 8 16 32"), DELAY_US (max queue delay, default 2000),
#      POLICY_CONCURRENCY (streams for the batching-policy table, default "1 16").
set -euo pipefail
source "$(dirname "$0")/../../tests/support/serve.sh"
build=${1:-build}
ranks=${2:-2}
out=${3:-bench/service/RESULTS-service.md}
requests=${REQUESTS:-50}
tokens_max=${TOKENS_MAX:-16}
concurrency=${CONCURRENCY:-"1 2 4 8 16 32"}
delay_us=${DELAY_US:-2000}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export OMPI_MCA_btl_vader_single_copy_mechanism=none OMPI_MCA_btl=self,vader OMPI_MCA_pml=ob1
export OPENBLAS_NUM_THREADS=1 no_proxy=127.0.0.1,localhost
serve=$build/bin/epmoe-serve
client=$build/bin/epmoe-client
work=$(mktemp -d /tmp/epmoe-bench-service.XXXXXX)
trap 'rm -rf "$work"' EXIT
ckpt=$work/tiny
"$build/bin/epmoe-gen" --preset tiny --out "$ckpt" >/dev/null

start_server() { # $1: extra args
  # shellcheck disable=SC2086
  serve_start "$work/ready" "$work/serve.log" 120 mpirun -np "$ranks" "$serve" --checkpoint "$ckpt" \
    --listen 127.0.0.1:0 --ready-file "$work/ready" --max-queue 4096 $1 \
    || { echo "epmoe-serve did not start: $(tail -3 "$work/serve.log")" >&2; exit 1; }
}

cpu=$(grep -m1 "model name" /proc/cpuinfo | sed 's/.*: //')
load=$(cut -d' ' -f1-3 /proc/loadavg)
{
  echo "## Service (gRPC) benchmark"
  echo
  echo "tiny preset (hidden 256, 256 experts, top-6, 4 layers, NVFP4 CPU path), $ranks ranks on"
  echo "\`$cpu\` ($(nproc) cores, load average $load when it started), loopback."
  echo "\`bench/service/bench-service.sh $build $ranks\`: each stream sends $requests requests of"
  echo "1..$tokens_max tokens (fp32) back to back; max queue delay ${delay_us} us, paid only while"
  echo "the service is busy (the default policy; see the policy table below)."
  echo "gRPC path = client latency - server queue time - engine forward (epmoe_driver_forward, what"
  echo "a direct batch run spends on the same batch): protobuf, conversions, HTTP/2 on loopback."
  echo
  echo "| streams | requests/s | tokens/s | p50 ms | p99 ms | mean queue ms | mean forward ms | gRPC path p50 ms | gRPC path p99 ms |"
  echo "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
} >"$out"
run_load() { # $1 streams, $2 tokens-min, $3 tokens-max, $4 requests
  "$client" --server "127.0.0.1:$serve_port" --load --streams "$1" --requests "$4" \
    --tokens-min "$2" --tokens-max "$3" >"$work/load.txt"
  l2=$(sed -n 2p "$work/load.txt"); l3=$(sed -n 3p "$work/load.txt")
  rps=$(echo "$l2" | awk '{print $2}'); tps=$(echo "$l2" | awk '{print $4}')
  p50=$(echo "$l2" | awk '{print $7}'); p99=$(echo "$l2" | awk '{print $10}')
  q=$(echo "$l3" | sed 's/.*mean queue \([0-9.]*\) ms.*/\1/')
  f=$(echo "$l3" | sed 's/.*engine forward \([0-9.]*\) ms.*/\1/')
  g50=$(echo "$l3" | sed 's/.*p50 \([0-9.-]*\) ms p99.*/\1/')
  g99=$(echo "$l3" | sed 's/.*p99 \([0-9.-]*\) ms$/\1/')
  cat "$work/load.txt"
}
start_server "--max-queue-delay-us $delay_us"
for c in $concurrency; do
  run_load "$c" 1 "$tokens_max" "$requests"
  echo "| $c | $rps | $tps | $p50 | $p99 | $q | $f | $g50 | $g99 |" >>"$out"
done
serve_stop

# Fixed-size requests, one stream, no batching delay: the gRPC path against the engine time.
{
  echo
  echo "One stream, max queue delay 0, T tokens per request:"
  echo
  echo "| T tokens | p50 ms | mean forward ms | gRPC path p50 ms | gRPC path p99 ms |"
  echo "|---:|---:|---:|---:|---:|"
} >>"$out"
start_server "--max-queue-delay-us 0"
for t in 1 16 256; do
  run_load 1 "$t" "$t" 30
  echo "| $t | $p50 | $f | $g50 | $g99 |" >>"$out"
done
serve_stop

# The batching policy, side by side on the same load: the default (the delay only while busy),
# the delay always (--wait-when-idle 1), no delay at all.
{
  echo
  echo "Batching policy (${delay_us} us delay), $requests requests of 1..$tokens_max tokens per stream:"
  echo
  echo "| policy | streams | requests/s | p50 ms | p99 ms | mean queue ms | mean forward ms |"
  echo "|---|---:|---:|---:|---:|---:|---:|"
} >>"$out"
for policy in "busy only|--max-queue-delay-us $delay_us" \
              "always|--max-queue-delay-us $delay_us --wait-when-idle 1" \
              "none|--max-queue-delay-us 0"; do
  start_server "${policy#*|}"
  for c in ${POLICY_CONCURRENCY:-1 16}; do
    run_load "$c" 1 "$tokens_max" "$requests"
    echo "| ${policy%%|*} | $c | $rps | $p50 | $p99 | $q | $f |" >>"$out"
  done
  serve_stop
done
cat "$out"
