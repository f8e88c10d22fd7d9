#!/usr/bin/env bash
# The GPU rehearsal (docs/DESIGN.md §11): Triton launches compiled for sm_90 and sm_80 with the real
# arguments and Triton's run-time specialisation, never run (vera_kernels/ops/rehearsal.py). Fails on a
# compile error, a first-choice config over the shared-memory limit or with serialised wgmma, or a test
# that fails other than on the values it checks. Covered, for sm_90 and for sm_80 alike:
#   1. the whole GPU test plan: every tests/test_*.py file, as benchmarks/gpu_check.py's test phase runs
#      them on a GPU (autotuning off: the first config of each kernel);
#   2. gpu_check.py's real-shape plan (--skip-tests): the Triton backend's forward and backward on every
#      workload of its table, both A/B sources, autotuning on (every config of each kernel);
#   3. gpu_check.py --dry-run under the sm_90 rehearsal: its table on tiny shapes, and its JSON.
# One process per architecture, side by side (one per core). Triton's on-disk cache (with the ptxas
# findings of each compile beside it) is kept between runs under $VERA_KERNELS_CI_CACHE, one folder per
# architecture, so a run recompiles only the kernels that changed; VERA_KERNELS_REHEARSAL_COLD=1 starts
# from empty caches. The per-kernel records go to $VERA_KERNELS_REHEARSAL_OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${VERA_KERNELS_REHEARSAL_OUT:-${TMPDIR:-/tmp}/vera-rehearsal}"
cache="${VERA_KERNELS_CI_CACHE:-$HOME/.cache/vera-kernels-ci}/triton-rehearsal"
mkdir -p "$out"
t0=$SECONDS
say() { echo "== GPU rehearsal: $* [$((SECONDS - t0)) s]"; }
if [ "${VERA_KERNELS_REHEARSAL_COLD:-0}" = 1 ] || [ "$(du -sm "$cache" 2>/dev/null | cut -f1 || echo 0)" -gt 4096 ]; then
  rm -rf "$cache"  # asked for, or grown past 4 GiB with kernels of older sources
fi
mkdir -p "$cache/sm90" "$cache/sm80"
export VERA_KERNELS_AUTOTUNE=0 OMP_NUM_THREADS=1  # one thread each: two processes share two cores
unset TRITON_INTERPRET
opts=(-q -rfE -p no:cacheprovider -W ignore::UserWarning)

# one architecture's whole plan, both parts run whatever the first gives; progress in $out/sm$1.progress
plan() {
  local arch=$1 log="$out/sm$1" s=$SECONDS rc=0
  export TRITON_CACHE_DIR="$cache/sm$arch"
  echo "tests: start" > "$log.progress"
  if python -m pytest "${opts[@]}" --gpu-rehearsal="$arch" --gpu-rehearsal-json="$out/tests-sm$arch.json" \
      tests/test_*.py > "$log-tests.log" 2>&1; then
    echo "tests: done [$((SECONDS - s)) s]" >> "$log.progress"
  else
    echo "tests: FAILED [$((SECONDS - s)) s]" >> "$log.progress"; rc=1
  fi
  if VERA_KERNELS_AUTOTUNE=1 python -W ignore benchmarks/gpu_check.py --rehearsal "$arch" --skip-tests --jobs 1 \
      --budget 3000 --out "$out/gpu_check-sm$arch.json" > "$log-gpu_check.log" 2>&1; then
    echo "gpu_check real shapes: done [$((SECONDS - s)) s]" >> "$log.progress"
  else
    echo "gpu_check real shapes: FAILED [$((SECONDS - s)) s]" >> "$log.progress"; rc=1
  fi
  return $rc
}

say "sm_90 and sm_80 side by side: whole test plan, then gpu_check's real-shape plan (logs in $out)"
plan 90 & p90=$!
plan 80 & p80=$!
n=0
where() {  # one architecture's phase, and the percentage pytest has reached in it
  echo "$(tail -n1 "$out/sm$1.progress" 2>/dev/null) $(grep -ao '\[ *[0-9]*%\]' "$out/sm$1-tests.log" 2>/dev/null | tail -n1)"
}
while kill -0 $p90 2>/dev/null || kill -0 $p80 2>/dev/null; do
  sleep 5
  n=$((n + 1))
  [ $((n % 12)) -eq 0 ] && say "sm_90: $(where 90); sm_80: $(where 80)"
done
rc=0
wait $p90 || rc=1
wait $p80 || rc=1
for arch in 90 80; do
  say "sm_$arch: $(paste -sd';' "$out/sm$arch.progress")"
  grep -hE "GPU rehearsal|^  _|REHEARSAL FAILURE|^FAILED|^ERROR|passed|failed" "$out/sm$arch-tests.log" || true
  grep -hE "^precompile|^  _|gpu_check done" "$out/sm$arch-gpu_check.log" 2>/dev/null || true
done
[ $rc -eq 0 ] || { tail -n 60 "$out"/sm*-tests.log "$out"/sm*-gpu_check.log 2>/dev/null; exit 1; }
for arch in 90 80; do
  python -c "import json, sys; d = json.load(open(sys.argv[1])); assert d['done'] and d['compile'], d" \
    "$out/gpu_check-sm$arch.json"
done
say "gpu_check.py --dry-run --rehearsal 90 (tiny shapes, the table's plumbing)"
TRITON_CACHE_DIR="$cache/sm90" python -W ignore benchmarks/gpu_check.py --dry-run --rehearsal 90 --skip-tests \
  --jobs 2 --out "$out/gpu_check-dry-run-sm90.json" > "$out/gpu_check-dry-run.log" 2>&1 \
  || { tail -60 "$out/gpu_check-dry-run.log"; exit 1; }
python -c "import json, sys; d = json.load(open(sys.argv[1])); assert d['done'] and d['rows'] and d['compile'], d" \
  "$out/gpu_check-dry-run-sm90.json"
say "passed"
