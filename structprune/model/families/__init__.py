"""Model-family adapters (see :mod:`structprune.model.families.base`), found by ``config.model_type``.

Adding a family is one module with a :class:`~structprune.model.families.base.Family` subclass, registered here with
:func:`register_family`.
"""
from __future__ import annotations

from torch import nn

from structprune.model.families.base import LINEAR_ROLES, ROLES, Family, LayerParts, Sizes
from structprune.model.families.bert import BertFamily
from structprune.model.families.decoder import DecoderFamily
from structprune.model.families.distilbert import DistilBertFamily
from structprune.model.families.modernbert import ModernBertFamily

_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Make ``family`` the adapter of each of its ``model_types``; returns it."""
    for model_type in family.model_types:
        _FAMILIES[model_type] = family
    return family


for _family in (BertFamily(), DistilBertFamily(), ModernBertFamily(), DecoderFamily()):
    register_family(_family)


def supported_model_types() -> tuple[str, ...]:
    return tuple(_FAMILIES)


def family_for_type(model_type: str | None) -> Family:
    """The adapter of ``model_type``; a TypeError naming the supported types otherwise."""
    family = _FAMILIES.get(model_type)  # type: ignore[arg-type]
    if family is None:
        raise TypeError(f"structprune supports Hugging Face models of type {supported_model_types()}; got "
                        f"model_type={model_type!r}")
    return family


def family_of(model: nn.Module) -> Family:
    """The adapter of a model (bare or with a task head), from its ``config.model_type``; a TypeError (naming
    the supported types and the class that came) for an unsupported model or a decoder configuration."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        family = family_for_type(model_type)
    except TypeError:
        raise TypeError(f"structprune supports Hugging Face models of type {supported_model_types()} (e.g. "
                        f"BertForQuestionAnswering, DistilBertModel); got {type(model).__name__} with "
                        f"model_type={model_type!r}") from None
    family.check(model)
    return family


def family_of_layer(layer: nn.Module) -> Family:
    """The family of a transformer layer (plain or patched), from its class."""
    for family in dict.fromkeys(_FAMILIES.values()):
        if family.owns_layer(layer):
            return family
    raise TypeError(f"{type(layer).__name__} is not a layer of a supported family "
                    f"({', '.join(sorted({f.name for f in _FAMILIES.values()}))})")


def sizes_of(model: nn.Module) -> Sizes:
    """A supported model's original sizes (its config's; compaction does not change them)."""
    return family_of(model).sizes(model.config)


__all__ = ["Family", "LayerParts", "Sizes", "ROLES", "LINEAR_ROLES", "register_family", "family_of", "family_for_type",
           "sizes_of", "supported_model_types", "BertFamily", "DistilBertFamily", "ModernBertFamily", "DecoderFamily"]
