"""KV groups of grouped-query attention (decoders): a KV head and the query heads that read it.

Pruning a KV group prunes all its query heads (and, on compaction, the KV head's ``k_proj``/``v_proj`` rows and
its KV-cache slot). A group's importance is the sum of its query heads' importances (those not pruned already);
:func:`structprune.strategies.targets.select_groups` ranks the groups first, then the query heads among the kept
groups.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from structprune.model.patching import layer_parts


def kv_maps(model: nn.Module) -> list[torch.Tensor]:
    """Per layer, the KV head each query head reads (CPU ``int64 [H_l]``); a TypeError for models without
    grouped-query attention."""
    parts = layer_parts(model)
    if any(p.kv_index is None for p in parts):
        raise TypeError(f"a kv_heads target is for grouped-query attention (decoders); {type(model).__name__} has "
                        "one KV head per query head: give a heads target")
    return [p.kv_index.detach().cpu().long() for p in parts]


def kv_sizes(model: nn.Module) -> list[int]:
    """Per layer, the KV heads the layer holds (``num_key_value_heads``, fewer once compacted)."""
    return [p.num_kv_heads for p in layer_parts(model)]


def group_sum(values: torch.Tensor, kv_index: torch.Tensor, num_kv: int) -> torch.Tensor:
    """``out[g] = sum of values[h]`` over the query heads ``h`` of KV head ``g``."""
    values = values.detach().float().cpu()
    return torch.zeros(num_kv).index_add_(0, kv_index, values)


def kv_kept(heads: Sequence[torch.Tensor], maps: Sequence[torch.Tensor], sizes: Sequence[int]) -> list[torch.Tensor]:
    """Per layer, the KV heads (bool) at least one kept query head reads."""
    return [group_sum(h.float(), m, n) > 0 for h, m, n in zip(heads, maps, sizes)]


def expected_kv(probs: torch.Tensor, kv_index: torch.Tensor, num_kv: int) -> torch.Tensor:
    """Expected number of KV heads kept in a layer whose query heads are non-zero with probabilities ``probs``
    (independent gates): ``sum_g 1 - prod_{h in g} (1 - p_h)``.

    Its gradient is that of ``sum_g mean_{h in g} p_h`` (straight through): the exact value's gradient on a head
    is the product of its group mates' closing probabilities, which vanishes while the gates are open (0.02 per
    mate at the L0 controller's start), so the constraint could not move them."""
    index = kv_index.to(probs.device)
    log_closed = torch.log1p(-probs.clamp(0.0, 1.0 - 1e-6))
    closed = torch.zeros(num_kv, dtype=log_closed.dtype, device=probs.device).index_add(0, index, log_closed)
    exact = (1.0 - closed.exp()).sum()
    size = torch.zeros(num_kv, dtype=probs.dtype, device=probs.device).index_add(0, index, torch.ones_like(probs))
    soft = (torch.zeros_like(size).index_add(0, index, probs) / size.clamp(min=1)).sum()
    return exact.detach() + soft - soft.detach()


__all__ = ["kv_maps", "kv_sizes", "kv_kept", "group_sum", "expected_kv"]
