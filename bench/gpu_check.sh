#!/usr/bin/env bash
# One prepared check for an H100/H200 machine with torch, Triton, nvcc and ninja
# (no network): builds the extension in place, runs the CUDA and Triton tests
# (torch.compile's separately), the CUDA tests once more under compute-sanitizer memcheck, and every
# benchmark on the GPU; prints a short table last. Full logs and the result
# tables go to $OUT (when set) as gpu_check.tar.gz. Budget: well under 8 minutes.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
LOGS=$(mktemp -d)
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} MODALIMMUNE_CUDA=1
unset TRITON_INTERPRET
PY=${PYTHON:-python3}
SUMMARY=()

DEADLINE=${DEADLINE:-450}  # seconds: steps that would start later are skipped, so the script ends inside 8 minutes

step() {  # step NAME SECONDS COMMAND...: runs with a time limit, logs to $LOGS/NAME.log
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  if [ $((SECONDS + 30)) -gt "$DEADLINE" ]; then
    SUMMARY+=("$(printf '%-28s %-16s' "$name" "SKIPPED (deadline)")"); return 0
  fi
  [ $((SECONDS + limit)) -gt "$DEADLINE" ] && limit=$((DEADLINE - SECONDS))
  timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  local verdict=ok; [ $rc -eq 0 ] || verdict="FAILED rc=$rc"; [ $rc -eq 124 ] && verdict="TIMEOUT ${limit}s"
  SUMMARY+=("$(printf '%-28s %-16s %4ds' "$name" "$verdict" $((SECONDS - start)))")
  tail -n 3 "$LOGS/$name.log"
  return $rc
}

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >"$LOGS/nvidia-smi.log" 2>&1
step build 180 $PY -m pip install --no-build-isolation --no-deps -e . || { printf '%s\n' "${SUMMARY[@]}"; exit 1; }
step info 60 $PY -m modalimmune info
cat "$LOGS/info.log"
step tests-cuda-triton 120 $PY -m pytest -q -m "cuda or triton" tests --ignore=tests/test_compile.py -p no:cacheprovider
# torch.compile of the cuda and triton backends on CUDA tensors (the torch backend traces slowest; the CPU run has it)
step compile-cuda 60 $PY -m pytest -q -x -m cuda tests/test_compile.py -k "cuda-cuda or triton-cuda" -p no:cacheprovider
SANITIZER=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}"/bin/compute-sanitizer 2>/dev/null)
if [ -n "$SANITIZER" ]; then
  step memcheck 90 "$SANITIZER" --tool memcheck --error-exitcode 3 --target-processes all \
    $PY -m pytest -q -x -m cuda tests -k "not slow" --ignore=tests/test_compile.py -p no:cacheprovider
else
  SUMMARY+=("memcheck                     SKIPPED (no compute-sanitizer)")
fi
for bench in bench/bench_*.py; do
  name=$(basename "$bench" .py)
  [ "$name" = bench_memmap ] && continue  # host memory of the data path: a CPU benchmark, no --device
  step "$name" 120 $PY "$bench" --device cuda --quick
done

mkdir -p "$OUT"
cp bench/results/kernels/*_cuda*.md "$LOGS"/ 2>/dev/null
tar -czf "$OUT/gpu_check.tar.gz" -C "$LOGS" .
echo
echo "== benchmark tables (full logs in gpu_check.tar.gz) =="
for log in "$LOGS"/bench_*.log; do echo "-- $(basename "$log" .log)"; grep -E '^\|' "$log" | head -14; done
echo
echo "== gpu_check summary =="
head -2 "$LOGS/nvidia-smi.log" | tail -1
printf '%s\n' "${SUMMARY[@]}"
