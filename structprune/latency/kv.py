"""The attention cost of a decoder layer with grouped-query attention, in kept query heads ``h`` AND kept KV heads
``g``, from two measured curves (see :mod:`structprune.latency.table`):

* ``A(h)``: the compacted attention block with the first ``h`` query heads and the KV heads they read in the
  default grouping (query head ``i`` reads KV head ``i // (H / Hkv)``), ``g_def(h) = ceil(h * Hkv / H)``;
* ``K(g)``: the block with all ``H`` query heads reading ``g`` KV heads (``g = 1..Hkv``; groups as equal as they
  can be), so only the k/v projections, their rotary positions / norms and the KV-cache writes change.

The prediction is separable: ``A(h, g) = Q(h) + K(g)``, with ``Q(h) = A(h) - K(g_def(h))`` the query heads' part
(the q projection, the attention itself, the output projection), made non-decreasing (more query heads never cost
less at a fixed KV count). At the default grouping it gives the measured ``A(h)`` (up to that fit); pruning KV
heads below it (whole KV groups, or heads spread over fewer groups) is charged ``K(g) - K(g_def(h))``.

``K(0)`` cannot be timed (query heads need a KV head): it is extrapolated with the mean slope of ``K`` over
``1..Hkv`` (so one KV head costs what the average one does; with ``Hkv = 1``, ``K(0) = K(1)``). It enters only
through ``Q(0) = A(0) - K(0)``, so ``A(0, 0) = A(0)`` exactly; between 0 and 1 KV head (expected counts during L0)
the curve is linear.
"""
from __future__ import annotations

import math
from typing import Sequence

from structprune.latency.fits import interpolate, isotonic


def default_kv(heads: int, num_heads: int, num_kv: int) -> int:
    """KV heads the first ``heads`` of ``num_heads`` query heads read in the default grouping."""
    return math.ceil(heads * num_kv / num_heads)


class KVCurves:
    """``Q`` (over ``0..H``) and ``K`` (over ``0..Hkv``) from the monotone fit ``attention_fit`` (``A(h)``,
    ``h = 0..H``) and the raw medians ``kv_ms`` (``K(g)``, ``g = 1..Hkv``)."""

    def __init__(self, attention_fit: Sequence[float], kv_ms: Sequence[float], num_heads: int, num_kv: int):
        if num_kv < 1 or num_heads % num_kv:
            raise ValueError(f"{num_heads} query heads cannot be grouped over {num_kv} KV heads")
        if len(kv_ms) != num_kv:
            raise ValueError(f"kv_attention_ms needs one entry per KV-head count 1..{num_kv}, got {len(kv_ms)}")
        self.num_heads, self.num_kv = num_heads, num_kv
        k = isotonic(kv_ms)
        slope = (k[-1] - k[0]) / (num_kv - 1) if num_kv > 1 else 0.0
        self.kv = [k[0] - slope, *k]
        self.query = isotonic([attention_fit[h] - self.kv[default_kv(h, num_heads, num_kv)]
                               for h in range(num_heads + 1)])
        self.default = [self.query[h] + self.kv[default_kv(h, num_heads, num_kv)] for h in range(num_heads + 1)]

    def attention(self, heads, kv_heads):
        """``A(h, g) = Q(h) + K(g)``: numbers or tensors (differentiable)."""
        return interpolate(heads, list(range(self.num_heads + 1)), self.query) + \
            interpolate(kv_heads, list(range(self.num_kv + 1)), self.kv)

    def check(self, heads, kv_heads) -> None:
        """For whole counts: ``g`` KV heads can serve ``h`` query heads (``g <= h <= g * H / Hkv``)."""
        from numbers import Number

        if isinstance(heads, Number) and isinstance(kv_heads, Number) and \
                float(heads).is_integer() and float(kv_heads).is_integer():
            group = self.num_heads // self.num_kv
            if not (kv_heads <= heads <= kv_heads * group):
                raise ValueError(f"{int(kv_heads)} KV heads cannot serve {int(heads)} query heads (each KV head "
                                 f"serves 1 to {group} of them)")


__all__ = ["KVCurves", "default_kv"]
