"""A benchmark's result: rows with ratios computed, written as JSON, CSV and a text table (plots: :mod:`.plots`)."""
from __future__ import annotations

import csv
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from structprune.benchmark.config import BASELINE
from structprune.benchmark.plots import plot_results


CSV_COLUMNS = (
    "shape", "hidden", "heads", "ffn", "batch", "seq", "dtype", "device", "mode", "variant", "kind", "backend",
    "compiled", "head_frac", "ffn_frac", "heads_kept", "units_kept", "median_ms", "q1_ms", "q3_ms", "iqr_ms",
    "min_ms", "samples", "calls_per_sample", "flops", "bytes", "gflop_per_s", "gb_per_s", "speedup_vs_dense",
    "speedup_vs_compacted", "ideal_speedup", "fraction_of_ideal", "max_abs_err", "ran_backends", "compile_s",
    "graph_breaks", "dynamo_graphs",
)


@dataclass
class BenchResult:
    machine: dict
    config: dict
    rows: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    elapsed_s: float = 0.0
    files: list[str] = field(default_factory=list)

    @classmethod
    def from_json(cls, data: dict) -> "BenchResult":
        return cls(machine=data["machine"], config=data["config"], rows=data["rows"],
                   skipped=data.get("skipped", []), elapsed_s=data.get("elapsed_s", 0.0))

    def to_json(self) -> dict:
        return {"schema": 1, "machine": self.machine, "config": self.config, "rows": self.rows,
                "skipped": self.skipped, "elapsed_s": round(self.elapsed_s, 2)}

    def table(self) -> str:
        return format_table(self)

    def write(self, out_dir: str | os.PathLike, plots: bool = True) -> list[str]:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        files = []
        path = out / "results.json"
        path.write_text(json.dumps(self.to_json(), indent=1, default=str) + "\n")
        files.append(str(path))
        path = out / "results.csv"
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(CSV_COLUMNS), extrasaction="ignore")
            writer.writeheader()
            for row in self.rows:
                writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in CSV_COLUMNS})
        files.append(str(path))
        path = out / "table.txt"
        path.write_text(self.table() + "\n")
        files.append(str(path))
        if plots:
            files += plot_results(self, out)
        self.files = files
        return files


def _fmt(value, spec: str, suffix: str = "") -> str:
    """``format(value, spec) + suffix``, or "-" padded to the same width when there is no value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        width = int(re.match(r"\d*", spec).group() or 1) + len(suffix)
        return "-".rjust(width)
    return format(value, spec) + suffix


def format_table(result: BenchResult) -> str:
    cuda = result.config.get("device", "cpu").startswith("cuda")
    unit, scale = ("TFLOP/s", 1e-3) if cuda else ("GFLOP/s", 1.0)
    m = result.machine
    lines = [f"structprune bench -- {m.get('gpu') or m.get('cpu')} | {m.get('device')} | threads {m.get('threads')} | "
             f"torch {m.get('torch')} | commit {str(m.get('git_commit') or '?')[:10]}"
             f"{' (dirty)' if m.get('git_dirty') else ''}"]
    groups: dict[tuple, list[dict]] = {}
    for row in result.rows:
        groups.setdefault((row["shape"], row["dtype"], row["mode"], row["batch"], row["seq"]), []).append(row)
    header = (f"{'variant':<26} {'heads':>5} {'ffn':>5} {'median ms':>10} {'IQR%':>5} {unit:>8} {'GB/s':>7} "
              f"{'vs dense':>8} {'vs compact':>10} {'ideal':>6} {'%ideal':>6} {'max err':>8}  ran")
    for (shape, dtype, mode, batch, seq), rows in groups.items():
        lines += ["", f"== {shape} {dtype} {mode}  batch {batch} seq {seq} " + "=" * 40, header, "-" * len(header)]
        last_fracs = None
        for r in rows:
            fracs = (r["head_frac"], r["ffn_frac"])
            if last_fracs is not None and fracs != last_fracs:
                lines.append("")
            last_fracs = fracs
            iqr_pct = 100.0 * r["iqr_ms"] / r["median_ms"] if r["median_ms"] else None
            pct_ideal = None if r["fraction_of_ideal"] is None else 100 * r["fraction_of_ideal"]
            lines.append(
                f"{r['variant']:<26} {r['head_frac']:>5.2f} {r['ffn_frac']:>5.2f} {r['median_ms']:>10.3f} "
                f"{_fmt(iqr_pct, '5.1f')} {_fmt(r['gflop_per_s'] * scale, '8.1f')} {_fmt(r['gb_per_s'], '7.1f')} "
                f"{_fmt(r['speedup_vs_dense'], '7.2f', 'x')} {_fmt(r['speedup_vs_compacted'], '9.2f', 'x')} "
                f"{_fmt(r['ideal_speedup'], '5.2f', 'x')} {_fmt(pct_ideal, '5.0f', '%')} "
                f"{_fmt(r['max_abs_err'], '8.1e')}  {r.get('ran_backends') or ''}")
    if result.skipped:
        lines += ["", "skipped:"]
        seen = set()
        for s in result.skipped:
            key = (s["variant"], s.get("mode"), s["reason"])
            if key in seen:
                continue
            seen.add(key)
            lines.append(f"  {s['variant']} ({s.get('mode') or 'all modes'}): {s['reason']}")
    return "\n".join(lines)


def _compute_ratios(rows: list[dict]) -> None:
    key = lambda r: (r["shape"], r["dtype"], r["mode"], r["batch"], r["seq"])  # noqa: E731
    dense = {key(r) + (r["head_frac"], r["ffn_frac"]): r["median_ms"] for r in rows if r["variant"] == BASELINE}
    dense_flops = {key(r): r["flops"] for r in rows if r["variant"] == BASELINE}
    compacted = {key(r) + (r["head_frac"], r["ffn_frac"]): r["median_ms"] for r in rows if r["variant"] == "compacted"}
    for r in rows:
        d = dense.get(key(r) + (r["head_frac"], r["ffn_frac"])) or dense.get(key(r) + (1.0, 1.0))
        c = compacted.get(key(r) + (r["head_frac"], r["ffn_frac"]))
        full = dense_flops.get(key(r), r["flops_dense"])
        r["speedup_vs_dense"] = d / r["median_ms"] if d else None
        r["speedup_vs_compacted"] = c / r["median_ms"] if c else None
        r["ideal_speedup"] = full / r["flops"] if r["flops"] else None
        r["fraction_of_ideal"] = (r["speedup_vs_dense"] / r["ideal_speedup"]
                                  if r["speedup_vs_dense"] and r["ideal_speedup"] else None)
