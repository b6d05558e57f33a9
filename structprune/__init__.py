"""structprune: structured pruning of BERT-family models with gated heads and FFN units.

    import structprune as sp
    sp.patch(model); sp.set_masks(model, heads=H, ffn=F); small = sp.compact(model)
"""
__version__ = "0.1.0"

from . import distill, strategies  # noqa: F401  (sp.strategies, sp.distill)
from .compaction import compact
from .gates import HardConcreteGate
from .io import from_pretrained, save_pretrained
from .masks import Masks, get_masks, set_masks
from .families import family_of, register_family
from .families.bert import GatedAttention
from .modules import GatedIntermediate, GatedSelfAttention
from .ops import (available_backends, clear_cache, fallback_reasons, get_backend, last_backends, set_backend,
                  use_backend)
from .patching import (SUPPORTED_MODEL_TYPES, NotPatchedError, gate_parameters, is_patched, iter_gates, patch,
                       set_gate_sampling, unpatch)
from .summary import Summary, summary

__all__ = [
    "patch", "unpatch", "is_patched", "set_masks", "get_masks", "Masks", "compact", "save_pretrained", "from_pretrained",
    "summary", "Summary", "set_backend", "get_backend", "available_backends", "last_backends", "HardConcreteGate",
    "clear_cache", "GatedAttention", "GatedSelfAttention", "GatedIntermediate", "gate_parameters", "iter_gates",
    "set_gate_sampling", "SUPPORTED_MODEL_TYPES", "NotPatchedError",
    "family_of", "register_family", "use_backend", "fallback_reasons",
]
