"""Gated attention and gated FFN modules.

They hold the layer's full weights (the very ``nn.Linear`` modules of the Hugging Face layer, so parameter
names stay as HF writes them) plus a :class:`~structprune.gates.HardConcreteGate` per head / per FFN unit,
and compute through :mod:`structprune.ops`, which picks the kernel backend. They know nothing about model
families: :mod:`structprune.patching` builds them from HF layers.
"""
from __future__ import annotations

import torch
from torch import nn

from . import ops
from .gates import HardConcreteGate
from .reference import ACTIVATIONS


def _gate_values(gate: HardConcreteGate) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(gate values [n], indices of non-zero gates); a fresh sample in training with sampling on.

    Under ``torch.compile`` with the reference backend no index is needed, and none is computed (its size
    depends on the data, which would break the graph)."""
    values = gate()
    if torch.compiler.is_compiling() and ops.resolve_backend(values.device) == "torch":
        return values, None
    if gate.stochastic:
        return values, torch.nonzero(values.detach() != 0, as_tuple=False).flatten()
    return values, gate.kept_index()


class GatedSelfAttention(nn.Module):
    """Q/K/V projections of one layer and one gate per head (HF's ``attention.self``)."""

    def __init__(self, query: nn.Linear, key: nn.Linear, value: nn.Linear, num_heads: int, head_dim: int,
                 sampling: bool = False):
        super().__init__()
        if query.out_features != num_heads * head_dim:
            raise ValueError(f"query projection has {query.out_features} outputs, expected "
                             f"num_heads * head_dim = {num_heads} * {head_dim}")
        self.query, self.key, self.value = query, key, value
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.head_gate = HardConcreteGate(num_heads, sampling=sampling)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}"


class GatedAttention(nn.Module):
    """Drop-in for ``BertAttention``/``RobertaAttention``: gated self-attention, output projection,
    dropout, residual and LayerNorm. A layer whose heads are all pruned still adds the output bias,
    the residual and the LayerNorm."""

    def __init__(self, self_attention: GatedSelfAttention, output: nn.Module, config):
        super().__init__()
        self.self = self_attention
        self.output = output  # HF SelfOutput: dense, dropout, LayerNorm
        self.config = config
        self.attention_dropout = float(getattr(config, "attention_probs_dropout_prob", 0.0))

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                encoder_hidden_states=None, encoder_attention_mask=None, past_key_values=None, **kwargs):
        if encoder_hidden_states is not None:
            raise ValueError("structprune gates self-attention of encoders only; cross-attention is not supported")
        sa = self.self
        gates, active = _gate_values(sa.head_gate)
        impl = "eager" if getattr(self.config, "_attn_implementation", "sdpa") == "eager" else "sdpa"
        context_out = ops.gated_attention(
            hidden_states, sa.query.weight, sa.query.bias, sa.key.weight, sa.key.bias, sa.value.weight,
            sa.value.bias, self.output.dense.weight, self.output.dense.bias, gates, active, sa.num_heads,
            attn_mask=attention_mask, dropout_p=self.attention_dropout if self.training else 0.0, impl=impl)
        out = self.output.LayerNorm(self.output.dropout(context_out) + hidden_states)
        return out, None


class GatedIntermediate(nn.Module):
    """Drop-in for ``BertIntermediate``: ``act(dense(x)) * gate`` (one gate per FFN unit).

    Called on its own it returns the gated activations, so HF's ``BertOutput`` still composes with it;
    patched layers call :meth:`ffn` instead, which fuses both projections in one op.
    """

    def __init__(self, dense: nn.Linear, activation: str, sampling: bool = False):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.dense = dense
        self.activation = activation
        self.unit_gate = HardConcreteGate(dense.out_features, sampling=sampling)

    def extra_repr(self) -> str:
        return f"units={self.dense.out_features}, activation={self.activation}"

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        from .reference import activation_fn

        gates, _ = _gate_values(self.unit_gate)
        return activation_fn(self.activation)(self.dense(hidden_states)) * gates.to(hidden_states.dtype)

    def ffn(self, hidden_states: torch.Tensor, output_dense: nn.Linear) -> torch.Tensor:
        """Both FFN projections with gated units: ``output_dense(act(dense(x)) * gate)``."""
        gates, kept = _gate_values(self.unit_gate)
        return ops.gated_ffn(hidden_states, self.dense.weight, self.dense.bias, output_dense.weight,
                             output_dense.bias, gates, kept, self.activation)


class GatedLayerMixin:
    """Mixed into a copy of the HF layer class: the FFN runs as one fused gated op."""

    def feed_forward_chunk(self, attention_output):
        h = self.intermediate.ffn(attention_output, self.output.dense)
        return self.output.LayerNorm(self.output.dropout(h) + attention_output)
