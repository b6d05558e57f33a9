"""Forward + backward of one gated layer with trainable vs frozen weights (the L0 selection phase trains only the
gates): how much the backward ops' ``output_mask`` saves.

    python bench/frozen_weights.py                      # MiniLM-sized layer, cpp backend, CPU
    python bench/frozen_weights.py --shape tiny --batch 2 --seq 16 --repeats 3   # smoke

Cases, alternated call by call (structprune.tools.timing.compare, so that load from other jobs spreads over all of them):
every parameter trainable; weights frozen, gates trainable, input requiring grad (a middle layer); the same with an
input that needs no gradient (the first layer). Prints the median and IQR per call and the time relative to
"trainable" (the median of the per-round ratios, with its IQR).
"""
from __future__ import annotations

import argparse
import os

import torch

from structprune import benchmark as bm
from structprune.ops import dispatch as ops
from structprune.model.gates import HardConcreteGate
from structprune.tools.timing import compare

CASES = ("trainable", "frozen weights", "frozen weights, x no grad")


def build(args, case: str):
    """(step, layer) for one case: a fresh pruned layer with gate sampling on, parameters frozen as the case says."""
    shape = bm.parse_shape(args.shape)
    layer = bm.build_layer(shape, "pruned", bm.base_state(shape, seed=0), head_frac=args.heads_kept,
                           ffn_frac=args.ffn_kept, mode="training")
    if case != "trainable":
        layer.requires_grad_(False)
        for gate in (m for m in layer.modules() if isinstance(m, HardConcreteGate)):
            gate.log_alpha.requires_grad_(True)
    x, mask, grad = bm.make_inputs(shape, args.batch, args.seq, torch.float32, "cpu", 0, 0.0, training=True)
    x.requires_grad_(case != "frozen weights, x no grad")
    params = [p for p in layer.parameters() if p.requires_grad]
    return bm.make_step(layer, params, x, mask, grad, training=True), layer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="384x12x1536", help="HIDDENxHEADSxFFN or a named shape (MiniLM-L12 "
                                                                "default)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=192)
    parser.add_argument("--heads-kept", type=float, default=0.5)
    parser.add_argument("--ffn-kept", type=float, default=0.3)
    parser.add_argument("--backend", default="cpp")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with ops.use_backend(args.backend):
        steps = {c: build(args, c)[0] for c in CASES}
        t = compare(steps, warmup=args.warmup, repeats=args.repeats,
                    shapes=f"{args.shape} layer, batch {args.batch} x seq {args.seq}")
    info = bm.machine_info(torch.device("cpu"))
    print(f"{args.shape} layer, batch {args.batch}, seq {args.seq}, heads kept {args.heads_kept:g}, FFN kept "
          f"{args.ffn_kept:g}, backend {args.backend}, fp32, {t.threads} threads, {args.repeats} alternated rounds; "
          f"{info.get('cpu', '')}, torch {torch.__version__}")
    print(f"{'case':<28}{'median ms':>10}{'IQR ms':>9}{'vs trainable':>14}{'(IQR)':>16}")
    for case in CASES:
        ts, r = t.time(case), t.speedup(case)
        print(f"{case:<28}{ts.median * 1e3:>10.1f}{ts.iqr * 1e3:>9.1f}{1 / r.median:>14.2f}"
              f"{f'({1 / r.q3:.2f}-{1 / r.q1:.2f})':>16}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
