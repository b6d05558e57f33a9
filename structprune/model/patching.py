"""The in-place swap of a model's layers for gated ones, and the way back.

What a family's layers look like is its adapter's business (:mod:`structprune.model.families`); this module only
asks it. :func:`layer_parts` is how every other module reaches a patched layer's gates and projections.
"""
from __future__ import annotations

from torch import nn

from structprune.model.cofi import check_full_support, hidden_gate, install_hidden_gate
from structprune.model.families import Family, LayerParts, family_of, supported_model_types

SUPPORTED_MODEL_TYPES = supported_model_types()
_GATED_LAYER_CLASSES: dict[type, type] = {}


class NotPatchedError(RuntimeError):
    """Raised when an API that needs gated layers is given a model that was not patched."""


class PatchedLayer:
    """Marks the class of a patched layer (a subclass of the HF layer class made by :func:`patch`)."""

    _structprune_original: type  # the HF layer class
    _structprune_family: Family  # the adapter that patched it


def check_supported(model: nn.Module) -> None:
    family_of(model)


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ``ModuleList`` of transformer layers of a supported model (bare or with any task head)."""
    return family_of(model).layers(model)


def is_patched(model: nn.Module) -> bool:
    try:
        layers = encoder_layers(model)
    except TypeError:
        return False
    return len(layers) > 0 and all(isinstance(layer, PatchedLayer) for layer in layers)


def gated_layers(model: nn.Module) -> nn.ModuleList:
    """The encoder layers of a patched model; a clear error if it was not patched."""
    layers = encoder_layers(model)
    if not is_patched(model):
        raise NotPatchedError(f"{type(model).__name__} is not patched: call structprune.patch(model) first")
    return layers


def layer_parts(model: nn.Module) -> list[LayerParts]:
    """Uniform access to each patched layer's gates and projections (see :class:`~structprune.model.families.LayerParts`)."""
    family = family_of(model)
    return [family.parts(layer) for layer in gated_layers(model)]


def _gated_layer_class(cls: type, family: Family) -> type:
    if cls not in _GATED_LAYER_CLASSES:
        name = f"Gated{cls.__name__}"
        bases = (family.layer_mixin, PatchedLayer, cls) if family.layer_mixin else (PatchedLayer, cls)
        gated = type(name, bases, {"__module__": __name__, "_structprune_original": cls,
                                    "_structprune_family": family})
        globals()[name] = gated  # importable by name, so patched models pickle and deepcopy
        _GATED_LAYER_CLASSES[cls] = gated
    return _GATED_LAYER_CLASSES[cls]


def patch(model: nn.Module, sampling: bool = False, sublayers: bool = False, hidden: bool = False) -> nn.Module:
    """Give every encoder layer gated attention and a gated FFN, in place; returns ``model``.

    Right after patching every gate is open and the model computes what it computed before.
    ``sampling=True`` makes the hard-concrete gates sample in training mode (L0 pruning);
    see :func:`structprune.set_gate_sampling`. ``sublayers=True`` adds one gate per whole attention and FFN
    sublayer, ``hidden=True`` one gate per hidden dimension shared by every layer (CoFi's structures; BERT layout;
    see :mod:`structprune.model.cofi`).
    """
    family = family_of(model)
    layers = family.layers(model)
    if any(isinstance(layer, PatchedLayer) for layer in layers):
        raise RuntimeError(f"{type(model).__name__} is already patched by structprune")
    family.sizes(model.config).kernel_activation  # an unsupported activation is refused before any change
    if sublayers or hidden:
        check_full_support(model, family, hidden)
    for layer in layers:
        device = next(layer.parameters()).device
        if sublayers:
            family.patch_layer(layer, model.config, sampling, sublayers=True)
        else:
            family.patch_layer(layer, model.config, sampling)
        layer.__class__ = _gated_layer_class(type(layer), family)
        layer.to(device=device)  # the new gates
        layer.train(layer.training)  # the new modules in the layer's mode
    if hidden:
        install_hidden_gate(model, family, layers, sampling).train(model.training)
    family.patch_model(model)
    return model


def set_gate_sampling(model: nn.Module, sampling: bool = True) -> None:
    """Switch every gate between hard-concrete sampling in training (True) and deterministic (False)."""
    for gate in iter_gates(model):
        gate.sampling = sampling


def iter_gates(model: nn.Module):
    """Every gate of a patched model: per layer, the head gate, the FFN unit gate and the sublayer gates (where
    installed); then the hidden-dimension gate (where installed)."""
    for parts in layer_parts(model):
        yield from parts.all_gates
    gate = hidden_gate(model)
    if gate is not None:
        yield gate


def gate_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The ``log_alpha`` parameters of all gates (for a separate optimizer group)."""
    return [gate.log_alpha for gate in iter_gates(model)]
