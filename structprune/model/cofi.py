"""The structures beyond heads and FFN units (CoFi, Xia, Zhong & Chen 2022): whole attention and FFN sublayers,
and the hidden dimensions shared by every layer. See :mod:`structprune.model.hidden` for what a hidden gate
computes, and the family adapters for the sublayer gates (``parts["attn_sublayer_gate"]``).

``structprune.patch(model, sublayers=True, hidden=True)`` installs them; this module finds them again.
"""
from __future__ import annotations

import operator

from torch import nn

from structprune.model.families import Family, family_of
from structprune.model.gates import SharedGate
from structprune.model.hidden import HiddenGatedLayerNorm

SUBLAYER_ROLES = {"attn_sublayers": "attn_sublayer_gate", "ffn_sublayers": "ffn_sublayer_gate"}


def check_full_support(model: nn.Module, family: Family, hidden: bool) -> None:
    """A TypeError saying what is supported unless ``model`` can take sublayer (and, with ``hidden``,
    hidden-dimension) gates."""
    if not family.embeddings:
        raise TypeError(f"sublayer and hidden-dimension gates are implemented for the BERT layout (bert, roberta, "
                        f"electra, xlm-roberta) and DistilBERT; {family.name} models take head and FFN-unit gates "
                        "only")
    if hidden and hasattr(getattr(model, "base_model", model), "embeddings_project"):
        raise TypeError("hidden-dimension gates need the embeddings to write the hidden states themselves; this model "
                        "projects them (ELECTRA with embedding_size != hidden_size), which is not supported")
    if hidden:
        known = {path.split(".")[0] for path in family.hidden_readers}
        base = getattr(model, "base_model_prefix", "")
        bare = getattr(model, "base_model", model) is model
        other = [] if bare else [name for name, child in model.named_children()
                                 if name != base and name not in known and any(True for _ in child.parameters())]
        if other:
            raise TypeError(f"hidden-dimension gates need every task head to read the hidden states through a linear "
                            f"layer ({', '.join(family.hidden_readers)}); {type(model).__name__} also has {other} "
                            "(a language-modelling head, tied to the embeddings, cannot be sliced)")


def embeddings_of(model: nn.Module, family: Family) -> nn.Module:
    return operator.attrgetter(family.embeddings)(getattr(model, "base_model", model))


def hidden_gate(model: nn.Module) -> SharedGate | None:
    """The model's hidden-dimension gate, or None."""
    family = family_of(model)
    if not family.embeddings:
        return None
    try:
        embeddings = embeddings_of(model, family)
    except AttributeError:  # layers without their model (a benchmark's single layer): no hidden gate
        return None
    return getattr(embeddings, "hidden_gate", None)


def hidden_readers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(path from ``model``, module) of every linear layer after the encoder that reads the hidden states."""
    family = family_of(model)
    base = getattr(model, "base_model", model)
    prefix = getattr(model, "base_model_prefix", "")
    out = []
    for path in family.reader_paths(model):
        for root, where in ((model, path), (base, f"{prefix}.{path}" if base is not model else path)):
            try:
                module = operator.attrgetter(path)(root)
            except AttributeError:
                continue
            if isinstance(module, nn.Linear) and where not in {p for p, _ in out}:
                out.append((where, module))
    return out


def install_hidden_gate(model: nn.Module, family: Family, layers, sampling: bool) -> SharedGate:
    """Give ``model`` a hidden-dimension gate: on its embeddings, read by the embedding LayerNorm (which draws each
    forward pass's sample), by every layer's two LayerNorms and by the sublayers' output scaling."""
    embeddings = embeddings_of(model, family)
    norm = getattr(embeddings, family.embedding_norm)
    device = norm.weight.device
    gate = SharedGate(norm.normalized_shape[0], sampling=sampling).to(device)
    embeddings.hidden_gate = gate
    setattr(embeddings, family.embedding_norm, HiddenGatedLayerNorm(norm, gate, first=True))
    for layer in layers:
        parts = family.parts(layer)
        for role in ("attn_norm", "ffn_norm"):
            parts.replace(role, HiddenGatedLayerNorm(parts[role], gate))
        parts.attention_block.__dict__["hidden_gate"] = gate
    return gate


def sublayer_gates(model: nn.Module, which: str) -> list:
    """Per layer, the whole-sublayer gate of ``which`` ("attn_sublayers" or "ffn_sublayers"); None where absent."""
    role = SUBLAYER_ROLES[which]
    family = family_of(model)
    return [family.parts(layer).get(role) for layer in family.layers(model)]


__all__ = ["hidden_gate", "hidden_readers", "install_hidden_gate", "sublayer_gates", "check_full_support",
           "SUBLAYER_ROLES"]
