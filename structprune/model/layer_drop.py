"""Layer dropping: a shallower model built from a deeper one's layers (the ``layerdrop`` baseline of issue 27).

:func:`drop_layers` returns a plain Hugging Face model of the same class whose config has ``k`` layers, holding
the embeddings, the kept layers' weights (in their order) and the task head of the original; nothing of
structprune is needed to load what it saves. Layers are found through the model's family adapter, so every
supported family works; a family with per-layer settings carries the kept layers' own (ModernBERT's global /
local ``layer_types``: see :meth:`~structprune.model.families.base.Family.shallower_config`).

Which layers a count keeps (:func:`layers_to_keep`): every other layer, evenly spread, always keeping the last.
For ``k`` of ``n`` layers it keeps ``n - 1 - floor(j * n / k)`` for ``j < k``: 3 of 6 keeps ``1, 3, 5``, 2 of 6
keeps ``2, 5``, 6 of 12 keeps ``1, 3, ..., 11``. Why:

* spreading the kept layers over the depth is how DistilBERT initialised its student (every other layer of
  BERT-base, Sanh et al. 2019), and Sajjad et al. ("Poor Man's BERT", 2020) found alternate dropping among the
  strategies that lose least after fine-tuning (top-layer dropping did as well or better on GLUE, so an
  explicit list, e.g. ``0,1,2``, is there to try it);
* keeping the last layer keeps the space the teacher's task head reads, so the copied QA head starts from the
  inputs it was trained on; our students are distilled for one epoch only, so a good start matters.

ModernBERT's first layer has no pre-attention norm (the embeddings' norm precedes it): when the first kept layer
is not the original's layer 0, that layer's ``attn_norm`` has no place in the shallower model and is not copied
(a warning names it); training the student adapts to it.
"""
from __future__ import annotations

import math
import warnings
from typing import Iterable

from torch import nn

from structprune.model.families import family_of
from structprune.model.gates import HardConcreteGate


def layers_to_keep(keep: int | Iterable[int], num_layers: int) -> list[int]:
    """The layer indices (ascending) that ``keep`` means in a model of ``num_layers`` layers: a count ``k``
    (``1 <= k <= num_layers``, spread as the module docstring says) or the indices themselves."""
    if num_layers < 1:
        raise ValueError(f"the model has no layers to keep (num_layers={num_layers})")
    if isinstance(keep, int):
        if not 1 <= keep <= num_layers:
            raise ValueError(f"keep {keep} layers: expected a count from 1 to {num_layers} (the model's layers)")
        return sorted(num_layers - 1 - math.floor(j * num_layers / keep) for j in range(keep))
    indices = list(keep)
    if not indices or any(not isinstance(i, int) or not 0 <= i < num_layers for i in indices):
        raise ValueError(f"keep layers {indices}: expected layer indices from 0 to {num_layers - 1}")
    if len(set(indices)) != len(indices):
        raise ValueError(f"keep layers {indices}: an index appears twice")
    return sorted(indices)


def drop_layers(model: nn.Module, keep: int | Iterable[int]) -> nn.Module:
    """A new model of ``model``'s class with only the layers ``keep`` (a count or indices, see
    :func:`layers_to_keep`): its embeddings, those layers' weights and its head copied; ``model`` is unchanged.

    ``model`` must be a plain (unpatched, uncompacted) Hugging Face model of a supported family."""
    if any(isinstance(m, HardConcreteGate) for m in model.modules()):
        raise TypeError(f"drop_layers takes a plain transformers model; this {type(model).__name__} is patched by "
                        "structprune (drop layers before patching, or pass the unpruned model)")
    family = family_of(model)
    layers = family.layers(model)
    kept = layers_to_keep(keep, len(layers))
    prefix = next(name for name, module in model.named_modules() if module is layers)
    position = {old: new for new, old in enumerate(kept)}
    source = {}
    for key, value in model.state_dict().items():
        if key.startswith(prefix + "."):
            index, _, rest = key[len(prefix) + 1:].partition(".")
            if int(index) not in position:
                continue
            key = f"{prefix}.{position[int(index)]}.{rest}"
        source[key] = value

    student = type(model)(family.shallower_config(model.config, kept))
    target = student.state_dict()
    missing = sorted(set(target) - set(source))
    if missing:
        raise RuntimeError(f"drop_layers: the shallower {type(model).__name__} has weights the original lacks: "
                           f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
    wrong = {k: (tuple(source[k].shape), tuple(v.shape)) for k, v in target.items() if source[k].shape != v.shape}
    if wrong:
        raise ValueError(f"drop_layers takes a model whose layers have its config's sizes; these differ "
                         f"({{name: (model, config)}}: {dict(list(wrong.items())[:3])}): was it compacted?")
    unplaced = sorted(set(source) - set(target))
    if unplaced:
        warnings.warn(f"drop_layers: the shallower {type(model).__name__} has no place for {unplaced} (a layer now "
                      "first has no such weight); they are not copied", stacklevel=2)
    student.load_state_dict({k: source[k] for k in target}, strict=True)
    reference = next(model.parameters())
    return student.to(device=reference.device, dtype=reference.dtype).train(model.training)
