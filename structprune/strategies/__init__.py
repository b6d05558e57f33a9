"""Pruning strategies: which heads and FFN units to keep.

Every strategy returns a :class:`~structprune.Masks` of exactly the :class:`PruneTarget` size (fractions or
counts KEPT, ranked globally or per layer), starting from the model's current masks, so strategies compose.
Apply the result with :func:`apply_masks` (``sp.set_masks``).

* :func:`random_masks` -- uniform, seeded.
* :func:`magnitude_masks` -- per layer, by weight norms, data-free (the demo's).
* :func:`gain_masks` -- Michel et al. (2019) importance ``E|dL/dgate|``, one-shot or iterative.
* :class:`L0Controller` -- hard-concrete gates trained under a Lagrangian size constraint (CoFi), then
  :meth:`L0Controller.finalize` for an exact decision.
"""
from structprune.strategies.gain import Importance, gain_importance, gain_masks
from structprune.strategies.l0 import LAGRANGIAN_FILE, L0Controller, Lagrangian, finalize_l0, fold_gates, weight_param_groups
from structprune.strategies.magnitude import magnitude_masks
from structprune.strategies.random import random_masks
from structprune.model.masks import gate_sizes
from structprune.strategies.targets import PruneTarget, apply_masks, as_target, current_masks, select_top

__all__ = [
    "PruneTarget", "as_target", "apply_masks", "current_masks", "gate_sizes", "select_top",
    "random_masks", "magnitude_masks", "gain_masks", "gain_importance", "Importance",
    "L0Controller", "Lagrangian", "finalize_l0", "fold_gates", "weight_param_groups", "LAGRANGIAN_FILE",
]
