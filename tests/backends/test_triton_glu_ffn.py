"""The Triton gated GLU FFN (kernels/glu_ffn.py) against the reference: forward and every gradient, fp32 / fp16 /
bf16, odd shapes, 0 / some / all units kept, biases present or None, every activation of the table and "silu"
(called on the op directly, ahead of the table), the backward op's output_mask, opcheck and the dispatcher.
Runs under the Triton interpreter on CPU (conftest sets TRITON_INTERPRET=1) or on CUDA; tolerances from
tests/helpers/tolerances.py."""
import pytest
import torch
import torch.nn.functional as F

from helpers.grad_masks import check_against_unmasked
from helpers.triton_cases import check_outputs, run_with_optional as run, triton_devices

DEV = triton_devices()[0]

import structprune as sp  # noqa: E402
from structprune.ops import dispatch, reference  # noqa: E402
from structprune.ops.activations import ACTIVATIONS  # noqa: E402
from structprune._kernels import glu_ffn as G  # noqa: E402

B, S, E, I = 2, 5, 24, 13  # odd sizes: every tile has a ragged edge
NAMES = ("x", "w1", "b1", "w2", "b2", "unit_gates")


def case(kept="some", bias=True, seed=0, lead=(B, S)):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=0.3: (torch.randn(*s, generator=gen) * scale).to(DEV)  # noqa: E731
    params = [r(*lead, E, scale=1.0), r(2 * I, E), r(2 * I) if bias else None, r(E, I), r(E) if bias else None]
    index = {"none": torch.zeros(0, dtype=torch.long), "all": torch.arange(I),
             "some": torch.randperm(I, generator=gen)[:5].sort().values}[kept]
    gates = torch.zeros(I)
    gates[index] = 0.25 + torch.rand(index.numel(), generator=gen)
    return params, gates.to(DEV), index.to(DEV)


def compare(name, fn, ref, params, gates, kept, dtype):
    dy = torch.randn(params[0].shape, generator=torch.Generator().manual_seed(1)).to(DEV)
    got = run(fn, params, gates, dtype, dy)
    rounded = [None if t is None else t.to(dtype).float() for t in params]
    ref32 = run(ref, rounded, gates, torch.float32, dy)
    plain = ref32 if dtype == torch.float32 else run(ref, params, gates, dtype, dy)
    assert got[0].dtype == dtype and got[0].shape == params[0].shape
    check_outputs(f"{name} ", got, ref32, plain, NAMES, kept, dtype)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("kept", ["none", "some", "all"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_matches_the_reference_fp32(activation, kept, bias):
    params, gates, index = case(kept, bias, seed=len(activation) + 3 * bias)
    compare(f"glu[{activation},{kept}]", lambda *t: G.gated_glu_ffn(*t, index, activation),
            lambda *t: reference.gated_glu_ffn(*t, activation), params, gates, index, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("bias,kept", [(True, "some"), (False, "all")])
def test_matches_the_reference_in_half_precision(dtype, bias, kept):
    params, gates, index = case(kept, bias, seed=11)
    compare(f"glu[{dtype}]", lambda *t: G.gated_glu_ffn(*t, index, "gelu"),
            lambda *t: reference.gated_glu_ffn(*t, "gelu"), params, gates, index, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_silu_on_the_op_directly(dtype):
    """``silu`` (x * sigmoid(x), the decoder GLU's activation) through the custom op itself: the activation table
    need not list it yet for the kernels to compute it."""
    params, gates, index = case("some", True, seed=5)

    def silu_ref(x, w1, b1, w2, b2, g):
        a, gate_half = F.linear(x, w1, b1).chunk(2, dim=-1)
        return F.linear(F.silu(a) * gate_half * g.to(a.dtype), w2, b2)

    def op(*t):
        return torch.ops.structprune.triton_gated_glu_ffn(*t, index, "silu", True)[0]

    compare("glu[silu]", op, silu_ref, params, gates, index, dtype)


def test_x_of_any_rank_and_the_saved_tensors():
    params, gates, index = case("some", True, lead=(7,))
    y0, *unsaved = torch.ops.structprune.triton_gated_glu_ffn(*params, gates, index, "gelu", False)
    y1, pre, h = torch.ops.structprune.triton_gated_glu_ffn(*params, gates, index, "gelu", True)
    assert all(t.shape == (0,) for t in unsaved) and pre.shape == (7, 10) and h.shape == (7, 5)
    torch.testing.assert_close(y0, y1, rtol=0, atol=0)
    x, w1, b1 = params[:3]
    rows = torch.cat([index, index + I])
    torch.testing.assert_close(pre, F.linear(x, w1[rows], b1[rows]))
    torch.testing.assert_close(h, F.gelu(pre[:, :5]) * pre[:, 5:] * gates[index])
    torch.testing.assert_close(y0, reference.gated_glu_ffn(*params, gates, "gelu"), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mask", [[True, False, False], [False, True, False], [False, False, True]])
def test_backward_honours_the_output_mask(mask):
    params, gates, index = case("some", True)
    x, w1, b1, w2, b2 = params
    _, pre, h = torch.ops.structprune.triton_gated_glu_ffn(*params, gates, index, "relu", True)
    args = (torch.randn_like(x), x, w1, w2, gates, index, pre, h, "relu", True, True)
    full = torch.ops.structprune.triton_gated_glu_ffn_backward(*args)
    part = torch.ops.structprune.triton_gated_glu_ffn_backward(*args, output_mask=mask)
    check_against_unmasked(part, full, mask, NAMES)
    nb = torch.ops.structprune.triton_gated_glu_ffn_backward(*args[:-2], False, False)
    assert nb[2].shape == (0,) and nb[4].shape == (0,) and nb[1].shape == (2 * I, E)


def test_opcheck():
    params, gates, index = case("some", False)
    for save in (False, True):
        torch.library.opcheck(torch.ops.structprune.triton_gated_glu_ffn.default,
                              (*params, gates, index, "gelu_tanh", save), test_utils=("test_schema", "test_faketensor"))


def test_dispatcher_runs_the_triton_glu_ffn():
    params, gates, index = case("some", True)
    with sp.use_backend("triton"):
        y = dispatch.gated_glu_ffn(*params, gates, index, "gelu")
    assert sp.last_backends()["ffn"] == "triton"
    torch.testing.assert_close(y, reference.gated_glu_ffn(*params, gates, "gelu"), atol=1e-5, rtol=1e-5)


def test_bad_input_is_refused_with_what_was_expected():
    params, gates, index = case("some", True)
    with pytest.raises(ValueError, match="2 \\* units rows"):
        G.gated_glu_ffn(params[0], params[1][:-1], None, params[3], None, gates, index, "gelu")
    with pytest.raises(ValueError, match="sorted unique"):
        G.gated_glu_ffn(*params, gates, index.flip(0), "gelu")
