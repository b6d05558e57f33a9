"""The probes of a decoder's latency table (grouped-query attention: Llama, Mistral, Qwen2, Qwen3), and compacted
decoders with given query-head, KV-head and unit counts for checking its predictions.

A decoder table is measured at the shape of ``generate()``'s prefill: ``batch x seq_len`` causal tokens, the KV
cache filled (``use_cache=True``, a fresh ``DynamicCache`` per call) and the LM head on the last position only
(``logits_to_keep=1``): the time to the first token, what a served model pays per prompt. (Logits of every position
would add a ``[B*L, vocab]`` GEMM that generation never runs.) Its blocks:

* ``attention/<h>/<d>``: one compacted layer's ``input_layernorm``, attention with the first ``h`` query heads and
  the KV heads they read in the default grouping (rotary positions, Qwen3's q/k norms, the cache write) and the
  residual, for ``h = 0..H``;
* ``kv/<g>/<d>``: the same with all ``H`` query heads reading ``g`` KV heads (``g = 1..Hkv-1``; groups as equal as
  they can be; ``g = Hkv`` is ``attention/<H>/<d>``), for :class:`~structprune.latency.kv.KVCurves`;
* ``ffn/<u>/<d>``: ``post_attention_layernorm``, the GLU with ``u`` units, the residual.

Decoders have no hidden-dimension or sublayer gates: ``d`` is always the model's width and nothing is skipped.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from structprune.model.compaction import compact, compact_layer, parts_of, slice_layer
from structprune.model.patching import gated_layers, layer_parts


def prefill_inputs(model: nn.Module, inputs: dict) -> dict:
    """``inputs`` with the KV cache on and, for a causal LM, logits of the last position only (see the module
    docstring)."""
    import inspect

    out = dict(inputs, use_cache=True)
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        out["logits_to_keep"] = 1
    return out


def layer_inputs(model: nn.Module, inputs: dict) -> tuple[torch.Tensor, dict]:
    """What the model passes its first layer: (hidden states, the rotary ``position_embeddings`` and the causal
    ``attention_mask``)."""
    seen = {}

    def hook(module, args, kwargs):
        seen["x"] = args[0] if args else kwargs["hidden_states"]
        seen["kw"] = {k: kwargs.get(k) for k in ("position_embeddings", "attention_mask")}

    handle = gated_layers(model)[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            model(**inputs)
    finally:
        handle.remove()
    return seen["x"], seen["kw"]


def _keep_first(gate, k: int) -> None:
    mask = torch.zeros(gate.n)
    mask[:k] = 1.0
    gate.set_mask(mask)


@torch.no_grad()
def regroup(layer: nn.Module, kv_heads: int) -> nn.Module:
    """A compacted layer whose query heads all read its first ``kv_heads`` KV heads, groups as equal as they can be
    (query head ``i`` reads ``i * kv_heads // heads``); in place, returned."""
    parts = parts_of(layer)
    heads = parts.head_gate.n
    slice_layer(parts, torch.arange(heads), torch.arange(parts.unit_gate.n), kv_heads=torch.arange(kv_heads))
    parts.attention.kv_index = torch.arange(heads) * kv_heads // heads
    return layer


def probe_layer(base: nn.Module, heads: int, units: int, kv_heads: int | None = None) -> nn.Module:
    """A compacted copy of ``base`` with the first ``heads`` query heads (and the KV heads they read, or all of them
    regrouped over ``kv_heads`` KV heads) and the first ``units`` FFN units."""
    layer = copy.deepcopy(base)
    parts = parts_of(layer)
    _keep_first(parts.head_gate, heads)
    _keep_first(parts.unit_gate, units)
    compact_layer(layer)
    return regroup(layer, kv_heads) if kv_heads is not None else layer


def block_probes(model: nn.Module, inputs: dict, ffn_grid: list[int]) -> dict[str, Callable[[], object]]:
    """The blocks to time (see the module docstring), keyed by probe name, at the model's width."""
    from transformers import DynamicCache

    from structprune.model.families import family_of, sizes_of

    c = sizes_of(model)
    hidden, heads, kv = c.hidden, c.heads, c.kv_heads
    x, kw = layer_inputs(model, inputs)
    base = gated_layers(model)[0]
    config = model.config

    def attention(layer):
        def run():
            out = layer.self_attn(layer.input_layernorm(x), cache=DynamicCache(config=config), **kw)[0]
            return x + out
        return run

    family = family_of(model)
    fns = {f"attention/{h}/{hidden}": attention(probe_layer(base, h, 0)) for h in range(heads + 1)}
    fns.update({f"kv/{g}/{hidden}": attention(probe_layer(base, heads, 0, g)) for g in range(1, kv)})
    for u in ffn_grid:
        fns[f"ffn/{u}/{hidden}"] = lambda m=probe_layer(base, 0, u): family.ffn_block(m, x)
    return fns


def spread_heads(kv_index: torch.Tensor, heads: int, kv_heads: int | None) -> torch.Tensor:
    """A keep mask of ``heads`` query heads reading exactly ``kv_heads`` KV heads of the map ``kv_index`` (the
    first groups, as evenly as they can; default: the first ``heads`` heads, as the table's probes keep)."""
    n = kv_index.numel()
    mask = torch.zeros(n)
    if kv_heads is None:
        mask[:heads] = 1.0
        return mask
    groups = [torch.nonzero(kv_index == g).flatten() for g in range(int(kv_index.max()) + 1)]
    if not (kv_heads <= heads <= sum(len(g) for g in groups[:kv_heads])) or kv_heads > len(groups):
        raise ValueError(f"{heads} query heads cannot read exactly {kv_heads} KV heads of this layer")
    share = [heads // kv_heads + (1 if i < heads % kv_heads else 0) for i in range(kv_heads)] if kv_heads else []
    for members, k in zip(groups, share):
        if k > len(members):
            raise ValueError(f"{heads} query heads cannot spread over {kv_heads} KV groups of {len(members)}")
        mask[members[:k]] = 1.0
    return mask


def compacted_decoder(model: nn.Module, heads: list[int], units: list[int], kv_heads: list[int] | None) -> nn.Module:
    """A compacted deep copy of a fresh patched decoder keeping, per layer, ``heads[l]`` query heads spread over
    ``kv_heads[l]`` KV groups (:func:`spread_heads`) and the first ``units[l]`` FFN units."""
    new = copy.deepcopy(model)
    for l, parts in enumerate(layer_parts(new)):
        parts.head_gate.set_mask(spread_heads(parts.kv_index.cpu(), int(heads[l]),
                                              None if kv_heads is None else int(kv_heads[l])))
        _keep_first(parts.unit_gate, int(units[l]))
    return compact(new)


__all__ = ["block_probes", "compacted_decoder", "layer_inputs", "prefill_inputs", "probe_layer", "regroup",
           "spread_heads"]
