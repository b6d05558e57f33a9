"""A decoder's latency table against measurement (issue 24): measure the table of a mid-size random Llama at a prefill
shape, then time compacted models with mixed per-layer (query heads, KV heads, GLU units) against the dense one
(:func:`structprune.latency.check_predictions`) and print predicted beside measured speed-ups.

    python bench/decoders/latency_table.py --threads 1 --at 1x256 --out bench/results/decoders/latency_table.json

The model: ``LlamaForCausalLM``, random weights, hidden 512, 8 query heads over 2 KV heads (head_dim 64), FFN 1536,
4 layers, vocabulary 8000, at ``generate()``'s prefill (KV cache on, the LM head on the last position).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import transformers

import structprune as sp
from structprune.latency import check_predictions, measure_table
from structprune.latency.command import format_table
from structprune.latency.cost_model import compare_timer

# (query heads, KV heads, GLU units) per layer of the 4 layers
CASES = [
    ([4, 4, 4, 4], [2, 2, 2, 2], [1536] * 4),          # half the query heads, spread over both KV groups
    ([4, 4, 4, 4], [1, 1, 1, 1], [1536] * 4),          # the same heads in one KV group: a KV head fewer per layer
    ([8, 4, 2, 0], [2, 1, 1, 0], [1536, 768, 384, 0]),  # mixed, a layer emptied
    ([6, 2, 4, 8], [2, 1, 2, 2], [960, 576, 1152, 1536]),
    ([6, 6, 6, 6], [2, 2, 2, 2], [1536] * 4),          # 3 + 3 heads per KV group
    ([6, 6, 6, 6], None, [1536] * 4),                  # the first 6 heads: 4 + 2 (the table's default grouping)
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--at", default="1x256", help="batch x sequence length of the prefill")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--backend", default="cpp")
    p.add_argument("--repeats", type=int, default=31, help="interleaved rounds of the table's probes")
    p.add_argument("--check-repeats", type=int, default=31, help="interleaved rounds of check_predictions")
    p.add_argument("--ffn-points", type=int, default=8)
    p.add_argument("--out", default=None, help="write the table and the rows here (JSON)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    batch, seq = (int(v) for v in args.at.lower().split("x"))
    cfg = transformers.LlamaConfig(vocab_size=8000, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024)
    torch.manual_seed(0)
    model = sp.patch(transformers.LlamaForCausalLM(cfg).eval())
    start = time.time()
    table = measure_table(model, batch, seq, backend=args.backend, timer=compare_timer(2, args.repeats),
                          ffn_points=args.ffn_points)
    measured_s = time.time() - start
    print(format_table(table))
    print(f"(measured in {measured_s:.0f} s)")
    start = time.time()
    cases = [(h, u) if g is None else (h, u, g) for h, g, u in CASES]
    rows = check_predictions(model, table, cases, timer=compare_timer(2, args.check_repeats))
    print(f"(checked in {time.time() - start:.0f} s)")
    print("heads | KV heads | units | predicted ms | measured ms | predicted speed-up | measured speed-up (IQR)")
    for r in rows:
        print(f"{r['heads']} | {r['kv_heads']} | {r['ffn']} | {r['predicted_ms']:.2f} | {r['measured_ms']:.2f} | "
              f"{r['predicted_speedup']:.3f} | {r['measured_speedup']:.3f} ({r['speedup_q1']:.3f}-"
              f"{r['speedup_q3']:.3f})")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"table": table.to_dict(), "rows": rows, "args": vars(args)}, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
