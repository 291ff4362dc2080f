#!/usr/bin/env bash
# Nsight Compute per-instruction (SASS) stall sampling of one grouped-GEMM launch (run on the
# GPU machine, repo root):   bash bench/ncu_source.sh <kernel-regex> <rows> <kernel-id> <name>
# Profiles the 4th launch of the matching kernel in gemm_bench (--kernels <kernel-id>, slab
# weights only), V4-Flash W13 at <rows> rows per expert; writes $OUT/<name>.csv (the source
# page, SASS with its sampled stall reasons) and prints the 25 instructions with most samples.
set -uo pipefail
cd "$(dirname "$0")/.."
source deploy/gpu-env.sh
OUT="${OUT:-$PWD/out}"
BUILD=build-gemm-dev
[ -x $BUILD/bench/gemm_bench ] || { cmake -S . -B $BUILD -DEPMOE_CUDA=ON -DEPMOE_CUDA_ARCHS=90a \
  -DEPMOE_SERVICE=OFF -DCMAKE_BUILD_TYPE=Release >/dev/null && cmake --build $BUILD -j16 --target gemm_bench >/dev/null; }
NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
timeout 300 "$NCU" --clock-control none --kernel-name-base mangled --kernel-name "regex:$1" \
  --launch-skip 3 --launch-count 1 --section SourceCounters --section WarpStateStats \
  --page source --print-source sass --csv \
  ./$BUILD/bench/gemm_bench --json /tmp/ncu_src.json --reps 1 --rows "$2" --kernels "$3" --no-row-major \
  > "$OUT/$4.csv" 2>&1
python3 - "$OUT/$4.csv" <<'PY'
import csv, sys
rows = [r for r in csv.reader(open(sys.argv[1], errors="replace")) if len(r) > 5]
if not rows: sys.exit("no source rows")
head = rows[0]
def col(name):
    for i, h in enumerate(head):
        if h.strip().lower() == name: return i
    return None
src = col("source")
samp = col("warp stall sampling (all samples)") or col("warp stall sampling (all cycles)")
if src is None or samp is None:
    print("columns:", head[:40]); sys.exit(0)
data = []
for r in rows[1:]:
    try: data.append((float(r[samp] or 0), r[src]))
    except (ValueError, IndexError): pass
total = sum(s for s, _ in data) or 1
for s, text in sorted(data, reverse=True)[:25]:
    print("%6.2f%%  %s" % (100 * s / total, text.strip()[:110]))
PY
