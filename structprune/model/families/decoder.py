"""Decoder language models with grouped-query attention: Llama, Mistral, Qwen2 and Qwen3 (``model_type`` "llama",
"mistral", "qwen2", "qwen3"; CausalLM, SequenceClassification, TokenClassification, QuestionAnswering, the bare
model).

A layer is ``layers[i]`` with ``self_attn.{q,k,v,o}_proj`` (``num_attention_heads`` query heads and
``num_key_value_heads`` KV heads of ``head_dim``; query head ``h`` reads KV head ``h // (H / Hkv)``), Qwen3's
``self_attn.q_norm`` / ``k_norm`` (an RMSNorm over the head dimension, before the rotary positions), and a GLU
``mlp`` (``down_proj(act(gate_proj(x)) * up_proj(x))``): FFN unit ``u`` is row ``u`` of ``gate_proj`` and of
``up_proj`` and column ``u`` of ``down_proj``. Rotary ``cos``/``sin`` come from the model; the sliding window is
``config.sliding_window`` in Mistral and in Qwen2/Qwen3's "sliding_attention" layers.

Gates: one per query head and one per FFN unit. Each patched attention keeps a per-layer head -> KV-head map
(``kv_index``, a saved buffer): a KV head is kept while one of its query heads is, so compaction removes the
``k_proj``/``v_proj`` rows (and the KV-cache slot) of a KV head whose query heads are all pruned, and groups may
end unequal. The gated attention computes q of the kept heads and k/v of the kept KV heads (what the cache
stores), appends them to the HF cache between the two decoder ops (into a growing buffer for a ``DynamicCache``:
:mod:`structprune.model.families.kv_cache`), and attends through the map.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from structprune.model.families.kv_cache import update as cache_update
from structprune.model.families.base import Family, Sizes
from structprune.model.gates import HardConcreteGate
from structprune.model.modules import gate_values, stash_hf_module, unstash_hf_module
from structprune.ops import dispatch as ops
from structprune.ops.activations import check_activation

_PREFIXES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
_LAYER_NORMS = ("input_layernorm", "post_attention_layernorm")


class GatedDecoderAttention(nn.Module):
    """Drop-in for ``LlamaAttention`` (Mistral, Qwen2, Qwen3): q/k/v projections, Qwen3's q/k norms, rotary
    positions, the KV cache, causal grouped-query attention with an optional sliding window, one gate per query
    head and the output projection; holds HF's very linears and norms."""

    def __init__(self, attn: nn.Module, window: int, config, sampling: bool = False):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.q_norm, self.k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        self.eps = float(getattr(self.q_norm, "variance_epsilon", 1e-6))
        self.layer_idx, self.head_dim, self.window, self.config = attn.layer_idx, attn.head_dim, window, config
        self.num_heads = self.q_proj.out_features // self.head_dim
        self.attention_dropout = float(getattr(config, "attention_dropout", 0.0) or 0.0)
        self.register_buffer("kv_index", torch.arange(self.num_heads) // attn.num_key_value_groups)
        self.head_gate = HardConcreteGate(self.num_heads, sampling=sampling)
        self._routing: tuple | None = None

    @property
    def num_kv_heads(self) -> int:
        return self.k_proj.out_features // self.head_dim

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"window={self.window}")

    @torch.no_grad()
    def keep_heads(self, heads: torch.Tensor, kv_heads: torch.Tensor | None = None) -> torch.Tensor:
        """The KV heads that query heads ``heads`` need (or ``kv_heads`` as given, when loading a compacted model,
        whose map is then read from the checkpoint), with ``kv_index`` renumbered for them; for compaction."""
        old = self.kv_index.index_select(0, heads.to(self.kv_index.device))
        keep = torch.unique(old) if kv_heads is None else kv_heads.to(old.device)
        self.kv_index = torch.searchsorted(keep, old).clamp_max(max(keep.numel() - 1, 0))
        self._routing = None
        return keep

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        kv = self.kv_index
        if kv.numel() and kv.device.type != "meta" and (int(kv.min()) < 0 or int(kv.max()) >= self.num_kv_heads):
            raise ValueError(f"{prefix}kv_index maps query heads to KV heads {kv.tolist()}, but the layer has "
                             f"{self.num_kv_heads} KV heads")
        self._routing = None

    def routing(self, active: torch.Tensor | None):
        """``(active_kv, q_to_kv)`` for the query heads ``active`` (None: all): the KV heads they read (None: all)
        and, per active head, its KV head's index among them. Cached while ``active`` and the map are unchanged."""
        kv = self.kv_index
        if active is None or torch.compiler.is_compiling():
            return None, (kv if active is None else kv.index_select(0, active))
        cached = self._routing  # (active, its version, kv_index, its version, result): the very tensors, unchanged
        if cached is not None and cached[0] is active and cached[2] is kv and not active.is_inference() and \
                cached[1] == active._version and cached[3] == kv._version:
            return cached[4]
        needed = kv.index_select(0, active.to(kv.device))
        keep = torch.unique(needed)
        result = (None if keep.numel() == self.num_kv_heads else keep.cpu(),
                  torch.searchsorted(keep, needed).cpu())
        if not active.is_inference():
            self._routing = (active, active._version, kv, kv._version, result)
        return result

    def __getstate__(self):  # pickling and deepcopy: the routing cache is rebuilt on use
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        return {**state, "_routing": None}

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, cache=None,
                past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        cos, sin = position_embeddings
        gates, active = gate_values(self.head_gate)
        active_kv, q_to_kv = self.routing(active)
        q, k, v = ops.gated_decoder_qkv(
            hidden_states, self.q_proj.weight, self.q_proj.bias, self.k_proj.weight, self.k_proj.bias,
            self.v_proj.weight, self.v_proj.bias, getattr(self.q_norm, "weight", None),
            getattr(self.k_norm, "weight", None), self.eps, cos, sin, self.head_dim, active, active_kv)
        if cache is not None:
            k, v = cache_update(cache, k, v, self.layer_idx, kwargs=kwargs)
        impl = "eager" if getattr(self.config, "_attn_implementation", "sdpa") == "eager" else "sdpa"
        out = ops.gated_decoder_attention(q, k, v, self.o_proj.weight, self.o_proj.bias, gates, active, q_to_kv,
                                          self.window, attn_mask=attention_mask,
                                          dropout_p=self.attention_dropout if self.training else 0.0, impl=impl)
        return out, None


class GatedDecoderMLP(nn.Module):
    """Drop-in for ``LlamaMLP``: ``down_proj(act(gate_proj(x)) * up_proj(x) * gate)``, one gate per unit; holds
    HF's very linears. Runs ``gated_glu_ffn`` on ``[gate_proj; up_proj]`` (concatenated once per weight change
    while no gradient is needed, so the kernels' packed weights stay cached; per call in training); under autocast
    without gradients the weights are cast once per version to the autocast dtype, not at every call."""

    def __init__(self, gate_proj: nn.Linear, up_proj: nn.Linear, down_proj: nn.Linear, activation: str,
                 sampling: bool = False):
        super().__init__()
        check_activation(activation)
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.activation = activation
        self.unit_gate = HardConcreteGate(down_proj.in_features, sampling=sampling)
        self.__dict__["_fused"] = None

    def extra_repr(self) -> str:
        return f"units={self.down_proj.in_features}, activation={self.activation}"

    def fused_input(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``([gate_proj.weight; up_proj.weight], [gate_proj.bias; up_proj.bias] or None)``, cast to ``dtype``
        when given."""
        return self._weights(dtype)[:2]

    def _weights(self, dtype: torch.dtype | None):
        """(w1, b1, w2, b2): the fused input weights and ``down_proj``'s, in ``dtype`` (None: as they are); cached
        per weight version and dtype while no gradient is needed."""
        g, u, d = self.gate_proj, self.up_proj, self.down_proj
        tensors = [t for t in (g.weight, u.weight, g.bias, u.bias, d.weight, d.bias) if t is not None]

        def cast(t):
            return t if t is None or dtype is None else t.to(dtype)

        def fuse():
            bias = None if g.bias is None and u.bias is None else torch.cat(
                [g.weight.new_zeros(g.out_features) if g.bias is None else g.bias,
                 u.weight.new_zeros(u.out_features) if u.bias is None else u.bias])
            return cast(torch.cat([g.weight, u.weight])), cast(bias), cast(d.weight), cast(d.bias)

        if (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)) or torch.compiler.is_compiling() \
                or any(t.is_inference() for t in tensors):
            return fuse()
        key = (dtype,) + tuple((id(t), t.data_ptr(), t._version, t.shape, t.dtype, t.device) for t in tensors)
        cached = self.__dict__.get("_fused")
        if cached is None or cached[0] != key:
            self.__dict__["_fused"] = None  # the old copy goes before the new one is made
            cached = self.__dict__["_fused"] = (key, fuse())
        return cached[1]

    def __getstate__(self):  # pickling and deepcopy: the fused copy is rebuilt on use
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        return {**state, "_fused": None}

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        gates, kept = gate_values(self.unit_gate)
        kind = hidden_states.device.type  # under autocast, weights cast once per version (not at every call)
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
        w1, b1, w2, b2 = self._weights(dtype)
        return ops.gated_glu_ffn(hidden_states, w1, b1, w2, b2, gates, kept, self.activation)


class DecoderRMSNorm(nn.Module):
    """Stands in for HF's RMSNorm (``LlamaRMSNorm`` and its Mistral/Qwen copies) in a patched decoder, holding its
    very weight (the state dict is unchanged): :func:`structprune.ops.dispatch.rms_norm`, whose cpp kernel does in
    one pass what HF's six element-wise ops do when no gradient is needed, and HF's formula otherwise."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.weight = norm.weight
        self.variance_epsilon = float(norm.variance_epsilon)
        stash_hf_module(self, norm, ())

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(hidden_states, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"

    @staticmethod
    def swap(owner: nn.Module, name: str) -> None:
        """Put a :class:`DecoderRMSNorm` in place of ``owner.<name>`` when that is an HF RMSNorm."""
        norm = getattr(owner, name, None)
        if isinstance(norm, nn.Module) and not isinstance(norm, DecoderRMSNorm) and \
                type(norm).__name__.endswith("RMSNorm") and hasattr(norm, "variance_epsilon"):
            setattr(owner, name, DecoderRMSNorm(norm))

    @staticmethod
    def unswap(owner: nn.Module, name: str) -> None:
        """Give ``owner.<name>`` its HF RMSNorm back (with the current weight)."""
        norm = getattr(owner, name, None)
        if isinstance(norm, DecoderRMSNorm):
            setattr(owner, name, unstash_hf_module(norm, weight=norm.weight))


class DecoderLMHead(nn.Linear):
    """The LM head of a patched decoder (``nn.Linear`` with the same parameters and state dict): under autocast
    without gradients its weight is cast once per version (HF's head casts the whole [vocab, hidden] matrix at every
    call) and the GEMM runs on 2-D rows (a 3-D bf16 input goes through a batched matmul that copies the transposed
    weight on the CPU). Otherwise it is ``nn.Linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kind = x.device.type
        if not torch.is_autocast_enabled(kind) or torch.compiler.is_compiling() or self.weight.is_inference() or \
                (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
            return super().forward(x)
        dtype = torch.get_autocast_dtype(kind)
        w, b = self.weight, self.bias
        key = (dtype, id(w), w.data_ptr(), w._version, w.shape, w.device, None if b is None else b._version)
        cached = self.__dict__.get("_cast")
        if cached is None or cached[0] != key:
            self.__dict__["_cast"] = None
            cached = self.__dict__["_cast"] = (key, w.to(dtype), None if b is None else b.to(dtype))
        y = F.linear(x.reshape(-1, x.shape[-1]).to(dtype), cached[1], cached[2])
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def __getstate__(self):  # pickling and deepcopy: the cast copy is rebuilt on use
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        return {**state, "_cast": None}


class DecoderFamily(Family):
    name = "decoder"
    model_types = tuple(_PREFIXES)
    class_prefixes = dict(_PREFIXES)
    layers_path = "layers"
    layer_classes = tuple(p + "DecoderLayer" for p in _PREFIXES.values())
    config_keys = {"hidden": "hidden_size", "heads": "num_attention_heads", "intermediate": "intermediate_size",
                   "layers": "num_hidden_layers", "activation": "hidden_act"}
    paths = {"attention": "self_attn", "query": "self_attn.q_proj", "key": "self_attn.k_proj",
             "value": "self_attn.v_proj", "attn_out": "self_attn.o_proj", "ffn": "mlp", "ffn_in": "mlp.gate_proj",
             "ffn_up": "mlp.up_proj", "ffn_out": "mlp.down_proj", "head_gate": "self_attn.head_gate",
             "unit_gate": "mlp.unit_gate"}
    ffn_in_roles = ("ffn_in", "ffn_up")
    grouped_kv = True
    ffn_block_name = "mlp"

    def sizes(self, config) -> Sizes:
        get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
        base = super().sizes(config)
        kv = get("num_key_value_heads") or base.heads
        head_dim = get("head_dim") or None
        return Sizes(base.hidden, base.heads, base.intermediate, base.layers, base.activation, kv_heads=kv,
                     explicit_head_dim=head_dim)

    def layer_shapes(self, hidden: int, head_dim: int, heads: int, units: int, kv_heads: int | None = None) -> dict:
        a, kv = heads * head_dim, (heads if kv_heads is None else kv_heads) * head_dim
        return {"self_attn.q_proj.weight": (a, hidden), "self_attn.q_proj.bias": (a,),
                "self_attn.k_proj.weight": (kv, hidden), "self_attn.k_proj.bias": (kv,),
                "self_attn.v_proj.weight": (kv, hidden), "self_attn.v_proj.bias": (kv,),
                "self_attn.o_proj.weight": (hidden, a), "self_attn.kv_index": (heads,),
                "self_attn.head_gate.log_alpha": (heads,), "self_attn.head_gate.mask": (heads,),
                "mlp.gate_proj.weight": (units, hidden), "mlp.gate_proj.bias": (units,),
                "mlp.up_proj.weight": (units, hidden), "mlp.up_proj.bias": (units,),
                "mlp.down_proj.weight": (hidden, units), "mlp.unit_gate.log_alpha": (units,),
                "mlp.unit_gate.mask": (units,)}

    def layer_cost(self, sizes: Sizes, seq_len: int, heads: int, units: int, kv_heads: int | None = None):
        """(parameters, FLOPs of one sequence of ``seq_len`` tokens) of a layer: q/k/v/o projections and the
        three GLU projections (biases and Qwen3's two [head_dim] norms not counted), the two RMSNorms, and causal
        attention (each query against the keys up to it)."""
        e, d = sizes.hidden, sizes.head_dim
        kv = heads if kv_heads is None else kv_heads
        proj = e * d * (2 * heads + 2 * kv)
        params = proj + 3 * e * units + 2 * e
        flops = 2 * seq_len * (proj + 3 * e * units) + 2 * heads * seq_len * (seq_len + 1) * d
        return params, flops

    def check(self, model: nn.Module) -> None:
        impl = getattr(model.config, "_attn_implementation", None)
        if impl not in (None, "sdpa", "eager"):
            raise TypeError(f"structprune gates {type(model).__name__} with attn_implementation 'sdpa' or 'eager'; "
                            f"got {impl!r}")

    def owns_layer(self, layer: nn.Module) -> bool:
        return any(cls.__name__ in self.layer_classes for cls in type(layer).__mro__)

    @staticmethod
    def window(config, layer_idx: int) -> int:
        """The layer's sliding window (keys with ``q - k < window``), -1 for full attention."""
        window = getattr(config, "sliding_window", None)
        layer_types = getattr(config, "layer_types", None)
        if window is None or (layer_types is not None and layer_types[layer_idx] != "sliding_attention"):
            return -1
        return int(window)

    def ffn_block(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    def patch_layer(self, layer: nn.Module, config, sampling: bool) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        gated = GatedDecoderAttention(attn, self.window(config, attn.layer_idx), config, sampling=sampling)
        stash_hf_module(gated, attn, tuple(n for n in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")
                                           if getattr(attn, n, None) is not None))
        layer.self_attn = gated
        gated_mlp = GatedDecoderMLP(mlp.gate_proj, mlp.up_proj, mlp.down_proj, self.sizes(config).kernel_activation,
                                    sampling=sampling)
        stash_hf_module(gated_mlp, mlp, ("gate_proj", "up_proj", "down_proj"))
        layer.mlp = gated_mlp
        for name in _LAYER_NORMS:
            DecoderRMSNorm.swap(layer, name)

    def patch_model(self, model: nn.Module) -> None:
        head = getattr(model, "lm_head", None)
        if type(head) is nn.Linear:
            head.__class__ = DecoderLMHead
        DecoderRMSNorm.swap(getattr(model, "model", model), "norm")

    def unpatch_model(self, model: nn.Module) -> None:
        DecoderRMSNorm.unswap(getattr(model, "model", model), "norm")
        head = getattr(model, "lm_head", None)
        if type(head) is DecoderLMHead:
            head.__dict__.pop("_cast", None)
            head.__class__ = nn.Linear

    def unpatch_reason(self, parts) -> str | None:
        """HF's attention repeats each KV head for ``H / Hkv`` query heads: a layer whose kept groups are unequal
        cannot go back to it (save it with ``sp.save_pretrained``, which plain transformers loads)."""
        kept = parts.head_gate.kept_index()
        if kept.numel() == 0:
            return None
        counts = torch.bincount(parts.attention.kv_index.index_select(0, kept))
        counts = counts[counts > 0]
        if bool((counts != counts[0]).any()):
            return (f"its kept query heads per KV head are unequal ({counts.tolist()}); HF's attention needs equal "
                    "groups. Save the compacted model with sp.save_pretrained: plain transformers loads it with "
                    "trust_remote_code=True")
        return None

    def unpatch_layer(self, layer: nn.Module, config) -> None:
        gated = layer.self_attn
        groups = max(1, gated.num_heads // max(1, gated.num_kv_heads))
        modules = dict(q_proj=gated.q_proj, k_proj=gated.k_proj, v_proj=gated.v_proj, o_proj=gated.o_proj)
        if gated.q_norm is not None:
            modules.update(q_norm=gated.q_norm, k_norm=gated.k_norm)
        layer.self_attn = unstash_hf_module(gated, **modules)
        layer.self_attn.num_key_value_groups = groups
        mlp = layer.mlp
        layer.mlp = unstash_hf_module(mlp, gate_proj=mlp.gate_proj, up_proj=mlp.up_proj, down_proj=mlp.down_proj)
        for name in _LAYER_NORMS:
            DecoderRMSNorm.unswap(layer, name)


__all__ = ["DecoderFamily", "DecoderLMHead", "DecoderRMSNorm", "GatedDecoderAttention", "GatedDecoderMLP"]
