"""Shared by the output_mask tests of the kernel backward ops (cpp and Triton)."""
import torch


def spy_backward(monkeypatch, op_name):
    """Record (output_mask, output shapes) of every call of torch.ops.structprune.<op_name>."""
    calls = []
    real = getattr(torch.ops.structprune, op_name)

    def spy(*args, **kwargs):
        grads = real(*args, **kwargs)
        mask = kwargs["output_mask"] if "output_mask" in kwargs else args[-1]
        calls.append((list(mask), [tuple(g.shape) for g in grads]))
        return grads

    monkeypatch.setattr(torch.ops.structprune, op_name, spy)
    return calls


def frozen_names(frozen, names):
    """The leaves a case such as "x+weights" freezes; ``names`` = (x, weights and biases..., gates); a part may
    also name one leaf."""
    parts = frozen.split("+")
    _, *weights, gates = names
    off = {n for n in names if n in parts}
    if "weights" in parts:
        off.update(weights)
    if "gates" in parts:
        off.add(gates)
    return off
