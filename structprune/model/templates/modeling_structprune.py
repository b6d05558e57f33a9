"""Plain-PyTorch modeling code for a model compacted by structprune (per-layer head and FFN sizes): BERT,
RoBERTa, ELECTRA, XLM-RoBERTa, DistilBERT, ModernBERT, and the decoders Llama, Mistral, Qwen2 and Qwen3 (whose
layers also keep their own KV heads, ``config.structprune_kv_heads_per_layer``, and head -> KV-head map,
``config.structprune_kv_index_per_layer``: the query heads per KV head may differ within a layer).

Written next to the weights by ``structprune.save_pretrained``; it needs only ``torch`` and ``transformers``
(not structprune). Load with ``AutoModelFor<Task>.from_pretrained(directory, trust_remote_code=True)``.

The model is the Hugging Face one with each encoder layer's attention and FFN resized to the sizes in
``config.structprune_heads_per_layer`` / ``config.structprune_ffn_units_per_layer``; a layer with 0 heads (or
0 FFN units) adds only its output bias, residual and LayerNorm. BERT-layout models may also have a narrower hidden
width (``config.structprune_hidden_size``: the embeddings, every LayerNorm and projection, and the task head's
input are that wide) and whole sublayers skipped (``config.structprune_skip_attention`` / ``_skip_ffn``: the
sublayer, its residual and its LayerNorm are the identity). The gate tensors structprune keeps in the checkpoint
are ignored: this file is written only for models whose kept gates are all exactly 1.
"""
from __future__ import annotations

import math
import warnings

import torch
import transformers
from torch import nn

STRUCTPRUNE_MODELING_VERSION = "3"


def _attention(module: nn.Module, q_lin: nn.Linear, k_lin: nn.Linear, v_lin: nn.Linear, hidden_states, attention_mask):
    """Multi-head attention context ``[batch, seq, heads * head_dim]`` (``[.., 0]`` with no head)."""
    batch, seq = hidden_states.shape[:2]
    if module.num_heads == 0:
        return hidden_states.new_zeros(batch, seq, 0)
    shape = (batch, seq, module.num_heads, module.head_dim)
    q = q_lin(hidden_states).view(shape).transpose(1, 2)
    k = k_lin(hidden_states).view(shape).transpose(1, 2)
    v = v_lin(hidden_states).view(shape).transpose(1, 2)
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(module.head_dim)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:  # True = attend
            attention_mask = torch.zeros_like(attention_mask, dtype=scores.dtype).masked_fill(
                ~attention_mask, torch.finfo(scores.dtype).min)
        scores = scores + attention_mask.to(scores.dtype)
    probs = module.dropout(torch.softmax(scores, dim=-1))
    return torch.matmul(probs, v).transpose(1, 2).reshape(batch, seq, module.num_heads * module.head_dim)


class PrunedSelfAttention(nn.Module):
    """Multi-head self-attention with ``num_heads`` heads of ``head_dim`` (any number, 0 included)."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, dropout: float):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.query = nn.Linear(hidden_size, num_heads * head_dim)
        self.key = nn.Linear(hidden_size, num_heads * head_dim)
        self.value = nn.Linear(hidden_size, num_heads * head_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        return _attention(self, self.query, self.key, self.value, hidden_states, attention_mask), None


class PrunedOutput(nn.Module):
    """``LayerNorm(dropout(dense(x)) + residual)``; with 0 inputs (all heads / units pruned) ``dense(x)`` is its bias."""

    def __init__(self, in_features: int, hidden_size: int, eps: float, dropout: float, skip: bool = False):
        super().__init__()
        self.dense = nn.Linear(in_features, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.skip = skip  # the whole sublayer is pruned: the output is the residual input

    def forward(self, hidden_states, input_tensor):
        if self.skip:
            return input_tensor
        if self.dense.in_features == 0:
            hidden_states = self.dense.bias.to(input_tensor.dtype).expand_as(input_tensor)
        else:
            hidden_states = self.dense(hidden_states)
        return self.LayerNorm(self.dropout(hidden_states) + input_tensor)


class PrunedDistilBertAttention(nn.Module):
    """DistilBERT's self-attention (``q_lin``, ``k_lin``, ``v_lin``, ``out_lin``) with ``num_heads`` heads; with
    none it adds only ``out_lin``'s bias."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, dropout: float):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.q_lin = nn.Linear(dim, num_heads * head_dim)
        self.k_lin = nn.Linear(dim, num_heads * head_dim)
        self.v_lin = nn.Linear(dim, num_heads * head_dim)
        self.out_lin = nn.Linear(num_heads * head_dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        if self.num_heads == 0:
            return self.out_lin.bias.to(hidden_states.dtype).expand_as(hidden_states), None
        context = _attention(self, self.q_lin, self.k_lin, self.v_lin, hidden_states, attention_mask)
        return self.out_lin(context), None


class PrunedDistilBertFFN(nn.Module):
    """``dropout(lin2(act(lin1(x))))`` with ``units`` hidden units (0 included: then only ``lin2``'s bias)."""

    def __init__(self, dim: int, units: int, activation: str, dropout: float):
        super().__init__()
        self.lin1 = nn.Linear(dim, units)
        self.lin2 = nn.Linear(units, dim)
        self.activation = transformers.activations.get_activation(activation)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        if self.lin1.out_features == 0:
            return self.dropout(self.lin2.bias.to(x.dtype).expand_as(x))
        return self.dropout(self.lin2(self.activation(self.lin1(x))))


def _sizes(config, layers) -> tuple[list[int], list[int]]:
    heads = list(config.structprune_heads_per_layer)
    units = list(config.structprune_ffn_units_per_layer)
    if not len(heads) == len(units) == len(layers):
        raise ValueError(f"config has {len(layers)} layers but structprune sizes for {len(heads)} / {len(units)}")
    return heads, units


class _SkippingBlock:
    """Mixed into DistilBERT's ``TransformerBlock``: HF's forward, with a whole sublayer (its LayerNorm included)
    skipped where ``skip_attention`` / ``skip_ffn`` say."""

    skip_attention = skip_ffn = False

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        if not self.skip_attention:
            out, _ = self.attention(hidden_states, attention_mask=attention_mask, **kwargs)
            hidden_states = self.sa_layer_norm(out + hidden_states)
        if self.skip_ffn:
            return hidden_states
        return self.output_layer_norm(self.ffn(hidden_states) + hidden_states)


def _resize_distilbert(model: nn.Module, config) -> None:
    layers = model.base_model.transformer.layer
    head_dim = config.dim // config.n_heads
    dim = getattr(config, "structprune_hidden_size", None) or config.dim
    if dim != config.dim:
        emb = model.base_model.embeddings
        emb.word_embeddings = nn.Embedding(config.vocab_size, dim, padding_idx=config.pad_token_id)
        emb.position_embeddings = nn.Embedding(config.max_position_embeddings, dim)
        emb.LayerNorm = nn.LayerNorm(dim, eps=1e-12)
        for name in ("qa_outputs", "pre_classifier") + (() if hasattr(model, "pre_classifier") else ("classifier",)):
            linear = getattr(model, name, None)
            if isinstance(linear, nn.Linear):
                setattr(model, name, nn.Linear(dim, linear.out_features))
    skip_attn = getattr(config, "structprune_skip_attention", None) or [False] * len(layers)
    skip_ffn = getattr(config, "structprune_skip_ffn", None) or [False] * len(layers)
    for layer, h, u, sa, sf in zip(layers, *_sizes(config, layers), skip_attn, skip_ffn):
        layer.attention = PrunedDistilBertAttention(dim, h, head_dim, config.attention_dropout)
        layer.ffn = PrunedDistilBertFFN(dim, u, config.activation, config.dropout)
        if dim != config.dim:
            layer.sa_layer_norm = nn.LayerNorm(dim, eps=1e-12)
            layer.output_layer_norm = nn.LayerNorm(dim, eps=1e-12)
        if sa or sf:
            layer.__class__ = type(f"Skipping{type(layer).__name__}", (_SkippingBlock, type(layer)), {})
            layer.skip_attention, layer.skip_ffn = bool(sa), bool(sf)


class _NoHeadAttention(nn.Module):
    """A ModernBERT attention with every head pruned: only the output projection's bias (or zeros) is left."""

    def __init__(self, hidden: int, bias: bool):
        super().__init__()
        self.Wqkv = nn.Linear(hidden, 0, bias=bias)  # the checkpoint's (empty) fused projection
        self.Wo = nn.Linear(0, hidden, bias=bias)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        return self.Wo(hidden_states.new_zeros(*hidden_states.shape[:-1], 0)), None


def _resize_modernbert(model: nn.Module, config) -> None:
    """ModernBERT: fused ``Wqkv`` of 3 * heads * head_dim rows, GLU ``Wi`` of 2 * units rows (HF's modules take
    any head and unit count, but not zero heads)."""
    layers = model.base_model.layers
    hidden = config.hidden_size
    head_dim = hidden // config.num_attention_heads
    for layer, h, u in zip(layers, *_sizes(config, layers)):
        if h == 0:
            layer.attn = _NoHeadAttention(hidden, config.attention_bias)
        else:
            layer.attn.Wqkv = nn.Linear(hidden, 3 * h * head_dim, bias=config.attention_bias)
            layer.attn.Wo = nn.Linear(h * head_dim, hidden, bias=config.attention_bias)
        layer.mlp.Wi = nn.Linear(hidden, 2 * u, bias=config.mlp_bias)
        layer.mlp.Wo = nn.Linear(u, hidden, bias=config.mlp_bias)


def _rotate_half(t):
    half = t.shape[-1] // 2
    return torch.cat((-t[..., half:], t[..., :half]), dim=-1)


class PrunedDecoderAttention(nn.Module):
    """A decoder's self-attention (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, Qwen3's ``q_norm`` / ``k_norm``)
    with ``heads`` query heads reading the KV heads ``kv_index`` (any grouping; a KV head's k/v are read where its
    query heads need them, as HF's ``repeat_kv`` does for equal groups); HF's rotary positions, cache and mask."""

    def __init__(self, hf_attention: nn.Module, hidden: int, head_dim: int, heads: int, kv: int, kv_index: list):
        super().__init__()
        if len(kv_index) != heads or any(not 0 <= j < kv for j in kv_index):
            raise ValueError(f"a layer with {heads} heads and {kv} KV heads has the head -> KV map {kv_index}")
        self.layer_idx, self.head_dim, self.num_heads = hf_attention.layer_idx, head_dim, heads
        bias = {n: getattr(hf_attention, n).bias is not None for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=bias["q_proj"])
        self.k_proj = nn.Linear(hidden, kv * head_dim, bias=bias["k_proj"])
        self.v_proj = nn.Linear(hidden, kv * head_dim, bias=bias["v_proj"])
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=bias["o_proj"])
        self.q_norm, self.k_norm = getattr(hf_attention, "q_norm", None), getattr(hf_attention, "k_norm", None)
        # saved: from_pretrained builds the model on the meta device and fills what the checkpoint holds
        self.register_buffer("kv_index", torch.tensor(kv_index, dtype=torch.long))
        self.dropout = float(getattr(hf_attention, "attention_dropout", 0.0) or 0.0)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None,
                past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        batch, seq = hidden_states.shape[:2]

        def heads(t, norm):
            t = t.view(batch, seq, -1, self.head_dim)
            return (t if norm is None else norm(t)).transpose(1, 2)

        cos, sin = position_embeddings
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q, k = heads(self.q_proj(hidden_states), self.q_norm), heads(self.k_proj(hidden_states), self.k_norm)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        v = heads(self.v_proj(hidden_states), None)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
        if self.num_heads == 0:
            return self.o_proj(hidden_states.new_zeros(batch, seq, 0)), None
        k, v = k.index_select(1, self.kv_index), v.index_select(1, self.kv_index)
        causal = attention_mask is None and seq > 1
        ctx = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, is_causal=causal,
                                                         dropout_p=self.dropout if self.training else 0.0,
                                                         scale=self.head_dim ** -0.5)
        return self.o_proj(ctx.transpose(1, 2).reshape(batch, seq, -1)), None


def _resize_decoder(model: nn.Module, config) -> None:
    """Llama, Mistral, Qwen2, Qwen3: per-layer query heads, KV heads (``kv_index``) and GLU units."""
    layers = model.base_model.layers
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    kv_heads, kv_maps = list(config.structprune_kv_heads_per_layer), list(config.structprune_kv_index_per_layer)
    if not len(kv_heads) == len(kv_maps) == len(layers):
        raise ValueError(f"config has {len(layers)} layers but structprune KV heads for {len(kv_heads)} and head -> "
                         f"KV maps for {len(kv_maps)}")
    for layer, h, u, kv, kv_index in zip(layers, *_sizes(config, layers), kv_heads, kv_maps):
        layer.self_attn = PrunedDecoderAttention(layer.self_attn, hidden, head_dim, h, kv, kv_index)
        mlp = layer.mlp
        bias = mlp.down_proj.bias is not None
        mlp.gate_proj = nn.Linear(hidden, u, bias=bias)
        mlp.up_proj = nn.Linear(hidden, u, bias=bias)
        mlp.down_proj = nn.Linear(u, hidden, bias=bias)


_DECODERS = ("llama", "mistral", "qwen2", "qwen3")


def _resize_encoder(model: nn.Module, config) -> None:
    if config.model_type == "distilbert":
        return _resize_distilbert(model, config)
    if config.model_type == "modernbert":
        return _resize_modernbert(model, config)
    if config.model_type in _DECODERS:
        return _resize_decoder(model, config)
    layers = model.base_model.encoder.layer
    head_dim = config.hidden_size // config.num_attention_heads
    hidden = getattr(config, "structprune_hidden_size", None) or config.hidden_size
    if hidden != config.hidden_size:
        _narrow_bert(model, config, hidden)
    skip_attn = getattr(config, "structprune_skip_attention", None) or [False] * len(layers)
    skip_ffn = getattr(config, "structprune_skip_ffn", None) or [False] * len(layers)
    for layer, h, u, sa, sf in zip(layers, *_sizes(config, layers), skip_attn, skip_ffn):
        layer.attention.self = PrunedSelfAttention(hidden, h, head_dim, config.attention_probs_dropout_prob)
        layer.attention.output = PrunedOutput(h * head_dim, hidden, config.layer_norm_eps, config.hidden_dropout_prob,
                                              skip=sa)
        layer.intermediate.dense = nn.Linear(hidden, u)
        layer.output = PrunedOutput(u, hidden, config.layer_norm_eps, config.hidden_dropout_prob, skip=sf)


_HIDDEN_READERS = ("qa_outputs", "classifier", "classifier.dense", "pooler.dense")


def _narrow_bert(model: nn.Module, config, hidden: int) -> None:
    """The embeddings, their LayerNorm and the task head's input at the pruned hidden width."""
    emb = model.base_model.embeddings
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        table = getattr(emb, name, None)
        if table is not None:
            setattr(emb, name, nn.Embedding(table.num_embeddings, hidden, padding_idx=table.padding_idx))
    emb.LayerNorm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
    for root in (model, model.base_model):
        for path in _HIDDEN_READERS:
            parent, _, name = path.rpartition(".")
            owner = getattr(root, parent, None) if parent else root
            linear = getattr(owner, name, None) if owner is not None else None
            if isinstance(linear, nn.Linear) and linear.in_features == config.hidden_size:
                setattr(owner, name, nn.Linear(hidden, linear.out_features, bias=linear.bias is not None))


def _pruned_class(base: type) -> type:
    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        with warnings.catch_warnings():  # "Initializing zero-element tensors is a no-op" for emptied layers
            warnings.simplefilter("ignore", UserWarning)
            _resize_encoder(self, config)

    return type(f"Pruned{base.__name__}", (base,), {
        "__init__": __init__, "__module__": __name__,
        "__doc__": f"``{base.__name__}`` with structprune's per-layer head and FFN sizes.",
        # structprune's gate state, all ones in a model this file is written for
        "_keys_to_ignore_on_load_unexpected": [r"\.head_gate\.", r"\.unit_gate\.", r"\.sublayer_gate\.",
                                               r"\.hidden_gate\."],
    })


_BASES = ("BertModel", "BertForQuestionAnswering", "BertForSequenceClassification", "BertForTokenClassification",
          "BertForMaskedLM", "BertForMultipleChoice", "BertForPreTraining", "BertForNextSentencePrediction",
          "RobertaModel", "RobertaForQuestionAnswering", "RobertaForSequenceClassification",
          "RobertaForTokenClassification", "RobertaForMaskedLM", "RobertaForMultipleChoice",
          "ElectraModel", "ElectraForQuestionAnswering", "ElectraForSequenceClassification",
          "ElectraForTokenClassification", "ElectraForMaskedLM", "ElectraForMultipleChoice", "ElectraForPreTraining",
          "XLMRobertaModel", "XLMRobertaForQuestionAnswering", "XLMRobertaForSequenceClassification",
          "XLMRobertaForTokenClassification", "XLMRobertaForMaskedLM", "XLMRobertaForMultipleChoice",
          "DistilBertModel", "DistilBertForQuestionAnswering", "DistilBertForSequenceClassification",
          "DistilBertForTokenClassification", "DistilBertForMaskedLM", "DistilBertForMultipleChoice",
          "ModernBertModel", "ModernBertForQuestionAnswering", "ModernBertForSequenceClassification",
          "ModernBertForTokenClassification", "ModernBertForMaskedLM", "ModernBertForMultipleChoice",
          "LlamaModel", "LlamaForCausalLM", "LlamaForSequenceClassification", "LlamaForTokenClassification",
          "LlamaForQuestionAnswering", "MistralModel", "MistralForCausalLM", "MistralForSequenceClassification",
          "MistralForTokenClassification", "MistralForQuestionAnswering", "Qwen2Model", "Qwen2ForCausalLM",
          "Qwen2ForSequenceClassification", "Qwen2ForTokenClassification", "Qwen2ForQuestionAnswering",
          "Qwen3Model", "Qwen3ForCausalLM", "Qwen3ForSequenceClassification", "Qwen3ForTokenClassification",
          "Qwen3ForQuestionAnswering")
for _name in _BASES:
    globals()[f"Pruned{_name}"] = _pruned_class(getattr(transformers, _name))
