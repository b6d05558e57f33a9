#!/usr/bin/env bash
# Compile every csrc/**/*.cu with nvcc alone (no torch) for sm_80 and sm_90a, and check that the build recipe
# (csrc/build_recipe.py, the one source list of setup.py and the JIT build) lists each; exit non-zero on any error.
# Usage: csrc/check_cuda_compile.sh   (NVCC=/path/to/nvcc to pick the compiler; OUT_DIR defaults to a temp dir;
# PYTHON=... the interpreter that reads the recipe, default python3)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
nvcc="${NVCC:-nvcc}"
out="${OUT_DIR:-$(mktemp -d /tmp/structprune_nvcc.XXXXXX)}"
mkdir -p "$out"
command -v "$nvcc" >/dev/null || { echo "check_cuda_compile: nvcc not found (set NVCC=...)" >&2; exit 2; }
"$nvcc" --version | tail -n 1
status=0
count=0
while IFS= read -r -d '' cu; do
  count=$((count + 1))
  obj="$out/$(basename "${cu%.cu}").o"
  echo "nvcc -c ${cu#$here/}"
  if ! "$nvcc" -std=c++17 -O3 -Xcompiler -Wall -Werror all-warnings -I "$here" \
      -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90a,code=sm_90a -c "$cu" -o "$obj"; then
    echo "FAILED: ${cu#$here/}" >&2
    status=1
  fi
done < <(find "$here" -name '*.cu' -print0 | sort -z)
[ "$count" -gt 0 ] || { echo "check_cuda_compile: no .cu files under $here" >&2; exit 1; }
# The recipe needs no torch: it is plain Python, loaded by path.
if ! "${PYTHON:-python3}" - "$here" <<'EOF'
import importlib.util, pathlib, sys
here = pathlib.Path(sys.argv[1])
spec = importlib.util.spec_from_file_location("build_recipe", here / "build_recipe.py")
recipe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(recipe)
found = {str(p.relative_to(here)) for p in here.rglob("*.cu")}
listed = {s for s in recipe.CUDA_SOURCES if s.endswith(".cu")}
if found != listed:
    sys.exit(f"check_cuda_compile: build_recipe.py CUDA_SOURCES lists {sorted(listed)}, csrc/ has {sorted(found)}")
EOF
then
  status=1
fi
[ "$status" -eq 0 ] && echo "check_cuda_compile: $count file(s) OK (sm_80, sm_90a) -> $out"
exit "$status"
