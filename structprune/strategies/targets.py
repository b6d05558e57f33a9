"""Pruning targets and the exact top-k selection every strategy shares.

A :class:`PruneTarget` says how much of the model to KEEP (not how much to remove). Counts always refer to
the original sizes of the gates (``gate.n``: heads per layer, FFN units per layer), whatever is already
pruned, so strategies compose: a second call with a smaller target prunes further from where the first
one stopped and never revives a pruned head or unit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence, Union

import torch
from torch import nn

from structprune.model.masks import Masks, gate_sizes, get_masks, set_masks
from structprune.model.patching import layer_parts
from structprune.strategies.groups import group_sum, kv_kept, kv_maps, kv_sizes

Amount = Union[float, int, Sequence[Union[float, int]], None]
STRUCTURES = ("heads", "ffn")


@dataclass(frozen=True)
class PruneTarget:
    """How many attention heads and FFN units to KEEP.

    Each of ``heads`` / ``ffn`` is one of:

    * a ``float`` in [0, 1]: the fraction KEPT, of the model's total (``per_layer=False``) or of each
      layer (``per_layer=True``). ``PruneTarget(heads=0.5, ffn=0.3)`` keeps half the heads and 30% of the
      FFN units; ``1.0`` keeps everything.
    * an ``int``: an absolute number KEPT, in the whole model (``per_layer=False``) or in every layer
      (``per_layer=True``). Note ``1`` (one head) differs from ``1.0`` (all heads).
    * a list with one ``int`` or ``float`` per layer: per-layer counts/fractions (implies per-layer selection).
    * ``None``: leave this structure as it is.

    ``per_layer=False`` ranks units globally across layers (layers may end up with different sizes, or
    with none left); ``per_layer=True`` ranks within each layer. Fractions are rounded to the nearest count.

    Budget targets (:mod:`structprune.latency`) say how fast or how small instead, and let the strategy choose
    the per-layer counts at the least importance lost:

    * ``speedup``: predicted end-to-end speed-up over the dense model (>= 1), or ``latency_ms``: predicted ms,
      both at ``at=(batch, seq_len)`` with ``backend`` and ``dtype``, from the machine's cost table (``table``,
      else measured or read from the cache by :func:`structprune.latency.get_table`);
    * ``params``: at most this fraction of the heads' and FFN units' encoder parameters kept (alone or with a
      speed target: ``PruneTarget(speedup=2.0, params=0.4)``);
    * with a budget, ``heads``/``ffn`` are caps (at most that many kept; 1.0: no cap) and ``per_layer=True``
      gives every layer the same share of the budget.

    ``kv_heads`` (grouped-query attention, decoders; an amount as above, counted in KV heads): prune whole KV
    groups, a KV head with every query head that reads it. ``PruneTarget(kv_heads=0.5)`` keeps half the KV heads
    and all the query heads of the kept groups; with ``heads`` below 1.0 the query heads are then ranked among
    the kept groups, each kept group keeping at least one. A group's importance is the sum of its query heads'.

    ``multiple_of`` (with a budget): every layer's kept FFN units, and the kept hidden width of a model with
    hidden-dimension gates (:mod:`structprune.model.cofi`), are multiples of it. GEMMs at odd widths can run far
    slower than at aligned ones (on an AMD EPYC, a projection writing 347 columns took 1.7x one writing 352), and a
    latency table that interpolates between widths cannot see it; 16 suits CPUs and tensor cores. Heads are aligned
    when ``head_dim`` is a multiple of it. Default 1: any count.
    """

    heads: Amount = 1.0
    ffn: Amount = 1.0
    per_layer: bool = False
    speedup: float | None = None
    latency_ms: float | None = None
    params: float | None = None
    at: tuple[int, int] | None = None
    backend: str = "cpp"
    dtype: str = "fp32"
    table: Any = field(default=None, compare=False, repr=False)
    kv_heads: Amount = None
    multiple_of: int = 1

    def __post_init__(self):
        for name in STRUCTURES + ("kv_heads",):
            _check_amount(name, getattr(self, name))
        _check_budget(self)
        if isinstance(self.multiple_of, bool) or not isinstance(self.multiple_of, int) or self.multiple_of < 1:
            raise ValueError(f"PruneTarget.multiple_of must be an int >= 1, got {self.multiple_of!r}")
        if self.multiple_of > 1 and not self.has_budget:
            raise ValueError("PruneTarget.multiple_of applies to budget targets (speedup, latency_ms or params), where "
                             "the plan chooses the per-layer counts; counts and fractions are kept as asked")
        if self.kv_heads is not None and self.has_budget:
            raise ValueError("PruneTarget.kv_heads takes a count or fraction of KV groups kept, not with a speed, "
                             "latency or parameter budget")

    @property
    def has_budget(self) -> bool:
        """True for a speed, latency or parameter target (planned on the cost table), False for counts."""
        return self.speedup is not None or self.latency_ms is not None or self.params is not None

    @property
    def has_latency(self) -> bool:
        return self.speedup is not None or self.latency_ms is not None

    def is_per_layer(self, structure: str) -> bool:
        return self.per_layer or isinstance(getattr(self, structure), (list, tuple))

    def counts(self, structure: str, sizes: Sequence[int]) -> int | list[int] | None:
        """Kept count for ``structure`` given the original per-layer ``sizes``: one total (global ranking)
        or a list with one count per layer (per-layer ranking); None when the structure is left as is."""
        amount = getattr(self, structure)
        if amount is None:
            return None
        sizes = list(sizes)
        if isinstance(amount, (list, tuple)):
            if len(amount) != len(sizes):
                raise ValueError(f"PruneTarget.{structure} lists {len(amount)} per-layer amounts, "
                                 f"but the model has {len(sizes)} layers")
            return [_count(structure, a, n) for a, n in zip(amount, sizes)]
        if self.per_layer:
            return [_count(structure, amount, n) for n in sizes]
        return _count(structure, amount, sum(sizes))


def _check_amount(name: str, amount: Amount) -> None:
    if amount is None:
        return
    items = amount if isinstance(amount, (list, tuple)) else [amount]
    for a in items:
        if isinstance(a, bool) or not isinstance(a, (int, float)):
            raise TypeError(f"PruneTarget.{name} must be a float fraction kept, an int count kept, a list of "
                            f"those per layer, or None; got {a!r}")
        if isinstance(a, float) and not (0.0 <= a <= 1.0):
            raise ValueError(f"PruneTarget.{name} fraction kept must be in [0, 1], got {a}")
        if isinstance(a, int) and a < 0:
            raise ValueError(f"PruneTarget.{name} count kept must be >= 0, got {a}")


def _check_budget(t: PruneTarget) -> None:
    if t.speedup is not None and t.latency_ms is not None:
        raise ValueError("give PruneTarget.speedup or PruneTarget.latency_ms, not both")
    if t.speedup is not None and not (isinstance(t.speedup, (int, float)) and t.speedup >= 1.0):
        raise ValueError(f"PruneTarget.speedup must be a number >= 1 (a speed-up over the dense model), "
                         f"got {t.speedup!r}")
    if t.latency_ms is not None and not (isinstance(t.latency_ms, (int, float)) and t.latency_ms > 0):
        raise ValueError(f"PruneTarget.latency_ms must be > 0 milliseconds, got {t.latency_ms!r}")
    if t.params is not None and not (isinstance(t.params, (int, float)) and 0.0 <= t.params <= 1.0):
        raise ValueError(f"PruneTarget.params must be a fraction of parameters kept in [0, 1], got {t.params!r}")
    if t.speedup is None and t.latency_ms is None:
        return
    if t.at is None and t.table is None:
        raise ValueError("a speed target needs the input shape it refers to: at=(batch, seq_len), or a table")
    if t.at is not None:
        if (not isinstance(t.at, (tuple, list)) or len(t.at) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in t.at)):
            raise ValueError(f"PruneTarget.at must be (batch, seq_len), two ints >= 1, got {t.at!r}")
        if t.table is not None and (t.table.key.batch, t.table.key.seq_len) != tuple(t.at):
            raise ValueError(f"PruneTarget.at={tuple(t.at)} but the table was measured at {t.table.at}")


def parse_at(text: str) -> tuple[int, int]:
    """``"8x128"`` -> ``(8, 128)`` (batch x sequence length)."""
    parts = str(text).lower().replace("×", "x").split("x")
    try:
        batch, seq = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"expected BATCHxSEQ_LEN such as 8x128, got {text!r}") from None
    if batch < 1 or seq < 1:
        raise ValueError(f"expected BATCHxSEQ_LEN with both >= 1, got {text!r}")
    return batch, seq


def _count(structure: str, amount: float | int, size: int) -> int:
    if isinstance(amount, float):
        return int(math.floor(amount * size + 0.5))
    if amount > size:
        raise ValueError(f"PruneTarget.{structure} asks to keep {amount}, but there are only {size}")
    return int(amount)


def as_target(target: PruneTarget | dict | float) -> PruneTarget:
    """Accept a PruneTarget, a dict of its fields, or one fraction kept for both structures."""
    if isinstance(target, PruneTarget):
        return target
    if isinstance(target, dict):
        return PruneTarget(**target)
    if isinstance(target, (int, float)) and not isinstance(target, bool):
        return PruneTarget(heads=float(target), ffn=float(target))
    raise TypeError(f"target must be a PruneTarget, a dict of its fields or a float fraction kept, got {target!r}")


def structure_counts(target: PruneTarget, model: nn.Module) -> dict:
    """Kept counts per structure (:meth:`PruneTarget.counts`), with ``"kv_heads"`` when the target has one; then
    ``heads=1.0`` means every query head of the kept groups (count None)."""
    sizes = gate_sizes(model)
    counts = {s: target.counts(s, sizes[s]) for s in STRUCTURES}
    if target.kv_heads is not None:
        counts["kv_heads"] = target.counts("kv_heads", kv_sizes(model))
        if isinstance(target.heads, float) and target.heads == 1.0:
            counts["heads"] = None
    return counts


def layer_gates(model: nn.Module, structure: str) -> list:
    """The per-layer HardConcreteGate of ``structure`` ("heads" or "ffn")."""
    parts = layer_parts(model)
    if structure == "heads":
        return [p.head_gate for p in parts]
    if structure == "ffn":
        return [p.unit_gate for p in parts]
    raise ValueError(f"structure must be one of {STRUCTURES}, got {structure!r}")


def current_masks(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    """What is still kept, per structure and layer (bool vectors on the CPU)."""
    masks = get_masks(model)
    return {"heads": [h.clone() for h in masks.heads_per_layer()], "ffn": [f.clone() for f in masks.ffn]}


def select_top(scores: Sequence[torch.Tensor], available: Sequence[torch.Tensor], count: int | Sequence[int],
               structure: str = "units") -> list[torch.Tensor]:
    """Keep exactly ``count`` of the ``available`` units with the highest ``scores``.

    ``count`` an int: one global ranking over all layers; a list: ``count[l]`` units in layer ``l``.
    Ties are broken by position (earlier layer, lower index first), so results are deterministic.
    Returns per-layer bool masks (CPU).
    """
    scores = [s.detach().float().cpu().flatten() for s in scores]
    available = [a.detach().bool().cpu().flatten() for a in available]
    if len(scores) != len(available) or any(s.shape != a.shape for s, a in zip(scores, available)):
        raise ValueError("scores and available masks must have the same per-layer shapes")
    if isinstance(count, int):
        groups, counts = [list(range(len(scores)))], [count]
    else:
        if len(count) != len(scores):
            raise ValueError(f"{len(count)} per-layer counts for {len(scores)} layers")
        groups, counts = [[i] for i in range(len(scores))], list(count)
    out = [torch.zeros_like(a) for a in available]
    for layers, k in zip(groups, counts):
        flat_scores = torch.cat([scores[i] for i in layers])
        flat_avail = torch.cat([available[i] for i in layers])
        n_avail = int(flat_avail.sum())
        if k > n_avail:
            where = "in total" if len(layers) > 1 else f"in layer {layers[0]}"
            raise ValueError(f"cannot keep {k} {structure} {where}: only {n_avail} are not pruned already "
                             "(targets count the original sizes, and pruned units stay pruned)")
        flat_scores = torch.where(flat_avail, flat_scores, torch.full_like(flat_scores, -math.inf))
        order = torch.sort(flat_scores, descending=True, stable=True).indices[:k]
        keep = torch.zeros_like(flat_avail)
        keep[order] = True
        for i, part in zip(layers, keep.split([scores[i].numel() for i in layers])):
            out[i] = part
    return out


def to_masks(heads: list[torch.Tensor], ffn: list[torch.Tensor], kv_heads: list[torch.Tensor] | None = None) -> Masks:
    """Per-layer bool lists as a :class:`~structprune.Masks` (heads and KV heads stacked ``[L, N]`` when sizes
    agree)."""
    def stack(rows):
        return torch.stack(rows) if len({r.numel() for r in rows}) == 1 else list(rows)

    return Masks(heads=stack(heads), ffn=list(ffn), kv_heads=None if kv_heads is None else stack(kv_heads))


def select_counts(model: nn.Module, scores: dict, start: dict, counts: dict) -> dict[str, list[torch.Tensor]]:
    """Per structure, the top-scoring units among ``start`` for ``counts`` (:func:`structure_counts`; a None count
    keeps ``start``); with a ``"kv_heads"`` count the KV groups are chosen first (:func:`select_groups`, scored by
    ``scores["kv_heads"]`` when given, else the sum of their heads' scores). Adds ``"kv_heads"`` for decoders."""
    result = {}
    for s in STRUCTURES:
        if counts.get(s) is None:
            result[s] = [m.clone() for m in start[s]]
        elif s != "heads" or counts.get("kv_heads") is None:
            result[s] = select_top(scores[s], start[s], counts[s], s)
    if counts.get("kv_heads") is not None:
        maps, sizes = kv_maps(model), kv_sizes(model)
        result["heads"], result["kv_heads"] = select_groups(scores["heads"], start["heads"], maps, sizes,
                                                            counts["kv_heads"], counts["heads"],
                                                            scores.get("kv_heads"))
    elif all(p.kv_index is not None for p in layer_parts(model)):
        result["kv_heads"] = kv_kept(result["heads"], kv_maps(model), kv_sizes(model))
    return result


def select_groups(head_scores: Sequence[torch.Tensor], heads_available: Sequence[torch.Tensor],
                  maps: Sequence[torch.Tensor], sizes: Sequence[int], kv_count, heads_count,
                  kv_scores: Sequence[torch.Tensor] | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Keep ``kv_count`` KV groups (an int: ranked over the model; a list: per layer), then ``heads_count`` query
    heads among the kept groups (None: all of them), every kept group keeping at least one head.

    ``kv_scores`` (per layer ``[Hkv_l]``) default to the sum of the available heads' ``head_scores``. Returns
    ``(heads, kv_heads)`` per-layer bool masks (CPU)."""
    head_scores = [s.detach().float().cpu().flatten() for s in head_scores]
    avail = [a.detach().bool().cpu().flatten() for a in heads_available]
    kv_avail = kv_kept(avail, maps, sizes)
    if kv_scores is None:
        kv_scores = [group_sum(s * a, m, n) for s, a, m, n in zip(head_scores, avail, maps, sizes)]
    kv = select_top(kv_scores, kv_avail, kv_count, "kv_heads")
    in_kept = [a & k.index_select(0, m) for a, k, m in zip(avail, kv, maps)]
    if heads_count is None:
        return in_kept, kv
    forced = []  # the best available head of every kept group ranks above every other head
    for s, a, m, n in zip(head_scores, in_kept, maps, sizes):
        best = torch.full((n,), -math.inf).scatter_reduce(0, m, torch.where(a, s, -math.inf), "amax")
        forced.append(a & (s == best.index_select(0, m)))
        for g in range(n):  # ties within a group: only the first head is forced
            idx = torch.nonzero(forced[-1] & (m == g)).flatten()
            forced[-1][idx[1:]] = False
    need = [int(f.sum()) for f in forced]
    wanted = heads_count if isinstance(heads_count, int) else list(heads_count)
    if (sum(need) > wanted) if isinstance(wanted, int) else any(n > w for n, w in zip(need, wanted)):
        raise ValueError(f"cannot keep {wanted} query heads with {need} KV groups kept: every kept KV group needs "
                         "one of its query heads")
    finite = [s[torch.isfinite(s)] for s in head_scores]
    span = max([float(f.abs().max()) for f in finite if f.numel()] + [1.0])
    boosted = [torch.where(f, s + 4.0 * span, s) for s, f in zip(head_scores, forced)]
    heads = select_top(boosted, in_kept, wanted, "heads")
    return heads, kv_kept(heads, maps, sizes)



def apply_masks(model: nn.Module, masks: Masks) -> nn.Module:
    """``sp.set_masks(model, heads=masks.heads, ffn=masks.ffn)``; returns ``model``."""
    return set_masks(model, heads=masks.heads, ffn=masks.ffn)


def masks_for_scores(model: nn.Module, target: PruneTarget, scores: dict[str, Sequence[torch.Tensor]],
                     start: dict[str, list[torch.Tensor]] | None = None, ffn_on_grid: bool = True,
                     table=None) -> Masks:
    """Masks keeping the top-scoring units per ``target``, starting from ``start`` (default: what the
    model keeps now). A structure whose target is None keeps ``start`` unchanged. For a budget target
    (speed-up, latency, parameters) the scores must be commensurate across heads and FFN units: the per-layer
    counts are planned by :func:`structprune.strategies.plan.budget_masks` (FFN counts on the latency table's grid
    unless ``ffn_on_grid=False``); ``table`` replaces the target's cost table (e.g. a view at a pruned width)."""
    target = as_target(target)
    start = current_masks(model) if start is None else start
    if target.has_budget:  # speed / latency / parameter budget: per-layer counts planned on the cost table
        from structprune.strategies.plan import budget_masks

        planned = budget_masks(model, target, scores, start, ffn_on_grid=ffn_on_grid, table=table)
        return to_masks(planned["heads"], planned["ffn"])
    result = select_counts(model, scores, start, structure_counts(target, model))
    return to_masks(result["heads"], result["ffn"], result.get("kv_heads"))
