"""What is specific to the Triton gated FFN (structprune._kernels); the op contract every backend meets (shapes,
kept units, activations, dtypes, frozen inputs, opcheck) is tests/ops/test_op_contract.py.

Here: x with other than three dimensions, strided inputs, the saved tensors, the backward op's output_mask,
torch.compile, the kernels' own input checks and TF32. Runs on CPU under the Triton interpreter (conftest sets
TRITON_INTERPRET=1 when there is no CUDA) and on CUDA when present; tolerances from tests/helpers/tolerances.py.
"""
import re

import pytest
import torch

from helpers.grad_masks import check_against_unmasked
from helpers.tolerances import check_close
from helpers.triton_cases import (check_compiled_matches_eager, check_compiled_with_frozen_leaves, check_frozen_leaves,
                                  check_outputs, run_and_grads, triton_devices)
from helpers.triton_cases import cast_except_gates as cast

DEVICES = triton_devices()

from structprune.ops import reference  # noqa: E402
from structprune.ops.activations import ACTIVATIONS  # noqa: E402
import structprune.backends.triton as K  # noqa: E402

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
    check_outputs("", (out, grads), (r, r_grads), (p, p_grads), NAMES, kept_units, dtype)


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
    leaves, kept_units = make_inputs((2, 7), 32, 48, "random", DEVICES[0], seed=3)
    dy = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(1)).to(DEVICES[0])
    check_frozen_leaves(monkeypatch, "triton_gated_ffn_backward", lambda *t: K.gated_ffn(*t, kept_units, activation),
                        lambda *t: reference.gated_ffn(*t, activation), leaves, NAMES, frozen, FROZEN[frozen], dy,
                        kept_units)


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
    leaves, kept_units = make_inputs((2, 5), 32, 48, "random", DEVICES[0])
    check_compiled_with_frozen_leaves(lambda *t: K.gated_ffn(*t, kept_units, "gelu"), leaves, NAMES,
                                      ("x", "unit_gates"), torch.randn(2, 5, 32, device=DEVICES[0]))


def test_torch_compile_fullgraph():
    """aot_eager: traced through the fake registrations (forward and backward ops), run eagerly."""
    leaves, kept_units = make_inputs((2, 5), 32, 48, "random", DEVICES[0])
    check_compiled_matches_eager(lambda *t: K.gated_ffn(*t, kept_units, "gelu_tanh"), leaves,
                                 torch.randn(2, 5, 32, device=DEVICES[0]))


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
