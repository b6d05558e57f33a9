"""The ModernBERT layout (``model_type`` "modernbert"; every task head transformers has for it).

A layer is ``layers[i]`` with ``attn.Wqkv`` (one fused projection: rows ``[0, A)`` queries, ``[A, 2A)`` keys,
``[2A, 3A)`` values, ``A = heads * head_dim``), ``attn.Wo``, ``mlp.Wi`` (a GLU: rows ``[0, I)`` the input half,
``[I, 2I)`` the gate half, so FFN unit ``u`` owns the row pair ``(u, u + I)``) and ``mlp.Wo``; biases are
optional (``attention_bias`` / ``mlp_bias``, off by default). Rotary positions come from the model
(``position_embeddings``, each layer type with its own theta), and ``config.layer_types[i]`` says whether a layer
is global ("full_attention") or local ("sliding_attention": keys within ``|q - k| <= config.sliding_window``, which
is ``local_attention // 2``).

Masks: transformers 5 runs ModernBERT padded (no unpadding) with ``attn_implementation`` "sdpa" or "eager"; the
model builds one mask per layer type (the local one already banded) and the gated attention passes it on, so the
reference computes exactly what HF's layer computes, and a kernel backend gets the key padding row plus the window.
"flash_attention_2" (unpadded varlen) is refused at patch time.
"""
from __future__ import annotations

import torch
from torch import nn

from structprune.model.families.base import Family, LayerParts
from structprune.model.gates import HardConcreteGate
from structprune.model.modules import gate_values, stash_hf_module, unstash_hf_module
from structprune.ops import dispatch as ops
from structprune.ops.activations import check_activation
from structprune.ops.reference import activation_fn

_QKV = ("query", "key", "value")


class QKVBlock:
    """One row block (query, key or value) of a fused QKV ``nn.Linear``, viewed as a linear of its own: ``weight``
    and ``bias`` are views of the fused parameters (read-only role: compaction slices the fused matrix)."""

    def __init__(self, fused: nn.Linear, block: int, width: int):
        self.fused, self.block, self.width = fused, block, width

    @property
    def weight(self) -> torch.Tensor:
        return self.fused.weight[self.block * self.width:(self.block + 1) * self.width]

    @property
    def bias(self) -> torch.Tensor | None:
        b = self.fused.bias
        return None if b is None else b[self.block * self.width:(self.block + 1) * self.width]

    @property
    def in_features(self) -> int:
        return self.fused.in_features

    @property
    def out_features(self) -> int:
        return self.width


class FusedQKVParts(LayerParts):
    """:class:`LayerParts` whose ``query``/``key``/``value`` are row blocks of the fused ``qkv`` linear."""

    def __getitem__(self, role: str):
        if role in _QKV:
            fused = super().__getitem__("qkv")
            return QKVBlock(fused, _QKV.index(role), fused.out_features // 3)
        return super().__getitem__(role)

    def replace(self, role: str, module: nn.Module) -> None:
        if role in _QKV:
            raise TypeError(f"{role!r} is a row block of the fused 'qkv' projection: replace 'qkv' instead")
        super().replace(role, module)


class GatedRotaryAttention(nn.Module):
    """Drop-in for ``ModernBertAttention``: fused QKV, rotary positions, global or sliding-window attention, one
    gate per head, the output projection and its dropout; holds HF's very ``Wqkv`` and ``Wo``."""

    def __init__(self, Wqkv: nn.Linear, Wo: nn.Linear, out_drop: nn.Module, num_heads: int, head_dim: int,
                 window: int, config, sampling: bool = False):
        super().__init__()
        if Wqkv.out_features != 3 * num_heads * head_dim:
            raise ValueError(f"Wqkv has {Wqkv.out_features} outputs, expected 3 * num_heads * head_dim = "
                             f"3 * {num_heads} * {head_dim}")
        self.Wqkv, self.Wo, self.out_drop = Wqkv, Wo, out_drop
        self.num_heads, self.head_dim, self.window = num_heads, head_dim, window
        self.config = config
        self.attention_dropout = float(getattr(config, "attention_dropout", 0.0))
        self.head_gate = HardConcreteGate(num_heads, sampling=sampling)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, window={self.window}"

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, **kwargs):
        cos, sin = position_embeddings
        gates, active = gate_values(self.head_gate)
        a = self.num_heads * self.head_dim
        w, b = self.Wqkv.weight, self.Wqkv.bias
        bq, bk, bv = (None, None, None) if b is None else (b[:a], b[a:2 * a], b[2 * a:])
        impl = "eager" if getattr(self.config, "_attn_implementation", "sdpa") == "eager" else "sdpa"
        out = ops.gated_rotary_attention(
            hidden_states, w[:a], bq, w[a:2 * a], bk, w[2 * a:], bv, self.Wo.weight, self.Wo.bias, gates, active,
            self.num_heads, cos, sin, window=self.window, attn_mask=attention_mask,
            dropout_p=self.attention_dropout if self.training else 0.0, impl=impl)
        return self.out_drop(out), None


class GatedGLUMLP(nn.Module):
    """Drop-in for ``ModernBertMLP``: ``Wo(drop(act(x Wi_a) * (x Wi_b) * gate))``, one gate per unit (a row pair
    of ``Wi`` and a column of ``Wo``); holds HF's very ``Wi`` and ``Wo``."""

    def __init__(self, Wi: nn.Linear, Wo: nn.Linear, drop: nn.Module, activation: str, sampling: bool = False):
        super().__init__()
        check_activation(activation)
        self.Wi, self.Wo, self.drop = Wi, Wo, drop
        self.activation = activation
        self.unit_gate = HardConcreteGate(Wo.in_features, sampling=sampling)

    def extra_repr(self) -> str:
        return f"units={self.Wo.in_features}, activation={self.activation}"

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        gates, kept = gate_values(self.unit_gate)
        if self.training and getattr(self.drop, "p", 0.0) > 0.0:  # dropout sits inside the FFN: not one op
            a, g = self.Wi(hidden_states).chunk(2, dim=-1)
            h = activation_fn(self.activation)(a) * g * gates.to(hidden_states.dtype)
            return self.Wo(self.drop(h))
        return ops.gated_glu_ffn(hidden_states, self.Wi.weight, self.Wi.bias, self.Wo.weight, self.Wo.bias, gates,
                                 kept, self.activation)


class ModernBertFamily(Family):
    name = "modernbert"
    model_types = ("modernbert",)
    class_prefixes = {"modernbert": "ModernBert"}
    layers_path = "layers"
    layer_classes = ("ModernBertEncoderLayer",)
    config_keys = {"hidden": "hidden_size", "heads": "num_attention_heads", "intermediate": "intermediate_size",
                   "layers": "num_hidden_layers", "activation": "hidden_activation"}
    paths = {"attention": "attn", "qkv": "attn.Wqkv", "attn_out": "attn.Wo", "ffn": "mlp", "ffn_in": "mlp.Wi",
             "ffn_out": "mlp.Wo", "head_gate": "attn.head_gate", "unit_gate": "mlp.unit_gate"}
    fused_qkv = True
    ffn_block_name = "mlp"

    def parts(self, layer: nn.Module) -> LayerParts:
        return FusedQKVParts(layer, self.paths, self)

    def unit_rows(self, units: torch.Tensor, n_units: int) -> torch.Tensor:
        return torch.cat([units, units + n_units])

    def shallower_config(self, config, keep: list[int]):
        layer_types = [config.layer_types[i] for i in keep]  # each kept layer stays global or local
        config = super().shallower_config(config, keep)
        config.layer_types = layer_types
        return config

    def layer_shapes(self, hidden: int, head_dim: int, heads: int, units: int, kv_heads: int | None = None) -> dict:
        a = heads * head_dim
        return {"attn.Wqkv.weight": (3 * a, hidden), "attn.Wqkv.bias": (3 * a,), "attn.Wo.weight": (hidden, a),
                "attn.head_gate.log_alpha": (heads,), "attn.head_gate.mask": (heads,),
                "mlp.Wi.weight": (2 * units, hidden), "mlp.Wi.bias": (2 * units,), "mlp.Wo.weight": (hidden, units),
                "mlp.unit_gate.log_alpha": (units,), "mlp.unit_gate.mask": (units,)}

    def ffn_block(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + layer.mlp(layer.mlp_norm(hidden))

    def check(self, model: nn.Module) -> None:
        super().check(model)
        impl = getattr(model.config, "_attn_implementation", None)
        if impl not in (None, "sdpa", "eager"):
            raise TypeError(f"structprune gates ModernBERT with attn_implementation 'sdpa' or 'eager' (the padded "
                            f"path); got {impl!r}")

    @staticmethod
    def window(config, layer: nn.Module) -> int:
        """The layer's sliding window (keys within ``|q - k| <= window``), -1 for a global layer."""
        layer_type = config.layer_types[layer.layer_idx]
        return int(config.sliding_window) if layer_type == "sliding_attention" else -1

    def patch_layer(self, layer: nn.Module, config, sampling: bool) -> None:
        attn, mlp = layer.attn, layer.mlp
        head_dim = attn.head_dim
        gated = GatedRotaryAttention(attn.Wqkv, attn.Wo, attn.out_drop, attn.Wqkv.out_features // (3 * head_dim),
                                     head_dim, self.window(config, layer), config, sampling=sampling)
        stash_hf_module(gated, attn, ("Wqkv", "Wo"))
        layer.attn = gated
        gated_mlp = GatedGLUMLP(mlp.Wi, mlp.Wo, mlp.drop, self.sizes(config).kernel_activation, sampling=sampling)
        stash_hf_module(gated_mlp, mlp, ("Wi", "Wo"))
        layer.mlp = gated_mlp

    def unpatch_layer(self, layer: nn.Module, config) -> None:
        layer.attn = unstash_hf_module(layer.attn, Wqkv=layer.attn.Wqkv, Wo=layer.attn.Wo)
        layer.mlp = unstash_hf_module(layer.mlp, Wi=layer.mlp.Wi, Wo=layer.mlp.Wo)
