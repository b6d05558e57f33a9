"""What a model-family adapter is: the one place that knows a Hugging Face family's attribute names.

An adapter (a :class:`Family`) says where the encoder layers are, which config keys hold the sizes, how to
swap a layer's attention and FFN for gated modules (and back), and where, inside a patched layer, the pieces
every other module works on are: the per-head and per-unit gates and the six projections. Masks, compaction,
save/load, summaries, strategies and the latency model ask the adapter through :class:`LayerParts` and
:class:`Sizes`, never through HF attribute names.
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass

import torch
from torch import nn

from structprune.ops.activations import HF_ACTIVATIONS
from structprune.ops.reference import attention_flops, ffn_flops

# The roles of a patched layer's pieces (see Family.paths).
LINEAR_ROLES = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")
ROLES = LINEAR_ROLES + ("attention", "ffn", "head_gate", "unit_gate")


@dataclass(frozen=True)
class Sizes:
    """A model's original sizes, read from its config by its family."""

    hidden: int
    heads: int
    intermediate: int
    layers: int
    activation: str  # the HF name, e.g. "gelu"
    kv_heads: int | None = None  # grouped-query attention: the KV heads (None: one per head, no KV sharing)
    explicit_head_dim: int | None = None  # a config's own ``head_dim`` (decoders), else hidden // heads

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim or self.hidden // self.heads

    @property
    def kernel_activation(self) -> str:
        """The activation's name in structprune's kernels (one of :data:`structprune.ops.activations.ACTIVATIONS`)."""
        act = self.activation
        if not isinstance(act, str) or act not in HF_ACTIVATIONS:
            raise ValueError(f"hidden activation {act!r} is not supported; expected one of {sorted(HF_ACTIVATIONS)}")
        return HF_ACTIVATIONS[act]


class LayerParts:
    """Uniform access to one patched layer's gated pieces, whatever its family calls them.

    ``parts["query"]`` is the query ``nn.Linear``; ``parts.replace("query", new)`` swaps it; ``head_gate`` /
    ``unit_gate`` are the layer's :class:`~structprune.model.gates.HardConcreteGate`; ``attention`` is the gated
    attention module (``num_heads``, ``head_dim``)."""

    def __init__(self, layer: nn.Module, paths: dict[str, str], family: "Family | None" = None):
        self.layer = layer
        self._paths = paths
        self.family = family  # for its slicing hooks (Family.fused_qkv, Family.unit_rows)

    def __getitem__(self, role: str) -> nn.Module:
        return operator.attrgetter(self._paths[role])(self.layer)

    def get(self, role: str):
        """The piece at ``role``, or None where this family or layer has none (e.g. no sublayer gates)."""
        if role not in self._paths:
            return None
        try:
            return self[role]
        except AttributeError:
            return None

    @property
    def attention_block(self) -> nn.Module:
        """The module holding the whole attention sublayer (projections, residual, LayerNorm)."""
        return self["attention_block"]

    @property
    def all_gates(self) -> tuple:
        """Every gate of the layer: head, FFN unit, and the two whole-sublayer gates where installed."""
        subs = tuple(g for g in (self.get("attn_sublayer_gate"), self.get("ffn_sublayer_gate")) if g is not None)
        return self.gates + subs

    def replace(self, role: str, module: nn.Module) -> None:
        parent, _, name = self._paths[role].rpartition(".")
        setattr(operator.attrgetter(parent)(self.layer) if parent else self.layer, name, module)

    @property
    def attention(self) -> nn.Module:
        return self["attention"]

    @property
    def head_gate(self):
        return self["head_gate"]

    @property
    def unit_gate(self):
        return self["unit_gate"]

    @property
    def gates(self) -> tuple:
        """(head gate, FFN unit gate)."""
        return self.head_gate, self.unit_gate

    @property
    def num_heads(self) -> int:
        return self.attention.num_heads

    @property
    def head_dim(self) -> int:
        return self.attention.head_dim

    @property
    def device(self):
        return self["query"].weight.device

    @property
    def kv_index(self) -> torch.Tensor | None:
        """Grouped-query attention: the KV head of each query head (the attention's ``kv_index``), else None."""
        return getattr(self.attention, "kv_index", None) if self.family is not None and self.family.grouped_kv \
            else None

    @property
    def num_kv_heads(self) -> int:
        """The layer's KV heads (its query heads where each has its own)."""
        return self.attention.num_kv_heads if self.kv_index is not None else self.num_heads


class Family:
    """A model-family adapter. Subclasses set the class attributes and implement the layer swap.

    Attributes:
        name: a short name ("bert", "distilbert").
        model_types: the ``config.model_type`` values it handles.
        class_prefixes: ``model_type`` -> the prefix of its transformers classes ("Bert", "XLMRoberta").
        layers_path: where the layer list is, from the base model ("encoder.layer").
        config_keys: size name (hidden, heads, intermediate, layers, activation) -> config attribute.
        paths: role (:data:`ROLES`) -> attribute path inside a PATCHED layer.
    """

    name: str = ""
    model_types: tuple[str, ...] = ()
    class_prefixes: dict[str, str] = {}
    layers_path: str = ""
    config_keys: dict[str, str] = {}
    paths: dict[str, str] = {}
    layer_classes: tuple[str, ...] = ()  # the HF layer class names; default: each class prefix + "Layer"
    ffn_block_name: str = ""  # the layer attribute (method or module) computing the FFN half, for profilers

    def ffn_block(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The FFN half of ``layer`` on the attention half's output ``hidden``: the gated (or plain) FFN, its
        residual and its norm, as the layer's own forward computes them."""
        raise NotImplementedError

    def owns_layer(self, layer: nn.Module) -> bool:
        """Whether ``layer`` (plain or patched) is a layer of this family."""
        names = set(self.layer_classes) or {prefix + "Layer" for prefix in self.class_prefixes.values()}
        return any(cls.__name__ in names for cls in type(layer).__mro__)

    def sizes(self, config) -> Sizes:
        """The original sizes in a config (a transformers config object or its ``config.json`` dict)."""
        get = config.get if isinstance(config, dict) else lambda key: getattr(config, key)
        return Sizes(**{size: get(key) for size, key in self.config_keys.items()})

    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The ``ModuleList`` of transformer layers (bare model or any task head)."""
        base = getattr(model, "base_model", model)
        try:
            return operator.attrgetter(self.layers_path)(base)
        except AttributeError as exc:
            raise TypeError(f"{type(model).__name__} has no {self.layers_path} list; is it a {self.name} model?") from exc

    def parts(self, layer: nn.Module) -> LayerParts:
        return LayerParts(layer, self.paths, self)

    def shallower_config(self, config, keep: list[int]):
        """A copy of ``config`` for the same model holding only the layers ``keep`` (indices into this config's
        layers, ascending), as :func:`structprune.model.layer_drop.drop_layers` builds it; families with per-layer
        settings (ModernBERT's layer types) keep the kept layers' own."""
        config = copy.deepcopy(config)
        setattr(config, self.config_keys["layers"], len(keep))
        return config

    # --- slicing hooks (compaction, loading): how heads and units map to rows of the input projections -------------
    fused_qkv: bool = False  # query/key/value are three row blocks of one nn.Linear at paths["qkv"] (ModernBERT)
    ffn_in_roles: tuple[str, ...] = ("ffn_in",)  # the FFN input projections whose rows the units own (split GLU: 2)
    grouped_kv: bool = False  # key/value hold KV heads shared by query heads (the attention's ``kv_index``)

    # --- sublayer and hidden-dimension gates (structprune.model.cofi); empty: the family does not support them ----
    embeddings: str = ""  # the embeddings module, from the base model
    embedding_tables: tuple[str, ...] = ()  # its nn.Embedding attributes (their columns are hidden dimensions)
    embedding_norm: str = ""  # its LayerNorm attribute
    hidden_readers: tuple[str, ...] = ()  # linear layers after the encoder reading the hidden states (model or base)

    def reader_paths(self, model: nn.Module) -> tuple[str, ...]:
        """The :attr:`hidden_readers` that read the hidden states in ``model`` (its task head)."""
        return self.hidden_readers

    def unit_rows(self, units: torch.Tensor, n_units: int) -> torch.Tensor:
        """The rows of the FFN input projection that FFN units ``units`` own, in a layer of ``n_units`` units: the
        units themselves here; a GLU family's ``(u, u + n_units)`` pairs."""
        return units

    def layer_shapes(self, hidden: int, head_dim: int, heads: int, units: int, kv_heads: int | None = None) -> dict:
        """Tensor name inside a layer -> the shape a save with ``heads`` heads and ``units`` FFN units (and
        ``kv_heads`` KV heads, grouped-query families) gives it."""
        a = heads * head_dim
        p = self.paths
        shapes = {f"{p[r]}.weight": (a, hidden) for r in ("query", "key", "value")}
        shapes.update({f"{p[r]}.bias": (a,) for r in ("query", "key", "value")})
        shapes.update({f"{p['head_gate']}.log_alpha": (heads,), f"{p['head_gate']}.mask": (heads,),
                       f"{p['attn_out']}.weight": (hidden, a), f"{p['ffn_in']}.weight": (units, hidden),
                       f"{p['ffn_in']}.bias": (units,), f"{p['unit_gate']}.log_alpha": (units,),
                       f"{p['unit_gate']}.mask": (units,), f"{p['ffn_out']}.weight": (hidden, units)})
        return shapes

    def layer_cost(self, sizes: Sizes, seq_len: int, heads: int, units: int, kv_heads: int | None = None,
                   hidden: int | None = None, attention_kept: bool = True, ffn_kept: bool = True):
        """(parameters, FLOPs of one sequence of ``seq_len`` tokens) of a layer keeping ``heads`` heads and
        ``units`` FFN units: an encoder layer's q/k/v/o projections, biases, two LayerNorms, FFN; at the hidden width
        ``hidden`` (default: the model's), without the sublayers not kept (CoFi's structures)."""
        hidden = sizes.hidden if hidden is None else hidden
        inner = heads * sizes.head_dim
        attention = (4 * hidden * inner + 3 * inner + 3 * hidden, attention_flops(1, seq_len, hidden, heads,
                                                                                 sizes.head_dim))
        ffn = (2 * hidden * units + units + 3 * hidden, ffn_flops(1, seq_len, hidden, units))
        return (attention[0] * attention_kept + ffn[0] * ffn_kept, attention[1] * attention_kept + ffn[1] * ffn_kept)

    def unpatch_reason(self, parts: LayerParts) -> str | None:
        """Why a patched layer cannot go back to plain HF modules (checked for every layer before any change), or
        None."""
        return None

    def check(self, model: nn.Module) -> None:
        """Raise a TypeError for a configuration of this family that structprune does not gate (decoders)."""
        config = model.config
        if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
            raise TypeError(f"{type(model).__name__} is configured as a decoder (is_decoder/add_cross_attention); "
                            "structprune gates bidirectional encoders only")

    def patch_layer(self, layer: nn.Module, config, sampling: bool, sublayers: bool = False) -> None:
        """Swap one HF layer's attention and FFN for gated modules holding the same ``nn.Linear`` objects;
        ``sublayers``: with a gate on each whole sublayer (families with :attr:`embeddings` set)."""
        raise NotImplementedError

    def unpatch_layer(self, layer: nn.Module, config) -> None:
        """Put plain HF modules back in a patched layer, holding its current (possibly compacted) linears."""
        raise NotImplementedError

    def patch_model(self, model: nn.Module) -> None:
        """Model-level changes besides the layers (after they are patched); none by default."""

    def unpatch_model(self, model: nn.Module) -> None:
        """Undo :meth:`patch_model`."""

    layer_mixin: type | None = None  # mixed into a patched layer's class (overrides of the HF layer's methods)
