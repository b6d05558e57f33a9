"""What is specific to the Triton gated FFN (structprune._kernels); the op contract every backend meets (shapes,
kept units, activations, dtypes, frozen inputs, opcheck) is tests/ops/test_op_contract.py.

Here: x with other than three dimensions, strided inputs, the saved tensors, the backward op's output_mask,
torch.compile, the kernels' own input checks and TF32. Runs on CPU under the Triton interpreter (conftest sets
TRITON_INTERPRET=1 when there is no CUDA) and on CUDA when present; tolerances from tests/helpers/tolerances.py.
"""
import os
import re

import pytest
import torch

from helpers.grad_masks import check_against_unmasked, check_masked_shapes, frozen_names, spy_backward
from helpers.tolerances import check_close

triton = pytest.importorskip("triton")

from structprune.ops import reference  # noqa: E402
from structprune.ops.activations import ACTIVATIONS  # noqa: E402
import structprune.backends.triton as K  # noqa: E402

DEVICES = (["cpu"] if os.environ.get("TRITON_INTERPRET") == "1" else []) + (
    ["cuda"] if torch.cuda.is_available() else [])
if not DEVICES or K.availability(torch.device(DEVICES[0])) is not None:
    pytest.skip("Triton backend unavailable: " + str(K.availability(torch.device("cpu"))), allow_module_level=True)

NAMES = ("x", "w1", "b1", "w2", "b2", "unit_gates")


def make_inputs(lead, E, I, kept, device, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    x = rnd(*lead, E, scale=1.0)
    w1, b1, w2, b2 = rnd(I, E, scale=E ** -0.5), rnd(I, scale=0.5), rnd(E, I, scale=I ** -0.5), rnd(E, scale=0.1)
    gates = torch.rand(I, generator=g) * 0.9 + 0.1
    if kept == "none":
        gates.zero_()
    elif kept == "one":
        gates[torch.arange(I) != I // 2] = 0.0
    elif kept == "random":
        gates[torch.rand(I, generator=g) < 0.6] = 0.0
    gates = gates.to(device)
    return [x, w1, b1, w2, b2, gates], torch.nonzero(gates != 0).flatten()


def run_and_grads(fn, leaves, dy):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(*leaves)
    return out, torch.autograd.grad(out, leaves, dy.to(out.dtype))


def cast(leaves, dtype):
    return [t.to(dtype) for t in leaves[:-1]] + [leaves[-1]]  # gates stay fp32


def compare(leaves, kept_units, activation, dtype):
    dy = torch.randn(leaves[0].shape, generator=torch.Generator().manual_seed(1)).to(leaves[0].device)

    def kern(*t):
        return K.gated_ffn(*t, kept_units, activation)

    def ref(*t):
        return reference.gated_ffn(*t, activation)

    out, grads = run_and_grads(kern, cast(leaves, dtype), dy)
    r, r_grads = run_and_grads(ref, leaves, dy)
    p, p_grads = (r, r_grads) if dtype == torch.float32 else run_and_grads(ref, cast(leaves, dtype), dy)
    assert out.dtype == dtype and out.shape == leaves[0].shape
    check_close("out", out, r, p, dtype)
    pruned = torch.ones(leaves[1].shape[0], dtype=torch.bool, device=out.device)
    pruned[kept_units] = False
    for name, got, rg, pg in zip(NAMES, grads, r_grads, p_grads):
        assert got.dtype == (torch.float32 if name == "unit_gates" else dtype), name
        if name == "unit_gates":
            # The reference also differentiates pruned gates; the kernel skips those units: zero there.
            assert torch.all(got[pruned] == 0), "unit_gates grad must be 0 for pruned units"
            got, rg, pg = got[kept_units], rg[kept_units], pg[kept_units]
        check_close(f"grad {name}", got, rg, pg, dtype)


# lead dims, E, I, kept, activation, dtype
# x of two and four dimensions (the op contract covers [B, S, E])
CASES = [
    pytest.param((40,), 48, 80, "one", "gelu", torch.float32, id="2d-x-one-unit"),
    pytest.param((2, 3, 5), 32, 40, "random", "gelu", torch.float32, id="4d-x"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lead,E,I,kept,activation,dtype", CASES)
def test_matches_reference(device, lead, E, I, kept, activation, dtype):
    leaves, kept_units = make_inputs(lead, E, I, kept, device)
    compare(leaves, kept_units, activation, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_noncontiguous_inputs(device):
    leaves, kept_units = make_inputs((3, 7), 32, 48, "random", device)
    leaves[0] = torch.empty(7, 3, 32, device=device).transpose(0, 1).copy_(leaves[0])
    leaves[1] = leaves[1].t().contiguous().t()  # w1 with transposed storage
    leaves[3] = leaves[3].t().contiguous().t()
    assert not (leaves[0].is_contiguous() or leaves[1].is_contiguous() or leaves[3].is_contiguous())
    compare(leaves, kept_units, "gelu", torch.float32)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_larger_shapes(device):
    """Several GEMM tiles along every dimension."""
    leaves, kept_units = make_inputs((2, 130), 256, 512, "random", device)
    compare(leaves, kept_units, "gelu", torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_no_grad_saves_nothing(device):
    leaves, kept_units = make_inputs((2, 4), 32, 48, "random", device)
    with torch.no_grad():
        y, pre, h = torch.ops.structprune.triton_gated_ffn(*leaves, kept_units, "relu", False)
    assert pre.numel() == 0 and h.numel() == 0
    check_close("y", y, reference.gated_ffn(*leaves, "relu"), None, torch.float32)


# --- output_mask: only the gradients that are needed -----------------------------------------------------------------
# Leaves frozen with requires_grad_(False) -> the output_mask (x, weights and biases, gates) the backward gets.
FROZEN = {"weights": [True, False, True], "gates": [True, True, False], "x": [False, True, True],
          "x+weights": [False, False, True], "w1": [True, True, True]}


@pytest.mark.parametrize("activation", ["gelu", "relu", "silu"])
@pytest.mark.parametrize("frozen", list(FROZEN))
def test_frozen_inputs_get_no_gradient(frozen, activation, monkeypatch):
    """Leaves requiring grad get the reference gradients; frozen ones get None, and the backward op was asked for
    no more than needed (output_mask), returning empty tensors for the rest."""
    device = DEVICES[0]
    leaves, kept_units = make_inputs((2, 7), 32, 48, "random", device, seed=3)
    dy = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(1)).to(device)
    ref, ref_grads = run_and_grads(lambda *t: reference.gated_ffn(*t, activation), leaves, dy)
    off = frozen_names(frozen, NAMES)
    mine = [t.detach().clone().requires_grad_(name not in off) for name, t in zip(NAMES, leaves)]
    calls = spy_backward(monkeypatch, "triton_gated_ffn_backward")
    out = K.gated_ffn(*mine, kept_units, activation)
    check_close("out", out, ref, ref, torch.float32)
    out.backward(dy)
    mask = FROZEN[frozen]
    assert [c[0] for c in calls] == [mask]
    pruned = torch.ones(48, dtype=torch.bool, device=device)
    pruned[kept_units] = False
    check_masked_shapes(calls[0][1], mask, dict(zip(NAMES, mine)))
    for name, t, r in zip(NAMES, mine, ref_grads):
        if name in off:
            assert t.grad is None, f"{name} is frozen but got a gradient"
            continue
        got = t.grad
        if name == "unit_gates":
            assert torch.all(got[pruned] == 0)
            got, r = got[kept_units], r[kept_units]
        check_close(f"grad {name}", got, r, r, torch.float32)


def _backward_args(device, activation="gelu", kept="random"):
    leaves, kept_units = make_inputs((2, 7), 32, 48, kept, device, seed=4)
    _, pre, h = torch.ops.structprune.triton_gated_ffn(*leaves, kept_units, activation, True)
    dy = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(2)).to(device)
    x, w1, _, w2, _, gates = leaves
    return (dy, x, w1, w2, gates, kept_units, pre, h, activation)


@pytest.mark.parametrize("mask", [[True, False, True], [False, False, True], [False, True, False],
                                  [True, False, False], [False] * 3],
                         ids=["frozen-weights", "gates-only", "weights-only", "x-only", "nothing"])
@pytest.mark.parametrize("kept", ["none", "random", "all"])
def test_backward_output_mask_direct(mask, kept):
    """Called directly: masked-out gradients are empty, the others equal the default (all) call's."""
    args = _backward_args(DEVICES[0], kept=kept)
    op = torch.ops.structprune.triton_gated_ffn_backward
    full, got = op(*args), op(*args, mask)
    check_against_unmasked(got, full, mask, NAMES)


def test_opcheck_backward_with_output_mask():
    args = _backward_args(DEVICES[0], "relu")
    torch.library.opcheck(torch.ops.structprune.triton_gated_ffn_backward, (*args, [False, False, True]),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_torch_compile_fullgraph_frozen_weights():
    """aot_eager with frozen weights: the masked backward is traced through its fake kernel."""
    device = DEVICES[0]
    leaves, kept_units = make_inputs((2, 5), 32, 48, "random", device)

    def fn(*t):
        return K.gated_ffn(*t, kept_units, "gelu")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    dy = torch.randn(2, 5, 32, device=device)
    results = []
    for f in (compiled, fn):
        mine = [t.detach().clone().requires_grad_(name in ("x", "unit_gates")) for name, t in zip(NAMES, leaves)]
        f(*mine).backward(dy)
        results.append([t.grad for t in mine])
    for name, a, b in zip(NAMES, *results):
        assert (a is None) == (b is None) == (name not in ("x", "unit_gates")), name
        if a is not None:
            torch.testing.assert_close(a, b)


def test_torch_compile_fullgraph():
    """aot_eager: traced through the fake registrations (forward and backward ops), run eagerly."""
    device = DEVICES[0]
    leaves, kept_units = make_inputs((2, 5), 32, 48, "random", device)

    def fn(*t):
        return K.gated_ffn(*t, kept_units, "gelu_tanh")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    dy = torch.randn(2, 5, 32, device=device)
    out_c, grads_c = run_and_grads(compiled, leaves, dy)
    out_e, grads_e = run_and_grads(fn, leaves, dy)
    torch.testing.assert_close(out_c, out_e)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b)


def test_input_errors():
    """The checks every backend shares (structprune/_input_checks.py; tests/test_input_checks.py runs them all)."""
    device = DEVICES[0]
    leaves, kept_units = make_inputs((1, 4), 32, 48, "all", device)
    with pytest.raises(ValueError, match=r"w2 must have shape \[32, 48\]"):
        K.gated_ffn(*leaves[:3], leaves[3][:, :40], *leaves[4:], kept_units, "gelu")
    with pytest.raises(ValueError, match=r"b1 must have the dtype of x \(torch.float16\), got torch.float32"):
        K.gated_ffn(leaves[0].half(), leaves[1].half(), leaves[2], leaves[3].half(),
                    leaves[4].half(), leaves[5], kept_units, "gelu")
    with pytest.raises(ValueError, match="activation must be one of " + re.escape(str(ACTIVATIONS)) + ", got 'swish'"):
        K.gated_ffn(*leaves, kept_units, "swish")
    with pytest.raises(ValueError, match="kept_units must be a 1-D int64 tensor, got torch.int32"):
        K.gated_ffn(*leaves, kept_units.int(), "gelu")
    with pytest.raises(ValueError, match="kept_units must hold sorted unique indices in"):
        K.gated_ffn(*leaves, kept_units.flip(0).cpu(), "gelu")  # the order: not checked here before
    with pytest.raises(ValueError, match="x must be a float32, float16 or bfloat16 tensor .*, got torch.float64"):
        K.gated_ffn(leaves[0].double(), *leaves[1:], kept_units, "gelu")


def test_fp32_matmuls_follow_torch_matmul_precision():
    """fp32 ``tl.dot`` uses TF32 when torch allows it ("high"/"medium"), full IEEE fp32 for "highest"."""
    from structprune._kernels import _common as C

    old = torch.get_float32_matmul_precision()
    try:
        for precision, mode in (("highest", C.DOT_IEEE), ("high", C.DOT_TF32), ("medium", C.DOT_TF32)):
            torch.set_float32_matmul_precision(precision)
            assert C.dot_mode(torch.float32) == mode, precision
            assert C.dot_mode(torch.float16) == C.DOT_IEEE
        # a TF32 launch runs and stays within TF32 accuracy (10-bit mantissa) of the fp32 reference
        leaves, kept = make_inputs((2, 5), 32, 40, "random", DEVICES[0])
        x, w1, b1, w2, b2, gates = leaves
        y = K.gated_ffn(x, w1, b1, w2, b2, gates, kept, "gelu")
    finally:
        torch.set_float32_matmul_precision(old)
    ref = reference.gated_ffn(x, w1, b1, w2, b2, gates, "gelu")
    torch.testing.assert_close(y, ref, atol=2e-2, rtol=2e-2)  # TF32's 10-bit mantissa, not a dtype of its own
