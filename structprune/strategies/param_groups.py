"""Optimizer groups of a model's trainable weights: decayed, except biases, norms and other 1-D parameters; and
which groups keep a constant learning rate."""
from __future__ import annotations

from torch import nn


def _is_no_decay(name: str, param: nn.Parameter) -> bool:
    lowered = name.lower()
    return param.ndim < 2 or lowered.endswith("bias") or "layernorm" in lowered or "layer_norm" in lowered


def weight_param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0,
                        exclude: set[int] | None = None) -> list[dict]:
    """The model's trainable weights (minus ``exclude`` ids, e.g. the gates), decayed except biases,
    norms and other 1-D parameters."""
    exclude = exclude or set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in exclude:
            continue
        (no_decay if _is_no_decay(name, p) else decay).append(p)
    groups = [{"params": decay, "lr": lr, "weight_decay": weight_decay, "name": "weights"},
              {"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": "weights_no_decay"}]
    return [g for g in groups if g["params"]]


CONSTANT_LR_GROUPS = ("gates", "lagrangian")  # CoFi's L0 and Lagrangian optimizers have no schedule


def constant_lr(_step: int) -> float:
    """The LR multiplier of the :data:`CONSTANT_LR_GROUPS`: the gates and the Lagrange multipliers keep their
    learning rate while the weights' decays; decaying them too freezes the L0 selection short of its target."""
    return 1.0


__all__ = ["weight_param_groups", "CONSTANT_LR_GROUPS", "constant_lr"]
