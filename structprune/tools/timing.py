"""One timing helper for the whole project (demo, benchmarks, QA speed-ups).

:func:`compare` times two or more callables *alternated call by call* after a warm-up, so that load from
other jobs and slow drifts (frequency scaling, caches warming) fall on every side alike, and reports the
median of the per-pair ratios with its spread (IQR) next to each side's median time. The order within a
round alternates (A B, B A, A B, ...) so neither side always runs right after the other. :func:`sample`
times one callable the same way (used where there is nothing to compare against).

    from structprune.tools.timing import compare
    t = compare({"dense": lambda: dense(**batch), "pruned": lambda: pruned(**batch)}, repeats=20,
                shapes="batch 8 x seq 128")
    print(t.describe())          # medians, speed-up with IQR, threads and shapes
    t.speedup("pruned").median   # dense time / pruned time, median over the pairs
"""
from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

__all__ = ["Spread", "Timing", "compare", "sample"]


@dataclass(frozen=True)
class Spread:
    """Median and quartiles of a list of values."""

    median: float
    q1: float
    q3: float

    @classmethod
    def of(cls, values: list[float]) -> "Spread":
        if not values:
            raise ValueError("no values to summarise")
        if len(values) == 1:
            return cls(values[0], values[0], values[0])
        q1, med, q3 = statistics.quantiles(values, n=4, method="inclusive")
        return cls(statistics.median(values), q1, q3)

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    @property
    def rel_halfwidth(self) -> float:
        """The wider of the two quartiles' distances from the median, relative to it (0.1 means ±10%)."""
        if self.median == 0:
            return math.inf
        return max(self.median - self.q1, self.q3 - self.median) / abs(self.median)


@dataclass
class Timing:
    """What :func:`compare` measured: per-call seconds of every side and the per-pair ratios
    ``baseline time / side time`` (a speed-up when > 1), with the conditions they were taken under."""

    baseline: str
    seconds: dict[str, list[float]]
    ratios: dict[str, list[float]]
    warmup: int
    repeats: int
    calls_per_sample: int
    threads: int
    shapes: str = ""
    notes: dict = field(default_factory=dict)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.seconds)

    def time(self, name: str) -> Spread:
        """Per-call seconds of ``name``: median and quartiles."""
        return Spread.of(self.seconds[name])

    def speedup(self, name: str) -> Spread:
        """``baseline / name`` per alternated pair: median and quartiles."""
        if name == self.baseline:
            return Spread(1.0, 1.0, 1.0)
        return Spread.of(self.ratios[name])

    def to_dict(self) -> dict:
        """A JSON-ready summary (milliseconds, ratios, conditions)."""
        out: dict = {"baseline": self.baseline, "warmup": self.warmup, "repeats": self.repeats,
                     "calls_per_sample": self.calls_per_sample, "threads": self.threads, "shapes": self.shapes,
                     "sides": {}}
        for name in self.names:
            t, r = self.time(name), self.speedup(name)
            out["sides"][name] = {"median_ms": t.median * 1e3, "q1_ms": t.q1 * 1e3, "q3_ms": t.q3 * 1e3,
                                  "ratio_median": r.median, "ratio_q1": r.q1, "ratio_q3": r.q3}
        return out

    def describe(self) -> str:
        """One line per side: median ms (IQR) and the ratio to the baseline with its IQR; then the conditions."""
        width = max(len(n) for n in self.names)
        lines = []
        for name in self.names:
            t = self.time(name)
            line = f"{name:<{width}}  {t.median * 1e3:9.2f} ms  (IQR {t.q1 * 1e3:.2f}-{t.q3 * 1e3:.2f})"
            if name != self.baseline:
                r = self.speedup(name)
                line += (f"  {self.baseline}/{name} = {r.median:.3f}x (IQR {r.q1:.3f}-{r.q3:.3f}, "
                         f"±{100 * r.rel_halfwidth:.1f}%)")
            lines.append(line)
        lines.append(f"{self.repeats} alternated rounds after {self.warmup} warm-up, {self.calls_per_sample} "
                     f"call(s) per sample, {self.threads} threads" + (f", {self.shapes}" if self.shapes else ""))
        return "\n".join(lines)


def _check_counts(warmup: int, repeats: int, min_time: float, number: int | None = None) -> None:
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    if not min_time >= 0:
        raise ValueError(f"min_time must be >= 0 seconds, got {min_time!r}")
    if number is not None and (not isinstance(number, int) or number < 1):
        raise ValueError(f"number must be an int >= 1 calls per sample, got {number!r}")
    if number is not None and min_time > 0:
        raise ValueError(f"give min_time ({min_time}) or number ({number}) calls per sample, not both")


def _calls_per_sample(fns: list[Callable], min_time: float, sync: Callable[[], None], clock,
                      number: int | None = None) -> int:
    """``number`` if given, else calls per sample so that the fastest side's sample lasts ``min_time`` (1 when
    ``min_time`` is 0)."""
    if number is not None:
        return number
    if min_time <= 0:
        return 1
    fastest = math.inf
    for fn in fns:
        t0 = clock()
        fn()
        sync()
        fastest = min(fastest, clock() - t0)
    return max(1, math.ceil(min_time / max(fastest, 1e-9)))


def compare(fns: Mapping[str, Callable[[], object]], *, warmup: int = 2, repeats: int = 10, min_time: float = 0.0,
            number: int | None = None, baseline: str | None = None, shapes: str = "",
            sync: Callable[[], None] | None = None, clock: Callable[[], float] | None = None) -> Timing:
    """Time the callables in ``fns`` alternated call by call.

    Args:
        fns: ``{name: callable}``, at least two; the first is the baseline unless ``baseline`` names another.
        warmup: untimed rounds (every side called once per round) before timing.
        repeats: timed rounds; each gives one sample per side and one ratio per non-baseline side.
        min_time: seconds per sample; short calls are repeated within a sample to reach it (0: one call).
        number: calls per sample, fixed (instead of ``min_time``); a sample is their mean time.
        shapes: a description of the inputs, stated in :meth:`Timing.describe` (e.g. ``"batch 8 x seq 128"``).
        sync: called after each sample before the clock is read (e.g. ``torch.cuda.synchronize``).
        clock: the clock (default ``time.perf_counter``).

    The garbage collector is off while timing. ``Timing.threads`` records ``torch.get_num_threads()``.
    """
    names = list(fns)
    if len(names) < 2:
        raise ValueError(f"compare needs at least two callables to alternate, got {names}; use sample() for one")
    baseline = names[0] if baseline is None else baseline
    if baseline not in fns:
        raise ValueError(f"baseline {baseline!r} is not one of {names}")
    _check_counts(warmup, repeats, min_time, number)
    sync = sync or (lambda: None)
    clock = clock or time.perf_counter
    for r in range(warmup):
        for name in (names if r % 2 == 0 else names[::-1]):
            fns[name]()
    sync()
    number = _calls_per_sample([fns[n] for n in names], min_time, sync, clock, number)
    seconds: dict[str, list[float]] = {n: [] for n in names}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(repeats):
            for name in (names if r % 2 == 0 else names[::-1]):
                fn = fns[name]
                t0 = clock()
                for _ in range(number):
                    fn()
                sync()
                seconds[name].append((clock() - t0) / number)
    finally:
        if gc_was_enabled:
            gc.enable()
    base = seconds[baseline]
    ratios = {n: [b / max(s, 1e-12) for b, s in zip(base, seconds[n])] for n in names if n != baseline}
    return Timing(baseline=baseline, seconds=seconds, ratios=ratios, warmup=warmup, repeats=repeats,
                  calls_per_sample=number, threads=torch.get_num_threads(), shapes=shapes)


def sample(fn: Callable[[], object], *, warmup: int = 2, repeats: int = 10, min_time: float = 0.0,
           number: int | None = None, sync: Callable[[], None] | None = None,
           clock: Callable[[], float] | None = None) -> tuple[list[float], int]:
    """Per-call seconds of ``repeats`` samples of one callable after ``warmup`` calls (gc off):
    ``(samples, calls_per_sample)``. Prefer :func:`compare` whenever a ratio is wanted."""
    _check_counts(warmup, repeats, min_time, number)
    sync = sync or (lambda: None)
    clock = clock or time.perf_counter
    for _ in range(warmup):
        fn()
    sync()
    number = _calls_per_sample([fn], min_time, sync, clock, number)
    samples = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            t0 = clock()
            for _ in range(number):
                fn()
            sync()
            samples.append((clock() - t0) / number)
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples, number
