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
        speed = path.parent / "speed.json"  # re-measured alone by bench/qa/speed.py
        if speed.is_file():
            m.update(json.loads(speed.read_text()))
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

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    panels = [("heads", "f1", "dev F1"), ("heads", "HasAns_f1", "dev HasAns F1"),
              ("speedup", "HasAns_f1", "dev HasAns F1")]
    colors = {"random": "tab:gray", "gain": "tab:blue", "l0": "tab:red"}
    for method in colors:
        for distill in (False, True):
            mine = sorted((r for r in rows if r["method"] == method and bool(r["distill"]) == distill),
                          key=lambda r: r["heads_kept"])
            if not mine:
                continue
            style = "-o" if distill else "--s"
            label = f"{method}{' + distill' if distill else ''}"
            for ax, (x, y, _) in zip(axes, panels):
                xs = [r["heads_kept"] / r["heads_total"] if x == "heads" else r["speedup"] for r in mine]
                ax.plot(xs, [r[y] for r in mine], style, color=colors[method], label=label)
    no_answer = 100.0 * teacher["NoAns_total"] / teacher["total"]
    for ax, (x, y, ylabel) in zip(axes, panels):
        ax.axhline(teacher[y], color="black", lw=1, label="teacher (unpruned)")
        if y == "f1":
            ax.axhline(no_answer, color="black", lw=1, ls=":", label='always "no answer"')
        ax.set_ylabel(ylabel)
        ax.set_xlabel("fraction of heads kept (FFN kept 0.1 / 0.3 / 0.5 at 0.25 / 0.5 / 0.75)" if x == "heads"
                      else "measured end-to-end inference speed-up vs teacher (CPU)")
    axes[0].legend(fontsize=7)
    fig.suptitle("MiniLM-L6-H384 on SQuAD 2.0 (dev subset): accuracy vs pruning, reduced CPU protocol")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def structure_plot(rows: list[dict], path: Path) -> None:
    """Fraction of heads and FFN units kept in each layer, for every L0 run (the paper: middle layers keep more)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    l0 = sorted((r for r in rows if r["method"] == "l0"), key=lambda r: (-r["heads_kept"], r["distill"]))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for r in l0:
        layers = range(len(r["heads_per_layer"]))
        heads_per_layer = r["heads_total"] // len(r["heads_per_layer"])
        ffn_per_layer = r["ffn_total"] // len(r["ffn_per_layer"])
        style = "-o" if r["distill"] else "--s"
        axes[0].plot(layers, [h / heads_per_layer for h in r["heads_per_layer"]], style, label=r["run"])
        axes[1].plot(layers, [f / ffn_per_layer for f in r["ffn_per_layer"]], style, label=r["run"])
    for ax, what in zip(axes, ("attention heads", "FFN units")):
        ax.set_xlabel("layer")
        ax.set_title(f"{what} kept per layer (L0)")
    axes[0].set_ylabel("fraction kept")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


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
        best = max(l0, key=lambda r: r["HasAns_f1"])  # overall F1 rewards collapsing to "no answer"
        structure = {"run": best["run"], "heads_per_layer": best["heads_per_layer"],
                     "ffn_per_layer": best["ffn_per_layer"]}
        (out / "l0_best_structure.json").write_text(json.dumps(structure, indent=2) + "\n")
        structure_plot(rows, out / "l0_structure.png")
    for name in ["commands.txt"]:
        if (runs / name).is_file():
            shutil.copy(runs / name, out / name)
    for run in sorted(runs.glob("teacher*")) + [runs / r["run"] for r in rows]:
        if not run.is_dir():
            continue
        dest = out / "runs" / run.name
        dest.mkdir(parents=True, exist_ok=True)
        for f in ("config.json", "metrics.json", "speed.json", "summary.txt", "masks.json", "l0_log.jsonl",
                  "log.jsonl"):
            # the run, its continued training, its L0 selection phase
            for phase, prefix in (("", ""), ("train", "train_"), ("l0", "selection_")):
                src = run / phase / f
                if src.is_file():
                    shutil.copy(src, dest / (prefix + f))
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
