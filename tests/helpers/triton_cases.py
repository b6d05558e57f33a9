"""What the Triton kernel tests (tests/backends/test_triton_*.py) share: the devices they run on, gradients of a
function of leaf tensors, the frozen-leaf check of a backward op's output_mask and the torch.compile checks."""
import os

import pytest
import torch

from helpers.grad_masks import check_masked_shapes, frozen_names, spy_backward
from helpers.tolerances import check_close


def triton_devices():
    """``["cpu"]`` under the Triton interpreter, plus ``"cuda"`` when present; skips the calling test module when
    triton is missing, there is no such device, or the Triton backend is unavailable on the first."""
    pytest.importorskip("triton")
    import structprune.backends.triton as K

    devices = (["cpu"] if os.environ.get("TRITON_INTERPRET") == "1" else []) + (
        ["cuda"] if torch.cuda.is_available() else [])
    if not devices or K.availability(torch.device(devices[0])) is not None:
        pytest.skip("Triton backend unavailable: " + str(K.availability(torch.device("cpu"))), allow_module_level=True)
    return devices


def cast_except_gates(leaves, dtype):
    """``leaves`` in ``dtype`` but the last (the gates stay fp32, as the modules pass them)."""
    return [t.to(dtype) for t in leaves[:-1]] + [leaves[-1]]


def run_and_grads(fn, leaves, dy):
    """``fn``'s output on fresh copies of ``leaves`` that require grad, and their gradients for ``dy``."""
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(*leaves)
    return out, torch.autograd.grad(out, leaves, dy.to(out.dtype))


def run_with_optional(fn, params, gates, dtype, dy):
    """``fn(*params, gates)`` with ``params`` in ``dtype`` (entries may be None: absent biases) and the gates fp32,
    and the gradients for ``dy``, None for the absent entries."""
    leaves = [None if t is None else t.to(dtype).requires_grad_() for t in params] + [gates.clone().requires_grad_()]
    y = fn(*leaves)
    live = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(y, live, dy.to(y.dtype)))
    return y, [None if t is None else next(grads) for t in leaves]


def check_frozen_leaves(monkeypatch, op_name, fn, ref_fn, leaves, names, frozen, mask, dy, kept):
    """``fn(*leaves)`` with the leaves of case ``frozen`` (see :func:`frozen_names`) not requiring grad: the output
    and the others' gradients are the reference ``ref_fn``'s (fp32), the frozen ones get None, and the backward op
    ``op_name`` was asked once with ``mask`` and left the masked-out gradients empty. The gates (the last leaf)
    are compared at the ``kept`` entries and must get 0 elsewhere."""
    ref, ref_grads = run_and_grads(ref_fn, leaves, dy)
    off = frozen_names(frozen, names)
    mine = [t.detach().clone().requires_grad_(name not in off) for name, t in zip(names, leaves)]
    calls = spy_backward(monkeypatch, op_name)
    out = fn(*mine)
    check_close("out", out, ref, ref, torch.float32)
    out.backward(dy)
    assert [c[0] for c in calls] == [mask]
    pruned = torch.ones(leaves[-1].shape[0], dtype=torch.bool, device=dy.device)
    pruned[kept] = False
    check_masked_shapes(calls[0][1], mask, dict(zip(names, mine)))
    for name, t, r in zip(names, mine, ref_grads):
        if name in off:
            assert t.grad is None, f"{name} is frozen but got a gradient"
            continue
        got = t.grad
        if name == names[-1]:
            assert torch.all(got[pruned] == 0)
            got, r = got[kept], r[kept]
        check_close(f"grad {name}", got, r, r, torch.float32)


def check_compiled_matches_eager(fn, leaves, dy):
    """aot_eager, fullgraph: the output and every leaf's gradient equal the eager call's (the graph is traced
    through the ops' fake registrations, forward and backward, and run eagerly)."""
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out_c, grads_c = run_and_grads(compiled, leaves, dy)
    out_e, grads_e = run_and_grads(fn, leaves, dy)
    torch.testing.assert_close(out_c, out_e)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b)


def check_compiled_with_frozen_leaves(fn, leaves, names, trainable, dy):
    """aot_eager, fullgraph, only the leaves named in ``trainable`` requiring grad (the masked backward is traced
    through its fake kernel): they get the eager call's gradients, the others none."""
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    results = []
    for f in (compiled, fn):
        mine = [t.detach().clone().requires_grad_(name in trainable) for name, t in zip(names, leaves)]
        f(*mine).backward(dy)
        results.append([t.grad for t in mine])
    for name, a, b in zip(names, *results):
        assert (a is None) == (b is None) == (name not in trainable), name
        if a is not None:
            torch.testing.assert_close(a, b)


def check_outputs(tag, got, ref32, plain, names, kept, dtype):
    """``(y, grads)`` of a kernel against the fp32 reference's and the plain ``dtype`` one's (the rule of
    :func:`check_close`): gradients in ``dtype`` but the gates' (the last, fp32), None where the reference's is
    None (absent biases); the gates' gradient is compared at the ``kept`` entries and must be 0 elsewhere (the
    reference also differentiates pruned gates; the kernels never form those units)."""
    check_close(f"{tag}y", got[0], ref32[0], plain[0], dtype)
    for name, a, r, p in zip(names, got[1], ref32[1], plain[1]):
        if r is None:
            assert a is None, name
            continue
        assert a.dtype == (torch.float32 if name == names[-1] else dtype), name
        if name == names[-1]:
            pruned = torch.ones(a.shape[0], dtype=torch.bool, device=a.device)
            pruned[kept] = False
            assert torch.all(a[pruned] == 0), f"{name}: gradient must be 0 for pruned entries"
            a, r, p = a[kept], r[kept], p[kept]
        check_close(f"{tag}d{name}", a, r, p, dtype)
