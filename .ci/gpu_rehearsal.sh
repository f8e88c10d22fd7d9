#!/usr/bin/env bash
# The GPU rehearsal (docs/DESIGN.md §11): Triton launches compiled for sm_90 and sm_80 with the real
# arguments and Triton's run-time specialisation, never run (vera_kernels/ops/rehearsal.py). Fails on a
# compile error, a first-choice config over the shared-memory limit or with serialised wgmma, or a test
# that fails other than on the values it checks. Covered here (a sample that fits CI's time on two cores):
#   sm_90: every test file that launches Triton kernels directly (tests/test_ops_*, test_triton_*; per-row
#          ids included), with autotuning off (the first config of each kernel, as gpu_check's test run);
#   sm_80: the GEMM and shrink kernel tests, adapter-only GEMM modes included (the tiles whose shared memory
#          depends on the architecture);
#   gpu_check.py --dry-run under the sm_90 rehearsal: its precompile (autotuning on: every config) and table
#          on tiny shapes, and its JSON.
# The per-kernel records (compiles, seconds, shared memory, ptxas findings) go to $VERA_KERNELS_REHEARSAL_OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${VERA_KERNELS_REHEARSAL_OUT:-${TMPDIR:-/tmp}/vera-rehearsal}"
mkdir -p "$out"
t0=$SECONDS
say() { echo "== GPU rehearsal: $* [$((SECONDS - t0)) s]"; }
opts=(-q -p no:cacheprovider -W ignore::UserWarning)
say "sm_90 and sm_80 test samples, side by side (logs in $out)"
python -m pytest "${opts[@]}" --gpu-rehearsal=90 --gpu-rehearsal-json="$out/tests-sm90.json" \
  tests/test_ops_*.py tests/test_triton_*.py > "$out/tests-sm90.log" 2>&1 &
p90=$!
python -m pytest "${opts[@]}" --gpu-rehearsal=80 --gpu-rehearsal-json="$out/tests-sm80.json" \
  tests/test_ops_fused_forward.py tests/test_ops_grad_input.py tests/test_ops_shrink.py tests/test_ops_adapter_only.py \
  > "$out/tests-sm80.log" 2>&1 &
p80=$!
rc=0
wait $p90 || rc=1
say "sm_90 done"; grep -E "GPU rehearsal|^  _|REHEARSAL FAILURE|passed|failed|error" "$out/tests-sm90.log" || true
wait $p80 || rc=1
say "sm_80 done"; grep -E "GPU rehearsal|^  _|REHEARSAL FAILURE|passed|failed|error" "$out/tests-sm80.log" || true
[ $rc -eq 0 ] || { tail -50 "$out/tests-sm90.log" "$out/tests-sm80.log"; exit 1; }
say "gpu_check.py --dry-run --rehearsal 90"
python -W ignore benchmarks/gpu_check.py --dry-run --rehearsal 90 --skip-tests --jobs 2 \
  --out "$out/gpu_check-dry-run-sm90.json" > "$out/gpu_check.log" 2>&1 || { tail -60 "$out/gpu_check.log"; exit 1; }
grep -E "^precompile|^  _|gpu_check done" "$out/gpu_check.log"
python -c "import json, sys; d = json.load(open(sys.argv[1])); assert d['done'] and d['rows'] and d['compile'], d" \
  "$out/gpu_check-dry-run-sm90.json"
say "passed"
