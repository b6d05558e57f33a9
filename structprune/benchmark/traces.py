"""``structprune bench --profile``: torch.profiler Chrome traces per case, merged into one timeline."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

from torch import nn

from structprune.tools import profiling
from structprune.benchmark.config import Case
from structprune.benchmark.measure import _sync


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text).strip("_")


def _profile_case(cfg, case: Case, layer: nn.Module, step: Callable, device) -> None:
    from torch.profiler import ProfilerActivity, profile

    out = Path(cfg.profile_dir) / "traces"
    out.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    annotation = None if case.compiled else profiling.annotate_layer(layer, case.variant)
    try:
        with profile(activities=activities, record_shapes=True) as prof:
            for _ in range(cfg.profile_iters):
                with profiling.annotate(f"{case.shape.name}|{case.dtype}|{case.label}"):
                    step()
                _sync(device)
    finally:
        if annotation is not None:
            annotation.remove()
    name = _slug(f"{case.shape.name}_{case.dtype}_{case.mode}_{case.variant}_h{case.head_frac:.2f}_f{case.ffn_frac:.2f}")
    prof.export_chrome_trace(str(out / f"{name}.json"))
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    with open(Path(cfg.profile_dir) / "profile.txt", "a") as f:
        f.write(f"\n==== {case.shape.name} {case.dtype} {case.label}\n")
        f.write(prof.key_averages().table(sort_by=sort, row_limit=15) + "\n")


def _merge_traces(out_dir: Path) -> str | None:
    """Concatenate the per-case Chrome traces into ``trace.json`` (one timeline; open in Perfetto or chrome://tracing)."""
    trace_dir = out_dir / "traces"
    parts = sorted(trace_dir.glob("*.json")) if trace_dir.is_dir() else []
    if not parts:
        return None
    merged: dict = {"traceEvents": []}
    for part in parts:
        try:
            data = json.loads(part.read_text())
        except (OSError, ValueError):
            continue
        events = data.get("traceEvents", []) if isinstance(data, dict) else data
        merged["traceEvents"].extend(events)
        if isinstance(data, dict):
            for k, v in data.items():
                if k != "traceEvents" and k not in merged:
                    merged[k] = v
    path = out_dir / "trace.json"
    path.write_text(json.dumps(merged))
    return str(path)
