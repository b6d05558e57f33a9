"""The plots of experiments/squad2/report.py: the teacher's learning curve, the students' scores against their
measured speed-up with each method's frontier as its own line, and the students' dev curves."""
from __future__ import annotations

from pathlib import Path

COLORS = {"random": "tab:gray", "gain": "tab:blue", "l0": "tab:red", "l0-full": "tab:purple", "layerdrop": "tab:green"}


def plot_curve(curve: list[dict], path: Path, no_answer: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for key, style in (("f1", "-o"), ("HasAns_f1", "-s"), ("best_f1", "-^")):
        ax.plot([r["step"] for r in curve], [r[key] for r in curve], style, label=f"dev {key}")
    if no_answer is not None:
        ax.axhline(no_answer, color="black", lw=1, ls=":", label='always "no answer" (F1)')
    ax.set_xlabel("optimizer step (batch 16)")
    ax.set_ylabel("score")
    ax.set_title("Teacher (MiniLM-L6-H384) on all of dev.json while fine-tuning")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (speed-up, score) points that no other point matches or beats on both, slowest first: a method's
    accuracy-speed frontier."""
    best: list[tuple[float, float]] = []
    for speed, score in sorted(points, key=lambda p: (-p[0], -p[1])):  # fastest first
        if not best or score > best[-1][1]:
            best.append((speed, score))
    return best[::-1]


def plot_students(teacher: dict, rows: list[dict], path: Path) -> None:
    """Score against measured speed-up, one panel per score (at the own or 0 threshold, HasAns F1 at threshold 0,
    and always answering when those predictions exist), each method's distilled frontier as its own line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("HasAns_f1", "HasAns F1 at threshold 0")]
    if "thr_f1" in teacher and all("thr_f1" in r for r in rows):  # F1 as each model answers (its own threshold)
        panels.insert(0, ("thr_f1", "F1 at the model's dev-chosen threshold"))
    else:
        panels.insert(0, ("f1", "F1 at threshold 0"))
    if "always_HasAns_f1" in teacher and any("always_HasAns_f1_diff" in r for r in rows):
        panels.append(("always_HasAns_f1", "HasAns F1 always answering"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.6))
    for ax, (key, title) in zip(axes, panels):
        drawn = [r for r in rows if f"{key}_diff" in r and r.get("speedup")]
        for r in drawn:
            err = [[r[f"{key}_diff"] - r[f"{key}_diff_lo"]], [r[f"{key}_diff_hi"] - r[f"{key}_diff"]]]
            speed = {"speedup": "speed target", "layers": "layers kept"}.get(r["target"].split()[0], "counts")
            ax.errorbar(r["speedup"], r[key], yerr=err, fmt="o" if r["distill"] == "yes" else "s",
                        mfc="none" if speed == "speed target" else None, color=COLORS.get(r["method"], "black"),
                        capsize=3, label=f"{r['method']}, distill {r['distill']}, {speed}")
        for method in dict.fromkeys(r["method"] for r in drawn):
            line = frontier([(r["speedup"], r[key]) for r in drawn if r["method"] == method and r["distill"] == "yes"])
            if line:
                ax.plot(*zip(*line), "-", color=COLORS.get(method, "black"), alpha=0.7, label=f"{method} frontier")
        ax.axhline(teacher[key], color="black", lw=1, label="teacher")
        ax.set_title(f"dev {title}", fontsize=10)
        ax.set_xlabel("measured end-to-end speed-up vs teacher (CPU, 1 thread, B32xL192)")
        ax.set_ylabel("score (bars: 95% paired bootstrap CI of the difference to the teacher)", fontsize=8)
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=7)
    fig.suptitle("Pruned MiniLM-L6-H384 students vs their teacher, SQuAD 2.0 dev: each method's frontier")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_student_curves(curves: dict[str, list[dict]], teacher: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, key in zip(axes, ("best_f1", "HasAns_f1")):
        for run, curve in curves.items():
            ax.plot([c["step"] for c in curve], [c[key] for c in curve], "-o", label=run)
        ax.axhline(teacher[key], color="black", lw=1, label="teacher")
        ax.set_xlabel("step of the continued training (after the decision)")
        ax.set_ylabel(f"dev {key} (SQuAD 2.0, %)")
        ax.set_title(f"dev {key} while the students train", fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
