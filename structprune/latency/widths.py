"""What a model compacted to a narrower hidden width runs, built for timing: a patched layer sliced to width
``d'`` and the whole model at width ``d'`` with every sublayer skipped.

Timings do not depend on the weights' values, so both are slices of a fresh model (the first ``d'`` hidden
dimensions), independent of any gate: a compacted model of width ``d'`` has exactly these shapes (Q/K/V and the
FFN input ``[*, d']``, the output projections ``[d', *]``, every LayerNorm over ``d'``, embeddings of width ``d'``,
a task head reading ``d'`` features) and runs the same modules through the same backend dispatch.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from structprune.model.compaction import parts_of
from structprune.model.families import family_of
from structprune.model.patching import gated_layers

DEFAULT_FRACTIONS = (0.25, 0.5, 0.75, 1.0)


def hidden_widths(hidden: int, spec: Sequence[float | int] | None = None) -> list[int]:
    """The hidden widths a table is timed at: each entry of ``spec`` a width (an int) or a fraction of ``hidden``
    (a float in (0, 1], rounded), plus ``hidden`` itself; increasing, without repeats. Default: 1/4, 1/2, 3/4
    and all of ``hidden``."""
    widths = {hidden}
    for s in DEFAULT_FRACTIONS if spec is None else spec:
        if isinstance(s, bool) or not isinstance(s, (int, float)):
            raise ValueError(f"hidden widths are ints (widths) or floats in (0, 1] (fractions), got {s!r}")
        width = s if isinstance(s, int) else round(hidden * s) if 0 < s <= 1 else 0
        if not 1 <= width <= hidden:
            raise ValueError(f"hidden width {s!r} is not a width in [1, {hidden}] nor a fraction in (0, 1] of it")
        widths.add(int(width))
    return sorted(widths)


def parse_hidden_grid(text: str) -> list[float | int]:
    """``"0.25,0.5,96,1.0"`` -> ``[0.25, 0.5, 96, 1.0]``: entries with a decimal point are fractions, others widths."""
    out: list[float | int] = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        try:
            out.append(float(item) if "." in item else int(item))
        except ValueError:
            raise ValueError(f"--hidden-grid takes comma-separated widths (96) or fractions (0.25), got {item!r}") \
                from None
    if not out:
        raise ValueError("--hidden-grid needs at least one width or fraction")
    return out


def _narrow_parameter(module: nn.Module, name: str, dim: int, width: int) -> None:
    param = getattr(module, name)
    if param is not None:
        setattr(module, name, nn.Parameter(param.detach().narrow(dim, 0, width).contiguous().clone(),
                                           requires_grad=param.requires_grad))


def _narrow_linear(linear: nn.Linear, width: int, inputs: bool) -> None:
    """Keep the first ``width`` input columns (``inputs``) or output rows (and bias) of ``linear``, in place."""
    if inputs:
        _narrow_parameter(linear, "weight", 1, width)
        linear.in_features = width
    else:
        _narrow_parameter(linear, "weight", 0, width)
        _narrow_parameter(linear, "bias", 0, width)
        linear.out_features = width


def _narrow_norm(norm: nn.LayerNorm, width: int) -> None:
    _narrow_parameter(norm, "weight", 0, width)
    _narrow_parameter(norm, "bias", 0, width)
    norm.normalized_shape = (width,)


def _norms(module: nn.Module, hidden: int):
    return [m for m in module.modules() if isinstance(m, nn.LayerNorm) and tuple(m.normalized_shape) == (hidden,)]


@torch.no_grad()
def narrow_layer(layer: nn.Module, hidden: int, width: int) -> nn.Module:
    """Slice a patched (compacted or not) layer of hidden size ``hidden`` to hidden width ``width``, in place:
    Q/K/V and FFN input columns, attention and FFN output rows, every LayerNorm over ``hidden``. Returns it."""
    if width == hidden:
        return layer
    parts = parts_of(layer)
    fused = parts.family is not None and parts.family.fused_qkv
    for role in (("qkv",) if fused else ("query", "key", "value")) + ("ffn_in",):
        _narrow_linear(parts[role], width, inputs=True)
    for role in ("attn_out", "ffn_out"):
        _narrow_linear(parts[role], width, inputs=False)
    for norm in _norms(layer, hidden):
        _narrow_norm(norm, width)
    return layer


def _narrow_outside(model: nn.Module, hidden: int, width: int) -> None:
    """Slice everything outside the encoder layers to hidden width ``width``, in place: embedding tables' columns,
    LayerNorms over ``hidden``, and the input columns / output rows of the linears that read / write it."""
    inside = {id(m) for m in family_of(model).layers(model).modules()}
    for module in model.modules():
        if id(module) in inside:
            continue
        if isinstance(module, nn.Embedding) and module.embedding_dim == hidden:
            _narrow_parameter(module, "weight", 1, width)
            module.embedding_dim = width
        elif isinstance(module, nn.LayerNorm) and tuple(module.normalized_shape) == (hidden,):
            _narrow_norm(module, width)
        elif isinstance(module, nn.Linear):
            if module.in_features == hidden:
                _narrow_linear(module, width, inputs=True)
            if module.out_features == hidden:
                _narrow_linear(module, width, inputs=False)


@torch.no_grad()
def skipped_model(model: nn.Module, width: int) -> nn.Module:
    """A copy of ``model`` (patched) at hidden width ``width`` with every sublayer skipped: no encoder layer runs
    (the layer list is empty), and everything else (embeddings, their LayerNorm, a final norm, the task head)
    keeps the first ``width`` of every hidden-size dimension: embedding tables' columns, LayerNorms over the
    hidden size, and the input columns / output rows of the linears outside the layers that read / write it."""
    hidden = family_of(model).sizes(model.config).hidden
    new = copy.deepcopy(model)
    layers = gated_layers(new)
    for i in reversed(range(len(layers))):
        del layers[i]
    _narrow_outside(new, hidden, width)
    return new


@torch.no_grad()
def narrow_model(model: nn.Module, width: int) -> nn.Module:
    """A copy of ``model`` (patched, compacted or not) at hidden width ``width`` with every sublayer kept: each
    layer sliced as :func:`narrow_layer` does, everything else as :func:`skipped_model` does."""
    hidden = family_of(model).sizes(model.config).hidden
    new = copy.deepcopy(model)
    if width == hidden:
        return new
    for layer in gated_layers(new):
        narrow_layer(layer, hidden, width)
    _narrow_outside(new, hidden, width)
    return new
