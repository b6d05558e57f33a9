#!/usr/bin/env bash
# One-command GPU validation (one GPU, under 8 minutes): compile check for this GPU, the gpu-marked tests
# (both kernel backends against the reference in fp32/fp16/bf16, opcheck on CUDA, autocast), compute-sanitizer
# memcheck and racecheck on small cases, and the BERT-base layer sweep (B32 x L384, bf16, inference and
# training) against the dense HF SDPA layer and the compacted layer. The raw log and the sweep's results go to
# bench/results/gpu/<device>/; needs no network.
#
#   bench/gpu/validate.sh              # on a GPU machine, from any directory
#   bench/gpu/validate.sh --dry-run    # on CPU: every step started in a small CPU form, nothing written to bench/
#
# Each step runs under a time limit; a failing step does not stop the others. Exit status 1 if any failed.
# Environment: OUT (results directory), STEP_TIMEOUT (seconds per step, default 240; the sweep gets 2x).
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2

dry=0
if [ "${1:-}" = "--dry-run" ]; then
  dry=1
elif [ $# -gt 0 ]; then
  echo "usage: bench/gpu/validate.sh [--dry-run]" >&2
  exit 2
fi
py="$(command -v python || command -v python3)"
step_timeout="${STEP_TIMEOUT:-240}"
export STRUCTPRUNE_QUIET=1 PYTHONUNBUFFERED=1

if [ "$dry" = 1 ]; then
  device="dry-run-cpu"
  out="${OUT:-$(mktemp -d)}"
else
  if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "validate.sh: no CUDA device visible to torch (use --dry-run on a CPU machine)" >&2
    exit 2
  fi
  device="$("$py" -c "import re, torch; print(re.sub(r'[^A-Za-z0-9._-]+', '-', torch.cuda.get_device_name(0)))")"
  out="${OUT:-bench/results/gpu/$device}"
  unset TRITON_INTERPRET  # real kernels
fi
mkdir -p "$out"
log="$out/validate-$(date -u +%Y%m%dT%H%M%SZ).log"
exec > >(tee "$log") 2>&1
echo "validate.sh: device $device, log $log, $(date -u)"

failed=()
passed=()
# step NAME LIMIT_SECONDS COMMAND...: run, time, record; never exits.
step() {
  local name="$1" limit="$2"
  shift 2
  echo
  echo "== [$name] $*"
  local t0=$SECONDS rc=0
  timeout --kill-after=10 "$limit" "$@" || rc=$?
  local dt=$((SECONDS - t0))
  if [ "$rc" = 0 ]; then
    passed+=("$name (${dt}s)")
    echo "== [$name] ok in ${dt}s"
  else
    failed+=("$name (status $rc after ${dt}s)")
    echo "== [$name] FAILED with status $rc after ${dt}s"
  fi
}

if [ "$dry" = 1 ]; then
  step environment 60 "$py" -m structprune.cli info
  step kernels-compile 120 env -u TRITON_INTERPRET "$py" -m structprune.cli kernels --arch sm_90 --shape minilm \
    --dtype bf16 --sample --dry-run
  step gpu-tests 300 env STRUCTPRUNE_GPU_TESTS_ON=cpu "$py" -m pytest -q -p no:cacheprovider -m gpu \
    tests/test_gpu.py -k "cpp and (fp32 or bf16) and (1x1x2 or 2x37x4)"
  if command -v compute-sanitizer >/dev/null 2>&1; then
    echo "compute-sanitizer: $(command -v compute-sanitizer)"
  else
    echo "compute-sanitizer: not found here (a GPU machine with the CUDA toolkit has it)"
  fi
  step sanitizer-case 120 "$py" bench/gpu/sanitizer_case.py --device cpu --backend cpp
  step layer-sweep 300 "$py" -m structprune.cli bench --device cpu --shape tiny --batch 2 --seq 16 --dtype fp32 \
    --heads-kept 1,0.5 --ffn-kept 1,0.3 --mode inference training --variants dense-sdpa compacted pruned \
    --backend cpp --no-compile --repeats 3 --warmup 1 --out "$out/sweep" --no-plot
else
  cc="$("$py" -c "import torch; print('sm_%d%d' % torch.cuda.get_device_capability(0))")"
  step environment 60 bash -c "nvidia-smi; '$py' -m structprune.cli info"
  # the launch configs this GPU gets compile and fit (the full list: bench/gpu/compile_all_kernels.sh)
  step kernels-compile "$step_timeout" "$py" -m structprune.cli kernels --arch "$cc" --shape bert-base minilm \
    --dtype fp16 bf16 fp32 --sample
  step gpu-tests "$step_timeout" "$py" -m pytest -q -p no:cacheprovider -m gpu tests
  if command -v compute-sanitizer >/dev/null 2>&1; then
    # the caching allocator hides out-of-bounds accesses inside its blocks from memcheck
    step memcheck "$step_timeout" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
      --error-exitcode 1 "$py" bench/gpu/sanitizer_case.py
    step racecheck "$step_timeout" compute-sanitizer --tool racecheck --error-exitcode 1 "$py" \
      bench/gpu/sanitizer_case.py --dtype bf16
  else
    failed+=("compute-sanitizer (not installed: add the CUDA toolkit's compute-sanitizer to PATH)")
  fi
  step layer-sweep $((2 * step_timeout)) "$py" -m structprune.cli bench --device cuda --shape bert-base \
    --batch 32 --seq 384 --dtype bf16 --heads-kept 1,0.5 --ffn-kept 1,0.3 --mode inference training \
    --variants dense-sdpa compacted pruned --no-compile --out "$out/sweep"
fi

echo
echo "validate.sh: ${#passed[@]} steps passed, ${#failed[@]} failed; log: $log"
for s in "${passed[@]}"; do echo "  ok      $s"; done
for s in "${failed[@]+"${failed[@]}"}"; do echo "  FAILED  $s"; done
[ "${#failed[@]}" = 0 ]
