"""Gradient-based importance ("gain") pruning, after Michel, Levy & Neubig (2019), "Are Sixteen Heads
Really Better than One?", applied to heads and FFN units as in McCarley et al. (2019).

The importance of a unit with gate value ``xi`` is ``E |dL/dxi|``: the absolute gradient of the loss with
respect to the gate VALUE the :class:`~structprune.HardConcreteGate` produced in the forward pass, averaged
over batches (as in Michel et al.'s reference code the absolute value is taken per batch, the gate being
shared by the batch). Gradients are taken with respect to the gate value and not ``log_alpha``: the
deterministic gate is clamped at 1, so ``d/dlog_alpha`` is zero. Importances are then divided by their L2
norm within each layer (separately for heads and for FFN units), as Michel et al. do, and the least
important units are pruned.

Estimation runs the model in eval mode (no dropout, deterministic gates) and uses
``torch.autograd.grad`` on the gate values only, so no parameter's ``.grad`` is touched.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from structprune.model.masks import Masks
from structprune.model.patching import gated_layers
from structprune.strategies.groups import kv_kept, kv_maps, kv_sizes
from structprune.strategies.targets import (STRUCTURES, PruneTarget, as_target, current_masks, layer_gates,
                                            select_counts, structure_counts, to_masks)

LossFn = Callable[[nn.Module, Mapping], torch.Tensor]


@dataclass
class Importance:
    """Per-layer importance vectors. ``heads[l]`` has one entry per head of layer ``l``, ``ffn[l]`` one per
    FFN unit; pruned units are 0. ``raw_*`` are the un-normalised mean ``|dL/dgate|``."""

    heads: list[torch.Tensor]
    ffn: list[torch.Tensor]
    raw_heads: list[torch.Tensor]
    raw_ffn: list[torch.Tensor]
    num_batches: int

    def __getitem__(self, structure: str) -> list[torch.Tensor]:
        if structure not in STRUCTURES:
            raise KeyError(structure)
        return getattr(self, structure)


def default_loss(model: nn.Module, batch: Mapping) -> torch.Tensor:
    """``model(**batch).loss``: the batch must carry the labels (``start_positions``/``end_positions`` for QA)."""
    loss = model(**batch).loss
    if loss is None:
        raise ValueError("model(**batch).loss is None: give batches with labels (for QA: start_positions and "
                         "end_positions) or pass loss_fn(model, batch)")
    return loss


def _to_device(batch: Mapping, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def gain_importance(model: nn.Module, batches: Iterable[Mapping], loss_fn: LossFn | None = None,
                    max_batches: int | None = None, normalize: bool = True) -> Importance:
    """Mean ``|dL/dgate value|`` of every head and FFN unit over ``batches`` (dicts of tensors).

    ``loss_fn(model, batch) -> scalar`` defaults to ``model(**batch).loss``. With ``normalize`` each layer's
    head vector (and FFN vector) is divided by its L2 norm (Michel et al.); units already pruned get 0.
    """
    loss_fn = loss_fn or default_loss
    gated_layers(model)  # a clear error when the model is not patched
    gates = {s: layer_gates(model, s) for s in STRUCTURES}
    index = {id(g): (s, i) for s in STRUCTURES for i, g in enumerate(gates[s])}
    sums = {s: [torch.zeros(g.n, dtype=torch.float64) for g in gates[s]] for s in STRUCTURES}
    kept = current_masks(model)
    captured: list[tuple[str, int, torch.Tensor]] = []

    def hook(module, args, output):
        value = output.detach().clone().requires_grad_(True)  # a leaf: d loss / d gate value
        captured.append((*index[id(module)], value))
        return value

    handles = [g.register_forward_hook(hook) for s in STRUCTURES for g in gates[s]]
    was_training = model.training
    device = _model_device(model)
    n = 0
    model.eval()
    try:
        for batch in itertools.islice(batches, max_batches):
            captured.clear()
            with torch.enable_grad():
                loss = loss_fn(model, _to_device(batch, device))
                if not captured:
                    raise RuntimeError("no gate was evaluated in the forward pass; is the model patched?")
                grads = torch.autograd.grad(loss, [c[2] for c in captured], allow_unused=True)
            for (s, i, _), grad in zip(captured, grads):
                if grad is not None:
                    sums[s][i] += grad.detach().abs().double().cpu()
            n += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        captured.clear()
    if n == 0:
        raise ValueError("gain_importance got no batches")
    raw = {s: [(v / n).float() * kept[s][i] for i, v in enumerate(sums[s])] for s in STRUCTURES}
    norm = {s: [_l2_normalize(v) if normalize else v.clone() for v in raw[s]] for s in STRUCTURES}
    return Importance(heads=norm["heads"], ffn=norm["ffn"], raw_heads=raw["heads"], raw_ffn=raw["ffn"], num_batches=n)


def _l2_normalize(v: torch.Tensor) -> torch.Tensor:
    return v / (v.norm(p=2) + 1e-20)


def _reiterable(batches: Iterable, max_batches: int | None) -> Iterable:
    """A one-shot iterator (generator) is materialised so iterative pruning can pass over it again."""
    if iter(batches) is batches:
        return list(itertools.islice(batches, max_batches))
    return batches


def _interpolate(start: int | list[int], final: int | list[int], k: int, steps: int) -> int | list[int]:
    if isinstance(final, int):
        return start - round((start - final) * k / steps)
    return [s - round((s - f) * k / steps) for s, f in zip(start, final)]


def gain_masks(model: nn.Module, batches: Iterable[Mapping], target: PruneTarget, loss_fn: LossFn | None = None,
               steps: int = 1, max_batches: int | None = None, normalize: bool = True) -> Masks:
    """Masks keeping the most important heads and FFN units (Michel et al. gain), exactly ``target`` many.

    Args:
        model: a patched model; its current masks are the starting point (pruned units stay pruned).
        batches: an iterable of dicts of tensors (a DataLoader, a list); moved to the model's device.
        target: what to keep (:class:`PruneTarget`), ranked globally or per layer.
        loss_fn: ``loss_fn(model, batch) -> scalar``; default ``model(**batch).loss``.
        steps: ``1`` prunes in one shot; ``n > 1`` prunes iteratively in ``n`` equal steps, re-estimating
            importance on the partially pruned model after each (Michel et al.'s iterative procedure).
        max_batches: use at most this many batches per estimate.

    With ``target.kv_heads`` (decoders) whole KV groups are ranked first, a group's importance being the sum of
    its query heads' (normalised) importances; for a causal LM the default loss is the LM loss of batches that
    carry ``labels``.

    The model's masks are restored before returning (apply the result with
    :func:`~structprune.strategies.apply_masks` or ``sp.set_masks``).

    With a budget target (speed-up, latency, parameters) the un-normalised importances (``raw_*``, comparable
    between heads and FFN units) go to the latency planner, which chooses the per-layer counts; iterative steps
    then tighten the budget linearly from what the model predicts now to the target.
    """
    target = as_target(target)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if steps > 1:
        batches = _reiterable(batches, max_batches)
    if target.has_budget:
        return _gain_budget_masks(model, batches, target, loss_fn, steps, max_batches)
    start = current_masks(model)
    finals = structure_counts(target, model)
    if finals.get("kv_heads") is not None:
        start["kv_heads"] = kv_kept(start["heads"], kv_maps(model), kv_sizes(model))
    start_counts = {}
    for s, final in finals.items():
        if isinstance(final, int):
            start_counts[s] = int(sum(int(m.sum()) for m in start[s]))
        elif final is not None:
            start_counts[s] = [int(m.sum()) for m in start[s]]
    saved = [g.mask.clone() for s in STRUCTURES for g in layer_gates(model, s)]
    masks = start
    try:
        for k in range(1, steps + 1):
            imp = gain_importance(model, batches, loss_fn, max_batches, normalize)
            counts = {s: None if final is None else _interpolate(start_counts[s], final, k, steps)
                      for s, final in finals.items()}
            masks = select_counts(model, {"heads": imp.heads, "ffn": imp.ffn}, masks, counts)
            if k < steps:
                _narrow_masks(model, masks)
    finally:
        _restore_masks(model, saved)
    return to_masks(masks["heads"], masks["ffn"], masks.get("kv_heads"))


def _narrow_masks(model: nn.Module, masks: dict) -> None:
    """Mask what an intermediate step of iterative gain pruning removed (never reviving a pruned unit)."""
    for s in STRUCTURES:
        for gate, m in zip(layer_gates(model, s), masks[s]):
            gate.set_mask(m.to(gate.mask.device) & (gate.mask != 0))


def _restore_masks(model: nn.Module, saved: list) -> None:
    """Put back the masks every gate had before iterative gain pruning (``saved``: per gate, heads then FFN)."""
    for gate, m in zip([g for s in STRUCTURES for g in layer_gates(model, s)], saved):
        gate.set_mask(m)


def _gain_budget_masks(model: nn.Module, batches, target: PruneTarget, loss_fn, steps: int,
                       max_batches: int | None) -> Masks:
    """gain_masks for a budget target: ``steps`` budgets from the present prediction down to the target."""
    import dataclasses

    from structprune.strategies.plan import budget_of, model_unit_params, table_for
    from structprune.strategies.targets import masks_for_scores

    table = table_for(model, target) if target.has_latency else None
    final = budget_of(model, target, table)
    start = current_masks(model)
    unit = model_unit_params(model)
    now_params = sum(int(m.sum()) * unit[s] for s in STRUCTURES for m in start[s])
    total_params = sum(m.numel() * unit[s] for s in STRUCTURES for m in start[s])
    kv = None
    if "kv_heads" in unit:  # decoders: the KV heads the kept query heads read
        kv = kv_kept(start["heads"], kv_maps(model), kv_sizes(model))
        now_params += sum(int(k.sum()) for k in kv) * unit["kv_heads"]
        total_params += sum(k.numel() for k in kv) * unit["kv_heads"]
    now_ms = None
    if table is not None:
        kv_counts = [int(k.sum()) for k in kv] if kv is not None and getattr(table, "num_kv_heads", None) else None
        now_ms = table.predict([int(m.sum()) for m in start["heads"]], [int(m.sum()) for m in start["ffn"]],
                               kv_heads=kv_counts)
    saved = [g.mask.clone() for s in STRUCTURES for g in layer_gates(model, s)]
    masks = start
    try:
        for k in range(1, steps + 1):
            imp = gain_importance(model, batches, loss_fn, max_batches, normalize=False)
            step_target = target
            if k < steps:
                frac = k / steps
                ms = None if now_ms is None else now_ms + (final.latency_ms - now_ms) * frac
                params = (None if final.params is None
                          else (now_params + (final.params - now_params) * frac) / total_params)
                step_target = dataclasses.replace(target, speedup=None, latency_ms=ms, params=params,
                                                  heads=1.0, ffn=1.0, table=table)
            elif table is not None:
                step_target = dataclasses.replace(target, table=table)
            result = masks_for_scores(model, step_target, {"heads": imp.raw_heads, "ffn": imp.raw_ffn}, start=masks)
            masks = {"heads": result.heads_per_layer(), "ffn": list(result.ffn)}
            if k < steps:
                _narrow_masks(model, masks)
    finally:
        _restore_masks(model, saved)
    return to_masks(masks["heads"], masks["ffn"])
