"""The DistilBERT layout: ``transformer.layer[i]`` with ``attention.{q,k,v,out}_lin``, ``ffn.lin1/lin2`` and the
two LayerNorms in the block itself; sizes in ``dim``, ``n_heads``, ``hidden_dim``, ``n_layers``, ``activation``."""
from __future__ import annotations

import torch
from torch import nn

from structprune.model.families.base import Family
from structprune.model.gates import HardConcreteGate
from structprune.model.modules import (attend, gate_values, scale_sublayer_output, stash_hf_module, sublayer_scale,
                                       unstash_hf_module)
from structprune.ops import dispatch as ops
from structprune.ops.activations import check_activation


class GatedDistilBertAttention(nn.Module):
    """Drop-in for ``DistilBertSelfAttention``: Q/K/V and output projections (HF names) with one gate per head.
    Returns ``(output, None)``; the block adds the residual and its LayerNorm."""

    def __init__(self, q_lin: nn.Linear, k_lin: nn.Linear, v_lin: nn.Linear, out_lin: nn.Linear, head_dim: int,
                 dropout: float, config, sampling: bool = False, sublayer: bool = False):
        super().__init__()
        self.q_lin, self.k_lin, self.v_lin, self.out_lin = q_lin, k_lin, v_lin, out_lin
        self.head_dim = head_dim
        self.num_heads = q_lin.out_features // head_dim
        self.attention_dropout = dropout
        self.config = config
        self.head_gate = HardConcreteGate(self.num_heads, sampling=sampling)
        self.sublayer_gate = HardConcreteGate(1, sampling=sampling) if sublayer else None  # the whole sublayer
        self.__dict__["hidden_gate"] = None  # set by structprune.model.cofi.install_hidden_gate

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}"

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        out = attend(hidden_states, self.q_lin, self.k_lin, self.v_lin, self.out_lin, self.head_gate, self.num_heads,
                     attention_mask, self.attention_dropout if self.training else 0.0, self.config)
        return out, None


class GatedDistilBertFFN(nn.Module):
    """Drop-in for DistilBERT's ``FFN``: ``dropout(lin2(act(lin1(x)) * gate))`` as one fused gated op."""

    def __init__(self, lin1: nn.Linear, lin2: nn.Linear, dropout: nn.Module, activation: str, sampling: bool = False,
                 sublayer: bool = False):
        super().__init__()
        check_activation(activation)
        self.lin1, self.lin2, self.dropout = lin1, lin2, dropout
        self.activation = activation
        self.unit_gate = HardConcreteGate(lin1.out_features, sampling=sampling)
        self.sublayer_gate = HardConcreteGate(1, sampling=sampling) if sublayer else None  # the whole sublayer

    def extra_repr(self) -> str:
        return f"units={self.lin1.out_features}, activation={self.activation}"

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        gates, kept = gate_values(self.unit_gate)
        out = ops.gated_ffn(hidden_states, self.lin1.weight, self.lin1.bias, self.lin2.weight, self.lin2.bias, gates,
                            kept, self.activation)
        return self.dropout(out)


class GatedBlockMixin:
    """Mixed into a copy of ``TransformerBlock``: its forward (HF's: attention, residual, LayerNorm, FFN, residual,
    LayerNorm), with a closed sublayer gate skipping its sublayer and LayerNorm, and the hidden gate scaling each
    sublayer's output (CoFi's structures; see :mod:`structprune.model.cofi`)."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        hidden_gate = self.attention.__dict__["hidden_gate"]
        scale, skipped = sublayer_scale(self.attention.sublayer_gate)
        if not skipped:
            out, _ = self.attention(hidden_states, attention_mask=attention_mask, **kwargs)
            hidden_states = self.sa_layer_norm(scale_sublayer_output(out, scale, hidden_gate) + hidden_states)
        scale, skipped = sublayer_scale(self.ffn.sublayer_gate)
        if skipped:
            return hidden_states
        out = scale_sublayer_output(self.ffn(hidden_states), scale, hidden_gate)
        return self.output_layer_norm(out + hidden_states)


class DistilBertFamily(Family):
    name = "distilbert"
    model_types = ("distilbert",)
    class_prefixes = {"distilbert": "DistilBert"}
    layers_path = "transformer.layer"
    config_keys = {"hidden": "dim", "heads": "n_heads", "intermediate": "hidden_dim", "layers": "n_layers",
                   "activation": "activation"}
    paths = {"attention": "attention", "query": "attention.q_lin", "key": "attention.k_lin",
             "value": "attention.v_lin", "attn_out": "attention.out_lin", "ffn": "ffn", "ffn_in": "ffn.lin1",
             "ffn_out": "ffn.lin2", "head_gate": "attention.head_gate", "unit_gate": "ffn.unit_gate",
             "attn_sublayer_gate": "attention.sublayer_gate", "ffn_sublayer_gate": "ffn.sublayer_gate",
             "attn_norm": "sa_layer_norm", "ffn_norm": "output_layer_norm", "attention_block": "attention"}
    layer_classes = ("TransformerBlock",)
    layer_mixin = GatedBlockMixin
    embeddings = "embeddings"
    embedding_tables = ("word_embeddings", "position_embeddings")
    embedding_norm = "LayerNorm"
    hidden_readers = ("qa_outputs", "pre_classifier", "classifier")

    def reader_paths(self, model: nn.Module) -> tuple[str, ...]:
        # sequence classification and multiple choice read the hidden states through pre_classifier only
        return tuple(p for p in self.hidden_readers if not (p == "classifier" and hasattr(model, "pre_classifier")))
    ffn_block_name = "ffn"

    def ffn_block(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return layer.output_layer_norm(layer.ffn(hidden) + hidden)

    def patch_layer(self, layer: nn.Module, config, sampling: bool, sublayers: bool = False) -> None:
        hf = layer.attention
        gated = GatedDistilBertAttention(hf.q_lin, hf.k_lin, hf.v_lin, hf.out_lin, hf.attention_head_size,
                                         float(hf.dropout.p), config, sampling=sampling, sublayer=sublayers)
        stash_hf_module(gated, hf, ("q_lin", "k_lin", "v_lin", "out_lin"))
        layer.attention = gated
        ffn = GatedDistilBertFFN(layer.ffn.lin1, layer.ffn.lin2, layer.ffn.dropout,
                                 self.sizes(config).kernel_activation, sampling=sampling, sublayer=sublayers)
        stash_hf_module(ffn, layer.ffn, ("lin1", "lin2"))
        layer.ffn = ffn

    def unpatch_layer(self, layer: nn.Module, config) -> None:
        a = layer.attention
        hf = unstash_hf_module(a, q_lin=a.q_lin, k_lin=a.k_lin, v_lin=a.v_lin, out_lin=a.out_lin)
        hf.n_heads = a.num_heads
        layer.attention = hf
        layer.ffn = unstash_hf_module(layer.ffn, lin1=layer.ffn.lin1, lin2=layer.ffn.lin2)
