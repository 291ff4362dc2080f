#!/usr/bin/env bash
# Where a layer's time goes, kernel by kernel (run on the GPU machine after deploy/gpu-test.sh):
#   bash bench/profile-layer.sh [BUILD_DIR] [PRESET] [TOKENS...]
# Runs the throughput-mode layer (bench/ep_layer_bench, one rank) under Nsight Systems when it
# is installed, else Nsight Compute with one metric per kernel, and prints each kernel's total
# GPU time over the profiled forwards, largest first. Output: $OUT/profile_<preset>_<T>.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
BUILD="${1:-${EPMOE_GPU_BUILD_DIR:-build-gpu}}"
PRESET="${2:-dsv4-flash}"
shift 2 2>/dev/null || shift $#
TOKENS="${*:-4096 16384}"
source deploy/gpu-env.sh
NSYS=$(command -v nsys || ls /usr/local/cuda/bin/nsys /opt/nvidia/nsight-systems*/bin/nsys 2>/dev/null | head -1)
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
for T in $TOKENS; do
  f="$OUT/profile_${PRESET}_$T"
  if [ -n "$NSYS" ]; then
    timeout 300 "$NSYS" profile -o "$f" --force-overwrite true -t cuda --stats=false \
      mpirun -np 1 "$BUILD/bench/ep_layer_bench" --preset "$PRESET" \
      --tokens "$T" --iters 3 >"$f.log" 2>&1
    "$NSYS" stats -r cuda_gpu_kern_sum -f csv -o "$f" "$f.nsys-rep" >>"$f.log" 2>&1
    python3 - "$f"_cuda_gpu_kern_sum.csv "$T" >"$f.txt" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
print(f"tokens={sys.argv[2]} (5 forwards: 2 warm-up + 3 timed), nsys")
print(f"{'total ms':>9} {'count':>6} {'avg us':>9}  kernel")
for r in rows:
    print(f"{float(r['Total Time (ns)'])/1e6:9.2f} {r['Instances']:>6} "
          f"{float(r['Avg (ns)'])/1e3:9.1f}  {r['Name'][:110]}")
PY
  else
    timeout 500 "$NCU" --metrics gpu__time_duration.sum --print-units base --csv --page raw \
      mpirun -np 1 "$BUILD/bench/ep_layer_bench" --preset "$PRESET" \
      --tokens "$T" --iters 1 >"$f.csv" 2>"$f.log"
    python3 - "$f.csv" "$T" >"$f.txt" <<'PY'
import csv, sys, collections
lines = [l for l in open(sys.argv[1]) if l.startswith('"')]
rows = list(csv.DictReader(lines))
tot = collections.defaultdict(float); cnt = collections.Counter()
for r in rows:
    try: v = float(r["gpu__time_duration.sum"])
    except (KeyError, ValueError): continue
    name = r.get("Kernel Name", "?")
    tot[name] += v; cnt[name] += 1
unit = "ns" if rows and "gpu__time_duration.sum" in rows[0] else "?"
print(f"tokens={sys.argv[2]} (3 forwards: 2 warm-up + 1 timed), ncu (kernels serialized)")
print(f"{'total ms':>9} {'count':>6} {'avg us':>9}  kernel")
for name, v in sorted(tot.items(), key=lambda kv: -kv[1]):
    print(f"{v/1e6:9.2f} {cnt[name]:>6} {v/cnt[name]/1e3:9.1f}  {name[:110]}")
PY
  fi
  cat "$f.txt"
done
