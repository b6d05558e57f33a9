"""Physical pruning: remove gated-off heads and FFN units from the weights."""
from __future__ import annotations

import warnings

import torch
from torch import nn

from .patching import gated_layers


def _select_linear(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None,
                   col_scale: torch.Tensor | None = None) -> nn.Linear:
    weight = linear.weight.detach()
    bias = linear.bias.detach() if linear.bias is not None else None
    if rows is not None:
        weight = weight.index_select(0, rows)
        bias = bias.index_select(0, rows) if bias is not None else None
    if cols is not None:
        weight = weight.index_select(1, cols)
    if col_scale is not None:
        weight = weight * col_scale.to(weight.dtype)[None, :]
    with warnings.catch_warnings():  # "Initializing zero-element tensors is a no-op" for emptied layers
        warnings.simplefilter("ignore", UserWarning)
        new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta", dtype=weight.dtype)
    new.weight = nn.Parameter(weight.contiguous().clone(), requires_grad=linear.weight.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias.contiguous().clone(), requires_grad=linear.bias.requires_grad)
    return new


def _fold_scale(values: torch.Tensor, repeat: int) -> torch.Tensor | None:
    """Per-column scale for the output projection; None when every kept gate is exactly 1."""
    if bool(torch.all(values == 1.0)):
        return None
    return values.repeat_interleave(repeat)


@torch.no_grad()
def compact_layer(layer: nn.Module) -> None:
    """Physically remove the pruned heads and FFN units of one patched layer, in place.

    A kept gate whose deterministic value is fractional (after L0 training) is folded into the output
    projection, so outputs do not change; the remaining gates are reset to fully open.
    """
    attn = layer.attention.self
    head_values = attn.head_gate.deterministic()
    heads = torch.nonzero(head_values != 0, as_tuple=False).flatten()
    dim = attn.head_dim
    rows = (heads[:, None] * dim + torch.arange(dim, device=heads.device)[None, :]).flatten()
    attn.query = _select_linear(attn.query, rows=rows)
    attn.key = _select_linear(attn.key, rows=rows)
    attn.value = _select_linear(attn.value, rows=rows)
    out = layer.attention.output
    out.dense = _select_linear(out.dense, cols=rows, col_scale=_fold_scale(head_values[heads], dim))
    attn.num_heads = int(heads.numel())
    attn.head_gate.keep_only_(heads)
    attn.head_gate.open_()

    inter = layer.intermediate
    unit_values = inter.unit_gate.deterministic()
    units = torch.nonzero(unit_values != 0, as_tuple=False).flatten()
    inter.dense = _select_linear(inter.dense, rows=units)
    layer.output.dense = _select_linear(layer.output.dense, cols=units, col_scale=_fold_scale(unit_values[units], 1))
    inter.unit_gate.keep_only_(units)
    inter.unit_gate.open_()


def compact(model: nn.Module) -> nn.Module:
    """Remove every gated-off head and FFN unit of a patched model, in place; returns ``model``.

    Outputs are unchanged (up to float rounding where fractional gates were folded). Layers may end with
    different numbers of heads and units; :func:`structprune.save_pretrained` records the shapes.
    """
    for layer in gated_layers(model):
        compact_layer(layer)
    return model
