"""Physical pruning: remove gated-off heads and FFN units from the weights."""
from __future__ import annotations

import operator
import warnings

import torch
from torch import nn

from structprune.model.cofi import embeddings_of, hidden_gate, hidden_readers
from structprune.model.families import LayerParts
from structprune.model.families import family_of
from structprune.model.hidden import HiddenGatedLayerNorm, select_embedding, select_norm
from structprune.model.modules import sublayer_closed
from structprune.model.patching import NotPatchedError, gated_layers, layer_parts


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


def parts_of(layer) -> LayerParts:
    """The :class:`LayerParts` of a patched layer (its class records its family), or the parts themselves."""
    if isinstance(layer, LayerParts):
        return layer
    family = getattr(type(layer), "_structprune_family", None)
    if family is None:
        raise NotPatchedError(f"{type(layer).__name__} is not a patched layer: call structprune.patch(model) first")
    return family.parts(layer)


@torch.no_grad()
def fold_gate_values(layer) -> None:
    """Fold each kept gate's deterministic value into the output projection (attention output for heads, FFN
    output for units) and reset ``log_alpha`` to fully open; masks stay. Eval outputs do not change (up to
    rounding); nothing is touched where every kept gate is exactly 1. ``layer``: a patched layer or its parts."""
    parts = parts_of(layer)
    for gate, dense, repeat in ((parts.head_gate, parts["attn_out"], parts.head_dim),
                                (parts.unit_gate, parts["ffn_out"], 1)):
        values = gate.deterministic()
        kept = gate.mask != 0
        if not bool(torch.all(values[kept] == 1.0)):
            scale = torch.where(kept, values, torch.ones_like(values))
            dense.weight.mul_(scale.repeat_interleave(repeat).to(dense.weight)[None, :])
        gate.open_()


def _fused_qkv(parts: LayerParts) -> bool:
    return parts.family is not None and parts.family.fused_qkv


def _unit_rows(parts: LayerParts, units: torch.Tensor, n_units: int) -> torch.Tensor:
    """The rows of ``ffn_in`` that ``units`` own (the family's ``unit_rows`` hook: a GLU unit owns two)."""
    return units if parts.family is None else parts.family.unit_rows(units, n_units)


def _ffn_in_roles(parts: LayerParts) -> tuple[str, ...]:
    return ("ffn_in",) if parts.family is None else parts.family.ffn_in_roles


def _head_rows(heads: torch.Tensor, dim: int) -> torch.Tensor:
    return (heads[:, None] * dim + torch.arange(dim, device=heads.device)[None, :]).flatten()


@torch.no_grad()
def slice_layer(layer, heads: torch.Tensor, units: torch.Tensor, kv_heads: torch.Tensor | None = None) -> None:
    """Keep only the heads ``heads`` and FFN units ``units`` (indices) of a patched layer, in place: the
    projections are sliced and the gates shrunk. Compaction and loading a compacted model both use it.

    Grouped-query attention: ``key``/``value`` keep the KV heads the kept heads read (a KV head none of them reads
    is removed), and the head -> KV-head map is renumbered; ``kv_heads`` (loading) gives the KV heads to keep."""
    parts = parts_of(layer)
    dim = parts.head_dim
    rows = _head_rows(heads, dim)
    kv_rows = rows
    if parts.kv_index is not None:
        kv_rows = _head_rows(parts.attention.keep_heads(heads, kv_heads), dim)
    if _fused_qkv(parts):  # one matrix, three row blocks of num_heads * head_dim rows
        width = parts.num_heads * dim
        parts.replace("qkv", _select_linear(parts["qkv"], rows=torch.cat([rows, rows + width, rows + 2 * width])))
    else:
        for role, r in (("query", rows), ("key", kv_rows), ("value", kv_rows)):
            parts.replace(role, _select_linear(parts[role], rows=r))
    parts.replace("attn_out", _select_linear(parts["attn_out"], cols=rows))
    parts.attention.num_heads = int(heads.numel())
    parts.head_gate.keep_only_(heads)
    for role in _ffn_in_roles(parts):
        parts.replace(role, _select_linear(parts[role], rows=_unit_rows(parts, units, parts.unit_gate.n)))
    parts.replace("ffn_out", _select_linear(parts["ffn_out"], cols=units))
    parts.unit_gate.keep_only_(units)


def _scale(gate) -> torch.Tensor | None:
    """A gate's deterministic values where kept, 1 where masked; None when every kept value is exactly 1."""
    if gate is None:
        return None
    values, kept = gate.deterministic(), gate.mask != 0
    if bool(torch.all(values[kept] == 1.0)):
        return None
    return torch.where(kept, values, torch.ones_like(values))


def _mul(*scales):
    scales = [s for s in scales if s is not None]
    if not scales:
        return None
    out = scales[0]
    for s in scales[1:]:
        out = out * s
    return out


@torch.no_grad()
def fold_full_gates(model: nn.Module) -> None:
    """Fold the deterministic values of the sublayer and hidden-dimension gates (where installed) into the weights
    (see :mod:`structprune.model.hidden`) and reopen them; masks stay and outputs do not change (up to rounding)."""
    family = family_of(model)
    gate = hidden_gate(model)
    subs = [g for parts in layer_parts(model) for g in (parts.get("attn_sublayer_gate"),
                                                         parts.get("ffn_sublayer_gate")) if g is not None]
    for g in subs + ([gate] if gate is not None else []):  # a closed gate stays closed once reopened below
        g.set_mask(g.mask * (g.deterministic() != 0))
    hidden = _scale(gate)
    if hidden is not None:
        embeddings = embeddings_of(model, family)
        for name in family.embedding_tables:
            table = getattr(embeddings, name, None)
            if table is not None:
                table.weight.mul_(hidden.to(table.weight)[None, :])
        _scale_norm(getattr(embeddings, family.embedding_norm), hidden)
    for parts in layer_parts(model):
        for sub, out, norm in (("attn_sublayer_gate", "attn_out", "attn_norm"), ("ffn_sublayer_gate", "ffn_out",
                                                                                "ffn_norm")):
            sub_gate = parts.get(sub)
            rows = _mul(hidden, _scale(sub_gate).expand(parts[out].out_features) if _scale(sub_gate) is not None
                        else None)
            if rows is not None:
                dense = parts[out]
                dense.weight.mul_(rows.to(dense.weight)[:, None])
                if dense.bias is not None:
                    dense.bias.mul_(rows.to(dense.bias))
            if hidden is not None:
                _scale_norm(parts[norm], hidden)
            if sub_gate is not None:
                sub_gate.open_()
    if gate is not None:
        gate.open_()


def _scale_norm(norm: nn.LayerNorm, scale: torch.Tensor) -> None:
    if norm.weight is None:
        raise ValueError("cannot fold a fractional hidden gate into a LayerNorm without weights")
    norm.weight.mul_(scale.to(norm.weight))
    if norm.bias is not None:
        norm.bias.mul_(scale.to(norm.bias))


@torch.no_grad()
def compact_layer(layer, drop_silent: bool = False) -> None:
    """Physically remove the pruned heads and FFN units of one patched layer (or its parts), in place; a whole
    sublayer whose gate is closed loses all its heads (units) and stays skipped.

    A kept gate whose deterministic value is fractional (after L0 training) is folded into the output
    projection first (:func:`fold_gate_values`), so outputs do not change. ``drop_silent``: also remove the
    kept heads and units whose output-projection columns are all zero (after folding), which add nothing.
    """
    parts = parts_of(layer)
    heads, units = parts.head_gate.kept_index(), parts.unit_gate.kept_index()
    if sublayer_closed(parts.get("attn_sublayer_gate")):
        heads = heads[:0]
    if sublayer_closed(parts.get("ffn_sublayer_gate")):
        units = units[:0]
    fold_gate_values(parts)
    if drop_silent:
        heads, units = _speaking(parts, heads, units)
    slice_layer(parts, heads, units)


@torch.no_grad()
def slice_hidden(model: nn.Module, dims: torch.Tensor) -> None:
    """Keep only the hidden dimensions ``dims`` (indices) of a model with a hidden-dimension gate, in place: the
    embedding tables, every LayerNorm, every projection's input columns or output rows, and the task head's input
    columns are sliced, and the gate shrunk. Compaction and loading a compacted model both use it."""
    family = family_of(model)
    gate = hidden_gate(model)
    if gate is None:
        raise ValueError("the model has no hidden-dimension gate (patch it with hidden=True)")
    embeddings = embeddings_of(model, family)
    for name in family.embedding_tables:
        table = getattr(embeddings, name, None)
        if table is not None:
            setattr(embeddings, name, select_embedding(table, dims, None))
    setattr(embeddings, family.embedding_norm, select_norm(getattr(embeddings, family.embedding_norm), dims, None))
    for parts in layer_parts(model):
        for role in ("query", "key", "value", "ffn_in"):
            parts.replace(role, _select_linear(parts[role], cols=dims))
        for role in ("attn_out", "ffn_out"):
            parts.replace(role, _select_linear(parts[role], rows=dims))
        for role in ("attn_norm", "ffn_norm"):
            parts.replace(role, select_norm(parts[role], dims, None))
    for path, linear in hidden_readers(model):
        parent, _, name = path.rpartition(".")
        setattr(operator.attrgetter(parent)(model) if parent else model, name, _select_linear(linear, cols=dims))
    gate.keep_only_(dims)


def _speaking(parts: LayerParts, heads: torch.Tensor, units: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The heads and units among ``heads`` / ``units`` with a non-zero weight in their output-projection columns."""
    attn_out, ffn_out = parts["attn_out"].weight, parts["ffn_out"].weight
    head_cols = attn_out.view(attn_out.shape[0], -1, parts.head_dim).ne(0).any(dim=2).any(dim=0)  # [H]
    unit_cols = ffn_out.ne(0).any(dim=0)  # [I]
    return heads[head_cols[heads]], units[unit_cols[units]]


@torch.no_grad()
def zeroed_slot(layer) -> None:
    """Give a compacted layer with no head (no FFN unit) one head (unit) whose output weights are zero: it
    adds nothing, and plain HF modules, which cannot hold zero heads, can then run the layer."""
    parts = parts_of(layer)
    like = parts["attn_out"].weight
    if parts.num_heads == 0:
        hidden, dim = parts["attn_out"].out_features, parts.head_dim
        if _fused_qkv(parts):
            parts.replace("qkv", _zero_linear(hidden, 3 * dim, like, with_bias=parts["qkv"].bias is not None))
        else:
            for role in ("query", "key", "value"):
                parts.replace(role, _zero_linear(hidden, dim, like, with_bias=parts[role].bias is not None))
        parts.replace("attn_out", _zero_linear(dim, hidden, like, bias=parts["attn_out"].bias,
                                               with_bias=parts["attn_out"].bias is not None))
        if parts.kv_index is not None:
            parts.attention.kv_index = torch.zeros(1, dtype=torch.long, device=parts.kv_index.device)
        parts.attention.num_heads = 1
    if parts.unit_gate.n == 0:
        hidden = parts["ffn_in"].in_features
        rows = int(_unit_rows(parts, torch.zeros(1, dtype=torch.long), 1).numel())
        for role in _ffn_in_roles(parts):
            parts.replace(role, _zero_linear(hidden, rows, like, with_bias=parts[role].bias is not None))
        parts.replace("ffn_out", _zero_linear(1, hidden, like, bias=parts["ffn_out"].bias,
                                              with_bias=parts["ffn_out"].bias is not None))


def _zero_linear(in_features: int, out_features: int, like: torch.Tensor, bias: torch.Tensor | None = None,
                 with_bias: bool = True):
    new = nn.Linear(in_features, out_features, bias=with_bias, device=like.device, dtype=like.dtype)
    nn.init.zeros_(new.weight)
    if with_bias:
        with torch.no_grad():
            new.bias.copy_(bias if bias is not None else torch.zeros_like(new.bias))
    return new


def compact(model: nn.Module, drop_silent: bool = False) -> nn.Module:
    """Remove every gated-off head and FFN unit of a patched model, in place; returns ``model``.

    Outputs are unchanged (up to float rounding where fractional gates were folded). Layers may end with
    different numbers of heads and units; :func:`structprune.save_pretrained` records the shapes.
    ``drop_silent=True`` also removes the heads and units whose output-projection columns are all zero (weights
    zeroed by hand, or closed gates an L0 decision kept with ``keep_dead=True``): they add nothing, so outputs
    are unchanged too; it also applies to a model compacted before (e.g. loaded with ``sp.from_pretrained``).
    """
    fold_full_gates(model)
    for parts in layer_parts(model):
        compact_layer(parts, drop_silent=drop_silent)
    gate = hidden_gate(model)
    if gate is not None:
        slice_hidden(model, gate.kept_index())
    return model


@torch.no_grad()
def unpatch(model: nn.Module) -> nn.Module:
    """Put the plain Hugging Face modules back, in place; returns ``model``.

    What the gates prune is removed first (:func:`structprune.compact`; fractional gates are folded into the
    weights), so the model computes what the patched one computed in eval mode, with plain HF modules of
    the kept sizes. A layer left with no head (no FFN unit) keeps one head (unit) whose output weights are
    zero, which HF modules need and which adds nothing. Save such a model with
    :func:`structprune.save_pretrained` (per-layer sizes) or patch it again.
    """
    family = family_of(model)
    for i, layer in enumerate(gated_layers(model)):  # every layer checked before any is changed
        reason = family.unpatch_reason(family.parts(layer))
        if reason is not None:
            raise ValueError(f"cannot unpatch layer {i} of {type(model).__name__}: {reason}")
    skipped = [i for i, parts in enumerate(layer_parts(model))
               if any(sublayer_closed(parts.get(g)) for g in ("attn_sublayer_gate", "ffn_sublayer_gate"))]
    if skipped:
        raise ValueError(f"layers {skipped} skip a whole sublayer, which plain Hugging Face modules cannot express; "
                         "save the model with structprune.save_pretrained (its standalone modeling file can)")
    compact(model)
    _unpatch_hidden(model, family)
    for layer in gated_layers(model):
        parts = family.parts(layer)
        compact_layer(parts)
        zeroed_slot(parts)
        family.unpatch_layer(layer, model.config)
        layer.__class__ = type(layer)._structprune_original
    family.unpatch_model(model)
    return model


def _unpatch_hidden(model: nn.Module, family) -> None:
    """Plain LayerNorms (of the kept width) in place of the hidden-gated ones, and no hidden gate."""
    gate = hidden_gate(model)
    if gate is None:
        return
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, HiddenGatedLayerNorm):
                setattr(module, name, child.plain())
    del embeddings_of(model, family).hidden_gate
    for parts in layer_parts(model):
        parts.attention_block.__dict__["hidden_gate"] = None
