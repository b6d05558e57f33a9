"""Random pruning: keep a uniformly random subset of the heads / FFN units still present (the baseline of
McCarley et al. 2019)."""
from __future__ import annotations

import torch
from torch import nn

from structprune.model.masks import Masks
from structprune.model.masks import gate_sizes
from structprune.strategies.groups import kv_sizes
from structprune.strategies.targets import STRUCTURES, PruneTarget, as_target, masks_for_scores


def random_masks(model: nn.Module, target: PruneTarget, seed: int = 0,
                 generator: torch.Generator | None = None) -> Masks:
    """Masks keeping a uniformly random set of heads and FFN units of exactly the ``target`` size.

    Globally (``target.per_layer=False``: every still-present unit of the model is equally likely, so
    layer sizes vary) or per layer; with ``target.kv_heads``, a uniformly random set of KV groups first. Already
    pruned units stay pruned. Reproducible: the draw comes from
    ``generator`` or, when None, from a CPU ``torch.Generator`` seeded with ``seed``; the global RNG is
    untouched. Apply with :func:`~structprune.strategies.apply_masks` or ``sp.set_masks``.

    With a budget target (speed-up, latency, parameters) every unit gets a random importance proportional to
    its parameter count, and the per-layer counts are planned on the cost table
    (:func:`structprune.strategies.plan.plan_masks`).
    """
    target = as_target(target)
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    sizes = gate_sizes(model)
    scores = {s: [torch.rand(n, generator=generator) for n in sizes[s]] for s in STRUCTURES}
    if target.kv_heads is not None:  # every KV group equally likely, whatever its size
        scores["kv_heads"] = [torch.rand(n, generator=generator) for n in kv_sizes(model)]
    if target.has_budget:  # random importance per parameter, so a head is not worth one FFN unit
        from structprune.strategies.plan import model_unit_params

        unit = model_unit_params(model)
        scores = {s: [v * unit[s] for v in scores[s]] for s in STRUCTURES}
    return masks_for_scores(model, target, scores)
