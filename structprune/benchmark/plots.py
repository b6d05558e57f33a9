"""PNG plots of a benchmark's speed-ups against the kept fractions (matplotlib, imported only when plotting)."""
from __future__ import annotations

from pathlib import Path

from structprune.benchmark.config import BASELINE


def _plain_log_ticks(axis) -> None:
    """Log axis labelled 0.5, 1, 2, 5, 10 rather than 5x10^-1."""
    import matplotlib.ticker as mt

    axis.set_major_locator(mt.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(mt.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(mt.NullFormatter())


def plot_results(result, out_dir: Path) -> list[str]:
    """``result``: a :class:`structprune.benchmark.results.BenchResult`. One PNG per (shape, dtype, mode): speedup vs dense-sdpa against the FFN kept fraction, one panel per head
    fraction, plus a panel against the kept FLOP fraction; dashed line = FLOP-proportional ideal."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    files = []
    groups: dict[tuple, list[dict]] = {}
    for row in result.rows:
        if row["speedup_vs_dense"] is not None:
            groups.setdefault((row["shape"], row["dtype"], row["mode"]), []).append(row)
    for (shape, dtype, mode), rows in groups.items():
        pruned_rows = [r for r in rows if r["kind"] in ("compacted", "pruned")]
        if not pruned_rows:
            continue
        head_fracs = sorted({r["head_frac"] for r in pruned_rows}, reverse=True)
        variants = list(dict.fromkeys(r["variant"] for r in pruned_rows))
        fig, axes = plt.subplots(1, len(head_fracs) + 1, figsize=(4 * (len(head_fracs) + 1), 3.8), squeeze=False)
        axes = axes[0]
        styles = {}
        for i, v in enumerate(variants):
            if v == "compacted":
                styles[v] = dict(color="0.35", linewidth=2.5, marker="s")
            else:
                styles[v] = dict(color=f"C{i % 10}", linewidth=1.5, marker="o",
                                 linestyle="--" if v.endswith("+compile") else "-")
        for ax, hf in zip(axes, head_fracs):
            sub = [r for r in pruned_rows if r["head_frac"] == hf]
            ideal = sorted({(r["ffn_frac"], r["ideal_speedup"]) for r in sub if r["variant"] == "compacted"}
                           or {(r["ffn_frac"], r["ideal_speedup"]) for r in sub})
            ax.plot([p[0] for p in ideal], [p[1] for p in ideal], "k:", linewidth=1.5, label="ideal (FLOP-proportional)")
            for v in variants:
                pts = sorted((r["ffn_frac"], r["speedup_vs_dense"]) for r in sub if r["variant"] == v)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], label=v, **styles[v])
            ax.axhline(1.0, color="k", linewidth=0.8)
            ax.set_title(f"heads kept {hf:g}")
            ax.set_xlabel("FFN units kept")
            ax.set_yscale("log")
            _plain_log_ticks(ax.yaxis)
            ax.invert_xaxis()
            ax.grid(True, which="both", alpha=0.3)
        axes[0].set_ylabel(f"speedup vs {BASELINE}")
        ax = axes[-1]
        full = {r["variant"]: r for r in rows if r["variant"] == BASELINE}.get(BASELINE)
        xs = sorted({1.0 / r["ideal_speedup"] for r in pruned_rows if r["ideal_speedup"]})
        ax.plot(xs, [1.0 / x for x in xs], "k:", linewidth=1.5, label="ideal (FLOP-proportional)")
        for v in variants:
            pts = sorted((1.0 / r["ideal_speedup"], r["speedup_vs_dense"]) for r in pruned_rows
                         if r["variant"] == v and r["ideal_speedup"])
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=v, **{**styles[v], "linestyle": "none"})
        ax.axhline(1.0, color="k", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        _plain_log_ticks(ax.yaxis)
        ax.invert_xaxis()
        ticks = [t for t in (1.0, 0.7, 0.5, 0.3, 0.2, 0.1, 0.05, 0.02) if xs and min(xs) * 0.9 <= t <= 1.0]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("kept FLOP fraction")
        ax.set_title("all fractions")
        ax.grid(True, which="both", alpha=0.3)
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=8, frameon=False)
        batch, seq = rows[0]["batch"], rows[0]["seq"]
        dense_ms = f", {BASELINE} {full['median_ms']:.3g} ms" if full else ""
        where = result.machine.get("gpu") or result.machine.get("cpu")
        fig.suptitle(f"{shape} {dtype} {mode}: batch {batch}, seq {seq} on {where}"
                     f"{dense_ms}", fontsize=10)
        fig.tight_layout(rect=(0, 0.1, 1, 0.95))
        path = out_dir / f"speedup_{shape}_{dtype}_{mode}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(str(path))
    return files
