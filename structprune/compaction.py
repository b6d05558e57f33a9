"""Physical pruning: remove gated-off heads and FFN units from the weights."""
from __future__ import annotations

import warnings

import torch
from torch import nn

from .patching import gated_layers


def _select_linear(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    weight = linear.weight.detach()
    bias = linear.bias.detach() if linear.bias is not None else None
    if rows is not None:
        weight = weight.index_select(0, rows)
        bias = bias.index_select(0, rows) if bias is not None else None
    if cols is not None:
        weight = weight.index_select(1, cols)
    with warnings.catch_warnings():  # "Initializing zero-element tensors is a no-op" for emptied layers
        warnings.simplefilter("ignore", UserWarning)
        new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta", dtype=weight.dtype)
    new.weight = nn.Parameter(weight.contiguous().clone(), requires_grad=linear.weight.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias.contiguous().clone(), requires_grad=linear.bias.requires_grad)
    return new


@torch.no_grad()
def fold_gate_values(layer: nn.Module) -> None:
    """Fold each kept gate's deterministic value into the output projection (attention output dense for
    heads, FFN output dense for units) and reset ``log_alpha`` to fully open; masks stay. Eval outputs do
    not change (up to rounding); nothing is touched where every kept gate is exactly 1."""
    attn = layer.attention.self
    for gate, dense, repeat in ((attn.head_gate, layer.attention.output.dense, attn.head_dim),
                                (layer.intermediate.unit_gate, layer.output.dense, 1)):
        values = gate.deterministic()
        kept = gate.mask != 0
        if not bool(torch.all(values[kept] == 1.0)):
            scale = torch.where(kept, values, torch.ones_like(values))
            dense.weight.mul_(scale.repeat_interleave(repeat).to(dense.weight)[None, :])
        gate.open_()


@torch.no_grad()
def compact_layer(layer: nn.Module) -> None:
    """Physically remove the pruned heads and FFN units of one patched layer, in place.

    A kept gate whose deterministic value is fractional (after L0 training) is folded into the output
    projection first (:func:`fold_gate_values`), so outputs do not change.
    """
    attn = layer.attention.self
    heads = attn.head_gate.kept_index()
    units = layer.intermediate.unit_gate.kept_index()
    fold_gate_values(layer)
    dim = attn.head_dim
    rows = (heads[:, None] * dim + torch.arange(dim, device=heads.device)[None, :]).flatten()
    attn.query = _select_linear(attn.query, rows=rows)
    attn.key = _select_linear(attn.key, rows=rows)
    attn.value = _select_linear(attn.value, rows=rows)
    out = layer.attention.output
    out.dense = _select_linear(out.dense, cols=rows)
    attn.num_heads = int(heads.numel())
    attn.head_gate.keep_only_(heads)

    inter = layer.intermediate
    inter.dense = _select_linear(inter.dense, rows=units)
    layer.output.dense = _select_linear(layer.output.dense, cols=units)
    inter.unit_gate.keep_only_(units)


def compact(model: nn.Module) -> nn.Module:
    """Remove every gated-off head and FFN unit of a patched model, in place; returns ``model``.

    Outputs are unchanged (up to float rounding where fractional gates were folded). Layers may end with
    different numbers of heads and units; :func:`structprune.save_pretrained` records the shapes.
    """
    for layer in gated_layers(model):
        compact_layer(layer)
    return model
