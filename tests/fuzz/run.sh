#!/usr/bin/env bash
# Builds the libFuzzer targets (clang, AddressSanitizer + libFuzzer, a build directory of their
# own) and runs each for a bounded time, starting from the seeds committed in
# tests/fuzz/corpus/<target>/. Prints libFuzzer's final stats line per target (executions,
# edge coverage, features, corpus) and a summary. A crash, leak or timeout fails the run; the
# input that did it is left in <build-dir>/artifacts/.
#
#   tests/fuzz/run.sh [--seconds N] [--build-dir DIR] [--jobs J] [target ...]
#     --seconds N    per target (default 20: 60 s for the three, what CI runs); longer runs
#                    on demand, e.g. --seconds 3600
#     --build-dir    default build-fuzz/ (ctest uses build/fuzz)
#     target         wire, safetensors, checkpoint (default: all)
#
# Without clang or libFuzzer it says so and exits 77 (ctest reports the suite skipped).
# New corpus entries go to <build-dir>/corpus/<target>/, never into the source tree.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
seconds=20
build=$root/build-fuzz
jobs=$(nproc)
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds=$2; shift 2 ;;
    --build-dir) build=$2; shift 2 ;;
    --jobs) jobs=$2; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    -*) echo "run.sh: unknown option $1" >&2; exit 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done
[ ${#targets[@]} -gt 0 ] || targets=(wire safetensors checkpoint)

cc=$(command -v clang || true)
probe=$(mktemp -d)
trap 'rm -rf "$probe"' EXIT
printf '#include <stdint.h>\n#include <stddef.h>\nint LLVMFuzzerTestOneInput(const uint8_t *d, size_t n) { (void)d; (void)n; return 0; }\n' > "$probe/p.c"
if [ -z "$cc" ] || ! "$cc" -fsanitize=fuzzer,address "$probe/p.c" -o "$probe/p" 2>/dev/null; then
  echo "SKIPPED: fuzz suite: clang with libFuzzer not found (Debian: apt-get install clang libclang-rt-14-dev; deploy/setup.sh installs them)"
  exit 77
fi

echo "== fuzz: building the targets with $("$cc" --version | head -1) into $build"
flags="-fsanitize=fuzzer-no-link,address -fno-omit-frame-pointer -g"
cmake -S "$root" -B "$build" -DCMAKE_C_COMPILER="$cc" -DCMAKE_BUILD_TYPE=Release \
  -DEPMOE_CUDA=OFF -DEPMOE_FUZZ=ON -DCMAKE_C_FLAGS="$flags" >/dev/null
build_targets=()
for t in "${targets[@]}"; do build_targets+=(--target "fuzz_$t"); done
cmake --build "$build" -j "$jobs" "${build_targets[@]}" >"$build/build.log" 2>&1 ||
  { tail -40 "$build/build.log"; echo "fuzz: build failed (log: $build/build.log)"; exit 1; }

mkdir -p "$build/artifacts"
status=0
summary=()
for t in "${targets[@]}"; do
  bin=$build/tests/fuzz/fuzz_$t
  [ -x "$bin" ] || { echo "fuzz: $bin was not built"; status=1; continue; }
  work=$build/corpus/$t
  mkdir -p "$work"
  log=$build/fuzz_$t.log
  echo "== fuzz_$t: ${seconds} s from $(ls "$root/tests/fuzz/corpus/$t" | wc -l) seeds"
  # -timeout: one input taking longer is a hang; -rss_limit_mb: a fuzzed size must not make
  # the reader allocate without bound; leaks are failures (ASan's leak check).
  if ASAN_OPTIONS=detect_leaks=1:allocator_may_return_null=1 "$bin" \
      -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
      -artifact_prefix="$build/artifacts/${t}-" "$work" "$root/tests/fuzz/corpus/$t" \
      >"$log" 2>&1; then
    :
  else
    echo "fuzz_$t FAILED (log: $log):"
    grep -E "ERROR|SUMMARY|Test unit written|==[0-9]+==" "$log" | head -20
    status=1
  fi
  done_line=$(grep -E "^#[0-9]+[[:space:]]+DONE" "$log" | tail -1 || true)
  execs=$(grep -E "stat::number_of_executed_units" "$log" | awk '{print $2}' || true)
  speed=$(grep -E "stat::average_exec_per_sec" "$log" | awk '{print $2}' || true)
  echo "${done_line:-fuzz_$t: no final stats (see $log)}"
  summary+=("$(printf '%-12s execs %-10s (%s/s) %s' "$t" "${execs:-?}" "${speed:-?}" \
    "$(echo "$done_line" | grep -oE 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+/[0-9]+[a-zA-Z]*')")")
done
echo "== fuzz summary (${seconds} s per target)"
printf '%s\n' "${summary[@]}"
exit $status
