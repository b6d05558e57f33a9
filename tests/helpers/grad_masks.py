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


def _wanted(mask, n):
    """Per output of a backward op with n outputs (x, weights and biases..., gates): whether the mask asks for it."""
    return [mask[0]] + [mask[1]] * (n - 2) + [mask[2]]


def check_masked_shapes(shapes, mask, leaves):
    """The op left the masked-out gradients empty and computed the others full-size; ``leaves``: name -> tensor,
    in the op's output order."""
    for (name, t), shape, want in zip(leaves.items(), shapes, _wanted(mask, len(leaves))):
        assert shape == (tuple(t.shape) if want else (0,)), f"d{name}: shape {shape} with output_mask {mask}"


def check_against_unmasked(got, full, mask, names):
    """A call with ``mask`` gave empty tensors where it leaves gradients out, and the default call's others."""
    for name, g, f, want in zip(names, got, full, _wanted(mask, len(names))):
        assert g.dtype == f.dtype and g.device == f.device, name
        if want:
            assert torch.equal(g, f), f"d{name} differs from the unmasked call with output_mask {mask}"
        else:
            assert g.shape == (0,), f"d{name} must be empty with output_mask {mask}, got shape {tuple(g.shape)}"
