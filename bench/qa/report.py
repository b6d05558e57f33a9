"""Collect the runs of bench/qa/reproduce.py into a table (Markdown + CSV), a plot and the per-layer structure.

    python bench/qa/report.py --runs runs/qa --out bench/results/qa
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path

COLUMNS = ["run", "method", "distill", "heads_kept", "ffn_kept", "encoder_params", "f1", "HasAns_f1", "NoAns_f1",
           "best_f1", "speedup"]


def load_runs(runs: Path) -> tuple[dict, list[dict]]:
    teacher = json.loads((runs / "teacher" / "metrics.json").read_text())
    rows = []
    for path in sorted(runs.glob("*/metrics.json")):
        if path.parent.name.startswith("teacher"):
            continue
        m = json.loads(path.read_text())
        m["run"] = path.parent.name
        rows.append(m)
    return teacher, rows


def table(teacher: dict, rows: list[dict]) -> str:
    lines = ["| run | method | distill | heads kept | FFN units kept | encoder params | F1 | HasAns F1 | "
             "NoAns acc | best F1 | speed-up |", "|" + "---|" * 11]
    lines.append(f"| teacher | - | - | 72/72 | 9216/9216 | 100% | {teacher['f1']:.2f} | {teacher['HasAns_f1']:.2f} | "
                 f"{teacher['NoAns_f1']:.2f} | {teacher['best_f1']:.2f} | 1.00x |")
    for r in sorted(rows, key=lambda r: (-r["heads_kept"], -r["ffn_kept"], r["method"], r["distill"])):
        lines.append(
            f"| {r['run']} | {r['method']} | {'yes' if r['distill'] else 'no'} | {r['heads_kept']}/{r['heads_total']} | "
            f"{r['ffn_kept']}/{r['ffn_total']} | {r['encoder_params'] / r['encoder_params_original']:.0%} | "
            f"{r['f1']:.2f} | {r['HasAns_f1']:.2f} | {r['NoAns_f1']:.2f} | {r['best_f1']:.2f} | {r['speedup']:.2f}x |")
    return "\n".join(lines)


def plot(teacher: dict, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"random": "tab:gray", "gain": "tab:blue", "l0": "tab:red"}
    for method in colors:
        for distill in (False, True):
            pts = sorted((r["heads_kept"] / r["heads_total"], r["speedup"], r["f1"]) for r in rows
                         if r["method"] == method and bool(r["distill"]) == distill)
            if not pts:
                continue
            style = "-o" if distill else "--s"
            label = f"{method}{' + distill' if distill else ''}"
            axes[0].plot([p[0] for p in pts], [p[2] for p in pts], style, color=colors[method], label=label)
            axes[1].plot([p[1] for p in pts], [p[2] for p in pts], style, color=colors[method], label=label)
    for ax in axes:
        ax.axhline(teacher["f1"], color="black", lw=1, label="teacher (unpruned)")
        ax.set_ylabel("dev F1 (SQuAD 2.0 subset)")
    axes[0].set_xlabel("fraction of heads kept (FFN kept: 0.1 / 0.3 / 0.5 with heads 0.25 / 0.5 / 0.75)")
    axes[1].set_xlabel("measured inference speed-up vs teacher (CPU)")
    axes[0].legend(fontsize=7)
    fig.suptitle("MiniLM-L6-H384 on SQuAD 2.0: F1 vs pruning (reduced CPU protocol)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", default="runs/qa")
    parser.add_argument("--out", default="bench/results/qa")
    args = parser.parse_args()
    runs, out = Path(args.runs), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher, rows = load_runs(runs)
    md = table(teacher, rows)
    (out / "table.md").write_text(md + "\n")
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerow({"run": "teacher", "method": "-", "heads_kept": 72, "ffn_kept": 9216, **teacher})
        writer.writerows(rows)
    plot(teacher, rows, out / "f1_vs_pruning.png")
    l0 = [r for r in rows if r["method"] == "l0"]
    if l0:
        best = max(l0, key=lambda r: r["f1"])
        structure = {"run": best["run"], "heads_per_layer": best["heads_per_layer"],
                     "ffn_per_layer": best["ffn_per_layer"]}
        (out / "l0_best_structure.json").write_text(json.dumps(structure, indent=2) + "\n")
    for name in ["commands.txt"]:
        if (runs / name).is_file():
            shutil.copy(runs / name, out / name)
    for run in sorted(runs.glob("teacher*")) + [runs / r["run"] for r in rows]:
        if not run.is_dir():
            continue
        dest = out / "runs" / run.name
        dest.mkdir(parents=True, exist_ok=True)
        for f in ("config.json", "metrics.json", "summary.txt", "masks.json", "l0_log.jsonl", "log.jsonl"):
            for src in (run / f, run / "train" / f):
                if src.is_file():
                    shutil.copy(src, dest / (("train_" if src.parent.name == "train" else "") + f))
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
