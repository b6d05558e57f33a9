"""Collect the runs of bench/qa/reproduce.py into a table (Markdown + CSV), a plot and the per-layer structure.

    python bench/qa/report.py --runs runs/qa --out bench/results/qa

Runs with the default continued training form the grid (table.md, the curves); runs with more steps
(``reproduce.py --prune-steps N``) get their own table against ``teacher-sN`` (table-sN.md) and stars in the plot.
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
from pathlib import Path

from reproduce import PRUNE_STEPS

COLUMNS = ["run", "method", "distill", "steps", "heads_kept", "ffn_kept", "encoder_params", "f1", "HasAns_f1",
           "NoAns_f1", "best_f1", "speedup"]


def load_runs(runs: Path) -> tuple[dict[int, dict], list[dict]]:
    """The teachers by extra training steps (0: the teacher itself; N: teacher-sN), and every pruning run."""
    teachers, rows = {}, []
    for path in sorted(runs.glob("*/metrics.json")):
        m = json.loads(path.read_text())
        m["run"] = path.parent.name
        m["steps"] = json.loads((path.parent / "config.json").read_text())["max_steps"]
        if m["run"] == "teacher" or re.fullmatch(r"teacher-s\d+", m["run"]):
            teachers[0 if m["run"] == "teacher" else m["steps"]] = m
            continue
        if m["run"].startswith("teacher"):  # the earlier stages
            continue
        speed = path.parent / "speed.json"  # re-measured alone by bench/qa/speed.py
        if speed.is_file():
            m.update(json.loads(speed.read_text()))
        rows.append(m)
    return teachers, rows


def table(teacher: dict, rows: list[dict]) -> str:
    lines = ["| run | method | distill | steps | heads kept | FFN units kept | encoder params | F1 | HasAns F1 | "
             "NoAns acc | best F1 | speed-up |", "|" + "---|" * 12]
    extra = f"+{teacher['steps']}" if teacher["run"] != "teacher" else "-"  # teacher-sN: N steps more
    lines.append(f"| {teacher['run']} | - | - | {extra} | 72/72 | 9216/9216 | 100% | {teacher['f1']:.2f} | "
                 f"{teacher['HasAns_f1']:.2f} | {teacher['NoAns_f1']:.2f} | {teacher['best_f1']:.2f} | 1.00x |")
    for r in sorted(rows, key=lambda r: (-r["heads_kept"], -r["ffn_kept"], r["method"], r["distill"])):
        lines.append(
            f"| {r['run']} | {r['method']} | {'yes' if r['distill'] else 'no'} | {r['steps']} | "
            f"{r['heads_kept']}/{r['heads_total']} | "
            f"{r['ffn_kept']}/{r['ffn_total']} | {r['encoder_params'] / r['encoder_params_original']:.0%} | "
            f"{r['f1']:.2f} | {r['HasAns_f1']:.2f} | {r['NoAns_f1']:.2f} | {r['best_f1']:.2f} | {r['speedup']:.2f}x |")
    return "\n".join(lines)


def plot(teachers: dict[int, dict], rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    panels = [("heads", "f1", "dev F1"), ("heads", "HasAns_f1", "dev HasAns F1"),
              ("speedup", "HasAns_f1", "dev HasAns F1")]
    colors = {"random": "tab:gray", "gain": "tab:blue", "l0": "tab:red"}
    for method in colors:
        for distill in (False, True):
            for steps in sorted({r["steps"] for r in rows}):
                mine = sorted((r for r in rows if r["method"] == method and bool(r["distill"]) == distill
                               and r["steps"] == steps), key=lambda r: r["heads_kept"])
                if not mine:
                    continue
                longer = steps != PRUNE_STEPS
                style = "*" if longer else "-o" if distill else "--s"
                label = f"{method}{' + distill' if distill else ''}" + (f", {steps} steps" if longer else "")
                for ax, (x, y, _) in zip(axes, panels):
                    xs = [r["heads_kept"] / r["heads_total"] if x == "heads" else r["speedup"] for r in mine]
                    ax.plot(xs, [r[y] for r in mine], style, color=colors[method], label=label,
                            markersize=13 if longer else 6)
    teacher = teachers[0]
    no_answer = 100.0 * teacher["NoAns_total"] / teacher["total"]
    for ax, (x, y, ylabel) in zip(axes, panels):
        ax.axhline(teacher[y], color="black", lw=1, label="teacher (unpruned)")
        for steps, longer_teacher in sorted(teachers.items())[1:]:
            ax.axhline(longer_teacher[y], color="black", lw=1, ls="--", label=f"teacher, {steps} steps more")
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
    teachers, rows = load_runs(runs)
    grid = [r for r in rows if r["steps"] == PRUNE_STEPS]
    md = table(teachers[0], grid)
    (out / "table.md").write_text(md + "\n")
    for steps in sorted({r["steps"] for r in rows} - {PRUNE_STEPS}):
        longer = table(teachers.get(steps, teachers[0]), [r for r in rows if r["steps"] == steps])
        (out / f"table-s{steps}.md").write_text(longer + "\n")
        md += "\n\n" + longer
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for teacher in teachers.values():
            writer.writerow({"method": "-", "heads_kept": 72, "ffn_kept": 9216, **teacher})
        writer.writerows(rows)
    plot(teachers, rows, out / "f1_vs_pruning.png")
    l0 = [r for r in grid if r["method"] == "l0"]
    if l0:
        # of every L0 run, longer ones included; by HasAns F1, as overall F1 rewards collapsing to "no answer"
        best = max((r for r in rows if r["method"] == "l0"), key=lambda r: r["HasAns_f1"])
        structure = {"run": best["run"], "heads_per_layer": best["heads_per_layer"],
                     "ffn_per_layer": best["ffn_per_layer"]}
        (out / "l0_best_structure.json").write_text(json.dumps(structure, indent=2) + "\n")
        structure_plot(l0, out / "l0_structure.png")
    for commands in runs.glob("commands*.txt"):
        shutil.copy(commands, out / commands.name)
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
