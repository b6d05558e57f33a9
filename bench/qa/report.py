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
           "best_f1", "speedup", "carried"]


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


def carried_over(csv_path: Path, rows: list[dict], teacher: dict) -> list[dict]:
    """Rows of an earlier ``results.csv`` (same commands and teacher) for runs not in ``rows``, marked
    ``carried``; their totals are taken from the runs of this collection."""
    if not rows:
        raise ValueError("carried-over rows need at least one run of this collection for the model's totals")
    totals = {k: rows[0][k] for k in ("heads_total", "ffn_total", "encoder_params_original")}
    have = {r["run"] for r in rows}
    out = []
    with open(csv_path, newline="") as f:
        for r in csv.DictReader(f):
            if r["run"] == "teacher" or r["run"] in have:
                continue
            row = {"run": r["run"], "method": r["method"], "distill": r["distill"] == "True", "carried": True,
                   **totals}
            for k in ("heads_kept", "ffn_kept", "encoder_params"):
                row[k] = int(r[k])
            for k in ("f1", "HasAns_f1", "NoAns_f1", "best_f1", "speedup"):
                row[k] = float(r[k])
            out.append(row)
    return out


def table(teacher: dict, rows: list[dict]) -> str:
    lines = ["| run | method | distill | heads kept | FFN units kept | encoder params | F1 | HasAns F1 | "
             "NoAns acc | best F1 | speed-up |", "|" + "---|" * 11]
    lines.append(f"| teacher | - | - | 72/72 | 9216/9216 | 100% | {teacher['f1']:.2f} | {teacher['HasAns_f1']:.2f} | "
                 f"{teacher['NoAns_f1']:.2f} | {teacher['best_f1']:.2f} | 1.00x |")
    for r in sorted(rows, key=lambda r: (-r["heads_kept"], -r["ffn_kept"], r["method"], r["distill"])):
        lines.append(
            f"| {r['run']}{' †' if r.get('carried') else ''} | {r['method']} | {'yes' if r['distill'] else 'no'} | {r['heads_kept']}/{r['heads_total']} | "
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


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", default="runs/qa")
    parser.add_argument("--out", default="bench/results/qa")
    parser.add_argument("--previous", type=Path, default=None,
                        help="an earlier results.csv whose runs (same commands, same teacher) are not re-run here")
    args = parser.parse_args()
    runs, out = Path(args.runs), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher, rows = load_runs(runs)
    if args.previous is not None:
        rows += carried_over(args.previous, rows, teacher)
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
    for name in ["commands.txt"]:
        if (runs / name).is_file():
            shutil.copy(runs / name, out / name)
    for run in sorted(runs.glob("teacher*")) + [runs / r["run"] for r in rows]:
        if not run.is_dir():
            continue
        dest = out / "runs" / run.name
        dest.mkdir(parents=True, exist_ok=True)
        for f in ("config.json", "metrics.json", "summary.txt", "masks.json", "l0_log.jsonl", "log.jsonl"):
            for phase in ("", "train", "l0"):  # the run, its continued training, its L0 selection phase
                src = run / phase / f
                if src.is_file():
                    shutil.copy(src, dest / (f"{phase}_{f}" if phase else f))
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
