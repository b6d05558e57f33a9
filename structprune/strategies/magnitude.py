"""Magnitude pruning: keep the heads / FFN units with the largest weight norms (data-free; ``structprune demo``)."""
from __future__ import annotations

import torch


@torch.no_grad()
def magnitude_masks(model, heads_kept: float, ffn_kept: float):
    """Per-layer masks keeping the heads / FFN units with the largest weight norms (data-free).

    A head scores ``|W_o[:, head]| * |W_v[head]|`` (Frobenius norms of its output-projection columns and its value
    rows), an FFN unit ``|W_in[unit]| * |W_out[:, unit]|``; each layer keeps ``round(fraction * n)`` of the
    highest. Returns ``(heads, ffn)``: one boolean mask per gated layer each, for ``sp.set_masks``."""
    from structprune.model.patching import layer_parts

    heads, ffn = [], []
    for parts in layer_parts(model):
        n, d = parts.num_heads, parts.head_dim
        wo = parts["attn_out"].weight.view(-1, n, d)
        wv = parts["value"].weight.view(n, d, -1)
        head_score = wo.norm(dim=(0, 2)) * wv.norm(dim=(1, 2))
        unit_score = parts["ffn_in"].weight.norm(dim=1) * parts["ffn_out"].weight.norm(dim=0)
        heads.append(_top_mask(head_score, heads_kept))
        ffn.append(_top_mask(unit_score, ffn_kept))
    return heads, ffn


def _top_mask(score: torch.Tensor, fraction: float) -> torch.Tensor:
    keep = int(round(fraction * score.numel()))
    mask = torch.zeros_like(score, dtype=torch.bool)
    mask[torch.topk(score, keep).indices] = True
    return mask
