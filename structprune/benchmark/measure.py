"""Timing one case: CPU through :mod:`structprune.tools.timing` (the project's one timing helper), CUDA through
``triton.testing.do_bench`` or CUDA events with the L2 cache flushed; Dynamo's graph and graph-break counters."""
from __future__ import annotations

from typing import Callable

import torch

from structprune.tools import timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_cpu(fn: Callable, warmup: int, repeats: int, min_time: float = 0.0) -> tuple[list[float], int]:
    """Per-call seconds of ``repeats`` samples (perf_counter, gc off), after ``warmup`` calls; (samples, calls/sample).
    See :func:`structprune.tools.timing.sample` (and :func:`structprune.tools.timing.compare` to alternate two sides)."""
    return timing.sample(fn, warmup=warmup, repeats=repeats, min_time=min_time)


def time_cuda(fn: Callable, warmup: int, repeats: int, timer: str = "auto", grad_to_none=None) -> tuple[list[float], int]:
    """Per-call seconds on CUDA with the L2 cache flushed before each call: ``triton.testing.do_bench``
    (``timer="do_bench"``, time-based warm-up 25 ms / repeats 100 ms) or CUDA events (``"events"``)."""
    if timer in ("auto", "do_bench"):
        try:
            from triton.testing import do_bench
        except ImportError:
            if timer == "do_bench":
                raise
        else:
            try:
                ms = do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="all")
            except (TypeError, AssertionError):  # older triton without return_mode="all"
                ms = do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, quantiles=[0.25, 0.5, 0.75])
            return [t / 1e3 for t in ms], 1
    cache = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")  # larger than any L2 (H100: 50 MB)
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for i in range(repeats):
        cache.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)], 1


def _dynamo_graphs() -> int:
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    return int(counters["stats"]["unique_graphs"])


def _graph_breaks() -> dict[str, int]:
    """Dynamo's graph-break counts by reason (first line of each reason)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return {}
    out: dict[str, int] = {}
    for reason, n in counters["graph_break"].items():
        key = str(reason).strip().splitlines()[0][:160]
        out[key] = out.get(key, 0) + int(n)
    return out
