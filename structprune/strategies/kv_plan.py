"""The order in which a speed-target plan removes a decoder layer's query heads, KV groups included.

With grouped-query attention a layer's attention costs ``A(h, g)`` for ``h`` query heads reading ``g`` KV heads
(:class:`~structprune.latency.kv.KVCurves`): removing the last query head of a KV group also removes the KV head
(its ``k_proj``/``v_proj`` rows and its cache slot), which one head at a time in order of importance may never
reach. :func:`kv_removal_path` builds the layer's removal path greedily: at each step it removes either the least
important query head of a group that keeps another, or every remaining head of one KV group, whichever loses the
least importance per millisecond saved. The planner (:func:`structprune.strategies.plan.plan_masks`) then
chooses how far along each layer's path to go, stopping only between steps, so a group is removed whole.
"""
from __future__ import annotations

from typing import Sequence


def kv_removal_path(heads: Sequence[int], importance: Sequence[float], kv_map: Sequence[int],
                    attention) -> tuple[list[int], list[int]]:
    """``(order, counts)``: the available query heads ``heads`` (with ``importance`` each, and ``kv_map[head]``
    their KV head) in the order they are removed, and the kept counts between steps (increasing, from 0 to
    ``len(heads)``). ``attention(h, g)``: the block's ms with ``h`` query heads reading ``g`` KV heads."""
    kept = {int(h): float(i) for h, i in zip(heads, importance)}
    removed: list[int] = []
    counts = [len(kept)]
    while kept:
        groups: dict[int, list[int]] = {}
        for h in sorted(kept, key=lambda h: (kept[h], h)):  # ascending importance within each group
            groups.setdefault(int(kv_map[h]), []).append(h)
        h_now, g_now = len(kept), len(groups)
        now = float(attention(h_now, g_now))
        options = []  # (importance lost per ms saved, importance lost, heads removed)
        for members in groups.values():
            steps = [members] if len(members) == 1 else [members[:1], members]  # one head; the whole group
            for drop in steps:
                whole = len(drop) == len(members)
                saved = now - float(attention(h_now - len(drop), g_now - whole))
                lost = sum(kept[h] for h in drop)
                options.append((lost / saved if saved > 1e-12 else float("inf"), lost, drop))
        ratio, lost, drop = min(options, key=lambda o: (o[0], o[1], len(o[2])))
        if ratio == float("inf"):  # nothing saves time (a flat curve): the least importance
            _, lost, drop = min(options, key=lambda o: (o[1], len(o[2])))
        for h in drop:
            del kept[h]
        removed.extend(drop)
        counts.append(len(kept))
    return removed, sorted(set(counts))


__all__ = ["kv_removal_path"]
