"""``structprune latency-table``: measure (or read from the cache) the latency table of a model on this machine,
print it, and optionally write it as JSON and plot it."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def plot_table(table, path: Path) -> Path:
    """Attention ms against kept heads and FFN ms against kept units at each hidden width (measured medians and
    the monotone fit), and the model with every sublayer skipped against the width."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    d = table.to_dict()["derived"]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(13, 3.8))
    heads = list(range(table.num_heads + 1))
    widths = table.hidden_grid
    for k, (w, attn, ffn) in enumerate(zip(widths, [*table.narrow_attention_ms, table.attention_ms],
                                           [*table.narrow_ffn_ms, table.ffn_ms])):
        color = f"C{k}"
        a.plot(heads, attn, "o", color=color, markersize=3)
        a.plot(heads, d["attention_fit_ms_by_width"][k], "-", color=color, label=f"width {w}")
        b.plot(table.ffn_grid, ffn, "o", color=color, markersize=3)
        b.plot(table.ffn_grid, d["ffn_fit_ms_by_width"][k], "-", color=color, label=f"width {w}")
    a.set_xlabel("heads kept in the layer")
    a.set_ylabel("attention block (ms)")
    b.set_xlabel("FFN units kept in the layer")
    b.set_ylabel("FFN block (ms)")
    a.legend(fontsize=7, title="dots: measured; lines: monotone fit", title_fontsize=7)
    if table.measures_skipping:
        c.plot(widths, table.skipped_measured_ms, "o", label="every sublayer skipped (measured)")
        c.plot(widths, d["skipped_fit_ms"], "-", label="fit")
    c.axhline(table.empty_ms, color="gray", linestyle=":", label="every head and unit removed (full width)")
    c.set_xlabel("hidden width")
    c.set_ylabel("whole model (ms)")
    c.legend(fontsize=7)
    fig.suptitle(f"one compacted layer and the whole model, {table.describe()}; {table.dense_measured_ms:.1f} ms "
                 f"dense, at most {table.max_speedup:.1f}x", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def format_table(table) -> str:
    d = table.to_dict()["derived"]
    kv = f", {table.num_kv_heads} KV heads" if table.num_kv_heads is not None else ""
    lines = [f"latency table: {table.key.model['architecture']} ({table.num_layers} layers, {table.num_heads} heads"
             f"{kv}, {table.intermediate} FFN units, hidden {table.hidden}), {table.describe()}",
             f"whole model: {table.dense_measured_ms:.2f} ms dense, {table.empty_ms:.2f} ms with every head and unit "
             f"removed; blocks scaled by {d['scale']:.3f} to match"]
    if table.measures_skipping:
        lines += [f"every sublayer skipped: at most {table.max_speedup:.1f}x; fixed parts of the blocks scaled by "
                  f"{d['fixed_scale']:.3f} to match",
                  "hidden width    " + " ".join(f"{w:>6}" for w in table.hidden_grid),
                  "skipped ms      " + " ".join(f"{v:6.2f}" for v in table.skipped_measured_ms)]
    elif table.num_kv_heads is not None:
        lines += [f"a decoder at generate()'s prefill ({table.key.model.get('prefill')}); full width, every sublayer "
                  f"kept (decoders have no hidden-dimension or sublayer gates): at most {table.max_speedup:.1f}x",
                  "KV heads kept   " + " ".join(f"{g:>6}" for g in range(1, table.num_kv_heads + 1)),
                  f"attention ms @{table.num_heads} heads " + " ".join(f"{v:6.2f}" for v in table.kv_attention_ms)]
    else:
        lines.append(f"(full width only, no skipped sublayers: at most {table.max_speedup:.1f}x)")
    lines.append("heads kept      " + " ".join(f"{h:>6}" for h in range(table.num_heads + 1)))
    rows = list(zip(table.hidden_grid, [*table.narrow_attention_ms, table.attention_ms],
                    [*table.narrow_ffn_ms, table.ffn_ms]))
    for w, attn, _ in rows:
        lines.append(f"attention ms @{w:<4}" + " ".join(f"{v:6.2f}" for v in attn))
    for i in range(0, len(table.ffn_grid), 13):
        lines.append("FFN units       " + " ".join(f"{u:>6}" for u in table.ffn_grid[i:i + 13]))
        for w, _, ffn in rows:
            lines.append(f"FFN ms @{w:<8}" + " ".join(f"{v:6.2f}" for v in ffn[i:i + 13]))
    return "\n".join(lines)


def command(args: argparse.Namespace) -> int:
    import transformers

    from structprune.strategies.targets import parse_at
    from structprune.latency.cost_model import compare_timer, get_table
    from structprune.latency.widths import parse_hidden_grid

    hidden_grid = parse_hidden_grid(args.hidden_grid) if args.hidden_grid else None
    torch.set_num_threads(args.threads)
    if args.model:
        from structprune.cli import check_model_dir

        path = str(check_model_dir(args.model))
    else:
        from structprune.tools.demo import default_model_path

        path = default_model_path()
    config = transformers.AutoConfig.from_pretrained(path)
    causal = any(a.endswith("ForCausalLM") for a in getattr(config, "architectures", None) or [])
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModelForQuestionAnswering
    model = auto.from_pretrained(path)  # a decoder's table is timed at generate()'s prefill, with its LM head
    batch, seq = parse_at(args.at)
    table = get_table(model, batch, seq, backend=args.backend, dtype=args.dtype, cache_dir=args.cache_dir,
                      refresh=args.refresh, timer=compare_timer(2, args.repeats), ffn_points=args.ffn_points,
                      hidden_grid=hidden_grid)
    print(format_table(table))
    if args.out:
        table.save(args.out)
        print(f"wrote {args.out}")
    if args.plot:
        print(f"wrote {plot_table(table, Path(args.plot))}")
    if args.json:
        print(json.dumps(table.to_dict()["derived"]))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("latency-table", help="measure a model's per-layer latency table on this machine "
                                                    "(cached; used by prune --speedup)")
    p.add_argument("--model", default=None, help="HF model directory (default: the bundled MiniLM); only its "
                                                 "class and config matter")
    p.add_argument("--at", default="8x128", metavar="BxL", help="batch x sequence length (default 8x128)")
    p.add_argument("--backend", default="cpp", choices=["torch", "triton", "cpp"], help="kernel backend timed")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="dtype of the timed layers")
    p.add_argument("--threads", type=int, default=max(1, torch.get_num_threads()),
                   help="CPU threads (torch.set_num_threads; default: torch's, here %(default)s)")
    p.add_argument("--repeats", type=int, default=15, help="interleaved rounds over every probe")
    p.add_argument("--ffn-points", type=int, default=24, help="FFN kept-unit grid points (plus 0)")
    p.add_argument("--hidden-grid", default=None, metavar="W,W,...",
                   help="hidden widths to time besides the full one: widths (96) or fractions of the hidden size "
                        "(0.25), comma-separated (default 0.25,0.5,0.75)")
    p.add_argument("--cache-dir", default=None, help="default: $STRUCTPRUNE_CACHE_DIR/latency or "
                                                     "~/.cache/structprune/latency")
    p.add_argument("--refresh", action="store_true", help="measure again even when the cache holds a table")
    p.add_argument("--out", default=None, metavar="JSON", help="also write the table here (default: only the cache)")
    p.add_argument("--plot", default=None, metavar="PNG", help="plot the curves here (default: no plot)")
    p.add_argument("--json", action="store_true", help="print the derived numbers as JSON")
    p.set_defaults(func=command)
