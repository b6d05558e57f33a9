"""Pruning a causal LM: the heads, KV groups and GLU units chosen by random, gain or L0, the survivors (or, for L0,
weights and gates together) trained on the next-token loss, optionally distilled from the unpruned model
(:func:`~structprune.training.distill.lm_distillation_loss`), then decided and compacted."""
from __future__ import annotations

import copy
import itertools
from typing import Callable

import torch
from torch import nn

from structprune.lm.data import batches
from structprune.model.compaction import compact
from structprune.model.masks import Masks, get_masks
from structprune.model.patching import gate_parameters, patch
from structprune.strategies import (L0Controller, PruneTarget, apply_masks, gain_masks, random_masks,
                                    weight_param_groups)
from structprune.training.trainer import PruningLoss

METHODS = ("random", "gain", "l0")


def _cycle(blocks: dict, batch_size: int, seed: int):
    """Shuffled batches, epoch after epoch (a new order each epoch, from ``seed``)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield from batches(blocks, batch_size, shuffle=True, generator=gen)


def prune_lm(model: nn.Module, blocks: dict, method: str, target: PruneTarget, steps: int, batch_size: int = 8,
             lr: float = 5e-5, distill: bool = False, alpha: float = 0.5, temperature: float = 2.0,
             gate_lr: float = 0.01, lambda_lr: float = 0.01, warmup_steps: int = 0, gain_batches: int = 8,
             gain_steps: int = 1, keep_dead: bool = False, seed: int = 0, log: Callable[[dict], None] | None = None) -> tuple[nn.Module, Masks]:
    """Prune ``model`` (a HF causal LM, patched here when it is not) to ``target`` on ``blocks``
    (:func:`structprune.lm.data.tokenize_blocks`) and return ``(the compacted model, the masks kept)``.

    ``method``: "random" or "gain" decide first (gain on ``gain_batches`` batches, in ``gain_steps`` steps) and then
    train the survivors for ``steps`` optimizer steps; "l0" trains weights and gates together for ``steps`` steps
    (the target reached over ``warmup_steps``) and then decides. With ``distill`` the unpruned model is the teacher:
    ``alpha * KD + (1 - alpha) * LM loss`` at ``temperature``. ``keep_dead``: see
    :func:`~structprune.strategies.finalize_l0`. ``log`` gets one dict per step."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    teacher = copy.deepcopy(model).eval() if distill else None
    model = patch(model)
    torch.manual_seed(seed)
    controller = None
    if method == "random":
        apply_masks(model, random_masks(model, target, seed=seed))
    elif method == "gain":
        sample = list(itertools.islice(batches(blocks, batch_size), gain_batches))
        apply_masks(model, gain_masks(model, sample, target, steps=gain_steps))
    else:
        controller = L0Controller(model, target, warmup_steps=warmup_steps, seed=seed)
    if controller is not None:
        groups = controller.param_groups(model, lr=lr, gate_lr=gate_lr, lambda_lr=lambda_lr)
    else:  # the decided masks stay: the gates are not trained
        groups = weight_param_groups(model, lr, exclude={id(p) for p in gate_parameters(model)})
    loss_fn = PruningLoss(controller=controller, teacher=teacher, alpha=alpha, temperature=temperature)
    optimizer = torch.optim.AdamW(groups) if steps else None
    model.train()
    for step, batch in zip(range(steps), _cycle(blocks, batch_size, seed)):
        loss = loss_fn(model(**batch), batch, step)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # the lambdas' too: they are in the optimizer
        if log is not None:
            entry = {"step": step + 1, "loss": float(loss.detach()), **loss_fn.last}
            if controller is not None:
                entry.update(controller.stats(step))
            log(entry)
    model.eval()
    masks = controller.finalize(keep_dead=keep_dead) if controller is not None else get_masks(model)
    return compact(model), masks


__all__ = ["METHODS", "prune_lm"]
