"""torch.compile against eager on a patched, pruned MiniLM-shaped BERT on the CPU (issue 26): inference and a
fixed-mask training step, timed in alternating rounds.

    python bench/compile_speed.py [--rounds 10] [--reps 3] [--threads 2] [--compile-backend inductor]
                                  [--out bench/results/cpu/compile_vs_eager]

Model: BertForQuestionAnswering with random weights, 6 layers, hidden 384, 12 heads, FFN 1536 (MiniLM-L6's shape),
half of each layer's heads and of its FFN units masked (the same random masks every run), kernel backend "auto"
(cpp on CPU). Batch 8 x 128 tokens. Training step: zero_grad, forward with the QA loss (dropout as configured,
0.1, so attention dropout runs in the cpp kernel with the seed drawn in the graph), backward; no optimizer step.

Each round runs both sides, ``--reps`` calls each, eager first in even rounds and compiled first in odd ones, so
that a drift of the machine falls on both. Reported: the median and the quartiles of the per-call times of each
side, and the median (min-max) of the per-round ratios eager / compiled. Writes ``<out>.json`` (machine info,
settings, every time, graph counts) and ``<out>.md`` (a small table).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import transformers

import structprune as sp
from structprune.tools.machine import machine_info

LAYERS, HIDDEN, HEADS, FFN = 6, 384, 12, 1536


def build_model(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=30522, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                     num_attention_heads=HEADS, intermediate_size=FFN, max_position_embeddings=512,
                                     attn_implementation="sdpa")
    model = sp.patch(transformers.BertForQuestionAnswering(config))
    g = torch.Generator().manual_seed(seed)
    heads = torch.stack([torch.randperm(HEADS, generator=g) < HEADS // 2 for _ in range(LAYERS)])
    ffn = torch.stack([torch.randperm(FFN, generator=g) < FFN // 2 for _ in range(LAYERS)])
    sp.set_masks(model, heads=heads, ffn=ffn)
    return model


def make_batch(batch: int, seq: int, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1000, 30000, (batch, seq), generator=g),
            "attention_mask": torch.ones(batch, seq, dtype=torch.long),
            "start_positions": torch.randint(0, seq, (batch,), generator=g),
            "end_positions": torch.randint(0, seq, (batch,), generator=g)}


def infer(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).start_logits


def train_step(model, batch):
    for p in model.parameters():
        p.grad = None
    loss = model(**batch).loss
    loss.backward()
    return loss.detach()


def timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


def measure(name: str, eager, compiled, rounds: int, reps: int) -> dict:
    t0 = time.perf_counter()
    compiled()  # compiles
    compile_s = time.perf_counter() - t0
    eager(), compiled()  # warm-up
    times = {"eager": [], "compiled": []}
    ratios = []
    for r in range(rounds):
        order = (("eager", eager), ("compiled", compiled)) if r % 2 == 0 else (("compiled", compiled), ("eager", eager))
        this = {}
        for side, fn in order:
            this[side] = timed(fn, reps)
            times[side] += this[side]
        ratios.append(statistics.median(this["eager"]) / statistics.median(this["compiled"]))
    row = {"case": name, "compile_s": round(compile_s, 1), "times_ms": times, "round_ratios": ratios}
    for side in times:
        q1, med, q3 = quartiles(times[side])
        row[side] = {"median_ms": med, "q1_ms": q1, "q3_ms": q3}
    row["speedup"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
    print(f"{name}: eager {row['eager']['median_ms']:.1f} ms, compiled {row['compiled']['median_ms']:.1f} ms, "
          f"eager/compiled {row['speedup']['median']:.3f}x ({min(ratios):.3f}-{max(ratios):.3f}); "
          f"compiled in {compile_s:.0f} s", flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--out", default="bench/results/cpu/compile_vs_eager")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batch = make_batch(args.batch, args.seq)
    counters = torch._dynamo.utils.counters
    rows = []

    model = build_model().eval()
    compiled = torch.compile(model, backend=args.compile_backend)
    torch._dynamo.reset()
    before = sum(counters["graph_break"].values())
    rows.append(measure("inference", lambda: infer(model, batch), lambda: infer(compiled, batch), args.rounds,
                        args.reps))
    rows[-1]["graph_breaks"] = sum(counters["graph_break"].values()) - before
    rows[-1]["backends"] = sp.last_backends()

    model = build_model().train()
    compiled = torch.compile(model, backend=args.compile_backend)
    torch._dynamo.reset()
    before = sum(counters["graph_break"].values())
    rows.append(measure("training step", lambda: train_step(model, batch), lambda: train_step(compiled, batch),
                        args.rounds, args.reps))
    rows[-1]["graph_breaks"] = sum(counters["graph_break"].values()) - before
    rows[-1]["backends"] = sp.last_backends()

    settings = {"layers": LAYERS, "hidden": HIDDEN, "heads": HEADS, "ffn": FFN, "kept_heads": HEADS // 2,
                "kept_ffn_units": FFN // 2, "batch": args.batch, "seq": args.seq, "rounds": args.rounds,
                "reps": args.reps, "compile_backend": args.compile_backend, "backend": sp.get_backend()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    info = machine_info(torch.device("cpu"))
    info["load_average_1_5_15_at_end"] = list(os.getloadavg())  # the spread means little on a busy machine
    out.with_suffix(".json").write_text(json.dumps({"machine": info, "settings": settings, "results": rows},
                                                   indent=1) + "\n")
    lines = [f"# torch.compile ({args.compile_backend}) vs eager, patched MiniLM-shaped BERT, CPU", "",
             f"{LAYERS} layers, hidden {HIDDEN}, {HEADS} heads ({HEADS // 2} kept), FFN {FFN} ({FFN // 2} kept), "
             f"random weights; B{args.batch} x L{args.seq}; {args.threads} threads; backend {sp.get_backend()} "
             f"(ran: {rows[0]['backends']}); {args.rounds} alternating rounds x {args.reps} calls per side.",
             f"Machine: {info['cpu']}, {info['cpus_usable']} usable cores, torch {info['torch']}, "
             f"commit {str(info['git_commit'])[:10]}{' (dirty)' if info['git_dirty'] else ''}, {info['date']}.", "",
             "| case | eager median (IQR) ms | compiled median (IQR) ms | eager/compiled, median of rounds (min-max) "
             "| graph breaks | compile s |", "|---|---|---|---|---|---|"]
    for r in rows:
        e, c, s = r["eager"], r["compiled"], r["speedup"]
        lines.append(f"| {r['case']} | {e['median_ms']:.1f} ({e['q1_ms']:.1f}-{e['q3_ms']:.1f}) | "
                     f"{c['median_ms']:.1f} ({c['q1_ms']:.1f}-{c['q3_ms']:.1f}) | {s['median']:.3f}x "
                     f"({s['min']:.3f}-{s['max']:.3f}) | {r['graph_breaks']} | {r['compile_s']:.0f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
