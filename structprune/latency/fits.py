"""The curve arithmetic of latency tables: monotone (isotonic) fits of measured medians, and piecewise-linear and
bilinear interpolation that works on numbers and on tensors (differentiable)."""
from __future__ import annotations

import bisect
from typing import Sequence

import torch


def isotonic(values: Sequence[float]) -> list[float]:
    """The non-decreasing sequence closest to ``values`` in least squares (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, weight]
    for v in values:
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m2, w2), (m1, w1) = blocks.pop(), blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2])
    out: list[float] = []
    for mean, weight in blocks:
        out.extend([mean] * int(weight))
    return out


def isotonic_grid(rows: Sequence[Sequence[float]]) -> list[list[float]]:
    """``rows`` (one per hidden width, increasing) made non-decreasing along each row, then along each column.

    Isotonic regression preserves order (``a <= b`` elementwise gives ``iso(a) <= iso(b)``), so the column pass
    keeps the rows non-decreasing: the result is monotone along both axes. One row: :func:`isotonic` of it."""
    fitted = [isotonic(r) for r in rows]
    columns = [isotonic(c) for c in zip(*fitted)]
    return [list(r) for r in zip(*columns)] if columns else fitted


def interpolate(x, xs: Sequence[int], ys: Sequence[float]):
    """Piecewise-linear ``y(x)`` through ``(xs, ys)`` (``xs`` increasing), for an int/float or a tensor
    ``x`` (differentiable in ``x``). ``x`` outside ``[xs[0], xs[-1]]`` is an error."""
    lo, hi = xs[0], xs[-1]
    if isinstance(x, torch.Tensor):
        if bool(((x.detach() < lo - 1e-6) | (x.detach() > hi + 1e-6)).any()):
            raise ValueError(f"kept count {x.detach().tolist()} outside the table's range [{lo}, {hi}]")
        if len(xs) == 1:
            return torch.full_like(x, float(ys[0]), dtype=x.dtype if x.is_floating_point() else torch.float64)
        grid = torch.tensor([float(v) for v in xs], dtype=x.dtype if x.is_floating_point() else torch.float64,
                            device=x.device)
        vals = torch.tensor([float(v) for v in ys], dtype=grid.dtype, device=x.device)
        xf = x.to(grid.dtype).clamp(lo, hi)
        i = torch.searchsorted(grid, xf.detach(), right=True).clamp(1, len(xs) - 1)
        x0, x1, y0, y1 = grid[i - 1], grid[i], vals[i - 1], vals[i]
        return y0 + (y1 - y0) * (xf - x0) / (x1 - x0)
    x = float(x)
    if not (lo - 1e-9 <= x <= hi + 1e-9):
        raise ValueError(f"kept count {x} outside the table's range [{lo}, {hi}]")
    if len(xs) == 1:
        return float(ys[0])
    i = min(max(bisect.bisect_right(xs, x), 1), len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def width_segment(hidden, widths: Sequence[int]):
    """``(i, j, t)``: ``hidden`` lies between ``widths[i]`` and ``widths[j]`` (``j = i + 1``, or ``j = i`` on a
    grid point, where ``t = 0``), at the fraction ``t`` of the way (a float, or a tensor differentiable in
    ``hidden``). ``hidden`` outside ``[widths[0], widths[-1]]`` is an error that says how to measure wider."""
    lo, hi = widths[0], widths[-1]
    value = float(hidden.detach()) if isinstance(hidden, torch.Tensor) else float(hidden)
    if not (lo - 1e-6 <= value <= hi + 1e-6):
        raise ValueError(f"hidden width {value:g} outside the table's widths [{lo}, {hi}]: measure the table with "
                         f"it in the hidden grid (structprune latency-table --hidden-grid ...)")
    if not isinstance(hidden, torch.Tensor):
        for k, w in enumerate(widths):
            if abs(value - w) <= 1e-9:
                return k, k, 0.0
    if len(widths) == 1:
        return 0, 0, 0.0
    i = min(max(bisect.bisect_right(widths, value), 1), len(widths) - 1) - 1
    t = (hidden - widths[i]) / (widths[i + 1] - widths[i])
    if isinstance(t, torch.Tensor):
        t = t.clamp(0.0, 1.0)
    return i, i + 1, t


def bilinear(x, xs: Sequence[int], rows: Sequence[Sequence[float]], hidden, widths: Sequence[int]):
    """``y(x, hidden)``: piecewise linear along ``x`` (grid ``xs``) in each row, linear between the rows of the two
    widths ``hidden`` lies between (``rows[k]`` belongs to ``widths[k]``); numbers or tensors, differentiable."""
    i, j, t = width_segment(hidden, widths)
    lower = interpolate(x, xs, rows[i])
    if i == j:
        return lower
    return lower + (interpolate(x, xs, rows[j]) - lower) * t
