"""Model-family adapters: where BERT and RoBERTa keep their encoder layers, and the in-place swap.

This is the only module that knows Hugging Face attribute names.
"""
from __future__ import annotations

from torch import nn

from .modules import GatedAttention, GatedIntermediate, GatedLayerMixin, GatedSelfAttention

SUPPORTED_MODEL_TYPES = ("bert", "roberta")
_HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
_GATED_LAYER_CLASSES: dict[type, type] = {}


class NotPatchedError(RuntimeError):
    """Raised when an API that needs gated layers is given a model that was not patched."""


def _model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def check_supported(model: nn.Module) -> None:
    model_type = _model_type(model)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise TypeError(f"structprune supports Hugging Face models of type {SUPPORTED_MODEL_TYPES} "
                        f"(e.g. BertForQuestionAnswering, RobertaModel); got {type(model).__name__} "
                        f"with model_type={model_type!r}")
    config = model.config
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise TypeError(f"{type(model).__name__} is configured as a decoder (is_decoder/add_cross_attention); "
                        "structprune gates bidirectional encoders only")


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ``ModuleList`` of transformer layers of a supported model (bare or with any task head)."""
    check_supported(model)
    base = getattr(model, "base_model", model)
    try:
        return base.encoder.layer
    except AttributeError as exc:
        raise TypeError(f"{type(model).__name__} has no encoder.layer list; is it a BERT/RoBERTa model?") from exc


def is_patched(model: nn.Module) -> bool:
    try:
        layers = encoder_layers(model)
    except TypeError:
        return False
    return len(layers) > 0 and all(isinstance(layer, GatedLayerMixin) for layer in layers)


def gated_layers(model: nn.Module) -> nn.ModuleList:
    """The encoder layers of a patched model; a clear error if it was not patched."""
    layers = encoder_layers(model)
    if not is_patched(model):
        raise NotPatchedError(f"{type(model).__name__} is not patched: call structprune.patch(model) first")
    return layers


def _gated_layer_class(cls: type) -> type:
    if cls not in _GATED_LAYER_CLASSES:
        name = f"Gated{cls.__name__}"
        gated = type(name, (GatedLayerMixin, cls), {"__module__": __name__})
        globals()[name] = gated  # importable by name, so patched models pickle and deepcopy
        _GATED_LAYER_CLASSES[cls] = gated
    return _GATED_LAYER_CLASSES[cls]


def _activation_name(config) -> str:
    act = config.hidden_act
    if not isinstance(act, str) or act not in _HF_ACTIVATIONS:
        raise ValueError(f"hidden_act={act!r} is not supported; expected one of {sorted(_HF_ACTIVATIONS)}")
    return _HF_ACTIVATIONS[act]


def patch(model: nn.Module, sampling: bool = False) -> nn.Module:
    """Give every encoder layer gated attention and a gated FFN, in place; returns ``model``.

    Right after patching every gate is open and the model computes what it computed before.
    ``sampling=True`` makes the hard-concrete gates sample in training mode (L0 pruning);
    see :func:`structprune.set_gate_sampling`.
    """
    layers = encoder_layers(model)
    if is_patched(model) or any(isinstance(layer, GatedLayerMixin) for layer in layers):
        raise RuntimeError(f"{type(model).__name__} is already patched by structprune")
    config = model.config
    activation = _activation_name(config)
    for layer in layers:
        attention = layer.attention
        self_attn = attention.self
        head_dim = self_attn.attention_head_size
        num_heads = self_attn.query.out_features // head_dim
        gated_self = GatedSelfAttention(self_attn.query, self_attn.key, self_attn.value, num_heads, head_dim,
                                        sampling=sampling)
        layer.attention = GatedAttention(gated_self, attention.output, config)
        layer.intermediate = GatedIntermediate(layer.intermediate.dense, activation, sampling=sampling)
        layer.__class__ = _gated_layer_class(type(layer))
        for new in (layer.attention, layer.intermediate):
            new.to(device=self_attn.query.weight.device)
            new.train(layer.training)
    return model


def set_gate_sampling(model: nn.Module, sampling: bool = True) -> None:
    """Switch every gate between hard-concrete sampling in training (True) and deterministic (False)."""
    for gate in iter_gates(model):
        gate.sampling = sampling


def iter_gates(model: nn.Module):
    """Every gate of a patched model: per layer, the head gate then the FFN unit gate."""
    for layer in gated_layers(model):
        yield layer.attention.self.head_gate
        yield layer.intermediate.unit_gate


def gate_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The ``log_alpha`` parameters of all gates (for a separate optimizer group)."""
    return [gate.log_alpha for gate in iter_gates(model)]
