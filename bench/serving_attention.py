"""The serving module's attention: the cpp kernel ``cpp_serving_attention`` against ATen's SDPA, as the module calls
each (issue 28), on one thread, in interleaved rounds.

    python bench/serving_attention.py [--batch 16] [--heads 6] [--seq 192] [--head-dim 32] [--rounds 40]
                                      [--reps 5] [--threads 1] [--padded] [--dtype fp32|bf16]

Inputs: q, k, v as views [B, H, S, D] of one fused projection [B * S, 3 * H * D] (random, in ``--dtype``), the
layout ``ServingLayer.forward`` produces. ``--padded``: the second half of the batch rows has its last quarter of
keys padded (key bias finfo(dtype).min, fp32 for the kernel; the SDPA side gets it in the dtype as the mask
[B, 1, 1, S]); otherwise no mask (as bench/cpu_serving.py's all-ones attention mask gives). bf16: the kernel's
output is checked against the fp32 SDPA of the same inputs by the half-precision rule before timing.
- sdpa: ``F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B * S, H * D)`` (the
  module's call before the kernel);
- cpp: ``cpp_serving_attention(q, k, v, key_bias, D ** -0.5).view(B * S, H * D)``.

Each round times ``--reps`` calls of each side, the side that goes first alternating between rounds, by the wall
clock and by the calling thread's CPU time (``time.thread_time``: with one thread the kernels run on the caller, so
this leaves out the time the OS gave to other processes on a shared machine). Printed for both clocks: per side the
median and interquartile range of the per-call times over the rounds, its GFLOP/s (4 * B * H * S^2 * D flops per
call), and the median (and IQR) of the per-round ratios sdpa / cpp.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import structprune.backends.cpp.ops as ext
from structprune.backends.cpp.serving_attention import supported_bf16, supported_cpu


def quartiles(xs):
    q = statistics.quantiles(xs, n=4)
    return q[0], statistics.median(xs), q[2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--seq", type=int, default=192)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--padded", action="store_true")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    a = p.parse_args()
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    if ext.load_error() is not None or not supported_cpu() or (dtype == torch.bfloat16 and not supported_bf16()):
        raise SystemExit(f"cpp_serving_attention unavailable: {ext.load_error() or 'no AVX-512F / AVX512-BF16'}")
    torch.set_num_threads(a.threads)
    B, H, S, D = a.batch, a.heads, a.seq, a.head_dim
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(B * S, 3 * H * D, generator=g).to(dtype).view(B, S, 3, H, D).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    bias = None
    if a.padded:
        bias = torch.zeros(B, S)
        bias[B // 2:, S - S // 4:] = torch.finfo(dtype).min
    mask = None if bias is None else bias[:, None, None, :].to(dtype)
    op = torch.ops.structprune.cpp_serving_attention

    sides = {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B * S, H * D),
        "cpp": lambda: op(q, k, v, bias, D ** -0.5).view(B * S, H * D),
    }
    with torch.inference_mode():
        if dtype == torch.float32:
            torch.testing.assert_close(sides["cpp"](), sides["sdpa"](), atol=1e-5, rtol=1e-5)
        else:  # within twice the plain bf16 SDPA's error against the fp32 SDPA of the same inputs (+ eps * scale)
            m32 = None if mask is None else mask.float()
            ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=m32)
            ref = ref.transpose(1, 2).reshape(B * S, H * D)
            err, base = ((sides[n]().float() - ref).abs().max().item() for n in ("cpp", "sdpa"))
            bound = 2 * base + torch.finfo(dtype).eps * max(1.0, ref.abs().max().item())
            if err > bound:
                raise SystemExit(f"cpp bf16 error {err:.3g} > {bound:.3g} (plain bf16 SDPA: {base:.3g})")
        times = {clock: {name: [] for name in sides} for clock in ("wall", "thread cpu")}
        for _ in range(2):  # warm-up
            for fn in sides.values():
                fn()
        for r in range(a.rounds):
            order = list(sides) if r % 2 == 0 else list(reversed(sides))
            for name in order:
                t0, c0 = time.perf_counter(), time.thread_time()
                for _ in range(a.reps):
                    sides[name]()
                times["wall"][name].append((time.perf_counter() - t0) / a.reps * 1e3)
                times["thread cpu"][name].append((time.thread_time() - c0) / a.reps * 1e3)
    flop = 4.0 * B * H * S * S * D
    print(f"B{B} x H{H} x L{S} x D{D} {a.dtype}, {a.threads} thread(s), {'padded' if a.padded else 'no mask'}, "
          f"{a.rounds} rounds x {a.reps} calls")
    for clock, per_side in times.items():
        print(f" {clock} time")
        for name, ts in per_side.items():
            lo, med, hi = quartiles(ts)
            print(f"  {name:5s} median {med:7.3f} ms  IQR [{lo:.3f}, {hi:.3f}]  {flop / med / 1e6:6.1f} GFLOP/s")
        ratios = [s / c for s, c in zip(per_side["sdpa"], per_side["cpp"])]
        lo, med, hi = quartiles(ratios)
        print(f"  sdpa / cpp per round: median {med:.2f}x  IQR [{lo:.2f}, {hi:.2f}]")


if __name__ == "__main__":
    main()
