"""The deterministic end of L0 training (:class:`~structprune.strategies.l0.L0Controller`): decide exact counts
from the trained gates, set the masks and fold the gates' fractional values into the weights."""
from __future__ import annotations

import torch
from torch import nn

from structprune.model.compaction import fold_full_gates, fold_gate_values
from structprune.model.gates import expected_l0
from structprune.model.masks import Masks, gate_sizes, get_masks
from structprune.model.patching import gated_layers, set_gate_sampling
from structprune.strategies.groups import group_sum, kv_maps, kv_sizes
from structprune.strategies.l0_full import ExtraGates, planning_table, without_skipped
from structprune.strategies.targets import STRUCTURES, PruneTarget, as_target, layer_gates, masks_for_scores


@torch.no_grad()
def fold_gates(model: nn.Module) -> None:
    """Fold every gate's deterministic value into the weights and reopen the gates
    (:func:`structprune.model.compaction.fold_gate_values` on each layer, then the sublayer and hidden gates)."""
    fold_full_gates(model)
    for layer in gated_layers(model):
        fold_gate_values(layer)


@torch.no_grad()
def finalize_l0(model: nn.Module, target: PruneTarget, fold: bool = True, keep_dead: bool = False,
                table=None) -> Masks:
    """The deterministic end of L0 training: keep ``target`` heads/units, ranked by ``log_alpha`` (globally or
    per layer), among those not masked already; set the masks; turn sampling off; and, with ``fold``, fold the
    kept gates' fractional deterministic values into the output projections and reset the gates to open, so
    the eval model computes what the L0 model computed deterministically with the same units.

    When training ended below the target, some units ranked in have deterministic value 0: they would compute
    zeros, so they are dropped too (the model keeps fewer than ``target``, with the same outputs, and is faster);
    ``keep_dead=True`` keeps them, zeroed, to hold the count exactly (so does ``target.multiple_of`` above 1 for FFN
    units, to keep every width aligned). For a speed or parameter budget, a closed
    gate counts as no importance (the plan never keeps one in place of an open one) and FFN counts are not
    rounded to the latency table's grid. Returns the :class:`~structprune.Masks`.

    A model with sublayer or hidden-dimension gates (:class:`~structprune.strategies.l0_full.ExtraGates`) decides
    those first (:meth:`~structprune.strategies.l0_full.ExtraGates.decide`); heads and units are then planned on
    ``table`` (or the target's) as seen at the decided width and sublayers, the heads (units) of a skipped sublayer
    all pruned.
    """
    target = as_target(target)
    extra = ExtraGates(model)
    grid = getattr(table if table is not None else target.table, "hidden_grid", None) if target.has_latency else None
    align = target.multiple_of
    decided = extra.decide(min_hidden=grid[0] if grid else 0, multiple_of=align) if extra.present else {}
    gates = {s: layer_gates(model, s) for s in STRUCTURES}
    is_open = {s: [g.deterministic() != 0 for g in gates[s]] for s in STRUCTURES}
    if target.has_budget:  # commensurate across heads and units: each gate's probability of being non-zero
        scores = {s: [expected_l0(g.log_alpha.detach(), g.beta) * (1.0 if keep_dead else o)
                      for g, o in zip(gates[s], is_open[s])] for s in STRUCTURES}
    else:
        scores = {s: [g.log_alpha.detach() for g in gates[s]] for s in STRUCTURES}
        if target.kv_heads is not None:  # a KV group's importance: the sum of its heads' probabilities of being on
            scores["kv_heads"] = [group_sum(expected_l0(g.log_alpha.detach(), g.beta) * g.mask, m, n)
                                  for g, m, n in zip(gates["heads"], kv_maps(model), kv_sizes(model))]
    start = without_skipped({s: [(g.mask != 0).cpu() for g in gates[s]] for s in STRUCTURES}, decided)
    plan_table = None
    if decided and not target.has_budget:  # counts: at most what the kept sublayers still hold
        import dataclasses

        sizes = gate_sizes(model)
        capped = {}
        for s in STRUCTURES:
            count = target.counts(s, sizes[s])
            if count is not None:
                capped[s] = min(int(count), int(sum(int(m.sum()) for m in start[s])))
        target = dataclasses.replace(target, **capped)
    if target.has_latency and decided:
        from structprune.strategies.plan import table_for

        full_table = table if table is not None else table_for(model, target)
        latency = full_table.dense_ms / float(target.speedup) if target.speedup is not None else target.latency_ms
        decided = extra.tighten(decided, full_table, float(latency), min_hidden=grid[0] if grid else 0,
                                multiple_of=align)
        start = without_skipped(start, decided)
        plan_table = planning_table(full_table, decided)
    # A budget is planned with the interpolated FFN costs the Lagrangian trained against, not on the table's
    # grid: rounding a layer's open units down to a grid point would close units (or whole heads) that trained open.
    masks = masks_for_scores(model, target, scores, start=start, ffn_on_grid=False, table=plan_table)
    kept = {"heads": masks.heads_per_layer(), "ffn": masks.ffn}
    if not keep_dead:  # ranked in, but the gate is closed: the unit would add exactly zero (kept for alignment)
        kept = {s: [m & o.to(m.device) for o, m in zip(is_open[s], kept[s])] if s == "heads" or align == 1
                else kept[s] for s in STRUCTURES}
        masks = Masks(heads=kept["heads"], ffn=kept["ffn"])
    for s in STRUCTURES:
        for gate, m in zip(gates[s], kept[s]):
            gate.set_mask(m.to(gate.mask.device))
    if fold:
        fold_gates(model)
    set_gate_sampling(model, False)
    if masks.kv_heads is not None or target.kv_heads is not None:  # the KV heads the kept query heads read
        masks = Masks(heads=masks.heads, ffn=masks.ffn, kv_heads=get_masks(model).kv_heads)
    if decided:
        current = get_masks(model)
        masks = Masks(heads=masks.heads, ffn=masks.ffn, hidden=current.hidden, attn_sublayers=current.attn_sublayers,
                      ffn_sublayers=current.ffn_sublayers)
    return masks


__all__ = ["finalize_l0", "fold_gates"]
