"""The BERT layout: BERT, RoBERTa, ELECTRA and XLM-RoBERTa (every task head transformers has for them).

The four share one layer layout (``encoder.layer[i]`` with ``attention.self.{query,key,value}``,
``attention.output.dense``, ``intermediate.dense``, ``output.dense``) and one config vocabulary
(``hidden_size``, ``num_attention_heads``, ``intermediate_size``); a further family with this layout is one more
entry in :attr:`BertFamily.model_types` and :attr:`BertFamily.class_prefixes`.
"""
from __future__ import annotations

import torch
from torch import nn

from structprune.model.families.base import Family
from structprune.model.gates import HardConcreteGate
from structprune.model.modules import (GatedSelfAttention, gate_values, stash_hf_module, scale_sublayer_output,
                                       sublayer_scale, unstash_hf_module)
from structprune.ops import dispatch as ops
from structprune.ops.activations import check_activation
from structprune.ops.reference import activation_fn


class GatedAttention(nn.Module):
    """Drop-in for ``BertAttention`` (and its RoBERTa/ELECTRA/XLM-R copies): gated self-attention, output
    projection, dropout, residual and LayerNorm. A layer whose heads are all pruned still adds the output bias,
    the residual and the LayerNorm.

    With ``sublayer=True`` a gate (``sublayer_gate``, one entry) scales the whole sublayer; when it is 0 the sublayer,
    LayerNorm included, is skipped (the output is the input). With a hidden-dimension gate (set by
    :func:`structprune.model.cofi.install_hidden_gate`) the sublayer's output is scaled by it before the residual."""

    def __init__(self, self_attention: GatedSelfAttention, output: nn.Module, config, sublayer: bool = False,
                 sampling: bool = False):
        super().__init__()
        self.self = self_attention
        self.output = output  # HF SelfOutput: dense, dropout, LayerNorm
        self.config = config
        self.attention_dropout = float(getattr(config, "attention_probs_dropout_prob", 0.0))
        self.sublayer_gate = HardConcreteGate(1, sampling=sampling) if sublayer else None
        self.__dict__["hidden_gate"] = None

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                encoder_hidden_states=None, encoder_attention_mask=None, past_key_values=None, **kwargs):
        if encoder_hidden_states is not None:
            raise ValueError("structprune gates self-attention of encoders only; cross-attention is not supported")
        scale, skipped = sublayer_scale(self.sublayer_gate)
        if skipped:
            return hidden_states, None
        context_out = self.self.attend(hidden_states, self.output.dense, attention_mask, self.attention_dropout,
                                       self.config)
        context_out = scale_sublayer_output(context_out, scale, self.__dict__["hidden_gate"])
        out = self.output.LayerNorm(self.output.dropout(context_out) + hidden_states)
        return out, None



class GatedIntermediate(nn.Module):
    """Drop-in for ``BertIntermediate``: ``act(dense(x)) * gate`` (one gate per FFN unit).

    Called on its own it returns the gated activations, so HF's ``BertOutput`` still composes with it;
    patched layers call :meth:`ffn` instead, which fuses both projections in one op.
    """

    def __init__(self, dense: nn.Linear, activation: str, sampling: bool = False, sublayer: bool = False):
        super().__init__()
        check_activation(activation)
        self.dense = dense
        self.activation = activation
        self.unit_gate = HardConcreteGate(dense.out_features, sampling=sampling)
        self.sublayer_gate = HardConcreteGate(1, sampling=sampling) if sublayer else None  # the whole FFN sublayer

    def extra_repr(self) -> str:
        return f"units={self.dense.out_features}, activation={self.activation}"

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        gates, _ = gate_values(self.unit_gate)
        return activation_fn(self.activation)(self.dense(hidden_states)) * gates.to(hidden_states.dtype)

    def ffn(self, hidden_states: torch.Tensor, output_dense: nn.Linear) -> torch.Tensor:
        """Both FFN projections with gated units: ``output_dense(act(dense(x)) * gate)``."""
        gates, kept = gate_values(self.unit_gate)
        return ops.gated_ffn(hidden_states, self.dense.weight, self.dense.bias, output_dense.weight,
                             output_dense.bias, gates, kept, self.activation)


class GatedLayerMixin:
    """Mixed into a copy of the HF layer class: the FFN runs as one fused gated op."""

    def feed_forward_chunk(self, attention_output):
        scale, skipped = sublayer_scale(self.intermediate.sublayer_gate)
        if skipped:
            return attention_output
        h = self.intermediate.ffn(attention_output, self.output.dense)
        h = scale_sublayer_output(h, scale, self.attention.__dict__["hidden_gate"])
        return self.output.LayerNorm(self.output.dropout(h) + attention_output)


class BertFamily(Family):
    name = "bert"
    model_types = ("bert", "roberta", "electra", "xlm-roberta")
    class_prefixes = {"bert": "Bert", "roberta": "Roberta", "electra": "Electra", "xlm-roberta": "XLMRoberta"}
    layers_path = "encoder.layer"
    config_keys = {"hidden": "hidden_size", "heads": "num_attention_heads", "intermediate": "intermediate_size",
                   "layers": "num_hidden_layers", "activation": "hidden_act"}
    paths = {"attention": "attention.self", "query": "attention.self.query", "key": "attention.self.key",
             "value": "attention.self.value", "attn_out": "attention.output.dense", "ffn": "intermediate",
             "ffn_in": "intermediate.dense", "ffn_out": "output.dense", "head_gate": "attention.self.head_gate",
             "unit_gate": "intermediate.unit_gate", "attn_sublayer_gate": "attention.sublayer_gate",
             "ffn_sublayer_gate": "intermediate.sublayer_gate", "attn_norm": "attention.output.LayerNorm",
             "ffn_norm": "output.LayerNorm", "attention_block": "attention"}
    embeddings = "embeddings"  # from the base model
    embedding_tables = ("word_embeddings", "position_embeddings", "token_type_embeddings")
    embedding_norm = "LayerNorm"
    hidden_readers = ("qa_outputs", "classifier", "classifier.dense", "pooler.dense")
    layer_mixin = GatedLayerMixin
    ffn_block_name = "feed_forward_chunk"

    def ffn_block(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return layer.feed_forward_chunk(hidden)

    def patch_layer(self, layer: nn.Module, config, sampling: bool, sublayers: bool = False) -> None:
        attention, hf_self = layer.attention, layer.attention.self
        head_dim = hf_self.attention_head_size
        gated_self = GatedSelfAttention(hf_self.query, hf_self.key, hf_self.value,
                                        hf_self.query.out_features // head_dim, head_dim, sampling=sampling)
        stash_hf_module(gated_self, hf_self, ("query", "key", "value"))
        gated = GatedAttention(gated_self, attention.output, config, sublayer=sublayers, sampling=sampling)
        stash_hf_module(gated, attention, ("self", "output"))
        layer.attention = gated
        intermediate = GatedIntermediate(layer.intermediate.dense, self.sizes(config).kernel_activation,
                                         sampling=sampling, sublayer=sublayers)
        stash_hf_module(intermediate, layer.intermediate, ("dense",))
        layer.intermediate = intermediate

    def unpatch_layer(self, layer: nn.Module, config) -> None:
        gated = layer.attention
        hf_attention = unstash_hf_module(gated, output=gated.output,
                                         self=unstash_hf_module(gated.self, query=gated.self.query,
                                                                key=gated.self.key, value=gated.self.value))
        layer.attention = hf_attention
        layer.intermediate = unstash_hf_module(layer.intermediate, dense=layer.intermediate.dense)

