"""structprune: structured pruning of transformers with gated heads and FFN units.

    import structprune as sp
    sp.patch(model); sp.set_masks(model, heads=H, ffn=F); small = sp.compact(model)

The package's rooms: :mod:`structprune.ops` (the op stack) and :mod:`structprune.backends` (torch, cpp, triton);
:mod:`structprune.model` (gates, modules, patching, masks, compaction, save/load, families); strategies, latency,
training, qa, export, serving (``sp.optimize``), benchmark and tools above them. Every public name is re-exported here.
"""
from structprune._version import __version__
from structprune import strategies  # noqa: F401  (sp.strategies)
from structprune.model.compaction import compact, unpatch
from structprune.model.families import family_of, register_family
from structprune.model.families.bert import GatedAttention, GatedIntermediate
from structprune.model.gates import HardConcreteGate
from structprune.model.io import from_pretrained, save_pretrained
from structprune.model.layer_drop import drop_layers
from structprune.model.masks import Masks, get_masks, set_masks
from structprune.model.modules import GatedSelfAttention
from structprune.model.patching import (SUPPORTED_MODEL_TYPES, NotPatchedError, gate_parameters, is_patched,
                                        iter_gates, patch, set_gate_sampling)
from structprune.model.summary import Summary, summary
from structprune.ops.dispatch import (available_backends, clear_cache, fallback_reasons, get_backend, last_backends,
                                      set_backend, use_backend)
from structprune.serving import optimize
from structprune.training import distill  # noqa: F401  (sp.distill)

__all__ = [
    "patch", "unpatch", "is_patched", "set_masks", "get_masks", "Masks", "compact", "save_pretrained", "from_pretrained",
    "summary", "Summary", "set_backend", "get_backend", "available_backends", "last_backends", "HardConcreteGate",
    "clear_cache", "GatedAttention", "GatedSelfAttention", "GatedIntermediate", "gate_parameters", "iter_gates",
    "set_gate_sampling", "SUPPORTED_MODEL_TYPES", "NotPatchedError",
    "family_of", "register_family", "use_backend", "fallback_reasons", "optimize", "__version__",
    "drop_layers",
]
