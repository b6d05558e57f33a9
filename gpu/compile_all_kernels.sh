#!/usr/bin/env bash
# Compile every Triton kernel variant the library launches (no sampling) for the usual targets and shapes, no GPU
# needed; writes the JSON report to gpu/results/kernels/compile_report.json. CI runs a sample of this
# (`structprune kernels ... --sample`). Takes several minutes on 2 cores the first time (Triton caches the rest).
#
#   gpu/compile_all_kernels.sh                   # sm_80 sm_86 sm_90, BERT-base / MiniLM / head_dim 128
#   ARCHS="sm_90" SHAPES="minilm" DTYPES="bf16" OUT=/tmp/report.json gpu/compile_all_kernels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
read -r -a archs <<< "${ARCHS:-sm_80 sm_86 sm_90}"
read -r -a shapes <<< "${SHAPES:-bert-base minilm 1536:12:6144}"
read -r -a dtypes <<< "${DTYPES:-fp16 bf16 fp32 tf32}"
out="${OUT:-gpu/results/kernels/compile_report.json}"
mkdir -p "$(dirname "$out")"
env -u TRITON_INTERPRET structprune kernels --arch "${archs[@]}" --shape "${shapes[@]}" --dtype "${dtypes[@]}" \
  --json > "$out"
python - "$out" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
rows = d["kernels"]
over = [r for r in rows if r["shared_bytes"] is not None and r["shared_estimate"] is not None
        and r["shared_bytes"] > r["shared_estimate"]]
print(f"{len(rows)} kernel variants, {sum(not r['ok'] for r in rows)} failing, "
      f"{sum(bool(r['spill_bytes']) for r in rows)} spilling, {len(over)} above their shared-memory estimate, "
      f"{d['seconds']} s -> {sys.argv[1]}")
sys.exit(0 if d["ok"] and not over else 1)
PY
