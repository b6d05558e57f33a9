"""Resident memory over many mask changes with the ``cpp`` backend: the packed-weight cache must stay bounded.

    python bench/pack_cache_rss.py                    # 10,000 mask changes on a small patched BERT, CPU
    python bench/pack_cache_rss.py --changes 200      # smoke

A 2-layer BERT (hidden 64, 4 heads, FFN 256) is patched; each step draws new random head and FFN masks
(``sp.set_masks``) and runs a forward under ``no_grad`` and, every ``--train-every`` steps, a forward + backward.
The resident set size (``VmRSS``) is read after a warm-up and then every ``--every`` steps; the result is the
growth from the warm-up to the end and the largest growth seen, with the pack cache's entry count. JSON with
``--out``. Pass: growth < 50 MB (issue 16).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
import transformers

import structprune as sp


def rss_bytes() -> int:
    """Resident set size of this process (Linux ``/proc/self/status``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not found in /proc/self/status (Linux only)")


def build(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                                  vocab_size=100, max_position_embeddings=64, attn_implementation="sdpa")
    model = transformers.BertModel(cfg)
    sp.patch(model)
    return model, cfg


def random_masks(cfg, gen: torch.Generator):
    L, H, I = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size
    heads = (torch.rand(L, H, generator=gen) < 0.6).float()
    ffn = (torch.rand(L, I, generator=gen) < 0.4).float()
    return heads, ffn


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--changes", type=int, default=10_000)
    p.add_argument("--every", type=int, default=500, help="read RSS every N mask changes")
    p.add_argument("--train-every", type=int, default=10, help="forward + backward every N changes (0: never)")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--limit-mb", type=float, default=50.0)
    p.add_argument("--out", help="write the result as JSON here")
    args = p.parse_args(argv)

    torch.set_num_threads(1)
    sp.set_backend("cpp")
    model, cfg = build()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=gen)
    attn = torch.ones_like(ids)
    attn[1, 17:] = 0
    from structprune.backends.cpp import ops as ext

    def step(i: int) -> None:
        heads, ffn = random_masks(cfg, gen)
        sp.set_masks(model, heads=heads, ffn=ffn)
        if args.train_every and i % args.train_every == 0:
            model.train()
            model(input_ids=ids, attention_mask=attn).last_hidden_state.square().mean().backward()
            model.zero_grad(set_to_none=True)
            model.eval()
        else:
            with torch.no_grad():
                model(input_ids=ids, attention_mask=attn)

    for i in range(args.warmup):
        step(i)
    base = rss_bytes()
    samples = [(0, base, ext.cache_size())]
    t0 = time.perf_counter()
    for i in range(1, args.changes + 1):
        step(i)
        if i % args.every == 0 or i == args.changes:
            samples.append((i, rss_bytes(), ext.cache_size()))
    seconds = time.perf_counter() - t0
    growth = samples[-1][1] - base
    peak = max(s[1] for s in samples) - base
    result = {
        "changes": args.changes, "warmup": args.warmup, "train_every": args.train_every,
        "rss_start_mb": round(base / 2**20, 1), "rss_end_mb": round(samples[-1][1] / 2**20, 1),
        "growth_mb": round(growth / 2**20, 2), "max_growth_mb": round(peak / 2**20, 2),
        "cache_entries_end": samples[-1][2], "seconds": round(seconds, 1), "limit_mb": args.limit_mb,
        "pass": growth / 2**20 < args.limit_mb,
        "samples": [{"changes": c, "rss_mb": round(r / 2**20, 2), "cache_entries": n} for c, r, n in samples],
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cpus": os.cpu_count()},
    }
    print(f"{args.changes} mask changes in {seconds:.1f} s: RSS {result['rss_start_mb']} -> {result['rss_end_mb']} MB "
          f"(growth {result['growth_mb']} MB, max {result['max_growth_mb']} MB; limit {args.limit_mb} MB), "
          f"{result['cache_entries_end']} cache entries -> {'PASS' if result['pass'] else 'FAIL'}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
