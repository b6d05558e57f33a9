"""The models a latency measurement runs: a fresh copy of a model's architecture with random weights, inputs of a
given batch x sequence length, and dense or compacted copies keeping given head / unit counts."""
from __future__ import annotations

import copy

import torch
from torch import nn

from structprune.model.compaction import compact
from structprune.model.patching import layer_parts, patch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def fresh_model(model: nn.Module, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A newly initialised, patched, eval-mode model of ``model``'s class and config (same speed, new weights)."""
    config = copy.deepcopy(model.config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        new = type(model)(config)
    return patch(new.to(dtype).eval())


def model_inputs(model: nn.Module, batch: int, seq_len: int, seed: int = 0) -> dict:
    """Random token ids, no padding (``attention_mask`` of ones), segment ids 0; for decoders, as ``generate()``'s
    prefill runs (:func:`~structprune.latency.decoder_probes.prefill_inputs`)."""
    gen = torch.Generator().manual_seed(seed)
    c = model.config
    inputs = {"input_ids": torch.randint(0, c.vocab_size, (batch, seq_len), generator=gen),
              "attention_mask": torch.ones(batch, seq_len, dtype=torch.long)}
    if getattr(c, "type_vocab_size", 0):
        inputs["token_type_ids"] = torch.zeros(batch, seq_len, dtype=torch.long)
    from structprune.model.families import family_of

    if family_of(model).grouped_kv:  # decoders: generate()'s prefill (the KV cache, the last position's logits)
        from structprune.latency.decoder_probes import prefill_inputs

        inputs = prefill_inputs(model, inputs)
    return inputs


def keep_first(model: nn.Module, heads: list[int], units: list[int]) -> nn.Module:
    """Set masks keeping the first ``heads[l]`` heads and ``units[l]`` FFN units of each layer; returns ``model``."""
    for parts, h, u in zip(layer_parts(model), heads, units):
        for gate, k in zip(parts.gates, (h, u)):
            mask = torch.zeros(gate.n)
            mask[: int(k)] = 1.0
            gate.set_mask(mask)
    return model


def compacted_copy(model: nn.Module, heads: list[int], units: list[int]) -> nn.Module:
    """A compacted deep copy of a (fresh, patched) model with the given per-layer kept counts."""
    return compact(keep_first(copy.deepcopy(model), heads, units))
